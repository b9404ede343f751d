//! Dependency-free SVG line charts for memory time series.
//!
//! [`render`] turns a [`Chart`] — a few [`Series`] of `(seconds, MiB)` samples,
//! optional fitted [`Trend`] lines and an optional shaded warm-up region — into
//! a complete, standalone SVG document (900×420) that opens directly in a
//! browser.
//!
//! The renderer is defensive and never panics on odd input:
//!
//! * non-finite samples (NaN, ±inf) are dropped, so `NaN` never reaches the output;
//! * a completely flat series gets a nonzero range (±1 MiB around its value);
//! * a chart without any samples still renders, with a "no samples" note;
//! * series longer than [`MAX_POLYLINE_POINTS`] are downsampled, keeping the
//!   first and last sample plus the minimum and maximum of every bucket so
//!   short spikes stay visible;
//! * all text (titles, names, labels, colours) is XML-escaped.
//!
//! Axes use "nice" tick values (steps of 1, 2 or 5 × 10^k, 5–8 ticks). The y
//! axis spans the minimum to the maximum over all series and trends with 5%
//! padding; the x axis spans 0 (or the first timestamp, for data far from 0)
//! to the last timestamp.

/// Width of the produced SVG, in pixels.
pub const WIDTH: u32 = 900;
/// Height of the produced SVG, in pixels.
pub const HEIGHT: u32 = 420;
/// Series with more points than this are downsampled before drawing.
pub const MAX_POLYLINE_POINTS: usize = 2000;

/// One line on the chart: points are (seconds, MiB).
#[derive(Debug, Clone, PartialEq)]
pub struct Series<'a> {
    /// Legend name.
    pub name: &'a str,
    /// Any SVG colour (`"#1f77b4"`, `"crimson"`); empty picks a default.
    pub color: &'a str,
    /// `(seconds, MiB)` samples; non-finite ones are ignored.
    pub points: Vec<(f64, f64)>,
}

/// A fitted trend drawn as a dashed line from (t0, y0) to (t1, y1), labelled.
#[derive(Debug, Clone, PartialEq)]
pub struct Trend<'a> {
    /// Legend label (also written next to the end of the line).
    pub label: &'a str,
    /// Any SVG colour; empty picks a default.
    pub color: &'a str,
    /// Start time in seconds.
    pub t0: f64,
    /// Value at `t0`, in MiB.
    pub y0: f64,
    /// End time in seconds.
    pub t1: f64,
    /// Value at `t1`, in MiB.
    pub y1: f64,
}

/// Everything needed to draw one chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart<'a> {
    /// Bold heading at the top.
    pub title: &'a str,
    /// Smaller grey line under the title (omitted when empty).
    pub subtitle: &'a str,
    /// The measured lines.
    pub series: Vec<Series<'a>>,
    /// Fitted trends, drawn dashed.
    pub trends: Vec<Trend<'a>>,
    /// Warm-up region shaded grey (from the start of the x axis to this time),
    /// labelled "warm-up".
    pub shade_until: Option<f64>,
}

// Plot geometry (pixels). The legend sits to the right of the plot area.
const PLOT_LEFT: f64 = 72.0;
const PLOT_RIGHT: f64 = 690.0;
const PLOT_TOP: f64 = 62.0;
const PLOT_BOTTOM: f64 = 366.0;
const LEGEND_LEFT: f64 = 702.0;
const LEGEND_WIDTH: f64 = 188.0;
const LEGEND_ROW: f64 = 18.0;
const LEGEND_MAX_CHARS: usize = 25;

/// Values beyond this magnitude are clamped so ranges stay finite.
const VALUE_LIMIT: f64 = 1e300;
/// Pixel coordinates are clamped to this magnitude (lines are clipped anyway).
const PIXEL_LIMIT: f64 = 1e5;

const PALETTE: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
const CLIP_ID: &str = "kvrail-chart-plot";

