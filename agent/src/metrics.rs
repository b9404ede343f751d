//! Prometheus exposition: `GET /metrics` on `--metrics ADDR`, rendered from
//! the same figures as the Stats RPC (a tiny HTTP/1.1 responder; nothing
//! else is served).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use kvrail_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::agent::convert::hook_mode_name;
use crate::agent::Agent;

/// Binds `addr` and serves metrics until the process exits.
pub async fn serve(addr: SocketAddr, agent: Arc<Agent>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { continue };
            let agent = agent.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                while n < buf.len() {
                    match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf[n..])).await {
                        Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                        Ok(Ok(k)) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let (status, ctype, body) = if head.starts_with("GET /metrics ") || head.starts_with("GET /metrics?") {
                    ("200 OK", "text/plain; version=0.0.4", render(&agent.stats()))
                } else {
                    ("404 Not Found", "text/plain", "kvrail serves only /metrics here\n".to_string())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    tracing::info!(%bound, "serving Prometheus metrics at /metrics");
    Ok(bound)
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Prometheus text format for one agent's stats.
pub fn render(s: &pb::StatsResponse) -> String {
    let mut o = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    let m = s.memory.clone().unwrap_or_default();
    metric("kvrail_bytes_moved_total", "counter", "Bytes this agent moved with RMA.", s.bytes_moved as f64);
    metric("kvrail_transfers_ok_total", "counter", "Transfers completed.", s.transfers_ok as f64);
    metric("kvrail_transfers_failed_total", "counter", "Transfers that failed.", s.transfers_failed as f64);
    metric(
        "kvrail_deliveries_rejected_total",
        "counter",
        "Active-message deliveries dropped (unknown or closed tag, outside the region, more than expected).",
        s.deliveries_rejected as f64,
    );
    metric("kvrail_peers", "gauge", "Connected peers.", s.peers as f64);
    metric("kvrail_prefaulting", "gauge", "Peer mappings still being pre-faulted in the background.", s.prefaulting as f64);
    metric("kvrail_rss_bytes", "gauge", "VmRSS.", m.vm_rss as f64);
    metric("kvrail_rss_anon_bytes", "gauge", "RssAnon.", m.rss_anon as f64);
    metric("kvrail_rss_file_bytes", "gauge", "RssFile.", m.rss_file as f64);
    metric("kvrail_rss_shmem_bytes", "gauge", "RssShmem.", m.rss_shmem as f64);
    metric("kvrail_heap_bytes", "gauge", "Allocator bytes in use (mallinfo2).", m.heap as f64);
    metric("kvrail_mappings", "gauge", "Entries in /proc/self/maps.", m.maps as f64);
    metric("kvrail_rss_slope_mib_per_min", "gauge", "Least-squares RSS slope over the window.", m.rss_slope_mib_per_min);
    metric("kvrail_heap_slope_mib_per_min", "gauge", "Heap slope over the window.", m.heap_slope_mib_per_min);
    metric("kvrail_memory_leak", "gauge", "1 when the memory self-check says leak.", if m.verdict == "leak" { 1.0 } else { 0.0 });
    metric(
        "kvrail_ucx_intercepted_munmaps_total",
        "counter",
        "munmap events UCX's hooks delivered (must be 0).",
        s.ucx_intercepted_munmaps as f64,
    );
    metric("kvrail_churn_munmaps_total", "counter", "munmap calls of the soak's allocator churn.", s.churn_munmaps as f64);
    metric("kvrail_uptime_seconds", "gauge", "Seconds since the agent started.", s.uptime_ms as f64 / 1e3);
    if s.memory_kind == pb::MemoryKind::Cuda as i32 {
        // GPU memory is not in RSS: the region's footprint is the device's.
        let gpu = format!("{{device=\"{}\"}}", s.cuda_device);
        let _ = writeln!(o, "# HELP kvrail_gpu_memory_used_bytes Device memory in use on the region's GPU, all processes (cuMemGetInfo); not in RSS.\n# TYPE kvrail_gpu_memory_used_bytes gauge");
        let _ = writeln!(o, "kvrail_gpu_memory_used_bytes{gpu} {}", s.gpu_used_bytes);
        let _ = writeln!(
            o,
            "# HELP kvrail_gpu_memory_total_bytes Device memory of the region's GPU.\n# TYPE kvrail_gpu_memory_total_bytes gauge"
        );
        let _ = writeln!(o, "kvrail_gpu_memory_total_bytes{gpu} {}", s.gpu_total_bytes);
    }
    let _ = writeln!(o, "# HELP kvrail_memory_verdict Memory self-check verdict.\n# TYPE kvrail_memory_verdict gauge");
    let _ = writeln!(o, "kvrail_memory_verdict{{verdict=\"{}\"}} 1", esc(&m.verdict));
    let _ = writeln!(o, "# HELP kvrail_info Agent identity, UCX and verified hook mode.\n# TYPE kvrail_info gauge");
    let _ = writeln!(
        o,
        "kvrail_info{{agent_id=\"{}\",ucx_version=\"{}\",ucx_library=\"{}\",transport=\"{}\",mmap_hook_mode=\"{}\",memory=\"{}\"}} 1",
        esc(&s.agent_id),
        esc(&s.ucx_version),
        esc(&s.ucx_library),
        esc(&s.transport),
        hook_mode_name(s.hook_mode),
        memory_name(s.memory_kind)
    );
    render_peers(&mut o, &s.peer_stats);
    o
}

/// One series per peer for each per-peer figure, labelled with its id,
/// the address this agent dialled (empty if the peer dialled) and epoch.
fn render_peers(o: &mut String, peers: &[pb::PeerStats]) {
    type Series = (&'static str, &'static str, &'static str, fn(&pb::PeerStats) -> f64);
    let series: [Series; 6] = [
        ("kvrail_peer_bytes_total", "counter", "Bytes moved by a peer session's requests that succeeded.", |p| p.bytes as f64),
        ("kvrail_peer_requests_ok_total", "counter", "Requests of a peer session that succeeded.", |p| p.requests_ok as f64),
        ("kvrail_peer_requests_failed_total", "counter", "Requests of a peer session that failed.", |p| p.requests_failed as f64),
        ("kvrail_peer_pending", "gauge", "Requests pending on a peer session.", |p| p.pending as f64),
        ("kvrail_peer_session_age_seconds", "gauge", "Seconds since a peer session was admitted.", |p| p.age_ms as f64 / 1e3),
        ("kvrail_peer_open", "gauge", "1 while a peer session is open.", |p| if p.state == "open" { 1.0 } else { 0.0 }),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for p in peers {
            let labels = format!("peer=\"{}\",address=\"{}\",epoch=\"{}\"", esc(&p.agent_id), esc(&p.address), p.epoch);
            let _ = writeln!(o, "{name}{{{labels}}} {}", value(p));
        }
    }
}

/// `host` or `cuda` for a wire memory kind (UNSPECIFIED is host).
fn memory_name(raw: i32) -> &'static str {
    if raw == pb::MemoryKind::Cuda as i32 {
        "cuda"
    } else {
        "host"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let s = pb::StatsResponse {
            agent_id: "a\"b".into(),
            bytes_moved: 42,
            hook_mode: pb::HookMode::None as i32,
            memory: Some(pb::MemoryStats { vm_rss: 1000, verdict: "leak".into(), rss_slope_mib_per_min: 5.5, ..Default::default() }),
            peer_stats: vec![pb::PeerStats {
                agent_id: "p1".into(),
                address: "10.0.0.7:5000".into(),
                state: "open".into(),
                epoch: 3,
                bytes: 4096,
                requests_ok: 2,
                ..Default::default()
            }],
            ..Default::default()
        };
        let t = render(&s);
        assert!(t.contains("\nkvrail_bytes_moved_total 42\n"), "{t}");
        assert!(t.contains("kvrail_rss_bytes 1000"));
        assert!(t.contains("kvrail_memory_leak 1"));
        assert!(t.contains("kvrail_rss_slope_mib_per_min 5.5"));
        assert!(t.contains("agent_id=\"a\\\"b\""));
        assert!(t.contains("mmap_hook_mode=\"none\""));
        assert!(t.contains("kvrail_peer_bytes_total{peer=\"p1\",address=\"10.0.0.7:5000\",epoch=\"3\"} 4096"), "{t}");
        assert!(t.contains("kvrail_peer_requests_ok_total{peer=\"p1\",address=\"10.0.0.7:5000\",epoch=\"3\"} 2"), "{t}");
        assert!(t.contains("kvrail_peer_open{peer=\"p1\""), "{t}");
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "bad sample line {line}");
        }
        assert!(t.contains("memory=\"host\""), "{t}");
        assert!(!t.contains("kvrail_gpu_memory"), "host memory has no GPU figures: {t}");
    }

    #[test]
    fn a_gpu_region_reports_its_device_memory() {
        let s = pb::StatsResponse {
            memory_kind: pb::MemoryKind::Cuda as i32,
            cuda_device: 1,
            gpu_used_bytes: 3 << 30,
            gpu_total_bytes: 80 << 30,
            ..Default::default()
        };
        let t = render(&s);
        assert!(t.contains(&format!("\nkvrail_gpu_memory_used_bytes{{device=\"1\"}} {}\n", 3u64 << 30)), "{t}");
        assert!(t.contains(&format!("\nkvrail_gpu_memory_total_bytes{{device=\"1\"}} {}\n", 80u64 << 30)), "{t}");
        assert!(t.contains("memory=\"cuda\""), "{t}");
    }
}
