//! One IMAP connection's I/O: a read buffer fed to the [`Framer`], tags,
//! and running a command to its tagged completion.
//!
//! Every command goes through [`Conn::run`], which is where "every reply is
//! read for what it says" is kept: the tagged OK is the only success; NO,
//! BAD, a tagged line that is no status, BYE, EOF, a timeout or a line over
//! the limit are each an [`ImapError`]. Untagged responses are handed to the
//! command's callback; the ones it does not want are ignored (logged at
//! debug level), wherever they come. Once a read or write failed, the
//! connection is broken and every later command fails at once: a response
//! half read cannot be mistaken for the next command's.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::response::{parse, Code, Data, FrameError, Framer, Response, Status};
use crate::net::BoxIo;

/// The least room a grown read buffer gets beyond what the frame needs:
/// small enough that a thousand idle connections hold little; a large
/// literal gets its whole size at once instead.
const READ_CHUNK: usize = 16 * 1024;

/// RFC 7888: with LITERAL- only literals up to this size may be sent
/// without waiting for the server's "+".
const LITERAL_MINUS_MAX: usize = 4096;

/// Outside a literal, a read into less room than this grows the buffer
/// first.
const MIN_READ: usize = 4 * 1024;

/// The most one read takes from the socket: the TLS layer's own buffer
/// size, so one read drains it.
const READ_WINDOW: usize = 64 * 1024;

/// What one read takes into an empty buffer while the connection idles:
/// IDLE's untagged lines are a few dozen bytes, and a thousand idling
/// connections that each kept a READ_CHUNK would hold 16 MB for nothing.
/// A longer response grows the buffer as usual.
const LEAN_READ: usize = 512;

/// A lean read needs at least this much room, or it gets a fresh buffer.
const MIN_LEAN_SPARE: usize = 64;

/// Standard responses imapull has no use for: not worth a debug line.
const ROUTINE: &[&str] = &[
    "FLAGS",
    "RECENT",
    "STATUS",
    "LSUB",
    "ENABLED",
    "ID",
    "NAMESPACE",
];

/// A command's outcome when it was not a tagged OK.
#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    /// The server refused the command (tagged NO).
    #[error("{peer} refused {command}: NO {}{text}", .code.as_ref().map(|c| format!("[{c}] ")).unwrap_or_default())]
    No {
        peer: String,
        command: String,
        code: Option<String>,
        text: String,
    },
    /// The server did not accept the command (tagged BAD, or a tagged line
    /// that is no status at all).
    #[error("{peer} rejected {command}: BAD {text}")]
    Bad {
        peer: String,
        command: String,
        text: String,
    },
    /// The connection ended: EOF, or a BYE.
    #[error("{peer} closed the connection{}", .bye.as_ref().map(|b| format!(" (BYE {b})")).unwrap_or_default())]
    Closed { peer: String, bye: Option<String> },
    /// The byte stream cannot be read on.
    #[error("{peer} sent {0}", .what)]
    Frame { peer: String, what: FrameError },
    /// A response imapull needs could not be read (e.g. a SEARCH result).
    #[error("{peer} sent an unreadable response to {command}: {why}")]
    Protocol {
        peer: String,
        command: String,
        why: String,
    },
    /// Reading or writing failed (a timeout included).
    #[error("talking to {peer}: {source}")]
    Io {
        peer: String,
        source: std::io::Error,
    },
    /// An earlier failure left the connection unusable.
    #[error("the connection to {peer} is no longer usable ({why})")]
    Broken { peer: String, why: String },
}

impl ImapError {
    /// The server said NO or BAD: the connection itself is still good.
    pub fn is_refusal(&self) -> bool {
        matches!(self, ImapError::No { .. } | ImapError::Bad { .. })
    }
}

/// One response of a running command.
#[derive(Debug)]
pub enum Step {
    Data(Data),
    Continue(String),
    /// The tagged OK.
    Done(Done),
}

/// What a tagged OK said besides "done".
#[derive(Debug, Default, Clone)]
pub struct Done {
    pub code: Option<Code>,
}

