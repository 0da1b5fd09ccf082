//! COMPRESS=DEFLATE (RFC 4978): raw deflate in both directions, each write
//! ending in a sync flush so that a command reaches the server whole.
//!
//! Bytes the connection had already read past the tagged OK are the start
//! of the compressed stream; [`Prefixed`] hands them to the decoder first.

use std::pin::Pin;
use std::task::{Context, Poll};

use async_compression::tokio::bufread::DeflateDecoder;
use async_compression::tokio::write::DeflateEncoder;
use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};

use crate::net::BoxIo;

/// A stream whose first reads return `prefix`.
#[derive(Debug)]
pub struct Prefixed<T> {
    prefix: BytesMut,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: BytesMut, inner: T) -> Prefixed<T> {
        Prefixed { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads are inflated, writes deflated. The decoder reads from a buffered
/// reader over the encoder, which passes reads through to the socket; the
/// encoder's flush is a deflate sync flush.
#[derive(Debug)]
pub struct Deflate {
    inner: DeflateDecoder<BufReader<DeflateEncoder<Prefixed<BoxIo>>>>,
}

impl Deflate {
    pub fn new(io: BoxIo, already_read: BytesMut) -> Deflate {
        let enc = DeflateEncoder::new(Prefixed::new(already_read, io));
        Deflate {
            inner: DeflateDecoder::new(BufReader::new(enc)),
        }
    }

    fn encoder(&mut self) -> Pin<&mut DeflateEncoder<Prefixed<BoxIo>>> {
        Pin::new(self.inner.get_mut().get_mut())
    }
}

impl AsyncRead for Deflate {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Deflate {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.encoder().poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.encoder().poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.encoder().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn round_trip_through_a_peer_with_its_own_deflate() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut ours = Deflate::new(Box::new(a), BytesMut::new());
        let mut theirs = Deflate::new(Box::new(b), BytesMut::new());
        ours.write_all(b"A1 NOOP\r\n").await.unwrap();
        ours.flush().await.unwrap();
        let mut got = [0u8; 9];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"A1 NOOP\r\n");
        let text = "Subject: x\r\n\r\n".repeat(1000);
        theirs.write_all(text.as_bytes()).await.unwrap();
        theirs.flush().await.unwrap();
        let mut back = vec![0u8; text.len()];
        ours.read_exact(&mut back).await.unwrap();
        assert_eq!(back, text.as_bytes());
    }
}
