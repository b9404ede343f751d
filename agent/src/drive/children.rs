//! Agent child processes for the drivers (demo, bench, soak): spawn
//! `kvrail decode` / `kvrail prefill`, wait for their ready line, connect a
//! Control client, keep the last lines of each one's log, and watch them:
//! an agent that ends while the driver still needs it is reported to the
//! driver's [`Crew`] at once, named, with how it ended. Dropping an
//! [`AgentProcess`] kills its agent.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kvrail_proto::v1 as pb;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader, Lines};
use tokio::process::Command;
use tokio::sync::{oneshot, watch};
use tonic::transport::Channel;

use super::crew::{AgentName, Crew, Ended, Failure, LogTail};
use crate::cmd::serve::MAX_MESSAGE;
use crate::drive::workload::Control;

/// A gRPC channel over the Unix socket at `path`.
pub async fn unix_channel(path: std::path::PathBuf) -> anyhow::Result<Channel> {
    let shown = path.display().to_string();
    let ch = tonic::transport::Endpoint::try_from("http://local.socket")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .with_context(|| format!("connecting to the agent's local socket {shown}"))?;
    Ok(ch)
}

/// A Control client for `host:port` (over TLS with `tls`) or `unix:PATH`.
pub async fn control_at(addr: &str, tls: Option<&crate::tls::Tls>) -> anyhow::Result<Control> {
    let channel = match addr.strip_prefix("unix:") {
        Some(path) => unix_channel(path.into()).await?,
        None => crate::tls::endpoint(addr, tls)?.connect().await?,
    };
    Ok(Control::new(channel).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE))
}

