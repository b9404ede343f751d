//! The session table in memory: no processes, sockets or clocks. Session
//! handles and request waiters are plain numbers; time is an `Instant`
//! moved by hand.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use kvrail_transfer::BlockLayout;
use proptest::prelude::*;

use super::*;
use crate::agent::convert::status_of;
use crate::agent::error::AgentError;

const LEASE: Duration = Duration::from_secs(5);
const MS: Duration = Duration::from_millis(1);

type T = SessionTable<u32, u32>;

fn layout() -> BlockLayout {
    BlockLayout::new(4096, 64, 2, 4096, 64 * 4096).unwrap()
}

fn table() -> T {
    T::new("prefill agent", LEASE)
}

/// Admits `peer` with session handle `io` and opens its stream.
fn open(t: &mut T, peer: &str, io: u32, now: Instant) -> (Epoch, Vec<Effect<u32, u32>>) {
    let sid = format!("s-{peer}-{io}");
    let (epoch, fx) = t.admit(peer, sid.clone(), layout(), io, now);
    t.open(&sid, now).unwrap();
    (epoch, fx)
}

fn ok(request_id: &str, order: u64) -> Completion {
    Completion { request_id: request_id.into(), order, result: Ok(Moved { bytes: 10, ops: 1 }) }
}

/// Requests ended by these effects, with the failure's kind.
fn ended(fx: &[Effect<u32, u32>]) -> BTreeMap<String, ErrorKind> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::End { request_id, failure, .. } => Some((request_id.clone(), failure.kind)),
            _ => None,
        })
        .collect()
}

