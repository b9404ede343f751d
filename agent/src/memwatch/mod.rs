//! MemWatch: the agent's memory self-check. It samples `/proc/self` every
//! interval, fits the RSS trend, calls a sustained rise a leak, and then says
//! where the memory went by diffing `/proc/self/smaps` against a baseline.
//!
//! It exists because heap profilers cannot see memory that never passes
//! through malloc (e.g. UCX hooking `munmap` and queueing unmapped ranges
//! without bound): only `/proc` can. This file owns the error type, the
//! configuration, the pure [`MemWatchCore`] state machine (fed samples and
//! snapshots, so tests can replay recorded `/proc` text) and the thin tokio
//! task [`MemWatch`] that reads `/proc` and feeds it.
//!
//! * [`sample`]: per-tick `/proc/self/status` + maps-line count.
//! * [`trend`]: slopes, verdict rule, bounded history.
//! * [`forensics`]: smaps parsing, snapshots, diff and summary.

pub mod forensics;
pub mod sample;
pub mod trend;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::MissedTickBehavior;

use forensics::{BackingTotal, Forensics, Snapshot};
use sample::{ProcReader, Sample};
use trend::{assess, Assessment, SampleRing, TrendConfig, Verdict};

/// Everything that can go wrong reading or parsing `/proc`.
#[derive(Debug, thiserror::Error)]
pub enum MemWatchError {
    /// A `/proc` file could not be read.
    #[error("failed to read {path}: {source}")]
    Io {
        /// The file.
        path: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A required field is absent from `/proc/<pid>/status`.
    #[error("/proc status has no {field} field")]
    MissingStatusField {
        /// The field name, e.g. `VmRSS`.
        field: &'static str,
    },
    /// A field of `/proc/<pid>/status` is not `<digits> kB`.
    #[error("/proc status field {field} is malformed: {line:?} (expected \"{field}: <n> kB\")")]
    MalformedStatus {
        /// The field name.
        field: &'static str,
        /// The offending line.
        line: String,
    },
}

/// Most samples a [`MemReport`] carries; older history is thinned evenly.
pub const REPORT_MAX_SAMPLES: usize = 600;

/// Configuration of [`MemWatch`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemWatchConfig {
    /// Sampling period (serialised as seconds).
    #[serde(rename = "interval_secs", with = "duration_secs")]
    pub interval: Duration,
    /// Trend detector settings.
    pub trend: TrendConfig,
    /// Samples of history kept; raised if needed to hold one trend window.
    pub history_cap: usize,
    /// How many grown mappings forensics lists.
    pub top_n: usize,
    /// Least time between two forensics runs while the leak persists
    /// (serialised as seconds).
    #[serde(rename = "forensics_every_secs", with = "duration_secs")]
    pub forensics_every: Duration,
}

impl Default for MemWatchConfig {
    /// 1 s interval, default trend, one hour of history, top 10, 60 s.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            trend: TrendConfig::default(),
            history_cap: 3600,
            top_n: 10,
            forensics_every: Duration::from_secs(60),
        }
    }
}

impl MemWatchConfig {
    /// Shortest interval accepted (a zero period would spin).
    pub const MIN_INTERVAL: Duration = Duration::from_millis(1);

    /// Clamps the interval to [`Self::MIN_INTERVAL`] and raises
    /// `history_cap` to hold at least one trend window plus one sample.
    pub fn normalized(mut self) -> Self {
        self.interval = self.interval.max(Self::MIN_INTERVAL);
        let per_window = (self.trend.window_secs.max(0.0) / self.interval.as_secs_f64()).ceil();
        // Saturating float-to-int cast; bounded by the history_cap max below.
        let per_window = per_window.min(usize::MAX as f64) as usize;
        self.history_cap = self.history_cap.max(per_window.saturating_add(1));
        self
    }
}

/// Serde helper: a [`Duration`] as floating-point seconds.
mod duration_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

