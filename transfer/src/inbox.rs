//! Blocks that arrive as UCX active messages (the `tcp` write path).
//!
//! Over `tcp`, UCX emulates a put in software: the target's UCX copies the
//! bytes and then sends a completion back to the writer. If the writer dies
//! meanwhile, that send fails inside UCX and aborts the target (`ucs_fatal`,
//! "unexpected error: Endpoint timeout"), which no caller can catch. On this
//! path the writer instead sends each chunk as an eager active message whose
//! 16-byte header names a tag and a destination offset; the receiving engine
//! copies it into its region and never sends anything back through UCX.
//! Completion is counted here: the receiver opened the tag for an exact
//! number of bytes and knows when all of them are in place.
//! The worker's active-message handler (`ffi::am`) knows nothing of tags:
//! it hands every message to the inbox, the worker's [`AmSink`].
//!
//! A caller opens a tag without a round trip through the progress thread:
//! it queues the opening ([`Openings`]) and may tell its peer to send at
//! once. The thread takes queued openings every turn, and also whenever a
//! chunk names a tag it does not know, because that chunk's sender can only
//! have learned of the tag after the opening was queued.
//!
//! Only open tags are accepted, and each tag only into the byte ranges it
//! was opened for (its request's destination blocks). Bytes for an unknown
//! or closed tag, outside the tag's ranges, or beyond what the tag expects
//! are dropped (and counted), so a request that failed or was cancelled
//! cannot be written into afterwards, nor one request into another's blocks.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::done::TransferDone;
use crate::error::TransferError;
use crate::ffi::am::{AmSink, Refused, HEADER_LEN};
use crate::ffi::ucp::Registration;

// A delivery header is the tag, then the destination offset (both little
// endian), and fills the fixed header the message layer carries.
const _: () = assert!(HEADER_LEN == 8 + 8);

/// The header of a chunk for `tag` landing at `dst_offset`.
pub(crate) fn header(tag: u64, dst_offset: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&tag.to_le_bytes());
    h[8..].copy_from_slice(&dst_offset.to_le_bytes());
    h
}

fn parse(header: &[u8]) -> Option<(u64, u64)> {
    let h: &[u8; HEADER_LEN] = header.try_into().ok()?;
    let (tag, off) = h.split_at(8);
    Some((u64::from_le_bytes(tag.try_into().ok()?), u64::from_le_bytes(off.try_into().ok()?)))
}

/// Progress of one open tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Arrival {
    pub expected: u64,
    pub arrived: u64,
    pub messages: u64,
}

/// Why a delivery was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reject {
    Header,
    Tag,
    Range,
    Excess,
    Rendezvous,
}

/// Sorted, disjoint byte ranges of the region.
pub(crate) type Ranges = Box<[Range<u64>]>;

/// Who waits for a tag: told when its last byte landed.
pub(crate) type Waiter = oneshot::Sender<Result<TransferDone, TransferError>>;

/// A tag's waiter and when the tag was opened.
pub(crate) type Waiting = (Waiter, Instant);

/// A tag a caller opened ([`Openings::push`]).
#[derive(Debug)]
pub(crate) struct Opening {
    pub tag: u64,
    /// From [`into_ranges`], with their total.
    pub into: Ranges,
    pub expected: u64,
    pub waiter: Waiter,
    pub started: Instant,
}

/// Openings queued by callers, not yet taken by the progress thread.
#[derive(Debug, Default)]
pub(crate) struct Openings {
    queue: Mutex<Vec<Opening>>,
    /// Set while the queue may hold something: the thread's check each
    /// turn (and for each chunk of an unknown tag) is one atomic load.
    queued: AtomicBool,
}

impl Openings {
    pub(crate) fn push(&self, o: Opening) {
        let mut q = self.queue.lock().expect("openings lock");
        q.push(o);
        // Under the lock: a taker that sees the flag sees the opening.
        self.queued.store(true, Ordering::Release);
    }

