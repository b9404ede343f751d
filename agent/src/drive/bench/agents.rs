//! kvrail's side of a run: a decode and a prefill agent, handshaked, the
//! prefill region filled with the test pattern, both peer mappings
//! pre-faulted; then pass by pass.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use kvrail_proto::v1 as pb;
use kvrail_transfer::Transport;
use rand::SeedableRng;

use super::geometry_args;
use super::placement::{control_cpu, pin_args};
use super::Bench;
use crate::cli::Mode;
use crate::drive::children::{prefaulted, AgentProcess, Launch};
use crate::drive::workload::{Control, Outcome, Workload};

/// A decode and a prefill agent, handshaked, the prefill region filled with
/// the test pattern and both peer mappings pre-faulted.
pub(super) struct Agents {
    decode: Control,
    /// The agents this bench started (decode and prefill; with `--peer`,
    /// prefill only).
    procs: Vec<AgentProcess>,
    work: Workload,
    rng: rand::rngs::StdRng,
    pub(super) num_blocks: u32,
    pub(super) handshake_ms: f64,
    pub(super) ucx_version: String,
}

impl Agents {
    pub(super) async fn start(b: &Bench, t: Transport, block: u64, mode: Mode, run: usize) -> anyhow::Result<Agents> {
        let a = &b.a;
        let common = |role: &str, id: &str| -> Vec<String> {
            let mut v = vec![role.to_string(), "--agent-id".into(), id.into(), "--test-patterns".into()];
            v.extend(geometry_args(a, t, block));
            v.extend(pin_args(a, usize::from(role == "prefill")));
            v.extend(control_cpu(a, t, mode).map(|cpu| ["--runtime-cpus".to_string(), cpu.to_string()]).into_iter().flatten());
            v
        };
        let (exe, limit) = (std::env::current_exe()?, Duration::from_secs(120));
        // The decode agent's Control client and process id (with --peer it
        // runs elsewhere), the agents started here, and the name requests
        // give the prefill agent.
        let (mut decode, decode_pid, mut procs, prefill_id) = match &b.remote {
            Some(r) => {
                // A running decode agent may still hold an earlier run's
                // prefill agent for a lease: each run's has a name of its own.
                let id = format!("bench-prefill-{}-{run}", std::process::id());
                let mut p = common("prefill", &id);
                p.extend(["--peer".into(), r.addr.clone()]);
                p.extend(a.cluster_secret_file.iter().flat_map(|f| ["--cluster-secret-file".into(), f.display().to_string()]));
                p.extend(a.tls.to_args());
                let prefill =
                    AgentProcess::launch(&exe, &Launch { args: p, env: Vec::new(), verbose: a.out.verbose }, Some(&b.crew), limit).await?;
                let mut decode = r.decode.clone();
                session_open(&mut decode, &id, &r.addr, Duration::from_secs(30)).await?;
                (decode, None, vec![prefill], id)
            }
            None => {
                let decode = AgentProcess::launch(
                    &exe,
                    &Launch { args: common("decode", "bench-decode"), env: Vec::new(), verbose: a.out.verbose },
                    Some(&b.crew),
                    limit,
                )
                .await?;
                let mut p = common("prefill", "bench-prefill");
                p.extend(["--peer".into(), decode.listen.clone()]);
                let prefill =
                    AgentProcess::launch(&exe, &Launch { args: p, env: Vec::new(), verbose: a.out.verbose }, Some(&b.crew), limit).await?;
                (decode.control.clone(), decode.pid(), vec![decode, prefill], String::new())
            }
        };
        let prefill = procs.last_mut().context("no prefill agent")?;
        let handshake_ms = prefill.ready["handshake_ms"].as_f64().unwrap_or(f64::NAN);
        let ucx_version = prefill.ready["ucx_version"].as_str().unwrap_or("").to_string();
        prefill.control.fill_pattern(pb::FillPatternRequest { seed: a.out.seed }).await?;
        // The raw loop times nothing before its peer mapping is pre-faulted.
        prefaulted(&mut decode, Duration::from_secs(60)).await?;
        prefaulted(&mut prefill.control, Duration::from_secs(60)).await?;
        let prefill_pid = prefill.pid();
        let work = Workload {
            seed: a.out.seed,
            mode: mode.to_pb(),
            request_blocks: (a.request_bytes / block).max(1) as usize,
            concurrency: a.concurrency.max(1),
            cpu_of: [decode_pid, prefill_pid],
            peer: prefill_id,
            ..Default::default()
        };
        let rng = rand::rngs::StdRng::seed_from_u64(a.out.seed);
        Ok(Agents { decode, procs, work, rng, num_blocks: (a.region() / block) as u32, handshake_ms, ucx_version })
    }

    /// Pass `p` of `n` blocks (`p` names its requests): poisoned, moved
    /// (timed), verified.
    pub(super) async fn pass(&mut self, n: usize, p: usize) -> anyhow::Result<Outcome> {
        self.work.pass(&mut self.decode, self.num_blocks, n, &format!("bench-{p}"), &mut self.rng).await
    }

    pub(super) async fn stop(self) {
        for p in self.procs {
            p.stop().await;
        }
    }
}

/// Waits until the decode agent behind `decode` lists prefill agent `id`
/// among its peers (handshaked, session stream open).
pub(super) async fn session_open(decode: &mut Control, id: &str, peer: &str, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while !decode.info(pb::InfoRequest {}).await?.into_inner().peers.iter().any(|p| p == id) {
        anyhow::ensure!(start.elapsed() < limit, "prefill agent {id} has no open session with the decode agent at {peer} after {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}
