//! The destination's pre-copied pages: what the source's userfaultfd
//! pre-copy passes sent, kept in an anonymous memory file until the lazy
//! restore's pager places them. Each page is keyed by the task (its pid
//! in the workload's PID namespace) and its address there; a page sent
//! again replaces the old copy, a dropped page is forgotten (it then
//! follows from the source after the switch).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use crate::postcopy::uffd::PAGE;
use crate::postcopy::wire::{read_frame, Frame, MAX_PAGES};

const ZERO: u32 = u32::MAX;

/// A page the store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local<'a> {
    /// The page is all zero.
    Zero,
    /// Its contents.
    Data(&'a [u8]),
}

/// Pre-copied pages, being received (see [`Store::receive_pass`]) and
/// then, sealed, read by the pager.
pub struct Store {
    file: File,
    index: HashMap<i32, HashMap<u64, u32>>,
    free: Vec<u32>,
    slots: u32,
    /// Most data pages the store may hold.
    limit: u64,
    map: Option<(*const u8, usize)>,
}

// SAFETY: the mapping is read-only and only read after sealing.
unsafe impl Send for Store {}
// SAFETY: as above.
unsafe impl Sync for Store {}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("pages", &self.pages())
            .field("slots", &self.slots)
            .finish()
    }
}

/// What one pass brought.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Data pages.
    pub pages: u64,
    /// Zero pages.
    pub zero: u64,
    /// Pages forgotten.
    pub dropped: u64,
}

impl Store {
    /// An empty store of at most `limit` data pages.
    pub fn new(limit: u64) -> std::io::Result<Store> {
        // SAFETY: plain syscall with a static name.
        let fd = unsafe { libc::memfd_create(c"phaul-precopy".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Store {
            // SAFETY: a fresh descriptor.
            file: unsafe { File::from_raw_fd(fd) },
            index: HashMap::new(),
            free: Vec::new(),
            slots: 0,
            limit,
            map: None,
        })
    }

    /// Pages held (data and zero).
    pub fn pages(&self) -> u64 {
        self.index.values().map(|m| m.len() as u64).sum()
    }

    fn slot(&mut self) -> Result<u32, String> {
        if let Some(s) = self.free.pop() {
            return Ok(s);
        }
        if self.slots as u64 >= self.limit {
            return Err(format!(
                "the source pre-copied more than the {} MiB it declared",
                (self.limit * PAGE) >> 20
            ));
        }
        self.slots += 1;
        Ok(self.slots - 1)
    }

    fn forget(&mut self, vpid: i32, addr: u64, pages: u64) -> u64 {
        let Some(m) = self.index.get_mut(&vpid) else {
            return 0;
        };
        let end = addr + pages * PAGE;
        let mut gone = Vec::new();
        if pages > m.len() as u64 {
            m.retain(|&a, &mut s| {
                let hit = a >= addr && a < end;
                if hit {
                    gone.push(s);
                }
                !hit
            });
        } else {
            let mut a = addr;
            while a < end {
                if let Some(s) = m.remove(&a) {
                    gone.push(s);
                }
                a += PAGE;
            }
        }
        let n = gone.len() as u64;
        self.free.extend(gone.into_iter().filter(|&s| s != ZERO));
        n
    }

    /// Reads one pass from the memory channel (frames up to `End`) into
    /// the store. Nothing follows `End` until the source hears back, so
    /// the reads may be buffered.
    pub fn receive_pass(&mut self, r: impl Read) -> Result<Received, String> {
        let mut r = std::io::BufReader::with_capacity(1 << 20, r);
        let r = &mut r;
        let mut got = Received::default();
        let mut buf = vec![0u8; (MAX_PAGES as u64 * PAGE) as usize];
        loop {
            let f = read_frame(r).map_err(|e| format!("the pre-copy stream: {e}"))?;
            match f {
                Frame::Put { vpid, addr, pages } => {
                    let len = (pages as u64 * PAGE) as usize;
                    r.read_exact(&mut buf[..len])
                        .map_err(|e| format!("the pre-copy stream: {e}"))?;
                    let mut slots = Vec::with_capacity(pages as usize);
                    for i in 0..pages as u64 {
                        let a = addr + i * PAGE;
                        let old = self.index.get(&vpid).and_then(|m| m.get(&a)).copied();
                        let s = match old {
                            Some(s) if s != ZERO => s,
                            _ => self.slot()?,
                        };
                        self.index.entry(vpid).or_default().insert(a, s);
                        slots.push(s);
                    }
                    // One write per run of consecutive slots (a first pass
                    // is one run per frame).
                    let mut i = 0;
                    while i < slots.len() {
                        let mut j = i + 1;
                        while j < slots.len() && slots[j] == slots[j - 1] + 1 {
                            j += 1;
                        }
                        let (from, to) = (i * PAGE as usize, j * PAGE as usize);
                        self.file
                            .write_all_at(&buf[from..to], slots[i] as u64 * PAGE)
                            .map_err(|e| format!("storing pre-copied pages: {e}"))?;
                        i = j;
                    }
                    got.pages += pages as u64;
                }
                Frame::Zero { vpid, addr, pages } => {
                    self.forget(vpid, addr, pages);
                    if self.pages() + pages > 2 * self.limit {
                        return Err(format!(
                            "the source pre-copied more than the {} MiB it declared",
                            (self.limit * PAGE) >> 20
                        ));
                    }
                    let m = self.index.entry(vpid).or_default();
                    for i in 0..pages {
                        m.insert(addr + i * PAGE, ZERO);
                    }
                    got.zero += pages;
                }
                Frame::Drop { vpid, addr, pages } => got.dropped += self.forget(vpid, addr, pages),
                Frame::End { pages } if pages == got.pages => return Ok(got),
                Frame::End { pages } => {
                    return Err(format!(
                        "the pre-copy pass ended claiming {pages} pages, {} arrived",
                        got.pages
                    ))
                }
                other => return Err(format!("{other:?} in the pre-copy stream")),
            }
        }
    }

    /// Done receiving: maps the pages for the pager.
    pub fn seal(&mut self) -> std::io::Result<()> {
        let len = self.slots as usize * PAGE as usize;
        if len == 0 || self.map.is_some() {
            return Ok(());
        }
        // SAFETY: a read-only shared mapping of our memory file.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        self.map = Some((p as *const u8, len));
        Ok(())
    }

    /// The page of task `vpid` at `addr`, if the store holds it (sealed
    /// stores only).
    pub fn get(&self, vpid: i32, addr: u64) -> Option<Local<'_>> {
        let s = *self.index.get(&vpid)?.get(&addr)?;
        if s == ZERO {
            return Some(Local::Zero);
        }
        self.mapped(s, 1).map(Local::Data)
    }

