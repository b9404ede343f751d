//! Block geometry of a registered KV-cache region.
//!
//! This module owns [`BlockLayout`]: where, inside one registered memory
//! region, the bytes of a given (block, layer) chunk live, the validation that
//! makes every chunk offset overflow-free and non-overlapping, and the rules
//! (plus a wire hash, [`BlockLayout::compat_hash`]) for deciding whether two
//! agents' layouts can exchange blocks. It does no I/O and holds no memory.
//!
//! A *block* is named by a `u32` id. Moving block `b` moves one chunk of
//! `block_bytes` per layer; chunk `(b, l)` starts at
//! `l * layer_stride + b * block_stride` from the region base.

use thiserror::Error;

/// Version tag mixed into [`BlockLayout::compat_hash`]. Bump it whenever the
/// meaning of a layout on the wire changes, so old and new agents refuse to
/// pair instead of corrupting each other's caches.
pub const LAYOUT_COMPAT_TAG: &[u8] = b"kvrail-layout-compat-v1";

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Why a [`BlockLayout`] could not be built or used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LayoutError {
    /// A size or count that must be positive was zero.
    #[error("{field} is 0; it must be in 1..={max}")]
    Zero {
        /// Name of the offending parameter.
        field: &'static str,
        /// Largest value the parameter's type allows.
        max: u64,
    },

    /// `block_stride` is smaller than one chunk, so neighbouring blocks overlap.
    #[error(
        "block_stride {block_stride} is smaller than block_bytes {block_bytes}; \
         block_stride must be in {block_bytes}..={max}",
        max = u64::MAX
    )]
    BlockStrideTooSmall {
        /// The rejected stride.
        block_stride: u64,
        /// Bytes of one chunk.
        block_bytes: u64,
    },

    /// Some byte offset of the layout does not fit in a `u64`.
    #[error(
        "layout too large: {what} does not fit in u64 (max {max}); \
         use fewer blocks or layers, or smaller strides",
        max = u64::MAX
    )]
    Overflow {
        /// The expression that overflowed, with its operand values.
        what: String,
    },

    /// Chunks of different (block, layer) pairs would share bytes.
    #[error(
        "chunks overlap: block_bytes {block_bytes}, num_blocks {num_blocks}, \
         num_layers {num_layers}, block_stride {block_stride}, layer_stride {layer_stride} \
         is neither layer-major (needs layer_stride >= {layer_major_min}) nor block-major \
         (needs layer_stride >= {block_bytes} and block_stride >= {block_major_min})"
    )]
    Overlap {
        /// Bytes of one chunk.
        block_bytes: u64,
        /// Number of blocks.
        num_blocks: u32,
        /// Number of layers.
        num_layers: u32,
        /// Distance between consecutive blocks of one layer.
        block_stride: u64,
        /// Distance between the same block in consecutive layers.
        layer_stride: u64,
        /// Smallest `layer_stride` that would make the layout layer-major.
        layer_major_min: u64,
        /// Smallest `block_stride` that would make the layout block-major
        /// (given the current `layer_stride`).
        block_major_min: u64,
    },

    /// The region cannot hold even one block in every layer.
    #[error(
        "region_bytes {region_bytes} is too small for one block of {num_layers} layers x \
         {block_bytes} bytes; region_bytes must be at least {needed}"
    )]
    RegionTooSmall {
        /// Size of the region offered.
        region_bytes: u64,
        /// Bytes of one chunk.
        block_bytes: u64,
        /// Number of layers.
        num_layers: u32,
        /// Smallest region that holds one block (`block_bytes * num_layers`).
        needed: u64,
    },

    /// A block id is not below the layout's block count.
    #[error(
        "block id {block} is out of range; this layout has {num_blocks} blocks, \
         so ids must be in 0..={last}",
        last = num_blocks.saturating_sub(1)
    )]
    BlockOutOfRange {
        /// The rejected id.
        block: u32,
        /// Number of blocks in the layout.
        num_blocks: u32,
    },

    /// Two layouts cannot exchange blocks.
    #[error("layouts are incompatible ({what}); block_bytes and num_layers must be equal on both sides")]
    Incompatible {
        /// Each differing field with both values, e.g.
        /// `block_bytes: local 65536, peer 32768`.
        what: String,
    },
}

