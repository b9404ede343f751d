//! `kvrail decode` / `kvrail prefill`: run one agent until SIGINT/SIGTERM.
//!
//! When the agent is ready it prints one JSON line on stdout (`"event":
//! "ready"`, the bound address, the handshake time), which drivers such as
//! `kvrail demo` wait for. Logs go to stderr.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kvrail_proto::v1 as pb;

use crate::agent::control::ControlService;
use crate::agent::peer_service::PeerService;
use crate::agent::{prefill, Agent, AgentConfig, Role};
use crate::cli::AgentArgs;
use crate::memwatch::{MemWatch, MemWatchConfig};

/// Largest gRPC message accepted (a request naming a million blocks fits).
pub const MAX_MESSAGE: usize = 64 << 20;

fn heap_bytes() -> Option<u64> {
    Some(kvrail_transfer::memory::heap_in_use())
}

pub async fn run(role: Role, args: &AgentArgs, peer: Option<String>) -> anyhow::Result<i32> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let listen: SocketAddr = listener.local_addr()?;
    let agent_id = args.agent_id.clone().unwrap_or_else(|| format!("{}-{}-{}", role.as_str(), hostname(), std::process::id()));
    let secret = crate::agent::auth::ClusterSecret::load(args.cluster_secret_file.as_deref())?;
    if secret.is_none() && !args.insecure_no_auth {
        anyhow::bail!(
            "no cluster secret: put one (16+ bytes) in a file and pass --cluster-secret-file, or set {}; --insecure-no-auth runs without",
            crate::agent::auth::SECRET_VAR
        );
    }
    if secret.is_none() {
        tracing::warn!("running WITHOUT authentication: any peer that can reach this agent may write into its region");
    }
    let cfg = AgentConfig {
        role,
        agent_id,
        listen,
        peer: peer.clone(),
        transport: args.geometry.transport,
        region_bytes: args.geometry.region_bytes,
        block_bytes: args.geometry.block_bytes,
        layers: args.layers,
        region_alloc: args.geometry.memory.region_alloc(args.mmap_region).map_err(anyhow::Error::msg)?,
        window: args.window,
        progress_cpu: args.progress_cpu,
        test_patterns: args.test_patterns,
        request_timeout: Duration::from_secs_f64(args.request_timeout_secs.max(0.001)),
        allow_hooks: std::env::var_os(crate::guard::ALLOW_HOOKS_VAR).is_some(),
        lease: Duration::from_secs_f64(args.lease_secs.max(0.05)),
        stall_timeout: Duration::from_secs_f64(args.stall_secs.max(0.01)),
        secret,
        tls: args.tls.load()?,
    };
    let mut mw = MemWatchConfig::default();
    mw.trend.warmup_secs = args.memwatch.memwatch_warmup_secs;
    mw.trend.window_secs = args.memwatch.memwatch_window_secs;
    mw.trend.threshold_mib_per_min = args.memwatch.memwatch_threshold_mib_per_min;
    let leak = args.test_inject_leak_mib_per_min.map(crate::churn::LeakInjector::start).transpose()?;
    let memwatch = MemWatch::start(mw, heap_bytes);
    let agent = tokio::task::spawn_blocking(move || Agent::start(cfg, memwatch)).await??;
    *agent.soak.leak.lock().expect("lock") = leak;
    if args.churn_rounds_per_sec > 0 {
        *agent.soak.churn.lock().expect("lock") = Some(crate::churn::Churn::start(args.churn_rounds_per_sec, args.churn_unmaps_per_round));
    }
    agent.spawn_session_tasks();
    let metrics = match args.metrics {
        Some(addr) => Some(crate::metrics::serve(addr, agent.clone()).await?),
        None => None,
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<pb::peer_server::PeerServer<PeerService>>().await;
    health.set_serving::<pb::control_server::ControlServer<ControlService>>().await;
    let peer_svc = pb::peer_server::PeerServer::new(PeerService { agent: agent.clone() })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let control_svc = pb::control_server::ControlServer::new(ControlService { agent: agent.clone() })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    // Nagle on the accepted sockets would hold every reply's trailers back
    // for a delayed ACK (~40 ms per RPC on loopback).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &agent.cfg.tls {
        builder = builder.tls_config(tls.server()).map_err(|e| anyhow::anyhow!("TLS server configuration: {e}"))?;
        tracing::info!("gRPC over TLS (mutual, cluster CA)");
    }
    let server = builder
        .add_service(health_service)
        .add_service(peer_svc)
        .add_service(control_svc)
        .serve_with_incoming_shutdown(incoming, goodbye_on_signal(agent.clone()));
    let server = tokio::spawn(server);
    if let Some(path) = &args.local_socket {
        serve_local(path, agent.clone()).await?;
    }

    let mut handshake_ms = None;
    if let Some(addr) = peer {
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(prefill::run(agent.clone(), addr.clone(), tx));
        match tokio::time::timeout(Duration::from_secs(120), rx).await {
            Ok(Ok(Ok(ms))) => handshake_ms = Some(ms),
            Ok(Ok(Err(e))) => anyhow::bail!("decode agent {addr} refused the handshake: {}", crate::diagnose::one_line(&e)),
            _ => anyhow::bail!("could not reach the decode agent at {addr} within 120 s"),
        }
    }
    ready_line(&agent, listen, handshake_ms, metrics, args.local_socket.as_deref());
    server.await??;
    tracing::info!(agent_id = %agent.cfg.agent_id, "agent stopped");
    Ok(0)
}

