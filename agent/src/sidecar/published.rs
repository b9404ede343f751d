//! The prefill side's published requests: the blocks of a finished
//! prefill, held for the decode side under a lease until it has read them,
//! had them written into its own blocks (push mode), released them, or the
//! lease ran out. A pure table (no clock of its own,
//! no I/O): the service feeds it `now` and drains what finished.
//!
//! Each id finishes exactly once, whichever way, and is then reported once
//! by [`Published::take_finished`] (the engine's `finished_sending`). An id
//! may be published again after it finished.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::agent::error::{AgentError, ErrorKind, Failure};

/// Longest lease a publisher may ask for.
pub const MAX_LEASE: Duration = Duration::from_secs(600);

/// Lease when the publisher names none (vLLM's default `kv_lease_duration`).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// Why a published request stopped being held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ended {
    /// The decode side read it.
    Read,
    /// This agent wrote it into the decode side's blocks (push mode).
    Pushed,
    /// The decode side said it needs it no longer (a full prefix hit, an abort).
    Released,
    /// Nobody read, released or extended it in time.
    Expired,
}

#[derive(Debug)]
struct Entry {
    blocks: Vec<Vec<u32>>,
    deadline: Instant,
    lease: Duration,
    /// The furthest a heartbeat extended the lease to.
    extended: Option<Instant>,
}

/// Published requests by id, and the ones that finished since the last drain.
#[derive(Debug, Default)]
pub struct Published {
    live: HashMap<String, Entry>,
    finished: Vec<(String, Ended)>,
}

impl Published {
    /// Holds `blocks` (per KV cache group) under `id` until `now + lease`.
    /// Refused, changing nothing: an id already held, a block id at or past
    /// `num_blocks` of its group, more groups than the region has, a lease
    /// over [`MAX_LEASE`].
    pub fn publish(
        &mut self,
        id: &str,
        blocks: Vec<Vec<u32>>,
        num_blocks: &[u32],
        lease: Duration,
        now: Instant,
    ) -> Result<(), AgentError> {
        crate::agent::validate::check_id("request_id", id)?;
        if self.live.contains_key(id) {
            return Err(refused(
                ErrorKind::AlreadyExists,
                format!("request {id:?} is already published and not yet read, released or expired"),
            ));
        }
        if lease > MAX_LEASE {
            return Err(AgentError::Invalid(format!("lease of {} ms is over the limit of {} s", lease.as_millis(), MAX_LEASE.as_secs())));
        }
        if blocks.len() > num_blocks.len() {
            return Err(AgentError::Invalid(format!("{} block groups given; the region has {}", blocks.len(), num_blocks.len())));
        }
        for (g, (ids, &n)) in blocks.iter().zip(num_blocks).enumerate() {
            if let Some(bad) = ids.iter().find(|&&b| b >= n) {
                return Err(AgentError::Invalid(format!("block {bad} of group {g} is out of range: the group has {n} blocks")));
            }
        }
        let lease = if lease.is_zero() { DEFAULT_LEASE } else { lease };
        self.live.insert(id.to_string(), Entry { blocks, deadline: now + lease, lease, extended: None });
        Ok(())
    }

    /// The blocks held under `id`, if it is live.
    pub fn blocks(&self, id: &str) -> Option<&[Vec<u32>]> {
        self.live.get(id).map(|e| e.blocks.as_slice())
    }

    /// A decode agent is about to read `blocks` of `id` (or this agent to
    /// write them into the decode side's): they must all be held under it,
    /// and the lease is extended to at least `now + hold` (the longest the
    /// transfer may take), so it cannot expire under it.
    /// Returns the lease's end before the claim, for [`Published::unclaim`].
    /// `NotFound` if `id` is not held (never published, already read,
    /// released or expired: reading would get whatever reused the blocks);
    /// `InvalidArgument` for a block it does not hold.
    pub fn claim(&mut self, id: &str, blocks: &[u32], hold: Duration, now: Instant) -> Result<Instant, AgentError> {
        let entry = self.live.get_mut(id).ok_or_else(|| not_held(id))?;
        let held: std::collections::HashSet<u32> = entry.blocks.iter().flatten().copied().collect();
        if let Some(b) = blocks.iter().find(|b| !held.contains(b)) {
            return Err(refused(ErrorKind::InvalidArgument, format!("block {b} is not among the blocks request {id:?} published")));
        }
        let before = entry.deadline;
        entry.deadline = entry.deadline.max(now + hold);
        Ok(before)
    }

