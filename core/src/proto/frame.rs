//! Length-prefixed postcard frames and the connection preamble.

use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Serialize};

/// The protocol version both sides must speak.
pub const PROTOCOL_VERSION: u16 = 6;
/// First bytes of every connection.
pub const MAGIC: &[u8; 6] = b"phaul\0";
/// The largest frame accepted (image files travel in chunks below it).
pub const MAX_FRAME: usize = 4 << 20;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
    /// An I/O error.
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    /// A frame larger than [`MAX_FRAME`].
    #[error("the peer sent a frame of {0} bytes (limit {MAX_FRAME})")]
    TooLarge(usize),
    /// A frame that does not decode.
    #[error("the peer sent a malformed frame: {0}")]
    Malformed(String),
    /// Not a phaul peer, or another protocol version.
    #[error("{0}")]
    Preamble(String),
}

/// Whether four bytes start a TLS record (alert or handshake, TLS 1.0-1.3
/// record versions).
fn looks_like_tls(b: [u8; 4]) -> bool {
    matches!(b[0], 0x15 | 0x16) && b[1] == 3 && b[2] <= 4
}

/// Writes the preamble.
pub fn write_preamble(w: &mut impl Write) -> Result<(), FrameError> {
    let mut buf = [0u8; 8];
    buf[..6].copy_from_slice(MAGIC);
    buf[6..].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Reads and checks the preamble.
pub fn read_preamble(r: &mut impl Read) -> Result<(), FrameError> {
    let mut buf = [0u8; 8];
    read_exact_or_closed(r, &mut buf)?;
    if &buf[..6] != MAGIC {
        return Err(FrameError::Preamble(
            "the peer is not a phaul endpoint (bad magic)".into(),
        ));
    }
    let v = u16::from_le_bytes([buf[6], buf[7]]);
    if v != PROTOCOL_VERSION {
        return Err(FrameError::Preamble(format!(
            "the peer speaks phaul protocol {v}, this phaul speaks {PROTOCOL_VERSION}: \
             install the same phaul version on both hosts"
        )));
    }
    Ok(())
}

fn read_exact_or_closed(r: &mut impl Read, buf: &mut [u8]) -> Result<(), FrameError> {
    match r.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(FrameError::Closed),
        Err(e) => Err(FrameError::Io(e)),
    }
}

/// Reads frames from a byte stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    /// Wraps a reader (after the preamble).
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: Vec::new(),
        }
    }

    /// The next frame, decoded.
    pub fn read<T: DeserializeOwned>(&mut self) -> Result<T, FrameError> {
        let mut head = [0u8; 4];
        read_exact_or_closed(&mut self.inner, &mut head)?;
        let len = u32::from_le_bytes(head) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        self.buf.resize(len, 0);
        match self.inner.read_exact(&mut self.buf) {
            Ok(()) => {}
            // A TLS alert (or handshake) record where a frame should be,
            // then the close: the peer speaks TLS and this side does not.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && looks_like_tls(head) => {
                return Err(FrameError::Preamble(
                    "the peer answered in TLS: it is not running with --insecure, so this side \
                     needs its TLS files (--tls-dir)"
                        .into(),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(FrameError::Malformed(format!(
                    "connection closed inside a {len}-byte frame"
                )))
            }
            Err(e) => return Err(FrameError::Io(e)),
        }
        postcard::from_bytes(&self.buf).map_err(|e| FrameError::Malformed(e.to_string()))
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

/// Writes frames to a byte stream.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    /// Wraps a writer (after the preamble).
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            buf: Vec::new(),
        }
    }

    /// Encodes and sends one frame.
    pub fn write<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        self.buf.clear();
        self.buf.extend_from_slice(&[0; 4]);
        let buf = std::mem::take(&mut self.buf);
        let mut buf =
            postcard::to_extend(msg, buf).map_err(|e| FrameError::Malformed(e.to_string()))?;
        let len = buf.len() - 4;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
        let r = self.inner.write_all(&buf).and_then(|_| self.inner.flush());
        self.buf = buf;
        r.map_err(FrameError::Io)
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    enum T {
        A(u32),
        B { s: String, v: Vec<u8> },
    }

    #[test]
    fn frames_round_trip() {
        let mut wire = Vec::new();
        write_preamble(&mut wire).unwrap();
        let mut w = FrameWriter::new(&mut wire);
        w.write(&T::A(7)).unwrap();
        w.write(&T::B {
            s: "x".into(),
            v: vec![1, 2, 3],
        })
        .unwrap();
        let mut r = &wire[..];
        read_preamble(&mut r).unwrap();
        let mut fr = FrameReader::new(r);
        assert_eq!(fr.read::<T>().unwrap(), T::A(7));
        assert_eq!(
            fr.read::<T>().unwrap(),
            T::B {
                s: "x".into(),
                v: vec![1, 2, 3]
            }
        );
        assert!(matches!(fr.read::<T>(), Err(FrameError::Closed)));
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        assert!(matches!(
            read_preamble(&mut &b"GET / HTTP/1.1\r\n"[..]),
            Err(FrameError::Preamble(_))
        ));
        let mut other = MAGIC.to_vec();
        other.extend_from_slice(&99u16.to_le_bytes());
        let e = read_preamble(&mut &other[..]).unwrap_err().to_string();
        assert!(e.contains("protocol 99"), "{e}");

        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(matches!(
            FrameReader::new(&huge[..]).read::<T>(),
            Err(FrameError::TooLarge(_))
        ));

        let mut garbage = 3u32.to_le_bytes().to_vec();
        garbage.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            FrameReader::new(&garbage[..]).read::<T>(),
            Err(FrameError::Malformed(_))
        ));

        let mut short = 10u32.to_le_bytes().to_vec();
        short.extend_from_slice(&[0, 1]);
        assert!(matches!(
            FrameReader::new(&short[..]).read::<T>(),
            Err(FrameError::Malformed(_))
        ));
    }
}
