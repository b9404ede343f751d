//! Command-line interface of the `kvrail` binary.

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kvrail_transfer::Transport;

use crate::memory::Memory;
use crate::units::parse_bytes;

#[derive(Debug, Parser)]
#[command(
    name = "kvrail",
    version,
    about = "Moves KV-cache blocks from prefill to decode over UCX RMA, with UCX's memory hooks off and memory proven flat"
)]
pub struct Cli {
    /// Log level for stderr (error, warn, info, debug, trace); RUST_LOG overrides.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the UCX actually loaded, its transports and the verified hook mode (or, with --agent, a running agent's peers).
    Info(InfoArgs),
    /// Run a decode agent (receives KV blocks into its region).
    Decode(AgentArgs),
    /// Run a prefill agent (dials its --peer decode agents, accepts decode agents that dial it, writes blocks to them).
    Prefill(PrefillArgs),
    /// Start a decode and a prefill agent on loopback, stream blocks, verify every byte.
    Demo(DemoArgs),
    /// Sustained verified transfers with allocator churn; fails unless both agents' memory is flat.
    Soak(SoakArgs),
    /// Throughput of kvrail against a raw-UCX loop, memcpy and ucx_perftest, measured side by side.
    Bench(BenchArgs),
    /// The agents in a registry (etcd or a --peers file), one line each.
    Peers(PeersArgs),
    /// One process of the raw-UCX baseline (used by `kvrail bench`).
    #[command(hide = true)]
    RawUcx(RawArgs),
}

impl Command {
    /// `--memory` of the commands that start or are agents.
    pub fn memory(&self) -> Option<Memory> {
        match self {
            Command::Decode(a) => Some(a.geometry.memory),
            Command::Prefill(p) => Some(p.agent.geometry.memory),
            Command::Demo(d) => Some(d.geometry.memory),
            Command::Soak(s) => Some(s.geometry.memory),
            Command::Bench(b) => Some(b.memory),
            Command::RawUcx(r) => Some(r.geometry.memory),
            Command::Info(_) | Command::Peers(_) => None,
        }
    }

