//! Dirty page tracking: which 4 KiB guest pages were written since the
//! last look.
//!
//! Backends report dirty pages per memory slot (see
//! [`crate::Vm::start_dirty_log`] and [`crate::Vm::dirty_log`]) as a bitmap
//! of `u64` words, bit `i` of word `w` standing for the page at offset
//! `(w * 64 + i) * 4096` in the slot — the layout of KVM_GET_DIRTY_LOG, so
//! the KVM backend hands the kernel's bitmap on unchanged.
//! [`DirtyBitmap`] is the same layout kept in host memory with atomic
//! words, for backends (the emulator) and devices that mark pages
//! themselves.

use std::sync::atomic::{AtomicU64, Ordering};

/// The page size dirty bitmaps count in.
pub const DIRTY_PAGE_SIZE: u64 = 4096;

/// Words of a bitmap covering `bytes` bytes.
pub fn bitmap_words(bytes: u64) -> usize {
    bytes.div_ceil(DIRTY_PAGE_SIZE).div_ceil(64) as usize
}

/// A bitmap of dirty pages that many threads mark and one thread takes.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    pages: u64,
}

impl DirtyBitmap {
    /// A clean bitmap for `bytes` bytes of memory.
    pub fn new(bytes: u64) -> Self {
        DirtyBitmap {
            words: (0..bitmap_words(bytes))
                .map(|_| AtomicU64::new(0))
                .collect(),
            pages: bytes.div_ceil(DIRTY_PAGE_SIZE),
        }
    }

    /// Mark the pages holding `[offset, offset + len)` dirty (bytes past
    /// the end of the bitmap are ignored).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / DIRTY_PAGE_SIZE;
        let last =
            (offset.saturating_add(len - 1) / DIRTY_PAGE_SIZE).min(self.pages.saturating_sub(1));
        let mut page = first;
        while page <= last && page < self.pages {
            let word = (page / 64) as usize;
            let bit = page % 64;
            // Set every bit of this word in one go.
            let end_in_word = (last - page).min(63 - bit);
            let mask = if end_in_word == 63 {
                u64::MAX
            } else {
                ((1u64 << (end_in_word + 1)) - 1) << bit
            };
            self.words[word].fetch_or(mask, Ordering::Relaxed);
            page += end_in_word + 1;
        }
    }

    /// Mark every page dirty.
    pub fn mark_all(&self) {
        self.mark(0, self.pages * DIRTY_PAGE_SIZE);
    }

    /// The dirty pages since the last take, cleared atomically word by
    /// word (a page marked during the take is in this result or the next).
    pub fn take(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect()
    }

    /// Number of pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }
}

/// OR `other` into `into` (bitmaps of the same slot; a shorter one is
/// taken as clean past its end).
pub fn merge(into: &mut Vec<u64>, other: &[u64]) {
    if into.len() < other.len() {
        into.resize(other.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(other) {
        *a |= b;
    }
}

/// Indices of the set bits of a bitmap, in order.
pub fn dirty_pages(bitmap: &[u64]) -> impl Iterator<Item = u64> + '_ {
    bitmap.iter().enumerate().flat_map(|(w, &word)| {
        let mut bits = word;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let b = bits.trailing_zeros() as u64;
            bits &= bits - 1;
            Some(w as u64 * 64 + b)
        })
    })
}

/// Number of set bits.
pub fn count(bitmap: &[u64]) -> u64 {
    bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_the_pages_a_range_touches() {
        let b = DirtyBitmap::new(300 * DIRTY_PAGE_SIZE);
        assert_eq!(bitmap_words(300 * DIRTY_PAGE_SIZE), 5);
        b.mark(4095, 2); // pages 0 and 1
        b.mark(10 * DIRTY_PAGE_SIZE, 1);
        b.mark(60 * DIRTY_PAGE_SIZE, 10 * DIRTY_PAGE_SIZE); // 60..=69, across a word
        b.mark(299 * DIRTY_PAGE_SIZE + 5, 1 << 40); // clipped at the end
        b.mark(5, 0); // nothing
        let taken = b.take();
        let pages: Vec<u64> = dirty_pages(&taken).collect();
        let mut want = vec![0, 1, 10];
        want.extend(60..70);
        want.push(299);
        assert_eq!(pages, want);
        assert_eq!(count(&taken), want.len() as u64);
        assert!(dirty_pages(&b.take()).next().is_none(), "take clears");
    }

    #[test]
    fn whole_words_and_mark_all() {
        let b = DirtyBitmap::new(128 * DIRTY_PAGE_SIZE);
        b.mark(64 * DIRTY_PAGE_SIZE, 64 * DIRTY_PAGE_SIZE);
        assert_eq!(b.take(), vec![0, u64::MAX]);
        b.mark_all();
        assert_eq!(b.take(), vec![u64::MAX, u64::MAX]);
        let odd = DirtyBitmap::new(3 * DIRTY_PAGE_SIZE);
        odd.mark_all();
        assert_eq!(odd.take(), vec![0b111]);
    }

    #[test]
    fn merge_ors_and_extends() {
        let mut a = vec![0b01];
        merge(&mut a, &[0b10, 0b1]);
        assert_eq!(a, vec![0b11, 0b1]);
    }

    #[test]
    fn marks_from_many_threads_are_all_seen() {
        let b = std::sync::Arc::new(DirtyBitmap::new(4096 * DIRTY_PAGE_SIZE));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for p in (t..4096).step_by(4) {
                        b.mark(p * DIRTY_PAGE_SIZE, 1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(count(&b.take()), 4096);
    }
}