/// The local Control API on a Unix socket, owner-only.
async fn serve_local(path: &std::path::Path, agent: Arc<Agent>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        std::fs::remove_file(path).map_err(|e| anyhow::anyhow!("removing stale socket {}: {e}", path.display()))?;
    }
    // Created under a 0077 umask so no other user can connect in between.
    let listener = {
        let _umask = UmaskGuard::owner_only();
        tokio::net::UnixListener::bind(path).map_err(|e| anyhow::anyhow!("binding local socket {}: {e}", path.display()))?
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let control = pb::control_server::ControlServer::new(ControlService { agent })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tokio::spawn(tonic::transport::Server::builder().add_service(control).serve_with_incoming_shutdown(incoming, shutdown_signal()));
    tracing::info!(socket = %path.display(), "local Control API on a Unix socket (0600)");
    Ok(())
}

/// Sets the process umask to 0077 for its lifetime (socket creation).
struct UmaskGuard(u32);

impl UmaskGuard {
    fn owner_only() -> UmaskGuard {
        UmaskGuard(kvrail_transfer::umask::set_umask(0o077))
    }
}

impl Drop for UmaskGuard {
    fn drop(&mut self) {
        kvrail_transfer::umask::set_umask(self.0);
    }
}

fn ready_line(
    agent: &Arc<Agent>,
    listen: SocketAddr,
    handshake_ms: Option<f64>,
    metrics: Option<SocketAddr>,
    local: Option<&std::path::Path>,
) {
    let line = serde_json::json!({
        "event": "ready",
        "role": agent.cfg.role.as_str(),
        "agent_id": agent.cfg.agent_id,
        "listen": listen.to_string(),
        "pid": std::process::id(),
        "metrics": metrics.map(|m| format!("http://{m}/metrics")),
        "local_socket": local.map(|p| p.display().to_string()),
        "handshake_ms": handshake_ms,
        "ucx_version": agent.ucx.version,
        "ucx_library": agent.ucx.library,
        "mmap_hook_mode": agent.hook_mode.as_str(),
        "tls": agent.cfg.tls.is_some(),
    });
    println!("{line}");
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "host".into())
}

/// On SIGINT/SIGTERM the agent says goodbye to its peers (they see an
/// orderly close, not a failure) before the server stops.
async fn goodbye_on_signal(agent: Arc<Agent>) {
    shutdown_signal().await;
    agent.goodbye().await;
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
