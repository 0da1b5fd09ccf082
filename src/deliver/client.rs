//! The SMTP/LMTP session: connect lazily, greet, send transactions, and map
//! every reply to an [`Outcome`].
//!
//! One session serves a whole run. A failed transaction is followed by RSET;
//! a timeout, a lost connection or a 421 drops the session, and the next
//! message opens a new one. The transaction is MAIL, the RCPTs and DATA in
//! one write when the server offers PIPELINING (it must refuse DATA if no
//! recipient was accepted), else one command at a time. Recipients that
//! refused are reported in the [`Delivery`], and the caller retries only
//! them.

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};

use super::reply::{Class, Extensions, Reply, ReplyBuilder};
use super::transaction::{self, End, Next};
use super::wire::DataEncoder;
use super::Outcome;
use crate::config::{Deliver, DeliverProtocol, DeliverTarget};
use crate::net::{timed, BoxIo, IdleTimeout};

/// A reply line longer than this is a broken or hostile server (RFC 5321
/// allows 512 octets).
const MAX_LINE: u64 = 8192;
/// The message is encoded and written in pieces of this size, so that a
/// large message is not copied whole.
const CHUNK: usize = 64 * 1024;
/// The message's last bytes, held back with the terminating "." until the
/// barrier is passed.
const TAIL: usize = 512;

/// The envelope of one transaction.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Empty for the null path `<>`.
    pub sender: String,
    /// The recipients still to be reached.
    pub recipients: Vec<String>,
}

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub outcome: Outcome,
    /// The server's words, for the ledger and the log.
    pub reply: String,
    /// Recipients that accepted the message in this attempt.
    pub accepted: Vec<String>,
}

impl Delivery {
    /// The same outcome for every recipient, none of whom accepted it.
    pub fn all(outcome: Outcome, reply: impl Into<String>) -> Delivery {
        Delivery {
            outcome,
            reply: reply.into(),
            accepted: vec![],
        }
    }
}

struct Session {
    io: BufReader<BoxIo>,
    ext: Extensions,
    /// The envelope sent ahead, after the last message's ".": the next
    /// delivery reads its replies instead of sending it.
    presented: Option<Vec<String>>,
}

/// The message a session delivers next, when it is known while this one
/// is sent. Its envelope (MAIL, RCPT, DATA) goes out in the same write as
/// this message's final "." (RFC 2920 lets commands follow the end of
/// data), so that this message's reply and the next one's envelope cost
/// one round trip instead of two. Nothing of it can be accepted before its
/// own final ".", which still waits for its turn.
#[derive(Clone, Copy)]
pub struct Upcoming<'a> {
    pub env: &'a Envelope,
    pub prefix: &'a [u8],
    pub msg: &'a [u8],
}

impl Upcoming<'_> {
    /// Its envelope's command lines on a session with `ext`, or None when
    /// it will send none (nobody to send to, or over the server's SIZE).
    fn commands(&self, ext: &Extensions, peer: &str) -> Option<Vec<String>> {
        let size = (self.prefix.len() + self.msg.len()) as u64;
        if self.env.recipients.is_empty() || transaction::over_size(size, ext, peer).is_some() {
            return None;
        }
        let eight_bit = !self.msg.is_ascii() || !self.prefix.is_ascii();
        Some(transaction::commands(self.env, ext, size, eight_bit))
    }
}

impl Session {
    /// Sends MAIL and the RCPTs (and DATA): in one write with PIPELINING,
    /// else one at a time, stopping at a refused MAIL or a 421 (the
    /// transaction is over; the rest would only be refused, or go to a
    /// server that is closing). Returns their replies, and the reply to a
    /// pipelined DATA apart.
    async fn envelope(
        &mut self,
        peer: &str,
        limit: Duration,
        commands: &[String],
    ) -> Result<(Vec<Reply>, Option<Reply>)> {
        let mut replies = Vec::with_capacity(commands.len());
        if !self.ext.pipelining {
            for c in commands {
                let r = command(&mut self.io, peer, limit, c).await?;
                let over = r.code == 421 || (replies.is_empty() && !r.is_ok());
                replies.push(r);
                if over {
                    break;
                }
            }
            return Ok((replies, None));
        }
        let batch = batch(commands);
        tracing::trace!(peer, "C: {}", batch.trim_end());
        timed(peer, limit, self.io.get_mut().write_all(batch.as_bytes())).await?;
        self.envelope_replies(peer, limit, commands.len()).await
    }

    /// The replies to a pipelined envelope of `n` commands, the last one
    /// (DATA's) apart.
    async fn envelope_replies(
        &mut self,
        peer: &str,
        limit: Duration,
        n: usize,
    ) -> Result<(Vec<Reply>, Option<Reply>)> {
        let mut replies = Vec::with_capacity(n);
        for _ in 0..n {
            replies.push(read_reply(&mut self.io, peer, limit).await?);
        }
        let data = replies.pop();
        Ok((replies, data))
    }
}

