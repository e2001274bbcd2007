//! The dirty bitmap: one bit per block of a disk, set by guest writes from any thread,
//! harvested by the copier.
//!
//! - `mark` is wait-free: one `fetch_or` per 64 blocks touched, no retry loop, no lock.
//! - `harvest` takes the dirty set word by word with `swap(0)`, so a bit set concurrently is
//!   either in this harvest or still set for the next one — never lost.
//! - `dirty_bytes` reads a counter kept beside the words (no scan). Mark and harvest update it
//!   after their word operation, so it may lag the words briefly; it is exact whenever no mark
//!   or harvest is in flight, and never reported below zero.
//!
//! Invariant I2 (no lost write) is the caller's half of the contract: a guest write marks its
//! blocks *after* it completed on the source disk, and the copier harvests (clears) a block
//! *before* reading it. Then a write racing a copy of the same block leaves the bit set, and
//! the block is copied again. `tests/` model-checks this race with loom (`--cfg tern_loom`).

use std::ops::Range;

#[cfg(not(tern_loom))]
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

#[cfg(tern_loom)]
use loom::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Smallest block size tracked.
pub const GRANULARITY_MIN: u32 = 4 << 10;
/// Largest block size tracked.
pub const GRANULARITY_MAX: u32 = 1 << 20;
/// Default block size: QEMU's default dirty-bitmap granularity for mirrors.
pub const GRANULARITY_DEFAULT: u32 = 64 << 10;

/// A bitmap of dirty blocks of one disk.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    size: u64,
    shift: u32,
    blocks: u64,
    /// Number of set bits (may lag the words while a mark or harvest runs).
    dirty: AtomicI64,
}

impl DirtyBitmap {
    /// A clean bitmap for a disk of `size` bytes with `granularity`-byte blocks, or `None`
    /// when the granularity is not a power of two between 4 KiB and 1 MiB.
    pub fn new(size: u64, granularity: u32) -> Option<Self> {
        if !granularity.is_power_of_two()
            || !(GRANULARITY_MIN..=GRANULARITY_MAX).contains(&granularity)
        {
            return None;
        }
        let shift = granularity.trailing_zeros();
        let blocks = size.div_ceil(granularity as u64);
        let words = (0..blocks.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        Some(Self {
            words,
            size,
            shift,
            blocks,
            dirty: AtomicI64::new(0),
        })
    }

    /// Bytes per block.
    pub fn granularity(&self) -> u32 {
        1 << self.shift
    }

    /// Blocks tracked.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Marks every block that `len` bytes at `offset` touch. Ranges past the disk's end are
    /// clipped; an empty range marks nothing. Wait-free.
    pub fn mark(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return;
        }
        let first = offset >> self.shift;
        let last = (end - 1) >> self.shift;
        self.mark_blocks(first..last + 1);
    }

    /// Marks blocks `range` (block indexes).
    pub fn mark_blocks(&self, range: Range<u64>) {
        let range = range.start..range.end.min(self.blocks);
        let mut block = range.start;
        let mut added = 0i64;
        while block < range.end {
            let word = block / 64;
            let bit = block % 64;
            let count = (range.end - block).min(64 - bit);
            let mask = if count == 64 {
                u64::MAX
            } else {
                ((1u64 << count) - 1) << bit
            };
            // Release: a harvester that sees the bit also sees the write that preceded the
            // mark (the caller marks after the write completed).
            let old = self.words[word as usize].fetch_or(mask, Ordering::AcqRel);
            added += (mask & !old).count_ones() as i64;
            block += count;
        }
        if added > 0 {
            self.dirty.fetch_add(added, Ordering::Relaxed);
        }
    }

    /// Takes the dirty set: returns the dirty block runs (block indexes, ascending, merged)
    /// and clears them. A concurrent mark lands either in this result or in the bitmap.
    pub fn harvest(&self) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        let mut taken = 0i64;
        for (index, word) in self.words.iter().enumerate() {
            // Cheap check first: most words are clean in a converging migration.
            if word.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = word.swap(0, Ordering::AcqRel);
            taken += bits.count_ones() as i64;
            while bits != 0 {
                let start = bits.trailing_zeros() as u64;
                let ones = (bits >> start).trailing_ones() as u64;
                let first = index as u64 * 64 + start;
                match runs.last_mut() {
                    Some(last) if last.end == first => last.end = first + ones,
                    _ => runs.push(first..first + ones),
                }
                bits &= if start + ones == 64 {
                    0
                } else {
                    !(((1u64 << ones) - 1) << start)
                };
            }
        }
        if taken > 0 {
            self.dirty.fetch_sub(taken, Ordering::Relaxed);
        }
        runs
    }

    /// Whether block `block` is dirty now.
    pub fn is_dirty(&self, block: u64) -> bool {
        block < self.blocks
            && self.words[(block / 64) as usize].load(Ordering::Acquire) >> (block % 64) & 1 == 1
    }

    /// Dirty blocks (from the counter, no scan).
    pub fn dirty_blocks(&self) -> u64 {
        self.dirty.load(Ordering::Relaxed).max(0) as u64
    }

    /// Dirty bytes, counting every dirty block as a whole block.
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_blocks() << self.shift
    }

    /// Byte range of block runs, clipped to the disk.
    pub fn byte_range(&self, blocks: &Range<u64>) -> Range<u64> {
        (blocks.start << self.shift).min(self.size)..(blocks.end << self.shift).min(self.size)
    }
}

