//! The post-copy page protocol on the memory channel once CRIU's final
//! dump is done (before the switch only for the few pages CRIU's restorer
//! touches; after it for all the rest, and on the connection of a resumed
//! transfer): the destination's pager asks for page ranges of a source task, the
//! source answers with their contents read from its stopped copy, and the
//! pager says when every page has arrived. Before that, userfaultfd
//! pre-copy ([`crate::precopy`]) sends each pass's pages the other way
//! (`Put`, `Zero`, `Drop`, then `End`) while the workload runs. Fixed
//! 32-byte headers, little endian; data follows a `Pages` or `Put` header.

use std::io::{Read, Write};

/// Largest range one request may name (pages).
pub const MAX_PAGES: u32 = 1024;

/// One frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Destination -> source: send `pages` pages of task `vpid` from
    /// `addr`; `urgent` for a thread waiting on a fault.
    Get {
        /// Matches the answer to the request.
        id: u32,
        /// The task, by its pid in the workload's PID namespace.
        vpid: i32,
        /// First page's address.
        addr: u64,
        /// How many pages.
        pages: u32,
        /// A thread is blocked on it.
        urgent: bool,
    },
    /// Source -> destination: the contents follow (`pages` * 4096 bytes).
    Pages {
        /// The request.
        id: u32,
        /// How many pages follow.
        pages: u32,
    },
    /// Source -> destination: the request cannot be served.
    Fail {
        /// The request.
        id: u32,
        /// The source's errno.
        errno: i32,
    },
    /// Destination -> source: every page has arrived (`pages` in all).
    AllIn {
        /// Pages placed by the pager.
        pages: u64,
    },
    /// Source -> destination: acknowledged; the source's copy is removed.
    Released,
    /// Pre-copy, source -> destination: the contents of `pages` pages of
    /// task `vpid` from `addr` follow.
    Put {
        /// The task, by its pid in the workload's PID namespace.
        vpid: i32,
        /// First page's address.
        addr: u64,
        /// How many pages follow (at most [`MAX_PAGES`]).
        pages: u32,
    },
    /// Pre-copy: these pages are all zero (nothing follows).
    Zero {
        /// The task.
        vpid: i32,
        /// First page's address.
        addr: u64,
        /// How many pages.
        pages: u64,
    },
    /// Pre-copy: what was sent for these pages no longer holds (written
    /// since, unmapped or replaced); they follow after the switch.
    Drop {
        /// The task.
        vpid: i32,
        /// First page's address.
        addr: u64,
        /// How many pages.
        pages: u64,
    },
    /// Pre-copy: the pass is complete (`pages` pages of data were sent).
    End {
        /// Pages of data in the pass.
        pages: u64,
    },
}

const GET: u32 = 1;
const PAGES: u32 = 2;
const FAIL: u32 = 3;
const ALL_IN: u32 = 4;
const RELEASED: u32 = 5;
const PUT: u32 = 6;
const ZERO: u32 = 7;
const DROP: u32 = 8;
const END: u32 = 9;

