//! Transfer planning: turning a block-level request into RMA operations.
//!
//! This module owns request validation ([`validate`]) and [`TransferPlan`],
//! which maps a list of (source block, destination block) pairs between two
//! [`BlockLayout`]s onto byte ranges and coalesces them into as few
//! [`RmaOp`]s as possible. It is pure computation: no I/O, no UCX.
//!
//! Each pair moves one chunk of `block_bytes` per layer. Chunks whose source
//! and destination ranges both continue the previous chunk are merged into a
//! single op, up to an optional size cap.

use crate::layout::{BlockLayout, LayoutError};
use thiserror::Error;

/// One RMA operation: copy `len` bytes from `src_offset` in the source region
/// to `dst_offset` in the destination region (offsets from each region base).
///
/// `#[repr(C)]` and [`bytemuck::Pod`] so a slice of ops can be shipped or
/// logged as raw bytes (three little-endian `u64`s each on the usual targets).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RmaOp {
    /// Byte offset in the source region.
    pub src_offset: u64,
    /// Byte offset in the destination region.
    pub dst_offset: u64,
    /// Number of bytes to move; a nonzero multiple of the layouts' `block_bytes`.
    pub len: u64,
}

/// Most (source, destination) pairs one request may name.
pub const MAX_BLOCKS_PER_REQUEST: usize = 1 << 20;

/// Why a transfer request was rejected. Nothing has moved when this is returned.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlanError {
    /// Both block lists are empty.
    #[error(
        "transfer request names no blocks; src_blocks and dst_blocks must each hold \
         1..={max} ids",
        max = MAX_BLOCKS_PER_REQUEST
    )]
    Empty,

    /// The two block lists differ in length.
    #[error(
        "src_blocks has {src} ids but dst_blocks has {dst}; both lists must have the same \
         length (one destination block per source block)"
    )]
    LengthMismatch {
        /// Length of `src_blocks`.
        src: usize,
        /// Length of `dst_blocks`.
        dst: usize,
    },

    /// More pairs than [`MAX_BLOCKS_PER_REQUEST`].
    #[error(
        "request has {len} block pairs; at most {max} are allowed per request, \
         split it into several requests"
    )]
    TooMany {
        /// Number of pairs in the request.
        len: usize,
        /// The limit, [`MAX_BLOCKS_PER_REQUEST`].
        max: usize,
    },

    /// A source block id is not below the source layout's block count.
    #[error(
        "src_blocks[{index}] = {block} is out of range; the source layout has {num_blocks} \
         blocks, so ids must be in 0..={last}",
        last = num_blocks.saturating_sub(1)
    )]
    SrcOutOfRange {
        /// Position of the first offending id in `src_blocks`.
        index: usize,
        /// The offending id.
        block: u32,
        /// Block count of the source layout.
        num_blocks: u32,
    },

    /// A destination block id is not below the destination layout's block count.
    #[error(
        "dst_blocks[{index}] = {block} is out of range; the destination layout has \
         {num_blocks} blocks, so ids must be in 0..={last}",
        last = num_blocks.saturating_sub(1)
    )]
    DstOutOfRange {
        /// Position of the first offending id in `dst_blocks`.
        index: usize,
        /// The offending id.
        block: u32,
        /// Block count of the destination layout.
        num_blocks: u32,
    },

    /// A destination block appears more than once, so the result would
    /// depend on write order.
    #[error(
        "destination block {block} is named twice, at dst_blocks[{first}] and \
         dst_blocks[{second}]; each destination block may appear at most once per request"
    )]
    DuplicateDst {
        /// The repeated id.
        block: u32,
        /// Position of its first occurrence.
        first: usize,
        /// Position of its second occurrence (the smallest such position in
        /// the list, so this is the earliest repeat).
        second: usize,
    },

    /// Source and destination chunks differ in size or count
    /// (always a [`LayoutError::Incompatible`] naming the `src` and `dst` values).
    #[error(transparent)]
    Incompatible(LayoutError),

    /// `max_op_bytes` is nonzero but cannot hold a single chunk.
    #[error(
        "max_op_bytes {max_op_bytes} is below block_bytes {block_bytes}; use 0 (unlimited) \
         or a value in {block_bytes}..={max}",
        max = u64::MAX
    )]
    BadMaxOpBytes {
        /// The rejected cap.
        max_op_bytes: u64,
        /// Bytes of one chunk.
        block_bytes: u64,
    },

    /// The op list for this request could not be allocated.
    #[error(
        "plan for {pairs} block pairs x {num_layers} layers needs {chunks} chunk ops, \
         which could not be allocated; split the request into smaller ones",
        chunks = (*pairs as u128) * u128::from(*num_layers)
    )]
    TooLarge {
        /// Number of pairs in the request.
        pairs: usize,
        /// Layers per block.
        num_layers: u32,
    },
}

