//! The agents one driver run depends on, and the first failure among them.
//!
//! A [`Crew`] hears at once when an agent process the driver started ends
//! before the driver stopped it ([`super::children::AgentProcess::enlist`]),
//! or when a remote agent (cluster mode) stops answering for longer than
//! its lease ([`Crew::watch_remote`]). Drivers race their work against
//! [`Crew::failed`], so a run stops within moments of losing an agent and
//! still writes its report, with the [`Failure`] in it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use crate::drive::workload::Control;

/// An agent as a report names it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct AgentName {
    /// `decode` or `prefill`.
    pub role: String,
    pub agent_id: String,
    /// Set for a process this driver started.
    pub pid: Option<u32>,
    /// Its gRPC address (host:port), once known.
    pub address: String,
}

impl AgentName {
    /// The role and `--agent-id` an agent's command line gives.
    pub fn from_args(args: &[String]) -> AgentName {
        let role = args.iter().find(|a| *a == "decode" || *a == "prefill").cloned().unwrap_or_else(|| "agent".into());
        let agent_id = args.iter().position(|a| a == "--agent-id").and_then(|i| args.get(i + 1)).cloned().unwrap_or_default();
        AgentName { role, agent_id, ..Default::default() }
    }

    /// "the prefill agent soak-prefill (pid 4242, 127.0.0.1:40123)".
    pub fn describe(&self) -> String {
        let mut at: Vec<String> = self.pid.map(|p| format!("pid {p}")).into_iter().collect();
        if !self.address.is_empty() {
            at.push(self.address.clone());
        }
        let id = if self.agent_id.is_empty() { String::new() } else { format!(" {}", self.agent_id) };
        let at = if at.is_empty() { String::new() } else { format!(" ({})", at.join(", ")) };
        format!("the {} agent{id}{at}", self.role)
    }

    /// A short tag for its forwarded log lines.
    pub fn short(&self) -> String {
        if self.agent_id.is_empty() {
            self.role.clone()
        } else {
            self.agent_id.clone()
        }
    }
}

/// Lines of an agent's log kept for a failure report.
pub const LOG_TAIL: usize = 40;

/// The last [`LOG_TAIL`] lines of an agent's stderr.
#[derive(Debug, Clone, Default)]
pub struct LogTail(Arc<Mutex<VecDeque<String>>>);

impl LogTail {
    pub fn push(&self, line: String) {
        let mut g = self.0.lock().expect("lock");
        if g.len() == LOG_TAIL {
            g.pop_front();
        }
        g.push_back(line);
    }

    /// The kept lines, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().expect("lock").iter().cloned().collect()
    }
}

/// How a process ended.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Ended {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// "exited with code 1", "was killed by signal 9 (SIGKILL)".
    pub how: String,
}

impl Ended {
    pub fn from_status(s: std::io::Result<std::process::ExitStatus>) -> Ended {
        use std::os::unix::process::ExitStatusExt as _;
        match s {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(c), _) => Ended { exit_code: Some(c), signal: None, how: format!("exited with code {c}") },
                (None, Some(sig)) => {
                    Ended { exit_code: None, signal: Some(sig), how: format!("was killed by signal {sig} ({})", signal_name(sig)) }
                }
                (None, None) => Ended { exit_code: None, signal: None, how: "ended".into() },
            },
            Err(e) => Ended { exit_code: None, signal: None, how: format!("could not be waited for ({e})") },
        }
    }
}

/// How process `pid` ended, if it has: a zombie's exit status from
/// /proc/PID/stat (field 52, in waitpid's form), or "ended" once it is
/// gone. `None` while it runs.
pub fn proc_end(pid: u32) -> Option<Ended> {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Some(Ended { exit_code: None, signal: None, how: "ended".into() });
    };
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    if !matches!(rest.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    let status: i32 = rest.get(49).and_then(|v| v.parse().ok()).unwrap_or(0);
    use std::os::unix::process::ExitStatusExt as _;
    Some(Ended::from_status(Ok(std::process::ExitStatus::from_raw(status))))
}

/// The usual name of a Linux signal number.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => "signal",
    }
}

