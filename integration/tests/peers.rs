//! Many peers per agent: a decode agent dials prefill agents on demand
//! (the first request to an address handshakes, later ones reuse the
//! session, an idle one closes), a prefill agent serves several decode
//! agents, and a peer killed mid-transfer fails only its own requests while
//! the others keep their throughput.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvrail_integration::{kvrail_bin, AgentProcess};
use kvrail_proto::v1 as pb;

/// Blocks of one request, and requests in flight per prefill agent.
const REQ_BLOCKS: u32 = 32;
const PER_PEER: usize = 2;
const LEASE_SECS: f64 = 2.0;

fn args(role: &str, id: &str, extra: &[&str]) -> Vec<String> {
    let lease = LEASE_SECS.to_string();
    let base = [role, "--agent-id", id, "--transport", "sm", "--region-bytes", "64MiB", "--block-bytes", "64KiB", "--test-patterns"];
    base.iter().chain(["--lease-secs", lease.as_str()].iter()).chain(extra).map(|s| s.to_string()).collect()
}

async fn spawn(a: Vec<String>) -> AgentProcess {
    AgentProcess::spawn_exe(&kvrail_bin(), &a, false, Duration::from_secs(60)).await.expect("agent starts")
}

fn write(id: &str, peer: &str, addr: &str, src: Vec<u32>, dst: Vec<u32>) -> pb::SubmitRequest {
    pb::SubmitRequest {
        request_id: id.into(),
        peer: peer.into(),
        peer_address: addr.into(),
        mode: pb::TransferMode::Write as i32,
        src_blocks: src,
        dst_blocks: dst,
    }
}

/// One finished request of the load: which prefill agent, when, how.
#[derive(Debug, Clone)]
struct Done {
    peer: usize,
    at: Instant,
    bytes: u64,
    error: Option<(i32, String)>,
}

/// Keeps `PER_PEER` requests in flight to each prefill agent (by address
/// only) until `stop`; prefill agent `i` writes its blocks 0..32 into the
/// decode agent's blocks `i*256..`. A prefill agent's loop stops at its
/// first failure.
fn load(decode: &AgentProcess, addrs: &[String], stop: Arc<AtomicBool>, log: Arc<Mutex<Vec<Done>>>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        for lane in 0..PER_PEER {
            let (mut control, addr, stop, log) = (decode.control.clone(), addr.clone(), stop.clone(), log.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let src: Vec<u32> = (0..REQ_BLOCKS).collect();
                    let base = i as u32 * 256 + lane as u32 * REQ_BLOCKS;
                    let dst: Vec<u32> = (base..base + REQ_BLOCKS).collect();
                    let id = format!("load-{i}-{lane}-{n}");
                    n += 1;
                    let r = control.transfer(write(&id, "", &addr, src, dst)).await;
                    let at = Instant::now();
                    let done = match r {
                        Ok(w) => {
                            let w = w.into_inner();
                            let error = (w.state != pb::RequestState::Done as i32).then(|| (w.code, w.error.clone()));
                            Done { peer: i, at, bytes: w.bytes, error }
                        }
                        Err(s) => Done { peer: i, at, bytes: 0, error: Some((s.code() as i32, s.message().to_string())) },
                    };
                    let failed = done.error.is_some();
                    log.lock().unwrap().push(done);
                    if failed {
                        return;
                    }
                }
            }));
        }
    }
    tasks
}