    /// Whether an opening may be waiting.
    pub(crate) fn any(&self) -> bool {
        self.queued.load(Ordering::Acquire)
    }

    /// Moves the queued openings to `out`, keeping the queue's capacity.
    fn take(&self, out: &mut Vec<Opening>) {
        if !self.any() {
            return;
        }
        let mut q = self.queue.lock().expect("openings lock");
        self.queued.store(false, Ordering::Relaxed);
        out.append(&mut q);
    }
}

/// An open tag: its progress, the byte ranges it may fill, sorted and
/// disjoint (see [`into_ranges`]), and who waits for it.
#[derive(Debug)]
struct Open {
    arrival: Arrival,
    into: Ranges,
    waiter: Option<Waiting>,
}

impl Open {
    /// Whether `[offset, offset + len)` lies inside one of the ranges.
    fn admits(&self, offset: u64, len: u64) -> bool {
        let i = self.into.partition_point(|r| r.end <= offset);
        self.into.get(i).is_some_and(|r| r.start <= offset && offset.checked_add(len).is_some_and(|end| end <= r.end))
    }
}

/// Sorts `ranges`, checks they are non-empty and disjoint, and joins the
/// ones that touch (a chunk may span two adjacent blocks); returns them with
/// their total length. Runs on the caller's thread, not the progress thread.
pub(crate) fn into_ranges(mut ranges: Vec<Range<u64>>) -> Result<(Ranges, u64), String> {
    ranges.sort_unstable_by_key(|r| r.start);
    let mut total = 0u64;
    let mut joined: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        if r.start >= r.end {
            return Err(format!("delivery range {r:?} is empty"));
        }
        total = total.checked_add(r.end - r.start).ok_or("delivery ranges overflow")?;
        match joined.last_mut() {
            Some(prev) if prev.end > r.start => return Err(format!("delivery ranges {prev:?} and {r:?} overlap")),
            Some(prev) if prev.end == r.start => prev.end = r.end,
            _ => joined.push(r),
        }
    }
    Ok((joined.into_boxed_slice(), total))
}

/// The receiving side's tags and counters. Lives on the progress thread
/// (the handler runs inside `ucp_worker_progress`).
#[derive(Debug)]
pub(crate) struct Inbox {
    region: Arc<Registration>,
    open: RefCell<HashMap<u64, Open>>,
    openings: Arc<Openings>,
    /// Reused to take `openings` without allocating.
    taken: RefCell<Vec<Opening>>,
    /// Tags whose last expected byte landed, oldest first, until the
    /// engine takes them ([`Inbox::pop_complete`]): the engine learns of a
    /// finished delivery without looking at every open tag on every turn.
    complete: RefCell<VecDeque<u64>>,
    rejected: Cell<u64>,
}

impl Inbox {
    pub(crate) fn new(region: Arc<Registration>) -> Inbox {
        Inbox {
            region,
            open: RefCell::new(HashMap::new()),
            openings: Arc::default(),
            taken: RefCell::new(Vec::new()),
            complete: RefCell::new(VecDeque::new()),
            rejected: Cell::new(0),
        }
    }

    /// Where callers queue the tags they open.
    pub(crate) fn openings(&self) -> &Arc<Openings> {
        &self.openings
    }

    /// Starts accepting bytes for `tag` into `into` (from [`into_ranges`],
    /// whose total is `expected`), until `expected` bytes arrived. False if
    /// the tag is open.
    pub(crate) fn open(&self, tag: u64, into: Ranges, expected: u64) -> bool {
        self.insert(tag, into, expected, None)
    }

    /// As [`Inbox::open`], with who waits; a waiter for a tag that is
    /// open already is told so.
    fn insert(&self, tag: u64, into: Ranges, expected: u64, waiter: Option<Waiting>) -> bool {
        let mut open = self.open.borrow_mut();
        if open.contains_key(&tag) {
            if let Some((w, _)) = waiter {
                let _ = w.send(Err(TransferError::Region(format!("delivery tag {tag} is already open"))));
            }
            return false;
        }
        open.insert(tag, Open { arrival: Arrival { expected, arrived: 0, messages: 0 }, into, waiter });
        if expected == 0 {
            self.complete.borrow_mut().push_back(tag);
        }
        true
    }

