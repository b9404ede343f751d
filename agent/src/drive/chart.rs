//! The soak's memory chart: one or several agents' MemWatch series as a
//! standalone SVG document, drawn with plotters' SVG backend (its `<text>`
//! elements leave fonts to the viewer, so no font library is linked).
//!
//! [`memory_chart`] draws, in MiB over each agent's own seconds since start:
//! with one agent its RSS, RssAnon and heap; with several, each agent's RSS
//! in a colour of its own. Every agent's fitted RSS line over its last window
//! is drawn dashed from MemWatch's own fit (the assessment's slope and
//! intercept, never a second fit here), the warm-up is shaded, and the
//! subtitle gives each agent's verdict, slope, window, threshold and heap
//! slope. Odd input never panics: samples at a non-finite time are dropped,
//! a missing heap value breaks the heap line, a flat range gets ±1 MiB, and
//! a report without samples still gives a chart that says "no samples".

use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::memwatch::sample::Sample;
use crate::memwatch::trend::BYTES_PER_SEC_TO_MIB_PER_MIN;
use crate::memwatch::MemReport;

/// Width of the chart, in pixels.
pub const WIDTH: u32 = 960;
/// Height of the plot, axes and legend; the header above grows by a line per agent.
const BODY_HEIGHT: u32 = 420;
const LEGEND_WIDTH: u32 = 230;
/// Agents listed in the subtitle; the rest are summed up in one more line.
const MAX_SUBTITLE_LINES: usize = 6;
const LEGEND_MAX_CHARS: usize = 28;

const MIB: f64 = (1u64 << 20) as f64;
const FONT: &str = "sans-serif";
const TEXT: RGBColor = RGBColor(0x22, 0x22, 0x22);
const MUTED: RGBColor = RGBColor(0x66, 0x66, 0x66);
/// The warm-up's shade.
const SHADE: RGBAColor = RGBAColor(0x9e, 0x9e, 0x9e, 0.18);
/// The tab10 palette: distinct on screen and in print.
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];
const TAB_BLUE: RGBColor = PALETTE[0];
const TAB_RED: RGBColor = PALETTE[1];
const TAB_GREEN: RGBColor = PALETTE[2];
const TAB_ORANGE: RGBColor = PALETTE[3];

/// Draws the memory of `agents` (label, MemWatch report) on one chart and
/// returns the SVG document.
pub fn memory_chart(title: &str, agents: &[(&str, &MemReport)]) -> String {
    let plan = Plan::new(title, agents);
    let mut svg = String::new();
    let drawn = draw(&plan, SVGBackend::with_string(&mut svg, (WIDTH, plan.height())).into_drawing_area());
    match drawn {
        Ok(()) => svg,
        Err(e) => {
            tracing::warn!(error = %e, "memory chart could not be drawn");
            error_chart(&plan.title, &e.to_string())
        }
    }
}

/// One legend entry and what it draws: (seconds, MiB) runs, each a line.
#[derive(Debug, Clone, PartialEq)]
struct Line {
    name: String,
    color: RGBColor,
    /// A fitted line (dashed) rather than measured samples.
    fit: bool,
    runs: Vec<Vec<(f64, f64)>>,
}

impl Line {
    fn points(&self) -> impl Iterator<Item = &(f64, f64)> {
        self.runs.iter().flatten()
    }
}

/// Everything [`draw`] needs, worked out from the reports.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    title: String,
    subtitle: Vec<String>,
    lines: Vec<Line>,
    /// Shade `[x.0, warmup]` when set.
    warmup: Option<f64>,
    x: (f64, f64),
    y: (f64, f64),
}

