//! Agent child processes for the drivers (demo, bench, soak): spawn
//! `kvrail decode` / `kvrail prefill`, wait for their ready line, connect a
//! Control client, and kill them when dropped.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use kvrail_proto::v1 as pb;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader, Lines};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::cmd::serve::MAX_MESSAGE;
use crate::drive::workload::Control;

/// A gRPC channel over the Unix socket at `path`.
pub async fn unix_channel(path: std::path::PathBuf) -> anyhow::Result<Channel> {
    let ch = tonic::transport::Endpoint::try_from("http://local.socket")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await?;
    Ok(ch)
}

/// A Control client for `host:port` (over TLS with `tls`) or `unix:PATH`.
pub async fn control_at(addr: &str, tls: Option<&crate::tls::Tls>) -> anyhow::Result<Control> {
    let channel = match addr.strip_prefix("unix:") {
        Some(path) => unix_channel(path.into()).await?,
        None => crate::tls::endpoint(addr, tls)?.connect().await.with_context(|| format!("connecting to the agent at {addr}"))?,
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

/// A running agent process.
#[derive(Debug)]
pub struct AgentProcess {
    pub child: Child,
    pub ready: serde_json::Value,
    pub listen: String,
    pub control: Control,
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
        let mut cmd = Command::new(exe);
        cmd.env(crate::agent::auth::SECRET_VAR, crate::agent::auth::driver_secret());
        for (k, v) in env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        if !verbose {
            cmd.arg("--log-level").arg("warn");
        }
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true);
        let mut child = cmd.spawn().context("spawning an agent process")?;
        let stdout = child.stdout.take().context("agent stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(timeout, next_json(&mut lines, |v| v["event"] == "ready"))
            .await
            .map_err(|_| anyhow::anyhow!("agent `kvrail {}` not ready within {timeout:?}", args.join(" ")))??
            .with_context(|| format!("agent `kvrail {}` exited before it was ready", args.join(" ")))?;
        drain(lines);
        let listen = ready["listen"].as_str().context("ready line without listen")?.to_string();
        let control = match ready["local_socket"].as_str() {
            // The local API is the way in when the agent's TCP address is
            // not reachable from here (another network namespace).
            Some(path) => control_at(&format!("unix:{path}"), None).await?,
            None => control_at(&listen, None).await?,
        };
        Ok(AgentProcess { child, ready, listen, control })
    }

    /// Stops the agent (SIGTERM, then SIGKILL after a grace period).
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
            if tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await.is_ok() {
                return;
            }
        }
        let _ = self.child.kill().await;
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