#[cfg(all(test, not(tern_loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn granularity_must_be_a_power_of_two_in_range() {
        assert!(DirtyBitmap::new(1 << 30, 64 << 10).is_some());
        for bad in [0, 1000, 2048, 2 << 20, 96 << 10] {
            assert!(DirtyBitmap::new(1 << 30, bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn mark_clips_at_the_end_and_counts_blocks_once() {
        let bitmap = DirtyBitmap::new(10 * 4096 + 1, 4096).unwrap();
        assert_eq!(bitmap.blocks(), 11);
        bitmap.mark(4095, 2); // blocks 0 and 1
        bitmap.mark(0, 1); // block 0 again
        bitmap.mark(10 * 4096, u64::MAX); // block 10, clipped
        bitmap.mark(1 << 40, 4096); // past the end: nothing
        assert_eq!(bitmap.dirty_blocks(), 3);
        assert_eq!(bitmap.harvest(), vec![0..2, 10..11]);
        assert_eq!(bitmap.dirty_bytes(), 0);
        assert!(bitmap.harvest().is_empty());
    }

    #[test]
    fn runs_merge_across_word_boundaries() {
        let bitmap = DirtyBitmap::new(1 << 30, 4096).unwrap();
        bitmap.mark_blocks(60..200);
        bitmap.mark_blocks(255..256);
        bitmap.mark_blocks(256..257);
        assert_eq!(bitmap.harvest(), vec![60..200, 255..257]);
    }

    proptest! {
        #[test]
        fn harvest_returns_exactly_the_marked_blocks(
            marks in proptest::collection::vec((0u64..5_000_000, 0u64..300_000), 0..40),
            size in 1u64..5_000_000,
        ) {
            let bitmap = DirtyBitmap::new(size, 4096).unwrap();
            let mut model = vec![false; size.div_ceil(4096) as usize];
            for (offset, len) in &marks {
                bitmap.mark(*offset, *len);
                let end = offset.saturating_add(*len).min(size);
                if *offset < end {
                    for block in offset / 4096..=(end - 1) / 4096 {
                        model[block as usize] = true;
                    }
                }
            }
            prop_assert_eq!(bitmap.dirty_blocks(), model.iter().filter(|d| **d).count() as u64);
            let mut harvested = vec![false; model.len()];
            for run in bitmap.harvest() {
                for block in run {
                    prop_assert!(!harvested[block as usize], "block reported twice");
                    harvested[block as usize] = true;
                }
            }
            prop_assert_eq!(harvested, model);
            prop_assert_eq!(bitmap.dirty_blocks(), 0);
        }
    }

    #[test]
    fn concurrent_marks_and_harvests_lose_nothing() {
        use std::sync::Arc;
        let bitmap = Arc::new(DirtyBitmap::new(1 << 26, 4096).unwrap());
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let bitmap = bitmap.clone();
                std::thread::spawn(move || {
                    for i in 0..4096u64 {
                        bitmap.mark_blocks(t * 4096 + i..t * 4096 + i + 1);
                    }
                })
            })
            .collect();
        let mut seen = vec![false; 4 * 4096];
        let mut done = false;
        while !done {
            done = writers.iter().all(|w| w.is_finished());
            for run in bitmap.harvest() {
                for block in run {
                    seen[block as usize] = true;
                }
            }
        }
        for run in bitmap.harvest() {
            for block in run {
                seen[block as usize] = true;
            }
        }
        assert!(seen.iter().all(|s| *s), "a mark was lost");
        assert_eq!(bitmap.dirty_blocks(), 0);
    }
}

/// Loom model of the write/harvest race behind invariant I2. Run with
/// `RUSTFLAGS="--cfg tern_loom" cargo test -p tern-engine --lib bitmap::loom_model --release`.
#[cfg(all(test, tern_loom))]
mod loom_model {
    use super::*;
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicU64 as Cell;

    /// A guest writes version 2 of block 0 and marks it; concurrently the copier harvests and,
    /// if it saw the bit, reads the block. Whatever the interleaving, either the copier read
    /// version 2 or the bit is still set (so the block will be copied again).
    #[test]
    fn a_write_racing_a_copy_is_never_lost() {
        loom::model(|| {
            let bitmap = Arc::new(DirtyBitmap::new(4096, 4096).unwrap());
            let disk = Arc::new(Cell::new(1));
            // The bulk pass copied version 1 earlier; the block starts clean.
            let guest = {
                let bitmap = bitmap.clone();
                let disk = disk.clone();
                loom::thread::spawn(move || {
                    disk.store(2, Ordering::Release); // the write completes on the source
                    bitmap.mark(0, 4096); // then it is marked (I2)
                })
            };
            // The copier: harvest (clear) first, then read what it will send.
            let copied = if bitmap.harvest().is_empty() {
                None
            } else {
                Some(disk.load(Ordering::Acquire))
            };
            guest.join().unwrap();
            let resend_pending = bitmap.is_dirty(0);
            assert!(
                copied == Some(2) || resend_pending,
                "copied {copied:?} and the block is clean: version 2 is lost"
            );
        });
    }
}