/// Why a run stopped before its end.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// One line a person can act on.
    pub message: String,
    /// The agent that failed, when one did.
    pub agent: Option<AgentName>,
    /// How it ended ("was killed by signal 9 (SIGKILL)", "stopped
    /// answering", ...).
    pub how: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Seconds from the start of the run.
    pub after_secs: f64,
    /// The last lines of the agent's log (for a process this driver
    /// started), oldest first.
    pub log_tail: Vec<String>,
}

impl Failure {
    /// An agent process ended while the run needed it.
    pub fn agent_ended(name: &AgentName, e: &Ended, log_tail: Vec<String>, after: Duration) -> Failure {
        let secs = after.as_secs_f64();
        Failure {
            message: format!("{} {} {secs:.1} s into the run; see the end of its log below", name.describe(), e.how),
            agent: Some(name.clone()),
            how: e.how.clone(),
            exit_code: e.exit_code,
            signal: e.signal,
            after_secs: secs,
            log_tail,
        }
    }

    /// A remote agent stopped answering.
    pub fn silent(name: &AgentName, silent: Duration, last_error: &str, after: Duration) -> Failure {
        let how = format!("stopped answering for {:.1} s", silent.as_secs_f64());
        Failure {
            message: format!("{} {how} (last error: {last_error}); is it still running? see its log on its host", name.describe()),
            agent: Some(name.clone()),
            how,
            exit_code: None,
            signal: None,
            after_secs: after.as_secs_f64(),
            log_tail: Vec::new(),
        }
    }

    /// The run failed on its own (an error, no agent lost).
    pub fn error(message: String, after: Duration) -> Failure {
        Failure {
            message,
            agent: None,
            how: "error".into(),
            exit_code: None,
            signal: None,
            after_secs: after.as_secs_f64(),
            log_tail: Vec::new(),
        }
    }

    /// For a terminal: the message, then the log tail indented.
    pub fn human(&self) -> String {
        let mut s = self.message.clone();
        for l in self.log_tail.iter().rev().take(10).collect::<Vec<_>>().into_iter().rev() {
            s.push_str("\n    | ");
            s.push_str(l);
        }
        s
    }
}

/// Context for an error of a call to one agent: the failure it becomes
/// names that agent (`.context(AtAgent(name))`).
#[derive(Debug, Clone)]
pub struct AtAgent(pub AgentName);

impl std::fmt::Display for AtAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.describe())
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// The agents of one run and the first failure among them.
#[derive(Debug, Clone)]
pub struct Crew {
    failure: watch::Sender<Option<Failure>>,
    started: Instant,
    /// The processes enlisted, for a look at /proc when a call fails
    /// before their end was heard.
    members: Arc<Mutex<Vec<Member>>>,
}

/// An enlisted agent process.
#[derive(Debug)]
struct Member {
    name: AgentName,
    /// Set when the driver ends it on purpose.
    expected: Arc<AtomicBool>,
    log: LogTail,
}

impl Default for Crew {
    fn default() -> Self {
        Crew::new()
    }
}

/// How often a remote agent is asked whether it is alive.
const REMOTE_PROBE: Duration = Duration::from_secs(1);

impl Crew {
    pub fn new() -> Crew {
        Crew { failure: watch::channel(None).0, started: Instant::now(), members: Arc::default() }
    }

    /// Time since the run started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Records a failure; only the first one counts.
    pub fn fail(&self, f: Failure) {
        self.failure.send_if_modified(|cur| {
            if cur.is_none() {
                tracing::debug!(failure = %f.message, "run failed");
                *cur = Some(f);
                true
            } else {
                false
            }
        });
    }

    /// The first failure, if any yet.
    pub fn failure(&self) -> Option<Failure> {
        self.failure.borrow().clone()
    }

    /// Resolves with the first failure (never, if none comes).
    pub async fn failed(&self) -> Failure {
        let mut rx = self.failure.subscribe();
        let first = rx.wait_for(Option::is_some).await.map(|f| f.clone());
        match first {
            Ok(f) => f.expect("some"),
            // The sender lives as long as `self`.
            Err(_) => std::future::pending().await,
        }
    }

