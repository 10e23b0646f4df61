//! Memory objects: a MAP_SHARED anonymous page shared with a child, and
//! mprotect'ed regions (read-only contents, a PROT_NONE guard page) checked
//! through /proc/self/maps.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::helper::{sleep_ms, Helper};
use super::{Check, Object};

const PAGE: usize = 4096;

/// The mapping of /proc/self/maps containing `addr`: (start, end, perms,
/// name).
fn vma_at(addr: usize) -> Option<(usize, usize, String, String)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (range, perms) = (f.next()?, f.next()?);
        let name = f.nth(3).unwrap_or("").to_string();
        let (s, e) = range.split_once('-')?;
        let (s, e) = (
            usize::from_str_radix(s, 16).ok()?,
            usize::from_str_radix(e, 16).ok()?,
        );
        (s <= addr && addr < e).then(|| (s, e, perms.to_string(), name))
    })
}

/// Maps `len` bytes of anonymous memory with `flags` (MAP_PRIVATE or
/// MAP_SHARED), readable and writable.
fn map(len: usize, flags: libc::c_int) -> Result<*mut u8> {
    // SAFETY: a fresh anonymous mapping, not aliasing anything.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        bail!("mmap: {}", std::io::Error::last_os_error());
    }
    Ok(p.cast())
}

// ---------------------------------------------------------- shared memory

/// A shared page: word 0 is written by the workload, word 1 is the child's
/// copy of it, word 2 the child's heartbeat.
pub struct SharedMemory {
    page: *mut AtomicU64,
    helper: Helper,
    rounds: u64,
}

impl SharedMemory {
    pub fn new() -> Result<SharedMemory> {
        let page = map(PAGE, libc::MAP_SHARED)?.cast::<AtomicU64>();
        let (helper, _) = Helper::start(c"obj-shmpeer", move |mut ch| {
            // SAFETY: the page stays mapped for the life of this process and
            // is only accessed through atomics.
            let words = unsafe { std::slice::from_raw_parts(page, 3) };
            ch.reply(true, "sharing");
            loop {
                words[1].store(words[0].load(Ordering::SeqCst), Ordering::SeqCst);
                words[2].fetch_add(1, Ordering::SeqCst);
                sleep_ms(1);
            }
        })?;
        Ok(SharedMemory {
            page,
            helper,
            rounds: 0,
        })
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the page is mapped for the workload's life and only
        // accessed through atomics.
        unsafe { std::slice::from_raw_parts(self.page, 3) }
    }
}

impl Object for SharedMemory {
    fn verify(&mut self) -> Check {
        self.rounds += 1;
        let value = 0xabcd_0000_0000 + self.rounds;
        let words = self.words();
        let beat = words[2].load(Ordering::SeqCst);
        words[0].store(value, Ordering::SeqCst);
        let start = Instant::now();
        while words[1].load(Ordering::SeqCst) != value && start.elapsed() < Duration::from_secs(2) {
            sleep_ms(1);
        }
        let echoed = words[1].load(Ordering::SeqCst);
        let beat_after = words[2].load(Ordering::SeqCst);
        let mut problems = Vec::new();
        if echoed != value {
            problems.push(format!("child copied {echoed:#x}, not {value:#x}"));
        }
        if beat_after <= beat {
            problems.push("the child's heartbeat stands still".into());
        }
        let vma = vma_at(self.page as usize);
        match &vma {
            Some((_, _, perms, _)) if perms == "rw-s" => {}
            other => problems.push(format!("mapping {other:?}, expected rw-s")),
        }
        Check::unless(
            problems,
            format!(
                "wrote {value:#x}, child {} copied it back after {} us (heartbeat {beat_after}); \
                 mapping {} {}",
                self.helper.pid,
                start.elapsed().as_micros(),
                vma.as_ref().map_or("?", |v| v.2.as_str()),
                vma.as_ref().map_or("?", |v| v.3.as_str()),
            ),
        )
    }

    fn shutdown(&mut self) {
        self.helper.kill();
    }
}

// ---------------------------------------------------------------- mprotect

/// The byte at `i` of the read-only region.
fn ro_byte(i: usize) -> u8 {
    (i.wrapping_mul(7).wrapping_add(3) % 253) as u8
}

/// A 2-page PROT_READ region with known contents, and 3 pages whose middle
/// one is a PROT_NONE guard; the writable pages around the guard get the
/// tick counter every 10 ticks.
pub struct Mprotect {
    ro: *mut u8,
    guarded: *mut u8,
    last: u64,
}

impl Mprotect {
    pub fn new() -> Result<Mprotect> {
        let ro = map(2 * PAGE, libc::MAP_PRIVATE)?;
        let guarded = map(3 * PAGE, libc::MAP_PRIVATE)?;
        // SAFETY: both mappings are ours and as large as used here.
        unsafe {
            for i in 0..2 * PAGE {
                *ro.add(i) = ro_byte(i);
            }
            if libc::mprotect(ro.cast(), 2 * PAGE, libc::PROT_READ) != 0
                || libc::mprotect(guarded.add(PAGE).cast(), PAGE, libc::PROT_NONE) != 0
            {
                bail!("mprotect: {}", std::io::Error::last_os_error());
            }
        }
        Ok(Mprotect {
            ro,
            guarded,
            last: 0,
        })
    }

    /// The two writable pages' first words.
    fn rw_words(&self) -> [*mut u64; 2] {
        // SAFETY: pages 0 and 2 of the guarded mapping are writable.
        unsafe { [self.guarded.cast(), self.guarded.add(2 * PAGE).cast()] }
    }
}

impl Object for Mprotect {
    fn tick(&mut self, counter: u64) {
        if counter % 10 == 0 {
            for w in self.rw_words() {
                // SAFETY: writable, aligned.
                unsafe { w.write_volatile(counter) };
            }
            self.last = counter;
        }
    }

    fn verify(&mut self) -> Check {
        let mut problems = Vec::new();
        let (ro, g) = (self.ro as usize, self.guarded as usize);
        // Protection, from the kernel's view (no fault needed).
        let mut expect = |what: &str, start: usize, len: usize, perms: &str| match vma_at(start) {
            Some((s, e, p, _)) if p == perms && s <= start && start + len <= e => {
                // The guard must be exactly one page: no neighbour shares it.
                if perms == "---p" && (s != start || e != start + len) {
                    problems.push(format!("{what} is {s:#x}-{e:#x}, not one page"));
                }
            }
            other => problems.push(format!("{what} at {start:#x}: {other:?}, expected {perms}")),
        };
        expect("read-only region", ro, 2 * PAGE, "r--p");
        expect("page below the guard", g, PAGE, "rw-p");
        expect("guard page", g + PAGE, PAGE, "---p");
        expect("page above the guard", g + 2 * PAGE, PAGE, "rw-p");
        // Contents.
        // SAFETY: the read-only region is readable and 2 pages long.
        let bad = (0..2 * PAGE).find(|&i| unsafe { *self.ro.add(i) } != ro_byte(i));
        if let Some(i) = bad {
            problems.push(format!("read-only byte {i} changed"));
        }
        for (n, w) in self.rw_words().into_iter().enumerate() {
            // SAFETY: readable, aligned.
            let v = unsafe { w.read_volatile() };
            if v != self.last {
                problems.push(format!(
                    "writable page {n} holds {v}, expected {}",
                    self.last
                ));
            }
        }
        Check::unless(
            problems,
            format!(
                "r--p region {ro:#x}+8 KiB intact; ---p guard {:#x} between rw-p pages holding {}",
                g + PAGE,
                self.last
            ),
        )
    }
}
