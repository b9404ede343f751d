//! A running kvrail agent: what both roles share (its engine with the one
//! registered region, its layout, memory watch, configuration and UCX
//! facts, the nonces of handshakes it serves), and what is particular to
//! its role: a decode agent's sessions with prefill agents (accepted, or
//! dialled on demand) and requests (`decode`), a prefill agent's sessions
//! with decode agents (`prefill`). The handshake is `handshake`, from
//! either end; the session protocol itself is a pure state machine
//! (`session`); soak-only load sits apart (`SoakLoad`).

pub mod auth;
pub mod control;
pub mod convert;
pub mod decode;
pub mod effects;
pub mod error;
pub mod handshake;
pub mod peer_service;
pub mod prefill;
pub mod session;
pub mod validate;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvrail_proto::v1 as pb;
use kvrail_transfer::hooks::HookMode;
use kvrail_transfer::ucx_facts::UcxRuntime;
use kvrail_transfer::{BlockLayout, Engine, EngineConfig, MemoryKind, RegionAlloc, Transport};

use crate::memwatch::MemWatch;

/// Which side of the disaggregated deployment an agent serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Prefill,
    Decode,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

/// Everything an agent is started with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub role: Role,
    pub agent_id: String,
    pub listen: SocketAddr,
    /// Prefill only: the decode agents to dial (`--peer`, any number).
    pub peers: Vec<String>,
    /// Decode only: a session dialled on demand that carries no request
    /// for this long says goodbye and closes.
    pub idle_timeout: Duration,
    pub transport: Transport,
    pub region_bytes: u64,
    pub block_bytes: u64,
    pub layers: u32,
    pub region_alloc: RegionAlloc,
    pub window: usize,
    /// Bind the UCX progress thread to this CPU.
    pub progress_cpu: Option<usize>,
    /// Accept FillPattern/PoisonBlocks (demo, bench, soak drivers).
    pub test_patterns: bool,
    /// How long a request may wait for its completion.
    pub request_timeout: Duration,
    /// Demonstration only: run with UCX's memory hooks on.
    pub allow_hooks: bool,
    /// A session that hears nothing (not even a heartbeat) for this long
    /// is dead: its requests fail and its blocks are released.
    pub lease: Duration,
    /// A transfer whose RMA requests make no progress for this long fails.
    pub stall_timeout: Duration,
    /// The cluster secret; `None` only with `--insecure-no-auth`.
    pub secret: Option<auth::ClusterSecret>,
    /// TLS for the gRPC port (served and dialled); `None` = plain HTTP/2.
    pub tls: Option<crate::tls::Tls>,
    /// The engine's region, when it handed the agent one (Sidecar's
    /// AttachRegion): its layout replaces the geometry flags.
    pub attached: Option<crate::sidecar::attach::Wanted>,
}

/// A heartbeat stamped now.
pub fn heartbeat() -> pb::Heartbeat {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    pb::Heartbeat { sent_unix_ms: ms }
}

/// One agent; services hold it in an `Arc`.
#[derive(Debug)]
pub struct Agent {
    pub cfg: AgentConfig,
    pub engine: Engine,
    pub layout: BlockLayout,
    pub ucx: UcxRuntime,
    pub hook_mode: HookMode,
    pub memwatch: Arc<MemWatch>,
    pub started: Instant,
    /// What only this agent's role holds.
    pub side: Side,
    /// Soak-only load on this agent.
    pub soak: SoakLoad,
    /// What the engine's connector has published or pulled (Sidecar).
    pub sidecar: crate::sidecar::SidecarState,
    /// One-time nonces of the handshakes this agent serves.
    pub nonces: auth::Nonces,
    /// Set once the agent has begun to shut down.
    stopping: AtomicBool,
}

/// The state particular to an agent's role.
#[derive(Debug)]
pub enum Side {
    Decode(decode::DecodeSide),
    Prefill(prefill::PrefillSide),
}

/// Load a soak puts on an agent, when enabled.
#[derive(Debug, Default)]
pub struct SoakLoad {
    /// Allocator churn.
    pub churn: Mutex<Option<crate::churn::Churn>>,
    /// Test-only leak injection.
    pub leak: Mutex<Option<crate::churn::LeakInjector>>,
}

