//! Progress of a long driver run: a bar on a terminal, and on anything else
//! (logs, CI) a plain line on stderr now and then. Results go to stdout;
//! progress never does.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a plain progress line is printed when stderr is no terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(15);

/// A progress display for one run.
#[derive(Debug)]
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    /// What plain lines start with (`bench`, `soak`, ...).
    prefix: &'static str,
    last_plain: Mutex<Option<Instant>>,
}

impl Progress {
    /// Counts `len` units (`unit` names them in the bar: "points", "s", "GiB").
    pub fn new(prefix: &'static str, len: u64, unit: &str) -> Progress {
        use std::io::IsTerminal as _;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(len);
            let template = format!("{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {unit}  {{msg}}");
            bar.set_style(indicatif::ProgressStyle::with_template(&template).expect("static template"));
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress { bar, prefix, last_plain: Mutex::new(None) }
    }

    /// What the run is doing now; on a terminal always, as a plain line
    /// every time (a stage is rare).
    pub fn stage(&self, what: &str, stage: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(format!("{what}: {stage}")),
            None => eprintln!("{}: {what}: {stage} ...", self.prefix),
        }
    }

    /// Where the run is (`pos` of its length) and how it goes; as a plain
    /// line at most every [`PLAIN_EVERY`].
    pub fn tick(&self, pos: u64, msg: String) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(pos);
                bar.set_message(msg);
            }
            None => {
                let mut last = self.last_plain.lock().expect("lock");
                if last.is_none_or(|t| t.elapsed() >= PLAIN_EVERY) {
                    *last = Some(Instant::now());
                    eprintln!("{}: {msg}", self.prefix);
                }
            }
        }
    }

    /// A line that stays (above the bar on a terminal), and one unit done.
    pub fn done_one(&self, line: String) {
        match &self.bar {
            Some(bar) => {
                bar.println(line);
                bar.inc(1);
            }
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