/// Geometry of a KV-cache region, in blocks.
///
/// Invariants (enforced by [`BlockLayout::new`]): every field is nonzero,
/// `block_stride >= block_bytes`, [`region_bytes`](Self::region_bytes) fits in
/// a `u64`, and no two chunks overlap, because the layout is single-layer,
/// layer-major or block-major. As a consequence every in-range
/// [`chunk_offset`](Self::chunk_offset) plus `block_bytes` is at most
/// `region_bytes()`, with no overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockLayout {
    block_bytes: u64,
    num_blocks: u32,
    num_layers: u32,
    block_stride: u64,
    layer_stride: u64,
}

fn mul(a: u64, b: u64, what: impl FnOnce() -> String) -> Result<u64, LayoutError> {
    a.checked_mul(b).ok_or_else(|| LayoutError::Overflow { what: what() })
}

fn add(a: u64, b: u64, what: impl FnOnce() -> String) -> Result<u64, LayoutError> {
    a.checked_add(b).ok_or_else(|| LayoutError::Overflow { what: what() })
}

/// Bytes spanned by one layer: `(num_blocks - 1) * block_stride + block_bytes`.
fn layer_span(block_bytes: u64, num_blocks: u32, block_stride: u64) -> Result<u64, LayoutError> {
    let what = || format!("(num_blocks {num_blocks} - 1) * block_stride {block_stride} + block_bytes {block_bytes}");
    add(mul(u64::from(num_blocks - 1), block_stride, what)?, block_bytes, what)
}

impl BlockLayout {
    /// Builds a layout from explicit strides, validating it.
    ///
    /// All arguments must be nonzero, except that `layer_stride` is ignored
    /// when `num_layers == 1` and then normalised to the span of the single
    /// layer, `(num_blocks - 1) * block_stride + block_bytes`, so equal
    /// geometries compare equal. `block_stride >= block_bytes` is required,
    /// the whole region must fit in a `u64`, and chunks must not overlap: the
    /// layout must be layer-major
    /// (`layer_stride >= (num_blocks - 1) * block_stride + block_bytes`) or
    /// block-major (`layer_stride >= block_bytes` and
    /// `block_stride >= (num_layers - 1) * layer_stride + block_bytes`).
    pub fn new(block_bytes: u64, num_blocks: u32, num_layers: u32, block_stride: u64, layer_stride: u64) -> Result<Self, LayoutError> {
        let zero = |field, max| Err(LayoutError::Zero { field, max });
        if block_bytes == 0 {
            return zero("block_bytes", u64::MAX);
        }
        if num_blocks == 0 {
            return zero("num_blocks", u64::from(u32::MAX));
        }
        if num_layers == 0 {
            return zero("num_layers", u64::from(u32::MAX));
        }
        if block_stride == 0 {
            return zero("block_stride", u64::MAX);
        }
        if num_layers > 1 && layer_stride == 0 {
            return zero("layer_stride", u64::MAX);
        }
        if block_stride < block_bytes {
            return Err(LayoutError::BlockStrideTooSmall { block_stride, block_bytes });
        }

        let span = layer_span(block_bytes, num_blocks, block_stride)?;
        if num_layers == 1 {
            return Ok(Self { block_bytes, num_blocks, num_layers, block_stride, layer_stride: span });
        }

        // Whole region: (num_layers - 1) * layer_stride + span.
        let last_layer = u64::from(num_layers - 1);
        let layers_what = || {
            format!(
                "(num_layers {num_layers} - 1) * layer_stride {layer_stride} + \
                 (num_blocks {num_blocks} - 1) * block_stride {block_stride} + \
                 block_bytes {block_bytes}"
            )
        };
        let layers_part = mul(last_layer, layer_stride, layers_what)?;
        add(layers_part, span, layers_what)?;

        // Both sums below are at most the region size, so they cannot
        // overflow once the region fits; checked anyway for clarity.
        let layer_major_min = span;
        let block_major_min = add(layers_part, block_bytes, layers_what)?;
        let layer_major = layer_stride >= layer_major_min;
        let block_major = layer_stride >= block_bytes && block_stride >= block_major_min;
        if !layer_major && !block_major {
            return Err(LayoutError::Overlap {
                block_bytes,
                num_blocks,
                num_layers,
                block_stride,
                layer_stride,
                layer_major_min,
                block_major_min,
            });
        }
        Ok(Self { block_bytes, num_blocks, num_layers, block_stride, layer_stride })
    }