    /// A claimed transfer failed and nothing of it is in flight: `id` (if
    /// still live) is held only to `lease_end`, its end before the claim,
    /// unless a heartbeat extended it since.
    pub fn unclaim(&mut self, id: &str, lease_end: Instant) {
        if let Some(e) = self.live.get_mut(id) {
            e.deadline = lease_end.max(e.extended.unwrap_or(lease_end));
        }
    }

    /// Ends a live request (read, pushed or released). `NotFound` if it is not held.
    pub fn end(&mut self, id: &str, how: Ended) -> Result<(), AgentError> {
        match self.live.remove(id) {
            Some(_) => {
                self.finished.push((id.to_string(), how));
                Ok(())
            }
            None => Err(not_held(id)),
        }
    }

    /// Extends each live id's lease to at least `now` plus the lease it was
    /// published with; returns the ids that are not held.
    pub fn extend(&mut self, ids: &[String], now: Instant) -> Vec<String> {
        let mut unknown = Vec::new();
        for id in ids {
            match self.live.get_mut(id) {
                Some(e) => {
                    e.deadline = e.deadline.max(now + e.lease);
                    e.extended = Some(e.extended.map_or(now + e.lease, |x| x.max(now + e.lease)));
                }
                None => unknown.push(id.clone()),
            }
        }
        unknown
    }

    /// Ends every request whose lease ran out by `now`; returns their ids.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let gone: Vec<String> = self.live.iter().filter(|(_, e)| e.deadline <= now).map(|(id, _)| id.clone()).collect();
        for id in &gone {
            self.live.remove(id);
            self.finished.push((id.clone(), Ended::Expired));
        }
        gone
    }

    /// What finished since the last call, each once.
    pub fn take_finished(&mut self) -> Vec<(String, Ended)> {
        std::mem::take(&mut self.finished)
    }

    /// Requests held now.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

fn not_held(id: &str) -> AgentError {
    refused(ErrorKind::NotFound, format!("request {id:?} is not published here (never, or already read, released or expired)"))
}