/// Command lines as one write.
fn batch(commands: &[String]) -> String {
    commands.iter().map(|c| format!("{c}\r\n")).collect()
}

/// A delivery client with at most one open session.
pub struct Deliverer {
    target: Deliver,
    helo_name: String,
    timeout: Duration,
    session: Option<Session>,
    /// Sessions opened so far (tests check that an idle pass opens none).
    pub connections: u32,
}

/// Something that must be finished before a message may be accepted: the
/// previous message's outcome recorded and fsynced to the ledger. Cloneable,
/// so that the next message's turn can wait on it too (see `pull`).
pub type Barrier =
    futures_util::future::Shared<futures_util::future::BoxFuture<'static, Result<(), String>>>;

/// A barrier that is already passed.
pub fn no_barrier() -> Barrier {
    use futures_util::FutureExt as _;
    futures_util::future::ready(Ok(())).boxed().shared()
}

/// Delivery sessions to one local server, used in parallel by a pass
/// (`delivery_sessions`); each opens its connection only when it is first
/// given a message.
pub struct Sessions(pub Vec<Deliverer>);

impl Sessions {
    /// The account's delivery sessions, as its config says (opened on
    /// their first message).
    pub fn for_account(account: &crate::config::Account) -> Sessions {
        Sessions::new(
            &account.deliver,
            &account.ehlo,
            account.deliver_timeout,
            account.delivery_sessions,
        )
    }

    pub fn new(target: &Deliver, helo_name: &str, timeout: Duration, n: usize) -> Sessions {
        Sessions(
            (0..n.max(1))
                .map(|_| Deliverer::new(target.clone(), helo_name.to_string(), timeout))
                .collect(),
        )
    }

    pub async fn quit(&mut self) {
        futures_util::future::join_all(self.0.iter_mut().map(Deliverer::quit)).await;
    }
}

/// The barrier failed: the previous delivery may not be on disk. The
/// message in flight was not completed (its connection was dropped before
/// the final "."), and the pass must stop.
#[derive(Debug, thiserror::Error)]
#[error("the ledger could not be synced to disk: {0}")]
pub struct BarrierFailed(pub String);

/// Why a session ended abruptly; the message in flight is deferred.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SessionLost(String);

impl Deliverer {
    pub fn new(target: Deliver, helo_name: String, timeout: Duration) -> Deliverer {
        Deliverer {
            target,
            helo_name,
            timeout,
            session: None,
            connections: 0,
        }
    }

    pub fn target(&self) -> &Deliver {
        &self.target
    }

    fn peer(&self) -> String {
        self.target.to_string()
    }

    /// Delivers one message. `prefix` (a trace header, already CRLF-ended) is
    /// sent before `msg`. Never returns an error: every failure is an
    /// outcome, so that the pass goes on with the next message.
    ///
    /// `barrier`, if given, is awaited before the message's final bytes and
    /// its terminating "." are sent: the server cannot accept this message
    /// before the barrier (the ledger's fsync of the previous delivery) is
    /// done. A failed barrier aborts the transaction by dropping the
    /// connection and is returned as an error.
    ///
    /// `next`, if given, is the message this session delivers next: its
    /// envelope is sent right after this message's "." ([`Upcoming`]). The
    /// next call must then be for that message; any other drops the
    /// session and opens a new one.
    pub async fn deliver(
        &mut self,
        env: &Envelope,
        prefix: &[u8],
        msg: &[u8],
        barrier: Option<Barrier>,
        next: Option<Upcoming<'_>>,
    ) -> Result<Delivery, BarrierFailed> {
        match self.try_deliver(env, prefix, msg, barrier, next).await {
            Err(e) if e.downcast_ref::<BarrierFailed>().is_some() => {
                self.session = None;
                Err(e.downcast::<BarrierFailed>().expect("checked"))
            }
            other => Ok(self.outcome(other)),
        }
    }

    fn outcome(&mut self, r: Result<Delivery>) -> Delivery {
        match r {
            Ok(d) => d,
            Err(e) => {
                // Timeouts, I/O errors, garbage from the server: the session
                // is in an unknown state, so it is dropped.
                self.session = None;
                Delivery::all(Outcome::Deferred, format!("{}: {:#}", self.peer(), e))
            }
        }
    }