fn dropped(fx: &[Effect<u32, u32>]) -> Vec<(String, CloseReason)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Drop { peer, reason, .. } => Some((peer.clone(), reason.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_restart_under_the_same_id_fences_the_old_epoch() {
    let now = Instant::now();
    let mut t = table();
    let (old, _) = open(&mut t, "p", 1, now);
    let o1 = t.start("r", "p", old, RequestKind::PeerWrites, 100).unwrap();
    // The prefill agent restarts and handshakes again under its id.
    let (new, fx) = t.admit("p", "s-p-2".into(), layout(), 2, now + MS);
    assert_ne!(new, old);
    assert_eq!(ended(&fx), BTreeMap::from([("r".to_string(), ErrorKind::Unavailable)]), "its earlier request fails, UNAVAILABLE");
    assert!(matches!(&fx[..], [Effect::End { waiter: 100, failure, .. }, Effect::Drop { io: 1, reason: CloseReason::Replaced, .. }]
        if failure.message.contains("re-handshaked")));
    t.open("s-p-2", now + MS).unwrap();
    // The same request id runs again on the new session.
    let o2 = t.start("r", "p", new, RequestKind::PeerWrites, 200).unwrap();
    assert_ne!(o1, o2);
    // A late completion of the old session must not finish the new request.
    assert_eq!(t.completion(old, ok("r", o1), now + 2 * MS), Routed::Fenced);
    assert_eq!(t.fenced(), 1);
    assert!(t.is_pending("r", o2));
    // Nor does anything else of the old epoch count for the new session.
    assert!(!t.heard(old, now + 2 * MS));
    assert_eq!(t.close(old, CloseReason::StreamEnded, now + 2 * MS), vec![], "the old stream ending late changes nothing");
    assert_eq!(t.state("p"), Some(SessionState::Open));
    assert_eq!(t.fenced(), 2);
    // The new session's completion applies.
    assert!(matches!(t.completion(new, ok("r", o2), now + 3 * MS), Routed::Apply { waiter: 200, outcome: Ok(_), .. }));
    assert_eq!(t.pending(), 0);
}

#[test]
fn a_completion_of_an_earlier_run_of_a_reused_id_is_fenced() {
    let now = Instant::now();
    let mut t = table();
    let (e, _) = open(&mut t, "p", 1, now);
    let o1 = t.start("r", "p", e, RequestKind::PeerWrites, 1).unwrap();
    assert_eq!(t.finish("r", o1), Some(1), "its deadline passed");
    assert_eq!(t.completion(e, ok("r", o1), now), Routed::Unknown, "late, and nothing waits for it");
    let o2 = t.start("r", "p", e, RequestKind::PeerWrites, 2).unwrap();
    assert_eq!(t.completion(e, ok("r", o1), now), Routed::Fenced, "the first run's completion does not finish the second");
    assert_eq!(t.finish("r", o1), None, "nor does the first run's task");
    assert!(t.is_pending("r", o2));
}

#[test]
fn lease_expiry_fails_exactly_that_sessions_requests() {
    let t0 = Instant::now();
    let mut t = table();
    let (a, _) = open(&mut t, "a", 1, t0);
    let (b, _) = open(&mut t, "b", 2, t0);
    t.start("a1", "a", a, RequestKind::PeerWrites, 11).unwrap();
    t.start("a2", "a", a, RequestKind::PeerDelivers, 12).unwrap();
    t.start("b1", "b", b, RequestKind::PeerWrites, 21).unwrap();
    let rb = t.start("b2", "b", b, RequestKind::Local, 22).unwrap();
    // `a` keeps talking, `b` falls silent.
    assert!(t.heard(a, t0 + LEASE / 2));
    assert_eq!(t.poll(t0 + LEASE - MS), vec![], "not before a whole lease");
    let fx = t.poll(t0 + LEASE);
    assert_eq!(dropped(&fx), vec![("b".to_string(), CloseReason::LeaseExpired(LEASE))]);
    assert_eq!(ended(&fx), BTreeMap::from([("b1".to_string(), ErrorKind::Unavailable)]));
    assert!(fx.contains(&Effect::Stop { request_id: "b2".into(), waiter: 22 }), "b's read is stopped: {fx:?}");
    // b's read ends later: with the lease's failure, whatever its own error.
    let end = t.local_done("b2", rb, Err(Failure::new(ErrorKind::Cancelled, "stopped")));
    assert_eq!(end.notify, None);
    assert!(matches!(end.outcome, Err(Failure { kind: ErrorKind::Unavailable, ref message }) if message.contains("lease expired")));
    // a's requests are untouched.
    assert_eq!(t.pending(), 2);
    assert_eq!(t.state("a"), Some(SessionState::Open));
    let Err(e) = t.pick("b") else { panic!("b is gone") };
    assert_eq!(status_of(&e).code(), tonic::Code::NotFound);
    assert!(e.to_string().contains("lease expired"), "{e}");
    assert_eq!(t.poll(t0 + LEASE / 2 + LEASE - MS), vec![], "a was heard less than a lease ago");
    assert_eq!(dropped(&t.poll(t0 + LEASE / 2 + LEASE)), vec![("a".to_string(), CloseReason::LeaseExpired(LEASE))]);
}

#[test]
fn an_unopened_session_is_dropped_after_one_lease() {
    let t0 = Instant::now();
    let mut t = table();
    t.admit("p", "s1".into(), layout(), 7, t0);
    assert_eq!(t.state("p"), Some(SessionState::Handshaken));
    assert!(t.open_sessions().is_empty(), "not a peer until its stream opens");
    assert_eq!(t.poll(t0 + LEASE - MS), vec![]);
    let fx = t.poll(t0 + LEASE);
    assert!(matches!(&fx[..], [Effect::Drop { io: 7, reason: CloseReason::NeverOpened(_), .. }]), "{fx:?}");
    assert!(matches!(t.state("p"), Some(SessionState::Closed(CloseReason::NeverOpened(_)))));
    // Its stream, arriving late, is refused, and so is naming it.
    assert!(matches!(t.open("s1", t0 + LEASE), Err(AgentError::SessionGone { .. })));
    assert_eq!(status_of(&t.pick("p").unwrap_err()).code(), tonic::Code::NotFound);
    // Tombstones do not live for ever.
    t.poll(t0 + LEASE * 20);
    assert_eq!(t.state("p"), None);
}

#[test]
fn one_sessions_failure_leaves_the_others_untouched() {
    let now = Instant::now();
    let mut t = table();
    let mut epochs = Vec::new();
    for i in 0..8u32 {
        let peer = format!("p{i}");
        let (e, _) = open(&mut t, &peer, i, now);
        for r in 0..4u32 {
            let kind = if r % 2 == 0 { RequestKind::PeerWrites } else { RequestKind::PeerDelivers };
            t.start(&format!("{peer}-r{r}"), &peer, e, kind, i * 10 + r).unwrap();
        }
        epochs.push(e);
    }
    let fx = t.close(epochs[3], CloseReason::Broken("connection reset".into()), now);
    let failed: BTreeSet<String> = ended(&fx).into_keys().collect();
    assert_eq!(failed, (0..4).map(|r| format!("p3-r{r}")).collect::<BTreeSet<_>>());
    assert_eq!(dropped(&fx), vec![("p3".to_string(), CloseReason::Broken("connection reset".into()))]);
    assert_eq!(t.pending(), 28);
    assert_eq!(t.open_sessions().len(), 7);
}

#[test]
fn naming_rules() {
    let now = Instant::now();
    let code = |t: &T, name: &str| t.pick(name).map(|x| x.peer).map_err(|e| status_of(&e).code());
    let mut t = table();
    assert_eq!(code(&t, ""), Err(tonic::Code::FailedPrecondition), "no peer at all");
    assert_eq!(code(&t, "x"), Err(tonic::Code::NotFound));
    t.admit("half", "s-half".into(), layout(), 1, now);
    assert_eq!(code(&t, ""), Err(tonic::Code::Unavailable), "only a peer without its stream: retry");
    let e = t.pick("half").unwrap_err();
    assert_eq!(status_of(&e).code(), tonic::Code::Unavailable);
    assert!(e.to_string().contains("session stream"), "{e}");
    open(&mut t, "one", 2, now);
    assert_eq!(code(&t, ""), Ok("one".into()), "the only open one");
    assert_eq!(code(&t, "one"), Ok("one".into()));
    assert_eq!(code(&t, "x"), Err(tonic::Code::NotFound));
    open(&mut t, "two", 3, now);
    assert_eq!(code(&t, ""), Err(tonic::Code::InvalidArgument), "several: name one");
    assert_eq!(code(&t, "two"), Ok("two".into()));
}

#[test]
fn cancel_asks_the_writer_or_stops_the_reader() {
    let now = Instant::now();
    let mut t = table();
    let (e, _) = open(&mut t, "p", 9, now);
    let w = t.start("w", "p", e, RequestKind::PeerWrites, 1).unwrap();
    t.start("r", "p", e, RequestKind::Local, 2).unwrap();
    assert_eq!(t.cancel("w"), Some(Cancel::Order { io: 9, order: w }));
    assert_eq!(t.cancel("r"), Some(Cancel::Stop(2)));
    assert_eq!(t.cancel("nope"), None);
    assert!(t.is_pending("w", w), "a cancel changes nothing until the work has stopped");
}

#[test]
fn a_goodbye_is_not_a_failure_and_shutdown_says_goodbye_first() {
    let now = Instant::now();
    let mut t = table();
    let (a, _) = open(&mut t, "a", 1, now);
    t.admit("b", "s-b".into(), layout(), 2, now);
    t.start("r", "a", a, RequestKind::PeerWrites, 5).unwrap();
    let fx = t.close_all("the decode agent is shutting down", now);
    assert!(matches!(&fx[0], Effect::Goodbye { io: 1, reason } if reason.contains("shutting down")), "{fx:?}");
    assert_eq!(ended(&fx), BTreeMap::from([("r".to_string(), ErrorKind::Unavailable)]));
    assert_eq!(dropped(&fx).len(), 2, "the unopened session drops too, without a goodbye (it has no stream)");
    assert!(dropped(&fx).iter().all(|(_, r)| !r.is_failure()));
    assert!(!CloseReason::Goodbye("bye".into()).is_failure());
    assert!(CloseReason::StreamEnded.is_failure() && CloseReason::LeaseExpired(LEASE).is_failure());
    assert!(matches!(t.start("r2", "a", a, RequestKind::PeerWrites, 6), Err(AgentError::SessionEnded { .. })));
}

#[test]
fn a_delivery_reported_done_by_the_peer_is_an_internal_fault() {
    let now = Instant::now();
    let mut t = table();
    let (e, _) = open(&mut t, "p", 1, now);
    let o = t.start("d", "p", e, RequestKind::PeerDelivers, 1).unwrap();
    let Routed::Apply { outcome: Err(f), .. } = t.completion(e, ok("d", o), now) else { panic!("applied") };
    assert_eq!(f.kind, ErrorKind::Internal);
}

/// One step of the random sessions below.
#[derive(Debug, Clone)]
enum Step {
    /// Peer `p` handshakes (again) and opens its stream.
    Restart(u8),
    /// A request starts on peer `p`'s current session.
    Start(u8, bool),
    /// Something completes request `i` (of those started), from its own
    /// session or from the one before it.
    Complete(usize, bool),
    /// Peer `p` is heard.
    Hear(u8),
    /// Time passes (tenths of a lease), then the lease tick.
    Tick(u8),
    /// Peer `p`'s stream breaks.
    Break(u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..3).prop_map(Step::Restart),
        (0u8..3, any::<bool>()).prop_map(|(p, read)| Step::Start(p, read)),
        (0usize..64, any::<bool>()).prop_map(|(i, stale)| Step::Complete(i, stale)),
        (0u8..3).prop_map(Step::Hear),
        (1u8..8).prop_map(Step::Tick),
        (0u8..3).prop_map(Step::Break),
    ]
}

proptest! {
    /// Whatever happens, a request's waiter is handed out at most once,
    /// only by its own session, and every request has ended once every
    /// session has closed.
    #[test]
    fn every_request_ends_exactly_once_and_only_from_its_own_session(steps in proptest::collection::vec(step(), 1..80)) {
        let mut now = Instant::now();
        let mut t = table();
        // Per peer: (current epoch, the epoch before it).
        let mut epochs: BTreeMap<u8, (Epoch, Option<Epoch>)> = BTreeMap::new();
        // Started requests: (id, peer, epoch, order, local work).
        let mut started: Vec<(String, u8, Epoch, u64, bool)> = Vec::new();
        let mut ended_ids: BTreeSet<u32> = BTreeSet::new();
        let mut io = 0u32;
        // Effects end requests of the sessions they drop, each once.
        let on_effects = |fx: Vec<Effect<u32, u32>>, started: &[(String, u8, Epoch, u64, bool)], ended_ids: &mut BTreeSet<u32>| {
            let gone: BTreeSet<Epoch> = fx.iter().filter_map(|e| match e { Effect::Drop { epoch, .. } => Some(*epoch), _ => None }).collect();
            for e in fx {
                if let Effect::End { waiter, .. } | Effect::Stop { waiter, .. } = &e {
                    prop_assert!(gone.contains(&started[*waiter as usize].2), "request {} ended by another session's close", waiter);
                }
                if let Effect::End { waiter, .. } = e {
                    prop_assert!(ended_ids.insert(waiter), "request {} ended twice", waiter);
                }
            }
            Ok(())
        };
        for s in steps {
            match s {
                Step::Restart(p) => {
                    io += 1;
                    let (e, fx) = open(&mut t, &format!("p{p}"), io, now);
                    on_effects(fx, &started, &mut ended_ids)?;
                    let before = epochs.get(&p).map(|x| x.0);
                    epochs.insert(p, (e, before));
                }
                Step::Start(p, local) => {
                    if let Some(&(e, _)) = epochs.get(&p) {
                        let n = started.len() as u32;
                        let kind = if local { RequestKind::Local } else { RequestKind::PeerWrites };
                        if let Ok(order) = t.start(&format!("r{n}"), &format!("p{p}"), e, kind, n) {
                            started.push((format!("r{n}"), p, e, order, local));
                        }
                    }
                }
                Step::Complete(i, stale) => {
                    let Some((id, p, e, order, local)) = started.get(i).cloned() else { continue };
                    if local {
                        let pending = t.is_pending(&id, order);
                        let end = t.local_done(&id, order, Ok(Moved::default()));
                        if pending {
                            prop_assert!(ended_ids.insert(i as u32), "local work {} ended twice", i);
                            prop_assert!(end.outcome.is_ok());
                        }
                        continue;
                    }
                    let from = if stale { epochs[&p].1.unwrap_or(Epoch(0)) } else { epochs[&p].0 };
                    if let Routed::Apply { waiter, .. } = t.completion(from, ok(&id, order), now) {
                        prop_assert_eq!(from, e, "applied from another session");
                        prop_assert!(ended_ids.insert(waiter), "request {} ended twice", waiter);
                    }
                }
                Step::Hear(p) => {
                    if let Some(&(e, _)) = epochs.get(&p) {
                        t.heard(e, now);
                    }
                }
                Step::Tick(tenths) => {
                    now += LEASE * u32::from(tenths) / 10;
                    let fx = t.poll(now);
                    on_effects(fx, &started, &mut ended_ids)?;
                }
                Step::Break(p) => {
                    if let Some(&(e, _)) = epochs.get(&p) {
                        let fx = t.close(e, CloseReason::Broken("reset".into()), now);
                        on_effects(fx, &started, &mut ended_ids)?;
                    }
                }
            }
        }
        let fx = t.close_all("bye", now);
        on_effects(fx, &started, &mut ended_ids)?;
        // Local work ends when its task reports, even after its session closed.
        for (i, (id, _, _, order, local)) in started.iter().enumerate() {
            if *local && t.is_pending(id, *order) {
                let end = t.local_done(id, *order, Err(Failure::new(ErrorKind::Cancelled, "stopped")));
                prop_assert_eq!(end.outcome.map_err(|f| f.kind), Err(ErrorKind::Unavailable), "a closed session's failure");
                prop_assert!(ended_ids.insert(i as u32));
            }
        }
        prop_assert_eq!(t.pending(), 0);
        prop_assert_eq!(ended_ids.len(), started.len(), "every request ended");
    }
}

#[test]
fn a_dialled_session_without_requests_closes_after_the_idle_timeout_with_a_goodbye() {
    let now = Instant::now();
    let idle = Duration::from_secs(60);
    let mut t = table().with_idle_timeout(Some(idle));
    let (dialled, _) = open(&mut t, "d", 1, now);
    t.mark_dialled(dialled, "10.0.0.7:5000");
    let (accepted, _) = open(&mut t, "a", 2, now);
    assert_eq!(t.find_address("10.0.0.7:5000").map(|x| x.peer), Some("d".to_string()));
    assert!(t.is_dialled("d") && !t.is_dialled("a"));
    // Kept alive by heartbeats, and busy: a pending request holds it open.
    let o = t.start("r", "d", dialled, RequestKind::PeerWrites, 10).unwrap();
    let later = now + idle + MS;
    assert!(t.heard(dialled, later) && t.heard(accepted, later));
    assert!(t.poll(later).is_empty(), "a session with a pending request is not idle");
    assert!(matches!(t.completion(dialled, ok("r", o), later), Routed::Apply { .. }));
    t.record("d", dialled, &Ok(Moved { bytes: 10, ops: 1 }), later);
    let quiet = later + idle - MS;
    assert!(t.heard(dialled, quiet) && t.heard(accepted, quiet));
    assert!(t.poll(quiet).is_empty(), "idle counts from the last request's end");
    let gone = later + idle;
    assert!(t.heard(dialled, gone) && t.heard(accepted, gone));
    let fx = t.poll(gone);
    assert!(matches!(&fx[0], Effect::Goodbye { io: 1, reason } if reason.contains("no request")), "{fx:?}");
    assert_eq!(dropped(&fx), vec![("d".to_string(), CloseReason::Idle(idle))]);
    assert!(!CloseReason::Idle(idle).is_failure(), "an idle close is orderly");
    // The session the peer dialled stays, however idle.
    assert_eq!(t.open_sessions().into_iter().map(|(p, _)| p).collect::<Vec<_>>(), vec!["a".to_string()]);
    assert!(t.find_address("10.0.0.7:5000").is_none());
}

#[test]
fn stats_count_each_session_s_requests_and_a_new_epoch_starts_afresh() {
    let now = Instant::now();
    let mut t = table();
    let (e1, _) = open(&mut t, "p", 1, now);
    t.record("p", e1, &Ok(Moved { bytes: 100, ops: 2 }), now);
    t.record("p", e1, &Err(Failure::new(ErrorKind::Unavailable, "x")), now);
    t.start("r", "p", e1, RequestKind::PeerWrites, 7).unwrap();
    let s = &t.peer_stats(now + Duration::from_secs(3))[0];
    assert_eq!((s.bytes, s.requests_ok, s.requests_failed, s.pending, s.epoch), (100, 1, 1, 1, e1));
    assert_eq!((s.state.clone(), s.age, s.address.clone()), (SessionState::Open, Duration::from_secs(3), None));
    let (e2, _) = t.admit("p", "s2".into(), layout(), 2, now + MS);
    // A late end of the old epoch's request is not the new session's.
    t.record("p", e1, &Ok(Moved { bytes: 5, ops: 1 }), now + MS);
    let s = &t.peer_stats(now + MS)[0];
    assert_eq!((s.epoch, s.bytes, s.requests_ok, s.pending, s.state.clone()), (e2, 0, 0, 0, SessionState::Handshaken));
}