impl Agent {
    /// Verifies the UCX runtime, maps and registers the region, starts the
    /// progress thread and the memory watch. Blocking.
    pub fn start(cfg: AgentConfig, memwatch: Arc<MemWatch>) -> anyhow::Result<Arc<Agent>> {
        let ucx = kvrail_transfer::ucx_facts::ucx_runtime();
        if !ucx.supported {
            anyhow::bail!(
                "UCX {} ({}) is not a release kvrail supports (1.12 to 1.22); point {} at a supported build",
                ucx.version,
                ucx.library,
                crate::guard::UCX_LIB_VAR
            );
        }
        let layout = match &cfg.attached {
            Some(w) => w.layout,
            None => BlockLayout::fit_region(cfg.region_bytes, cfg.block_bytes, cfg.layers)?,
        };
        // UCX would refuse to register CUDA memory with an unclear status.
        if cfg.region_alloc.memory_kind() == MemoryKind::Cuda && !kvrail_transfer::ucx_facts::has_cuda_support() {
            anyhow::bail!("a GPU region needs UCX with CUDA support: {}", crate::memory::no_cuda_ucx("this agent's", &ucx.version));
        }
        let engine = Engine::start(EngineConfig {
            transport: cfg.transport,
            region_bytes: layout.region_bytes(),
            region_alloc: cfg.region_alloc.clone(),
            window: cfg.window,
            progress_cpu: cfg.progress_cpu,
            allow_hooks: cfg.allow_hooks,
            stall_timeout: cfg.stall_timeout,
            ..EngineConfig::default()
        })?;
        let hook_mode = engine.hook_report().mode;
        tracing::info!(
            role = cfg.role.as_str(),
            agent_id = %cfg.agent_id,
            ucx_version = %ucx.version,
            ucx_library = %ucx.library,
            hooks = %engine.hook_report().summary(),
            blocks = layout.num_blocks(),
            block_bytes = layout.block_bytes(),
            memory = %engine.region().memory_kind(),
            gpu = ?engine.region().gpu_device(),
            "agent started"
        );
        Ok(Arc::new(Agent {
            engine,
            layout,
            ucx,
            hook_mode,
            memwatch,
            started: Instant::now(),
            side: match cfg.role {
                Role::Decode => Side::Decode(decode::DecodeSide::new(cfg.lease, cfg.idle_timeout)),
                Role::Prefill => Side::Prefill(prefill::PrefillSide::new(cfg.lease)),
            },
            sidecar: crate::sidecar::SidecarState::new(cfg.attached.clone()),
            cfg,
            soak: SoakLoad::default(),
            nonces: auth::Nonces::default(),
            stopping: AtomicBool::new(false),
        }))
    }

    /// The decode side, or `WrongRole` on a prefill agent.
    pub fn decode(&self) -> Result<&decode::DecodeSide, error::AgentError> {
        match &self.side {
            Side::Decode(d) => Ok(d),
            Side::Prefill(_) => Err(error::AgentError::WrongRole { actual: "prefill", hint: "call the decode agent" }),
        }
    }

    /// The prefill side, or `WrongRole` on a decode agent.
    pub fn prefill(&self) -> Result<&prefill::PrefillSide, error::AgentError> {
        match &self.side {
            Side::Prefill(p) => Ok(p),
            Side::Decode(_) => Err(error::AgentError::WrongRole { actual: "decode", hint: "call the prefill agent" }),
        }
    }

    /// Peers with an open session: prefill agents that take orders (on a
    /// decode agent), decode agents served (on a prefill agent).
    pub fn open_peers(&self) -> Vec<String> {
        match &self.side {
            Side::Decode(d) => d.open_peers(),
            Side::Prefill(p) => p.open_peers(),
        }
    }

    /// Every peer's session, as stats report it.
    pub fn peer_stats(&self) -> Vec<pb::PeerStats> {
        let now = Instant::now();
        let stats = match &self.side {
            Side::Decode(d) => d.sessions.lock().expect("lock").peer_stats(now),
            Side::Prefill(p) => p.links.lock().expect("lock").peer_stats(now),
        };
        stats.into_iter().map(convert::peer_stat_to_pb).collect()
    }