impl Plan {
    fn new(title: &str, agents: &[(&str, &MemReport)]) -> Plan {
        let single = agents.len() == 1;
        let mut lines = Vec::new();
        for (i, &(label, report)) in agents.iter().enumerate() {
            let label = clean(label);
            // Alone, the fit is red on a blue RSS; among several agents it is a
            // darker shade of the agent's colour, so it stands out on its own line.
            let (prefix, rss_color, fit_color) = if single {
                (String::new(), TAB_BLUE, TAB_RED)
            } else {
                let c = PALETTE[i % PALETTE.len()];
                (format!("{label} "), c, darker(c))
            };
            lines.push(sampled(format!("{prefix}RSS"), rss_color, &report.samples, |s| Some(s.vm_rss)));
            if single {
                lines.push(sampled("RssAnon".into(), TAB_ORANGE, &report.samples, |s| Some(s.rss_anon)));
                lines.push(sampled("heap".into(), TAB_GREEN, &report.samples, |s| s.heap));
            }
            if let Some(fit) = fit_line(report) {
                lines.push(Line { name: format!("{prefix}RSS fit"), color: fit_color, fit: true, runs: vec![fit.to_vec()] });
            }
        }
        let mut subtitle: Vec<String> = agents
            .iter()
            .map(|&(label, r)| if single { verdict_line(r) } else { format!("{}: {}", clean(label), verdict_line(r)) })
            .collect();
        if subtitle.len() > MAX_SUBTITLE_LINES {
            let more = subtitle.len() - (MAX_SUBTITLE_LINES - 1);
            subtitle.truncate(MAX_SUBTITLE_LINES - 1);
            subtitle.push(format!("… and {more} more agents (see the report)"));
        }
        let warmup = agents.iter().map(|(_, r)| r.config.trend.warmup_secs).filter(|w| w.is_finite() && *w > 0.0).reduce(f64::max);
        let (x, y) = ranges(&lines);
        Plan { title: clean(title), subtitle, lines, warmup, x, y }
    }

    fn header_height(&self) -> u32 {
        // Title, then one 17 px row per subtitle line.
        40 + 17 * self.subtitle.len() as u32
    }

    fn height(&self) -> u32 {
        self.header_height() + BODY_HEIGHT
    }

    fn has_samples(&self) -> bool {
        self.lines.iter().any(|l| !l.fit && l.points().next().is_some())
    }
}

/// `c` at 60% of its brightness.
fn darker(c: RGBColor) -> RGBColor {
    let d = |v: u8| (u16::from(v) * 3 / 5) as u8;
    RGBColor(d(c.0), d(c.1), d(c.2))
}

/// One measured series in MiB; a sample without a value (no heap figure)
/// ends a run, and samples at a non-finite time are dropped.
fn sampled(name: String, color: RGBColor, samples: &[Sample], value: fn(&Sample) -> Option<u64>) -> Line {
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for s in samples.iter().filter(|s| s.t_secs.is_finite()) {
        match value(s) {
            Some(v) => runs.last_mut().expect("never empty").push((s.t_secs, v as f64 / MIB)),
            None if runs.last().is_some_and(|r| !r.is_empty()) => runs.push(Vec::new()),
            None => {}
        }
    }
    runs.retain(|r| !r.is_empty());
    let name = if runs.is_empty() { format!("{name} (no samples)") } else { name };
    Line { name, color, fit: false, runs }
}

/// The RSS line MemWatch fitted over its last window, in (seconds, MiB), from
/// the assessment's slope and intercept; the window ends at the newest sample.
fn fit_line(r: &MemReport) -> Option<[(f64, f64); 2]> {
    let a = &r.assessment;
    let intercept = a.rss_intercept_bytes.filter(|_| a.samples_in_window > 1)?;
    let t1 = r.latest.as_ref().or(r.samples.last())?.t_secs;
    let t0 = t1 - a.window_secs;
    let bytes_per_sec = a.rss_slope_mib_per_min / BYTES_PER_SEC_TO_MIB_PER_MIN;
    let at = |t: f64| (t, (intercept + bytes_per_sec * t) / MIB);
    let line = [at(t0), at(t1)];
    line.iter().all(|(t, v)| t.is_finite() && v.is_finite()).then_some(line)
}

fn verdict_line(r: &MemReport) -> String {
    let a = &r.assessment;
    format!(
        "verdict {} — RSS slope {} MiB/min over {} s (threshold {}), heap slope {}",
        a.verdict.as_str(),
        fixed(a.rss_slope_mib_per_min, 3),
        fixed(a.window_secs, 0),
        fixed(a.threshold_mib_per_min, 2),
        a.heap_slope_mib_per_min.map_or("n/a".into(), |h| format!("{} MiB/min", fixed(h, 3)))
    )
}

/// `v` with `decimals` decimals, or "n/a" when it is not a number.
fn fixed(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "n/a".into()
    }
}

