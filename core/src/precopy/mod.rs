//! Pre-copy on kernels without soft-dirty bits: userfaultfd write-protect
//! tracking ([`tracker`]), each pass's pages read out of the running
//! workload and sent on the memory channel ([`send_pass`]), kept on the
//! destination ([`store`]), and a switch-over through post-copy.
//!
//! # How a migration runs
//!
//! 1. While the workload runs, pass 1 sends every present private page
//!    (zero pages as a mark, not data); each later pass sends the pages
//!    written since the previous scan. The iteration stop rules
//!    ([`crate::engine::iter`]) decide when to stop, as for CRIU's
//!    pre-dumps.
//! 2. The final CRIU dump is a lazy one (see [`crate::postcopy`]): it
//!    freezes the tree and writes everything but private memory. With the
//!    tree frozen, a last scan names the pages written since the last
//!    pass; the destination forgets its copies of those (`Drop`).
//! 3. The destination restores at once; its pager places every lazy page
//!    it holds from the store, and only the pages written after the last
//!    pass (and any memory that appeared after it) come from the source,
//!    after the switch. The post-copy window covers the last dirty set,
//!    not the whole memory.
//!
//! Before the switch, any failure discards the destination's store; the
//! source noticed nothing but a fraction of a millisecond of ptrace per
//! process and the scans' write faults. Closing the userfaultfds clears
//! every write-protect bit (also when phaul dies). After the switch the
//! post-copy rules hold unchanged.

pub mod store;
pub mod tracker;

use std::io::Write;

use crate::postcopy::uffd::PAGE;
use crate::postcopy::wire::{write_frame, Frame, MAX_PAGES};
use tracker::{Pass, Tracker};

/// What one pass sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Pages reported written by the scans.
    pub written: u64,
    /// Pages sent as data.
    pub pages: u64,
    /// Pages sent as zero marks (no data).
    pub zero: u64,
    /// Pages the destination must forget.
    pub dropped: u64,
}

/// Writes a `Drop` (`zero`: a `Zero`) frame for `[a, b)` of task `vpid`;
/// returns its pages.
fn range_frame(w: &mut impl Write, zero: bool, vpid: i32, a: u64, b: u64) -> std::io::Result<u64> {
    let (addr, pages) = (a, (b - a) / PAGE);
    let f = match zero {
        true => Frame::Zero { vpid, addr, pages },
        false => Frame::Drop { vpid, addr, pages },
    };
    write_frame(w, &f, &[])?;
    Ok(pages)
}

fn is_zero(page: &[u8]) -> bool {
    let (pre, words, post) = {
        // SAFETY: any bytes are valid u64s.
        unsafe { page.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// Sends what `pass` found on `w` (the memory channel), ending with
/// `End`: drops first, then the written pages read out of the processes
/// now (a page written after its scan is sent again by the next pass).
/// Pages that vanished meanwhile (unmapped) are dropped instead.
pub fn send_pass(tracker: &Tracker, pass: &Pass, w: &mut impl Write) -> std::io::Result<Sent> {
    let mut sent = Sent::default();
    let mut buf = vec![0u8; (MAX_PAGES as u64 * PAGE) as usize];
    for (i, ch) in &pass.changes {
        let p = &tracker.procs[*i];
        for &(a, b) in &ch.dropped {
            sent.dropped += range_frame(w, false, p.vpid, a, b)?;
        }
        for &(a, b, zero_pfn) in &ch.written {
            sent.written += (b - a) / PAGE;
            if zero_pfn {
                sent.zero += range_frame(w, true, p.vpid, a, b)?;
                continue;
            }
            let mut at = a;
            while at < b {
                let len = ((b - at).min(MAX_PAGES as u64 * PAGE)) as usize;
                let got = crate::proc::read_memory(p.pid, at, &mut buf[..len]).unwrap_or(0)
                    & !(PAGE as usize - 1);
                sent += send_chunk(w, p.vpid, at, &buf[..got])?;
                if got < len {
                    // Unmapped since the scan: the next pass (or the last
                    // one) reports it; nothing of it stands meanwhile.
                    sent.dropped += range_frame(w, false, p.vpid, at + got as u64, b)?;
                    break;
                }
                at += len as u64;
            }
        }
    }
    write_frame(w, &Frame::End { pages: sent.pages }, &[])?;
    w.flush()?;
    Ok(sent)
}

/// The last pass (the tree frozen): every page written since the
/// previous pass, and every range to forget, as `Drop`s; those pages
/// follow after the switch.
pub fn send_final(tracker: &Tracker, pass: &Pass, w: &mut impl Write) -> std::io::Result<Sent> {
    let mut sent = Sent::default();
    for (i, ch) in &pass.changes {
        let vpid = tracker.procs[*i].vpid;
        let ranges = ch.dropped.iter().copied();
        let written = ch.written.iter().map(|&(a, b, _)| (a, b));
        for (a, b) in ranges.chain(written) {
            sent.dropped += range_frame(w, false, vpid, a, b)?;
        }
        sent.written += ch.pages();
    }
    write_frame(w, &Frame::End { pages: 0 }, &[])?;
    w.flush()?;
    Ok(sent)
}

impl std::ops::AddAssign for Sent {
    fn add_assign(&mut self, o: Sent) {
        self.written += o.written;
        self.pages += o.pages;
        self.zero += o.zero;
        self.dropped += o.dropped;
    }
}

/// Sends one chunk read at `addr`: runs of data pages as `Put`, runs of
/// zero pages as `Zero`.
fn send_chunk(w: &mut impl Write, vpid: i32, addr: u64, data: &[u8]) -> std::io::Result<Sent> {
    let mut sent = Sent::default();
    let pages: Vec<bool> = data.chunks_exact(PAGE as usize).map(is_zero).collect();
    let mut i = 0;
    while i < pages.len() {
        let zero = pages[i];
        let mut j = i + 1;
        while j < pages.len() && pages[j] == zero {
            j += 1;
        }
        let at = addr + i as u64 * PAGE;
        let n = (j - i) as u64;
        if zero {
            sent.zero += range_frame(w, true, vpid, at, at + n * PAGE)?;
        } else {
            let (s, e) = (i * PAGE as usize, j * PAGE as usize);
            write_frame(
                w,
                &Frame::Put {
                    vpid,
                    addr: at,
                    pages: n as u32,
                },
                &data[s..e],
            )?;
            sent.pages += n;
        }
        i = j;
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_split_into_data_and_zero_runs() {
        let mut data = vec![0u8; 4 * PAGE as usize];
        data[PAGE as usize + 5] = 1;
        data[2 * PAGE as usize] = 2;
        let mut w = Vec::new();
        let s = send_chunk(&mut w, 1, 0x10000, &data).unwrap();
        assert_eq!((s.pages, s.zero), (2, 2));
        let mut st = store::Store::new(8).unwrap();
        write_frame(&mut w, &Frame::End { pages: 2 }, &[]).unwrap();
        st.receive_pass(&w[..]).unwrap();
        st.seal().unwrap();
        assert_eq!(st.get(1, 0x10000), Some(store::Local::Zero));
        assert_eq!(st.get(1, 0x13000), Some(store::Local::Zero));
        assert_eq!(
            st.get(1, 0x11000),
            Some(store::Local::Data(&data[PAGE as usize..2 * PAGE as usize]))
        );
    }
}