    /// One layer of `num_blocks` blocks packed back to back
    /// (`block_stride == block_bytes`).
    pub fn contiguous(block_bytes: u64, num_blocks: u32) -> Result<Self, LayoutError> {
        Self::new(block_bytes, num_blocks, 1, block_bytes, 0)
    }

    /// vLLM-style layout: within a layer the blocks are packed back to back
    /// (`block_stride == block_bytes`), and the layers follow one another
    /// (`layer_stride == num_blocks * block_bytes`).
    pub fn layer_major(block_bytes: u64, num_blocks: u32, num_layers: u32) -> Result<Self, LayoutError> {
        let layer_stride =
            mul(u64::from(num_blocks), block_bytes, || format!("layer_stride = num_blocks {num_blocks} * block_bytes {block_bytes}"))?;
        Self::new(block_bytes, num_blocks, num_layers, block_bytes, layer_stride)
    }

    /// A block's layers are adjacent (`layer_stride == block_bytes`), and the
    /// blocks follow one another (`block_stride == num_layers * block_bytes`).
    pub fn block_major(block_bytes: u64, num_blocks: u32, num_layers: u32) -> Result<Self, LayoutError> {
        let block_stride =
            mul(u64::from(num_layers), block_bytes, || format!("block_stride = num_layers {num_layers} * block_bytes {block_bytes}"))?;
        Self::new(block_bytes, num_blocks, num_layers, block_stride, block_bytes)
    }

    /// The packed layer-major layout ([`layer_major`](Self::layer_major)) with
    /// the most blocks (at most `u32::MAX`) whose
    /// [`region_bytes`](Self::region_bytes) is at most `region_bytes`.
    pub fn fit_region(region_bytes: u64, block_bytes: u64, num_layers: u32) -> Result<Self, LayoutError> {
        if block_bytes == 0 {
            return Err(LayoutError::Zero { field: "block_bytes", max: u64::MAX });
        }
        if num_layers == 0 {
            return Err(LayoutError::Zero { field: "num_layers", max: u64::from(u32::MAX) });
        }
        let needed =
            mul(block_bytes, u64::from(num_layers), || format!("bytes per block = block_bytes {block_bytes} * num_layers {num_layers}"))?;
        let fit = region_bytes / needed;
        if fit == 0 {
            return Err(LayoutError::RegionTooSmall { region_bytes, block_bytes, num_layers, needed });
        }
        let num_blocks = u32::try_from(fit).unwrap_or(u32::MAX);
        Self::layer_major(block_bytes, num_blocks, num_layers)
    }

    /// Bytes of one chunk (one block in one layer).
    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    /// Number of blocks; valid ids are `0..num_blocks`.
    pub fn num_blocks(&self) -> u32 {
        self.num_blocks
    }

    /// Number of layers; each block has one chunk per layer.
    pub fn num_layers(&self) -> u32 {
        self.num_layers
    }

    /// Distance in bytes between block `b` and block `b + 1` of one layer.
    pub fn block_stride(&self) -> u64 {
        self.block_stride
    }

    /// Distance in bytes between layer `l` and layer `l + 1` of one block.
    /// For a single-layer layout this is the span of the layer.
    pub fn layer_stride(&self) -> u64 {
        self.layer_stride
    }

    /// Bytes spanned from the region base to the end of the last chunk:
    /// `(num_layers - 1) * layer_stride + (num_blocks - 1) * block_stride + block_bytes`.
    pub fn region_bytes(&self) -> u64 {
        u64::from(self.num_layers - 1) * self.layer_stride + u64::from(self.num_blocks - 1) * self.block_stride + self.block_bytes
    }