/// Bytes per second that prefill agent `peer` moved within [from, to).
fn rate(log: &[Done], peer: usize, from: Instant, to: Instant) -> f64 {
    let bytes: u64 = log.iter().filter(|d| d.peer == peer && d.error.is_none() && d.at >= from && d.at < to).map(|d| d.bytes).sum();
    bytes as f64 / (to - from).as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_four_prefill_agents_killed_mid_transfer_fails_only_its_own_requests() {
    let mut decode = spawn(args("decode", "m-decode", &[])).await;
    let mut prefills = Vec::new();
    for i in 0..4 {
        // No --peer: each waits for the decode agent to dial it.
        let mut p = spawn(args("prefill", &format!("m-prefill-{i}"), &[])).await;
        p.control.fill_pattern(pb::FillPatternRequest { seed: 10 + i as u64 }).await.unwrap();
        prefills.push(p);
    }
    let addrs: Vec<String> = prefills.iter().map(|p| p.listen.clone()).collect();
    let (stop, log) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
    let tasks = load(&decode, &addrs, stop.clone(), log.clone());
    // Every peer's first requests arrive together and share one handshake:
    // each prefill agent admitted the decode agent once (epoch 1).
    tokio::time::sleep(Duration::from_secs(1)).await;
    for p in &mut prefills {
        let s = p.control.stats(pb::StatsRequest {}).await.unwrap().into_inner();
        let epochs: Vec<u64> = s.peer_stats.iter().map(|x| x.epoch).collect();
        assert_eq!(epochs, vec![1], "{}: one handshake with the decode agent: {:?}", s.agent_id, s.peer_stats);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed_at = Instant::now();
    let victim = 3;
    prefills[victim].kill().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t).await.expect("every request ends").unwrap();
    }
    let log = log.lock().unwrap().clone();

    // The victim's requests in flight at the kill fail within the lease,
    // naming it.
    let lost: Vec<&Done> = log.iter().filter(|d| d.peer == victim && d.error.is_some()).collect();
    assert_eq!(lost.len(), PER_PEER, "each of its lanes stops at its first failure: {lost:?}");
    for d in &lost {
        let (code, msg) = d.error.clone().unwrap();
        assert_eq!(code, tonic::Code::Unavailable as i32, "{msg}");
        assert!(msg.contains("m-prefill-3"), "the failure names the dead peer: {msg}");
        assert!(
            d.at >= killed_at && d.at - killed_at < Duration::from_secs_f64(LEASE_SECS),
            "failed {:?} after the kill",
            d.at - killed_at
        );
    }
    // The three others: every request succeeded, before and after.
    let failed: Vec<&Done> = log.iter().filter(|d| d.peer != victim && d.error.is_some()).collect();
    assert!(failed.is_empty(), "a survivor's request failed: {failed:?}");
    let window = Duration::from_secs(3);
    for peer in 0..3 {
        let before = rate(&log, peer, killed_at - window, killed_at);
        let after = rate(&log, peer, killed_at, killed_at + window);
        assert!(before > 0.0, "prefill {peer} moved nothing before the kill");
        assert!(after >= 0.5 * before, "prefill {peer}: {:.0} MB/s after the kill against {:.0} before", after / 1e6, before / 1e6);
        eprintln!("prefill {peer}: {:.0} MB/s before the kill, {:.0} after", before / 1e6, after / 1e6);
    }
    // Their blocks are intact.
    for (i, p) in prefills.iter().enumerate().take(3) {
        let src: Vec<u32> = (0..REQ_BLOCKS).collect();
        let dst: Vec<u32> = (i as u32 * 256..i as u32 * 256 + REQ_BLOCKS).collect();
        let v = decode
            .control
            .verify_pattern(pb::VerifyPatternRequest { seed: 10 + i as u64, src_blocks: src, dst_blocks: dst })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((v.verified_blocks, v.bad_blocks), (REQ_BLOCKS as u64, 0), "{}: {v:?}", p.name.agent_id);
    }
    // Per-peer stats: the survivors' sessions open with their counts, the
    // victim's closed.
    let s = decode.control.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(s.peer_stats.len(), 4, "{:?}", s.peer_stats);
    for (i, p) in s.peer_stats.iter().enumerate() {
        assert_eq!((p.agent_id.as_str(), p.address.as_str()), (format!("m-prefill-{i}").as_str(), addrs[i].as_str()));
        let ok = log.iter().filter(|d| d.peer == i && d.error.is_none()).count() as u64;
        assert_eq!(p.requests_ok, ok, "{p:?}");
        assert_eq!(p.bytes, ok * REQ_BLOCKS as u64 * 65536, "{p:?}");
        if i == victim {
            assert!(p.state.starts_with("closed") && p.requests_failed == PER_PEER as u64, "{p:?}");
        } else {
            assert!(p.state == "open" && p.requests_failed == 0, "{p:?}");
        }
    }
    // A request to the dead address now fails on its dial, with its address
    // and a hint, UNAVAILABLE; the others are untouched.
    let src: Vec<u32> = (0..4).collect();
    let e = decode.control.transfer(write("to-the-dead", "", &addrs[victim], src.clone(), src.clone())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains(&addrs[victim]) && e.message().contains("--listen"), "{}", e.message());
    let w = decode.control.transfer(write("still-there", "m-prefill-0", "", src.clone(), src)).await.unwrap().into_inner();
    assert_eq!(w.state, pb::RequestState::Done as i32, "{w:?}");
    decode.stop().await;
    for p in prefills {
        p.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialled_session_is_reused_checked_and_closed_when_idle() {
    let mut decode = spawn(args("decode", "i-decode", &["--idle-timeout", "1500ms"])).await;
    let mut prefill = spawn(args("prefill", "i-prefill", &[])).await;
    prefill.control.fill_pattern(pb::FillPatternRequest { seed: 5 }).await.unwrap();
    let addr = prefill.listen.clone();
    let blocks: Vec<u32> = (0..8).collect();
    let run = |id: &str, peer: &str, addr: &str| write(id, peer, addr, blocks.clone(), blocks.clone());
    for (i, peer) in ["", "i-prefill", ""].iter().enumerate() {
        let w = decode.control.transfer(run(&format!("a{i}"), peer, &addr)).await.unwrap().into_inner();
        assert_eq!(w.state, pb::RequestState::Done as i32, "{w:?}");
    }
    // By id alone, now that it is connected.
    let w = decode.control.transfer(run("by-id", "i-prefill", "")).await.unwrap().into_inner();
    assert_eq!(w.state, pb::RequestState::Done as i32, "{w:?}");
    let s = prefill.control.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(s.peer_stats.iter().map(|p| (p.epoch, p.requests_ok)).collect::<Vec<_>>(), vec![(1, 4)], "one session, reused");
    // Bad input changes nothing.
    let e = decode.control.transfer(run("wrong-id", "someone-else", &addr)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("\"i-prefill\", not \"someone-else\""), "{}", e.message());
    let e = decode.control.transfer(run("bad-addr", "", "no-port")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // Idle: the decode agent says goodbye and the session closes on both sides.
    let start = Instant::now();
    loop {
        let info = decode.control.info(pb::InfoRequest {}).await.unwrap().into_inner();
        if info.peers.is_empty() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the idle session did not close: {:?}", info.peers);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(start.elapsed() >= Duration::from_millis(1000), "closed after {:?}, before its idle timeout", start.elapsed());
    let s = decode.control.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert!(s.peer_stats[0].state.contains("no request"), "{:?}", s.peer_stats);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = prefill.control.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert!(s.peer_stats[0].state.contains("said goodbye"), "the prefill agent heard the goodbye: {:?}", s.peer_stats);
    // The next request dials again: a new session.
    let w = decode.control.transfer(run("again", "", &addr)).await.unwrap().into_inner();
    assert_eq!(w.state, pb::RequestState::Done as i32, "{w:?}");
    let s = prefill.control.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(s.peer_stats.iter().map(|p| (p.epoch, p.state.as_str())).collect::<Vec<_>>(), vec![(2, "open")]);
    // `kvrail info --agent` lists it.
    let out = kvrail_integration::run_kvrail(&["info", "--agent", &decode.listen], Duration::from_secs(20));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("i-prefill") && text.contains(&addr) && text.contains("open"), "{text}");
    // A decode agent that stops says goodbye on the session it dialled too.
    decode.stop().await;
    let s = prefill.control.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert!(s.peer_stats[0].state.contains("said goodbye: the decode agent is shutting down"), "{:?}", s.peer_stats);
    prefill.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_agent_serves_several_decode_agents_and_is_not_dialled_twice() {
    let mut d1 = spawn(args("decode", "s-decode-1", &[])).await;
    let mut d2 = spawn(args("decode", "s-decode-2", &[])).await;
    let mut prefill = spawn(args("prefill", "s-prefill", &["--peer", &d1.listen, "--peer", &d2.listen])).await;
    prefill.control.fill_pattern(pb::FillPatternRequest { seed: 9 }).await.unwrap();
    let src: Vec<u32> = (0..64).collect();
    let dst: Vec<u32> = (0..64).map(|b| 1023 - b).collect();
    for (d, how) in [(&mut d1, ("", "")), (&mut d2, ("s-prefill", ""))] {
        let w = d.control.transfer(write("w", how.0, how.1, src.clone(), dst.clone())).await.unwrap().into_inner();
        assert_eq!(w.state, pb::RequestState::Done as i32, "{w:?}");
        let v = d
            .control
            .verify_pattern(pb::VerifyPatternRequest { seed: 9, src_blocks: src.clone(), dst_blocks: dst.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v.verified_blocks, 64, "{v:?}");
    }
    // A request naming the prefill agent's address finds the session it
    // dialled: no second handshake (its epochs stay 1 and 2).
    let w = d1.control.transfer(write("by-addr", "", &prefill.listen, src.clone(), dst.clone())).await.unwrap().into_inner();
    assert_eq!(w.state, pb::RequestState::Done as i32, "{w:?}");
    let s = prefill.control.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    let seen: Vec<(String, String, u64)> = s.peer_stats.iter().map(|p| (p.agent_id.clone(), p.state.clone(), p.requests_ok)).collect();
    assert_eq!(
        seen,
        vec![("s-decode-1".to_string(), "open".to_string(), 2), ("s-decode-2".to_string(), "open".to_string(), 1)],
        "{:?}",
        s.peer_stats
    );
    assert_eq!(s.peer_stats.iter().map(|p| p.address.clone()).collect::<Vec<_>>(), vec![d1.listen.clone(), d2.listen.clone()]);
    d1.stop().await;
    d2.stop().await;
    prefill.stop().await;
}

/// A decode agent's memory with 1 session, then with 16 (tcp: no peer
/// region is mapped into it), each session used once: what each extra
/// session costs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extra_peer_session_costs_the_decode_agent_under_a_mib() {
    let tcp = |role: &str, id: &str, extra: &[&str]| -> Vec<String> {
        [role, "--agent-id", id, "--transport", "tcp", "--region-bytes", "16MiB", "--block-bytes", "64KiB", "--test-patterns"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let mut decode = spawn(tcp("decode", "r-decode", &[])).await;
    let mut prefills = Vec::new();
    let mut figures = Vec::new();
    for n in [1usize, 16] {
        while prefills.len() < n {
            let i = prefills.len();
            prefills.push(spawn(tcp("prefill", &format!("r-prefill-{i}"), &["--peer", &decode.listen])).await);
            let blocks: Vec<u32> = (0..4).collect();
            let req = write(&format!("r{i}"), &format!("r-prefill-{i}"), "", blocks.clone(), blocks);
            let w = decode.control.transfer(req).await.unwrap().into_inner();
            assert_eq!(w.state, pb::RequestState::Done as i32, "{w:?}");
        }
        // Settled: the figures read fresh, after the sessions' first
        // heartbeats and their background work.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let s = decode.control.stats(pb::StatsRequest {}).await.unwrap().into_inner();
        assert_eq!(s.peer_stats.iter().filter(|p| p.state == "open").count(), n, "{:?}", s.peer_stats);
        let m = s.memory.unwrap();
        eprintln!(
            "decode agent with {n} session(s): VmRSS {} KiB, RssAnon {} KiB, heap {} KiB",
            m.vm_rss >> 10,
            m.rss_anon >> 10,
            m.heap >> 10
        );
        figures.push((m.vm_rss, m.rss_anon));
    }
    let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / 15.0 / (1 << 20) as f64;
    let (rss, anon) = (per(figures[0].0, figures[1].0), per(figures[0].1, figures[1].1));
    eprintln!("per extra session: VmRSS {rss:.3} MiB, RssAnon {anon:.3} MiB");
    assert!(rss < 1.0 && anon < 1.0, "an extra session costs {rss:.3} MiB of VmRSS, {anon:.3} MiB anonymous");
    decode.stop().await;
    for p in prefills {
        p.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialled_prefill_agent_restarted_under_its_id_gets_a_new_epoch_and_only_its_own_blocks_land() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let mut decode = spawn(args("decode", "e-decode", &[])).await;
    let prefill_args = args("prefill", "e-prefill", &["--listen", &addr]);
    let blocks: Vec<u32> = (0..16).collect();
    let dst: Vec<u32> = (100..116).collect();
    let mut epochs = Vec::new();
    for round in 0..2 {
        let mut prefill = spawn(prefill_args.clone()).await;
        prefill.control.fill_pattern(pb::FillPatternRequest { seed: 40 + round }).await.unwrap();
        decode.control.poison_blocks(pb::PoisonBlocksRequest { blocks: dst.clone() }).await.unwrap();
        let w = decode.control.transfer(write(&format!("e{round}"), "", &addr, blocks.clone(), dst.clone())).await.unwrap().into_inner();
        assert_eq!(w.state, pb::RequestState::Done as i32, "round {round}: {w:?}");
        // The blocks are the new process's: nothing of the old one landed.
        let v = decode
            .control
            .verify_pattern(pb::VerifyPatternRequest { seed: 40 + round, src_blocks: blocks.clone(), dst_blocks: dst.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((v.verified_blocks, v.bad_blocks), (16, 0), "round {round}: {v:?}");
        let s = decode.control.stats(pb::StatsRequest {}).await.unwrap().into_inner();
        let p = s.peer_stats.iter().find(|p| p.agent_id == "e-prefill").expect("listed");
        assert_eq!((p.state.as_str(), p.requests_ok), ("open", 1), "round {round}: {p:?}");
        epochs.push(p.epoch);
        if round == 0 {
            prefill.kill().await;
        } else {
            prefill.stop().await;
        }
    }
    assert!(epochs[1] > epochs[0], "the restarted agent's session is a new epoch: {epochs:?}");
    decode.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_to_a_prefill_agent_with_another_secret_is_refused_and_changes_nothing() {
    let mut decode = spawn(args("decode", "x-decode", &[])).await;
    let other = vec![(kvrail_agent::agent::auth::SECRET_VAR.to_string(), Some("another-secret-of-32-bytes-000000".to_string()))];
    let stranger =
        AgentProcess::spawn_env(&kvrail_bin(), &args("prefill", "x-stranger", &[]), &other, false, Duration::from_secs(60)).await.unwrap();
    let blocks: Vec<u32> = (0..4).collect();
    for i in 0..2 {
        let e = decode.control.transfer(write(&format!("x{i}"), "", &stranger.listen, blocks.clone(), blocks.clone())).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains(&stranger.listen) && e.message().contains("cluster secret"), "{}", e.message());
    }
    let s = decode.control.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert!(s.peer_stats.is_empty() && s.peers == 0, "nothing admitted: {:?}", s.peer_stats);
    decode.stop().await;
    stranger.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_that_hangs_stalls_no_other_peer_on_the_same_transfers_stream() {
    let mut decode = spawn(args("decode", "h-decode", &[])).await;
    let mut prefill = spawn(args("prefill", "h-prefill", &["--peer", &decode.listen])).await;
    prefill.control.fill_pattern(pb::FillPatternRequest { seed: 2 }).await.unwrap();
    // A peer that accepts the connection and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            conns.push(c);
        }
    });
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let blocks: Vec<u32> = (0..8).collect();
    tx.send(write("to-silent", "", &silent_addr, blocks.clone(), blocks.clone())).await.unwrap();
    tx.send(write("to-live", "h-prefill", "", blocks.clone(), blocks.clone())).await.unwrap();
    let t0 = Instant::now();
    let mut answers = decode.control.transfers(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let first = answers.message().await.unwrap().unwrap();
    assert_eq!((first.request_id.as_str(), first.state), ("to-live", pb::RequestState::Done as i32), "{first:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "the live peer's request waited {:?} behind the dial", t0.elapsed());
    let second = answers.message().await.unwrap().unwrap();
    assert_eq!((second.request_id.as_str(), second.code), ("to-silent", tonic::Code::Unavailable as i32), "{second:?}");
    assert!(second.error.contains(&silent_addr) && second.error.contains("no session within"), "{}", second.error);
    drop(tx);
    held.abort();
    decode.stop().await;
    prefill.stop().await;
}
