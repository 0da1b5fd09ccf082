//! Delivery to the local mail server over SMTP or LMTP.
//!
//! Our own small client rather than lettre (see docs/design.md): LMTP's
//! per-recipient replies, unix sockets, PIPELINING, and the exact wire
//! encoding in [`wire`]. [`reply`] and [`headers`] are pure; [`client`] does
//! the I/O and turns every reply into an [`Outcome`].

pub mod client;
pub mod headers;
pub mod reply;
pub mod wire;

pub use client::{Deliverer, Delivery, Envelope, Sessions};

/// What became of one message. Only `Delivered` ever leads to removal from
/// the remote server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every recipient answered 2xx.
    Delivered,
    /// 4xx, a timeout or a lost connection: try again next pass.
    Deferred,
    /// 5xx or too large: quarantined until the operator acts.
    Rejected,
}
