//! Where the bench's processes and threads run: the two busy UCX threads on
//! two CPUs, the control plane beside the one that is not the limit.

use anyhow::Context as _;
use kvrail_transfer::Transport;

use crate::cli::{BenchArgs, Mode};

/// Runs a future to completion on a thread of its own bound to `cpu`, with
/// a single-threaded runtime of its own (processes it starts inherit the
/// binding until they bind their threads themselves).
pub(super) fn on_cpu<F: std::future::Future<Output = anyhow::Result<T>>, T: Send>(
    cpu: usize,
    f: impl FnOnce() -> F + Send,
) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            kvrail_transfer::cpu::bind_this_thread(&[cpu]).with_context(|| format!("binding the bench client to CPU {cpu}"))?;
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the bench client thread panicked"))?
    })
}

/// The first two CPUs this process may use, read once (the bench's client
/// later runs bound to one of them), or none when pinning is off or there
/// are fewer than two.
pub(super) fn bench_cpus(a: &BenchArgs) -> &'static [usize] {
    static CPUS: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    let cpus = CPUS.get_or_init(|| {
        let c = kvrail_transfer::cpu::allowed_cpus().unwrap_or_default();
        if c.len() >= 2 {
            c[..2].to_vec()
        } else {
            Vec::new()
        }
    });
    // With --peer the other side runs elsewhere: nothing to keep apart.
    if a.no_pin || a.peer.is_some() {
        &[]
    } else {
        cpus
    }
}

/// `--progress-cpu` for the side blocks flow into (0: the decode agent, the
/// raw process in its place) or out of (1: the prefill agent, or its raw
/// stand-in): the first and second of [`bench_cpus`].
pub(super) fn pin_args(a: &BenchArgs, side: usize) -> Vec<String> {
    bench_cpus(a).get(side).map(|cpu| vec!["--progress-cpu".into(), cpu.to_string()]).unwrap_or_default()
}

/// The CPU for everything of a kvrail run besides the two progress threads
/// (the agents' gRPC and async runtimes, and this process's client driving
/// them): the one the limiting progress thread does not use, so the
/// control plane does not preempt it. On `sm` one progress thread does all
/// the copying (prefill's on writes, decode's on reads) and the other side
/// sleeps. On tcp both are busy, and the sender's (prefill's in both modes:
/// over tcp a read is delivered by the prefill agent too) is the limit,
/// copying into socket buffers, while the receiver's (decode's) polls with
/// time to spare; so the control plane goes with the decode agent.
/// Measured on tcp 1 MiB writes (`/proc/<tid>/status` and `schedstat`
/// during the passes): left unbound, the prefill's progress thread was
/// preempted ~130 times a second and waited 1.7% of its time for its CPU;
/// bound this way, ~30 times and 1.2%, like the raw loop's sender (45-52
/// times, 1.0-2.7%). The raw loop has no such threads.
pub(super) fn control_cpu(a: &BenchArgs, t: Transport, mode: Mode) -> Option<usize> {
    // The decode agent's progress thread has the first CPU, the prefill's
    // the second: see `pin_args`.
    let decode_side = t.writes_as_messages() || matches!(mode, Mode::Write);
    bench_cpus(a).get(usize::from(!decode_side)).copied()
}
