//! Delivery to the local mail server over SMTP or LMTP.
//!
//! Our own small client rather than lettre (see docs/design.md): LMTP's
//! per-recipient replies, unix sockets, PIPELINING, and the exact wire
//! encoding in [`wire`]. [`reply`], [`headers`] and [`transaction`] are pure
//! (a transaction's command lines, and what its replies make of it);
//! [`client`] only does the I/O around them.

pub mod client;
pub mod headers;
pub mod reply;
pub mod transaction;
#[cfg(test)]
mod transcripts;
pub mod wire;

pub use client::{Deliverer, Delivery, Envelope, Sessions, Upcoming};

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
