//! Deterministic test patterns: every (block, layer) chunk gets content
//! derived from a seed and the *source* block id, so a receiver can verify
//! every byte of every block it was sent, and a checksum per run.

use bytemuck::cast_slice_mut;
use kvrail_transfer::{BlockLayout, Region, TransferError};

/// Word `i` of the chunk of `block`/`layer` under `seed` (splitmix64).
fn word(seed: u64, block: u32, layer: u32, i: u64) -> u64 {
    let mut z = seed ^ ((block as u64) << 40) ^ ((layer as u64) << 20) ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` (a whole number of u64 words) with the chunk pattern.
fn fill_chunk(buf: &mut [u64], seed: u64, block: u32, layer: u32) {
    for (i, w) in buf.iter_mut().enumerate() {
        *w = word(seed, block, layer, i as u64);
    }
}

/// Bytes poisoned at each end of a destination chunk before a transfer.
const POISON: u64 = 0xDEAD_BEEF_DEAD_BEEF;

fn chunk_words(layout: &BlockLayout) -> Result<usize, TransferError> {
    let b = layout.block_bytes();
    if !b.is_multiple_of(8) {
        return Err(TransferError::Region(format!("test patterns need block_bytes divisible by 8, got {b}")));
    }
    Ok((b / 8) as usize)
}

/// Writes the pattern of every block of the layout into the region.
pub fn fill(region: &Region, layout: &BlockLayout, seed: u64) -> Result<u64, TransferError> {
    let mut buf = vec![0u64; chunk_words(layout)?];
    for block in 0..layout.num_blocks() {
        for layer in 0..layout.num_layers() {
            fill_chunk(&mut buf, seed, block, layer);
            region.write(layout.chunk_offset(block, layer), bytemuck::cast_slice(&buf))?;
        }
    }
    Ok(layout.num_blocks() as u64 * layout.bytes_per_block())
}

/// Overwrites the first and last word of every chunk of `blocks`, so a block
/// that is never written cannot pass verification with stale content.
pub fn poison(region: &Region, layout: &BlockLayout, blocks: &[u32]) -> Result<(), TransferError> {
    let words = chunk_words(layout)?;
    for &block in blocks {
        layout.check_block(block)?;
        for layer in 0..layout.num_layers() {
            let off = layout.chunk_offset(block, layer);
            region.write(off, &POISON.to_ne_bytes())?;
            region.write(off + (words as u64 - 1) * 8, &POISON.to_ne_bytes())?;
        }
    }
    Ok(())
}

/// Outcome of [`verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verification {
    pub verified: u64,
    pub bad: u64,
    pub first_error: String,
    pub checksum: u64,
}

/// Checks that destination block `dst[i]` holds the pattern of source block
/// `src[i]` in every layer, byte for byte.
pub fn verify(region: &Region, layout: &BlockLayout, seed: u64, src: &[u32], dst: &[u32]) -> Result<Verification, TransferError> {
    if src.len() != dst.len() {
        return Err(TransferError::Region(format!("{} source blocks but {} destination blocks", src.len(), dst.len())));
    }
    let words = chunk_words(layout)?;
    let mut got = vec![0u64; words];
    let mut want = vec![0u64; words];
    let mut out = Verification { checksum: 0xcbf2_9ce4_8422_2325, ..Default::default() };
    for (&s, &d) in src.iter().zip(dst) {
        layout.check_block(d)?;
        let mut ok = true;
        for layer in 0..layout.num_layers() {
            region.read(layout.chunk_offset(d, layer), cast_slice_mut(&mut got))?;
            fill_chunk(&mut want, seed, s, layer);
            if got != want {
                if ok && out.first_error.is_empty() {
                    let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
                    out.first_error = format!(
                        "dst block {d} (from src block {s}), layer {layer}: byte {} is {:#018x}, expected {:#018x}",
                        i * 8,
                        got[i],
                        want[i]
                    );
                }
                ok = false;
            }
            for w in &got {
                out.checksum = (out.checksum ^ w).wrapping_mul(0x0000_0100_0000_01B3);
            }
        }
        if ok {
            out.verified += 1;
        } else {
            out.bad += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_by_block_layer_and_seed() {
        let mut a = vec![0u64; 16];
        let mut b = vec![0u64; 16];
        fill_chunk(&mut a, 1, 0, 0);
        fill_chunk(&mut b, 1, 1, 0);
        assert_ne!(a, b);
        fill_chunk(&mut b, 1, 0, 1);
        assert_ne!(a, b);
        fill_chunk(&mut b, 2, 0, 0);
        assert_ne!(a, b);
        fill_chunk(&mut b, 1, 0, 0);
        assert_eq!(a, b);
    }
}