/// Renders `chart` as a complete standalone SVG document.
pub fn render(chart: &Chart<'_>) -> String {
    let series: Vec<Vec<(f64, f64)>> = chart.series.iter().map(|s| prepare_points(&s.points)).collect();
    let trends: Vec<&Trend<'_>> = chart.trends.iter().filter(|t| [t.t0, t.y0, t.t1, t.y1].iter().all(|v| v.is_finite())).collect();
    let has_samples = series.iter().any(|pts| !pts.is_empty());

    let mut out = String::with_capacity(16 * 1024);
    out.push_str(&format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
         font-family=\"Helvetica, Arial, sans-serif\">\n"
    ));
    out.push_str(&format!("<title>{}</title>\n", escape(chart.title)));
    out.push_str(&format!("<rect x=\"0\" y=\"0\" width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"#ffffff\"/>\n"));
    out.push_str(&format!(
        "<defs><clipPath id=\"{CLIP_ID}\"><rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\"/></clipPath></defs>\n",
        num(PLOT_LEFT),
        num(PLOT_TOP),
        num(PLOT_RIGHT - PLOT_LEFT),
        num(PLOT_BOTTOM - PLOT_TOP)
    ));

    // Title and subtitle.
    out.push_str(&format!(
        "<text x=\"{}\" y=\"24\" font-size=\"16\" font-weight=\"bold\" fill=\"#222222\">{}</text>\n",
        num(PLOT_LEFT),
        escape(chart.title)
    ));
    if !chart.subtitle.is_empty() {
        out.push_str(&format!(
            "<text x=\"{}\" y=\"43\" font-size=\"12\" fill=\"#666666\">{}</text>\n",
            num(PLOT_LEFT),
            escape(chart.subtitle)
        ));
    }

    // Axis titles.
    out.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\" fill=\"#333333\">time (s)</text>\n",
        num((PLOT_LEFT + PLOT_RIGHT) / 2.0),
        num(f64::from(HEIGHT) - 12.0)
    ));
    let y_mid = (PLOT_TOP + PLOT_BOTTOM) / 2.0;
    out.push_str(&format!(
        "<text x=\"18\" y=\"{y}\" font-size=\"12\" text-anchor=\"middle\" fill=\"#333333\" transform=\"rotate(-90 18 {y})\">MiB</text>\n",
        y = num(y_mid)
    ));

    if let Some((x_axis, y_axis)) = axes(&series, &trends) {
        let map = Mapping { x: &x_axis, y: &y_axis };
        draw_warmup(&mut out, &map, chart.shade_until);
        draw_grid(&mut out, &map);
        draw_frame(&mut out);
        out.push_str(&format!("<g clip-path=\"url(#{CLIP_ID})\" fill=\"none\" stroke-linejoin=\"round\" stroke-linecap=\"round\">\n"));
        for (i, (s, pts)) in chart.series.iter().zip(&series).enumerate() {
            draw_series(&mut out, &map, pts, color_or_default(s.color, i));
        }
        for (i, t) in trends.iter().enumerate() {
            draw_trend_line(&mut out, &map, t, color_or_default(t.color, chart.series.len() + i));
        }
        out.push_str("</g>\n");
        for (i, t) in trends.iter().enumerate() {
            draw_trend_label(&mut out, &map, t, color_or_default(t.color, chart.series.len() + i));
        }
    } else {
        draw_frame(&mut out);
    }

    if !has_samples {
        out.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" font-size=\"14\" text-anchor=\"middle\" fill=\"#888888\">no samples</text>\n",
            num((PLOT_LEFT + PLOT_RIGHT) / 2.0),
            num(y_mid)
        ));
    }

    draw_legend(&mut out, chart, &series, &trends);
    out.push_str("</svg>\n");
    out
}

/// A linear axis: its visible range and the tick values inside it.
#[derive(Debug, Clone, PartialEq)]
struct Axis {
    lo: f64,
    hi: f64,
    step: f64,
    /// The step is `mantissa × 10^exp` with mantissa 1, 2 or 5.
    exp: i32,
    ticks: Vec<f64>,
}

impl Axis {
    /// Formats a tick value with just enough decimals for the step.
    fn label(&self, v: f64) -> String {
        let big = self.ticks.iter().fold(0.0_f64, |m, t| m.max(t.abs()));
        let s = if big >= 1e9 {
            let s = format!("{v:.3e}");
            match s.split_once('e') {
                Some((mant, e)) if mant.contains('.') => format!("{}e{e}", mant.trim_end_matches('0').trim_end_matches('.')),
                _ => s,
            }
        } else {
            let decimals = usize::try_from(-self.exp).unwrap_or(0).min(12);
            format!("{v:.decimals$}")
        };
        // Never print "-0" / "-0.0".
        if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
            s[1..].to_string()
        } else {
            s
        }
    }
}

/// Pixel mapping from data space into the plot area.
struct Mapping<'a> {
    x: &'a Axis,
    y: &'a Axis,
}

impl Mapping<'_> {
    fn px(&self, t: f64) -> f64 {
        clamp_pixel(PLOT_LEFT + (t - self.x.lo) / (self.x.hi - self.x.lo) * (PLOT_RIGHT - PLOT_LEFT))
    }

    fn py(&self, v: f64) -> f64 {
        clamp_pixel(PLOT_BOTTOM - (v - self.y.lo) / (self.y.hi - self.y.lo) * (PLOT_BOTTOM - PLOT_TOP))
    }
}

fn clamp_pixel(p: f64) -> f64 {
    if p.is_finite() {
        p.clamp(-PIXEL_LIMIT, PIXEL_LIMIT)
    } else {
        0.0
    }
}

/// Drops non-finite samples, clamps extreme values, sorts by time and
/// downsamples long series.
fn prepare_points(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut pts: Vec<(f64, f64)> = points
        .iter()
        .filter(|(t, v)| t.is_finite() && v.is_finite())
        .map(|&(t, v)| (t.clamp(-VALUE_LIMIT, VALUE_LIMIT), v.clamp(-VALUE_LIMIT, VALUE_LIMIT)))
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    downsample(&pts, MAX_POLYLINE_POINTS)
}

