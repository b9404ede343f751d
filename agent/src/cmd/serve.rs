//! `kvrail decode` / `kvrail prefill`: run one agent until SIGINT/SIGTERM.
//!
//! When the agent is ready it prints one JSON line on stdout (`"event":
//! "ready"`, the bound address, the handshake time), which drivers such as
//! `kvrail demo` wait for. Logs go to stderr.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kvrail_proto::v1 as pb;
use kvrail_transfer::RegionAlloc;

use crate::agent::control::ControlService;
use crate::agent::error::AgentError;
use crate::agent::peer_service::PeerService;
use crate::agent::{prefill, Agent, AgentConfig, Role};
use crate::cli::AgentArgs;
use crate::memwatch::{MemWatch, MemWatchConfig};
use crate::registry::{Entry, Registry};
use crate::sidecar::fdpass::{self, FdInbox};
use crate::sidecar::{AttachCall, SidecarService};
use tokio::sync::mpsc;

/// Largest gRPC message accepted (a request naming a million blocks fits).
pub const MAX_MESSAGE: usize = 64 << 20;

fn heap_bytes() -> Option<u64> {
    Some(kvrail_transfer::memory::heap_in_use())
}

pub async fn run(role: Role, args: &AgentArgs, peers: Vec<String>) -> anyhow::Result<i32> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let listen: SocketAddr = listener.local_addr()?;
    let agent_id =
        args.agent_id.clone().unwrap_or_else(|| format!("{}-{}-{}", role.as_str(), crate::registry::hostname(), std::process::id()));
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
    // Before the region is allocated: a registry that cannot work fails the start now.
    let entry = args.registry.registry.is_some().then(|| registry_entry(role, args, &agent_id, listen)).transpose()?;
    let registry = open_registry(args, &agent_id).await?;
    let cfg = AgentConfig {
        role,
        agent_id,
        listen,
        peers: peers.clone(),
        idle_timeout: args.idle_timeout,
        transport: args.geometry.transport,
        region_bytes: args.geometry.region_bytes,
        block_bytes: args.geometry.block_bytes,
        layers: args.layers,
        // With --region-from-client the engine's region replaces this one.
        region_alloc: if args.region_from_client {
            RegionAlloc::Ucx
        } else {
            args.geometry.memory.region_alloc(args.mmap_region).map_err(anyhow::Error::msg)?
        },
        window: args.window,
        progress_cpu: args.progress_cpu,
        test_patterns: args.test_patterns,
        request_timeout: Duration::from_secs_f64(args.request_timeout_secs.max(0.001)),
        allow_hooks: std::env::var_os(crate::guard::ALLOW_HOOKS_VAR).is_some(),
        lease: Duration::from_secs_f64(args.lease_secs.max(0.05)),
        stall_timeout: Duration::from_secs_f64(args.stall_secs.max(0.01)),
        secret,
        tls: args.tls.load()?,
        attached: None,
    };
    let mut mw = MemWatchConfig::default();
    mw.trend.warmup_secs = args.memwatch.memwatch_warmup_secs;
    mw.trend.window_secs = args.memwatch.memwatch_window_secs;
    mw.trend.threshold_mib_per_min = args.memwatch.memwatch_threshold_mib_per_min;
    let leak = args.test_inject_leak_mib_per_min.map(crate::churn::LeakInjector::start).transpose()?;
    let memwatch = MemWatch::start(mw, heap_bytes);
    let agent = if args.region_from_client {
        let path = args.local_socket.as_deref().ok_or_else(|| anyhow::anyhow!("--region-from-client needs --local-socket PATH"))?;
        let cuda_ipc = args.geometry.memory == crate::memory::Memory::CudaIpc;
        start_on_engine_region(cfg, memwatch, path, args.advertise.clone(), cuda_ipc).await?
    } else {
        let agent = tokio::task::spawn_blocking(move || Agent::start(cfg, memwatch)).await??;
        if let Some(path) = &args.local_socket {
            let control = pb::control_server::ControlServer::new(ControlService { agent: agent.clone() })
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
            serve_local(path, SidecarService::started(agent.clone()), Some(control))?;
        }
        agent
    };
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

    // Every --peer is dialled at once; the agent is ready once each has
    // its first session (the ready line gives the slowest handshake).
    let mut handshake_ms = None;
    let mut dials = Vec::new();
    for addr in peers {
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(prefill::run(agent.clone(), addr.clone(), tx));
        dials.push((addr, rx));
    }
    for (addr, rx) in dials {
        match tokio::time::timeout(Duration::from_secs(120), rx).await {
            Ok(Ok(Ok(ms))) => handshake_ms = Some(handshake_ms.map_or(ms, |m: f64| m.max(ms))),
            Ok(Ok(Err(e))) => anyhow::bail!("decode agent {addr} refused the handshake: {}", crate::diagnose::one_line(&e)),
            _ => anyhow::bail!("could not reach the decode agent at {addr} within 120 s"),
        }
    }
    if let (Some((r, _)), Ok(d)) = (&registry, agent.decode()) {
        // Requests that name a prefill agent by id alone dial it at its entry's address.
        d.dialer.set_resolver(Arc::new(crate::registry::RegistryResolver(r.clone())));
        // A peer that leaves the registry fails its requests at once.
        tokio::spawn(crate::registry::fail_departed_peers(r.clone(), agent.clone()));
    }
    let publisher = match (&registry, entry) {
        (Some((r, etcd_up)), Some(e)) => r.publish(e, args.registry_ttl, *etcd_up).await?,
        _ => None,
    };
    let registry_desc = registry.as_ref().map(|(r, _)| r.describe());
    ready_line(&agent, listen, handshake_ms, metrics, args.local_socket.as_deref(), registry_desc.as_deref());
    server.await??;
    if let Some(p) = publisher {
        p.withdraw().await;
    }
    tracing::info!(agent_id = %agent.cfg.agent_id, "agent stopped");
    Ok(0)
}

