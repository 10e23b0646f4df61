//! The fs-sync wire messages ([`FsMsg`]), carried in the project's
//! length-prefixed postcard frames (`crate::proto::frame`).
//!
//! A pass is `Begin`, the deletions (deepest first), the entries in walk
//! order (parents before children), then `End`; the receiver answers
//! `Ack` or `Error`. A regular file is `File`, any number of `Punch` and
//! `Data`, then `FileEnd`. After the last pass the sender sends `Finish`.
//! Paths are relative to the root `root` (an index into both sides' root
//! lists), as raw bytes with `/` separators; the empty path is the root
//! itself (only in `Dir`).

use std::fmt;
use std::io::Write;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::PassStats;
use crate::proto::frame::{FrameError, FrameWriter, MAX_FRAME};

/// Raw bytes, serialised as one byte string (a length and a copy), not as
/// a sequence of integers.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Bytes(pub Vec<u8>);

impl Bytes {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

impl From<&[u8]> for Bytes {
    fn from(b: &[u8]) -> Self {
        Bytes(b.to_vec())
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(b: Vec<u8>) -> Self {
        Bytes(b)
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.len() <= 64 {
            write!(f, "{:?}", String::from_utf8_lossy(&self.0))
        } else {
            write!(f, "<{} bytes>", self.0.len())
        }
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Bytes, A::Error> {
                let mut v = Vec::new();
                while let Some(b) = a.next_element::<u8>()? {
                    v.push(b);
                }
                Ok(Bytes(v))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// The kind of a tree entry (sockets are never synchronised).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
    /// A FIFO.
    Fifo,
    /// A character device.
    Char,
    /// A block device.
    Block,
}

impl EntryKind {
    /// The kind of a `st_mode`, or None for a socket (or garbage).
    pub fn from_mode(mode: u32) -> Option<EntryKind> {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => Some(EntryKind::Dir),
            libc::S_IFREG => Some(EntryKind::File),
            libc::S_IFLNK => Some(EntryKind::Symlink),
            libc::S_IFIFO => Some(EntryKind::Fifo),
            libc::S_IFCHR => Some(EntryKind::Char),
            libc::S_IFBLK => Some(EntryKind::Block),
            _ => None,
        }
    }

    /// The `S_IFMT` bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            EntryKind::Dir => libc::S_IFDIR,
            EntryKind::File => libc::S_IFREG,
            EntryKind::Symlink => libc::S_IFLNK,
            EntryKind::Fifo => libc::S_IFIFO,
            EntryKind::Char => libc::S_IFCHR,
            EntryKind::Block => libc::S_IFBLK,
        }
    }
}

/// One extended attribute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    /// Its full name (`user.foo`, `trusted.bar`, `security.capability`).
    pub name: Bytes,
    /// Its value.
    pub value: Bytes,
}

/// The metadata the receiver applies to an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner, numeric.
    pub uid: u32,
    /// Group, numeric.
    pub gid: u32,
    /// Modification time, seconds.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Every extended attribute (those the receiver has and this lacks are removed).
    pub xattrs: Vec<Xattr>,
}

/// One fs-sync frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FsMsg {
    /// Sender: a pass starts.
    Begin {
        /// Pass number, from 1.
        pass: u32,
        /// Whether the workload is frozen (informational).
        final_pass: bool,
        /// How many roots the sender has (must match the receiver).
        roots: u32,
    },
    /// Sender: remove this path (and anything below it).
    Delete {
        /// Root id.
        root: u32,
        /// Path below the root (not empty).
        path: Bytes,
    },
    /// Sender: create the directory if needed and set its metadata (its
    /// mtime is set at the end of the pass, after its contents).
    Dir {
        /// Root id.
        root: u32,
        /// Path below the root; empty for the root itself.
        path: Bytes,
        /// Metadata.
        meta: Meta,
    },
    /// Sender: a regular file follows (`Punch`/`Data`, then `FileEnd`).
    File {
        /// Root id.
        root: u32,
        /// Path below the root.
        path: Bytes,
        /// The new size.
        size: u64,
        /// false: the data is all of the file's data regions (the rest is
        /// holes); true: start from the receiver's current file (what the
        /// earlier passes sent) and apply the changed blocks.
        delta: bool,
    },
    /// Sender: file data at an offset of the current file.
    Data {
        /// Byte offset.
        offset: u64,
        /// The bytes (at most [`super::CHUNK`]).
        data: Bytes,
    },
    /// Sender: make a range of the current file a hole (delta files only;
    /// data for the range, if any, follows).
    Punch {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Sender: the current file is complete.
    FileEnd {
        /// Metadata.
        meta: Meta,
        /// [`super::delta::whole_hash`] of the full new content (checked by
        /// the receiver for delta files before the file is renamed into place).
        hash: u128,
    },
    /// Sender: a symbolic link.
    Symlink {
        /// Root id.
        root: u32,
        /// Path below the root.
        path: Bytes,
        /// Its target, as is (never followed).
        target: Bytes,
        /// Metadata (the mode is ignored).
        meta: Meta,
    },
    /// Sender: a FIFO or device node.
    Special {
        /// Root id.
        root: u32,
        /// Path below the root.
        path: Bytes,
        /// Fifo, Char or Block.
        kind: EntryKind,
        /// Device number (`st_rdev`), 0 for a FIFO.
        rdev: u64,
        /// Metadata.
        meta: Meta,
    },
    /// Sender: make `path` another name of `target` (same root), which was
    /// sent earlier.
    Link {
        /// Root id.
        root: u32,
        /// The new name.
        path: Bytes,
        /// An existing name of the inode.
        target: Bytes,
    },
    /// Sender: only the metadata of an existing entry changed.
    Attr {
        /// Root id.
        root: u32,
        /// Path below the root.
        path: Bytes,
        /// The kind the entry has.
        kind: EntryKind,
        /// Metadata.
        meta: Meta,
    },
    /// Sender: the pass is complete; the sender's counts, for a cross-check.
    End {
        /// Entries the sender walked.
        files_scanned: u64,
        /// Entries it sent something for.
        files_sent: u64,
        /// File data bytes it sent.
        bytes_sent: u64,
        /// Deletions it sent.
        deleted: u64,
    },
    /// Sender: no more passes.
    Finish,
    /// Receiver: the pass is applied; its view of the pass.
    Ack(PassStats),
    /// Either side: it failed, with its one-line error.
    Error(String),
}

