//! The transfer workload shared by `demo` and `soak`: one pass poisons the
//! destination blocks, runs the requests (timed, bounded concurrency), then
//! verifies every destination block against its source block's pattern.

use std::time::Instant;

use kvrail_proto::v1 as pb;
use rand::seq::SliceRandom;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// A Control API client.
pub type Control = pb::control_client::ControlClient<Channel>;

/// How requests are shaped.
#[derive(Debug, Clone, Default)]
pub struct Workload {
    pub seed: u64,
    pub mode: pb::TransferMode,
    pub request_blocks: usize,
    pub concurrency: usize,
    /// Process ids (decode, prefill) whose CPU time the timed part of each
    /// pass is charged (poisoning and verifying are not); a side that is
    /// not known (not a child of this process) is charged nothing.
    pub cpu_of: [Option<u32>; 2],
    /// The prefill agent the requests name (empty: the decode agent's only
    /// one).
    pub peer: String,
    /// Where that agent listens (empty: the decode agent knows it already).
    pub peer_address: String,
    /// The destination blocks a pass draws from (default: all of them):
    /// passes that run at once on one decode agent use disjoint windows.
    pub dst_window: Option<std::ops::Range<u32>>,
}

/// CPU seconds (user + system) process `pid` has used so far; 0 if unknown.
pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |x| x.1);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// What one or more passes did.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub blocks: u64,
    pub requests: u64,
    pub failed_requests: u64,
    pub seconds: f64,
    pub verified_blocks: u64,
    pub bad_blocks: u64,
    pub first_error: String,
    pub latencies_us: Vec<u64>,
    /// CPU seconds of (decode, prefill) while requests ran (see
    /// [`Workload::cpu_of`]).
    pub cpu_secs: [f64; 2],
}

impl Outcome {
    pub fn absorb(&mut self, o: Outcome) {
        self.blocks += o.blocks;
        self.requests += o.requests;
        self.failed_requests += o.failed_requests;
        self.seconds += o.seconds;
        self.verified_blocks += o.verified_blocks;
        self.bad_blocks += o.bad_blocks;
        if self.first_error.is_empty() {
            self.first_error = o.first_error;
        }
        self.latencies_us.extend(o.latencies_us);
        self.cpu_secs = [self.cpu_secs[0] + o.cpu_secs[0], self.cpu_secs[1] + o.cpu_secs[1]];
    }

    /// Every block verified and no request failed.
    pub fn verified(&self) -> bool {
        self.failed_requests == 0 && self.bad_blocks == 0 && self.verified_blocks == self.blocks
    }

    /// Percentile `p` (0..1) of request latency, in milliseconds.
    pub fn latency_ms(&self, p: f64) -> f64 {
        let mut l = self.latencies_us.clone();
        l.sort_unstable();
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1))).map_or(0.0, |&us| us as f64 / 1e3)
    }

    fn note(&mut self, e: String) {
        if self.first_error.is_empty() {
            self.first_error = e;
        }
    }
}

/// Submits one request and waits for its final state (`Control.Transfer`).
pub async fn run_request(control: &mut Control, req: pb::SubmitRequest) -> anyhow::Result<pb::WaitResponse> {
    Ok(control.transfer(req).await?.into_inner())
}

/// `n` (source, destination) block pairs drawn at random from `num_blocks`
/// on each side: the scattered mapping every benchmark and test uses.
pub fn scattered(rng: &mut impl rand::Rng, num_blocks: u32, n: usize) -> (Vec<u32>, Vec<u32>) {
    scattered_into(rng, num_blocks, 0..num_blocks, n)
}

/// `n` pairs drawn at random from `src_blocks` source blocks and the
/// destination blocks `dst` (n <= both counts).
pub fn scattered_into(rng: &mut impl rand::Rng, src_blocks: u32, dst: std::ops::Range<u32>, n: usize) -> (Vec<u32>, Vec<u32>) {
    let mut src: Vec<u32> = (0..src_blocks).collect();
    let mut dst: Vec<u32> = dst.collect();
    src.shuffle(rng);
    dst.shuffle(rng);
    src.truncate(n);
    dst.truncate(n);
    (src, dst)
}

/// A pass's blocks, drawn, with its destination blocks poisoned.
#[derive(Debug, Clone)]
pub struct Drawn {
    src: Vec<u32>,
    dst: Vec<u32>,
}

/// A pass's blocks moved: what it measured so far, and which requests
/// ended Done (by index).
#[derive(Debug)]
pub struct Moved {
    out: Outcome,
    done: Vec<usize>,
}