/// Serves the Sidecar API (before the region is attached: AttachRegion
/// only) and the descriptor side socket, waits for the engine's region and
/// starts the agent on it. A region the agent cannot start on is refused to
/// the engine, which may attach another; the agent keeps waiting.
async fn start_on_engine_region(
    cfg: AgentConfig,
    memwatch: Arc<MemWatch>,
    path: &std::path::Path,
    advertise: Option<String>,
    cuda_ipc: bool,
) -> anyhow::Result<Arc<Agent>> {
    let inbox = FdInbox::default();
    let fd_path = fd_socket(path);
    fdpass::serve(&fd_path, inbox.clone())?;
    let cell = Arc::new(OnceLock::new());
    let (gate, mut calls) = mpsc::channel::<AttachCall>(1);
    serve_local(path, SidecarService::waiting(cell.clone(), cfg.role, gate, inbox, cuda_ipc), None)?;
    let line = serde_json::json!({
        "event": "waiting_for_region",
        "role": cfg.role.as_str(),
        "agent_id": cfg.agent_id,
        "pid": std::process::id(),
        "local_socket": path.display().to_string(),
        "fd_socket": fd_path.display().to_string(),
    });
    println!("{line}");
    tracing::info!(socket = %path.display(), "waiting for the engine's region (Sidecar AttachRegion)");
    loop {
        let call = calls.recv().await.ok_or_else(|| anyhow::anyhow!("the local API stopped before a region was attached"))?;
        let mut c = cfg.clone();
        c.region_bytes = call.wanted.layout.region_bytes();
        c.block_bytes = call.wanted.layout.block_bytes();
        c.layers = call.wanted.layout.num_layers();
        c.region_alloc = match (&call.wanted.source, call.fd) {
            (crate::sidecar::attach::Source::CudaIpc { device, handle }, _) => RegionAlloc::CudaIpc { device: *device, handle: *handle },
            (crate::sidecar::attach::Source::HostFd { .. }, Some(fd)) => {
                RegionAlloc::SharedFile { fd: Arc::new(fd), offset: call.wanted.offset }
            }
            (crate::sidecar::attach::Source::HostFd { .. }, None) => anyhow::bail!("a host region was attached without its descriptor"),
        };
        c.attached = Some(call.wanted);
        let mw = memwatch.clone();
        match tokio::task::spawn_blocking(move || Agent::start(c, mw)).await? {
            Ok(agent) => {
                let _ = cell.set(agent.clone());
                let agent_address = advertise.clone().unwrap_or_else(|| advertised(agent.cfg.listen));
                let resp = pb::AttachRegionResponse { agent_id: agent.cfg.agent_id.clone(), agent_address };
                let _ = call.reply.send(Ok(resp));
                return Ok(agent);
            }
            Err(e) => {
                let msg = format!("the agent cannot start on this region: {}", crate::diagnose::one_line(&e));
                tracing::warn!("{msg}");
                let _ = call.reply.send(Err(AgentError::Precondition(msg)));
            }
        }
    }
}