/// Coalesced RMA operations for one validated request.
///
/// Ops are sorted by `(src_offset, dst_offset)`, never overlap on the
/// destination side (nor on the source side unless a source block is named
/// more than once), and together move exactly `blocks() * num_layers *
/// block_bytes` bytes. Coalescing is maximal under the cap: no op could be
/// extended by another op of the plan without exceeding `max_op_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferPlan {
    ops: Vec<RmaOp>,
    bytes: u64,
    blocks: usize,
}

impl TransferPlan {
    /// Validates the request (see [`validate`]) and plans it.
    ///
    /// Pair `i` moves chunk `(src_blocks[i], l)` of `src` to chunk
    /// `(dst_blocks[i], l)` of `dst` for every layer `l`. The result is as if
    /// all chunks were sorted by source offset and each chunk whose source and
    /// destination both continue the previous one were merged into it while
    /// the op stays within `max_op_bytes` (when a source block is named twice,
    /// runs are followed by destination instead, so none is missed); ops are
    /// then listed by `(src_offset, dst_offset)`. `max_op_bytes == 0` means
    /// unlimited; a nonzero value below `block_bytes` is an error.
    ///
    /// Cost: one allocation with room for `pairs * num_layers` ops (plus the
    /// one in [`validate`]), of which only the first `pairs` entries and the
    /// entries the runs need are written; `O(pairs log pairs)` time plus time
    /// linear in the number of per-layer runs and output ops. The identity
    /// mapping of a packed layout therefore costs about the same for 1 and
    /// for 80 layers.
    pub fn build(
        src: &BlockLayout,
        src_blocks: &[u32],
        dst: &BlockLayout,
        dst_blocks: &[u32],
        max_op_bytes: u64,
    ) -> Result<Self, PlanError> {
        validate(src, src_blocks, dst, dst_blocks)?;
        let block_bytes = src.block_bytes();
        if max_op_bytes != 0 && max_op_bytes < block_bytes {
            return Err(PlanError::BadMaxOpBytes { max_op_bytes, block_bytes });
        }

        let pairs = src_blocks.len();
        let num_layers = src.num_layers();
        let too_large = PlanError::TooLarge { pairs, num_layers };
        let chunks = usize::try_from(num_layers).ok().and_then(|layers| layers.checked_mul(pairs)).ok_or_else(|| too_large.clone())?;
        // Never more ops than chunks, so this is the only allocation. Only
        // the entries written below are touched; for a large reservation the
        // OS commits pages lazily, so unused room costs address space only.
        let mut ops = Vec::new();
        ops.try_reserve_exact(chunks).map_err(|_| too_large)?;

        // Layer-0 chunks in source order. A source block named twice makes
        // ties there, and merging neighbours in a tied order can miss runs;
        // destination blocks are unique, and a chunk's only possible run
        // successor is the chunk starting where its destination ends, so then
        // use destination order instead and restore source order at the end.
        let repeated_src = !layer0_sorted(&mut ops, src, src_blocks, dst, dst_blocks, Side::Src);
        if repeated_src {
            ops.clear();
            let unique = layer0_sorted(&mut ops, src, src_blocks, dst, dst_blocks, Side::Dst);
            debug_assert!(unique, "validate rejects repeated destination blocks");
        }
        let order = if repeated_src { dst } else { src };

        // A layer-0 run shifted by the layer strides is a run of that layer,
        // and the layout's geometry says whether (layer, run) or (run, layer)
        // order is offset order. So merge runs in layer 0, copy them to every
        // layer, merge again across layer boundaries, and only then apply the
        // size cap: the result is as if all chunks had been sorted and merged.
        coalesce(&mut ops);
        expand_layers(&mut ops, src, dst, order.is_layer_major());
        if num_layers > 1 {
            coalesce(&mut ops);
        }
        if max_op_bytes != 0 {
            split_runs(&mut ops, max_op_bytes / block_bytes * block_bytes);
        }
        if repeated_src {
            ops.sort_unstable_by_key(|op| (op.src_offset, op.dst_offset));
        }

        // At most the destination region's size, as destination chunks are
        // distinct and disjoint, so it fits in u64.
        let bytes = pairs as u64 * u64::from(num_layers) * block_bytes;
        Ok(Self { ops, bytes, blocks: pairs })
    }

    /// The ops, sorted by `(src_offset, dst_offset)`.
    pub fn ops(&self) -> &[RmaOp] {
        &self.ops
    }

    /// Total bytes moved (sum of op lengths).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Number of (source, destination) block pairs planned.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// The ops, by value.
    pub fn into_ops(self) -> Vec<RmaOp> {
        self.ops
    }
}

/// Which side's block ids order the layer-0 chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Src,
    Dst,
}