    /// Opens the tags callers queued. The thread calls it every turn.
    pub(crate) fn adopt(&self) {
        if !self.openings.any() {
            return;
        }
        let mut taken = self.taken.borrow_mut();
        self.openings.take(&mut taken);
        for o in taken.drain(..) {
            self.insert(o.tag, o.into, o.expected, Some((o.waiter, o.started)));
        }
    }

    /// Stops accepting bytes for `tag`; returns how far it got. Its waiter,
    /// if any, is dropped unanswered. Queued openings are taken first: a
    /// close may overtake its own tag's opening, which must not open later.
    pub(crate) fn close(&self, tag: u64) -> Option<Arrival> {
        self.adopt();
        self.open.borrow_mut().remove(&tag).map(|o| o.arrival)
    }

    pub(crate) fn arrival(&self, tag: u64) -> Option<Arrival> {
        self.open.borrow().get(&tag).map(|o| o.arrival)
    }

    /// Closes the next tag that received every expected byte and returns
    /// it with its arrival and waiter; tags closed before they were taken
    /// are skipped.
    pub(crate) fn pop_complete(&self) -> Option<(u64, Arrival, Option<Waiting>)> {
        loop {
            let tag = self.complete.borrow_mut().pop_front()?;
            if self.arrival(tag).is_some_and(|a| a.arrived == a.expected) {
                let o = self.open.borrow_mut().remove(&tag).expect("the tag is open");
                return Some((tag, o.arrival, o.waiter));
            }
        }
    }

    /// Deliveries dropped so far.
    pub(crate) fn rejected(&self) -> u64 {
        self.rejected.get()
    }

    /// Counts a delivery the handler could not take.
    fn reject(&self, why: Reject) {
        self.rejected.set(self.rejected.get() + 1);
        tracing::debug!(?why, "active-message delivery dropped");
    }

    /// Copies one chunk into the region if its tag is open, it lies inside
    /// one of the tag's ranges (and the region) and the tag still expects
    /// that many bytes.
    pub(crate) fn deliver(&self, header: &[u8], data: &[u8]) -> Result<(), Reject> {
        let r = self.try_deliver(header, data);
        if let Err(why) = r {
            self.reject(why);
        }
        r
    }

    fn try_deliver(&self, header: &[u8], data: &[u8]) -> Result<(), Reject> {
        let (tag, offset) = parse(header).ok_or(Reject::Header)?;
        if !self.open.borrow().contains_key(&tag) {
            // Its opening may still be queued: the sender heard of the tag
            // after it was.
            self.adopt();
        }
        let mut open = self.open.borrow_mut();
        let o = open.get_mut(&tag).ok_or(Reject::Tag)?;
        let len = data.len() as u64;
        if !o.admits(offset, len) {
            return Err(Reject::Range);
        }
        let a = &mut o.arrival;
        if a.arrived.checked_add(len).is_none_or(|n| n > a.expected) {
            return Err(Reject::Excess);
        }
        self.region.write(offset, data).map_err(|_| Reject::Range)?;
        a.arrived += len;
        a.messages += 1;
        if a.arrived == a.expected {
            self.complete.borrow_mut().push_back(tag);
        }
        Ok(())
    }
}

/// The worker's delivery handler calls these, inside `ucp_worker_progress`
/// on the progress thread: no `RefCell` of the inbox is borrowed across a
/// progress call, so their borrows never collide.
impl AmSink for Inbox {
    fn receive(&self, header: &[u8], data: &[u8]) {
        // A rejected delivery is counted (and logged) by deliver itself.
        let _ = self.deliver(header, data);
    }

