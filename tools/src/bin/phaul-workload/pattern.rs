//! Deterministic page contents and the dirty-rate accumulator.

/// Size of a workload page in bytes (independent of the system page size).
pub const PAGE_SIZE: usize = 4096;
/// Number of u64 words in a page.
pub const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;

/// Increment of the splitmix64 stream.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The splitmix64 finaliser (a bijection on u64).
#[inline(always)]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Starting state of the word stream of page `page` at generation `gen`.
///
/// Distinct `(page, gen)` pairs (for `page < 2^32`) give distinct states for
/// a given seed, since every step is a bijection.
#[inline]
pub fn page_state(seed: u64, page: u64, gen: u32) -> u64 {
    mix64(seed ^ mix64((page << 32) | u64::from(gen)))
}

/// Fills `words` with the stream starting at `state` (splitmix64: one u64 per
/// 8 bytes).
#[inline]
pub fn fill(words: &mut [u64], state: u64) {
    let mut s = state;
    for w in words {
        s = s.wrapping_add(GOLDEN);
        *w = mix64(s);
    }
}

/// Whether `words` hold exactly the stream starting at `state`.
#[inline]
pub fn matches(words: &[u64], state: u64) -> bool {
    let mut s = state;
    let mut diff = 0u64;
    for w in words {
        s = s.wrapping_add(GOLDEN);
        diff |= *w ^ mix64(s);
    }
    diff == 0
}

/// Longest stretch of time credited to a single tick: after a longer pause
/// (the process was frozen) the workload does not try to catch up.
pub const MAX_CREDIT_US: u64 = 10_000;

/// Turns elapsed time into a whole number of pages to dirty, carrying the
/// fractional remainder over to the next tick (exact integer arithmetic, so
/// no page is lost to rounding).
#[derive(Debug, Clone)]
pub struct DirtyRate {
    /// Rate in milli-pages per second.
    milli_pages_per_sec: u128,
    /// Owed pages in units of 1e-9 page, always below one page between calls.
    credit: u128,
}

/// One page in [`DirtyRate::credit`] units (milli-pages/s times µs).
const PAGE_CREDIT: u128 = 1_000_000_000;

impl DirtyRate {
    /// `pct` percent of `pages` per second.
    pub fn new(pages: u64, pct: f64) -> Self {
        DirtyRate {
            milli_pages_per_sec: (pages as f64 * pct * 10.0).round().max(0.0) as u128,
            credit: 0,
        }
    }

    /// Pages due after `elapsed_us` (capped at [`MAX_CREDIT_US`]).
    pub fn due(&mut self, elapsed_us: u64) -> u64 {
        self.credit += self.milli_pages_per_sec * u128::from(elapsed_us.min(MAX_CREDIT_US));
        let whole = self.credit / PAGE_CREDIT;
        self.credit %= PAGE_CREDIT;
        whole as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_match() {
        let mut page = vec![0u64; WORDS_PER_PAGE];
        let st = page_state(7, 3, 0);
        fill(&mut page, st);
        assert!(matches(&page, st));
        // Another generation, page or seed is another pattern.
        assert!(!matches(&page, page_state(7, 3, 1)));
        assert!(!matches(&page, page_state(7, 4, 0)));
        assert!(!matches(&page, page_state(8, 3, 0)));
        // A single flipped bit anywhere is detected.
        for i in [0, 1, WORDS_PER_PAGE / 2, WORDS_PER_PAGE - 1] {
            page[i] ^= 1 << 17;
            assert!(!matches(&page, st), "flip in word {i} not detected");
            page[i] ^= 1 << 17;
        }
        assert!(matches(&page, st));
    }

    #[test]
    fn pattern_is_deterministic_and_not_trivial() {
        let mut a = vec![0u64; WORDS_PER_PAGE];
        let mut b = vec![0u64; WORDS_PER_PAGE];
        fill(&mut a, page_state(1, 10, 5));
        fill(&mut b, page_state(1, 10, 5));
        assert_eq!(a, b);
        assert_ne!(a[0], a[1]);
        assert!(a.iter().all(|&w| w != 0));
    }

    #[test]
    fn states_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for page in 0..256 {
            for gen in 0..64 {
                assert!(seen.insert(page_state(1, page, gen)));
            }
        }
        // Generations far apart do not alias.
        assert_ne!(page_state(1, 0, 0), page_state(1, 0, 1 << 12));
    }

    #[test]
    fn dirty_rate_accumulates_fractions() {
        // 1000 pages at 10%/s = 100 pages/s = 0.1 page per 1 ms tick.
        let mut r = DirtyRate::new(1000, 10.0);
        let total: u64 = (0..10_000).map(|_| r.due(1000)).sum();
        assert_eq!(total, 1000);
        // Within any 10 consecutive ticks exactly one page is due.
        let per_10: Vec<u64> = (0..5).map(|_| (0..10).map(|_| r.due(1000)).sum()).collect();
        assert_eq!(per_10, vec![1; 5]);
    }

    #[test]
    fn dirty_rate_large_and_zero() {
        // 1 GiB (262144 pages) at 10%/s = 26214.4 pages/s.
        let mut r = DirtyRate::new(262_144, 10.0);
        let total: u64 = (0..1000).map(|_| r.due(1000)).sum();
        assert!((26_213..=26_215).contains(&total), "{total}");
        let mut z = DirtyRate::new(262_144, 0.0);
        assert_eq!((0..1000).map(|_| z.due(1000)).sum::<u64>(), 0);
    }

    #[test]
    fn dirty_rate_does_not_catch_up() {
        let mut r = DirtyRate::new(1_000_000, 100.0); // 1 page per µs
        assert_eq!(r.due(5_000_000), MAX_CREDIT_US);
        assert_eq!(r.due(0), 0);
    }
}