/// Fills the empty `ops` with the layer-0 chunk of every pair, sorted by the
/// `by` side's block id (which orders layer-0 offsets). Returns `false`, with
/// `ops` in an unspecified state, if two pairs share a `by`-side block.
///
/// Sorting 8-byte keys is about twice as fast as sorting 24-byte ops, so the
/// keys `block << 32 | pair_index` are sorted in the last third of the words
/// of the ops themselves (no extra allocation), then each op is written over
/// words whose keys have already been read.
fn layer0_sorted(ops: &mut Vec<RmaOp>, src: &BlockLayout, src_blocks: &[u32], dst: &BlockLayout, dst_blocks: &[u32], by: Side) -> bool {
    let n = src_blocks.len();
    let by_blocks = match by {
        Side::Src => src_blocks,
        Side::Dst => dst_blocks,
    };
    ops.resize(n, bytemuck::Zeroable::zeroed());
    let words: &mut [u64] = bytemuck::cast_slice_mut(ops.as_mut_slice());
    let keys = &mut words[2 * n..];
    // Pair indices are below MAX_BLOCKS_PER_REQUEST < 2^32 (validated).
    for (index, (key, &block)) in keys.iter_mut().zip(by_blocks).enumerate() {
        *key = (u64::from(block) << 32) | index as u64;
    }
    keys.sort_unstable();
    if keys.windows(2).any(|w| w[0] >> 32 == w[1] >> 32) {
        return false;
    }
    let block_bytes = src.block_bytes();
    // Op i lives in words 3i..3i+3 (repr(C): src_offset, dst_offset, len) and
    // its key in word 2n+i. For i < n - 1, 3i + 2 < 2n + i + 1, so writing op
    // i never clobbers a key not yet read; key n-1 is read before op n-1 is
    // written.
    for i in 0..n {
        let index = (words[2 * n + i] & u64::from(u32::MAX)) as usize;
        words[3 * i] = src.chunk_offset(src_blocks[index], 0);
        words[3 * i + 1] = dst.chunk_offset(dst_blocks[index], 0);
        words[3 * i + 2] = block_bytes;
    }
    true
}

/// Turns the `r` layer-0 runs in `ops` (sorted by the ordering side's offset)
/// into the `r * num_layers` runs of all layers, still sorted. `layer_major`
/// describes the layout whose offsets the order follows. Works in place
/// within the capacity reserved by the caller.
fn expand_layers(ops: &mut Vec<RmaOp>, src: &BlockLayout, dst: &BlockLayout, layer_major: bool) {
    let layers = src.num_layers() as usize;
    if layers == 1 {
        return;
    }
    let n = ops.len();
    let (src_stride, dst_stride) = (src.layer_stride(), dst.layer_stride());
    let shifted = |op: RmaOp, layer: u64| RmaOp {
        src_offset: op.src_offset + layer * src_stride,
        dst_offset: op.dst_offset + layer * dst_stride,
        len: op.len,
    };
    if layer_major {
        // Order (layer, run): append a shifted copy of layer 0 per layer.
        for layer in 1..layers {
            let start = ops.len();
            ops.extend_from_within(..n);
            for op in &mut ops[start..] {
                *op = shifted(*op, layer as u64);
            }
        }
    } else {
        // Block-major with several layers: block_stride > block_bytes, so
        // layer-0 runs are single chunks. Order (block, layer): entry i
        // becomes entries i*layers..(i+1)*layers. Going backwards, entry i is
        // read before anything at or below index i is overwritten
        // (i*layers + l >= i, with equality only for i == 0).
        debug_assert!(ops.iter().all(|op| op.len == src.block_bytes()));
        ops.resize(n * layers, bytemuck::Zeroable::zeroed());
        for i in (0..n).rev() {
            let op = ops[i];
            for (layer, slot) in ops[i * layers..(i + 1) * layers].iter_mut().enumerate() {
                *slot = shifted(op, layer as u64);
            }
        }
    }
}

/// Merges, in place, each op into its predecessor when both its source and
/// destination ranges continue the predecessor's.
fn coalesce(ops: &mut Vec<RmaOp>) {
    if ops.is_empty() {
        return;
    }
    let mut kept = 0;
    for read in 1..ops.len() {
        let next = ops[read];
        let cur = &mut ops[kept];
        if cur.src_offset + cur.len == next.src_offset && cur.dst_offset + cur.len == next.dst_offset {
            cur.len += next.len;
        } else {
            kept += 1;
            ops[kept] = next;
        }
    }
    ops.truncate(kept + 1);
}