/// Reduces `points` to at most `max_points` (minimum 4): keeps the first and
/// last point and, for each bucket of the points in between, its minimum and
/// maximum value in their original order, so spikes survive.
fn downsample(points: &[(f64, f64)], max_points: usize) -> Vec<(f64, f64)> {
    let max_points = max_points.max(4);
    let n = points.len();
    if n <= max_points {
        return points.to_vec();
    }
    let inner = &points[1..n - 1];
    let buckets = (max_points - 2) / 2;
    let mut out = Vec::with_capacity(max_points);
    out.push(points[0]);
    for b in 0..buckets {
        let start = b * inner.len() / buckets;
        let end = (b + 1) * inner.len() / buckets;
        let Some(bucket) = inner.get(start..end).filter(|s| !s.is_empty()) else { continue };
        let (mut lo, mut hi) = (0, 0);
        for (i, p) in bucket.iter().enumerate() {
            if p.1 < bucket[lo].1 {
                lo = i;
            }
            if p.1 > bucket[hi].1 {
                hi = i;
            }
        }
        let (first, second) = if lo <= hi { (lo, hi) } else { (hi, lo) };
        out.push(bucket[first]);
        if second != first {
            out.push(bucket[second]);
        }
    }
    out.push(points[n - 1]);
    out
}

/// Computes both axes, or `None` when there is nothing to draw.
fn axes(series: &[Vec<(f64, f64)>], trends: &[&Trend<'_>]) -> Option<(Axis, Axis)> {
    let mut t_range: Option<(f64, f64)> = None;
    let mut v_range: Option<(f64, f64)> = None;
    let mut add = |t: f64, v: f64| {
        let (t, v) = (t.clamp(-VALUE_LIMIT, VALUE_LIMIT), v.clamp(-VALUE_LIMIT, VALUE_LIMIT));
        t_range = Some(t_range.map_or((t, t), |(a, b)| (a.min(t), b.max(t))));
        v_range = Some(v_range.map_or((v, v), |(a, b)| (a.min(v), b.max(v))));
    };
    for &(t, v) in series.iter().flatten() {
        add(t, v);
    }
    for tr in trends {
        add(tr.t0, tr.y0);
        add(tr.t1, tr.y1);
    }
    let ((t_min, t_max), (v_min, v_max)) = (t_range?, v_range?);

    // x: start at 0 for elapsed-time data, at the first sample otherwise.
    let x_lo = if t_min >= 0.0 && t_min <= t_max - t_min { 0.0 } else { t_min };
    let x_hi = t_max;
    let (x_lo, x_hi) = if is_degenerate(x_lo, x_hi) { (x_lo, x_lo + 1f64.max(x_lo.abs() * 1e-6)) } else { (x_lo, x_hi) };

    // y: data range with 5% padding; a flat range becomes ±1 MiB.
    let (y_lo, y_hi) = if is_degenerate(v_min, v_max) {
        let mid = v_min / 2.0 + v_max / 2.0;
        let half = 1f64.max(mid.abs() * 1e-6);
        (mid - half, mid + half)
    } else {
        let pad = (v_max / 2.0 - v_min / 2.0) * 0.1;
        (v_min - pad, v_max + pad)
    };
    Some((nice_axis(x_lo, x_hi), nice_axis(y_lo, y_hi)))
}

/// True when `[lo, hi]` is too narrow (relative to its magnitude) to plot.
fn is_degenerate(lo: f64, hi: f64) -> bool {
    let span = hi / 2.0 - lo / 2.0;
    let mag = lo.abs().max(hi.abs());
    !(span.is_finite() && span > 0.0 && span > mag * 1e-9)
}

/// Picks 5–8 "nice" ticks (steps of 1, 2 or 5 × 10^k) for `[lo, hi]`.
///
/// Ticks are placed inside the range when possible; otherwise the range is
/// widened to the outermost ticks. The returned axis always covers `[lo, hi]`.
fn nice_axis(lo: f64, hi: f64) -> Axis {
    let (lo, hi) = if !lo.is_finite() || !hi.is_finite() {
        (0.0, 1.0)
    } else {
        let (lo, hi) = (lo.clamp(-VALUE_LIMIT, VALUE_LIMIT), hi.clamp(-VALUE_LIMIT, VALUE_LIMIT));
        let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
        if is_degenerate(lo, hi) {
            let half = 1f64.max(lo.abs().max(hi.abs()) * 1e-6);
            (lo - half, hi + half)
        } else {
            (lo, hi)
        }
    };
    let span = hi - lo;
    let base = span.log10().floor() as i32;
    const EPS: f64 = 1e-9;

    // (prefer inner ticks, distance from 6 ticks, prefer larger step) -> axis
    let mut best: Option<((u8, u32, i32), Axis)> = None;
    for exp in (base - 2)..=(base + 1) {
        for (mi, mant) in [1.0, 2.0, 5.0].into_iter().enumerate() {
            let step = mant * 10f64.powi(exp);
            if !(step.is_finite() && step > 0.0) {
                continue;
            }
            let (l, h) = (lo / step, hi / step);
            let inner = ((l - EPS).ceil(), (h + EPS).floor());
            let outer = ((l + EPS).floor(), (h - EPS).ceil());
            for (kind, (a, b)) in [(0u8, inner), (1u8, outer)] {
                let count = b - a + 1.0;
                if !(5.0..=8.0).contains(&count) {
                    continue;
                }
                let (a, b) = (a as i64, b as i64);
                let ticks: Vec<f64> = (a..=b).map(|i| i as f64 * step).collect();
                let (axis_lo, axis_hi) = (lo.min(ticks[0]), hi.max(ticks[ticks.len() - 1]));
                let key = (kind, (count as i64 - 6).unsigned_abs() as u32, -(exp * 3 + mi as i32));
                if best.as_ref().is_none_or(|(k, _)| key < *k) {
                    best = Some((key, Axis { lo: axis_lo, hi: axis_hi, step, exp, ticks }));
                }
            }
        }
    }
    best.map(|(_, axis)| axis).unwrap_or_else(|| {
        // Not reachable for sane input; fall back to the bare ends.
        Axis { lo, hi, step: span, exp: base, ticks: vec![lo, hi] }
    })
}

fn draw_warmup(out: &mut String, map: &Mapping<'_>, shade_until: Option<f64>) {
    let Some(until) = shade_until.filter(|u| u.is_finite() && *u > map.x.lo) else { return };
    let x_end = map.px(until.min(map.x.hi));
    let width = x_end - PLOT_LEFT;
    if width <= 0.0 {
        return;
    }
    out.push_str(&format!(
        "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"#9e9e9e\" fill-opacity=\"0.18\"/>\n",
        num(PLOT_LEFT),
        num(PLOT_TOP),
        num(width),
        num(PLOT_BOTTOM - PLOT_TOP)
    ));
    out.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"#666666\">warm-up</text>\n",
        num(PLOT_LEFT + 4.0),
        num(PLOT_TOP + 14.0)
    ));
}

