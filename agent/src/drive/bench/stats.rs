//! The bench's arithmetic: GB/s, medians, passes of a run, and the paired
//! ratio that cancels what the start order does to both sides.

/// The median of `v` (the mean of the middle two for an even count; NaN
/// when empty).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// GB/s (1e9 bytes per second), 0 when nothing was timed.
pub fn gbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e9
    } else {
        0.0
    }
}

/// The passes of one run: `total` blocks, at most `per_pass` (a region's
/// worth) at a time.
pub fn passes(total: usize, per_pass: usize) -> Vec<usize> {
    let per_pass = per_pass.max(1);
    (0..total.div_ceil(per_pass)).map(|i| (total - i * per_pass).min(per_pass)).collect()
}

/// The point's ratio from its runs' ratios (in run order): runs pair up
/// (1-2, 3-4, ...; one pair with kvrail's processes started first, one
/// with the raw loop's), each pair gives the geometric mean of its two,
/// which cancels what the start order does to both, and the median of the
/// pairs is the ratio. A last run without a partner stands alone.
pub fn paired_ratio(runs: &[f64]) -> f64 {
    let mut pairs: Vec<f64> = runs.chunks(2).map(|c| c.iter().product::<f64>().powf(1.0 / c.len() as f64)).collect();
    median(&mut pairs)
}

/// kvrail / raw, 0 when the baseline is missing.
pub fn ratio(kvrail: f64, raw: f64) -> f64 {
    if raw > 0.0 && kvrail.is_finite() {
        kvrail / raw
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_whole_regions_then_the_rest() {
        assert_eq!(passes(10, 4), [4, 4, 2]);
        assert_eq!(passes(8, 4), [4, 4]);
        assert_eq!(passes(3, 4), [3]);
        assert!(passes(0, 4).is_empty());
        assert_eq!(passes(2, 0), [1, 1], "a pass moves at least one block");
    }

    #[test]
    fn gbps_is_bytes_over_seconds() {
        assert_eq!(gbps(3_000_000_000, 1.5), 2.0);
        assert_eq!(gbps(1, 0.0), 0.0);
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn paired_ratio_cancels_the_start_order_and_drops_an_odd_pair() {
        // A true ratio of 0.95, the start order worth x1.1 one way and
        // x1/1.1 the other: every pair gives 0.95.
        let runs = [0.95 * 1.1, 0.95 / 1.1, 0.95 * 1.1, 0.95 / 1.1, 0.95 * 1.1, 0.95 / 1.1];
        assert!((paired_ratio(&runs) - 0.95).abs() < 1e-12);
        // One disturbed pair out of three does not move it.
        let r = paired_ratio(&[1.0, 0.9, 0.5, 0.6, 1.0, 1.0]);
        assert!((r - 0.9f64.sqrt()).abs() < 1e-12, "{r}");
        assert_eq!(paired_ratio(&[0.8]), 0.8, "a lone run stands alone");
        assert_eq!(paired_ratio(&[0.5, 2.0, 0.9]), 0.95, "two pairs: the mean of 1.0 and 0.9");
        assert!(paired_ratio(&[]).is_nan());
    }

    #[test]
    fn ratio_is_kvrail_over_raw() {
        assert_eq!(ratio(9.0, 10.0), 0.9);
        assert_eq!(ratio(1.0, 0.0), 0.0);
    }
}
