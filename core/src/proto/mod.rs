//! The wire protocol between a source and a destination phaul.
//!
//! Every connection starts with a preamble (magic `phaul\0` and the
//! protocol version, little-endian u16) so a stranger or an incompatible
//! phaul is told apart at once. After it, the *control* connection carries
//! length-prefixed frames ([`frame`]) of [`Msg`] serialised with postcard;
//! the *memory* connection, after its one [`Msg::AttachMemory`] frame,
//! carries CRIU's page-server stream untouched (so it can be spliced).
//!
//! Frames have a hard size limit ([`frame::MAX_FRAME`]); a malformed,
//! oversized or unexpected frame ends the migration with a clear error on
//! both sides.

pub mod frame;
mod msg;

pub use frame::{
    read_preamble, write_preamble, FrameError, FrameReader, FrameWriter, PROTOCOL_VERSION,
};
pub use msg::*;