    /// Bytes moved when one block is transferred: `block_bytes * num_layers`.
    pub fn bytes_per_block(&self) -> u64 {
        self.block_bytes * u64::from(self.num_layers)
    }

    /// Offset from the region base of chunk (`block`, `layer`):
    /// `layer * layer_stride + block * block_stride`.
    ///
    /// Both arguments must be in range (checked with `debug_assert!`; use
    /// [`check_block`](Self::check_block) on untrusted ids first).
    pub fn chunk_offset(&self, block: u32, layer: u32) -> u64 {
        debug_assert!(block < self.num_blocks, "block {block} out of range 0..{}", self.num_blocks);
        debug_assert!(layer < self.num_layers, "layer {layer} out of range 0..{}", self.num_layers);
        u64::from(layer) * self.layer_stride + u64::from(block) * self.block_stride
    }

    /// `Ok` if `block` is a valid id for this layout.
    pub fn check_block(&self, block: u32) -> Result<(), LayoutError> {
        if block < self.num_blocks {
            Ok(())
        } else {
            Err(LayoutError::BlockOutOfRange { block, num_blocks: self.num_blocks })
        }
    }

    /// Hash of the fields that must agree between two agents: FNV-1a 64 over
    /// [`LAYOUT_COMPAT_TAG`], then `block_bytes` as 8 little-endian bytes,
    /// then `num_layers` as 4 little-endian bytes. Block counts and strides
    /// are local matters and do not enter the hash.
    pub fn compat_hash(&self) -> u64 {
        let bytes = LAYOUT_COMPAT_TAG.iter().copied().chain(self.block_bytes.to_le_bytes()).chain(self.num_layers.to_le_bytes());
        bytes.fold(FNV_OFFSET_BASIS, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME))
    }

    /// `Ok` if blocks can be moved between this layout and `peer`'s: the
    /// chunk size and the layer count must match (block counts and strides
    /// may differ). The error names every differing field with both values.
    pub fn check_compatible(&self, peer: &BlockLayout) -> Result<(), LayoutError> {
        self.compat_diff(peer, "local", "peer")
    }

    /// Shared by [`check_compatible`](Self::check_compatible) and the
    /// transfer planner, which names the sides `src` and `dst`.
    pub(crate) fn compat_diff(&self, other: &BlockLayout, this_name: &str, other_name: &str) -> Result<(), LayoutError> {
        let mut diffs = Vec::new();
        if self.block_bytes != other.block_bytes {
            diffs.push(format!("block_bytes: {this_name} {}, {other_name} {}", self.block_bytes, other.block_bytes));
        }
        if self.num_layers != other.num_layers {
            diffs.push(format!("num_layers: {this_name} {}, {other_name} {}", self.num_layers, other.num_layers));
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(LayoutError::Incompatible { what: diffs.join("; ") })
        }
    }

    /// True if every chunk of layer `l` lies below every chunk of layer
    /// `l + 1`, so sorting chunks by (layer, block) sorts them by offset.
    /// Otherwise the layout is block-major and (block, layer) order sorts
    /// them. Single-layer layouts are both.
    pub(crate) fn is_layer_major(&self) -> bool {
        self.num_layers == 1 || self.layer_stride >= u64::from(self.num_blocks - 1) * self.block_stride + self.block_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn contiguous_offsets() {
        let l = BlockLayout::contiguous(4096, 10).unwrap();
        assert_eq!(l.block_bytes(), 4096);
        assert_eq!(l.num_blocks(), 10);
        assert_eq!(l.num_layers(), 1);
        assert_eq!(l.block_stride(), 4096);
        assert_eq!(l.layer_stride(), 40960, "normalised to the layer span");
        assert_eq!(l.chunk_offset(0, 0), 0);
        assert_eq!(l.chunk_offset(7, 0), 7 * 4096);
        assert_eq!(l.region_bytes(), 40960);
        assert_eq!(l.bytes_per_block(), 4096);
        assert!(l.is_layer_major());
    }

    #[test]
    fn layer_major_offsets() {
        let l = BlockLayout::layer_major(100, 8, 3).unwrap();
        assert_eq!(l.block_stride(), 100);
        assert_eq!(l.layer_stride(), 800);
        assert_eq!(l.chunk_offset(0, 0), 0);
        assert_eq!(l.chunk_offset(5, 0), 500);
        assert_eq!(l.chunk_offset(0, 1), 800);
        assert_eq!(l.chunk_offset(7, 2), 1600 + 700);
        assert_eq!(l.region_bytes(), 2400);
        assert_eq!(l.bytes_per_block(), 300);
        assert!(l.is_layer_major());
    }

    #[test]
    fn block_major_offsets() {
        let l = BlockLayout::block_major(100, 8, 3).unwrap();
        assert_eq!(l.block_stride(), 300);
        assert_eq!(l.layer_stride(), 100);
        assert_eq!(l.chunk_offset(0, 0), 0);
        assert_eq!(l.chunk_offset(0, 2), 200);
        assert_eq!(l.chunk_offset(1, 0), 300);
        assert_eq!(l.chunk_offset(7, 2), 2100 + 200);
        assert_eq!(l.region_bytes(), 2400);
        assert_eq!(l.bytes_per_block(), 300);
        assert!(!l.is_layer_major());
    }

    #[test]
    fn padded_strides_accepted() {
        // Layer-major with per-block and per-layer padding.
        let l = BlockLayout::new(10, 4, 2, 16, 100).unwrap();
        assert_eq!(l.chunk_offset(3, 1), 148);
        assert_eq!(l.region_bytes(), 100 + 48 + 10);
        // Block-major with padding.
        let b = BlockLayout::new(10, 4, 3, 64, 12).unwrap();
        assert_eq!(b.chunk_offset(2, 2), 128 + 24);
        assert!(!b.is_layer_major());
        // Exactly tight in both directions.
        BlockLayout::new(10, 4, 2, 10, 40).unwrap();
        BlockLayout::new(10, 4, 2, 20, 10).unwrap();
    }

    #[test]
    fn single_layer_normalises_layer_stride() {
        let a = BlockLayout::new(8, 4, 1, 8, 0).unwrap();
        let b = BlockLayout::new(8, 4, 1, 8, 12345).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, BlockLayout::contiguous(8, 4).unwrap());
        assert_eq!(a, BlockLayout::layer_major(8, 4, 1).unwrap());
        assert_eq!(a, BlockLayout::block_major(8, 4, 1).unwrap());
    }

    #[test]
    fn zero_fields_rejected() {
        let cases = [
            (BlockLayout::new(0, 1, 1, 1, 1), "block_bytes"),
            (BlockLayout::new(1, 0, 1, 1, 1), "num_blocks"),
            (BlockLayout::new(1, 1, 0, 1, 1), "num_layers"),
            (BlockLayout::new(1, 1, 1, 0, 1), "block_stride"),
            (BlockLayout::new(1, 1, 2, 1, 0), "layer_stride"),
        ];
        for (res, field) in cases {
            match res {
                Err(LayoutError::Zero { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected Zero, got {other:?}"),
            }
        }
        let msg = BlockLayout::contiguous(1, 0).unwrap_err().to_string();
        assert_eq!(msg, "num_blocks is 0; it must be in 1..=4294967295");
    }

    #[test]
    fn block_stride_below_chunk_rejected() {
        let e = BlockLayout::new(64, 2, 1, 32, 0).unwrap_err();
        assert_eq!(e, LayoutError::BlockStrideTooSmall { block_stride: 32, block_bytes: 64 });
        assert!(e.to_string().contains("block_stride 32"));
        assert!(e.to_string().contains("64..="));
    }

    #[test]
    fn overlap_rejected() {
        // Interleaved so that layer 1 of block 0 lands inside block 1.
        let e = BlockLayout::new(10, 4, 2, 10, 15).unwrap_err();
        assert_eq!(
            e,
            LayoutError::Overlap {
                block_bytes: 10,
                num_blocks: 4,
                num_layers: 2,
                block_stride: 10,
                layer_stride: 15,
                layer_major_min: 40,
                block_major_min: 25,
            }
        );
        let msg = e.to_string();
        assert!(msg.contains("layer_stride >= 40"), "{msg}");
        assert!(msg.contains("block_stride >= 25"), "{msg}");
        // layer_stride below one chunk: layers of a block overlap.
        assert!(matches!(BlockLayout::new(10, 1, 2, 100, 5), Err(LayoutError::Overlap { .. })));
    }

    #[test]
    fn overflow_rejected() {
        let e = BlockLayout::new(1, u32::MAX, 1, u64::MAX / 2, 0).unwrap_err();
        assert!(matches!(e, LayoutError::Overflow { .. }), "{e:?}");
        let e = BlockLayout::new(1, 1, u32::MAX, 1, u64::MAX / 2).unwrap_err();
        assert!(matches!(e, LayoutError::Overflow { .. }), "{e:?}");
        let e = BlockLayout::layer_major(1 << 40, u32::MAX, 2).unwrap_err();
        assert!(e.to_string().contains("does not fit in u64"), "{e}");
        let e = BlockLayout::block_major(1 << 40, 2, u32::MAX).unwrap_err();
        assert!(matches!(e, LayoutError::Overflow { .. }), "{e:?}");
        // The largest region that fits is accepted.
        let l = BlockLayout::new(u64::MAX, 1, 1, u64::MAX, 0).unwrap();
        assert_eq!(l.region_bytes(), u64::MAX);
    }

    #[test]
    fn fit_region_picks_largest() {
        let l = BlockLayout::fit_region(10_000, 100, 3).unwrap();
        assert_eq!(l, BlockLayout::layer_major(100, 33, 3).unwrap());
        assert!(l.region_bytes() <= 10_000);
        let exact = BlockLayout::fit_region(9_900, 100, 3).unwrap();
        assert_eq!(exact.num_blocks(), 33);
        assert_eq!(exact.region_bytes(), 9_900);
        // Capped at u32::MAX blocks.
        let big = BlockLayout::fit_region(u64::MAX, 1, 1).unwrap();
        assert_eq!(big.num_blocks(), u32::MAX);
    }

    #[test]
    fn fit_region_errors() {
        assert_eq!(
            BlockLayout::fit_region(299, 100, 3).unwrap_err(),
            LayoutError::RegionTooSmall { region_bytes: 299, block_bytes: 100, num_layers: 3, needed: 300 }
        );
        assert!(matches!(BlockLayout::fit_region(100, 0, 1), Err(LayoutError::Zero { field: "block_bytes", .. })));
        assert!(matches!(BlockLayout::fit_region(100, 1, 0), Err(LayoutError::Zero { field: "num_layers", .. })));
        assert!(matches!(BlockLayout::fit_region(u64::MAX, u64::MAX, 2), Err(LayoutError::Overflow { .. })));
    }

    #[test]
    fn check_block_range() {
        let l = BlockLayout::contiguous(1, 5).unwrap();
        l.check_block(0).unwrap();
        l.check_block(4).unwrap();
        let e = l.check_block(5).unwrap_err();
        assert_eq!(e, LayoutError::BlockOutOfRange { block: 5, num_blocks: 5 });
        assert_eq!(e.to_string(), "block id 5 is out of range; this layout has 5 blocks, so ids must be in 0..=4");
    }

    #[test]
    fn compat_hash_pinned() {
        // Reference values computed independently (Python FNV-1a 64).
        let l = BlockLayout::layer_major(65536, 10, 32).unwrap();
        assert_eq!(l.compat_hash(), 0xe3ca_69c4_948a_1cad);
        let c = BlockLayout::contiguous(16, 3).unwrap();
        assert_eq!(c.compat_hash(), 0xbead_afd9_db0a_d425);
    }

    #[test]
    fn compat_hash_ignores_local_geometry() {
        let a = BlockLayout::layer_major(4096, 100, 4).unwrap();
        let b = BlockLayout::block_major(4096, 7, 4).unwrap();
        assert_eq!(a.compat_hash(), b.compat_hash());
        a.check_compatible(&b).unwrap();
        let c = BlockLayout::layer_major(4096, 100, 5).unwrap();
        assert_ne!(a.compat_hash(), c.compat_hash());
        let d = BlockLayout::layer_major(2048, 100, 4).unwrap();
        assert_ne!(a.compat_hash(), d.compat_hash());
    }

    #[test]
    fn check_compatible_names_fields() {
        let a = BlockLayout::layer_major(65536, 10, 32).unwrap();
        let b = BlockLayout::layer_major(32768, 10, 32).unwrap();
        assert_eq!(a.check_compatible(&b).unwrap_err(), LayoutError::Incompatible { what: "block_bytes: local 65536, peer 32768".into() });
        let c = BlockLayout::layer_major(32768, 10, 16).unwrap();
        let e = a.check_compatible(&c).unwrap_err();
        assert_eq!(e, LayoutError::Incompatible { what: "block_bytes: local 65536, peer 32768; num_layers: local 32, peer 16".into() });
        assert!(e.to_string().contains("must be equal"));
    }

    fn arb_layout() -> impl Strategy<Value = (BlockLayout, bool)> {
        (1u64..=16, 1u32..=12, 1u32..=4, 0u64..=3, 0u64..=5, any::<bool>()).prop_map(|(bb, nb, nl, pad_b, pad_l, layer_major)| {
            if layer_major {
                let bs = bb + pad_b;
                let ls = (u64::from(nb) - 1) * bs + bb + pad_l;
                (BlockLayout::new(bb, nb, nl, bs, ls).unwrap(), true)
            } else {
                let ls = bb + pad_l;
                let bs = (u64::from(nl) - 1) * ls + bb + pad_b;
                (BlockLayout::new(bb, nb, nl, bs, ls).unwrap(), false)
            }
        })
    }

    proptest! {
        #[test]
        fn chunks_disjoint_and_inside_region((l, _) in arb_layout()) {
            let mut chunks = Vec::new();
            for b in 0..l.num_blocks() {
                for layer in 0..l.num_layers() {
                    chunks.push(l.chunk_offset(b, layer));
                }
            }
            chunks.sort_unstable();
            for w in chunks.windows(2) {
                prop_assert!(w[0] + l.block_bytes() <= w[1]);
            }
            prop_assert_eq!(chunks[0], 0);
            prop_assert_eq!(chunks.last().unwrap() + l.block_bytes(), l.region_bytes());
        }

        #[test]
        fn layer_order_sorts_offsets((l, built_layer_major) in arb_layout()) {
            if built_layer_major {
                prop_assert!(l.is_layer_major());
            }
            let mut order = Vec::new();
            if l.is_layer_major() {
                for layer in 0..l.num_layers() {
                    for b in 0..l.num_blocks() {
                        order.push(l.chunk_offset(b, layer));
                    }
                }
            } else {
                for b in 0..l.num_blocks() {
                    for layer in 0..l.num_layers() {
                        order.push(l.chunk_offset(b, layer));
                    }
                }
            }
            prop_assert!(order.windows(2).all(|w| w[0] < w[1]));
        }

        #[test]
        fn accepted_layouts_never_overlap(
            bb in 1u64..=6, nb in 1u32..=4, nl in 1u32..=3, bs in 1u64..=20, ls in 0u64..=40,
        ) {
            let mut chunks = Vec::new();
            for b in 0..u64::from(nb) {
                for layer in 0..u64::from(nl) {
                    chunks.push(layer * ls + b * bs);
                }
            }
            chunks.sort_unstable();
            let disjoint = chunks.windows(2).all(|w| w[0] + bb <= w[1]);
            let res = BlockLayout::new(bb, nb, nl, bs, ls);
            if res.is_ok() {
                prop_assert!(disjoint && bs >= bb);
            }
            // Every accepted layout is single-layer, layer-major or block-major.
            if let Ok(l) = res {
                let span = (u64::from(nb) - 1) * bs + bb;
                let bm = ls >= bb && bs >= (u64::from(nl) - 1) * ls + bb;
                prop_assert!(nl == 1 || l.layer_stride() >= span || bm);
            }
        }
    }
}