/// What [`MemWatch::report`] returns: enough to judge and to chart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemReport {
    /// The configuration in force (normalised).
    pub config: MemWatchConfig,
    /// The newest sample.
    pub latest: Option<Sample>,
    /// The current trend assessment.
    pub assessment: Assessment,
    /// When the smaps baseline was taken, if it has been.
    pub baseline_at_secs: Option<f64>,
    /// RSS per backing in the baseline (empty before it is taken).
    pub baseline_totals: Vec<BackingTotal>,
    /// The latest forensics, if a leak was ever detected.
    pub forensics: Option<Forensics>,
    /// Samples held in history (at most `config.history_cap`).
    pub history_len: usize,
    /// History for charts, oldest first, at most [`REPORT_MAX_SAMPLES`].
    pub samples: Vec<Sample>,
}

/// What the I/O layer should read after [`MemWatchCore::observe`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wants {
    /// Take a smaps snapshot and hand it to [`MemWatchCore::set_baseline`].
    pub baseline: bool,
    /// Take a smaps snapshot and hand it to [`MemWatchCore::analyze`].
    pub forensics: bool,
}

/// The pure state machine behind [`MemWatch`]: it never touches `/proc`.
///
/// Feed it samples with [`observe`](Self::observe); when it asks for a
/// snapshot, read one (or replay a recording) and pass it back.
#[derive(Debug)]
pub struct MemWatchCore {
    cfg: MemWatchConfig,
    ring: SampleRing,
    /// Reused scratch buffer holding the current window.
    window: Vec<Sample>,
    assessment: Assessment,
    baseline: Option<Snapshot>,
    forensics: Option<Forensics>,
}

impl MemWatchCore {
    /// Creates a core with the (normalised) configuration.
    pub fn new(cfg: MemWatchConfig) -> Self {
        let cfg = cfg.normalized();
        Self {
            ring: SampleRing::new(cfg.history_cap),
            window: Vec::new(),
            assessment: Assessment::empty(&cfg.trend),
            baseline: None,
            forensics: None,
            cfg,
        }
    }

    /// Records a sample, re-assesses the trend, logs verdict transitions,
    /// and says which snapshot (if any) the caller should take next:
    /// the baseline once warm-up is over, and forensics when the verdict is
    /// `leak` and the last forensics is older than `forensics_every`.
    pub fn observe(&mut self, s: Sample) -> Wants {
        let t = s.t_secs;
        let vm_rss = s.vm_rss;
        self.ring.push(s);
        let tc = &self.cfg.trend;
        self.ring.tail_into(tc.warmup_secs.max(t - tc.window_secs), &mut self.window);
        let a = assess(&self.window, tc);
        let from = self.assessment.verdict;
        if a.verdict != from {
            log_transition(from, &a, vm_rss);
        }
        self.assessment = a;

        let baseline = self.baseline.is_none() && t >= tc.warmup_secs;
        let forensics = self.assessment.verdict == Verdict::Leak
            && self.baseline.is_some()
            && self.forensics.as_ref().is_none_or(|f| t - f.now_at_secs >= self.cfg.forensics_every.as_secs_f64());
        Wants { baseline, forensics }
    }

    /// Stores the smaps baseline.
    pub fn set_baseline(&mut self, snap: Snapshot) {
        tracing::info!(
            taken_at_secs = snap.taken_at_secs,
            mappings = snap.mappings.len(),
            rss_mib = mib(snap.total_rss()),
            "memwatch: smaps baseline taken"
        );
        self.baseline = Some(snap);
    }

    /// Diffs `now` against the baseline, logs and keeps the result. Returns
    /// `None` (and does nothing) without a baseline.
    pub fn analyze(&mut self, now: &Snapshot) -> Option<&Forensics> {
        let base = self.baseline.as_ref()?;
        let f = forensics::diff(base, now, self.cfg.top_n);
        tracing::warn!(
            summary = %f.summary,
            rss_then_mib = mib(f.rss_then),
            rss_now_mib = mib(f.rss_now),
            heap_then_mib = mib(f.heap_then),
            heap_now_mib = mib(f.heap_now),
            top_range = f.grown.first().map(|g| g.range.as_str()).unwrap_or(""),
            "memwatch: leak forensics"
        );
        Some(&*self.forensics.insert(f))
    }

