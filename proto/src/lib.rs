//! The wire protocol between DOVE's clients (`dove-hook`, `dovectl`) and `doved`.
//!
//! A frame is a 4-byte big-endian payload length followed by that many bytes of JSON.
//! Every request and response carries the protocol version; the daemon refuses versions
//! it does not speak with a message that names the one it does. Frames are capped at
//! [`MAX_FRAME_BYTES`] on both sides so that a confused or hostile peer cannot make the
//! other side allocate without bound.

mod client;
mod frame;
mod message;
pub mod spool;

pub use client::{Client, ClientError};
pub use frame::{check_frame_len, decode_frame, encode_frame, read_frame, write_frame, FrameError};
pub use message::*;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame payload either side accepts. A registration is a few hundred bytes plus
/// annotations; a `list` reply for a thousand containers fits comfortably.
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// Largest request payload the daemon accepts: requests are small, replies can be large.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// Where `doved` listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/dove/dove.sock";

/// Environment variable every DOVE binary reads for the socket path.
pub const SOCKET_ENV: &str = "DOVE_SOCKET";
