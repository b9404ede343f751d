//! The decode side's expected pushes (push mode): the local blocks a
//! prefill engine's published request is to be written into, held for it
//! under a lease until the write ended. A pure table (no clock of its own,
//! no I/O): the service feeds it `now`, orders writes only into blocks it
//! holds, and ends each request once nothing of its write is in flight.
//!
//! A block is expected by at most one live request, so two pushes never
//! land in the same block. A request whose lease runs out is marked
//! expired (the service then stops its write) but keeps its blocks until
//! it ends: bytes may still land in them until the prefill agent answers.
//! Each id ends exactly once and may be expected again after it ended.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::agent::error::{AgentError, ErrorKind, Failure};

pub use super::published::{DEFAULT_LEASE, MAX_LEASE};

#[derive(Debug)]
struct Entry {
    blocks: Vec<u32>,
    deadline: Instant,
    lease: Duration,
    expired: bool,
}

/// How an expected request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// The local blocks it held (invalid if its write failed).
    pub blocks: Vec<u32>,
    /// Its lease had run out before it ended, after this long.
    pub expired: Option<Duration>,
}

/// Expected pushes by request id, and which request holds each block.
#[derive(Debug, Default)]
pub struct Expected {
    live: HashMap<String, Entry>,
    holder: HashMap<u32, String>,
}

impl Expected {
    /// Holds `blocks` (this region's, `num_blocks` of them) for `id` until
    /// `now + lease` (0: [`DEFAULT_LEASE`]); returns the lease. Refused,
    /// changing nothing: an id already live, no block, a block out of
    /// range or named twice, a block another live request holds, a lease
    /// over [`MAX_LEASE`].
    pub fn expect(&mut self, id: &str, blocks: &[u32], num_blocks: u32, lease: Duration, now: Instant) -> Result<Duration, AgentError> {
        crate::agent::validate::check_id("request_id", id)?;
        if self.live.contains_key(id) {
            return Err(refused(ErrorKind::AlreadyExists, format!("request {id:?} is already expecting a push that has not ended")));
        }
        if lease > MAX_LEASE {
            return Err(AgentError::Invalid(format!("lease of {} ms is over the limit of {} s", lease.as_millis(), MAX_LEASE.as_secs())));
        }
        if blocks.is_empty() {
            return Err(AgentError::Invalid(format!("request {id:?} expects no block: a full prefix hit is a Release, not a push")));
        }
        let mut seen = std::collections::HashSet::new();
        for &b in blocks {
            if b >= num_blocks {
                return Err(AgentError::Invalid(format!("local block {b} is out of range: the region has {num_blocks} blocks")));
            }
            if !seen.insert(b) {
                return Err(AgentError::Invalid(format!("local block {b} is named twice")));
            }
            if let Some(other) = self.holder.get(&b) {
                return Err(refused(
                    ErrorKind::FailedPrecondition,
                    format!("local block {b} is already expected by request {other:?}: a block takes one push at a time"),
                ));
            }
        }
        let lease = if lease.is_zero() { DEFAULT_LEASE } else { lease };
        for &b in blocks {
            self.holder.insert(b, id.to_string());
        }
        self.live.insert(id.to_string(), Entry { blocks: blocks.to_vec(), deadline: now + lease, lease, expired: false });
        Ok(lease)
    }

    /// Whether every block of `blocks` is held for `id`, which is live and
    /// not expired: the check before anything is ordered into them.
    pub fn covers(&self, id: &str, blocks: &[u32]) -> Result<(), AgentError> {
        let e =
            self.live.get(id).filter(|e| !e.expired).ok_or_else(|| {
                refused(ErrorKind::NotFound, format!("request {id:?} expects no push here (never, or it ended or expired)"))
            })?;
        match blocks.iter().find(|b| self.holder.get(b).map(String::as_str) != Some(id)) {
            Some(b) => Err(refused(ErrorKind::InvalidArgument, format!("local block {b} is not among the blocks request {id:?} expects"))),
            None => {
                debug_assert!(blocks.iter().all(|b| e.blocks.contains(b)));
                Ok(())
            }
        }
    }