fn draw_grid(out: &mut String, map: &Mapping<'_>) {
    out.push_str("<g stroke=\"#e4e4e4\" stroke-width=\"1\">\n");
    for &t in &map.x.ticks {
        let x = num(map.px(t));
        out.push_str(&format!("<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\"/>\n", num(PLOT_TOP), num(PLOT_BOTTOM)));
    }
    for &v in &map.y.ticks {
        let y = num(map.py(v));
        out.push_str(&format!("<line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\"/>\n", num(PLOT_LEFT), num(PLOT_RIGHT)));
    }
    out.push_str("</g>\n");

    out.push_str("<g font-size=\"11\" fill=\"#444444\">\n");
    for &t in &map.x.ticks {
        out.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            num(map.px(t)),
            num(PLOT_BOTTOM + 16.0),
            escape(&map.x.label(t))
        ));
    }
    for &v in &map.y.ticks {
        out.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
            num(PLOT_LEFT - 6.0),
            num(map.py(v) + 4.0),
            escape(&map.y.label(v))
        ));
    }
    out.push_str("</g>\n");
}

fn draw_frame(out: &mut String) {
    out.push_str(&format!(
        "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#888888\" stroke-width=\"1\"/>\n",
        num(PLOT_LEFT),
        num(PLOT_TOP),
        num(PLOT_RIGHT - PLOT_LEFT),
        num(PLOT_BOTTOM - PLOT_TOP)
    ));
}

fn draw_series(out: &mut String, map: &Mapping<'_>, pts: &[(f64, f64)], color: &str) {
    if pts.is_empty() {
        return;
    }
    let mut coords = String::with_capacity(pts.len() * 14);
    for (i, &(t, v)) in pts.iter().enumerate() {
        if i > 0 {
            coords.push(' ');
        }
        coords.push_str(&num(map.px(t)));
        coords.push(',');
        coords.push_str(&num(map.py(v)));
    }
    let color = escape(color);
    out.push_str(&format!("<polyline points=\"{coords}\" stroke=\"{color}\" stroke-width=\"1.8\"/>\n"));
    if let [(t, v)] = pts {
        // A single sample draws no visible line; mark it.
        out.push_str(&format!("<circle cx=\"{}\" cy=\"{}\" r=\"3\" fill=\"{color}\"/>\n", num(map.px(*t)), num(map.py(*v))));
    }
}

fn draw_trend_line(out: &mut String, map: &Mapping<'_>, t: &Trend<'_>, color: &str) {
    out.push_str(&format!(
        "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{}\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"/>\n",
        num(map.px(t.t0)),
        num(map.py(t.y0)),
        num(map.px(t.t1)),
        num(map.py(t.y1)),
        escape(color)
    ));
}