/// Splits, in place, every op longer than `piece` (a positive multiple of
/// the chunk size) into `piece`-sized ops and one shorter remainder. The
/// result never has more ops than chunks, so it fits the reservation.
fn split_runs(ops: &mut Vec<RmaOp>, piece: u64) {
    let pieces = |op: &RmaOp| op.len.div_ceil(piece) as usize;
    let total: usize = ops.iter().map(pieces).sum();
    let runs = ops.len();
    if total == runs {
        return;
    }
    let mut write = total;
    ops.resize(total, bytemuck::Zeroable::zeroed());
    // Backwards: run i's pieces start at or after index i (every earlier run
    // yields at least one piece), so runs below i are intact until read.
    for read in (0..runs).rev() {
        let run = ops[read];
        let count = pieces(&run);
        write -= count;
        for (k, slot) in ops[write..write + count].iter_mut().enumerate() {
            let start = k as u64 * piece;
            *slot = RmaOp { src_offset: run.src_offset + start, dst_offset: run.dst_offset + start, len: piece.min(run.len - start) };
        }
    }
}

/// Checks a request without planning it; [`TransferPlan::build`] calls this
/// first, and the RPC layer calls it before any byte moves.
///
/// Rejects, in this order: lists of different length, empty lists, more
/// than [`MAX_BLOCKS_PER_REQUEST`] pairs, layouts whose `block_bytes` or
/// `num_layers` differ, the first out-of-range source id, the first
/// out-of-range destination id, and the earliest repeated destination id.
/// Repeated source ids are allowed (one block copied to several places).
///
/// `O(n)` time with one allocation (a bitset over the destination block
/// ids), or `O(n log n)` with one allocation of `n` words when the
/// destination layout has far more blocks than the request names.
pub fn validate(src: &BlockLayout, src_blocks: &[u32], dst: &BlockLayout, dst_blocks: &[u32]) -> Result<(), PlanError> {
    if src_blocks.len() != dst_blocks.len() {
        return Err(PlanError::LengthMismatch { src: src_blocks.len(), dst: dst_blocks.len() });
    }
    if src_blocks.is_empty() {
        return Err(PlanError::Empty);
    }
    if src_blocks.len() > MAX_BLOCKS_PER_REQUEST {
        return Err(PlanError::TooMany { len: src_blocks.len(), max: MAX_BLOCKS_PER_REQUEST });
    }
    src.compat_diff(dst, "src", "dst").map_err(PlanError::Incompatible)?;

    let num_blocks = src.num_blocks();
    if let Some(index) = src_blocks.iter().position(|&b| b >= num_blocks) {
        return Err(PlanError::SrcOutOfRange { index, block: src_blocks[index], num_blocks });
    }
    let num_blocks = dst.num_blocks();
    if let Some(index) = dst_blocks.iter().position(|&b| b >= num_blocks) {
        return Err(PlanError::DstOutOfRange { index, block: dst_blocks[index], num_blocks });
    }

    let repeat = if use_bitset(dst_blocks.len(), num_blocks) {
        first_repeat_bitset(dst_blocks, num_blocks)
    } else {
        first_repeat_sorted(dst_blocks)
    };
    match repeat {
        Some((block, first, second)) => Err(PlanError::DuplicateDst { block, first, second }),
        None => Ok(()),
    }
}

/// A bitset costs `num_blocks / 8` bytes; use it unless that is much more
/// than sorting a copy of the ids (8 bytes per id) would need.
fn use_bitset(len: usize, num_blocks: u32) -> bool {
    (num_blocks as usize).div_ceil(64) <= 2 * len + 1024
}

/// Earliest repeat in `ids` (all `< num_blocks`): the smallest position
/// `second` whose id occurred before, with that id's first position.
fn first_repeat_bitset(ids: &[u32], num_blocks: u32) -> Option<(u32, usize, usize)> {
    let mut seen = vec![0u64; (num_blocks as usize).div_ceil(64)];
    for (second, &id) in ids.iter().enumerate() {
        let word = &mut seen[(id / 64) as usize];
        let bit = 1u64 << (id % 64);
        if *word & bit != 0 {
            let first = ids[..second].iter().position(|&x| x == id).expect("a set bit means the id occurred earlier");
            return Some((id, first, second));
        }
        *word |= bit;
    }
    None
}

