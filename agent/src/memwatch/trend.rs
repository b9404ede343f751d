//! Trend detection: least-squares slopes over a sliding window of samples,
//! the leak [`Verdict`], and the bounded [`SampleRing`] that holds history.
//!
//! # The leak rule
//!
//! Only samples with `t_secs >= warmup_secs` are considered, and of those only
//! the ones in the last `window_secs`. The verdict is:
//!
//! * `warming_up` while there are fewer than `min_samples` such samples, or
//!   they span less than half of `window_secs`;
//! * `leak` when growth is **sustained**: the least-squares RSS slope over the
//!   whole window exceeds `threshold_mib_per_min`, **and** the RSS slopes over
//!   the first and the second half of the window (split at the midpoint in
//!   time) each exceed half the threshold **and** are each at least
//!   [`MIN_HALF_T_STAT`] standard errors above zero;
//! * `ok` otherwise.
//!
//! The half-window condition is what keeps a one-off step (say a single
//! 10 MiB allocation that is then kept) from being called a leak: a step lies
//! in at most one half, so the other half is flat, whereas the full-window
//! slope of a step of `h` bytes in a window of `W` seconds is about `1.5 h / W`
//! and would easily cross the threshold on its own. The standard-error guard
//! keeps sampling noise in the flat half (RSS jitter of a MiB over a half
//! window of a minute is a slope of the order of the half threshold) from
//! passing for growth; a real leak's half slopes are many standard errors
//! above zero.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::sample::Sample;

/// Converts a slope in bytes per second to MiB per minute.
pub const BYTES_PER_SEC_TO_MIB_PER_MIN: f64 = 60.0 / (1024.0 * 1024.0);

/// Tuning of the trend detector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrendConfig {
    /// Samples taken before this many seconds since start are ignored.
    pub warmup_secs: f64,
    /// Length of the sliding window the slopes are fitted over.
    pub window_secs: f64,
    /// RSS growth above which (sustained) the verdict is `leak`.
    pub threshold_mib_per_min: f64,
    /// Fewer samples than this in the window means `warming_up`.
    pub min_samples: usize,
}

impl Default for TrendConfig {
    fn default() -> Self {
        Self { warmup_secs: 30.0, window_secs: 120.0, threshold_mib_per_min: 1.0, min_samples: 20 }
    }
}

/// The detector's conclusion. Serialised as `warming_up`, `ok`, `leak`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Not enough (post-warm-up) data to judge.
    WarmingUp,
    /// No sustained growth above the threshold.
    Ok,
    /// Sustained RSS growth above the threshold.
    Leak,
}

impl Verdict {
    /// The serialised name (`warming_up`, `ok`, `leak`).
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::WarmingUp => "warming_up",
            Verdict::Ok => "ok",
            Verdict::Leak => "leak",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Result of [`assess`]. Slopes are MiB per minute (0 when not computable).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assessment {
    /// The verdict, see the module docs for the rule.
    pub verdict: Verdict,
    /// Slope of `vm_rss` over the window.
    pub rss_slope_mib_per_min: f64,
    /// Slope of `vm_rss` over the first half of the window.
    pub rss_first_half_slope_mib_per_min: f64,
    /// Slope of `vm_rss` over the second half of the window.
    pub rss_second_half_slope_mib_per_min: f64,
    /// Slope of `rss_anon`.
    pub anon_slope_mib_per_min: f64,
    /// Slope of `rss_file`.
    pub file_slope_mib_per_min: f64,
    /// Slope of `rss_shmem`.
    pub shmem_slope_mib_per_min: f64,
    /// Slope of the caller-supplied heap bytes, when at least two samples in
    /// the window carry them.
    pub heap_slope_mib_per_min: Option<f64>,
    /// Slope of the number of mappings, in mappings per minute.
    pub maps_slope_per_min: f64,
    /// Seconds actually covered by the samples in the window.
    pub window_secs: f64,
    /// Number of samples in the window.
    pub samples_in_window: usize,
    /// Intercept (bytes at `t_secs` = 0) of the least-squares RSS line whose
    /// slope is `rss_slope_mib_per_min`, when the window holds a fit; with
    /// the slope it draws the fitted line in charts.
    #[serde(default)]
    pub rss_intercept_bytes: Option<f64>,
    /// The threshold the verdict was judged against.
    pub threshold_mib_per_min: f64,
}

impl Assessment {
    /// An assessment with no data: `warming_up`, all slopes zero.
    pub fn empty(cfg: &TrendConfig) -> Self {
        Self {
            verdict: Verdict::WarmingUp,
            rss_slope_mib_per_min: 0.0,
            rss_first_half_slope_mib_per_min: 0.0,
            rss_second_half_slope_mib_per_min: 0.0,
            anon_slope_mib_per_min: 0.0,
            file_slope_mib_per_min: 0.0,
            shmem_slope_mib_per_min: 0.0,
            heap_slope_mib_per_min: None,
            maps_slope_per_min: 0.0,
            window_secs: 0.0,
            samples_in_window: 0,
            rss_intercept_bytes: None,
            threshold_mib_per_min: cfg.threshold_mib_per_min,
        }
    }
}

/// A half-window slope must be at least this many standard errors above
/// zero to count as growth (see the module docs).
pub const MIN_HALF_T_STAT: f64 = 3.0;

/// A least-squares line fit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fit {
    /// Slope, y per unit of x.
    pub slope: f64,
    /// Standard error of the slope (0 with two points or a perfect fit).
    pub stderr: f64,
    /// Value of the line at x = 0.
    pub intercept: f64,
}