    /// The failure that explains `err`: an agent that ended at about the
    /// time the run's own call failed is the cause (a request often sees
    /// the broken connection before the driver sees the process end), so
    /// wait up to `grace` for one; otherwise the error itself.
    pub async fn explain(&self, err: &anyhow::Error, grace: Duration) -> Failure {
        let dead = async {
            // The end of a process reaches the crew through its reaper;
            // /proc says at once that it is gone or a zombie.
            loop {
                if let Some(f) = self.dead_member() {
                    self.fail(f);
                    return self.failure().expect("just failed");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let first = async {
            tokio::select! {
                f = self.failed() => f,
                f = dead => f,
            }
        };
        match tokio::time::timeout(grace, first).await {
            Ok(f) => f,
            Err(_) => {
                let mut f = Failure::error(crate::diagnose::one_line(err), self.elapsed());
                if let Some(at) = err.downcast_ref::<AtAgent>() {
                    f.agent = Some(at.0.clone());
                    f.how = "could not be reached".into();
                }
                self.fail(f.clone());
                self.failure().unwrap_or(f)
            }
        }
    }

    /// Enlists an agent process: `explain` looks it up in /proc.
    pub fn enlist(&self, name: AgentName, expected: Arc<AtomicBool>, log: LogTail) {
        self.members.lock().expect("lock").push(Member { name, expected, log });
    }

    /// An enlisted process that has ended (a zombie) though the driver did
    /// not end it.
    fn dead_member(&self) -> Option<Failure> {
        let members = self.members.lock().expect("lock");
        members.iter().filter(|m| !m.expected.load(Ordering::SeqCst)).find_map(|m| {
            // A zombie: its status is there. One already reaped is its
            // reaper's to report, with that status.
            let ended = proc_end(m.name.pid?).filter(|e| e.exit_code.is_some() || e.signal.is_some())?;
            Some(Failure::agent_ended(&m.name, &ended, m.log.lines(), self.elapsed()))
        })
    }

    /// Probes the agent behind `control` every second; once it has not
    /// answered for `lease`, the crew fails naming it. The probe stops when
    /// the returned [`Probe`] is dropped.
    pub fn watch_remote(&self, name: AgentName, mut control: Control, lease: Duration) -> Probe {
        let crew = self.clone();
        Probe(tokio::spawn(async move {
            let mut last_ok = Instant::now();
            let mut last_error = String::from("no answer");
            loop {
                tokio::time::sleep(REMOTE_PROBE).await;
                match tokio::time::timeout(REMOTE_PROBE, control.info(kvrail_proto::v1::InfoRequest {})).await {
                    Ok(Ok(_)) => last_ok = Instant::now(),
                    Ok(Err(s)) => last_error = crate::diagnose::status_line(&s),
                    Err(_) => last_error = format!("no answer within {REMOTE_PROBE:?}"),
                }
                if last_ok.elapsed() >= lease {
                    crew.fail(Failure::silent(&name, last_ok.elapsed(), &last_error, crew.elapsed()));
                    return;
                }
            }
        }))
    }
}

/// Runs `work` until it ends or the crew fails, whichever is first. An
/// error of `work` becomes the failure it stands for ([`Crew::explain`]).
pub async fn race<T>(crew: &Crew, work: impl std::future::Future<Output = anyhow::Result<T>>) -> Result<T, Failure> {
    tokio::select! {
        r = work => match r {
            Ok(v) => Ok(v),
            // A failure already made (by a nested race) stands.
            Err(e) if e.downcast_ref::<Failure>().is_some() => Err(e.downcast::<Failure>().expect("checked")),
            Err(e) => {
                tracing::debug!("run error chain: {e:?}");
                Err(crew.explain(&e, Duration::from_secs(1)).await)
            }
        },
        f = crew.failed() => Err(f),
    }
}

/// A running liveness probe of a remote agent; dropping it stops it.
#[derive(Debug)]
pub struct Probe(tokio::task::JoinHandle<()>);

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name() -> AgentName {
        AgentName { role: "prefill".into(), agent_id: "soak-prefill".into(), pid: Some(42), address: "127.0.0.1:7000".into() }
    }

    #[test]
    fn an_agent_is_named_by_role_id_pid_and_address() {
        assert_eq!(name().describe(), "the prefill agent soak-prefill (pid 42, 127.0.0.1:7000)");
        let args: Vec<String> = ["decode", "--agent-id", "d1", "--transport", "sm"].iter().map(|s| s.to_string()).collect();
        let n = AgentName::from_args(&args);
        assert_eq!((n.role.as_str(), n.agent_id.as_str()), ("decode", "d1"));
        assert_eq!(AgentName { pid: None, address: String::new(), ..n }.describe(), "the decode agent d1");
    }

    #[test]
    fn a_signal_and_an_exit_code_read_as_such() {
        use std::os::unix::process::ExitStatusExt as _;
        let killed = Ended::from_status(Ok(std::process::ExitStatus::from_raw(9)));
        assert_eq!((killed.signal, killed.exit_code), (Some(9), None));
        assert_eq!(killed.how, "was killed by signal 9 (SIGKILL)");
        let exited = Ended::from_status(Ok(std::process::ExitStatus::from_raw(3 << 8)));
        assert_eq!((exited.signal, exited.exit_code, exited.how.as_str()), (None, Some(3), "exited with code 3"));
        let f = Failure::agent_ended(&name(), &killed, vec!["a".into()], Duration::from_millis(12_300));
        assert_eq!(f.message, "the prefill agent soak-prefill (pid 42, 127.0.0.1:7000) was killed by signal 9 (SIGKILL) 12.3 s into the run; see the end of its log below");
        assert_eq!(f.human(), format!("{}\n    | a", f.message));
    }

    #[test]
    fn the_log_tail_keeps_the_last_lines() {
        let t = LogTail::default();
        for i in 0..super::LOG_TAIL + 5 {
            t.push(format!("line {i}"));
        }
        let l = t.lines();
        assert_eq!(l.len(), super::LOG_TAIL);
        assert_eq!(l[0], "line 5");
        assert_eq!(l.last().unwrap(), &format!("line {}", super::LOG_TAIL + 4));
    }

    #[test]
    fn a_running_process_has_not_ended_and_a_killed_one_reads_as_killed() {
        assert!(proc_end(std::process::id()).is_none(), "this test runs");
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        assert!(proc_end(pid).is_none());
        child.kill().unwrap();
        // A zombie until waited for: /proc has its status.
        let t0 = Instant::now();
        let ended = loop {
            if let Some(e) = proc_end(pid) {
                break e;
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "killed, never a zombie");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!((ended.signal, ended.how.as_str()), (Some(9), "was killed by signal 9 (SIGKILL)"));
        child.wait().unwrap();
        assert_eq!(proc_end(pid).map(|e| e.how), Some("ended".into()), "reaped: gone");
    }

    #[tokio::test]
    async fn the_first_failure_wins_and_wakes_the_waiter() {
        let crew = Crew::new();
        assert!(crew.failure().is_none());
        let waiter = tokio::spawn({
            let crew = crew.clone();
            async move { crew.failed().await }
        });
        crew.fail(Failure::error("first".into(), Duration::ZERO));
        crew.fail(Failure::error("second".into(), Duration::ZERO));
        assert_eq!(waiter.await.unwrap().message, "first");
        assert_eq!(crew.failure().unwrap().message, "first");
        // An error with no agent lost stands for itself after the grace.
        let lone = Crew::new();
        let f = lone.explain(&anyhow::anyhow!("boom"), Duration::from_millis(10)).await;
        assert_eq!((f.message.as_str(), f.agent), ("boom", None));
        // An error of a call to one agent names it, under other contexts too.
        let e = anyhow::anyhow!("connection refused").context(AtAgent(name())).context("pass 3");
        let f = Crew::new().explain(&e, Duration::from_millis(10)).await;
        assert_eq!((f.agent, f.how.as_str()), (Some(name()), "could not be reached"));
        assert_eq!(f.message, "pass 3: the prefill agent soak-prefill (pid 42, 127.0.0.1:7000): connection refused");
    }
}