    /// `pages` pages of the mapping from slot `first` (sealed stores only).
    fn mapped(&self, first: u32, pages: u64) -> Option<&[u8]> {
        let (p, len) = self.map?;
        let off = first as usize * PAGE as usize;
        let n = (pages * PAGE) as usize;
        if off + n > len {
            return None;
        }
        // SAFETY: inside the read-only mapping, which lives as long as self.
        Some(unsafe { std::slice::from_raw_parts(p.add(off), n) })
    }
}

impl Store {
    /// `pages` data pages of task `vpid` from `addr`, if the store holds
    /// them all, contiguous in its memory (as one pass sends them).
    pub fn get_run(&self, vpid: i32, addr: u64, pages: u64) -> Option<&[u8]> {
        let m = self.index.get(&vpid)?;
        let first = *m.get(&addr)?;
        if first == ZERO {
            return None;
        }
        for i in 1..pages {
            if m.get(&(addr + i * PAGE)) != Some(&(first + i as u32)) {
                return None;
            }
        }
        self.mapped(first, pages)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some((p, len)) = self.map.take() {
            // SAFETY: our mapping.
            unsafe { libc::munmap(p as *mut libc::c_void, len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postcopy::wire::write_frame;

    #[test]
    fn passes_replace_drop_and_zero_pages() {
        let mut s = Store::new(16).unwrap();
        let mut w = Vec::new();
        let page = |b: u8| vec![b; PAGE as usize];
        let mut two = page(1);
        two.extend(page(2));
        write_frame(
            &mut w,
            &Frame::Put {
                vpid: 7,
                addr: 0x1000,
                pages: 2,
            },
            &two,
        )
        .unwrap();
        let z = Frame::Zero {
            vpid: 7,
            addr: 0x8000,
            pages: 1,
        };
        write_frame(&mut w, &z, &[]).unwrap();
        write_frame(&mut w, &Frame::End { pages: 2 }, &[]).unwrap();
        let got = s.receive_pass(&w[..]).unwrap();
        assert_eq!((got.pages, got.zero), (2, 1));
        // Pass 2: page 0x2000 written again, 0x1000 dropped.
        let mut w = Vec::new();
        let p = Frame::Put {
            vpid: 7,
            addr: 0x2000,
            pages: 1,
        };
        write_frame(&mut w, &p, &page(9)).unwrap();
        let d = Frame::Drop {
            vpid: 7,
            addr: 0x1000,
            pages: 1,
        };
        write_frame(&mut w, &d, &[]).unwrap();
        write_frame(&mut w, &Frame::End { pages: 1 }, &[]).unwrap();
        let got = s.receive_pass(&w[..]).unwrap();
        assert_eq!((got.pages, got.dropped), (1, 1));
        s.seal().unwrap();
        assert_eq!(s.get(7, 0x1000), None);
        assert_eq!(s.get(7, 0x2000), Some(Local::Data(&page(9)[..])));
        assert_eq!(s.get(7, 0x8000), Some(Local::Zero));
        assert_eq!(s.get(8, 0x2000), None);
        assert_eq!(s.get_run(7, 0x2000, 1), Some(&page(9)[..]));
        assert_eq!(s.get_run(7, 0x1000, 2), None);
        // A pass claiming more than arrived is refused; so is more than
        // the limit.
        let mut w = Vec::new();
        write_frame(&mut w, &Frame::End { pages: 5 }, &[]).unwrap();
        assert!(s.receive_pass(&w[..]).unwrap_err().contains("claiming"));
        let mut small = Store::new(1).unwrap();
        let mut w = Vec::new();
        write_frame(
            &mut w,
            &Frame::Put {
                vpid: 7,
                addr: 0x1000,
                pages: 2,
            },
            &two,
        )
        .unwrap();
        assert!(small.receive_pass(&w[..]).unwrap_err().contains("declared"));
    }
}