impl Fit {
    /// Slope divided by its standard error; infinite for a perfect fit.
    pub fn t_stat(&self) -> f64 {
        if self.stderr > 0.0 {
            self.slope / self.stderr
        } else {
            self.slope.signum() * f64::INFINITY
        }
    }
}

/// Least-squares fit of the points, or `None` with fewer than two points or
/// no spread in x. Centred sums keep precision with large byte counts.
pub fn fit<I>(points: I) -> Option<Fit>
where
    I: IntoIterator<Item = (f64, f64)>,
    I::IntoIter: Clone,
{
    let it = points.into_iter();
    let (mut n, mut sx, mut sy) = (0usize, 0.0f64, 0.0f64);
    for (x, y) in it.clone() {
        n += 1;
        sx += x;
        sy += y;
    }
    if n < 2 {
        return None;
    }
    let (mx, my) = (sx / n as f64, sy / n as f64);
    let (mut sxy, mut sxx, mut syy) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in it {
        let (dx, dy) = (x - mx, y - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if sxx <= 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    let stderr = if n > 2 {
        let ssr = (syy - slope * sxy).max(0.0);
        (ssr / (n - 2) as f64 / sxx).sqrt()
    } else {
        0.0
    };
    Some(Fit { slope, stderr, intercept: my - slope * mx })
}

/// Least-squares slope (y per unit of x), see [`fit`].
pub fn slope<I>(points: I) -> Option<f64>
where
    I: IntoIterator<Item = (f64, f64)>,
    I::IntoIter: Clone,
{
    fit(points).map(|f| f.slope)
}

/// Slope of one byte-valued field in MiB/min (0 when not computable).
fn field_slope(samples: &[Sample], f: fn(&Sample) -> u64) -> f64 {
    slope(samples.iter().map(|s| (s.t_secs, f(s) as f64))).unwrap_or(0.0) * BYTES_PER_SEC_TO_MIB_PER_MIN
}

/// Assesses the trend of `samples`, which must be sorted by `t_secs` (as the
/// ring produces them). See the module docs for the rule.
pub fn assess(samples: &[Sample], cfg: &TrendConfig) -> Assessment {
    let Some(last) = samples.last() else {
        return Assessment::empty(cfg);
    };
    let from = cfg.warmup_secs.max(last.t_secs - cfg.window_secs);
    let window = &samples[samples.partition_point(|s| s.t_secs < from)..];
    let mut a = Assessment::empty(cfg);
    let (Some(first), Some(last)) = (window.first(), window.last()) else {
        return a;
    };
    a.samples_in_window = window.len();
    a.window_secs = last.t_secs - first.t_secs;

    let rss = fit(window.iter().map(|s| (s.t_secs, s.vm_rss as f64)));
    a.rss_slope_mib_per_min = rss.map_or(0.0, |f| f.slope * BYTES_PER_SEC_TO_MIB_PER_MIN);
    a.rss_intercept_bytes = rss.map(|f| f.intercept);
    a.anon_slope_mib_per_min = field_slope(window, |s| s.rss_anon);
    a.file_slope_mib_per_min = field_slope(window, |s| s.rss_file);
    a.shmem_slope_mib_per_min = field_slope(window, |s| s.rss_shmem);
    a.maps_slope_per_min = slope(window.iter().map(|s| (s.t_secs, s.maps as f64))).unwrap_or(0.0) * 60.0;
    a.heap_slope_mib_per_min =
        slope(window.iter().filter_map(|s| s.heap.map(|h| (s.t_secs, h as f64)))).map(|b| b * BYTES_PER_SEC_TO_MIB_PER_MIN);

    let mid = (first.t_secs + last.t_secs) / 2.0;
    let (h1, h2) = window.split_at(window.partition_point(|s| s.t_secs <= mid));
    let half_fit = |h: &[Sample]| fit(h.iter().map(|s| (s.t_secs, s.vm_rss as f64)));
    let (f1, f2) = (half_fit(h1), half_fit(h2));
    let mib_min = |f: Option<Fit>| f.map_or(0.0, |f| f.slope * BYTES_PER_SEC_TO_MIB_PER_MIN);
    a.rss_first_half_slope_mib_per_min = mib_min(f1);
    a.rss_second_half_slope_mib_per_min = mib_min(f2);

    if window.len() < cfg.min_samples || a.window_secs < cfg.window_secs / 2.0 {
        a.verdict = Verdict::WarmingUp;
        return a;
    }
    let half = cfg.threshold_mib_per_min / 2.0;
    let grows = |f: Option<Fit>| f.is_some_and(|f| f.slope * BYTES_PER_SEC_TO_MIB_PER_MIN > half && f.t_stat() >= MIN_HALF_T_STAT);
    let sustained = grows(f1) && grows(f2);
    a.verdict = if a.rss_slope_mib_per_min > cfg.threshold_mib_per_min && sustained { Verdict::Leak } else { Verdict::Ok };
    a
}

/// A bounded FIFO of samples: pushing beyond `cap` drops the oldest, so the
/// watcher's own memory stays flat however long it runs.
#[derive(Clone, Debug)]
pub struct SampleRing {
    buf: VecDeque<Sample>,
    cap: usize,
}

impl SampleRing {
    /// Creates a ring holding at most `cap` samples (at least 1).
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        Self { buf: VecDeque::with_capacity(cap), cap }
    }

    /// Appends a sample, evicting the oldest if full.
    pub fn push(&mut self, s: Sample) {
        if self.buf.len() == self.cap {
            self.buf.pop_front();
        }
        self.buf.push_back(s);
    }

    /// Number of samples held.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when no sample is held.
    #[allow(dead_code)] // API for callers; MemWatch itself only needs `len`.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The newest sample.
    pub fn latest(&self) -> Option<&Sample> {
        self.buf.back()
    }

    /// Replaces `out` with the samples with `t_secs >= from_secs`, oldest
    /// first. `out` is reused so steady-state assessment does not allocate.
    pub fn tail_into(&self, from_secs: f64, out: &mut Vec<Sample>) {
        out.clear();
        let start = self.buf.partition_point(|s| s.t_secs < from_secs);
        out.extend(self.buf.range(start..).cloned());
    }

    /// At most `max` samples spread evenly over the whole history, always
    /// including the newest; for charts in reports.
    pub fn downsampled(&self, max: usize) -> Vec<Sample> {
        let n = self.buf.len();
        if max == 0 || n == 0 {
            return Vec::new();
        }
        if n <= max {
            return self.buf.iter().cloned().collect();
        }
        let stride = n.div_ceil(max);
        // Anchor the stride on the newest sample so it is always included.
        let offset = (n - 1) % stride;
        self.buf.iter().skip(offset).step_by(stride).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 1024.0 * 1024.0;

    /// Deterministic noise in [-amp, amp] (64-bit LCG), so tests never flake.
    struct Noise(u64);
    impl Noise {
        fn next(&mut self, amp: f64) -> f64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let unit = (self.0 >> 11) as f64 / (1u64 << 53) as f64;
            (unit * 2.0 - 1.0) * amp
        }
    }

    fn sample(t: f64, rss: f64) -> Sample {
        let rss = rss.max(0.0) as u64;
        Sample { t_secs: t, vm_rss: rss, rss_anon: rss / 2, rss_file: rss / 4, rss_shmem: rss / 4, maps: 100, heap: Some(50 * 1024 * 1024) }
    }

    /// One sample per second for `secs` seconds from `rss(t)`.
    fn series(secs: u32, mut rss: impl FnMut(f64) -> f64) -> Vec<Sample> {
        (0..secs).map(f64::from).map(|t| sample(t, rss(t))).collect()
    }

    #[test]
    fn slope_of_a_line_is_exact() {
        let pts = [(0.0, 1.0), (1.0, 3.0), (2.0, 5.0), (3.0, 7.0)];
        assert!((slope(pts).unwrap() - 2.0).abs() < 1e-12);
        assert_eq!(slope([(1.0, 1.0)]), None);
        assert_eq!(slope([(1.0, 1.0), (1.0, 2.0)]), None);
        assert_eq!(slope(std::iter::empty::<(f64, f64)>()), None);
        let perfect = fit(pts).unwrap();
        assert_eq!((perfect.stderr, perfect.t_stat()), (0.0, f64::INFINITY));
        assert!((perfect.intercept - 1.0).abs() < 1e-12);
        let noisy = fit([(0.0, 0.0), (1.0, 2.0), (2.0, 1.0), (3.0, 3.0)]).unwrap();
        assert!((noisy.slope - 0.8).abs() < 1e-12);
        // Through the centroid (1.5, 1.5): 1.5 - 0.8 * 1.5.
        assert!((noisy.intercept - 0.3).abs() < 1e-12);
        // Residuals -0.3, 0.9, -0.9, 0.3: SSR = 1.8, se = sqrt(1.8 / 2 / 5).
        assert!((noisy.stderr - 0.18f64.sqrt()).abs() < 1e-12);
    }

    /// A transient spike late in the first half tilts that half's slope
    /// above half the threshold, and a step lands in the second half: the
    /// slope conditions alone would say leak; the standard-error guard
    /// is what holds, because the spike is not a trend.
    #[test]
    fn transient_spike_plus_step_is_not_a_leak() {
        let cfg = TrendConfig::default();
        let mut noise = Noise(11);
        let s = series(150, |t| {
            let spike = if (84.0..87.0).contains(&t) { 8.0 * MIB } else { 0.0 };
            let step = if t >= 120.0 { 20.0 * MIB } else { 0.0 };
            400.0 * MIB + spike + step + noise.next(0.5 * MIB)
        });
        let a = assess(&s, &cfg);
        assert!(a.rss_slope_mib_per_min > cfg.threshold_mib_per_min, "{a:?}");
        assert!(a.rss_first_half_slope_mib_per_min > cfg.threshold_mib_per_min / 2.0, "{a:?}");
        assert!(a.rss_second_half_slope_mib_per_min > cfg.threshold_mib_per_min / 2.0, "{a:?}");
        assert_eq!(a.verdict, Verdict::Ok, "{a:?}");
    }

    #[test]
    fn flat_with_noise_is_ok() {
        let mut noise = Noise(1);
        let s = series(300, |_| 500.0 * MIB + noise.next(2.0 * MIB));
        let a = assess(&s, &TrendConfig::default());
        assert_eq!(a.verdict, Verdict::Ok, "{a:?}");
        assert!(a.rss_slope_mib_per_min.abs() < 0.5, "{a:?}");
        assert_eq!(a.samples_in_window, 121);
        assert!((a.window_secs - 120.0).abs() < 1e-9);
        assert!(a.heap_slope_mib_per_min.unwrap().abs() < 1e-9);
    }

    #[test]
    fn linear_growth_with_noise_is_a_leak() {
        let mut noise = Noise(7);
        let rate = 5.0 * MIB / 60.0; // 5 MiB/min in bytes/s
        let s = series(200, |t| 300.0 * MIB + rate * t + noise.next(2.0 * MIB));
        let a = assess(&s, &TrendConfig::default());
        assert_eq!(a.verdict, Verdict::Leak, "{a:?}");
        assert!((a.rss_slope_mib_per_min - 5.0).abs() < 0.5, "{a:?}");
        assert!((a.anon_slope_mib_per_min - 2.5).abs() < 0.5, "{a:?}");
        let intercept_mib = a.rss_intercept_bytes.expect("a fit") / MIB;
        assert!((intercept_mib - 300.0).abs() < 2.0, "{a:?}");
        assert!(a.rss_first_half_slope_mib_per_min > 0.5);
        assert!(a.rss_second_half_slope_mib_per_min > 0.5);
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json["verdict"], "leak");
    }

    #[test]
    fn slow_growth_below_threshold_is_ok() {
        let rate = 0.5 * MIB / 60.0;
        let s = series(200, |t| 300.0 * MIB + rate * t);
        assert_eq!(assess(&s, &TrendConfig::default()).verdict, Verdict::Ok);
    }

    /// One-off step: a single 10 MiB allocation that stays. Its full-window
    /// slope is ~7.5 MiB/min (far above the 1 MiB/min threshold), but it
    /// lies in one half of the window only, so it is never called a leak,
    /// wherever it sits as the window slides past it.
    #[test]
    fn one_off_step_is_never_a_leak() {
        let cfg = TrendConfig::default();
        let mut noise = Noise(3);
        let step_at = 100.0;
        let s = series(400, |t| {
            let step = if t >= step_at { 10.0 * MIB } else { 0.0 };
            400.0 * MIB + step + noise.next(1.0 * MIB)
        });
        let mut max_full_slope = 0.0f64;
        for end in (cfg.warmup_secs as usize + cfg.min_samples)..=s.len() {
            let a = assess(&s[..end], &cfg);
            assert_ne!(a.verdict, Verdict::Leak, "end={end} {a:?}");
            max_full_slope = max_full_slope.max(a.rss_slope_mib_per_min);
        }
        // The whole-window slope alone would have fired: the half rule is what holds.
        assert!(max_full_slope > 5.0 * cfg.threshold_mib_per_min, "{max_full_slope}");
    }

    #[test]
    fn two_steps_one_per_half_is_a_leak() {
        // Growth in both halves is sustained growth, even if it comes in steps.
        let s = series(150, |t| 100.0 * MIB + (t / 20.0).floor() * 4.0 * MIB);
        assert_eq!(assess(&s, &TrendConfig::default()).verdict, Verdict::Leak);
    }

    #[test]
    fn too_few_samples_is_warming_up() {
        let cfg = TrendConfig::default();
        let rate = 50.0 * MIB / 60.0;
        // Still inside warm-up: everything ignored.
        let a = assess(&series(25, |t| rate * t), &cfg);
        assert_eq!((a.verdict, a.samples_in_window), (Verdict::WarmingUp, 0));
        // Past warm-up, fewer than min_samples.
        let a = assess(&series(45, |t| rate * t), &cfg);
        assert_eq!((a.verdict, a.samples_in_window), (Verdict::WarmingUp, 15));
        // Enough samples, but they cover less than half the window.
        let dense: Vec<Sample> = (0..100).map(|i| sample(30.0 + f64::from(i) * 0.5, rate * f64::from(i))).collect();
        let a = assess(&dense, &cfg);
        assert_eq!(a.verdict, Verdict::WarmingUp, "{a:?}");
        assert!(a.window_secs < 60.0);
        // No samples at all.
        assert_eq!(assess(&[], &cfg), Assessment::empty(&cfg));
        let json = serde_json::to_value(Verdict::WarmingUp).unwrap();
        assert_eq!(json, "warming_up");
    }

    #[test]
    fn ring_is_bounded() {
        let mut ring = SampleRing::new(100);
        for i in 0..10_000 {
            ring.push(sample(f64::from(i), 1.0));
        }
        assert_eq!(ring.len(), 100);
        assert!(!ring.is_empty());
        assert_eq!(ring.downsampled(100)[0].t_secs, 9_900.0);
        assert_eq!(ring.latest().unwrap().t_secs, 9_999.0);

        let mut out = Vec::new();
        ring.tail_into(9_990.0, &mut out);
        assert_eq!(out.len(), 10);
        assert_eq!(out[0].t_secs, 9_990.0);

        let d = ring.downsampled(30);
        assert!(d.len() <= 30 && d.len() >= 20, "{}", d.len());
        assert_eq!(d.last().unwrap().t_secs, 9_999.0);
        assert!(d.windows(2).all(|w| w[0].t_secs < w[1].t_secs));
        assert_eq!(ring.downsampled(1000).len(), 100);
        let mut one = SampleRing::new(0);
        assert!(one.is_empty());
        one.push(sample(1.0, 1.0));
        one.push(sample(2.0, 1.0));
        assert_eq!(one.len(), 1);
    }
}
