//! The workload's anonymous memory: pages, their generations, dirtying and
//! verification.

use anyhow::{bail, Result};

use crate::pattern::{self, PAGE_SIZE, WORDS_PER_PAGE};

/// Result of verifying every page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verification {
    /// Pages checked.
    pub verified: u64,
    /// Pages whose content differs from the expected pattern.
    pub bad: u64,
    /// Index of the first bad page, -1 if none.
    pub first_bad: i64,
}

impl Verification {
    /// The value reported when no verification was done.
    pub const NONE: Verification = Verification {
        verified: 0,
        bad: 0,
        first_bad: -1,
    };
}

/// An mmap'ed anonymous area of `pages` pages, each holding the pattern of
/// `(seed, index, gens[index])`.
pub struct Arena {
    /// Start of the mapping (page aligned).
    ptr: *mut u64,
    /// Number of pages.
    pages: usize,
    /// Generation of each page (lives in ordinary process memory).
    gens: Vec<u32>,
    /// Pattern seed.
    seed: u64,
    /// Next page to dirty (round robin).
    cursor: usize,
    /// Dirty in a scattered order (see [`Arena::scatter`]).
    scattered: bool,
    /// Page rewrites so far.
    dirtied_total: u64,
}

impl Arena {
    /// Maps `mem_mib` MiB (MAP_PRIVATE | MAP_ANONYMOUS) and fills every page
    /// with its generation-0 pattern.
    pub fn new(mem_mib: u64, seed: u64) -> Result<Arena> {
        if mem_mib == 0 {
            bail!("--mem-mib must be at least 1");
        }
        let Some(len) = mem_mib
            .checked_mul(1 << 20)
            .and_then(|l| usize::try_from(l).ok())
        else {
            bail!("--mem-mib {mem_mib} is too large");
        };
        // SAFETY: a fresh anonymous mapping, not aliasing anything.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!(
                "mmap of {mem_mib} MiB failed: {}",
                std::io::Error::last_os_error()
            );
        }
        let pages = len / PAGE_SIZE;
        let mut arena = Arena {
            ptr: ptr.cast(),
            pages,
            gens: vec![0; pages],
            seed,
            cursor: 0,
            scattered: false,
            dirtied_total: 0,
        };
        for i in 0..pages {
            arena.write_page(i);
        }
        Ok(arena)
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.pages as u64
    }

    /// Page rewrites so far.
    pub fn dirtied_total(&self) -> u64 {
        self.dirtied_total
    }

    /// Sum of all page generations.
    pub fn generation_sum(&self) -> u64 {
        self.gens.iter().map(|&g| u64::from(g)).sum()
    }

    fn page(&self, i: usize) -> &[u64] {
        assert!(i < self.pages);
        // SAFETY: in bounds of the mapping, which lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.add(i * WORDS_PER_PAGE), WORDS_PER_PAGE) }
    }

    fn page_mut(&mut self, i: usize) -> &mut [u64] {
        assert!(i < self.pages);
        // SAFETY: as in `page`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * WORDS_PER_PAGE), WORDS_PER_PAGE) }
    }

    /// Writes page `i`'s pattern for its current generation.
    fn write_page(&mut self, i: usize) {
        let state = pattern::page_state(self.seed, i as u64, self.gens[i]);
        pattern::fill(self.page_mut(i), state);
    }

    /// Dirties pages in a scattered order from now on: the `k`-th dirtied
    /// page is `k * STRIDE mod pages` (an odd stride visits every page of
    /// a power-of-two arena once per round), far from its neighbours, so
    /// that a post-copy migration faults ahead of its background push.
    pub fn scatter(&mut self) {
        self.scattered = true;
    }

    /// Dirties `n` pages round robin (or scattered): bumps their
    /// generation and rewrites them.
    pub fn dirty(&mut self, n: u64) {
        const STRIDE: usize = 40_503;
        for _ in 0..n {
            let i = match self.scattered {
                true => (self.cursor * STRIDE) % self.pages,
                false => self.cursor,
            };
            self.gens[i] = self.gens[i].wrapping_add(1);
            self.write_page(i);
            self.cursor = if self.cursor + 1 == self.pages {
                0
            } else {
                self.cursor + 1
            };
        }
        self.dirtied_total += n;
    }

    /// Checks every page against its expected pattern.
    pub fn verify(&self) -> Verification {
        let mut v = Verification {
            verified: 0,
            bad: 0,
            first_bad: -1,
        };
        for (i, &gen) in self.gens.iter().enumerate() {
            let state = pattern::page_state(self.seed, i as u64, gen);
            if !pattern::matches(self.page(i), state) {
                v.bad += 1;
                if v.first_bad < 0 {
                    v.first_bad = i as i64;
                }
            }
            v.verified += 1;
        }
        v
    }

    /// Corrupts one word of page `i` (for tests).
    #[cfg(test)]
    fn corrupt(&mut self, i: usize) {
        self.page_mut(i)[3] ^= 0xff;
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.pages * PAGE_SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_detects_corruption_and_stale_pages() {
        let mut a = Arena::new(1, 42).unwrap();
        assert_eq!(a.pages(), 256);
        assert_eq!(
            a.verify(),
            Verification {
                verified: 256,
                bad: 0,
                first_bad: -1
            }
        );

        // Dirtying wraps round robin and keeps everything consistent.
        a.dirty(300);
        assert_eq!(a.dirtied_total(), 300);
        assert_eq!(a.generation_sum(), 300);
        assert_eq!(a.verify().bad, 0);

        a.corrupt(200);
        a.corrupt(7);
        assert_eq!(
            a.verify(),
            Verification {
                verified: 256,
                bad: 2,
                first_bad: 7
            }
        );

        // A page left at an old generation (a lost write) is detected.
        let mut b = Arena::new(1, 42).unwrap();
        b.gens[5] += 1;
        assert_eq!(b.verify().first_bad, 5);
    }
}