    async fn try_deliver(
        &mut self,
        env: &Envelope,
        prefix: &[u8],
        msg: &[u8],
        barrier: Option<Barrier>,
        next: Option<Upcoming<'_>>,
    ) -> Result<Delivery> {
        let peer = self.peer();
        // An envelope sent ahead for another message leaves the server
        // somewhere this delivery cannot follow: start afresh.
        if let Some(s) = &self.session {
            if let Some(sent) = &s.presented {
                let this = Upcoming { env, prefix, msg }.commands(&s.ext, &peer);
                if this.as_ref() != Some(sent) {
                    tracing::debug!(peer, "the envelope sent ahead was for another message");
                    self.session = None;
                }
            }
        }
        if self.session.is_none() {
            let s = self.connect().await?;
            self.session = Some(s);
        }
        let lmtp = self.target.protocol == DeliverProtocol::Lmtp;
        let limit = self.timeout;
        let s = self.session.as_mut().expect("session just opened");
        let size = (prefix.len() + msg.len()) as u64;
        if let Some(d) = transaction::over_size(size, &s.ext, &peer) {
            return Ok(d);
        }
        let eight_bit = !msg.is_ascii() || !prefix.is_ascii();
        let commands = transaction::commands(env, &s.ext, size, eight_bit);
        let (replies, data_reply) = match s.presented.take() {
            Some(_) => s.envelope_replies(&peer, limit, commands.len()).await?,
            None => s.envelope(&peer, limit, &commands).await?,
        };
        let (accepted, refused) =
            match transaction::judge_envelope(&peer, env, &replies, data_reply.as_ref()) {
                Next::Stop(d, end) => {
                    self.end(end).await;
                    return Ok(d);
                }
                Next::Data { accepted, refused } => (accepted, refused),
            };
        let r = match data_reply {
            Some(r) => r,
            None => command(&mut s.io, &peer, limit, "DATA").await?,
        };
        if let Some((d, end)) = transaction::judge_data(&r) {
            self.end(end).await;
            return Ok(d);
        }
        let ahead = next
            .filter(|_| s.ext.pipelining)
            .and_then(|n| n.commands(&s.ext, &peer));
        let ahead_bytes = ahead.as_deref().map(batch);
        if let Some(b) = &ahead_bytes {
            tracing::trace!(peer, "C (after the \".\"): {}", b.trim_end());
        }
        send_data(
            &mut s.io,
            &peer,
            limit,
            prefix,
            msg,
            barrier,
            ahead_bytes.as_deref(),
        )
        .await?;
        s.presented = ahead;
        let mut finals = Vec::with_capacity(accepted.len());
        if lmtp {
            for rcpt in accepted {
                finals.push((rcpt, read_reply(&mut s.io, &peer, limit).await?));
            }
        } else {
            let r = read_reply(&mut s.io, &peer, limit).await?;
            finals.extend(accepted.into_iter().map(|rcpt| (rcpt, r.clone())));
        }
        let (d, drop) = transaction::judge_final(lmtp, refused, finals);
        if drop {
            self.session = None;
        }
        Ok(d)
    }

    async fn connect(&mut self) -> Result<Session> {
        let peer = self.peer();
        let limit = self.timeout;
        let io: BoxIo = match &self.target.target {
            DeliverTarget::Tcp { host, port } => {
                let addrs = crate::net::resolve(host, *port).await?;
                let s = crate::net::connect_each(&peer, &addrs, limit, |a| async move {
                    Ok(TcpStream::connect(a).await?)
                })
                .await?;
                s.set_nodelay(true).ok();
                Box::new(IdleTimeout::new(s, limit))
            }
            DeliverTarget::Unix(path) => Box::new(IdleTimeout::new(
                timed(&peer, limit, UnixStream::connect(path))
                    .await
                    .with_context(|| format!("connecting to {peer}"))?,
                limit,
            )),
        };
        self.connections += 1;
        self.greet(io).await
    }

    /// The greeting and EHLO/LHLO (HELO if EHLO is refused) on a new
    /// connection.
    async fn greet(&mut self, io: BoxIo) -> Result<Session> {
        let (peer, limit) = (self.peer(), self.timeout);
        let mut io = BufReader::with_capacity(16 * 1024, io);
        let greeting = read_reply(&mut io, &peer, limit).await?;
        if greeting.code != 220 {
            bail!("{peer} greeted with {greeting}");
        }
        let lmtp = self.target.protocol == DeliverProtocol::Lmtp;
        let verb = if lmtp { "LHLO" } else { "EHLO" };
        let mut hello =
            command(&mut io, &peer, limit, &format!("{verb} {}", self.helo_name)).await?;
        let ext = if hello.is_ok() {
            Extensions::from_ehlo(&hello)
        } else if !lmtp && hello.class() == Class::Permanent {
            hello = command(&mut io, &peer, limit, &format!("HELO {}", self.helo_name)).await?;
            if !hello.is_ok() {
                bail!("{peer} refused HELO: {hello}");
            }
            Extensions::default()
        } else {
            bail!("{peer} refused {verb}: {hello}");
        };
        tracing::debug!(peer, ?ext, "delivery session open");
        Ok(Session {
            io,
            ext,
            presented: None,
        })
    }