/// A part of a command line: text as is, or a literal (sent as `{n}` and
/// then, once the server says go on, the bytes).
pub enum Part<'a> {
    Text(&'a str),
    Literal(&'a [u8]),
}

pub struct Conn {
    io: BoxIo,
    buf: BytesMut,
    framer: Framer,
    next_tag: u32,
    pub peer: String,
    /// Set by the first I/O failure: nothing more is read or written.
    broken: Option<String>,
    /// The server said BYE: the next EOF is explained by it.
    bye: Option<String>,
    /// Literals up to this size need not wait for "+" (RFC 7888); 0 when
    /// the server offers neither LITERAL+ nor LITERAL-.
    nonsync_max: usize,
    min_rtt: Option<std::time::Duration>,
    /// The connection idles: an empty buffer is read into in LEAN_READ
    /// steps (see `lean`).
    lean: bool,
}

impl Conn {
    /// `max_literal`: the largest literal held in memory (a bigger one is
    /// dropped as it arrives and reported as too large).
    pub fn new(io: BoxIo, peer: String, max_literal: u64) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            framer: Framer::new(max_literal),
            next_tag: 1,
            peer,
            broken: None,
            bye: None,
            nonsync_max: 0,
            min_rtt: None,
            lean: false,
        }
    }

    fn fail(&mut self, e: ImapError) -> ImapError {
        if self.broken.is_none() && !e.is_refusal() {
            self.broken = Some(e.to_string());
        }
        e
    }

    fn check(&self) -> Result<(), ImapError> {
        match &self.broken {
            Some(why) => Err(ImapError::Broken {
                peer: self.peer.clone(),
                why: why.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Reads the next response. Cancel-safe: bytes read stay in the buffer.
    pub async fn read(&mut self) -> Result<Response, ImapError> {
        self.check()?;
        loop {
            match self.framer.next(&mut self.buf) {
                Ok(Some(frame)) => {
                    let r = parse(&frame);
                    if let Response::Data(Data::Status {
                        status: Status::Bye,
                        text,
                        ..
                    }) = &r
                    {
                        self.bye = Some(text.clone());
                    }
                    if tracing::enabled!(tracing::Level::TRACE) {
                        trace_frame(&self.peer, &frame.bytes);
                    }
                    return Ok(r);
                }
                Ok(None) => {}
                Err(what) => {
                    let peer = self.peer.clone();
                    return Err(self.fail(ImapError::Frame { peer, what }));
                }
            }
            if self.lean && self.buf.is_empty() {
                let cap = self.buf.capacity();
                if !(MIN_LEAN_SPARE..=2 * LEAN_READ).contains(&cap) {
                    self.buf = BytesMut::with_capacity(LEAN_READ);
                }
            } else {
                self.make_room();
            }
            // One read fills at most READ_WINDOW. The layers below read
            // into the space they are handed without zeroing it first
            // (tokio-native-tls, used before, zeroed it); a layer that did
            // would zero a whole 50 MB literal's space on every read.
            let mut window = (&mut self.io).take(READ_WINDOW as u64);
            match window.read_buf(&mut self.buf).await {
                Ok(0) => {
                    let (peer, bye) = (self.peer.clone(), self.bye.clone());
                    return Err(self.fail(ImapError::Closed { peer, bye }));
                }
                Ok(_) => {}
                Err(source) => {
                    let peer = self.peer.clone();
                    return Err(self.fail(ImapError::Io { peer, source }));
                }
            }
        }
    }

    /// Gives back a large response buffer that holds nothing: after a
    /// FETCH it may be as large as the largest message, and a connection
    /// that will idle for hours needs none of it. The next read allocates
    /// afresh. Done at the end of every command, and once logged in.
    pub fn release_buffer(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 2 * MIN_READ {
            self.buf = BytesMut::new();
        }
    }

    /// Room for the next read. A buffer that must grow is replaced by one
    /// of exactly the size the frame still needs (the rest of an announced
    /// literal) plus a slack of half its line bytes (at least a read's
    /// worth): a long line grows geometrically, and a 10 MB message costs
    /// 10 MB, where growing a full buffer the usual way could double it.
    fn make_room(&mut self) {
        let len = self.buf.len();
        let grow = grown_capacity(
            len,
            self.buf.capacity(),
            self.framer.wanted(len),
            self.framer.line_bytes(len),
        );
        if let Some(cap) = grow {
            let mut fresh = BytesMut::with_capacity(cap);
            fresh.extend_from_slice(&self.buf);
            self.buf = fresh;
        }
    }

    /// Writes bytes and flushes them.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), ImapError> {
        self.check()?;
        let r = async {
            self.io.write_all(bytes).await?;
            self.io.flush().await
        }
        .await;
        r.map_err(|source| {
            let peer = self.peer.clone();
            self.fail(ImapError::Io { peer, source })
        })
    }

    /// Sends `parts` as one tagged command and reads to its completion.
    /// `what` names the command in errors (never its arguments: LOGIN's are
    /// secret). Untagged data goes to `on_data`; what it returns `Err` for
    /// fails the command once it completes (the rest is still read, so the
    /// connection stays usable).
    pub async fn run(
        &mut self,
        what: &str,
        parts: &[Part<'_>],
        mut on_data: impl FnMut(Data) -> Result<(), String>,
    ) -> Result<Done, ImapError> {
        let started = std::time::Instant::now();
        let tag = self.send(what, parts, &mut on_data).await?;
        let done = self.finish(what, &tag, on_data).await?;
        self.note_round_trip(started.elapsed());
        Ok(done)
    }

    /// A command that took `took` from its sending to its tagged reply
    /// (see `min_rtt`).
    pub fn note_round_trip(&mut self, took: std::time::Duration) {
        self.min_rtt = Some(self.min_rtt.map_or(took, |m| m.min(took)));
    }

    /// The shortest time a command took from its sending to its tagged
    /// reply: the round trip to the server, end to end (through a tunnel,
    /// a proxy or a port forward), plus the least work the server did.
    pub fn min_rtt(&self) -> Option<std::time::Duration> {
        self.min_rtt
    }

    /// Writes a tagged command; literals wait for the server's "+" unless
    /// the server's capabilities say they need not. Returns the tag.
    pub async fn send(
        &mut self,
        what: &str,
        parts: &[Part<'_>],
        on_data: &mut impl FnMut(Data) -> Result<(), String>,
    ) -> Result<String, ImapError> {
        let tag = format!("A{:04}", self.next_tag);
        self.next_tag += 1;
        let mut line = Vec::with_capacity(64);
        line.extend_from_slice(tag.as_bytes());
        line.push(b' ');
        for part in parts {
            match part {
                Part::Text(t) => line.extend_from_slice(t.as_bytes()),
                Part::Literal(bytes) => {
                    let nonsync = bytes.len() <= self.nonsync_max;
                    let plus = if nonsync { "+" } else { "" };
                    line.extend_from_slice(format!("{{{}{plus}}}\r\n", bytes.len()).as_bytes());
                    if nonsync {
                        line.extend_from_slice(bytes);
                        continue;
                    }
                    self.write(&line).await?;
                    line.clear();
                    self.wait_continue(what, &tag, on_data).await?;
                    line.extend_from_slice(bytes);
                }
            }
        }
        line.extend_from_slice(b"\r\n");
        if tracing::enabled!(tracing::Level::TRACE) {
            // Only the command's name: arguments may be credentials.
            tracing::trace!(peer = self.peer, "C: {tag} {what}");
        }
        self.write(&line).await?;
        Ok(tag)
    }

    /// Reads until a continuation request; a tagged reply first means the
    /// server refused the command before its end.
    pub async fn wait_continue(
        &mut self,
        what: &str,
        tag: &str,
        on_data: &mut impl FnMut(Data) -> Result<(), String>,
    ) -> Result<String, ImapError> {
        loop {
            match self.step(what, tag).await {
                Ok(Step::Continue(text)) => return Ok(text),
                Ok(Step::Data(d)) => {
                    let _ = on_data(d);
                }
                // A tagged OK before the "+" still means the command was
                // cut short: its end was never sent.
                Ok(Step::Done(_)) => {
                    return Err(ImapError::Bad {
                        peer: self.peer.clone(),
                        command: what.into(),
                        text: "completed before the command was sent whole".into(),
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads one response of the running command `tag`: untagged data, a
    /// continuation request, or its completion. NO, BAD and a tagged line
    /// that is no status are errors; so is every failure to read.
    pub async fn step(&mut self, what: &str, tag: &str) -> Result<Step, ImapError> {
        loop {
            match self.read().await? {
                Response::Data(d) => {
                    if let Data::Other { keyword } = &d {
                        if ROUTINE.contains(&keyword.as_str()) {
                            tracing::trace!(peer = self.peer, what, keyword, "not needed");
                        } else {
                            tracing::debug!(
                                peer = self.peer,
                                what,
                                keyword,
                                "ignoring an unknown response"
                            );
                        }
                    }
                    return Ok(Step::Data(d));
                }
                Response::Continue(text) => return Ok(Step::Continue(text)),
                Response::Tagged {
                    tag: t,
                    status,
                    code,
                    text,
                } if t == tag => return self.outcome(what, status, code, text).map(Step::Done),
                Response::Tagged { tag: t, .. } => stray(&self.peer, &t),
            }
        }
    }

    /// Reads to the tagged completion of `tag`. What `on_data` refuses
    /// fails the command once it completed (the rest is still read, so
    /// the connection stays usable).
    pub async fn finish(
        &mut self,
        what: &str,
        tag: &str,
        mut on_data: impl FnMut(Data) -> Result<(), String>,
    ) -> Result<Done, ImapError> {
        let mut refused: Option<String> = None;
        loop {
            match self.step(what, tag).await? {
                Step::Data(d) => {
                    if let Err(why) = on_data(d) {
                        refused.get_or_insert(why);
                    }
                }
                Step::Continue(text) => return Err(self.unexpected_continue(what, &text)),
                Step::Done(done) => {
                    self.release_buffer();
                    return match refused {
                        Some(why) => Err(ImapError::Protocol {
                            peer: self.peer.clone(),
                            command: what.into(),
                            why,
                        }),
                        None => Ok(done),
                    };
                }
            }
        }
    }

    /// A "+" nobody asked for: answering would be guessing, so the
    /// connection is given up.
    pub fn unexpected_continue(&mut self, what: &str, text: &str) -> ImapError {
        let peer = self.peer.clone();
        self.fail(ImapError::Protocol {
            peer,
            command: what.into(),
            why: format!("an unexpected continuation request ({text})"),
        })
    }

    fn outcome(
        &mut self,
        what: &str,
        status: Option<Status>,
        code: Option<Code>,
        text: String,
    ) -> Result<Done, ImapError> {
        let peer = self.peer.clone();
        match status {
            Some(Status::Ok) => Ok(Done { code }),
            Some(Status::No) => Err(ImapError::No {
                peer,
                command: what.into(),
                code: code.map(|c| match c {
                    Code::Other(name) => name,
                    c => format!("{c:?}"),
                }),
                text,
            }),
            _ => Err(ImapError::Bad {
                peer,
                command: what.into(),
                text,
            }),
        }
    }

    /// Gives up the stream (STARTTLS). Bytes already read after the last
    /// response are returned with it, for the caller to drop: plaintext
    /// injected before the handshake must never be read.
    pub fn into_parts(self) -> (BoxIo, BytesMut) {
        (self.io, self.buf)
    }

    /// Puts a new stream under this connection (COMPRESS): `f` gets the
    /// old one and the bytes already read past the last response.
    pub fn rewrap(&mut self, f: impl FnOnce(BoxIo, BytesMut) -> BoxIo) {
        let (placeholder, _) = tokio::io::duplex(1);
        let io = std::mem::replace(&mut self.io, Box::new(placeholder));
        let buf = std::mem::take(&mut self.buf);
        self.io = f(io, buf);
    }

    /// Which literals may go without waiting, from the server's
    /// capabilities (they can change after login).
    pub fn use_capabilities(&mut self, caps: &std::collections::HashSet<String>) {
        self.nonsync_max = nonsync_limit(caps);
    }

    /// While `on`, the connection idles: an empty response buffer is
    /// replaced by one of LEAN_READ bytes before a read, so that a
    /// connection waiting for hours holds no more than that.
    pub fn lean(&mut self, on: bool) {
        self.lean = on;
    }
}

/// The largest literal that may be sent without waiting for "+": any with
/// LITERAL+, up to 4096 bytes with LITERAL-, none otherwise.
fn nonsync_limit(caps: &std::collections::HashSet<String>) -> usize {
    if caps.contains("LITERAL+") {
        usize::MAX
    } else if caps.contains("LITERAL-") {
        LITERAL_MINUS_MAX
    } else {
        0
    }
}

/// The capacity a read buffer must be replaced with before the next read,
/// or None when it has room: `literal` is what the frame still needs of an
/// announced literal, `line_bytes` the frame's line bytes so far.
fn grown_capacity(len: usize, capacity: usize, literal: usize, line_bytes: usize) -> Option<usize> {
    let spare = capacity - len;
    if (literal == 0 && spare >= MIN_READ) || (literal > 0 && spare >= literal) {
        return None;
    }
    let slack = (line_bytes / 2).max(READ_CHUNK);
    Some(len + literal + slack)
}

fn stray(peer: &str, tag: &str) {
    tracing::debug!(
        peer,
        tag,
        "ignoring a tagged response for no command in progress"
    );
}

/// The server's bytes at trace level, literals elided: message text and
/// whatever a server echoes stay out of the log.
fn trace_frame(peer: &str, bytes: &[u8]) {
    let line_end = memchr::memchr(b'\n', bytes).map_or(bytes.len(), |i| i + 1);
    let first = String::from_utf8_lossy(&bytes[..line_end.min(200)]);
    tracing::trace!(peer, len = bytes.len(), "S: {}", first.trim_end());
}

/// An IMAP quoted string for `s` when it can be one (RFC 3501 `quoted`:
/// 7-bit, no CR, LF or NUL), else None and the caller sends a literal.
pub fn quoted(s: &str) -> Option<String> {
    if s.len() > 1000
        || s.bytes()
            .any(|b| matches!(b, 0 | b'\r' | b'\n' | 0x80..=0xff))
    {
        return None;
    }
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    Some(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_growth() {
        const MB: usize = 1 << 20;
        // (len, capacity, literal still needed, line bytes) -> new capacity
        type Row = ((usize, usize, usize, usize), Option<usize>);
        let table: &[Row] = &[
            // Room for a read: nothing to do.
            ((100, 64 * 1024, 0, 100), None),
            // A 10 MB literal announced: exactly it, plus a read's slack.
            ((40, 4096, 10 * MB, 40), Some(40 + 10 * MB + READ_CHUNK)),
            // The literal in, its closing line straddling a read: the
            // slack follows the line bytes, not the 10 MB buffered.
            (
                (10 * MB + 40, 10 * MB + 41, 0, 40),
                Some(10 * MB + 40 + READ_CHUNK),
            ),
            // A room the literal fits in: no copy.
            ((1000, 20 * MB, 10 * MB, 60), None),
            // A long line grows by half of itself.
            ((4 * MB, 4 * MB + 100, 0, 4 * MB), Some(6 * MB)),
        ];
        for &((len, cap, lit, line), want) in table {
            assert_eq!(
                grown_capacity(len, cap, lit, line),
                want,
                "{len} {cap} {lit} {line}"
            );
        }
    }

    /// An idling connection waits with a small buffer, a long response
    /// still comes whole while it idles, and out of idle an empty buffer
    /// gets a whole read's worth again.
    #[tokio::test]
    async fn an_idling_connection_reads_into_a_small_buffer() {
        use tokio::io::AsyncWriteExt as _;
        let (a, mut server) = tokio::io::duplex(1 << 20);
        let mut conn = Conn::new(Box::new(a), "test".into(), 1 << 20);
        conn.lean(true);
        server.write_all(b"* 4 EXISTS\r\n").await.unwrap();
        let r = conn.read().await.unwrap();
        assert!(matches!(r, Response::Data(Data::Exists(4))), "{r:?}");
        assert!(
            conn.buf.capacity() <= 2 * LEAN_READ,
            "{}",
            conn.buf.capacity()
        );
        let text = "x".repeat(40_000);
        let line = format!("* 1 FETCH (UID 7 BODY[] {{{}}}\r\n{text})\r\n", text.len());
        server.write_all(line.as_bytes()).await.unwrap();
        match conn.read().await.unwrap() {
            Response::Data(Data::Fetch(f)) => assert_eq!(f.uid, Some(7)),
            r => panic!("{r:?}"),
        }
        conn.lean(false);
        server.write_all(b"* 5 EXISTS\r\n").await.unwrap();
        conn.read().await.unwrap();
        assert!(conn.buf.capacity() >= MIN_READ, "{}", conn.buf.capacity());
    }

    #[test]
    fn literals_that_need_not_wait() {
        let caps = |c: &[&str]| c.iter().map(|s| s.to_string()).collect();
        assert_eq!(nonsync_limit(&caps(&["IMAP4REV1", "LITERAL+"])), usize::MAX);
        assert_eq!(nonsync_limit(&caps(&["LITERAL-"])), 4096);
        assert_eq!(nonsync_limit(&caps(&["IMAP4REV1"])), 0);
    }

    #[test]
    fn quoting() {
        assert_eq!(quoted("INBOX").as_deref(), Some("\"INBOX\""));
        assert_eq!(quoted("a\"b\\c").as_deref(), Some("\"a\\\"b\\\\c\""));
        assert_eq!(quoted("pässword"), None);
        assert_eq!(quoted("a\r\nb"), None);
    }
}