/// Same result as [`first_repeat_bitset`], by sorting `(id, position)` keys.
/// Requires `ids.len() <= u32::MAX`.
fn first_repeat_sorted(ids: &[u32]) -> Option<(u32, usize, usize)> {
    let mut keys: Vec<u64> = ids.iter().enumerate().map(|(pos, &id)| (u64::from(id) << 32) | pos as u64).collect();
    keys.sort_unstable();
    // Within an id's run, positions ascend; the earliest repeat overall is
    // the second entry of some run, and its predecessor is the first one.
    keys.windows(2)
        .filter(|w| w[0] >> 32 == w[1] >> 32)
        .map(|w| {
            let id = (w[0] >> 32) as u32;
            let first = (w[0] & u64::from(u32::MAX)) as usize;
            let second = (w[1] & u64::from(u32::MAX)) as usize;
            (id, first, second)
        })
        .min_by_key(|&(_, _, second)| second)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn contiguous(bb: u64, nb: u32) -> BlockLayout {
        BlockLayout::contiguous(bb, nb).unwrap()
    }

    fn op(src_offset: u64, dst_offset: u64, len: u64) -> RmaOp {
        RmaOp { src_offset, dst_offset, len }
    }

    fn both(src: &BlockLayout, sb: &[u32], dst: &BlockLayout, db: &[u32]) -> (Result<(), PlanError>, Result<TransferPlan, PlanError>) {
        (validate(src, sb, dst, db), TransferPlan::build(src, sb, dst, db, 0))
    }

    fn assert_rejected(src: &BlockLayout, sb: &[u32], dst: &BlockLayout, db: &[u32], e: PlanError) {
        let (v, b) = both(src, sb, dst, db);
        assert_eq!(v, Err(e.clone()));
        assert_eq!(b, Err(e));
    }

    #[test]
    fn rma_op_is_pod() {
        let ops = [op(1, 2, 3)];
        let bytes: &[u8] = bytemuck::cast_slice(&ops);
        assert_eq!(bytes.len(), 24);
        assert_eq!(bytemuck::cast_slice::<u8, RmaOp>(bytes), &ops);
    }

    #[test]
    fn empty_rejected() {
        let l = contiguous(8, 4);
        assert_rejected(&l, &[], &l, &[], PlanError::Empty);
        assert!(PlanError::Empty.to_string().contains("1..=1048576"));
    }

    #[test]
    fn length_mismatch_rejected() {
        let l = contiguous(8, 4);
        assert_rejected(&l, &[0, 1], &l, &[0], PlanError::LengthMismatch { src: 2, dst: 1 });
        assert_rejected(&l, &[], &l, &[0], PlanError::LengthMismatch { src: 0, dst: 1 });
    }

    #[test]
    fn too_many_rejected() {
        let l = contiguous(1, 4);
        let ids = vec![0u32; MAX_BLOCKS_PER_REQUEST + 1];
        assert_rejected(&l, &ids, &l, &ids, PlanError::TooMany { len: MAX_BLOCKS_PER_REQUEST + 1, max: MAX_BLOCKS_PER_REQUEST });
    }

    #[test]
    fn incompatible_rejected() {
        let src = BlockLayout::layer_major(64, 4, 2).unwrap();
        let dst = BlockLayout::layer_major(32, 4, 3).unwrap();
        let e = validate(&src, &[0], &dst, &[0]).unwrap_err();
        assert_eq!(
            e,
            PlanError::Incompatible(LayoutError::Incompatible { what: "block_bytes: src 64, dst 32; num_layers: src 2, dst 3".into() })
        );
        assert!(e.to_string().contains("block_bytes: src 64, dst 32"));
        assert_eq!(TransferPlan::build(&src, &[0], &dst, &[0], 0), Err(e));
    }

    #[test]
    fn src_out_of_range_rejected() {
        let src = contiguous(8, 4);
        let dst = contiguous(8, 100);
        let e = PlanError::SrcOutOfRange { index: 2, block: 4, num_blocks: 4 };
        assert_eq!(
            e.to_string(),
            "src_blocks[2] = 4 is out of range; the source layout has 4 blocks, \
             so ids must be in 0..=3"
        );
        assert_rejected(&src, &[0, 3, 4, 9], &dst, &[0, 1, 2, 3], e);
    }

    #[test]
    fn dst_out_of_range_rejected() {
        let src = contiguous(8, 100);
        let dst = contiguous(8, 4);
        let e = PlanError::DstOutOfRange { index: 1, block: u32::MAX, num_blocks: 4 };
        assert!(e.to_string().contains("dst_blocks[1] = 4294967295"));
        assert!(e.to_string().contains("0..=3"));
        assert_rejected(&src, &[0, 1, 2], &dst, &[0, u32::MAX, 7], e);
    }

    #[test]
    fn duplicate_dst_rejected() {
        let l = contiguous(8, 10);
        let e = PlanError::DuplicateDst { block: 5, first: 1, second: 3 };
        assert_eq!(
            e.to_string(),
            "destination block 5 is named twice, at dst_blocks[1] and dst_blocks[3]; \
             each destination block may appear at most once per request"
        );
        // 7 repeats later (position 4) than 5 does (position 3).
        assert_rejected(&l, &[0, 1, 2, 3, 4], &l, &[7, 5, 6, 5, 7], e);
    }

    #[test]
    fn duplicate_scans_agree_on_sparse_layout() {
        // A huge destination layout takes the sorting path.
        let src = contiguous(1, 8);
        let dst = contiguous(1, u32::MAX);
        assert!(!use_bitset(4, u32::MAX));
        assert_rejected(
            &src,
            &[0, 1, 2, 3],
            &dst,
            &[u32::MAX - 1, 9, 9, u32::MAX - 1],
            PlanError::DuplicateDst { block: 9, first: 1, second: 2 },
        );
        validate(&src, &[0, 0], &dst, &[u32::MAX - 1, 0]).unwrap();
    }

    #[test]
    fn bad_max_op_bytes_rejected() {
        let l = contiguous(64, 4);
        let e = TransferPlan::build(&l, &[0], &l, &[1], 63).unwrap_err();
        assert_eq!(e, PlanError::BadMaxOpBytes { max_op_bytes: 63, block_bytes: 64 });
        assert!(e.to_string().contains("use 0 (unlimited) or a value in 64..="));
        TransferPlan::build(&l, &[0], &l, &[1], 64).unwrap();
    }

    #[test]
    fn runs_coalesce() {
        let l = contiguous(10, 20);
        let plan = TransferPlan::build(&l, &[5, 0, 2, 1], &l, &[3, 10, 12, 11], 0).unwrap();
        assert_eq!(plan.ops(), &[op(0, 100, 30), op(50, 30, 10)]);
        assert_eq!(plan.bytes(), 40);
        assert_eq!(plan.blocks(), 4);
        assert_eq!(plan.into_ops().len(), 2);
    }

    #[test]
    fn cap_splits_runs() {
        let l = contiguous(10, 20);
        let ids: Vec<u32> = (0..7).collect();
        let plan = TransferPlan::build(&l, &ids, &l, &ids, 25).unwrap();
        assert_eq!(plan.ops(), &[op(0, 0, 20), op(20, 20, 20), op(40, 40, 20), op(60, 60, 10)]);
        let exact = TransferPlan::build(&l, &ids, &l, &ids, 10).unwrap();
        assert_eq!(exact.ops().len(), 7);
    }

    #[test]
    fn identity_one_op_per_geometry() {
        for l in [BlockLayout::layer_major(16, 9, 4).unwrap(), BlockLayout::block_major(16, 9, 4).unwrap()] {
            let ids: Vec<u32> = (0..9).rev().collect();
            let plan = TransferPlan::build(&l, &ids, &l, &ids, 0).unwrap();
            assert_eq!(plan.ops(), &[op(0, 0, 16 * 9 * 4)]);
        }
    }

    #[test]
    fn layer_major_to_block_major() {
        let src = BlockLayout::layer_major(4, 3, 2).unwrap();
        let dst = BlockLayout::block_major(4, 3, 2).unwrap();
        let plan = TransferPlan::build(&src, &[0, 1], &dst, &[1, 2], 0).unwrap();
        // Source layer 0: blocks 0,1 at 0,4; layer 1 at 12,16.
        // Destination block 1 at 8 (layer 1 at 12), block 2 at 16 (20).
        assert_eq!(plan.ops(), &[op(0, 8, 4), op(4, 16, 4), op(12, 12, 4), op(16, 20, 4)]);
        assert_eq!(plan.bytes(), 16);
    }

    #[test]
    fn repeated_source_still_coalesces_fully() {
        // Chain 0->1->2 to dst 10,11,12 plus block 1 copied to dst 20:
        // no source-sorted chunk order keeps both runs adjacent.
        let l = contiguous(1, 30);
        let plan = TransferPlan::build(&l, &[1, 2, 1, 0], &l, &[20, 12, 11, 10], 0).unwrap();
        assert_eq!(plan.ops(), &[op(0, 10, 3), op(1, 20, 1)]);
        // Broadcast one block everywhere.
        let plan = TransferPlan::build(&l, &[3, 3, 3], &l, &[2, 0, 1], 0).unwrap();
        assert_eq!(plan.ops(), &[op(3, 0, 1), op(3, 1, 1), op(3, 2, 1)]);
    }

    #[test]
    fn too_large_message() {
        let e = PlanError::TooLarge { pairs: 1 << 20, num_layers: u32::MAX };
        assert!(e.to_string().contains("4503599626321920 chunk ops"), "{e}");
    }

    // ---- property tests ----

    #[derive(Debug, Clone)]
    struct Case {
        src: BlockLayout,
        dst: BlockLayout,
        src_blocks: Vec<u32>,
        dst_blocks: Vec<u32>,
    }

    fn arb_layout(bb: u64, nl: u32) -> impl Strategy<Value = BlockLayout> {
        let pad = || prop_oneof![Just(0u64), 1u64..=3];
        (1u32..=12, pad(), pad(), any::<bool>()).prop_map(move |(nb, pad_b, pad_l, lm)| {
            let (bs, ls) = if lm {
                let bs = bb + pad_b;
                (bs, (u64::from(nb) - 1) * bs + bb + pad_l)
            } else {
                let ls = bb + pad_l;
                ((u64::from(nl) - 1) * ls + bb + pad_b, ls)
            };
            BlockLayout::new(bb, nb, nl, bs, ls).unwrap()
        })
    }

    fn arb_case() -> impl Strategy<Value = Case> {
        (1u64..=8, 1u32..=4)
            .prop_flat_map(|(bb, nl)| (arb_layout(bb, nl), arb_layout(bb, nl)))
            .prop_flat_map(|(src, dst)| {
                let (sn, dn) = (src.num_blocks(), dst.num_blocks());
                (
                    Just(src),
                    Just(dst),
                    Just((0..dn).collect::<Vec<u32>>()).prop_shuffle(),
                    1..=dn as usize,
                    any::<bool>(),
                    0u8..3,
                    vec(0..sn, dn as usize),
                    0..sn,
                )
            })
            .prop_map(|(src, dst, mut dsts, n, sort_dst, mode, rand_src, base)| {
                dsts.truncate(n);
                if sort_dst {
                    dsts.sort_unstable();
                }
                let sn = src.num_blocks();
                let srcs = (0..n)
                    .map(|i| match mode {
                        0 => rand_src[i],
                        1 => (base + i as u32) % sn,
                        _ if dsts[i] < sn => dsts[i],
                        _ => rand_src[i],
                    })
                    .collect();
                Case { src, dst, src_blocks: srcs, dst_blocks: dsts }
            })
    }

    fn contiguous_after(a: &RmaOp, b: &RmaOp) -> bool {
        a.src_offset + a.len == b.src_offset && a.dst_offset + a.len == b.dst_offset
    }

    /// Checks that `plan` moves exactly the chunks of `case`, to the right
    /// places, each byte once.
    fn check_mapping(case: &Case, plan: &TransferPlan) -> Result<(), TestCaseError> {
        let Case { src, dst, src_blocks, dst_blocks } = case;
        let bb = src.block_bytes();
        let layers = src.num_layers();
        let ops = plan.ops();
        let n = src_blocks.len() as u64;

        prop_assert!(ops.windows(2).all(|w| (w[0].src_offset, w[0].dst_offset) < (w[1].src_offset, w[1].dst_offset)));
        let total: u64 = ops.iter().map(|o| o.len).sum();
        prop_assert_eq!(total, n * u64::from(layers) * bb);
        prop_assert_eq!(plan.bytes(), total);
        prop_assert_eq!(plan.blocks(), src_blocks.len());
        for o in ops {
            prop_assert!(o.len > 0 && o.len % bb == 0);
            prop_assert!(o.src_offset + o.len <= src.region_bytes());
            prop_assert!(o.dst_offset + o.len <= dst.region_bytes());
        }

        let mut by_dst = ops.to_vec();
        by_dst.sort_unstable_by_key(|o| o.dst_offset);
        for w in by_dst.windows(2) {
            prop_assert!(w[0].dst_offset + w[0].len <= w[1].dst_offset, "dst overlap");
        }
        let mut unique_src = src_blocks.clone();
        unique_src.sort_unstable();
        unique_src.dedup();
        if unique_src.len() == src_blocks.len() {
            for w in ops.windows(2) {
                prop_assert!(w[0].src_offset + w[0].len <= w[1].src_offset, "src overlap");
            }
        }

        for (&s, &d) in src_blocks.iter().zip(dst_blocks) {
            for l in 0..layers {
                let (so, dof) = (src.chunk_offset(s, l), dst.chunk_offset(d, l));
                let covering: Vec<&RmaOp> = ops.iter().filter(|o| o.dst_offset <= dof && dof < o.dst_offset + o.len).collect();
                prop_assert_eq!(covering.len(), 1, "chunk ({}, {}) -> ({}, {})", s, d, l, l);
                let o = covering[0];
                prop_assert!(dof + bb <= o.dst_offset + o.len);
                prop_assert_eq!(o.src_offset + (dof - o.dst_offset), so);
            }
        }
        Ok(())
    }

    /// The plan spelled out naively: every chunk, sorted, greedily merged.
    /// `by_dst` sorts by destination offset (unique) instead of source.
    fn reference(case: &Case, cap: u64, by_dst: bool) -> Vec<RmaOp> {
        let (src, dst) = (&case.src, &case.dst);
        let mut chunks = Vec::new();
        for (&s, &d) in case.src_blocks.iter().zip(&case.dst_blocks) {
            for l in 0..src.num_layers() {
                chunks.push(op(src.chunk_offset(s, l), dst.chunk_offset(d, l), src.block_bytes()));
            }
        }
        if by_dst {
            chunks.sort_unstable_by_key(|o| o.dst_offset);
        } else {
            chunks.sort_unstable_by_key(|o| o.src_offset);
        }
        let mut out: Vec<RmaOp> = Vec::new();
        for c in chunks {
            match out.last_mut() {
                Some(last) if contiguous_after(last, &c) && last.len + c.len <= cap => {
                    last.len += c.len;
                }
                _ => out.push(c),
            }
        }
        out.sort_unstable_by_key(|o| (o.src_offset, o.dst_offset));
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn plan_maps_every_byte_once(case in arb_case()) {
            let plan = TransferPlan::build(
                &case.src, &case.src_blocks, &case.dst, &case.dst_blocks, 0,
            ).unwrap();
            check_mapping(&case, &plan)?;
        }

        #[test]
        fn unlimited_coalescing_is_maximal(case in arb_case()) {
            let plan = TransferPlan::build(
                &case.src, &case.src_blocks, &case.dst, &case.dst_blocks, 0,
            ).unwrap();
            let ops = plan.ops();
            for a in ops {
                for b in ops {
                    prop_assert!(!contiguous_after(a, b), "{:?} then {:?} could merge", a, b);
                }
            }
        }

        #[test]
        fn capped_ops_respect_cap(case in arb_case(), extra in 0u64..40) {
            let cap = case.src.block_bytes() + extra;
            let plan = TransferPlan::build(
                &case.src, &case.src_blocks, &case.dst, &case.dst_blocks, cap,
            ).unwrap();
            check_mapping(&case, &plan)?;
            let ops = plan.ops();
            for a in ops {
                prop_assert!(a.len <= cap);
                for b in ops {
                    if contiguous_after(a, b) {
                        prop_assert!(a.len + b.len > cap, "{:?} + {:?} fit in {}", a, b, cap);
                    }
                }
            }
        }

        #[test]
        fn matches_naive_reference(case in arb_case(), cap_chunks in 0u64..6) {
            let bb = case.src.block_bytes();
            let max_op_bytes = cap_chunks * bb + cap_chunks % 2;
            let cap = if max_op_bytes == 0 { u64::MAX } else { max_op_bytes };
            let plan = TransferPlan::build(
                &case.src, &case.src_blocks, &case.dst, &case.dst_blocks, max_op_bytes,
            ).unwrap();
            prop_assert_eq!(plan.ops().to_vec(), reference(&case, cap, true));
            let mut srcs = case.src_blocks.clone();
            srcs.sort_unstable();
            srcs.dedup();
            if srcs.len() == case.src_blocks.len() {
                // Unique sources: plain source-order merging agrees.
                prop_assert_eq!(plan.ops().to_vec(), reference(&case, cap, false));
            }
        }

        #[test]
        fn bad_ids_rejected(case in arb_case(), kind in 0u8..3, pick in any::<prop::sample::Index>(), other in any::<prop::sample::Index>(), over in 0u32..3) {
            let Case { src, dst, mut src_blocks, mut dst_blocks } = case;
            let n = src_blocks.len();
            let i = pick.index(n);
            let expected = match kind {
                0 => {
                    src_blocks[i] = src.num_blocks() + over;
                    PlanError::SrcOutOfRange { index: i, block: src_blocks[i], num_blocks: src.num_blocks() }
                }
                1 => {
                    dst_blocks[i] = dst.num_blocks() + over;
                    PlanError::DstOutOfRange { index: i, block: dst_blocks[i], num_blocks: dst.num_blocks() }
                }
                _ => {
                    prop_assume!(n >= 2);
                    let j = (i + 1 + other.index(n - 1)) % n;
                    dst_blocks[i] = dst_blocks[j];
                    PlanError::DuplicateDst { block: dst_blocks[j], first: i.min(j), second: i.max(j) }
                }
            };
            let (v, b) = both(&src, &src_blocks, &dst, &dst_blocks);
            prop_assert_eq!(v, Err(expected.clone()));
            prop_assert_eq!(b, Err(expected));
        }

        #[test]
        fn contiguous_identity_is_one_op(
            (bb, nb, ids) in (1u64..=64, 1u32..=64).prop_flat_map(|(bb, nb)| {
                (Just(bb), Just(nb), Just((0..nb).collect::<Vec<u32>>()).prop_shuffle())
            }),
        ) {
            let l = contiguous(bb, nb);
            let plan = TransferPlan::build(&l, &ids, &l, &ids, 0).unwrap();
            prop_assert_eq!(plan.ops(), &[op(0, 0, bb * u64::from(nb))]);
        }

        #[test]
        fn repeat_scans_agree(ids in vec(0u32..40, 1..60)) {
            let naive = (1..ids.len()).find_map(|second| {
                ids[..second].iter().position(|&x| x == ids[second]).map(|first| (ids[second], first, second))
            });
            prop_assert_eq!(first_repeat_bitset(&ids, 40), naive);
            prop_assert_eq!(first_repeat_sorted(&ids), naive);
        }
    }
}