impl Workload {
    /// One pass of `n` blocks (n <= num_blocks, the source's block count,
    /// and the destination's or its window's): random source and
    /// destination blocks, `tag` makes the request ids unique.
    pub async fn pass(
        &self,
        decode: &mut Control,
        num_blocks: u32,
        n: usize,
        tag: &str,
        rng: &mut impl rand::Rng,
    ) -> anyhow::Result<Outcome> {
        let drawn = self.draw(decode, num_blocks, n, rng).await?;
        let moved = self.send(decode, &drawn, tag).await?;
        self.verify(decode, &drawn, moved).await
    }

    /// A pass's first step: its blocks drawn, the destination poisoned.
    pub async fn draw(&self, decode: &mut Control, num_blocks: u32, n: usize, rng: &mut impl rand::Rng) -> anyhow::Result<Drawn> {
        let dst_blocks = self.dst_window.clone().unwrap_or(0..num_blocks);
        let (src, dst) = scattered_into(rng, num_blocks, dst_blocks, n);
        decode.poison_blocks(pb::PoisonBlocksRequest { blocks: dst.clone() }).await?;
        Ok(Drawn { src, dst })
    }

    /// A pass's timed step: its requests, `concurrency` in flight.
    pub async fn send(&self, decode: &mut Control, drawn: &Drawn, tag: &str) -> anyhow::Result<Moved> {
        let Drawn { src, dst } = drawn;
        let mut out = Outcome { blocks: src.len() as u64, ..Default::default() };
        let cpu = || self.cpu_of.map(|p| p.map_or(0.0, cpu_secs));
        let cpu0 = cpu();
        let t0 = Instant::now();
        // One Transfers stream for the pass: `concurrency` requests in
        // flight, the next sent as each is answered.
        let mut requests =
            src.chunks(self.request_blocks).zip(dst.chunks(self.request_blocks)).enumerate().map(|(i, (s, d))| pb::SubmitRequest {
                request_id: format!("{tag}-{i}"),
                peer: self.peer.clone(),
                peer_address: self.peer_address.clone(),
                mode: self.mode as i32,
                src_blocks: s.to_vec(),
                dst_blocks: d.to_vec(),
            });
        // Only the blocks of requests that ended Done are verified: a failed
        // request's blocks were never promised (they count as unverified,
        // not as bad).
        let mut done: Vec<usize> = Vec::new();
        let concurrency = self.concurrency.max(1);
        let (submits, rx) = mpsc::channel(concurrency);
        let mut in_flight = 0;
        // The first requests are queued before the call: its answer stream
        // opens once the agent has the call.
        for req in requests.by_ref().take(concurrency) {
            submits.try_send(req).expect("room for `concurrency` requests");
            in_flight += 1;
        }
        let mut answers = decode.transfers(ReceiverStream::new(rx)).await?.into_inner();
        while in_flight > 0 {
            let Some(w) = answers.message().await? else {
                anyhow::bail!("the agent ended the Transfers stream with {in_flight} requests unanswered");
            };
            in_flight -= 1;
            if w.state == pb::RequestState::Done as i32 {
                out.latencies_us.push(w.latency_us);
                if let Some(i) = w.request_id.strip_prefix(tag).and_then(|r| r.strip_prefix('-')).and_then(|i| i.parse().ok()) {
                    done.push(i);
                }
            } else {
                out.failed_requests += 1;
                out.note(format!("request {} failed: {}", w.request_id, w.error));
            }
            if let Some(req) = requests.next() {
                submits.send(req).await?;
                in_flight += 1;
            }
        }
        out.requests = out.latencies_us.len() as u64 + out.failed_requests;
        out.seconds = t0.elapsed().as_secs_f64();
        let cpu1 = cpu();
        out.cpu_secs = [cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]];
        Ok(Moved { out, done })
    }

    /// A pass's last step: the blocks of the requests that ended Done,
    /// checked against the source's pattern.
    pub async fn verify(&self, decode: &mut Control, drawn: &Drawn, moved: Moved) -> anyhow::Result<Outcome> {
        let (Drawn { src, dst }, Moved { mut out, done }) = (drawn, moved);
        let (s_chunks, d_chunks): (Vec<&[u32]>, Vec<&[u32]>) =
            (src.chunks(self.request_blocks).collect(), dst.chunks(self.request_blocks).collect());
        let (src, dst): (Vec<u32>, Vec<u32>) = done
            .iter()
            .filter_map(|&i| Some((*s_chunks.get(i)?, *d_chunks.get(i)?)))
            .flat_map(|(s, d)| s.iter().copied().zip(d.iter().copied()))
            .unzip();
        for (s, d) in src.chunks(1 << 16).zip(dst.chunks(1 << 16)) {
            let v = decode
                .verify_pattern(pb::VerifyPatternRequest { seed: self.seed, src_blocks: s.to_vec(), dst_blocks: d.to_vec() })
                .await?
                .into_inner();
            out.verified_blocks += v.verified_blocks;
            out.bad_blocks += v.bad_blocks;
            if !v.first_error.is_empty() {
                out.note(v.first_error);
            }
        }
        Ok(out)
    }
}
