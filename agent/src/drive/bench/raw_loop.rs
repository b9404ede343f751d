//! The raw-UCX side of a run: the two `kvrail raw-ucx` processes, connected,
//! driven pass by pass over their stdin.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use kvrail_transfer::Transport;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::geometry_args;
use super::placement::pin_args;
use crate::cli::{BenchArgs, Mode};
use crate::drive::children::{drain, next_json};

/// The two raw-UCX processes, connected (the initiator's view of the
/// target's region pre-faulted), the target resting between passes.
pub(super) struct RawLoop {
    /// `None` with `--raw-peer`: the target runs elsewhere, and `target_in`
    /// is the connection to it.
    target: Option<tokio::process::Child>,
    target_in: Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
    /// Whether the target progresses during a pass: only where it takes
    /// part (tcp deliveries). A one-sided put or get on `sm` needs nothing
    /// of it, and kvrail's passive agent sleeps through one too, so the
    /// two sides differ only in the engine (see the README).
    serves: bool,
    init: tokio::process::Child,
    init_in: tokio::process::ChildStdin,
    init_out: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl RawLoop {
    pub(super) async fn start(a: &BenchArgs, t: Transport, block: u64, mode: Mode) -> anyhow::Result<RawLoop> {
        let exe = std::env::current_exe()?;
        let spawn = |role: &str| -> anyhow::Result<(tokio::process::Child, tokio::process::ChildStdin, _)> {
            let mut v = vec!["--log-level".into(), "warn".into(), "raw-ucx".into(), "--role".into(), role.into()];
            v.extend(geometry_args(a, t, block));
            v.extend(["--mode".into(), mode.name().into(), "--request-bytes".into(), a.request_bytes.to_string()]);
            // Blocks flow into the target on writes and deliveries (tcp,
            // both modes) and into the initiator on reads; the receiving
            // side takes the decode agent's CPU.
            let into_target = matches!(mode, Mode::Write) || t.writes_as_messages();
            let receives = (role == "target") == into_target;
            v.extend(pin_args(a, usize::from(!receives)));
            v.extend(["--seed".into(), a.out.seed.to_string()]);
            let mut child =
                tokio::process::Command::new(&exe).args(v).stdin(Stdio::piped()).stdout(Stdio::piped()).kill_on_drop(true).spawn()?;
            let stdin = child.stdin.take().context("raw-UCX stdin")?;
            let lines = BufReader::new(child.stdout.take().context("raw-UCX stdout")?).lines();
            Ok((child, stdin, lines))
        };
        let limit = Duration::from_secs(60);
        let (target, mut target_in, ready): (_, Box<dyn tokio::io::AsyncWrite + Unpin + Send>, _) = match &a.raw_peer {
            Some(addr) => {
                let conn = tokio::net::TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("connecting to the raw-UCX target at {addr} (`kvrail raw-ucx --role target --listen`)"))?;
                let (rd, wr) = conn.into_split();
                let ready =
                    read_json(&mut BufReader::new(rd).lines(), "rkey", limit).await.with_context(|| format!("raw-UCX target at {addr}"))?;
                (None, Box::new(wr), ready)
            }
            None => {
                let (target, target_in, mut target_out) = spawn("target")?;
                let ready = read_json(&mut target_out, "rkey", limit).await.context("raw-UCX target")?;
                // UCX may log to its stdout.
                drain(target_out);
                (Some(target), Box::new(target_in), ready)
            }
        };
        let (init, mut init_in, mut init_out) = spawn("initiator")?;
        // Connecting (wire-up, warm-up operation) needs the target's
        // progress.
        target_in.write_all(b"serve\n").await?;
        init_in.write_all(format!("{ready}\n").as_bytes()).await?;
        read_json(&mut init_out, "event", limit).await.context("raw-UCX initiator")?;
        target_in.write_all(b"rest\n").await?;
        Ok(RawLoop { target, target_in, serves: t.writes_as_messages(), init, init_in, init_out })
    }

    /// One pass of `n` blocks; returns its seconds.
    pub(super) async fn pass(&mut self, n: usize) -> anyhow::Result<f64> {
        if self.serves {
            self.target_in.write_all(b"serve\n").await?;
        }
        self.init_in.write_all(format!("{n}\n").as_bytes()).await?;
        let done = read_json(&mut self.init_out, "seconds", Duration::from_secs(600)).await.context("raw-UCX pass")?;
        if self.serves {
            self.target_in.write_all(b"rest\n").await?;
        }
        done["seconds"].as_f64().context("raw-UCX pass without seconds")
    }

    pub(super) async fn stop(self) {
        let RawLoop { target, target_in, init, init_in, .. } = self;
        drop((init_in, target_in));
        for mut child in std::iter::once(init).chain(target) {
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }
}

/// The next JSON object with `key` on `lines`, within `limit`; other lines
/// (UCX may log to stdout too) are skipped.
async fn read_json(
    lines: &mut tokio::io::Lines<BufReader<impl tokio::io::AsyncRead + Unpin>>,
    key: &str,
    limit: Duration,
) -> anyhow::Result<serde_json::Value> {
    tokio::time::timeout(limit, next_json(lines, |v| v.get(key).is_some()))
        .await
        .map_err(|_| anyhow::anyhow!("no line holding `{key}` within {limit:?}"))??
        .with_context(|| format!("exited without a line holding `{key}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_json_skips_to_the_key_and_reports_an_early_exit() {
        let log = "[1795460185.286911] [vm:1:0] select.c:549 UCX ERROR no active messages transport";
        let text = format!("{log}\n{{\"event\":\"ready\"}}\n{{\"bytes\":1,\"seconds\":0.5}}\n{{\"seconds\":2}}\n");
        let mut lines = BufReader::new(text.as_bytes()).lines();
        // A UCX log line and a JSON line without the key are skipped.
        assert_eq!(read_json(&mut lines, "seconds", Duration::from_secs(1)).await.unwrap()["seconds"], 0.5);
        assert_eq!(read_json(&mut lines, "seconds", Duration::from_secs(1)).await.unwrap()["seconds"], 2);
        let e = read_json(&mut lines, "seconds", Duration::from_secs(1)).await.unwrap_err();
        assert!(e.to_string().contains("exited without a line holding `seconds`"), "{e}");
        let mut lines = BufReader::new(text.as_bytes()).lines();
        assert_eq!(read_json(&mut lines, "event", Duration::from_secs(1)).await.unwrap()["event"], "ready");
    }
}