    /// The current assessment.
    #[allow(dead_code)] // API for embedders of the core; MemWatch uses `report`.
    pub fn assessment(&self) -> &Assessment {
        &self.assessment
    }

    /// A serialisable report of the current state.
    pub fn report(&self) -> MemReport {
        MemReport {
            config: self.cfg.clone(),
            latest: self.ring.latest().cloned(),
            assessment: self.assessment.clone(),
            baseline_at_secs: self.baseline.as_ref().map(|b| b.taken_at_secs),
            baseline_totals: self.baseline.as_ref().map(Snapshot::totals).unwrap_or_default(),
            forensics: self.forensics.clone(),
            history_len: self.ring.len(),
            samples: self.ring.downsampled(REPORT_MAX_SAMPLES),
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn log_transition(from: Verdict, a: &Assessment, vm_rss: u64) {
    macro_rules! transition {
        ($level:ident, $msg:literal) => {
            tracing::$level!(
                from = %from,
                verdict = %a.verdict,
                rss_slope_mib_per_min = a.rss_slope_mib_per_min,
                first_half_mib_per_min = a.rss_first_half_slope_mib_per_min,
                second_half_mib_per_min = a.rss_second_half_slope_mib_per_min,
                anon_slope_mib_per_min = a.anon_slope_mib_per_min,
                shmem_slope_mib_per_min = a.shmem_slope_mib_per_min,
                heap_slope_mib_per_min = ?a.heap_slope_mib_per_min,
                threshold_mib_per_min = a.threshold_mib_per_min,
                window_secs = a.window_secs,
                vm_rss_mib = mib(vm_rss),
                $msg
            )
        };
    }
    match a.verdict {
        Verdict::Leak => transition!(warn, "memwatch: RSS grows steadily (leak)"),
        Verdict::Ok => transition!(info, "memwatch: memory flat"),
        Verdict::WarmingUp => transition!(info, "memwatch: warming up"),
    }
}

fn lock(core: &Mutex<MemWatchCore>) -> MutexGuard<'_, MemWatchCore> {
    // The core holds no invariant a panic mid-update could break badly.
    core.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The running watcher: a tokio task sampling `/proc/self` into a
/// [`MemWatchCore`]. Stops on [`stop`](Self::stop) or when dropped.
#[derive(Debug)]
pub struct MemWatch {
    core: Arc<Mutex<MemWatchCore>>,
    stop_tx: watch::Sender<bool>,
    task: AbortHandle,
}

impl MemWatch {
    /// Spawns the sampling task on the current tokio runtime.
    ///
    /// `heap_fn` returns allocator heap bytes in use (e.g. from
    /// `mallinfo2`), or `None` if unknown; it is called once per tick.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (as `tokio::spawn` does).
    pub fn start(cfg: MemWatchConfig, heap_fn: fn() -> Option<u64>) -> Arc<MemWatch> {
        let core = MemWatchCore::new(cfg);
        let interval = core.cfg.interval;
        let core = Arc::new(Mutex::new(core));
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(Arc::clone(&core), interval, heap_fn, stop_rx)).abort_handle();
        Arc::new(MemWatch { core, stop_tx, task })
    }

    /// The current report.
    pub fn report(&self) -> MemReport {
        lock(&self.core).report()
    }

    /// Asks the task to stop after its current tick. Idempotent.
    pub fn stop(&self) {
        self.stop_tx.send_replace(true);
    }

    /// Whether the sampling task is still running.
    #[allow(dead_code)] // For health checks and tests.
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }
}

impl Drop for MemWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads per sample; the sample is their floor (field-wise minimum), so
/// short-lived buffers caught at the instant of a read (a request's scratch
/// space, an allocator's short-lived arena growth) do not look like growth, while a leak raises the floor itself.
const FLOOR_READS: usize = 5;
/// Gap between the reads of one sample.
const FLOOR_GAP: Duration = Duration::from_millis(25);

/// The I/O layer: ticks, reads `/proc`, feeds the core.
async fn run(core: Arc<Mutex<MemWatchCore>>, interval: Duration, heap_fn: fn() -> Option<u64>, mut stop: watch::Receiver<bool>) {
    let started = Instant::now();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut reader = ProcReader::new();
    let mut failing = false;
    loop {
        tokio::select! {
            biased;
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
                continue;
            }
            _ = ticker.tick() => {}
        }
        let t = started.elapsed().as_secs_f64();
        let mut floor: Result<Sample, MemWatchError> = reader.read_sample(t, heap_fn());
        for _ in 1..FLOOR_READS {
            tokio::time::sleep(FLOOR_GAP).await;
            if let (Ok(f), Ok(s)) = (&floor, reader.read_sample(t, heap_fn())) {
                floor = Ok(f.floor(&s));
            }
        }
        let sample = match floor {
            Ok(s) => s,
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "memwatch: sampling failed");
                }
                failing = true;
                continue;
            }
        };
        if std::mem::take(&mut failing) {
            tracing::info!("memwatch: sampling recovered");
        }
        let heap = sample.heap;
        let wants = lock(&core).observe(sample);
        if !(wants.baseline || wants.forensics) {
            continue;
        }
        // smaps walks page tables: keep it off the async worker.
        match tokio::task::spawn_blocking(move || Snapshot::read(t, heap)).await {
            Ok(Ok(snap)) => {
                let mut core = lock(&core);
                if wants.baseline {
                    core.set_baseline(snap);
                } else {
                    core.analyze(&snap);
                }
            }
            Ok(Err(error)) => tracing::warn!(%error, "memwatch: smaps snapshot failed"),
            Err(error) => tracing::warn!(%error, "memwatch: smaps snapshot task failed"),
        }
    }
    tracing::debug!("memwatch: stopped");
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::memwatch::forensics::Backing;

    const BASE: &str = include_str!("testdata/smaps_baseline.txt");
    const GROWN: &str = include_str!("testdata/smaps_grown.txt");
    const MIB: u64 = 1024 * 1024;

    /// RSS rising 8 MiB/min in anonymous memory, heap flat at 40 MiB.
    fn leaking(t: f64) -> Sample {
        let anon = 12 * MIB + (t * 8.0 * MIB as f64 / 60.0) as u64;
        Sample {
            t_secs: t,
            vm_rss: anon + 11 * MIB,
            rss_anon: anon,
            rss_file: 7 * MIB,
            rss_shmem: 4 * MIB,
            maps: 124,
            heap: Some(40 * MIB),
        }
    }

    /// Replays a leak through the pure core with recorded smaps.
    #[test]
    fn core_replay_leak_with_flat_heap() {
        let mut core = MemWatchCore::new(MemWatchConfig::default());
        let mut baseline_at = None;
        let mut forensics_at = Vec::new();
        for i in 0..400 {
            let t = f64::from(i);
            let wants = core.observe(leaking(t));
            if wants.baseline {
                assert!(baseline_at.is_none(), "baseline asked for twice");
                baseline_at = Some(t);
                core.set_baseline(Snapshot::from_smaps(t, Some(40 * MIB), BASE));
            }
            if wants.forensics {
                forensics_at.push(t);
                let f = core.analyze(&Snapshot::from_smaps(t, Some(40 * MIB), GROWN)).unwrap();
                assert!(f.summary.starts_with("RSS grows but the heap does not"), "{}", f.summary);
            }
            if t < 30.0 {
                assert_eq!(core.assessment().verdict, Verdict::WarmingUp);
            }
        }
        assert_eq!(baseline_at, Some(30.0));
        assert_eq!(core.assessment().verdict, Verdict::Leak);
        // Once when the leak is first seen, then every 60 s while it lasts.
        assert_eq!(forensics_at.first(), Some(&90.0));
        assert!(forensics_at.windows(2).all(|w| w[1] - w[0] == 60.0), "{forensics_at:?}");

        let r = core.report();
        assert_eq!(r.baseline_at_secs, Some(30.0));
        let shmem = r.baseline_totals.iter().find(|b| b.backing == Backing::Shmem);
        assert_eq!(shmem.map(|b| b.rss), Some(4 * MIB));
        let f = r.forensics.as_ref().unwrap();
        assert_eq!(f.grown[0].backing, Backing::Anon);
        assert!(f.summary.contains("anonymous mappings outside the heap"));
        assert!((r.assessment.rss_slope_mib_per_min - 8.0).abs() < 0.1);
        assert!(r.assessment.heap_slope_mib_per_min.unwrap().abs() < 1e-9);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["assessment"]["verdict"], "leak");
        assert_eq!(json["config"]["interval_secs"], 1.0);
        let back: MemReport = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn core_flat_memory_stays_ok_and_bounded() {
        let cfg = MemWatchConfig { history_cap: 500, ..MemWatchConfig::default() };
        let mut core = MemWatchCore::new(cfg);
        for i in 0..20_000 {
            let mut s = leaking(0.0);
            s.t_secs = f64::from(i);
            let wants = core.observe(s);
            assert!(!wants.forensics);
        }
        assert_eq!(core.assessment().verdict, Verdict::Ok);
        let r = core.report();
        assert_eq!(r.history_len, 500);
        assert_eq!(r.samples.len(), 500);
        assert!(r.forensics.is_none());
        assert_eq!(r.latest.unwrap().t_secs, 19_999.0);
    }

    #[test]
    fn config_normalization() {
        let cfg = MemWatchConfig { interval: Duration::ZERO, history_cap: 0, ..MemWatchConfig::default() }.normalized();
        assert_eq!(cfg.interval, MemWatchConfig::MIN_INTERVAL);
        assert_eq!(cfg.history_cap, 120_001);
        let cfg = MemWatchConfig::default().normalized();
        assert_eq!(cfg, MemWatchConfig::default());
        let mut big = MemWatchCore::new(MemWatchConfig { history_cap: 10_000, ..MemWatchConfig::default() });
        for i in 0..12_000 {
            big.observe(leaking(f64::from(i)));
        }
        let n = big.report().samples.len();
        assert!((REPORT_MAX_SAMPLES * 9 / 10..=REPORT_MAX_SAMPLES).contains(&n), "{n}");
    }

    static LIVE_TICKS: AtomicU64 = AtomicU64::new(0);
    fn live_heap() -> Option<u64> {
        LIVE_TICKS.fetch_add(1, Ordering::Relaxed);
        Some(1 << 20)
    }

    fn tiny() -> MemWatchConfig {
        MemWatchConfig {
            interval: Duration::from_millis(50),
            trend: TrendConfig { warmup_secs: 0.1, window_secs: 0.5, threshold_mib_per_min: 1.0, min_samples: 4 },
            ..MemWatchConfig::default()
        }
    }

    #[tokio::test]
    async fn live_memwatch_samples_this_process() {
        let w = MemWatch::start(tiny(), live_heap);
        tokio::time::sleep(Duration::from_millis(900)).await;
        let r = w.report();
        assert!(r.samples.len() >= 5, "{}", r.samples.len());
        let latest = r.latest.as_ref().unwrap();
        assert!(latest.vm_rss > 0);
        assert!(latest.maps > 0);
        assert_eq!(latest.heap, Some(1 << 20));
        assert!(r.samples.iter().all(|s| s.vm_rss > 0));
        assert!(r.samples.windows(2).all(|p| p[0].t_secs < p[1].t_secs));
        assert!(r.baseline_at_secs.is_some(), "baseline not taken");
        assert_ne!(r.assessment.verdict, Verdict::WarmingUp, "{:?}", r.assessment);
        serde_json::to_string(&r).unwrap();

        assert!(w.is_running());
        w.stop();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!w.is_running());
        let n = w.report().samples.len();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(w.report().samples.len(), n);
    }

    static DROP_TICKS: AtomicU64 = AtomicU64::new(0);
    fn drop_heap() -> Option<u64> {
        DROP_TICKS.fetch_add(1, Ordering::Relaxed);
        None
    }

    #[tokio::test]
    async fn dropping_memwatch_ends_the_task() {
        let w = MemWatch::start(tiny(), drop_heap);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(DROP_TICKS.load(Ordering::Relaxed) > 0);
        drop(w);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after_drop = DROP_TICKS.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(DROP_TICKS.load(Ordering::Relaxed), after_drop);
    }
}