impl Frame {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; 32] {
        let (tag, id, vpid, pages, addr, extra) = match *self {
            Frame::Get {
                id,
                vpid,
                addr,
                pages,
                urgent,
            } => (GET, id, vpid, pages, addr, urgent as u64),
            Frame::Pages { id, pages } => (PAGES, id, 0, pages, 0, 0),
            Frame::Fail { id, errno } => (FAIL, id, 0, 0, 0, errno as u32 as u64),
            Frame::AllIn { pages } => (ALL_IN, 0, 0, 0, 0, pages),
            Frame::Released => (RELEASED, 0, 0, 0, 0, 0),
            Frame::Put { vpid, addr, pages } => (PUT, 0, vpid, pages, addr, 0),
            Frame::Zero { vpid, addr, pages } => (ZERO, 0, vpid, 0, addr, pages),
            Frame::Drop { vpid, addr, pages } => (DROP, 0, vpid, 0, addr, pages),
            Frame::End { pages } => (END, 0, 0, 0, 0, pages),
        };
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&tag.to_le_bytes());
        b[4..8].copy_from_slice(&id.to_le_bytes());
        b[8..12].copy_from_slice(&vpid.to_le_bytes());
        b[12..16].copy_from_slice(&pages.to_le_bytes());
        b[16..24].copy_from_slice(&addr.to_le_bytes());
        b[24..32].copy_from_slice(&extra.to_le_bytes());
        b
    }

    /// Decodes a header (an error names what is wrong with it).
    pub fn decode(b: &[u8; 32]) -> Result<Frame, String> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8"));
        let (id, pages) = (u32_at(4), u32_at(12));
        Ok(match u32_at(0) {
            GET if pages == 0 || pages > MAX_PAGES => {
                return Err(format!("a page request for {pages} pages"))
            }
            GET if u64_at(16) % super::uffd::PAGE != 0 => {
                return Err("a page request at an unaligned address".into())
            }
            GET => Frame::Get {
                id,
                vpid: u32_at(8) as i32,
                addr: u64_at(16),
                pages,
                urgent: u64_at(24) != 0,
            },
            PAGES if pages > MAX_PAGES => return Err(format!("an answer of {pages} pages")),
            PAGES => Frame::Pages { id, pages },
            FAIL => Frame::Fail {
                id,
                errno: u64_at(24) as u32 as i32,
            },
            ALL_IN => Frame::AllIn { pages: u64_at(24) },
            RELEASED => Frame::Released,
            PUT | ZERO | DROP if u64_at(16) % super::uffd::PAGE != 0 => {
                return Err("pre-copied pages at an unaligned address".into())
            }
            PUT if pages == 0 || pages > MAX_PAGES => {
                return Err(format!("pre-copied data of {pages} pages"))
            }
            PUT => Frame::Put {
                vpid: u32_at(8) as i32,
                addr: u64_at(16),
                pages,
            },
            ZERO | DROP if u64_at(24) == 0 || u64_at(24) > (1 << 36) => {
                return Err(format!("a pre-copy range of {} pages", u64_at(24)))
            }
            ZERO | DROP
                if u64_at(16)
                    .checked_add(u64_at(24) * super::uffd::PAGE)
                    .is_none() =>
            {
                return Err("a pre-copy range past the end of the address space".into())
            }
            ZERO => Frame::Zero {
                vpid: u32_at(8) as i32,
                addr: u64_at(16),
                pages: u64_at(24),
            },
            DROP => Frame::Drop {
                vpid: u32_at(8) as i32,
                addr: u64_at(16),
                pages: u64_at(24),
            },
            END => Frame::End { pages: u64_at(24) },
            t => return Err(format!("an unknown post-copy frame (tag {t})")),
        })
    }
}

/// Reads one header.
pub fn read_frame(r: &mut impl Read) -> std::io::Result<Frame> {
    let mut b = [0u8; 32];
    r.read_exact(&mut b)?;
    Frame::decode(&b).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Writes one header (and, for `Pages`, its data).
pub fn write_frame(w: &mut impl Write, f: &Frame, data: &[u8]) -> std::io::Result<()> {
    w.write_all(&f.encode())?;
    if !data.is_empty() {
        w.write_all(data)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_named() {
        for f in [
            Frame::Get {
                id: 7,
                vpid: 42,
                addr: 0x7f00_0000_1000,
                pages: 16,
                urgent: true,
            },
            Frame::Pages { id: 7, pages: 16 },
            Frame::Fail { id: 9, errno: 3 },
            Frame::AllIn { pages: 65536 },
            Frame::Released,
            Frame::Put {
                vpid: 3,
                addr: 0x7f00_0000_2000,
                pages: 1024,
            },
            Frame::Zero {
                vpid: 3,
                addr: 0x1000,
                pages: 1 << 20,
            },
            Frame::Drop {
                vpid: 4,
                addr: 0x2000,
                pages: 7,
            },
            Frame::End { pages: 99 },
        ] {
            assert_eq!(Frame::decode(&f.encode()).unwrap(), f);
        }
        let mut b = Frame::Get {
            id: 1,
            vpid: 1,
            addr: 0x1000,
            pages: 1,
            urgent: false,
        }
        .encode();
        b[12..16].copy_from_slice(&(MAX_PAGES + 1).to_le_bytes());
        assert!(Frame::decode(&b).unwrap_err().contains("pages"));
        b[12..16].copy_from_slice(&1u32.to_le_bytes());
        b[16] = 1;
        assert!(Frame::decode(&b).unwrap_err().contains("unaligned"));
        b[0] = 99;
        assert!(Frame::decode(&b).unwrap_err().contains("unknown"));
    }
}