fn draw_trend_label(out: &mut String, map: &Mapping<'_>, t: &Trend<'_>, color: &str) {
    if t.label.is_empty() {
        return;
    }
    let (t_end, y_end) = if t.t1 >= t.t0 { (t.t1, t.y1) } else { (t.t0, t.y0) };
    let x = map.px(t_end).clamp(PLOT_LEFT + 4.0, PLOT_RIGHT - 4.0);
    let y = (map.py(y_end) - 6.0).clamp(PLOT_TOP + 12.0, PLOT_BOTTOM - 4.0);
    out.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\" fill=\"{}\">{}</text>\n",
        num(x),
        num(y),
        escape(color),
        escape(&truncate(t.label, 40))
    ));
}

fn draw_legend(out: &mut String, chart: &Chart<'_>, series: &[Vec<(f64, f64)>], trends: &[&Trend<'_>]) {
    // (text, colour, dashed)
    let mut rows: Vec<(String, &str, bool)> = Vec::new();
    for (i, (s, pts)) in chart.series.iter().zip(series).enumerate() {
        let name = if pts.is_empty() { format!("{} (no samples)", s.name) } else { s.name.to_string() };
        rows.push((name, color_or_default(s.color, i), false));
    }
    for (i, t) in trends.iter().enumerate() {
        rows.push((t.label.to_string(), color_or_default(t.color, chart.series.len() + i), true));
    }
    if rows.is_empty() {
        return;
    }
    let max_rows = (((PLOT_BOTTOM - PLOT_TOP - 10.0) / LEGEND_ROW).floor() as usize).max(1);
    if rows.len() > max_rows {
        let hidden = rows.len() - (max_rows - 1);
        rows.truncate(max_rows - 1);
        rows.push((format!("+{hidden} more"), "#888888", false));
    }
    let height = 10.0 + rows.len() as f64 * LEGEND_ROW;
    out.push_str(&format!(
        "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"#ffffff\" stroke=\"#cccccc\" rx=\"3\"/>\n",
        num(LEGEND_LEFT),
        num(PLOT_TOP),
        num(LEGEND_WIDTH),
        num(height)
    ));
    out.push_str("<g font-size=\"11\" fill=\"#222222\">\n");
    for (i, (text, color, dashed)) in rows.iter().enumerate() {
        let y = PLOT_TOP + 5.0 + LEGEND_ROW * (i as f64 + 0.5);
        let dash = if *dashed { " stroke-dasharray=\"4 3\"" } else { "" };
        out.push_str(&format!(
            "<line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"{}\" stroke-width=\"2\"{dash}/>\n",
            num(LEGEND_LEFT + 8.0),
            num(LEGEND_LEFT + 30.0),
            escape(color),
            y = num(y)
        ));
        out.push_str(&format!(
            "<text x=\"{}\" y=\"{}\">{}</text>\n",
            num(LEGEND_LEFT + 36.0),
            num(y + 4.0),
            escape(&truncate(text, LEGEND_MAX_CHARS))
        ));
    }
    out.push_str("</g>\n");
}

fn color_or_default(color: &str, index: usize) -> &str {
    if color.trim().is_empty() {
        PALETTE[index % PALETTE.len()]
    } else {
        color
    }
}

/// Shortens `s` to at most `max` characters, ending with "…" when cut.
fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Formats a pixel coordinate with one decimal; never emits NaN or inf.
fn num(v: f64) -> String {
    let v = clamp_pixel(v);
    let s = format!("{v:.1}");
    let s = s.strip_suffix(".0").map_or(s.clone(), str::to_string);
    if s == "-0" {
        "0".to_string()
    } else {
        s
    }
}

