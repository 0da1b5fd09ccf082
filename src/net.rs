//! The byte streams imapull speaks over: TCP, unix sockets, TLS over TCP,
//! and DEFLATE over any of them. One boxed trait object
//! keeps the IMAP session and the delivery session each a single type.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
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

/// How long one address may take to accept a TCP connection (directly or
/// through a proxy). Long enough for a handshake across the world with a
/// lost SYN or two (retransmits come after 1 and 3 s); short enough that a
/// first address that does not answer (an IPv6 route that goes nowhere)
/// costs seconds before the next is tried, not the whole timeout.
pub const CONNECT_ATTEMPT: Duration = Duration::from_secs(10);

/// The addresses `host` resolves to, in the resolver's order.
pub async fn resolve(host: &str, port: u16) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| anyhow::anyhow!("resolving {host}: {e}"))?
        .collect();
    if addrs.is_empty() {
        anyhow::bail!("{host} has no address");
    }
    Ok(addrs)
}

/// Tries `connect` on each of `addrs` in turn, each for at most
/// [`CONNECT_ATTEMPT`] and all within `limit`, and returns the first that
/// works; else an error naming every address and why it failed.
pub async fn connect_each<T, F, Fut>(
    peer: &str,
    addrs: &[std::net::SocketAddr],
    limit: Duration,
    mut connect: F,
) -> anyhow::Result<T>
where
    F: FnMut(std::net::SocketAddr) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut failures = Vec::new();
    for &addr in addrs {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            failures.push(format!("{addr}: not tried, {}s passed", limit.as_secs()));
            continue;
        }
        let wait = left.min(CONNECT_ATTEMPT);
        match tokio::time::timeout(wait, connect(addr)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => failures.push(format!("{addr}: {e:#}")),
            Err(_) => failures.push(format!("{addr}: no answer within {}s", wait.as_secs())),
        }
    }
    anyhow::bail!("connecting to {peer}: {}", failures.join("; "))
}