fn refused(kind: ErrorKind, message: String) -> AgentError {
    AgentError::Failed(Failure::new(kind, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: &[u32] = &[8];

    #[test]
    fn a_request_finishes_once_whichever_way() {
        let t0 = Instant::now();
        let mut p = Published::default();
        p.publish("a", vec![vec![0, 1]], N, Duration::from_secs(1), t0).unwrap();
        p.publish("b", vec![vec![2]], N, Duration::from_secs(1), t0).unwrap();
        p.publish("c", vec![vec![3]], N, Duration::from_secs(5), t0).unwrap();
        assert_eq!(p.blocks("a"), Some(&[vec![0, 1]][..]));
        p.end("a", Ended::Read).unwrap();
        p.end("b", Ended::Released).unwrap();
        assert_eq!(p.end("a", Ended::Released).unwrap_err().kind(), ErrorKind::NotFound);
        assert!(p.expire(t0 + Duration::from_secs(2)).is_empty(), "c's lease runs to 5 s");
        assert_eq!(p.expire(t0 + Duration::from_secs(5)), vec!["c".to_string()]);
        let mut done = p.take_finished();
        done.sort();
        assert_eq!(done, vec![("a".into(), Ended::Read), ("b".into(), Ended::Released), ("c".into(), Ended::Expired)]);
        assert!(p.take_finished().is_empty(), "each id is reported once");
        assert!(p.is_empty());
        p.publish("a", vec![vec![0]], N, Duration::ZERO, t0).unwrap();
        assert_eq!(p.len(), 1, "an id that finished may be published again");
    }

    #[test]
    fn bad_publishes_are_refused_and_change_nothing() {
        let t0 = Instant::now();
        let mut p = Published::default();
        p.publish("a", vec![vec![0]], N, Duration::ZERO, t0).unwrap();
        type Case = (&'static str, Vec<Vec<u32>>, Duration, ErrorKind, &'static str);
        let cases: Vec<Case> = vec![
            ("a", vec![vec![1]], Duration::ZERO, ErrorKind::AlreadyExists, "already published"),
            ("b", vec![vec![8]], Duration::ZERO, ErrorKind::InvalidArgument, "block 8 of group 0 is out of range"),
            ("b", vec![vec![0], vec![0]], Duration::ZERO, ErrorKind::InvalidArgument, "2 block groups given; the region has 1"),
            ("b", vec![vec![0]], MAX_LEASE + Duration::from_secs(1), ErrorKind::InvalidArgument, "over the limit"),
            ("", vec![vec![0]], Duration::ZERO, ErrorKind::InvalidArgument, "request_id is empty"),
        ];
        for (id, blocks, lease, kind, text) in cases {
            let e = p.publish(id, blocks, N, lease, t0).unwrap_err();
            assert_eq!(e.kind(), kind, "{e}");
            assert!(e.to_string().contains(text), "{e}");
        }
        assert_eq!(p.len(), 1);
        assert_eq!(p.blocks("a"), Some(&[vec![0]][..]), "the held request is untouched");
        assert!(p.take_finished().is_empty());
    }

    #[test]
    fn a_claim_holds_only_published_blocks_and_outlasts_the_lease() {
        let t0 = Instant::now();
        let mut p = Published::default();
        p.publish("a", vec![vec![2, 3, 4]], N, Duration::from_secs(1), t0).unwrap();
        let e = p.claim("a", &[3, 5], Duration::from_secs(10), t0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("block 5 is not among"), "{e}");
        assert_eq!(p.claim("zz", &[3], Duration::from_secs(10), t0).unwrap_err().kind(), ErrorKind::NotFound);
        p.claim("a", &[4, 2], Duration::from_secs(10), t0).unwrap();
        assert!(p.expire(t0 + Duration::from_secs(5)).is_empty(), "held for the read past the 1 s lease");
        p.end("a", Ended::Read).unwrap();
        assert_eq!(p.claim("a", &[2], Duration::from_secs(10), t0).unwrap_err().kind(), ErrorKind::NotFound, "read once");
        // A failed transfer gives its claim back: the lease runs as before.
        p.publish("c", vec![vec![1]], N, Duration::from_secs(1), t0).unwrap();
        let end = p.claim("c", &[1], Duration::from_secs(10), t0).unwrap();
        assert_eq!(end, t0 + Duration::from_secs(1));
        p.unclaim("c", end);
        assert_eq!(p.expire(t0 + Duration::from_secs(1)), vec!["c".to_string()]);
        assert_eq!(p.take_finished(), vec![("a".into(), Ended::Read), ("c".into(), Ended::Expired)]);
        // A push claims the same way and ends the request as pushed.
        p.publish("b", vec![vec![1]], N, Duration::from_secs(1), t0).unwrap();
        p.claim("b", &[1], Duration::from_secs(10), t0).unwrap();
        p.end("b", Ended::Pushed).unwrap();
        assert_eq!(p.take_finished(), vec![("b".into(), Ended::Pushed)]);
    }

    #[test]
    fn heartbeats_extend_leases_and_name_the_unknown() {
        let t0 = Instant::now();
        let mut p = Published::default();
        p.publish("a", vec![vec![0]], N, Duration::from_secs(4), t0).unwrap();
        let unknown = p.extend(&["a".into(), "zz".into()], t0 + Duration::from_secs(3));
        assert_eq!(unknown, vec!["zz".to_string()]);
        assert!(p.expire(t0 + Duration::from_secs(5)).is_empty(), "extended to 3 + 4 = 7 s");
        // An early heartbeat never shortens a lease.
        p.extend(&["a".into()], t0);
        assert!(p.expire(t0 + Duration::from_millis(6_900)).is_empty());
        assert_eq!(p.expire(t0 + Duration::from_secs(7)), vec!["a".to_string()]);
    }
}