    /// Starts the session tasks (heartbeats and leases) of the agent's role.
    pub fn spawn_session_tasks(self: &Arc<Self>) {
        match &self.side {
            Side::Decode(_) => effects::spawn_ticker(self.clone(), |a| &a.decode().expect("decode agent").sessions),
            Side::Prefill(_) => effects::spawn_ticker(self.clone(), |a| &a.prefill().expect("prefill agent").links),
        };
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// The agent stops: every peer is told goodbye and its session closes,
    /// so peers log an orderly close, not a failure.
    pub async fn goodbye(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        match &self.side {
            Side::Decode(d) => d.goodbye(self).await,
            Side::Prefill(p) => p.goodbye(self).await,
        }
    }

    /// This agent as a handshake presents it.
    pub fn info(&self) -> pb::AgentInfo {
        let local = self.engine.local_info();
        pb::AgentInfo {
            agent_id: self.cfg.agent_id.clone(),
            role: convert::role_to_pb(self.cfg.role) as i32,
            worker_address: local.worker_address.clone(),
            region: Some(pb::RegionInfo { base: local.region_base, length: local.region_len, rkey: local.rkey.clone() }),
            layout: Some(convert::layout_to_pb(&self.layout)),
            compat_hash: self.layout.compat_hash(),
            hook_mode: convert::hook_mode_to_pb(self.hook_mode) as i32,
            ucx_version: self.ucx.version.clone(),
            transport: self.cfg.transport.to_string(),
            memory_kind: convert::memory_kind_to_pb(self.engine.region().memory_kind()) as i32,
            ucx_cuda: kvrail_transfer::ucx_facts::has_cuda_support(),
            cuda_device: self.engine.region().gpu_device().unwrap_or(0) as u32,
            model_hash: self.model_hash().to_string(),
        }
    }

    /// The model of the engine that attached this agent's region (empty
    /// for an agent with its own region).
    pub fn model_hash(&self) -> &str {
        self.cfg.attached.as_ref().map_or("", |w| w.model_hash.as_str())
    }

    /// This agent's side of a memory pairing (handshake admission).
    pub fn memory_side(&self) -> validate::MemorySide {
        validate::MemorySide {
            agent_id: self.cfg.agent_id.clone(),
            kind: self.engine.region().memory_kind(),
            ucx_cuda: kvrail_transfer::ucx_facts::has_cuda_support(),
            ucx_version: self.ucx.version.clone(),
        }
    }

    /// The agent's counters, memory and UCX facts.
    pub fn stats(&self) -> pb::StatsResponse {
        let c = self.engine.counters();
        let region = self.engine.region();
        let gpu = self.gpu_memory();
        use std::sync::atomic::Ordering::Relaxed;
        pb::StatsResponse {
            agent_id: self.cfg.agent_id.clone(),
            role: convert::role_to_pb(self.cfg.role) as i32,
            hook_mode: convert::hook_mode_to_pb(self.hook_mode) as i32,
            ucx_version: self.ucx.version.clone(),
            ucx_library: self.ucx.library.clone(),
            transport: self.cfg.transport.to_string(),
            bytes_moved: c.bytes.load(Relaxed),
            transfers_ok: c.transfers_ok.load(Relaxed),
            transfers_failed: c.transfers_failed.load(Relaxed),
            deliveries_rejected: c.deliveries_rejected.load(Relaxed),
            prefaulting: c.prefaulting.load(Relaxed),
            peers: c.peers.load(Relaxed),
            memory: Some(self.memory()),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            ucx_intercepted_munmaps: kvrail_transfer::hooks::intercepted_unmaps(),
            churn_munmaps: self.soak.churn.lock().expect("lock").as_ref().map_or(0, |c| c.stats.munmaps.load(Relaxed)),
            injected_leak_bytes: self.soak.leak.lock().expect("lock").as_ref().map_or(0, |l| l.leaked.load(Relaxed)),
            peer_stats: self.peer_stats(),
            memory_kind: convert::memory_kind_to_pb(region.memory_kind()) as i32,
            cuda_device: region.gpu_device().unwrap_or(0) as u32,
            gpu_used_bytes: gpu.map_or(0, |m| m.used()),
            gpu_total_bytes: gpu.map_or(0, |m| m.total),
        }
    }

    /// A GPU region's device memory now (`None` for host memory, or if the
    /// driver would not say: logged).
    pub fn gpu_memory(&self) -> Option<kvrail_cuda::DeviceMemory> {
        match self.engine.region().device_memory()? {
            Ok(m) => Some(m),
            Err(error) => {
                tracing::warn!(%error, "cannot read the GPU's memory figures");
                None
            }
        }
    }

    /// MemWatch's verdict and series, with the figures read fresh now.
    fn memory(&self) -> pb::MemoryStats {
        let mut m = convert::memory_to_pb(&self.memwatch.report());
        if let Ok(s) = crate::memwatch::sample::read_sample(0.0, Some(kvrail_transfer::memory::heap_in_use())) {
            (m.vm_rss, m.rss_anon, m.rss_file, m.rss_shmem, m.maps, m.heap) =
                (s.vm_rss, s.rss_anon, s.rss_file, s.rss_shmem, s.maps, s.heap.unwrap_or(0));
        }
        m
    }
}
