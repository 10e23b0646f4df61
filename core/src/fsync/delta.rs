//! Block signatures of regular files, for sending only what changed.
//!
//! A file is cut into [`BLOCK`]-byte blocks. A block with no data region
//! (SEEK_DATA/SEEK_HOLE) is a hole ([`Sig`] `None`); otherwise its
//! signature is the xxh3-128 of its content (holes inside it read as
//! zeros). The sender keeps the signatures of what it sent; in a later
//! pass a block is re-sent when its signature differs.
//!
//! The whole-file hash ([`whole_hash`]) is the xxh3-128 of the
//! concatenated 128-bit content hashes of every block, a hole block
//! counting as zeros: a function of the full content only, whatever the
//! hole layout, so both sides compute it on their own copy, the sender as
//! a by-product of the block signatures and the receiver by reading the
//! rebuilt file (skipping its holes).

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::OnceLock;

use xxhash_rust::xxh3::{xxh3_128, Xxh3};

use super::sys;

/// Block size of the signatures (64 KiB).
pub const BLOCK: u64 = 64 << 10;

/// A block's signature: None for a hole, else the hash of its content.
pub type Sig = Option<u128>;

static ZEROS: [u8; BLOCK as usize] = [0; BLOCK as usize];

/// The content hash of `len` zero bytes (`len` <= [`BLOCK`]).
pub(crate) fn zero_hash(len: usize) -> u128 {
    static FULL: OnceLock<u128> = OnceLock::new();
    if len == BLOCK as usize {
        *FULL.get_or_init(|| xxh3_128(&ZEROS))
    } else {
        xxh3_128(&ZEROS[..len.min(BLOCK as usize)])
    }
}

/// The content hash of one block.
pub(crate) fn block_hash(data: &[u8]) -> u128 {
    xxh3_128(data)
}

/// Accumulates the whole-file hash block by block.
pub(crate) struct WholeHasher(Xxh3);

impl WholeHasher {
    pub(crate) fn new() -> Self {
        WholeHasher(Xxh3::new())
    }

    /// Adds the next block's content hash.
    pub(crate) fn add(&mut self, content_hash: u128) {
        self.0.update(&content_hash.to_le_bytes());
    }

    pub(crate) fn finish(&self) -> u128 {
        self.0.digest128()
    }
}

/// Walks sorted data regions block by block.
pub(crate) struct RegionCursor<'a> {
    regions: &'a [(u64, u64)],
    idx: usize,
}

impl<'a> RegionCursor<'a> {
    pub(crate) fn new(regions: &'a [(u64, u64)]) -> Self {
        RegionCursor { regions, idx: 0 }
    }

    /// The parts of `[start, end)` that are data, into `out` (cleared).
    /// Calls must come with increasing `start`.
    pub(crate) fn data_in(&mut self, start: u64, end: u64, out: &mut Vec<(u64, u64)>) {
        out.clear();
        while self.idx < self.regions.len() && self.regions[self.idx].1 <= start {
            self.idx += 1;
        }
        for &(s, e) in &self.regions[self.idx..] {
            if s >= end {
                break;
            }
            out.push((s.max(start), e.min(end)));
        }
    }
}

/// Zeroes the parts of `block` (which starts at file offset `start`) that
/// are not in `data` (sorted ranges within the block).
pub(crate) fn zero_outside(block: &mut [u8], start: u64, data: &[(u64, u64)]) {
    let mut at = 0usize;
    for &(s, e) in data {
        let (s, e) = ((s - start) as usize, (e - start) as usize);
        block[at..s].fill(0);
        at = e;
    }
    block[at..].fill(0);
}

/// Number of blocks of a file of `size` bytes.
pub(crate) fn block_count(size: u64) -> u64 {
    size.div_ceil(BLOCK)
}

/// The whole-file hash of the first `size` bytes of an open file.
pub fn whole_hash(fd: BorrowedFd<'_>, size: u64) -> io::Result<u128> {
    let regions = sys::data_regions(fd, size)?;
    let mut cur = RegionCursor::new(&regions);
    let mut subs = Vec::new();
    let mut buf = vec![0u8; BLOCK as usize];
    let mut h = WholeHasher::new();
    for i in 0..block_count(size) {
        let start = i * BLOCK;
        let len = (size - start).min(BLOCK) as usize;
        cur.data_in(start, start + len as u64, &mut subs);
        if subs.is_empty() {
            h.add(zero_hash(len));
        } else {
            sys::pread_fill(fd, &mut buf[..len], start)?;
            h.add(block_hash(&buf[..len]));
        }
    }
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_intersects_blocks() {
        let regions = [(0, 10), (100, 200), (250, 260)];
        let mut c = RegionCursor::new(&regions);
        let mut out = Vec::new();
        c.data_in(0, 50, &mut out);
        assert_eq!(out, vec![(0, 10)]);
        c.data_in(50, 100, &mut out);
        assert!(out.is_empty());
        c.data_in(100, 150, &mut out);
        assert_eq!(out, vec![(100, 150)]);
        c.data_in(150, 300, &mut out);
        assert_eq!(out, vec![(150, 200), (250, 260)]);
        c.data_in(300, 350, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn zero_outside_keeps_only_data() {
        let mut b = [9u8; 10];
        zero_outside(&mut b, 100, &[(101, 103), (105, 106)]);
        assert_eq!(b, [0, 9, 9, 0, 0, 9, 0, 0, 0, 0]);
        let mut b = [9u8; 4];
        zero_outside(&mut b, 0, &[(0, 4)]);
        assert_eq!(b, [9; 4]);
    }

    #[test]
    fn whole_hash_ignores_hole_layout() {
        use std::io::Write;
        use std::os::fd::AsFd;
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        // a: data, a hole, data; b: the same bytes with the zeros written out.
        let mut fa = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&a)
            .unwrap();
        fa.write_all(&[1u8; 5000]).unwrap();
        fa.set_len(300_000).unwrap();
        sys::pwrite_all(fa.as_fd(), &[2u8; 100], 299_900).unwrap();
        let mut content = vec![0u8; 300_000];
        content[..5000].fill(1);
        content[299_900..].fill(2);
        std::fs::write(&b, &content).unwrap();
        let fb = std::fs::File::open(&b).unwrap();
        let ha = whole_hash(fa.as_fd(), 300_000).unwrap();
        assert_eq!(ha, whole_hash(fb.as_fd(), 300_000).unwrap());
        sys::pwrite_all(fa.as_fd(), &[3], 150_000).unwrap();
        assert_ne!(ha, whole_hash(fa.as_fd(), 300_000).unwrap());
    }
}