/// XML-escapes text for element content and attribute values, dropping
/// characters that are not allowed in XML 1.0 at all.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\t' | '\n' | '\r' => out.push(' '),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minimal XML well-formedness check: balanced tags, quoted attributes,
    /// a single root, and only known entities.
    fn check_well_formed(doc: &str) -> Result<(), String> {
        let bytes = doc.as_bytes();
        let mut stack: Vec<String> = Vec::new();
        let mut roots = 0;
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'<' => {
                    let rest = &doc[i..];
                    if rest.starts_with("<!--") {
                        let end = rest.find("-->").ok_or("unterminated comment")?;
                        i += end + 3;
                        continue;
                    }
                    // Find the closing '>' outside quotes.
                    let mut j = i + 1;
                    let mut quote: Option<u8> = None;
                    loop {
                        let c = *bytes.get(j).ok_or_else(|| format!("unterminated tag at {i}"))?;
                        match (quote, c) {
                            (None, b'"' | b'\'') => quote = Some(c),
                            (Some(q), c) if c == q => quote = None,
                            (Some(_), b'<') => return Err(format!("raw '<' in attribute at {j}")),
                            (None, b'<') => return Err(format!("'<' inside tag at {j}")),
                            (None, b'>') => break,
                            _ => {}
                        }
                        j += 1;
                    }
                    let inner = &doc[i + 1..j];
                    check_entities(inner)?;
                    if let Some(name) = inner.strip_prefix('/') {
                        let name = name.trim();
                        let open = stack.pop().ok_or_else(|| format!("unexpected </{name}>"))?;
                        if open != name {
                            return Err(format!("</{name}> closes <{open}>"));
                        }
                    } else {
                        let self_closing = inner.ends_with('/');
                        let name: String = inner.chars().take_while(|c| !c.is_whitespace() && *c != '/').collect();
                        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':') {
                            return Err(format!("bad tag name {name:?}"));
                        }
                        if stack.is_empty() {
                            roots += 1;
                        }
                        if !self_closing {
                            stack.push(name);
                        }
                    }
                    i = j + 1;
                }
                b'>' => return Err(format!("raw '>' in text at {i}")),
                _ => {
                    let end = doc[i..].find(['<', '>']).map_or(doc.len(), |e| i + e);
                    let text = &doc[i..end];
                    if stack.is_empty() && !text.trim().is_empty() {
                        return Err(format!("text outside root: {text:?}"));
                    }
                    check_entities(text)?;
                    i = end;
                }
            }
        }
        if !stack.is_empty() {
            return Err(format!("unclosed tags: {stack:?}"));
        }
        if roots != 1 {
            return Err(format!("{roots} root elements"));
        }
        Ok(())
    }

    fn check_entities(s: &str) -> Result<(), String> {
        for (pos, _) in s.match_indices('&') {
            let rest = &s[pos..];
            let ok = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;", "&#"].iter().any(|e| rest.starts_with(e));
            if !ok {
                return Err(format!("bad entity near {:?}", &rest[..rest.len().min(10)]));
            }
        }
        Ok(())
    }

    fn assert_valid(svg: &str) {
        let trimmed = svg.trim();
        assert!(trimmed.starts_with("<svg"), "starts with: {:?}", &trimmed[..trimmed.len().min(40)]);
        assert!(trimmed.ends_with("</svg>"));
        if let Err(e) = check_well_formed(svg) {
            panic!("not well-formed: {e}\n{svg}");
        }
        for bad in ["NaN", "inf"] {
            assert!(!svg.contains(bad), "output contains {bad}");
        }
    }

    /// The `points` attribute of every polyline, parsed.
    fn polylines(svg: &str) -> Vec<Vec<(f64, f64)>> {
        svg.match_indices("<polyline points=\"")
            .map(|(pos, m)| {
                let rest = &svg[pos + m.len()..];
                let attr = &rest[..rest.find('"').expect("closing quote")];
                attr.split_whitespace()
                    .map(|p| {
                        let (x, y) = p.split_once(',').expect("x,y");
                        (x.parse().expect("x"), y.parse().expect("y"))
                    })
                    .collect()
            })
            .collect()
    }

    fn series<'a>(name: &'a str, color: &'a str, points: Vec<(f64, f64)>) -> Series<'a> {
        Series { name, color, points }
    }

    fn chart<'a>(series: Vec<Series<'a>>, trends: Vec<Trend<'a>>) -> Chart<'a> {
        Chart { title: "RSS over time", subtitle: "decode agent, 60 s", series, trends, shade_until: None }
    }

    fn ramp(n: usize, slope: f64) -> Vec<(f64, f64)> {
        (0..n).map(|i| (i as f64 * 0.5, 100.0 + slope * i as f64)).collect()
    }

    #[test]
    fn checker_rejects_malformed_documents() {
        assert!(check_well_formed("<svg><g></svg>").is_err());
        assert!(check_well_formed("<svg><g></g>").is_err());
        assert!(check_well_formed("<svg></svg><svg></svg>").is_err());
        assert!(check_well_formed("<svg><text>a < b</text></svg>").is_err());
        assert!(check_well_formed("<svg><text>a & b</text></svg>").is_err());
        assert!(check_well_formed("<svg a=\"x>y\"></svg>").is_ok());
        assert!(check_well_formed("<svg><rect x=\"1\"/><text>a &amp; b</text></svg>").is_ok());
    }

    #[test]
    fn renders_complete_document_with_one_polyline_per_nonempty_series() {
        let mut c = chart(
            vec![series("prefill", "#1f77b4", ramp(50, 0.2)), series("decode", "", ramp(80, -0.1)), series("idle", "green", vec![])],
            vec![Trend { label: "fit +0.4 MiB/s", color: "#000", t0: 0.0, y0: 100.0, t1: 40.0, y1: 116.0 }],
        );
        c.shade_until = Some(5.0);
        let svg = render(&c);
        assert_valid(&svg);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("width=\"900\"") && svg.contains("height=\"420\""));
        assert!(svg.contains("time (s)") && svg.contains(">MiB<"));
        assert!(svg.contains("RSS over time") && svg.contains("decode agent, 60 s"));
        assert!(svg.contains("stroke-dasharray"), "trend is dashed");
        assert!(svg.contains("warm-up"));
        assert!(svg.contains("fit +0.4 MiB/s") && svg.contains("idle (no samples)"));
        assert!(svg.contains("stroke=\"#1f77b4\""));
        assert!(!svg.contains(">no samples<"), "chart has samples, so no centre note");
        // All polyline points lie inside the plot area.
        for line in polylines(&svg) {
            for (x, y) in line {
                assert!((PLOT_LEFT - 0.1..=PLOT_RIGHT + 0.1).contains(&x), "x {x}");
                assert!((PLOT_TOP - 0.1..=PLOT_BOTTOM + 0.1).contains(&y), "y {y}");
            }
        }
    }

    #[test]
    fn escapes_all_text() {
        let mut c = chart(vec![series("a<b>&\"c\"", "red\"/><script>", ramp(3, 1.0))], vec![]);
        c.title = "leak <&> check";
        c.subtitle = "it's \"fine\" \u{0}\u{7}";
        let svg = render(&c);
        assert_valid(&svg);
        assert!(svg.contains("leak &lt;&amp;&gt; check"));
        assert!(!svg.contains("<&>"));
        assert!(!svg.contains("<script"));
        assert!(svg.contains("a&lt;b&gt;&amp;&quot;c&quot;"));
        assert!(!svg.contains('\u{0}') && !svg.contains('\u{7}'));
    }

    fn assert_nice(lo: f64, hi: f64) {
        let axis = nice_axis(lo, hi);
        let ctx = format!("[{lo}, {hi}] -> {axis:?}");
        let n = axis.ticks.len();
        assert!((5..=8).contains(&n), "tick count {ctx}");
        assert!(axis.lo <= lo && axis.hi >= hi, "axis covers data {ctx}");
        let mant = axis.step / 10f64.powi(axis.exp);
        assert!([1.0, 2.0, 5.0].iter().any(|m| (mant - m).abs() < 1e-9), "nice step {ctx}");
        let tol = axis.step * 1e-6;
        for (i, &t) in axis.ticks.iter().enumerate() {
            assert!(t >= axis.lo - tol && t <= axis.hi + tol, "tick inside axis {ctx}");
            let k = t / axis.step;
            assert!((k - k.round()).abs() < 1e-6, "tick is a multiple of the step {ctx}");
            if i > 0 {
                assert!((t - axis.ticks[i - 1] - axis.step).abs() < tol, "even spacing {ctx}");
            }
        }
        // The ticks span the axis: no gap of a whole step at either end.
        assert!(axis.ticks[0] - axis.lo < axis.step + tol, "low end covered {ctx}");
        assert!(axis.hi - axis.ticks[n - 1] < axis.step + tol, "high end covered {ctx}");
    }

    #[test]
    fn nice_ticks_cover_the_range() {
        let axis = nice_axis(0.0, 100.0);
        assert_eq!(axis.ticks, vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        assert_eq!(axis.label(40.0), "40");
        let axis = nice_axis(0.0, 1.0);
        assert_eq!(axis.label(axis.ticks[1]), "0.2");

        let fixed = [
            (0.0, 1.0),
            (0.0, 15.0),
            (0.1, 24.6),
            (-0.1, 20.1),
            (0.0, 0.3),
            (-5.0, 5.0),
            (1e6, 1e6 + 3.0),
            (1234.5, 1290.25),
            (-1e300, 1e300),
            (1e-7, 3e-7),
            (99.0, 101.0),
        ];
        for (lo, hi) in fixed {
            assert_nice(lo, hi);
        }
        // Pseudo-random sweep over magnitudes and alignments.
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        for _ in 0..20_000 {
            let scale = 10f64.powf(next() * 12.0 - 4.0);
            let lo = (next() - 0.3) * scale * 3.0;
            let span = scale * (0.01 + next() * 10.0);
            assert_nice(lo, lo + span);
            // Also spans that are exact multiples of nice numbers.
            let aligned = (next() * 40.0).floor() + 1.0;
            assert_nice(0.0, aligned * scale);
        }
    }

    #[test]
    fn flat_series_gets_a_nonzero_range() {
        let svg = render(&chart(vec![series("flat", "blue", (0..20).map(|i| (i as f64, 512.0)).collect())], vec![]));
        assert_valid(&svg);
        assert_eq!(svg.matches("<polyline").count(), 1);
        let ys: Vec<f64> = polylines(&svg)[0].iter().map(|p| p.1).collect();
        assert!(ys.iter().all(|&y| (y - ys[0]).abs() < 1e-9));
        assert!(ys[0] > PLOT_TOP && ys[0] < PLOT_BOTTOM, "flat line drawn mid-plot");
        assert!(svg.contains(">512<") || svg.contains(">512.0<"), "a tick at the value");

        // A single point at t = 0 (flat in both axes).
        let svg = render(&chart(vec![series("one", "", vec![(0.0, 0.0)])], vec![]));
        assert_valid(&svg);
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.contains("<circle"));
    }

    #[test]
    fn non_finite_points_are_dropped() {
        let pts = vec![
            (0.0, 10.0),
            (f64::NAN, 11.0),
            (1.0, f64::NAN),
            (2.0, f64::INFINITY),
            (f64::NEG_INFINITY, 3.0),
            (3.0, 12.0),
            (4.0, f64::NEG_INFINITY),
            (5.0, 13.0),
        ];
        let trends = vec![
            Trend { label: "bad", color: "", t0: f64::NAN, y0: 0.0, t1: 1.0, y1: 1.0 },
            Trend { label: "good", color: "", t0: 0.0, y0: 10.0, t1: 5.0, y1: 13.0 },
        ];
        let svg = render(&chart(vec![series("s", "red", pts)], trends));
        assert_valid(&svg);
        let lines = polylines(&svg);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), 3);
        assert!(svg.contains("good") && !svg.contains(">bad<"));
        assert_eq!(svg.matches("stroke-dasharray=\"6 4\"").count(), 1);

        // Extreme but finite values must not overflow into inf/NaN either.
        let svg = render(&chart(vec![series("huge", "", vec![(0.0, f64::MAX), (1.0, -f64::MAX), (f64::MAX, 0.0)])], vec![]));
        assert_valid(&svg);
        assert_eq!(polylines(&svg).len(), 1);
    }

    #[test]
    fn empty_charts_still_render() {
        let svg = render(&chart(vec![], vec![]));
        assert_valid(&svg);
        assert!(svg.contains("no samples"));
        assert_eq!(svg.matches("<polyline").count(), 0);

        let mut c = chart(vec![series("a", "", vec![]), series("b", "", vec![(f64::NAN, f64::NAN)])], vec![]);
        c.title = "";
        c.subtitle = "";
        c.shade_until = Some(f64::NAN);
        let svg = render(&c);
        assert_valid(&svg);
        assert!(svg.contains("no samples"));
        assert_eq!(svg.matches("<polyline").count(), 0);

        // Trends alone: axes from the trend, no samples note, no panic.
        let svg = render(&chart(vec![], vec![Trend { label: "t", color: "", t0: 0.0, y0: 1.0, t1: 10.0, y1: 1.0 }]));
        assert_valid(&svg);
        assert!(svg.contains("no samples"));
    }

    #[test]
    fn downsampling_bounds_points_and_keeps_extremes() {
        let n = 100_000;
        let mut pts: Vec<(f64, f64)> = (0..n).map(|i| (i as f64, 200.0 + (i as f64 * 0.01).sin())).collect();
        pts[31_337].1 = 5_000.0; // a one-sample spike
        pts[77_777].1 = -50.0; // and a dip
        let out = downsample(&pts, MAX_POLYLINE_POINTS);
        assert!(out.len() <= MAX_POLYLINE_POINTS && out.len() > MAX_POLYLINE_POINTS / 2, "len {}", out.len());
        assert_eq!(out[0], pts[0]);
        assert_eq!(out[out.len() - 1], pts[n - 1]);
        assert!(out.contains(&pts[31_337]) && out.contains(&pts[77_777]));
        assert!(out.windows(2).all(|w| w[0].0 < w[1].0), "order preserved");
        assert_eq!(downsample(&pts[..10], MAX_POLYLINE_POINTS), pts[..10].to_vec());
        for len in [2001, 2002, 2003, 4001, 5000] {
            assert!(downsample(&pts[..len], MAX_POLYLINE_POINTS).len() <= MAX_POLYLINE_POINTS);
        }

        // Through render: the spike is the topmost polyline point.
        let svg = render(&chart(vec![series("long", "", pts)], vec![]));
        assert_valid(&svg);
        let lines = polylines(&svg);
        assert!(lines[0].len() <= MAX_POLYLINE_POINTS);
        let top = lines[0].iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        assert!(top < PLOT_TOP + 0.1 * (PLOT_BOTTOM - PLOT_TOP), "spike reaches the top: {top}");
    }

    #[test]
    fn unsorted_points_and_long_legends() {
        let many: Vec<Series<'_>> =
            (0..30).map(|i| series("a very long series name that will be truncated", "", ramp(5 + i, 1.0))).collect();
        let mut c = chart(many, vec![]);
        c.series[0].points = vec![(3.0, 1.0), (1.0, 2.0), (2.0, 3.0)];
        let svg = render(&c);
        assert_valid(&svg);
        assert_eq!(svg.matches("<polyline").count(), 30);
        assert!(svg.contains("more</text>"));
        assert!(svg.contains('…'));
        let first = &polylines(&svg)[0];
        assert!(first.windows(2).all(|w| w[0].0 <= w[1].0), "sorted by time");
    }

    #[test]
    fn x_axis_starts_at_zero_or_first_sample() {
        let (x, _) = axes(&[vec![(5.0, 1.0), (60.0, 2.0)]], &[]).expect("axes");
        assert_eq!(x.lo, 0.0);
        assert!(x.hi >= 60.0);
        let (x, _) = axes(&[vec![(1.7e9, 1.0), (1.7e9 + 60.0, 2.0)]], &[]).expect("axes");
        assert!(x.lo >= 1.7e9 - 20.0 && x.lo <= 1.7e9, "{x:?}");
        let (_, y) = axes(&[vec![(0.0, 100.0), (1.0, 200.0)]], &[]).expect("axes");
        assert!((y.lo - 95.0).abs() < 1e-9 && (y.hi - 205.0).abs() < 1e-9, "5% padding: {y:?}");
    }
}
