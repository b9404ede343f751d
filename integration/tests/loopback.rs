//! The main job on loopback: two real agent processes, every byte verified,
//! hooks off in both, over shared memory and TCP, push and pull.

use std::time::Duration;

use kvrail_integration::run_json;

fn demo(transport: &str, mode: &str, bytes: &str) -> serde_json::Value {
    let (code, v) = run_json(
        &[
            "demo",
            "--transport",
            transport,
            "--mode",
            mode,
            "--bytes",
            bytes,
            "--region-bytes",
            "64MiB",
            "--block-bytes",
            "64KiB",
            "--json",
        ],
        Duration::from_secs(240),
    );
    assert_eq!(code, 0, "demo failed: {v:#}");
    v
}

fn check(v: &serde_json::Value, transport: &str, bytes: u64) {
    assert_eq!(v["verified"], true, "{v:#}");
    assert_eq!(v["transport"], transport);
    assert_eq!(v["bytes"].as_u64(), Some(bytes));
    assert_eq!(v["verified_blocks"].as_u64(), Some(bytes / 65536));
    assert_eq!(v["bad_blocks"].as_u64(), Some(0));
    assert_eq!(v["mmap_hook_mode"], "none", "{v:#}");
    for agent in ["decode", "prefill"] {
        assert_eq!(v[agent]["mmap_hook_mode"], "none", "{agent}: {v:#}");
        assert_eq!(v[agent]["ucx_intercepted_munmaps"].as_u64(), Some(0), "{agent}");
        assert!(v[agent]["rss_end_mib"].as_f64().unwrap() > 0.0);
        let private = v[agent]["private_end_mib"].as_f64().unwrap();
        assert!(private > 0.0 && private <= v[agent]["rss_end_mib"].as_f64().unwrap(), "{agent}: {v:#}");
        assert!(!v[agent]["memwatch_verdict"].as_str().unwrap().is_empty(), "{agent}: {v:#}");
        assert_eq!(v[agent]["memory"], "ok", "{agent}: {v:#}");
    }
    assert_eq!((v["ok"].as_bool(), v["memory"].as_str()), (Some(true), Some("ok")), "{v:#}");
    assert!(v["failure"].is_null(), "{v:#}");
    assert!(v["gbps"].as_f64().unwrap() > 0.0);
    assert!(v["handshake_ms"].as_f64().unwrap() > 0.0);
    // Same UCX in the test's view and in both agents.
    let (_, info) = run_json(&["info", "--json"], Duration::from_secs(30));
    assert_eq!(v["ucx_library"], info["ucx_library"]);
    assert_eq!(v["decode"]["ucx_library"], v["prefill"]["ucx_library"]);
}

#[test]
fn demo_push_over_shared_memory_verifies_every_block() {
    // 160 MiB over a 64 MiB region: three passes, the last one partial.
    let v = demo("sm", "write", "160MiB");
    check(&v, "sm", 160 << 20);
}

#[test]
fn demo_push_over_tcp_verifies_every_block() {
    let v = demo("tcp", "write", "96MiB");
    check(&v, "tcp", 96 << 20);
}

#[test]
fn demo_pull_over_shared_memory_verifies_every_block() {
    let v = demo("sm", "read", "96MiB");
    check(&v, "sm", 96 << 20);
    assert_eq!(v["mode"], "read");
}

#[test]
fn info_reports_hooks_off_and_the_loaded_library() {
    let (code, v) = run_json(&["info", "--json"], Duration::from_secs(30));
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["mmap_hook_mode"], "none");
    assert_eq!(v["hooks_off"], true);
    assert_eq!(v["hooks"]["patched"].as_array().map(Vec::len), Some(0));
    assert!(v["ucx_library"].as_str().unwrap().contains("libucp"));
    // kvrail reads this from the loaded library; ucx_info from the build.
    assert_eq!(v["ucx_assertions"], kvrail_integration::ucx_info_says_assertions(None), "{v:#}");
    assert!(v["transports"].as_array().unwrap().iter().any(|t| t.as_str().unwrap().starts_with("tcp/")));
}

/// Requests in flight together finish one after another, each as its own
/// blocks are through, not all together at the end: a caller refilling
/// its queue as requests finish keeps the wire busy. Eight 16 MiB pushes
/// over tcp, submitted at once: if they finished together, the first to
/// finish would have waited about as long as the last.
#[tokio::test]
async fn requests_in_flight_over_tcp_finish_one_after_another() {
    use kvrail_proto::v1 as pb;
    let (mut decode, mut prefill) = kvrail_integration::agent_pair("tcp", "256MiB", "1MiB").await;
    prefill.control.fill_pattern(pb::FillPatternRequest { seed: 9 }).await.unwrap();
    let requests: Vec<(Vec<u32>, Vec<u32>)> =
        (0..8u32).map(|r| ((r * 16..r * 16 + 16).collect(), (r * 16..r * 16 + 16).rev().map(|b| 255 - b).collect())).collect();
    let mut set = tokio::task::JoinSet::new();
    for (i, (src, dst)) in requests.iter().cloned().enumerate() {
        let mut control = decode.control.clone();
        set.spawn(async move {
            let req = pb::SubmitRequest {
                request_id: format!("inflight-{i}"),
                mode: pb::TransferMode::Write as i32,
                src_blocks: src,
                dst_blocks: dst,
                ..Default::default()
            };
            kvrail_agent::drive::workload::run_request(&mut control, req).await.unwrap()
        });
    }
    let mut latencies: Vec<u64> = Vec::new();
    while let Some(w) = set.join_next().await {
        let w = w.unwrap();
        assert_eq!(w.state, pb::RequestState::Done as i32, "{w:?}");
        latencies.push(w.latency_us);
    }
    latencies.sort_unstable();
    let (first, last) = (latencies[0], latencies[latencies.len() - 1]);
    assert!(first * 2 < last, "the first request to finish took {first} µs and the last {last} µs: they finished together ({latencies:?})");
    let (src, dst): (Vec<u32>, Vec<u32>) =
        (requests.iter().flat_map(|r| r.0.clone()).collect(), requests.iter().flat_map(|r| r.1.clone()).collect());
    let v =
        decode.control.verify_pattern(pb::VerifyPatternRequest { seed: 9, src_blocks: src, dst_blocks: dst }).await.unwrap().into_inner();
    assert_eq!(v.verified_blocks, 128, "{v:?}");
}
