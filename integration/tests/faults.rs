//! Peers die mid-transfer: every affected request fails with a clear error
//! within the deadline (no request stays pending), the survivor keeps
//! serving, and a restarted peer is re-handshaken automatically and moves
//! verified blocks again.

use std::time::{Duration, Instant};

use kvrail_integration::{kvrail_bin, verified_transfer, AgentProcess};
use kvrail_proto::v1 as pb;

const DEADLINE: Duration = Duration::from_secs(8);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn args(role: &str, id: &str, transport: &str, listen: &str) -> Vec<String> {
    let mut v = kvrail_integration::test_agent_args(role, id, transport, "64MiB", "64KiB");
    v.extend(["--listen".into(), listen.into()]);
    v
}

async fn spawn(a: Vec<String>) -> AgentProcess {
    AgentProcess::spawn_exe(&kvrail_bin(), &a, false, Duration::from_secs(60)).await.expect("agent starts")
}

async fn prefill_for(decode: &AgentProcess, transport: &str) -> AgentProcess {
    let mut a = args("prefill", "f-prefill", transport, "127.0.0.1:0");
    a.extend(["--peer".to_string(), decode.listen.clone()]);
    spawn(a).await
}

/// Submits `n` requests of `blocks` blocks each (ids `tag-i`).
async fn submit_many(decode: &mut AgentProcess, tag: &str, n: u32, blocks: u32, mode: pb::TransferMode) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("{tag}-{i}");
        let src: Vec<u32> = (i * blocks..(i + 1) * blocks).map(|b| b % 1024).collect();
        let dst = src.clone();
        decode
            .control
            .submit(pb::SubmitRequest { request_id: id.clone(), mode: mode as i32, src_blocks: src, dst_blocks: dst, ..Default::default() })
            .await
            .unwrap();
        ids.push(id);
    }
    ids
}

/// Every request reaches a final state before the deadline; returns how many failed.
async fn all_final(decode: &mut AgentProcess, ids: &[String], since: Instant) -> usize {
    let mut failed = 0;
    for id in ids {
        let w = decode.control.wait(pb::WaitRequest { request_id: id.clone(), timeout_ms: 20_000 }).await.unwrap().into_inner();
        assert_ne!(w.state, pb::RequestState::Pending as i32, "{id} still pending after {:?}", since.elapsed());
        if w.state == pb::RequestState::Failed as i32 {
            assert!(!w.error.is_empty(), "{id}: a failure must say why");
            failed += 1;
        }
    }
    assert!(since.elapsed() < DEADLINE, "requests took {:?} to settle", since.elapsed());
    failed
}

async fn wait_for_peer(decode: &mut AgentProcess, id: &str) {
    let start = Instant::now();
    loop {
        let info = decode.control.info(pb::InfoRequest {}).await.unwrap().into_inner();
        if info.peers.iter().any(|p| p == id) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "peer {id} did not re-handshake: {:?}", info.peers);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_killed_mid_transfer_fails_requests_and_a_new_prefill_is_admitted() {
    // Over tcp the blocks come as active messages: a decode agent that were
    // the target of software-emulated puts could be aborted inside UCX
    // sending a completion to the dead writer.
    for transport in ["sm", "tcp"] {
        let failed = kill_prefill_mid(transport, pb::TransferMode::Write).await;
        assert!(failed > 0, "{transport}: killing the prefill agent mid-transfer failed nothing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_from_a_killed_prefill_fails_within_the_deadline() {
    for transport in ["sm", "tcp"] {
        kill_prefill_mid(transport, pb::TransferMode::Read).await;
    }
}

/// Kills the prefill agent right after submitting 64 requests of 256
/// blocks; every request settles within the deadline, and a restarted
/// prefill agent (same id) is admitted and moves verified blocks. Returns
/// how many requests failed.
async fn kill_prefill_mid(transport: &str, mode: pb::TransferMode) -> usize {
    let mut decode = spawn(args("decode", "f-decode", transport, "127.0.0.1:0")).await;
    let mut prefill = prefill_for(&decode, transport).await;
    prefill.control.fill_pattern(pb::FillPatternRequest { seed: 5 }).await.unwrap();
    let tag = format!("k-{transport}-{}", mode as i32);
    let ids = submit_many(&mut decode, &tag, 64, 256, mode).await;
    prefill.kill().await;
    let killed = Instant::now();
    let failed = all_final(&mut decode, &ids, killed).await;
    let mut again = prefill_for(&decode, transport).await;
    wait_for_peer(&mut decode, "f-prefill").await;
    verified_transfer(&mut decode, &mut again, &format!("after-{tag}")).await;
    decode.stop().await;
    again.stop().await;
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_killed_and_restarted_is_rehandshaken_by_the_prefill() {
    // Over tcp, pushing and pulling (both served as deliveries the prefill
    // agent sends: it is never the target of an emulated get there).
    let listen = format!("127.0.0.1:{}", free_port());
    let mut decode = spawn(args("decode", "f-decode", "tcp", &listen)).await;
    let mut prefill = prefill_for(&decode, "tcp").await;
    prefill.control.fill_pattern(pb::FillPatternRequest { seed: 5 }).await.unwrap();
    for mode in [pb::TransferMode::Write, pb::TransferMode::Read] {
        let _ = submit_many(&mut decode, "d", 32, 256, mode).await;
        decode.kill().await;
        // The prefill agent survives and keeps serving its API.
        let s = prefill.control.stats(pb::StatsRequest {}).await.unwrap().into_inner();
        assert_eq!(s.agent_id, "f-prefill", "{mode:?}");
        // A decode agent restarted at the same address gets the prefill agent back.
        decode = spawn(args("decode", "f-decode", "tcp", &listen)).await;
        wait_for_peer(&mut decode, "f-prefill").await;
        verified_transfer(&mut decode, &mut prefill, &format!("after-restart-{}", mode as i32)).await;
    }
    decode.stop().await;
    prefill.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_requests_and_the_agents_keep_serving() {
    let mut decode = spawn(args("decode", "f-decode", "tcp", "127.0.0.1:0")).await;
    let mut prefill = prefill_for(&decode, "tcp").await;
    prefill.control.fill_pattern(pb::FillPatternRequest { seed: 5 }).await.unwrap();
    for mode in [pb::TransferMode::Write, pb::TransferMode::Read] {
        let ids = submit_many(&mut decode, &format!("c{}", mode as i32), 4, 1024, mode).await;
        for id in &ids {
            let r = decode.control.cancel(pb::CancelRequest { request_id: id.clone() }).await.unwrap().into_inner();
            assert!(r.state == pb::RequestState::Pending as i32 || r.state == pb::RequestState::Done as i32, "{r:?}");
        }
        let mut cancelled = 0;
        for id in &ids {
            let w = decode.control.wait(pb::WaitRequest { request_id: id.clone(), timeout_ms: 20_000 }).await.unwrap().into_inner();
            assert_ne!(w.state, pb::RequestState::Pending as i32, "{id}");
            if w.state == pb::RequestState::Failed as i32 {
                assert_eq!(w.code, tonic::Code::Cancelled as i32, "{id}: {w:?}");
                cancelled += 1;
            }
        }
        assert!(cancelled > 0, "{mode:?}: cancel stopped nothing (4 x 64 MiB over tcp finished first?)");
    }
    let err = decode.control.cancel(pb::CancelRequest { request_id: "nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    verified_transfer(&mut decode, &mut prefill, "after-cancel").await;
    decode.stop().await;
    prefill.stop().await;
}