/// The side socket for region descriptors beside the local socket `path`.
pub fn fd_socket(path: &std::path::Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".fd");
    p.into()
}

/// The address peers should dial (without --advertise): the listen
/// address, with this host's name for an unspecified IP.
fn advertised(listen: SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        format!("{}:{}", crate::registry::hostname(), listen.port())
    } else {
        listen.to_string()
    }
}

/// The local API on a Unix socket, owner-only: Sidecar, and Control once
/// the agent has its region.
fn serve_local(
    path: &std::path::Path,
    sidecar: SidecarService,
    control: Option<pb::control_server::ControlServer<ControlService>>,
) -> anyhow::Result<()> {
    let listener = bind_owner_only(path, |p| tokio::net::UnixListener::bind(p))?;
    let sidecar =
        pb::sidecar_server::SidecarServer::new(sidecar).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE);
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let router = tonic::transport::Server::builder().add_service(sidecar).add_optional_service(control);
    tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown_signal()));
    tracing::info!(socket = %path.display(), "local API on a Unix socket (0600)");
    Ok(())
}

/// Binds a Unix socket at `path` (replacing a stale one) that only this
/// user can connect to: created under a 0077 umask, so no other user can
/// connect in between, then set to 0600.
pub fn bind_owner_only<L>(path: &std::path::Path, bind: impl FnOnce(&std::path::Path) -> std::io::Result<L>) -> anyhow::Result<L> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        std::fs::remove_file(path).map_err(|e| anyhow::anyhow!("removing stale socket {}: {e}", path.display()))?;
    }
    let listener = {
        let _umask = UmaskGuard::owner_only();
        bind(path).map_err(|e| anyhow::anyhow!("binding local socket {}: {e}", path.display()))?
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
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
    registry: Option<&str>,
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
        "registry": registry,
    });
    println!("{line}");
}

/// The registry of `--registry`/`--peers`, and whether its etcd answered
/// (an etcd that does not is fatal unless a peers file stands in for it).
async fn open_registry(args: &AgentArgs, agent_id: &str) -> anyhow::Result<Option<(Registry, bool)>> {
    let Some(reg) = Registry::open(args.registry.registry.as_ref(), args.registry.peers.as_deref()).await? else {
        return Ok(None);
    };
    crate::registry::check_agent_id(agent_id)?;
    let up = match reg.etcd() {
        None => false,
        Some(etcd) => match etcd.probe().await {
            Ok(()) => true,
            Err(e) if reg.has_file() => {
                tracing::warn!("{e}; lookups use {} until it answers, and this agent publishes itself when it does", reg.describe());
                false
            }
            Err(e) => anyhow::bail!("{e}; or give --peers FILE to start from a static list"),
        },
    };
    Ok(Some((reg, up)))
}

/// What this agent publishes about itself.
fn registry_entry(role: Role, args: &AgentArgs, agent_id: &str, listen: SocketAddr) -> anyhow::Result<Entry> {
    let address = match &args.advertise {
        Some(a) => a.clone(),
        None if listen.ip().is_unspecified() => {
            anyhow::bail!("--listen {listen} is not an address peers can dial: give --advertise HOST:PORT for the registry")
        }
        None => listen.to_string(),
    };
    let epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let entry = Entry {
        agent_id: agent_id.into(),
        role: role.as_str().into(),
        address,
        rank: args.rank,
        host: crate::registry::hostname(),
        memory: "host".into(),
        protocol_version: kvrail_proto::PROTOCOL_VERSION,
        epoch,
    };
    entry.check(None).map_err(|e| anyhow::anyhow!("this agent's registry entry: {e} (--advertise, --agent-id)"))?;
    Ok(entry)
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
