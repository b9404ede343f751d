//! A running agent serves its figures on a Prometheus `/metrics` endpoint:
//! RSS, heap, the memory verdict and the verified UCX hook mode.

use std::time::Duration;

use kvrail_integration::{kvrail_bin, AgentProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_memory_and_hook_mode() {
    let args: Vec<String> =
        ["decode", "--agent-id", "m-decode", "--region-bytes", "16MiB", "--metrics", "127.0.0.1:0"].iter().map(|s| s.to_string()).collect();
    let decode = AgentProcess::spawn_exe(&kvrail_bin(), &args, false, Duration::from_secs(60)).await.unwrap();
    let url = decode.ready["metrics"].as_str().expect("ready line names the metrics URL").to_string();
    let addr = url.trim_start_matches("http://").trim_end_matches("/metrics").to_string();
    let body = get(&addr, "/metrics").await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    for needle in [
        "kvrail_rss_bytes ",
        "kvrail_heap_bytes ",
        "kvrail_memory_verdict{verdict=\"warming_up\"} 1",
        "mmap_hook_mode=\"none\"",
        "agent_id=\"m-decode\"",
        "kvrail_ucx_intercepted_munmaps_total 0",
        "kvrail_prefaulting 0",
    ] {
        assert!(body.contains(needle), "missing {needle:?} in:\n{body}");
    }
    let rss: f64 = body.lines().find(|l| l.starts_with("kvrail_rss_bytes ")).unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    assert!(rss > 16.0 * 1024.0 * 1024.0, "RSS {rss} should hold the 16 MiB region");
    assert!(get(&addr, "/other").await.starts_with("HTTP/1.1 404"));
    decode.stop().await;
}