/// A stream whose reads and writes fail with `TimedOut` after `limit`
/// without progress. Unlike a timeout around a whole operation, it bounds
/// silence, not size: a 50 MB FETCH over a slow link is fine as long as
/// bytes keep coming.
#[derive(Debug)]
pub struct IdleTimeout<T> {
    inner: T,
    stats: WireStats,
    read_deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    write_deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

/// The silence limit of an [`IdleTimeout`] stream and the bytes it carried,
/// shared with its owner.
#[derive(Debug, Clone, Default)]
pub struct WireStats {
    /// Milliseconds; the owner may lengthen it while the connection is meant
    /// to be quiet (IMAP IDLE). A change applies from the next wait on.
    pub limit_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Bytes read and written on the wire (below TLS and COMPRESS).
    pub read: Arc<std::sync::atomic::AtomicU64>,
    pub written: Arc<std::sync::atomic::AtomicU64>,
}

impl<T> IdleTimeout<T> {
    pub fn new(inner: T, limit: Duration) -> IdleTimeout<T> {
        let stats = WireStats::default();
        stats.limit_ms.store(
            limit.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        IdleTimeout {
            inner,
            stats,
            read_deadline: None,
            write_deadline: None,
        }
    }

    pub fn stats(&self) -> WireStats {
        self.stats.clone()
    }

    fn limit(&self) -> Duration {
        Duration::from_millis(
            self.stats
                .limit_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }
}

fn poll_deadline(
    slot: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    limit: Duration,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<std::io::Error> {
    let sleep = slot.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
    match sleep.as_mut().poll(cx) {
        std::task::Poll::Ready(()) => {
            *slot = None;
            std::task::Poll::Ready(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no data for {}s", limit.as_secs()),
            ))
        }
        std::task::Poll::Pending => std::task::Poll::Pending,
    }
}

/// A poll of the inner stream, bounded by silence: progress clears the
/// deadline, waiting arms it (and fails once it passes).
fn guarded<R>(
    poll: std::task::Poll<std::io::Result<R>>,
    slot: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    limit: Duration,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<std::io::Result<R>> {
    match poll {
        std::task::Poll::Ready(r) => {
            *slot = None;
            std::task::Poll::Ready(r)
        }
        std::task::Poll::Pending => poll_deadline(slot, limit, cx).map(Err),
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleTimeout<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let limit = self.limit();
        let this = &mut *self;
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        this.stats
            .read
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        guarded(poll, &mut this.read_deadline, limit, cx)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let limit = self.limit();
        let this = &mut *self;
        let poll = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &poll {
            this.stats
                .written
                .fetch_add(*n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        guarded(poll, &mut this.write_deadline, limit, cx)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let limit = self.limit();
        let this = &mut *self;
        let poll = std::pin::Pin::new(&mut this.inner).poll_flush(cx);
        guarded(poll, &mut this.write_deadline, limit, cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn every_address_is_tried_each_with_its_own_timeout() {
        let v6: std::net::SocketAddr = "[::1]:993".parse().unwrap();
        let v4: std::net::SocketAddr = "127.0.0.1:993".parse().unwrap();
        // The first refuses: the second is tried at once.
        let got = connect_each("h", &[v6, v4], Duration::from_secs(120), |a| async move {
            if a.is_ipv6() {
                anyhow::bail!("refused")
            }
            Ok(a)
        })
        .await
        .unwrap();
        assert_eq!(got, v4);
        // The first never answers: the second after CONNECT_ATTEMPT, not
        // after the whole limit.
        let start = tokio::time::Instant::now();
        let got = connect_each("h", &[v6, v4], Duration::from_secs(120), |a| async move {
            if a.is_ipv6() {
                std::future::pending::<()>().await;
            }
            Ok(a)
        })
        .await
        .unwrap();
        assert_eq!(got, v4);
        assert_eq!(start.elapsed(), CONNECT_ATTEMPT);
        // All fail: each is named with its reason; the limit bounds all.
        let e = connect_each("h", &[v6, v4], Duration::from_secs(15), |_| async {
            std::future::pending::<anyhow::Result<()>>().await
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("[::1]:993: no answer within 10s"), "{e}");
        assert!(e.contains("127.0.0.1:993: no answer within 5s"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn silence_times_out_but_slow_progress_does_not() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut a = IdleTimeout::new(a, Duration::from_secs(10));
        let writer = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(8)).await;
                b.write_all(b"x").await.unwrap();
            }
            b
        });
        // 40 s in all, never 10 s of silence: fine.
        let mut buf = [0u8; 5];
        a.read_exact(&mut buf).await.unwrap();
        let _b = writer.await.unwrap();
        // Now nothing comes.
        let e = a.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    }
}

/// A read buffer below a stream that holds memory only while it holds
/// bytes: `capacity` bytes are read at once (so that TLS's small reads of
/// record headers and bodies become one read per burst), and the buffer is
/// given back once it is drained. A thousand idle IMAP connections then hold
/// no read buffer at all (a `BufReader` keeps its capacity for life).
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    buf: Vec<u8>,
    pos: usize,
    capacity: usize,
}

impl<S> ReadAhead<S> {
    pub fn new(capacity: usize, inner: S) -> ReadAhead<S> {
        ReadAhead {
            inner,
            buf: Vec::new(),
            pos: 0,
            capacity,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let me = &mut *self;
        if me.pos == me.buf.len() {
            // A read as large as ours goes straight to the caller.
            if out.remaining() >= me.capacity {
                return std::pin::Pin::new(&mut me.inner).poll_read(cx, out);
            }
            let mut fresh = std::mem::take(&mut me.buf);
            fresh.clear();
            fresh.resize(me.capacity, 0);
            let mut rb = tokio::io::ReadBuf::new(&mut fresh);
            match std::pin::Pin::new(&mut me.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    fresh.truncate(n);
                    me.buf = fresh;
                    me.pos = 0;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // Nothing came: no buffer is kept while waiting.
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = out.remaining().min(me.buf.len() - me.pos);
        out.put_slice(&me.buf[me.pos..me.pos + n]);
        me.pos += n;
        if me.pos == me.buf.len() {
            me.buf = Vec::new();
            me.pos = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod read_ahead_tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn reads_ahead_and_holds_nothing_once_drained() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        a.write_all(&data).await.unwrap();
        drop(a);
        let mut r = ReadAhead::new(64 * 1024, b);
        let mut got = Vec::new();
        let mut small = [0u8; 5];
        // Small reads (a TLS record header) are served from one big read.
        r.read_exact(&mut small).await.unwrap();
        got.extend_from_slice(&small);
        assert!(r.buf.capacity() >= 64 * 1024);
        let mut rest = vec![0u8; 1000];
        loop {
            let n = r.read(&mut rest).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&rest[..n]);
        }
        assert_eq!(got, data);
        assert_eq!(r.buf.capacity(), 0, "drained: nothing held");
    }
}