    /// The agent flags, for `decode` and `prefill`.
    pub fn agent_args(&self) -> Option<&AgentArgs> {
        match self {
            Command::Decode(a) => Some(a),
            Command::Prefill(p) => Some(&p.agent),
            _ => None,
        }
    }
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Instead: the running agent whose Control API is at ADDR (host:port
    /// or unix:PATH), with one line per peer session (id, address, state,
    /// epoch, age, bytes, requests ok/failed/pending).
    #[arg(long)]
    pub agent: Option<String>,
    /// TLS to an agent that serves it (its --tls-* flags).
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

fn bytes(s: &str) -> Result<u64, String> {
    parse_bytes(s)
}

fn transport(s: &str) -> Result<Transport, String> {
    s.parse()
}

fn memory(s: &str) -> Result<Memory, String> {
    s.parse()
}

/// Direction of the transfers a driver runs.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Mode {
    /// Push: prefill writes into decode (RMA put).
    Write,
    /// Pull: decode reads from prefill (RMA get).
    Read,
}

impl Mode {
    pub fn to_pb(self) -> kvrail_proto::v1::TransferMode {
        match self {
            Mode::Write => kvrail_proto::v1::TransferMode::Write,
            Mode::Read => kvrail_proto::v1::TransferMode::Read,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Write => "write",
            Mode::Read => "read",
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct AgentArgs {
    /// gRPC listen address (port 0 picks a free port; the ready line says which).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Agent id (default: role-hostname-pid).
    #[arg(long)]
    pub agent_id: Option<String>,
    #[command(flatten)]
    pub geometry: Geometry,
    /// Layers per block (layer-major layout, as vLLM's per-layer caches).
    #[arg(long, default_value_t = 1)]
    pub layers: u32,
    /// Map the region with kvrail's own anonymous mmap instead of letting
    /// UCX allocate it (UCP_MEM_MAP_ALLOCATE, the default: on UCX 1.13 only
    /// UCX-allocated memory gets one-sided shared-memory puts; application
    /// memory is served by the target's CPU over active messages).
    #[arg(long)]
    pub mmap_region: bool,
    /// Outstanding RMA operations (shared by the transfers in flight, oldest
    /// first).
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Bind the UCX progress thread to this CPU (e.g. one next to the NIC;
    /// the region is first touched from there). Default: not bound.
    #[arg(long)]
    pub progress_cpu: Option<usize>,
    /// Bind the agent's other threads (gRPC, the async runtime; the
    /// progress thread too unless `--progress-cpu` places it) to these CPUs
    /// (comma list), e.g. to keep them off the progress thread's CPU;
    /// threads the progress thread starts (UCX's own, pre-faulting) share
    /// its CPU. Default: not bound.
    #[arg(long, value_delimiter = ',')]
    pub runtime_cpus: Vec<usize>,
    /// Accept FillPattern/PoisonBlocks (writes test patterns into the region).
    #[arg(long)]
    pub test_patterns: bool,
    /// Seconds a request may take before it fails.
    #[arg(long, default_value_t = 60.0)]
    pub request_timeout_secs: f64,
    /// Seconds a peer may stay silent (heartbeats every fifth of it) before
    /// its session is declared dead and its requests fail.
    #[arg(long, default_value_t = 5.0)]
    pub lease_secs: f64,
    /// Seconds a transfer may make no progress before it fails.
    #[arg(long, default_value_t = 5.0)]
    pub stall_secs: f64,
    /// Decode: a session this agent dialled on demand (a request's
    /// peer_address) that carries no request for this long closes (e.g.
    /// 60s, 500ms).
    #[arg(long, default_value = "60s", value_parser = crate::units::parse_duration)]
    pub idle_timeout: std::time::Duration,
    /// File holding the cluster secret (else KVRAIL_CLUSTER_SECRET; never
    /// on the command line).
    #[arg(long)]
    pub cluster_secret_file: Option<std::path::PathBuf>,
    /// Run without a cluster secret: any peer that can reach this agent may
    /// handshake and write into its region.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Also serve the local API (Control, and Sidecar for the inference
    /// engine's KV connector) on this Unix socket, created owner-only
    /// (0600), with the side socket for region descriptors at PATH.fd.
    #[arg(long)]
    pub local_socket: Option<std::path::PathBuf>,
    /// Start with no region and take the engine's: its KV cache as a shared
    /// file, handed over by the Sidecar API's AttachRegion on
    /// `--local-socket` (the file's descriptor on PATH.fd). The geometry
    /// flags are then the engine's; the agent's TCP port opens once the
    /// region is attached.
    #[arg(long, requires = "local_socket")]
    pub region_from_client: bool,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    #[command(flatten)]
    pub memwatch: MemWatchArgs,
    /// Allocator churn rounds per second (soak load; 0 = off).
    #[arg(long, default_value_t = 0)]
    pub churn_rounds_per_sec: u32,
    /// Direct 4 KiB mmap/munmap pairs per churn round.
    #[arg(long, default_value_t = 16)]
    pub churn_unmaps_per_round: usize,
    /// TEST ONLY: leak this many MiB/min of anonymous memory outside the
    /// heap, to prove the self-check; refused unless KVRAIL_ENABLE_TEST_FAULTS=1.
    #[arg(long)]
    pub test_inject_leak_mib_per_min: Option<f64>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Lease of this agent's registry entry: an agent that dies leaves the
    /// registry within it (renewed every third of it).
    #[arg(long, default_value = "5s", value_parser = crate::units::parse_duration)]
    pub registry_ttl: std::time::Duration,
    /// The address peers dial, as published in the registry (default: the
    /// bound --listen address; needed when listening on 0.0.0.0).
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// This agent's rank in its job, published in the registry.
    #[arg(long, env = "SLURM_PROCID")]
    pub rank: Option<u32>,
}

fn registry_url(s: &str) -> Result<crate::registry::RegistryUrl, String> {
    s.parse()
}

/// Where peers are found: etcd, a static file, or etcd with the file as
/// its fallback.
#[derive(Debug, Args, Clone, Default)]
pub struct RegistryArgs {
    /// etcd that agents publish themselves in and find each other through:
    /// etcd://HOST:PORT[,HOST:PORT...]/PREFIX.
    #[arg(long, value_name = "URL", value_parser = registry_url)]
    pub registry: Option<crate::registry::RegistryUrl>,
    /// Static peers, one JSON entry per line (docs/cluster.md): for
    /// clusters without etcd, or the fallback when etcd does not answer.
    #[arg(long, value_name = "FILE")]
    pub peers: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct PeersArgs {
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Only agents of this role.
    #[arg(long, value_enum)]
    pub role: Option<Side>,
    /// Resolve this one agent (exit 1 if it is missing or refused).
    #[arg(long)]
    pub id: Option<String>,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

/// The transport and region geometry of an agent: the same flags and
/// defaults for every command that starts or is one, and one way to pass
/// them on to an agent a driver starts ([`Geometry::to_args`]).
#[derive(Debug, Args, Clone, PartialEq, Eq)]
pub struct Geometry {
    /// UCX transports: auto (UCX picks: RDMA on a cluster; agents that a
    /// driver starts on this host take sm), sm (shared memory, posix and
    /// sysv: one host) or tcp.
    #[arg(long, default_value = "auto", value_parser = transport)]
    pub transport: Transport,
    /// Size of the one registered KV region.
    #[arg(long, default_value = "1GiB", value_parser = bytes)]
    pub region_bytes: u64,
    /// Bytes of one block in one layer.
    #[arg(long, default_value = "64KiB", value_parser = bytes)]
    pub block_bytes: u64,
    /// Where the region lives: host, cuda:N (one cuMemAlloc on CUDA device
    /// N, registered with UCX as CUDA memory) or cuda-ipc (the inference
    /// engine's allocation, from a CUDA IPC handle). See docs/gpu.md.
    #[arg(long, default_value = "host", value_parser = memory)]
    pub memory: Memory,
}

impl Geometry {
    /// This geometry for agents that share one host (the agents a driver
    /// starts here): `auto` becomes `sm`, which UCX's own pick on one host
    /// is not (it moved 1 GiB at 0.26 GB/s against sm's 2.9 in the demo
    /// here); an explicit transport stays.
    pub fn on_one_host(&self) -> Geometry {
        let transport = match self.transport {
            Transport::Auto => Transport::Sm,
            t => t,
        };
        Geometry { transport, ..self.clone() }
    }

    /// The flags that give an agent this geometry.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--transport".into(),
            self.transport.to_string(),
            "--region-bytes".into(),
            self.region_bytes.to_string(),
            "--block-bytes".into(),
            self.block_bytes.to_string(),
            "--memory".into(),
            self.memory.to_string(),
        ]
    }
}

impl MemWatchArgs {
    /// The flags that give an agent these settings.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--memwatch-warmup-secs".into(),
            self.memwatch_warmup_secs.to_string(),
            "--memwatch-window-secs".into(),
            self.memwatch_window_secs.to_string(),
            "--memwatch-threshold-mib-per-min".into(),
            self.memwatch_threshold_mib_per_min.to_string(),
        ]
    }
}

/// Memory self-check settings.
#[derive(Debug, Args, Clone)]
pub struct MemWatchArgs {
    /// Seconds after start before the trend counts.
    #[arg(long, default_value_t = 30.0)]
    pub memwatch_warmup_secs: f64,
    /// Sliding window of the RSS slope, seconds.
    #[arg(long, default_value_t = 120.0)]
    pub memwatch_window_secs: f64,
    /// Slope above which memory is called a leak, MiB/min.
    #[arg(long, default_value_t = 1.0)]
    pub memwatch_threshold_mib_per_min: f64,
}

/// An agent's role, as a flag's value (which agent gets the test-only
/// leak; which agents `peers` lists).
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Side {
    Decode,
    Prefill,
}

impl Side {
    pub fn role(self) -> crate::agent::Role {
        match self {
            Side::Decode => crate::agent::Role::Decode,
            Side::Prefill => crate::agent::Role::Prefill,
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct SoakArgs {
    /// How long to keep transfers running (e.g. 150s, 10m, 1h).
    #[arg(long, default_value = "10m", value_parser = crate::units::parse_duration)]
    pub duration: std::time::Duration,
    #[command(flatten)]
    pub geometry: Geometry,
    /// Push (write) or pull (read).
    #[arg(long, value_enum, default_value = "write")]
    pub mode: Mode,
    /// Blocks moved (and verified) per pass.
    #[arg(long, default_value_t = 2048)]
    pub pass_blocks: usize,
    #[arg(long, default_value_t = 128)]
    pub request_blocks: usize,
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Pause between passes, milliseconds.
    #[arg(long, default_value_t = 0)]
    pub pause_ms: u64,
    /// Allocator churn rounds per second in each agent.
    #[arg(long, default_value_t = 20)]
    pub churn_rounds_per_sec: u32,
    /// Direct 4 KiB mmap/munmap pairs per churn round.
    #[arg(long, default_value_t = 16)]
    pub churn_unmaps_per_round: usize,
    #[command(flatten)]
    pub memwatch: MemWatchArgs,
    /// Where the JSON report and the SVG charts go.
    #[arg(long, default_value = "kvrail-soak-report")]
    pub report: std::path::PathBuf,
    /// TEST ONLY: make one agent leak this many MiB/min (needs KVRAIL_ENABLE_TEST_FAULTS=1).
    #[arg(long)]
    pub test_inject_leak_mib_per_min: Option<f64>,
    /// Which agent leaks.
    #[arg(long, value_enum, default_value = "decode")]
    pub test_inject_into: Side,
    /// Cluster mode: the Control address (host:port or unix:PATH) of a
    /// running decode agent started with --test-patterns; no agents are started.
    #[arg(long, requires = "prefill", conflicts_with_all = ["test_inject_leak_mib_per_min", "demo_allow_ucx_mmap_hooks", "registry", "peers"])]
    pub decode: Option<String>,
    /// Cluster mode: the Control address of the prefill agent paired with --decode.
    #[arg(long, requires = "decode")]
    pub prefill: Option<String>,
    /// Cluster mode: TLS to agents that serve it (their --tls-* flags).
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Cluster soak: every agent this registry lists (etcd and/or a peers
    /// file), started with --test-patterns; every decode x prefill pair
    /// moves blocks at once. No agents are started.
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// DEMONSTRATION ONLY: run both agents with UCX's memory hooks ON (UCX's
    /// defaults), to show the leak kvrail's guard prevents. Never a default.
    #[arg(long)]
    pub demo_allow_ucx_mmap_hooks: bool,
    /// With --demo-allow-ucx-mmap-hooks: bound UCX's registration-cache
    /// queue (UCX_RCACHE_MAX_UNRELEASED), the second mitigation.
    #[arg(long, requires = "demo_allow_ucx_mmap_hooks")]
    pub demo_rcache_max_unreleased: Option<String>,
    #[command(flatten)]
    pub out: DriverOpts,
}

/// A cluster run (`soak` or `bench` with `--registry`/`--peers`): where
/// its agents are listed, how many to wait for, and which pairs move
/// blocks.
#[derive(Debug, Args, Clone)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub reg: RegistryArgs,
    /// Cluster run: wait until this many agents are listed (both roles
    /// together) before starting; default: the ones listed now.
    #[arg(long)]
    pub expect_agents: Option<usize>,
    /// Cluster run: how long to wait for --expect-agents.
    #[arg(long, default_value = "120s", value_parser = crate::units::parse_duration)]
    pub rendezvous: std::time::Duration,
    /// Cluster run: which pairs move blocks.
    #[arg(long, value_enum, default_value = "all")]
    pub pairs: Pairs,
}

impl Pairs {
    /// As on the command line: `all`, `one-to-one`.
    pub fn name(self) -> &'static str {
        match self {
            Pairs::All => "all",
            Pairs::OneToOne => "one-to-one",
        }
    }
}

impl ClusterArgs {
    /// Whether this run finds its agents in a registry.
    pub fn is_set(&self) -> bool {
        self.reg.registry.is_some() || self.reg.peers.is_some()
    }
}

/// Which decode x prefill pairs a cluster run drives.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Pairs {
    /// Every decode agent with every prefill agent.
    All,
    /// Decode agent i with prefill agent i (modulo the smaller count), so
    /// every agent has one peer.
    OneToOne,
}

/// What every driver (demo, soak, bench) takes: the seed of its block
/// mapping and test pattern, JSON output, and the agents' logs.
#[derive(Debug, Args, Clone)]
pub struct DriverOpts {
    /// Seed of the block mapping and the test pattern.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// JSON on stdout (one object; one per point for bench) instead of the
    /// human summary.
    #[arg(long)]
    pub json: bool,
    /// Show the agents' logs on stderr.
    #[arg(long)]
    pub verbose: bool,
}

#[derive(Debug, Args, Clone)]
pub struct PrefillArgs {
    #[command(flatten)]
    pub agent: AgentArgs,
    /// A decode agent to dial (host:port); repeat for several, or none to
    /// wait for decode agents to dial this one.
    #[arg(long)]
    pub peer: Vec<String>,
}

#[derive(Debug, Args, Clone)]
pub struct DemoArgs {
    /// Total bytes to stream (several passes over the region if larger).
    #[arg(long, default_value = "4GiB", value_parser = bytes)]
    pub bytes: u64,
    #[command(flatten)]
    pub geometry: Geometry,
    /// Push (write) or pull (read).
    #[arg(long, value_enum, default_value = "write")]
    pub mode: Mode,
    /// Blocks per request.
    #[arg(long, default_value_t = 256)]
    pub request_blocks: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    #[command(flatten)]
    pub out: DriverOpts,
}

#[derive(Debug, Args, Clone)]
pub struct BenchArgs {
    /// Transports, comma-separated [default: sm,tcp; with --peer: the
    /// decode agent's].
    #[arg(long, value_delimiter = ',', value_parser = transport)]
    pub transport: Vec<Transport>,
    /// Block sizes, comma-separated [default: 16KiB,64KiB,256KiB,1MiB,4MiB;
    /// with --peer: the decode agent's].
    #[arg(long, value_delimiter = ',', value_parser = bytes)]
    pub block_bytes: Vec<u64>,
    /// Bytes each side moves per run, in passes of at most a region each
    /// (kvrail's and the raw loop's passes alternate). Single passes of
    /// either side swing by ~10% on a shared host; six passes per side make
    /// a run's ratio steadier than two did at ~6 s more per run.
    #[arg(long, default_value = "6GiB", value_parser = bytes)]
    pub total_bytes: u64,
    /// Region size of every process [default: 1GiB; with --peer: the
    /// decode agent's].
    #[arg(long, value_parser = bytes)]
    pub region_bytes: Option<u64>,
    /// write (push, RMA put) and/or read (pull, RMA get), comma-separated.
    #[arg(long, value_enum, default_value = "write", value_delimiter = ',')]
    pub mode: Vec<Mode>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Where every process's region lives (host, cuda:N); see `decode --memory`.
    #[arg(long, default_value = "host", value_parser = memory)]
    pub memory: Memory,
    /// Bytes per request (blocks per request = this / block size, at least 1).
    #[arg(long, default_value = "16MiB", value_parser = bytes)]
    pub request_bytes: u64,
    /// Outstanding RMA operations (kvrail per transfer, and the raw loop).
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Runs per point (best even). Each run starts fresh kvrail agents and
    /// raw-UCX processes (which pair starts first alternates run by run)
    /// and lets them take turns pass by pass (which goes first alternates:
    /// kvrail, raw, raw, kvrail, ...); each run gives a ratio, runs pair up
    /// to cancel the start order, and the median over pairs is the ratio
    /// (throughputs: medians over runs).
    #[arg(long, default_value_t = 6)]
    pub repeat: usize,
    /// Skip the ucx_perftest reference.
    #[arg(long)]
    pub no_perftest: bool,
    /// Leave every thread unbound. By default, with two or more CPUs, the
    /// UCX thread of the side blocks flow into (the decode agent, or the raw
    /// process in its place) goes to the first allowed CPU and the other
    /// side's to the second, so the two busy threads never share a core; the
    /// agents' runtimes and the bench's client go to the CPU of the thread
    /// that is not the limit (on sm the one that does not copy, on tcp the
    /// receiver's).
    #[arg(long)]
    pub no_pin: bool,
    /// Cluster mode: measure against the running decode agent at ADDR
    /// (host:port, started with --test-patterns) from a prefill agent this
    /// bench starts here, one per run; the transport, block size and region
    /// are the decode agent's. Needs --raw-peer and the cluster's secret
    /// (KVRAIL_CLUSTER_SECRET or --cluster-secret-file). No ucx_perftest,
    /// no CPU binding, no decode CPU figures.
    #[arg(long, requires = "raw_peer")]
    pub peer: Option<String>,
    /// Cluster mode: the raw-UCX baseline's target on the decode agent's
    /// host, `kvrail raw-ucx --role target --listen ADDR` with the decode
    /// agent's --transport, --region-bytes and --block-bytes.
    #[arg(long, requires = "peer")]
    pub raw_peer: Option<String>,
    /// Cluster mode: the cluster secret for the prefill agents this bench
    /// starts (or KVRAIL_CLUSTER_SECRET).
    #[arg(long, requires = "peer")]
    pub cluster_secret_file: Option<std::path::PathBuf>,
    /// Cluster mode: TLS to the decode agent and for the prefill agents
    /// this bench starts (their --tls-* flags); with --registry, to every
    /// agent.
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Cluster bench: every agent this registry lists (etcd and/or a peers
    /// file), started with --test-patterns, all on this host. Every decode
    /// x prefill pair moves blocks at once, round after round, and as many
    /// raw-UCX pairs (each over its pair's share of the decode region) do
    /// the same by turns; the aggregate throughputs and their ratio are
    /// reported. No agents are started. Takes --repeat (rounds per side),
    /// --concurrency, --request-bytes and --window; the transport, block
    /// size and regions are the agents'.
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Cluster bench: measure kvrail's pairs alone, without the raw-UCX
    /// pairs (which run on this host, so they need every agent here).
    #[arg(long)]
    pub no_raw: bool,
    #[command(flatten)]
    pub out: DriverOpts,
}

impl BenchArgs {
    /// `--transport`, or its default.
    pub fn transports(&self) -> Vec<Transport> {
        if self.transport.is_empty() {
            vec![Transport::Sm, Transport::Tcp]
        } else {
            self.transport.clone()
        }
    }

    /// `--block-bytes`, or its default.
    pub fn blocks(&self) -> Vec<u64> {
        if self.block_bytes.is_empty() {
            [16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20].to_vec()
        } else {
            self.block_bytes.clone()
        }
    }

    /// `--region-bytes`, or its default.
    pub fn region(&self) -> u64 {
        self.region_bytes.unwrap_or(1 << 30)
    }
}

/// Role in the raw-UCX baseline.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum RawRole {
    Target,
    Initiator,
}

#[derive(Debug, Args, Clone)]
pub struct RawArgs {
    #[arg(long, value_enum)]
    pub role: RawRole,
    #[command(flatten)]
    pub geometry: Geometry,
    /// Blocks are grouped into requests of this size and each is planned
    /// on its own, as the agents plan theirs; the requests run back to back.
    #[arg(long, default_value = "16MiB", value_parser = bytes)]
    pub request_bytes: u64,
    #[arg(long, value_enum, default_value = "write")]
    pub mode: Mode,
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    #[arg(long, default_value_t = 11)]
    pub seed: u64,
    /// Bind this process's UCX thread to this CPU (as `serve --progress-cpu`).
    #[arg(long)]
    pub progress_cpu: Option<usize>,
    /// Endpoints without UCX's peer-failure reporting (the engine asks for
    /// it; this measures what it costs).
    #[arg(long)]
    pub no_peer_errors: bool,
    /// Target only: serve the baseline to `kvrail bench --raw-peer` on
    /// another host. Listens on ADDR (host:port) and gives each connection
    /// in turn this target's worker address and rkey. Its region is a
    /// scratch buffer: whoever reaches ADDR can write into it.
    #[arg(long)]
    pub listen: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Command {
        Cli::try_parse_from(["kvrail"].iter().chain(argv)).unwrap().cmd
    }

    #[test]
    fn one_geometry_with_one_set_of_defaults_for_agents_and_drivers() {
        let Command::Decode(agent) = parse(&["decode"]) else { panic!("decode") };
        let Command::Demo(demo) = parse(&["demo"]) else { panic!("demo") };
        let Command::Soak(soak) = parse(&["soak"]) else { panic!("soak") };
        assert_eq!(agent.geometry, demo.geometry);
        assert_eq!(agent.geometry, soak.geometry);
        assert_eq!(agent.geometry.transport, Transport::Auto);
        assert_eq!(agent.geometry.memory, Memory::Host);
        // Agents a driver starts on this host take sm for auto, nothing else.
        assert_eq!(demo.geometry.on_one_host().transport, Transport::Sm);
        let Command::Demo(tcp) = parse(&["demo", "--transport", "tcp"]) else { panic!("demo") };
        assert_eq!(tcp.geometry.on_one_host().transport, Transport::Tcp);
        // The flags a driver passes on give the agent the same geometry.
        let g = Geometry { transport: Transport::Tcp, region_bytes: 64 << 20, block_bytes: 16 << 10, memory: Memory::Cuda(1) };
        let args: Vec<String> = ["decode".to_string()].into_iter().chain(g.to_args()).collect();
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let Command::Decode(back) = parse(&argv) else { panic!("decode") };
        assert_eq!(back.geometry, g);
        let m = MemWatchArgs { memwatch_warmup_secs: 3.0, memwatch_window_secs: 9.5, memwatch_threshold_mib_per_min: 0.25 };
        let args: Vec<String> = ["decode".to_string()].into_iter().chain(m.to_args()).collect();
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let Command::Decode(back) = parse(&argv) else { panic!("decode") };
        assert_eq!(
            (back.memwatch.memwatch_warmup_secs, back.memwatch.memwatch_window_secs, back.memwatch.memwatch_threshold_mib_per_min),
            (3.0, 9.5, 0.25)
        );
    }
}