/// The next line on `lines` that is a JSON object `wanted` accepts; other
/// lines (logs: UCX may write to stdout too) are skipped. `None` when the
/// stream ends first.
pub async fn next_json<R: AsyncRead + Unpin>(
    lines: &mut Lines<BufReader<R>>,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> std::io::Result<Option<serde_json::Value>> {
    while let Some(line) = lines.next_line().await? {
        if let Some(v) = serde_json::from_str::<serde_json::Value>(&line).ok().filter(&wanted) {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// Keeps reading a child's stdout in the background so the child never
/// blocks on a full pipe.
pub fn drain<R: AsyncRead + Unpin + Send + 'static>(mut lines: Lines<BufReader<R>>) {
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
}

/// Whether a log line is worth showing when the driver is not verbose:
/// warnings and errors (kvrail's and UCX's own), panics, assertions.
fn loud(line: &str) -> bool {
    ["WARN", "ERROR", "panicked", "Assertion", "fatal"].iter().any(|w| line.contains(w))
}

/// A running agent process.
#[derive(Debug)]
pub struct AgentProcess {
    pub name: AgentName,
    pub ready: serde_json::Value,
    pub listen: String,
    pub control: Control,
    pub log: LogTail,
    watch: Watch,
}

/// Watches one child process: how it ended, whether this driver ended it.
#[derive(Debug)]
struct Watch {
    name: AgentName,
    log: LogTail,
    /// Some(how) once the process has ended.
    ended: watch::Receiver<Option<Ended>>,
    /// Set before this driver ends the agent itself: its end is then no
    /// failure.
    expected: Arc<AtomicBool>,
    /// Dropped (or sent) to kill the process.
    kill: Option<oneshot::Sender<()>>,
}

impl Watch {
    async fn wait_end(&mut self, limit: Duration) -> Option<Ended> {
        let r = tokio::time::timeout(limit, self.ended.wait_for(Option::is_some)).await;
        r.ok().and_then(|r| r.ok()).and_then(|e| e.clone())
    }

    /// The agent did not become ready: a failure naming it, how it ended
    /// (if it did), its last log line in the message and its log's tail.
    fn not_ready(&self, what: String, ended: Option<&Ended>, after: Duration) -> anyhow::Error {
        let lines = self.log.lines();
        let last =
            lines.iter().rev().find(|l| !l.trim().is_empty()).map_or(String::new(), |l| format!("; its last log line: {}", l.trim()));
        anyhow::Error::new(Failure {
            message: format!("{} {what}{last}", self.name.describe()),
            agent: Some(self.name.clone()),
            how: what,
            exit_code: ended.and_then(|e| e.exit_code),
            signal: ended.and_then(|e| e.signal),
            after_secs: after.as_secs_f64(),
            log_tail: lines,
        })
    }
}

/// How an agent is started: its arguments, environment changes (`None`
/// removes a variable) and whether its whole log is shown.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    pub args: Vec<String>,
    pub env: Vec<(String, Option<String>)>,
    pub verbose: bool,
}

impl AgentProcess {
    /// Spawns this `kvrail` binary with `args` and waits up to `timeout`
    /// for its ready line.
    pub async fn spawn(args: &[String], verbose: bool, timeout: Duration) -> anyhow::Result<AgentProcess> {
        Self::spawn_exe(&std::env::current_exe()?, args, verbose, timeout).await
    }

    /// Spawns the `kvrail` binary at `exe` (tests pass the built binary).
    pub async fn spawn_exe(exe: &std::path::Path, args: &[String], verbose: bool, timeout: Duration) -> anyhow::Result<AgentProcess> {
        Self::spawn_env(exe, args, &[], verbose, timeout).await
    }

    /// As [`Self::spawn_exe`], with environment changes (`None` removes).
    pub async fn spawn_env(
        exe: &std::path::Path,
        args: &[String],
        env: &[(String, Option<String>)],
        verbose: bool,
        timeout: Duration,
    ) -> anyhow::Result<AgentProcess> {
        Self::launch(exe, &Launch { args: args.to_vec(), env: env.to_vec(), verbose }, None, timeout).await
    }

    /// Spawns the agent `how` describes from `exe`, enlisted in `crew` (if
    /// any) from the moment it runs: if it ends before this driver stops
    /// it, the crew learns at once.
    pub async fn launch(exe: &std::path::Path, how: &Launch, crew: Option<&Crew>, timeout: Duration) -> anyhow::Result<AgentProcess> {
        let args = &how.args;
        let mut cmd = Command::new(exe);
        cmd.env(crate::agent::auth::SECRET_VAR, crate::agent::auth::driver_secret());
        for (k, v) in &how.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let started = std::time::Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("spawning `{} {}`", exe.display(), args.join(" ")))?;
        let mut name = AgentName::from_args(args);
        name.pid = child.id();
        let log = LogTail::default();
        let stderr = child.stderr.take().context("agent stderr")?;
        let (tail, verbose) = (log.clone(), how.verbose);
        let prefix = name.short();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if verbose || loud(&line) {
                    eprintln!("[{prefix}] {line}");
                }
                tail.push(line);
            }
        });
        let stdout = child.stdout.take().context("agent stdout")?;
        let (ended_tx, ended) = watch::channel(None);
        let (kill, killed) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                _ = killed => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let _ = ended_tx.send(Some(Ended::from_status(status)));
        });
        let mut watch = Watch { name, log, ended, expected: Arc::new(AtomicBool::new(false)), kill: Some(kill) };
        let mut lines = BufReader::new(stdout).lines();
        let ready = match tokio::time::timeout(timeout, next_json(&mut lines, |v| v["event"] == "ready")).await {
            Err(_) => return Err(watch.not_ready(format!("was not ready within {timeout:?}"), None, started.elapsed())),
            Ok(r) => match r? {
                Some(r) => r,
                None => {
                    let ended = watch.wait_end(Duration::from_secs(5)).await;
                    // Its last words may still be in the pipe.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let how = ended.as_ref().map_or("ended".to_string(), |e| e.how.clone());
                    return Err(watch.not_ready(format!("{how} before it was ready"), ended.as_ref(), started.elapsed()));
                }
            },
        };
        drain(lines);
        let listen = ready["listen"].as_str().context("ready line without listen")?.to_string();
        if let Some(id) = ready["agent_id"].as_str() {
            watch.name.agent_id = id.to_string();
        }
        watch.name.address = listen.clone();
        let control = match ready["local_socket"].as_str() {
            // The local API is the way in when the agent's TCP address is
            // not reachable from here (another network namespace).
            Some(path) => control_at(&format!("unix:{path}"), None).await,
            None => control_at(&listen, None).await,
        }
        .with_context(|| format!("cannot reach {} at {listen}", watch.name.describe()))?;
        let p = AgentProcess { name: watch.name.clone(), ready, listen, control, log: watch.log.clone(), watch };
        if let Some(crew) = crew {
            p.enlist(crew);
        }
        Ok(p)
    }

    /// Reports this agent's end to `crew` unless this driver stopped it.
    pub fn enlist(&self, crew: &Crew) {
        crew.enlist(self.name.clone(), self.watch.expected.clone(), self.log.clone());
        let (mut ended, expected, crew) = (self.watch.ended.clone(), self.watch.expected.clone(), crew.clone());
        let (name, log) = (self.name.clone(), self.log.clone());
        tokio::spawn(async move {
            let Ok(e) = ended.wait_for(Option::is_some).await.map(|e| e.clone()) else { return };
            if expected.load(Ordering::SeqCst) {
                return;
            }
            // Its last words may still be in the pipe.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let e = e.expect("ended");
            tracing::debug!(agent = %name.describe(), how = %e.how, "agent ended while the run needed it");
            crew.fail(Failure::agent_ended(&name, &e, log.lines(), crew.elapsed()));
        });
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.name.pid.filter(|_| self.watch.ended.borrow().is_none())
    }

    /// How the process ended, if it has.
    pub fn ended(&self) -> Option<Ended> {
        self.watch.ended.borrow().clone()
    }

    /// Kills the agent now (SIGKILL, as a crash would) and waits for it;
    /// no crew hears of it.
    pub async fn kill(&mut self) -> Option<Ended> {
        self.watch.expected.store(true, Ordering::SeqCst);
        if let Some(k) = self.watch.kill.take() {
            let _ = k.send(());
        }
        self.watch.wait_end(Duration::from_secs(10)).await
    }

    /// Stops the agent (SIGTERM, then SIGKILL after `grace`).
    pub async fn stop_within(mut self, grace: Duration) {
        self.watch.expected.store(true, Ordering::SeqCst);
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
            if self.watch.wait_end(grace).await.is_some() {
                return;
            }
        }
        self.kill().await;
    }

    /// Stops the agent (SIGTERM, then SIGKILL after 5 s).
    pub async fn stop(self) {
        self.stop_within(Duration::from_secs(5)).await
    }
}