    fn refuse(&self, why: Refused) {
        self.reject(match why {
            Refused::Rendezvous => Reject::Rendezvous,
            Refused::Malformed => Reject::Header,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::ucp::Context;

    fn inbox() -> Inbox {
        let ctx = Context::new(&[("TLS", "tcp")]).expect("UCX context");
        Inbox::new(Arc::new(Registration::map_anonymous(&ctx, 1 << 20, false).expect("region")))
    }

    fn read(i: &Inbox, off: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        i.region.read(off, &mut b).unwrap();
        b
    }

    fn pop(i: &Inbox) -> Option<(u64, Arrival)> {
        i.pop_complete().map(|(tag, a, _)| (tag, a))
    }

    fn open(i: &Inbox, tag: u64, into: &[(u64, u64)]) -> bool {
        let (into, total) = into_ranges(into.iter().map(|&(a, b)| a..b).collect()).expect("valid ranges");
        i.open(tag, into, total)
    }

    #[test]
    fn accepts_only_open_tags_inside_their_ranges_up_to_the_expected_bytes() {
        let i = inbox();
        assert_eq!(i.deliver(&header(7, 4096), &[1; 8]), Err(Reject::Tag), "nothing is open yet");
        assert!(open(&i, 7, &[(8192, 8200), (4096, 4104)]));
        assert!(!open(&i, 7, &[(0, 8)]), "a tag opens once");
        assert_eq!(i.deliver(&header(7, 4096), &[2; 8]), Ok(()));
        assert_eq!(i.deliver(&header(7, 0), &[3; 8]), Err(Reject::Range), "not one of the tag's ranges");
        assert_eq!(i.deliver(&header(7, 8196), &[3; 8]), Err(Reject::Range), "runs past the range's end");
        assert_eq!(i.deliver(&header(7, u64::MAX - 2), &[3; 8]), Err(Reject::Range), "offset + len overflows");
        assert_eq!(i.deliver(&header(7, 0)[..15], &[3; 8]), Err(Reject::Header));
        assert_eq!(i.deliver(&header(7, 8192), &[5; 8]), Ok(()));
        assert_eq!(i.deliver(&header(7, 4096), &[4; 8]), Err(Reject::Excess), "16 of 16 bytes are in");
        assert_eq!(i.arrival(7), Some(Arrival { expected: 16, arrived: 16, messages: 2 }));
        assert_eq!(read(&i, 4096, 8), vec![2; 8]);
        assert_eq!(read(&i, 8192, 8), vec![5; 8]);
        assert_eq!(read(&i, 0, 8), vec![0; 8], "rejected bytes were not written");
        assert_eq!(i.close(7).map(|a| a.arrived), Some(16));
        assert_eq!(i.deliver(&header(7, 4096), &[6; 8]), Err(Reject::Tag), "closed tags take nothing");
        assert_eq!(read(&i, 4096, 8), vec![2; 8]);
        assert!(open(&i, 8, &[((1 << 20) - 4, (1 << 20) + 4)]));
        assert_eq!(i.deliver(&header(8, (1 << 20) - 4), &[7; 8]), Err(Reject::Range), "past the region");
        assert_eq!(i.rejected(), 8);
    }

    #[test]
    fn a_tag_is_reported_complete_once_when_its_last_byte_lands_and_closed_then() {
        let i = inbox();
        assert!(open(&i, 7, &[(0, 8), (64, 72)]));
        assert!(open(&i, 8, &[(128, 136)]));
        assert_eq!(i.deliver(&header(7, 0), &[1; 8]), Ok(()));
        assert_eq!(pop(&i), None, "7 has 8 of 16 bytes");
        assert_eq!(i.deliver(&header(8, 128), &[2; 8]), Ok(()));
        assert_eq!(i.deliver(&header(7, 64), &[3; 8]), Ok(()));
        assert_eq!(pop(&i), Some((8, Arrival { expected: 8, arrived: 8, messages: 1 })), "in the order they completed");
        assert_eq!(pop(&i), Some((7, Arrival { expected: 16, arrived: 16, messages: 2 })));
        assert_eq!(pop(&i), None);
        assert_eq!((i.arrival(7), i.arrival(8)), (None, None), "taken tags are closed");
        assert!(i.open(9, Box::new([]), 0));
        assert_eq!(pop(&i).map(|(t, a)| (t, a.arrived)), Some((9, 0)), "a tag expecting nothing is complete at once");
        // Closed, or closed and opened again, before the engine took it:
        // the completion is stale and skipped.
        assert!(open(&i, 10, &[(0, 8)]));
        assert!(open(&i, 11, &[(8, 16)]));
        assert_eq!(i.deliver(&header(10, 0), &[4; 8]), Ok(()));
        assert_eq!(i.deliver(&header(11, 8), &[5; 8]), Ok(()));
        i.close(10);
        i.close(11);
        assert!(open(&i, 11, &[(8, 16)]));
        assert_eq!(pop(&i), None);
        assert_eq!(i.arrival(11), Some(Arrival { expected: 8, arrived: 0, messages: 0 }), "the reopened tag stays open");
    }

    fn opening(tag: u64, into: &[(u64, u64)]) -> (Opening, oneshot::Receiver<Result<TransferDone, TransferError>>) {
        let (into, expected) = into_ranges(into.iter().map(|&(a, b)| a..b).collect()).expect("valid ranges");
        let (waiter, rx) = oneshot::channel();
        (Opening { tag, into, expected, waiter, started: Instant::now() }, rx)
    }

    #[test]
    fn a_chunk_for_a_queued_opening_opens_its_tag_first() {
        let i = inbox();
        let (o, _rx) = opening(5, &[(0, 8), (16, 24)]);
        i.openings().push(o);
        assert_eq!(i.arrival(5), None, "queued, not open yet");
        assert_eq!(i.deliver(&header(5, 16), &[9; 8]), Ok(()), "the chunk's tag was queued: opened, then filled");
        assert_eq!(i.arrival(5), Some(Arrival { expected: 16, arrived: 8, messages: 1 }));
        assert_eq!(i.deliver(&header(5, 8), &[9; 8]), Err(Reject::Range), "still only into its own ranges");
        assert_eq!(i.deliver(&header(5, 0), &[9; 8]), Ok(()));
        let (tag, a, waiter) = i.pop_complete().expect("tag 5 is complete");
        assert_eq!((tag, a.arrived, waiter.is_some()), (5, 16, true), "its waiter comes with it");
        // A second opening of an open tag is refused to its waiter.
        let (o, _rx) = opening(6, &[(0, 8)]);
        i.openings().push(o);
        i.adopt();
        let (dup, mut rx) = opening(6, &[(8, 16)]);
        i.openings().push(dup);
        i.adopt();
        assert!(rx.try_recv().is_ok_and(|r| r.is_err()), "the duplicate's waiter hears it failed");
        assert_eq!(i.deliver(&header(6, 8), &[1; 8]), Err(Reject::Range), "the first opening's ranges stand");
        // A close that overtakes its tag's opening: the tag never opens.
        let (o, _rx) = opening(7, &[(0, 8)]);
        i.openings().push(o);
        assert_eq!(i.close(7).map(|a| a.expected), Some(8), "the queued opening was taken, then closed");
        assert_eq!(i.deliver(&header(7, 0), &[1; 8]), Err(Reject::Tag));
    }

    #[test]
    fn ranges_are_sorted_and_joined_and_must_be_disjoint_and_non_empty() {
        let (r, total) = into_ranges(vec![64..96, 16..32, 0..16]).unwrap();
        assert_eq!((&*r, total), (&[0..32, 64..96][..], 64), "sorted, touching ranges joined");
        assert!(into_ranges(vec![0..16, 8..24]).unwrap_err().contains("overlap"));
        assert!(into_ranges(vec![0..16, 16..16]).unwrap_err().contains("empty"));
    }
}
