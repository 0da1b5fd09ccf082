//! The byte streams imapull speaks over: TCP, unix sockets, TLS over TCP,
//! and (through async-imap) DEFLATE over any of them. One boxed trait object
//! keeps the IMAP session and the delivery session each a single type.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + Debug {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Debug> Io for T {}

pub type BoxIo = Box<dyn Io>;

/// An error from a socket await that ran out of time.
#[derive(Debug, thiserror::Error)]
#[error("no answer from {peer} within {}s", .secs)]
pub struct TimedOut {
    pub peer: String,
    pub secs: u64,
}

/// Runs `fut` with a deadline; every await on a socket goes through here.
pub async fn timed<T, E, F>(peer: &str, limit: Duration, fut: F) -> anyhow::Result<T>
where
    F: Future<Output = Result<T, E>>,
    E: Into<anyhow::Error>,
{
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(TimedOut {
            peer: peer.to_string(),
            secs: limit.as_secs(),
        }
        .into()),
    }
}