    /// Marks every live request whose lease ran out by `now` expired and
    /// returns their ids, each once: their writes are to be stopped.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let mut gone = Vec::new();
        for (id, e) in &mut self.live {
            if !e.expired && e.deadline <= now {
                e.expired = true;
                gone.push(id.clone());
            }
        }
        gone
    }

    /// Ends `id` (its write is over, whichever way) and frees its blocks;
    /// `None` if it is not live.
    pub fn end(&mut self, id: &str) -> Option<Ended> {
        let e = self.live.remove(id)?;
        for b in &e.blocks {
            self.holder.remove(b);
        }
        Some(Ended { blocks: e.blocks, expired: e.expired.then_some(e.lease) })
    }

    /// Requests live now (expired ones included until they end).
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

fn refused(kind: ErrorKind, message: String) -> AgentError {
    AgentError::Failed(Failure::new(kind, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: u32 = 8;
    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_request_holds_its_blocks_until_it_ends_once() {
        let t0 = Instant::now();
        let mut x = Expected::default();
        assert_eq!(x.expect("a", &[1, 2], N, Duration::ZERO, t0).unwrap(), DEFAULT_LEASE);
        x.covers("a", &[2, 1]).unwrap();
        x.covers("a", &[]).unwrap();
        let e = x.covers("a", &[1, 3]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("local block 3 is not among the blocks request \"a\" expects"), "{e}");
        assert_eq!(x.covers("b", &[1]).unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(x.end("a"), Some(Ended { blocks: vec![1, 2], expired: None }));
        assert_eq!(x.end("a"), None, "ends once");
        assert_eq!(x.covers("a", &[1]).unwrap_err().kind(), ErrorKind::NotFound, "nothing is ordered into an ended request's blocks");
        x.expect("a", &[1], N, S, t0).unwrap();
        x.expect("b", &[2], N, S, t0).unwrap();
        assert_eq!(x.len(), 2, "an id and its blocks may be expected again after it ended");
    }

    #[test]
    fn bad_expects_are_refused_and_change_nothing() {
        let t0 = Instant::now();
        let mut x = Expected::default();
        x.expect("a", &[0, 5], N, S, t0).unwrap();
        type Case = (&'static str, &'static [u32], Duration, ErrorKind, &'static str);
        let cases: &[Case] = &[
            ("a", &[1], S, ErrorKind::AlreadyExists, "already expecting"),
            ("b", &[1, 5], S, ErrorKind::FailedPrecondition, "local block 5 is already expected by request \"a\""),
            ("b", &[8], S, ErrorKind::InvalidArgument, "local block 8 is out of range: the region has 8 blocks"),
            ("b", &[3, 3], S, ErrorKind::InvalidArgument, "local block 3 is named twice"),
            ("b", &[], S, ErrorKind::InvalidArgument, "expects no block"),
            ("b", &[1], Duration::from_secs(601), ErrorKind::InvalidArgument, "over the limit"),
            ("", &[1], S, ErrorKind::InvalidArgument, "request_id is empty"),
        ];
        for (id, blocks, lease, kind, text) in cases {
            let e = x.expect(id, blocks, N, *lease, t0).unwrap_err();
            assert_eq!(e.kind(), *kind, "{e}");
            assert!(e.to_string().contains(text), "{e} lacks {text:?}");
        }
        assert_eq!(x.len(), 1);
        // A refused expect reserved nothing: its good blocks are free.
        x.expect("c", &[1, 3], N, S, t0).unwrap();
        x.covers("a", &[0, 5]).unwrap();
    }

    #[test]
    fn an_expired_request_is_reported_once_and_keeps_its_blocks_until_it_ends() {
        let t0 = Instant::now();
        let mut x = Expected::default();
        x.expect("short", &[1], N, S, t0).unwrap();
        x.expect("long", &[2], N, 5 * S, t0).unwrap();
        assert!(x.expire(t0 + S / 2).is_empty());
        assert_eq!(x.expire(t0 + S), vec!["short".to_string()]);
        assert!(x.expire(t0 + 2 * S).is_empty(), "each expiry is reported once");
        assert_eq!(x.covers("short", &[1]).unwrap_err().kind(), ErrorKind::NotFound, "no new order into an expired request");
        let e = x.expect("other", &[1], N, S, t0).unwrap_err();
        assert!(e.to_string().contains("already expected by request \"short\""), "its write may still land: {e}");
        assert_eq!(x.end("short"), Some(Ended { blocks: vec![1], expired: Some(S) }));
        x.expect("other", &[1], N, S, t0).unwrap();
        assert_eq!(x.end("long"), Some(Ended { blocks: vec![2], expired: None }));
    }
}