/// The axes' spans: x from 0 (or from the first sample, for data far from 0)
/// to the last sample; y over every value with 5% padding, ±1 MiB when flat.
fn ranges(lines: &[Line]) -> ((f64, f64), (f64, f64)) {
    let span = |vals: &mut dyn Iterator<Item = f64>| {
        vals.fold(None, |r: Option<(f64, f64)>, v| Some(r.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v)))))
    };
    let Some((t_min, t_max)) = span(&mut lines.iter().flat_map(Line::points).map(|p| p.0)) else {
        return ((0.0, 1.0), (0.0, 1.0));
    };
    let (v_min, v_max) = span(&mut lines.iter().flat_map(Line::points).map(|p| p.1)).unwrap_or((0.0, 1.0));
    let x_lo = if t_min >= 0.0 && t_min <= t_max - t_min { 0.0 } else { t_min };
    let x = if t_max - x_lo > 1e-9 { (x_lo, t_max) } else { (x_lo, x_lo + 1.0) };
    let pad = (v_max - v_min) * 0.05;
    let y = if pad > 1e-9 { (v_min - pad, v_max + pad) } else { (v_min - 1.0, v_max + 1.0) };
    (x, y)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

fn draw(plan: &Plan, root: Area<'_>) -> DrawResult {
    root.fill(&WHITE)?;
    let (header, body) = root.split_vertically(plan.header_height());
    header.draw(&Text::new(plan.title.as_str(), (16, 12), (FONT, 22).into_font().style(FontStyle::Bold).color(&TEXT)))?;
    for (i, line) in plan.subtitle.iter().enumerate() {
        header.draw(&Text::new(line.as_str(), (16, 40 + 17 * i as i32), (FONT, 16).into_font().color(&MUTED)))?;
    }
    let (plot, legend) = body.split_horizontally(WIDTH - LEGEND_WIDTH);

    let mut chart = ChartBuilder::on(&plot)
        .margin(10)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(plan.x.0..plan.x.1, plan.y.0..plan.y.1)?;
    // The warm-up, shaded under the grid; nothing to shade before any sample.
    let warmup = plan.warmup.filter(|u| *u > plan.x.0 && plan.has_samples()).map(|u| u.min(plan.x.1));
    if let Some(until) = warmup {
        chart.draw_series(std::iter::once(Rectangle::new([(plan.x.0, plan.y.0), (until, plan.y.1)], SHADE.filled())))?;
    }
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("MiB")
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .label_style((FONT, 14).into_font().color(&TEXT))
        .axis_desc_style((FONT, 15).into_font().color(&TEXT))
        .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
        .light_line_style(RGBColor(0xf0, 0xf0, 0xf0))
        .max_light_lines(1)
        .x_labels(10)
        .y_labels(8)
        .draw()?;
    for line in &plan.lines {
        for run in &line.runs {
            if line.fit {
                chart.draw_series(DashedLineSeries::new(run.iter().copied(), 9, 5, line.color.stroke_width(3)))?;
            } else if run.len() == 1 {
                chart.draw_series(std::iter::once(Circle::new(run[0], 2, line.color.filled())))?;
            } else {
                chart.draw_series(LineSeries::new(run.iter().copied(), line.color.stroke_width(2)))?;
            }
        }
    }
    if !plan.has_samples() {
        let (w, h) = plot.dim_in_pixel();
        let centre = (w as i32 / 2, h as i32 / 2);
        plot.draw(&Text::new("no samples", centre, (FONT, 18).into_font().color(&MUTED).pos(Pos::new(HPos::Center, VPos::Center))))?;
    }
    // The legend names the configured warm-up, shown only where it is shaded.
    draw_legend(&legend, &plan.lines, plan.warmup.filter(|_| warmup.is_some()))?;
    root.present()
}

/// The legend, in its own column right of the plot so it never hides data:
/// the warm-up's shade (when drawn), then the lines.
fn draw_legend(area: &Area<'_>, lines: &[Line], warmup: Option<f64>) -> DrawResult {
    const ROW: i32 = 20;
    let key = |text: String, color: &RGBColor| {
        Text::new(text, (38, 0), (FONT, 15).into_font().color(color).pos(Pos::new(HPos::Left, VPos::Center)))
    };
    let (_, height) = area.dim_in_pixel();
    let mut rows = usize::try_from((height as i32 - 24) / ROW).unwrap_or(1).max(1);
    let mut y = 20;
    if let Some(secs) = warmup {
        area.draw(&Rectangle::new([(4, y - 7), (30, y + 7)], SHADE.filled()))?;
        area.draw(&(EmptyElement::at((0, y)) + key(format!("warm-up ({} s)", tick(&secs)), &TEXT)))?;
        (rows, y) = (rows.saturating_sub(1).max(1), y + ROW);
    }
    let shown = if lines.len() > rows { rows - 1 } else { lines.len() };
    for (i, line) in lines.iter().take(shown).enumerate() {
        let y = y + ROW * i as i32;
        let style = line.color.stroke_width(if line.fit { 3 } else { 2 });
        if line.fit {
            area.draw(&DashedPathElement::new(vec![(4, y), (30, y)], 7, 4, style))?;
        } else {
            area.draw(&PathElement::new(vec![(4, y), (30, y)], style))?;
        }
        area.draw(&(EmptyElement::at((0, y)) + key(shorten(&line.name, LEGEND_MAX_CHARS), &TEXT)))?;
    }
    if shown < lines.len() {
        let more = format!("… and {} more", lines.len() - shown);
        area.draw(&(EmptyElement::at((0, y + ROW * shown as i32)) + key(more, &MUTED)))?;
    }
    Ok(())
}