/// The position of [`FsMsg::Data`] in the enum: its postcard tag.
const DATA_TAG: u32 = 4;

/// Writes fs-sync frames on a stream. Small messages go through the
/// project's [`FrameWriter`]; file data is framed here without copying
/// it through the serialiser, in exactly the bytes postcard would produce
/// for [`FsMsg::Data`] (so any [`crate::proto::frame::FrameReader`] reads it).
pub(crate) struct Wire<'a, W: Write> {
    conn: &'a mut W,
}

impl<'a, W: Write> Wire<'a, W> {
    pub(crate) fn new(conn: &'a mut W) -> Self {
        Wire { conn }
    }

    /// Sends one message.
    pub(crate) fn msg(&mut self, m: &FsMsg) -> Result<(), FrameError> {
        FrameWriter::new(&mut *self.conn).write(m)
    }

    /// Sends `FsMsg::Data { offset, data }`.
    #[cfg(test)]
    pub(crate) fn data(&mut self, offset: u64, data: &[u8]) -> Result<(), FrameError> {
        let mut buf = vec![0u8; DATA_HEADROOM];
        buf.extend_from_slice(data);
        self.data_in_place(offset, &mut buf)
    }

    /// Sends `FsMsg::Data { offset, data }` where `buf` is
    /// [`DATA_HEADROOM`] spare bytes followed by the data: the frame head
    /// is written into the headroom and the frame leaves in one write.
    pub(crate) fn data_in_place(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), FrameError> {
        let len = buf.len().saturating_sub(DATA_HEADROOM);
        let head = data_frame_head(offset, len)?;
        let start = DATA_HEADROOM - head.len();
        buf[start..DATA_HEADROOM].copy_from_slice(&head);
        self.conn.write_all(&buf[start..])?;
        self.conn.flush()?;
        Ok(())
    }
}

/// Spare bytes before the data in a [`Wire::data_in_place`] buffer (the
/// largest frame head: length, tag, offset and data length).
pub(crate) const DATA_HEADROOM: usize = 4 + 5 + 10 + 10;

/// The frame length prefix and postcard encoding of `FsMsg::Data` up to
/// (not including) the data bytes: tag, offset and length as varints.
fn data_frame_head(offset: u64, len: usize) -> Result<Vec<u8>, FrameError> {
    let mut head = vec![0u8; 4];
    head = postcard::to_extend(&(DATA_TAG, offset, len as u64), head)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    let body = head.len() - 4 + len;
    if body > MAX_FRAME {
        return Err(FrameError::TooLarge(body));
    }
    head[..4].copy_from_slice(&(body as u32).to_le_bytes());
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::FrameReader;

    #[test]
    fn data_frames_are_postcard_frames() {
        for (offset, len) in [(0u64, 0usize), (5, 1), (1 << 40, 300), (u64::MAX, 70_000)] {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut fast = Vec::new();
            Wire::new(&mut fast).data(offset, &data).unwrap();
            let mut slow = Vec::new();
            FrameWriter::new(&mut slow)
                .write(&FsMsg::Data {
                    offset,
                    data: Bytes(data.clone()),
                })
                .unwrap();
            assert_eq!(fast, slow, "offset {offset}, {len} bytes");
            match FrameReader::new(&fast[..]).read::<FsMsg>().unwrap() {
                FsMsg::Data { offset: o, data: d } => assert_eq!((o, d.0), (offset, data)),
                other => panic!("{other:?}"),
            }
        }
        assert!(data_frame_head(0, MAX_FRAME).is_err());
    }
}