    /// Leaves a transaction given up: RSET (a failed RSET drops the
    /// session), or a dropped connection.
    async fn end(&mut self, end: End) {
        let (peer, limit) = (self.peer(), self.timeout);
        let reset = match (end, self.session.as_mut()) {
            (End::Reset, Some(s)) => command(&mut s.io, &peer, limit, "RSET").await,
            _ => Err(anyhow!("dropped")),
        };
        if !reset.is_ok_and(|r| r.is_ok()) {
            self.session = None;
        }
    }

    /// Opens the session over `io` (an in-memory stream, for the
    /// transcript tests).
    #[cfg(test)]
    pub(crate) async fn attach(&mut self, io: BoxIo) -> Result<()> {
        self.session = Some(self.greet(io).await?);
        Ok(())
    }

    /// Whether a session is open (a 421 or a lost connection closes it).
    #[cfg(test)]
    pub(crate) fn is_open(&self) -> bool {
        self.session.is_some()
    }

    /// Opens a session (greeting, EHLO/LHLO) and ends it with QUIT, sending
    /// no mail: what `imapull check` asks of the local server. Returns what
    /// the server offers.
    pub async fn probe(&mut self) -> Result<Extensions> {
        let s = self.connect().await?;
        let ext = s.ext.clone();
        self.session = Some(s);
        self.quit().await;
        Ok(ext)
    }

    /// Ends the session politely, if one is open. One with an envelope
    /// sent ahead is dropped instead: its server may be waiting for a
    /// message after a 354, and would take QUIT as part of it.
    pub async fn quit(&mut self) {
        let peer = self.peer();
        if let Some(mut s) = self.session.take() {
            if s.presented.is_some() {
                return;
            }
            let _ = command(&mut s.io, &peer, Duration::from_secs(5), "QUIT").await;
        }
    }
}

async fn command(io: &mut BufReader<BoxIo>, peer: &str, limit: Duration, c: &str) -> Result<Reply> {
    tracing::trace!(peer, "C: {c}");
    let line = format!("{c}\r\n");
    timed(peer, limit, io.get_mut().write_all(line.as_bytes())).await?;
    read_reply(io, peer, limit).await
}

async fn read_reply(io: &mut BufReader<BoxIo>, peer: &str, limit: Duration) -> Result<Reply> {
    let mut builder = ReplyBuilder::default();
    let mut line = Vec::with_capacity(128);
    loop {
        line.clear();
        let n = timed(
            peer,
            limit,
            (&mut *io).take(MAX_LINE).read_until(b'\n', &mut line),
        )
        .await?;
        if n == 0 {
            return Err(anyhow!(SessionLost(format!(
                "{peer} closed the connection"
            ))));
        }
        if !line.ends_with(b"\n") {
            bail!("{peer} sent a reply line over {MAX_LINE} bytes or cut short");
        }
        tracing::trace!(peer, "S: {}", String::from_utf8_lossy(&line).trim_end());
        if let Some(r) = builder
            .push(&line)
            .with_context(|| format!("from {peer}"))?
        {
            return Ok(r);
        }
    }
}

async fn send_data(
    io: &mut BufReader<BoxIo>,
    peer: &str,
    limit: Duration,
    prefix: &[u8],
    msg: &[u8],
    barrier: Option<Barrier>,
    then: Option<&str>,
) -> Result<()> {
    // Everything but the message's last bytes goes out before the barrier
    // is awaited, so the server takes it in while the previous delivery's
    // ledger row reaches the disk; after the barrier, one small write
    // carries those last bytes and the terminating ".". (The terminator
    // never leaves alone: a separate small write for it is what stalls
    // other tools for tens of milliseconds per message, Nagle's algorithm
    // and delayed ACKs.)
    let mut enc = DataEncoder::default();
    let mut buf = Vec::with_capacity(CHUNK + CHUNK / 8 + prefix.len());
    let w = io.get_mut();
    let (body, tail) = msg.split_at(msg.len().saturating_sub(TAIL));
    enc.feed(prefix, &mut buf);
    for piece in body.chunks(CHUNK) {
        enc.feed(piece, &mut buf);
        if buf.len() >= CHUNK {
            timed(peer, limit, w.write_all(&buf)).await?;
            buf.clear();
        }
    }
    if !buf.is_empty() {
        timed(peer, limit, w.write_all(&buf)).await?;
        buf.clear();
    }
    enc.feed(tail, &mut buf);
    enc.finish(&mut buf);
    if let Some(then) = then {
        buf.extend_from_slice(then.as_bytes());
    }
    if let Some(b) = barrier {
        b.await.map_err(BarrierFailed)?;
    }
    timed(peer, limit, w.write_all(&buf)).await?;
    timed(peer, limit, w.flush()).await?;
    Ok(())
}