/// A tick label: at most three decimals, no trailing zeros, never "-0".
fn tick(v: &f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

/// A chart that says why the real one could not be drawn.
fn error_chart(title: &str, error: &str) -> String {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, BODY_HEIGHT)).into_drawing_area();
        // Best effort: the backend closes the document when dropped, whatever fails.
        let _ = root.fill(&WHITE);
        let _ = root.draw(&Text::new(title, (16, 12), (FONT, 22).into_font().color(&TEXT)));
        let _ = root.draw(&Text::new(format!("chart not drawn: {}", clean(error)), (16, 48), (FONT, 16).into_font().color(&MUTED)));
        let _ = root.present();
    }
    svg
}

/// Text without control characters (XML 1.0 cannot carry most of them).
fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        s.chars().take(max - 1).chain(std::iter::once('…')).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memwatch::{MemReport, MemWatchConfig, MemWatchCore};

    /// A report from MemWatch itself, fed one sample a second: RSS at
    /// `base` MiB growing by `leak_mib_per_min`, a wobbling heap (`None`
    /// where `heap` says so).
    fn report(secs: u32, base: f64, leak_mib_per_min: f64, heap: fn(u32) -> Option<u64>) -> MemReport {
        let mut cfg = MemWatchConfig::default();
        cfg.trend.warmup_secs = 20.0;
        cfg.trend.window_secs = 60.0;
        let mut core = MemWatchCore::new(cfg);
        for i in 0..secs {
            let t = f64::from(i);
            let wobble = ((t * 0.7).sin() * 0.4 + if i < 20 { -30.0 + 1.5 * t } else { 0.0 }) * MIB;
            let rss = (base * MIB + leak_mib_per_min / 60.0 * MIB * t + wobble) as u64;
            core.observe(Sample {
                t_secs: t,
                vm_rss: rss,
                rss_anon: rss / 3,
                rss_file: rss / 3,
                rss_shmem: rss / 3,
                maps: 200,
                heap: heap(i),
            });
        }
        core.report()
    }

    fn steady_heap(i: u32) -> Option<u64> {
        Some((12 << 20) + u64::from(i % 7) * (64 << 10))
    }

    fn parse(svg: &str) -> roxmltree::Document<'_> {
        let doc = roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("not well-formed: {e}\n{svg}"));
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "non-finite value in the output");
        doc
    }

    fn texts<'a>(doc: &'a roxmltree::Document<'_>) -> Vec<&'a str> {
        doc.descendants().filter(|n| n.has_tag_name("text")).filter_map(|n| n.text()).map(str::trim).collect()
    }

    /// Lines (series, dashes and legend samples are each a polyline) in `colour`.
    fn polylines(doc: &roxmltree::Document<'_>, colour: RGBColor) -> usize {
        let hex = format!("#{:02X}{:02X}{:02X}", colour.0, colour.1, colour.2);
        doc.descendants().filter(|n| n.has_tag_name("polyline") && n.attribute("stroke") == Some(hex.as_str())).count()
    }

    #[test]
    fn one_agent_shows_rss_anon_heap_the_fit_and_the_verdict() {
        let r = report(150, 300.0, 5.0, steady_heap);
        let svg = memory_chart("kvrail soak — decode agent memory", &[("decode", &r)]);
        let doc = parse(&svg);
        let texts = texts(&doc);
        for want in ["kvrail soak — decode agent memory", "RSS", "RssAnon", "heap", "RSS fit", "warm-up (20 s)", "time (s)", "MiB"] {
            assert!(texts.contains(&want), "no text {want:?} in {texts:?}");
        }
        let a = &r.assessment;
        let subtitle = format!(
            "verdict leak — RSS slope {:.3} MiB/min over {:.0} s (threshold 1.00), heap slope {:.3} MiB/min",
            a.rss_slope_mib_per_min,
            a.window_secs,
            a.heap_slope_mib_per_min.expect("heap slope")
        );
        assert!(texts.contains(&subtitle.as_str()), "no subtitle {subtitle:?} in {texts:?}");
        // Each series is one line plus its legend sample; the fit is dashed.
        for colour in [TAB_BLUE, TAB_ORANGE, TAB_GREEN] {
            assert_eq!(polylines(&doc, colour), 2, "{colour:?}");
        }
        assert!(polylines(&doc, TAB_RED) > 3, "the fit is drawn in dashes");
        assert!(svg.trim_start().starts_with("<svg"));
    }

    #[test]
    fn the_fit_line_is_memwatchs_own() {
        let r = report(150, 300.0, 5.0, steady_heap);
        let a = &r.assessment;
        let [(t0, y0), (t1, y1)] = fit_line(&r).expect("a fit over the window");
        assert_eq!(t1, r.latest.as_ref().unwrap().t_secs);
        assert!((t1 - t0 - a.window_secs).abs() < 1e-9);
        let slope = (y1 - y0) / (t1 - t0) * 60.0;
        assert!((slope - a.rss_slope_mib_per_min).abs() < 1e-9, "{slope} vs {a:?}");
        // It follows the assessment, not the samples: move the intercept and the line moves.
        let mut moved = r.clone();
        moved.assessment.rss_intercept_bytes = a.rss_intercept_bytes.map(|b| b + 10.0 * MIB);
        let [(_, m0), _] = fit_line(&moved).unwrap();
        assert!((m0 - y0 - 10.0).abs() < 1e-9);
        // No intercept (an older agent's report), or too few samples: no line.
        moved.assessment.rss_intercept_bytes = None;
        assert_eq!(fit_line(&moved), None);
        assert!(!texts(&parse(&memory_chart("t", &[("a", &moved)]))).contains(&"RSS fit"));
        let early = report(21, 300.0, 0.0, steady_heap);
        assert_eq!(early.assessment.samples_in_window, 1);
        assert_eq!(fit_line(&early), None);
    }

    #[test]
    fn several_agents_each_get_their_rss_and_fit_in_their_colour() {
        let reports = [report(120, 300.0, 0.0, steady_heap), report(120, 500.0, 4.0, steady_heap), report(90, 200.0, 0.0, steady_heap)];
        let labels = ["decode-0", "prefill-0", "prefill-1"];
        let agents: Vec<(&str, &MemReport)> = labels.iter().copied().zip(&reports).collect();
        let svg = memory_chart("cluster soak", &agents);
        let doc = parse(&svg);
        let texts = texts(&doc);
        for (i, label) in labels.iter().enumerate() {
            assert!(texts.contains(&format!("{label} RSS").as_str()), "{texts:?}");
            assert!(texts.contains(&format!("{label} RSS fit").as_str()), "{texts:?}");
            assert!(texts.iter().any(|t| t.starts_with(&format!("{label}: verdict "))), "{texts:?}");
            assert_eq!(polylines(&doc, PALETTE[i]), 2, "{label}: its RSS line and legend sample");
            assert!(polylines(&doc, darker(PALETTE[i])) > 3, "{label}: its fit, dashed");
        }
        assert!(!texts.contains(&"RssAnon") && !texts.contains(&"heap"));
    }

    #[test]
    fn many_agents_keep_subtitle_and_legend_bounded() {
        let r = report(60, 300.0, 0.0, steady_heap);
        let labels: Vec<String> = (0..40).map(|i| format!("agent-{i}")).collect();
        let agents: Vec<(&str, &MemReport)> = labels.iter().map(|l| (l.as_str(), &r)).collect();
        let svg = memory_chart("many", &agents);
        let doc = parse(&svg);
        let texts = texts(&doc);
        assert_eq!(texts.iter().filter(|t| t.contains(": verdict ")).count(), MAX_SUBTITLE_LINES - 1);
        assert!(texts.contains(&"… and 35 more agents (see the report)"), "{texts:?}");
        assert!(texts.iter().any(|t| t.starts_with("… and ") && t.ends_with(" more")), "legend says what it left out");
    }

    #[test]
    fn empty_reports_still_give_a_chart() {
        let empty = MemWatchCore::new(MemWatchConfig::default()).report();
        for agents in [vec![("decode", &empty)], vec![]] {
            let svg = memory_chart("nothing yet", &agents);
            let doc = parse(&svg);
            let texts = texts(&doc);
            assert!(texts.contains(&"no samples"), "{texts:?}");
            assert!(texts.contains(&"nothing yet"));
            assert!(!texts.iter().any(|t| t.starts_with("warm-up")), "nothing to shade: {texts:?}");
        }
        let texts_one = texts(&parse(&memory_chart("nothing yet", &[("decode", &empty)]))).join("|");
        assert!(texts_one.contains("RSS (no samples)") && texts_one.contains("verdict warming_up"), "{texts_one}");
    }

    #[test]
    fn missing_heap_and_non_finite_times_are_handled() {
        // No heap figure at all.
        let r = report(90, 300.0, 0.0, |_| None);
        assert_eq!(r.assessment.heap_slope_mib_per_min, None);
        let svg = memory_chart("no heap", &[("decode", &r)]);
        let doc = parse(&svg);
        let texts = texts(&doc);
        assert!(texts.contains(&"heap (no samples)"), "{texts:?}");
        assert!(texts.iter().any(|t| t.ends_with("heap slope n/a")), "{texts:?}");

        // A heap with gaps: the line breaks there instead of bridging them.
        let r = report(90, 300.0, 0.0, |i| if (30..40).contains(&i) || i == 60 { None } else { steady_heap(i) });
        let heap = Plan::new("t", &[("decode", &r)]).lines.into_iter().find(|l| l.name == "heap").expect("heap line");
        assert_eq!(heap.runs.len(), 3, "{:?}", heap.runs.iter().map(Vec::len).collect::<Vec<_>>());

        // Samples at a NaN or infinite time are dropped, never written.
        let mut r = report(90, 300.0, 0.0, steady_heap);
        r.samples[10].t_secs = f64::NAN;
        r.samples[11].t_secs = f64::INFINITY;
        r.samples.iter_mut().for_each(|s| s.heap = None);
        r.assessment.rss_slope_mib_per_min = f64::NAN;
        let svg = memory_chart("odd", &[("decode", &r)]);
        parse(&svg);
        let rss = Plan::new("t", &[("decode", &r)]).lines.into_iter().find(|l| l.name == "RSS").expect("RSS line");
        assert_eq!(rss.points().count(), r.samples.len() - 2);
    }

    #[test]
    fn ranges_start_at_zero_pad_and_never_collapse() {
        let line = |pts: Vec<(f64, f64)>| Line { name: "l".into(), color: TAB_BLUE, fit: false, runs: vec![pts] };
        let (x, y) = ranges(&[line(vec![(5.0, 100.0), (60.0, 200.0)])]);
        assert_eq!(x, (0.0, 60.0));
        assert!((y.0 - 95.0).abs() < 1e-9 && (y.1 - 205.0).abs() < 1e-9, "{y:?}");
        let (x, _) = ranges(&[line(vec![(1.7e9, 1.0), (1.7e9 + 60.0, 2.0)])]);
        assert_eq!(x, (1.7e9, 1.7e9 + 60.0));
        let (x, y) = ranges(&[line(vec![(3.0, 512.0)])]);
        assert_eq!((x, y), ((3.0, 4.0), (511.0, 513.0)));
        assert_eq!(ranges(&[]), ((0.0, 1.0), (0.0, 1.0)));
        let ticks: Vec<String> = [300.0, 20.0, 0.25, 1.5e-4, -1e-4, -2.5].iter().map(tick).collect();
        assert_eq!(ticks, ["300", "20", "0.25", "0", "0", "-2.5"]);
    }

    #[test]
    fn text_is_escaped_and_stripped_of_control_characters() {
        let r = report(60, 300.0, 0.0, steady_heap);
        let svg = memory_chart("leak <&> \"check\"\u{7}", &[("a<b>&c\u{0}", &r), ("d'e", &r)]);
        let doc = parse(&svg);
        let texts = texts(&doc);
        assert!(texts.contains(&"leak <&> \"check\""), "{texts:?}");
        assert!(texts.contains(&"a<b>&c RSS"), "{texts:?}");
        assert!(texts.contains(&"d'e RSS fit"), "{texts:?}");
        assert_eq!(shorten("abcdef", 4), "abc…");
        assert!(parse(&error_chart("t <x>", "bad & worse")).root_element().has_children());
    }
}