impl Drop for AgentProcess {
    /// Dropping the handle kills a running agent on purpose: no failure.
    /// One that has already ended (reaped, or a zombie still) ended on its
    /// own, and stays a failure: a run that unwinds on its broken
    /// connection drops its agents before the crew has heard why.
    fn drop(&mut self) {
        let alive = self.watch.ended.borrow().is_none() && self.name.pid.is_some_and(|p| super::crew::proc_end(p).is_none());
        if alive {
            self.watch.expected.store(true, Ordering::SeqCst);
        }
    }
}

/// Waits until the agent behind `control` has pre-faulted its view of every
/// peer region (`Stats.prefaulting` is 0), so a measurement that follows
/// sees the steady state, as the raw-UCX loop does (it waits for the same
/// work).
pub async fn prefaulted(control: &mut Control, limit: Duration) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    loop {
        let s = control.stats(pb::StatsRequest {}).await?.into_inner();
        if s.prefaulting == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < limit,
            "agent {} still pre-faulting {} peer mapping(s) after {limit:?}",
            s.agent_id,
            s.prefaulting
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_warnings_and_worse_are_loud() {
        assert!(loud("2026-12-03T06:00:00Z  WARN kvrail_agent: session ended"));
        assert!(loud("[1795460185.286911] [vm:1:0] select.c:549 UCX  ERROR no transport"));
        assert!(!loud("2026-12-03T06:00:00Z  INFO kvrail_agent: agent started"));
    }
}
