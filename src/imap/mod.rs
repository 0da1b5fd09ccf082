//! The IMAP side: the commands a pass uses, each with its outcome.
//!
//! The client is imapull's own (see docs/design.md, "The IMAP client"):
//! [`response`] reads server bytes with no I/O, [`conn`] runs one command
//! to its tagged completion, [`connect`] reaches a logged-in session, and
//! this module holds the commands. Every one of them returns an error for a
//! NO, a BAD, a BYE, a dropped connection or a timeout; an empty result is
//! only what a tagged OK with no data says. Responses nobody asked for are
//! ignored wherever they come, and UIDs, never sequence numbers, tie a
//! FETCH to a message, so an EXPUNGE in the middle mislabels nothing.

pub mod compress;
pub mod conn;
pub mod connect;
pub mod response;
pub mod tls;
pub mod utf7;

#[cfg(test)]
mod transcripts;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

pub use self::conn::ImapError;
use self::conn::{quoted, Conn, Part, Step};
pub use self::connect::{spki_sha256, ConnectError};
pub use self::response::Fetch;
use self::response::{Code, Data};
use crate::config::{Account, Compress};
use crate::net::WireStats;
use crate::tunnel::TunnelInfo;

/// The attributes fetched for delivery. BODY.PEEK leaves `\Seen` alone: the
/// flag is stored only after the ledger has the delivery.
pub const FETCH_ITEMS: &str = "(UID RFC822.SIZE INTERNALDATE FLAGS BODY.PEEK[])";

/// A command line stays well under the 8 KB many servers accept.
const MAX_SET_LEN: usize = 4000;

/// How long LOGOUT may take: the session is over either way, and a
/// server that must wake a hibernated process to answer should not hold
/// up a stop.
const LOGOUT_WAIT: Duration = Duration::from_secs(5);

/// How long a stopping daemon waits for the reply to the DONE and LOGOUT
/// it sends an idling connection. A server that hibernated a thousand
/// sessions must wake each one to answer; the work is recorded already,
/// so the connection is dropped after this (SIGTERM stays under 2 s).
const STOP_LOGOUT_WAIT: Duration = Duration::from_millis(500);

/// A logged-in IMAP connection.
pub struct Imap {
    conn: Conn,
    /// The server's capabilities, sorted, space-separated in one string:
    /// a connection may idle for days, and one allocation holds what a set
    /// of twenty strings spread over about 1.5 KB.
    caps: Box<str>,
    pub peer: String,
    tunnel: Option<TunnelInfo>,
    /// The socket's silence limit (lengthened while idling) and byte counts.
    wire: WireStats,
    normal_limit: u64,
    compressed: bool,
    compress: Compress,
    /// The daemon will IDLE on this connection: keep it uncompressed (short
    /// of `compress = "always"`), so that the server can hibernate it.
    will_idle: bool,
    /// From the end of implicit TLS's handshake to the greeting: a round
    /// trip in which the server did no work (see `Transport::tls_done`).
    greeted_in: Option<Duration>,
    /// A SELECT or EXAMINE has been sent on this connection: from then on
    /// no command goes out beside one ([`Imap::select_discovering`]).
    selected_once: bool,
}

/// What a discovery found: the UIDs, and the sizes of those that had one.
pub type Discovery = (BTreeSet<u32>, HashMap<u32, u64>);

/// A round trip at least this long means the link is slower than a LAN,
/// where deflate pays: the server's deflate (about 14 MB/s of mail on the
/// benchmark machine, shared with the client) outruns any link under about
/// 100 Mbit/s, and mail shrinks about 3.5x. A LAN answers in well under a
/// millisecond; anything past a few milliseconds crosses a WAN.
pub const AUTO_COMPRESS_RTT: Duration = Duration::from_millis(5);

/// Below this much to fetch, COMPRESS's own round trip costs about what it
/// could save (64 KB take 50 ms at 10 Mbit/s, 15 ms compressed).
pub const AUTO_COMPRESS_BYTES: u64 = 256 << 10;

/// Whether a pass should turn COMPRESS on before fetching `bytes`.
pub fn should_compress(
    policy: Compress,
    offered: bool,
    active: bool,
    will_idle: bool,
    rtt: Option<Duration>,
    bytes: u64,
) -> bool {
    if !offered || active {
        return false;
    }
    match policy {
        Compress::Never => false,
        // Compressed at connect already, or about to be.
        Compress::Always => true,
        Compress::Passes => !will_idle,
        Compress::Auto => {
            !will_idle
                && bytes >= AUTO_COMPRESS_BYTES
                && rtt.is_some_and(|r| r >= AUTO_COMPRESS_RTT)
        }
    }
}

/// How an IDLE ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleEnd {
    /// The server reported something (EXISTS, EXPUNGE, FETCH...).
    NewData,
    /// The wait ran out: time for a catch-up pass.
    Timeout,
    /// We ended it (pull now).
    Woken,
    /// We ended it to stop: DONE and LOGOUT have been sent; the connection
    /// is over.
    Stopped,
}

/// A mailbox as LIST names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub attributes: Vec<String>,
    /// Decoded from modified UTF-7 (as sent, if it was not valid).
    pub name: String,
}

/// What SELECT tells a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selected {
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub exists: u32,
}

impl Imap {
    pub async fn connect(account: &Account) -> Result<Imap, ConnectError> {
        connect::connect(account).await
    }

    /// Why the tunnel command ended, if this is a tunnel and it has.
    pub fn tunnel_report(&self) -> impl std::future::Future<Output = Option<String>> + Send {
        let tunnel = self.tunnel.clone();
        async move {
            match tunnel {
                Some(t) => t.settled_exit_report().await,
                None => None,
            }
        }
    }

    pub fn has(&self, cap: &str) -> bool {
        self.caps.split(' ').any(|c| c == cap)
    }

    /// The daemon will IDLE on this connection.
    pub fn mark_for_idle(&mut self) {
        self.will_idle = true;
    }

    /// Before a pass fetches `bytes`: COMPRESS if the policy, the link and
    /// the amount say so ([`should_compress`]). A server that refuses it is
    /// no error: the pass goes on uncompressed.
    pub async fn compress_for(&mut self, bytes: u64) -> Result<()> {
        let judge = |me: &Self| {
            should_compress(
                me.compress,
                me.has("COMPRESS=DEFLATE"),
                me.compressed,
                me.will_idle,
                me.conn.min_rtt(),
                bytes,
            )
        };
        let mut yes = judge(self);
        // The commands timed so far (the login, SELECT, SEARCH, the sizes)
        // all make the server work, and on a large mailbox each may take a
        // few milliseconds on a LAN or loopback: before compressing a link
        // that looks slow, a round trip in which the server did no work
        // must say so too. The greeting after TLS 1.3's handshake is one;
        // without it (plain IMAP, STARTTLS, a tunnel, TLS 1.2), one NOOP
        // (which costs the server nothing) times the round trip itself. On
        // a real WAN that costs its round trip, on a pass that fetches at
        // least AUTO_COMPRESS_BYTES.
        let greeted_slowly = self.greeted_in.is_some_and(|g| g >= AUTO_COMPRESS_RTT);
        if yes && self.compress == Compress::Auto && !greeted_slowly {
            self.simple("NOOP", &[Part::Text("NOOP")]).await?;
            yes = judge(self);
        }
        let rtt = self.conn.min_rtt();
        // The measured round trip, in microseconds, either way: what `auto`
        // judged the link by; and the greeting's, if timed.
        let rtt_us = rtt.map(|r| r.as_micros());
        let greeting_us = self.greeted_in.map(|g| g.as_micros());
        if !yes {
            tracing::debug!(
                peer = self.peer,
                rtt_us,
                greeting_us,
                bytes,
                "not compressing this pass"
            );
            return Ok(());
        }
        tracing::debug!(
            peer = self.peer,
            rtt_us,
            greeting_us,
            bytes,
            "turning COMPRESS=DEFLATE on"
        );
        match self.start_compress().await {
            Err(e) if e.is_refusal() => {
                tracing::debug!(peer = self.peer, "{e}; going on uncompressed");
                Ok(())
            }
            r => Ok(r?),
        }
    }

    /// `COMPRESS DEFLATE`, and deflate from the next byte on.
    async fn start_compress(&mut self) -> Result<(), ImapError> {
        self.simple("COMPRESS", &[Part::Text("COMPRESS DEFLATE")])
            .await?;
        self.conn
            .rewrap(|io, already| Box::new(compress::Deflate::new(io, already)));
        self.compressed = true;
        tracing::debug!(peer = self.peer, "COMPRESS=DEFLATE active");
        Ok(())
    }

    /// Runs a command whose untagged data is not needed.
    async fn simple(&mut self, what: &str, parts: &[Part<'_>]) -> Result<(), ImapError> {
        self.conn.run(what, parts, |_| Ok(())).await.map(drop)
    }

    /// IDLE (RFC 2177) for at most `wait`, or until `wake` is notified.
    /// Consumes the connection and gives it back after DONE. A connection
    /// that closes while idling is an error, never a wake-up. Woken while
    /// `stop` is set, it sends DONE and LOGOUT at once and ends
    /// ([`IdleEnd::Stopped`]).
    pub async fn idle(
        mut self,
        wait: Duration,
        wake: &tokio::sync::Notify,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<(Imap, IdleEnd)> {
        let peer = self.peer.clone();
        // While idling the server may be silent up to its keepalive
        // interval: let the socket wait as long as the IDLE itself.
        self.wire.limit_ms.store(
            (wait + Duration::from_secs(60)).as_millis() as u64,
            Ordering::Relaxed,
        );
        self.conn.lean(true);
        let r = self.idle_inner(wait, wake, stop).await;
        self.conn.lean(false);
        self.wire
            .limit_ms
            .store(self.normal_limit, Ordering::Relaxed);
        let end = r.with_context(|| format!("IDLE on {peer}"))?;
        Ok((self, end))
    }

    async fn idle_inner(
        &mut self,
        wait: Duration,
        wake: &tokio::sync::Notify,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<IdleEnd> {
        let what = "IDLE";
        let mut news = false;
        let mut note = |d: Data| {
            news |= matters_while_idle(&d);
            Ok(())
        };
        let tag = self
            .conn
            .send(what, &[Part::Text("IDLE")], &mut note)
            .await?;
        self.conn.wait_continue(what, &tag, &mut note).await?;
        let end = if news {
            IdleEnd::NewData
        } else {
            let deadline = tokio::time::sleep(wait);
            let mut deadline = std::pin::pin!(deadline);
            loop {
                tokio::select! {
                    step = self.conn.step(what, &tag) => match step? {
                        Step::Data(d) if matters_while_idle(&d) => break IdleEnd::NewData,
                        Step::Data(_) => {}
                        Step::Continue(_) => {}
                        // The server ended the IDLE by itself with OK.
                        Step::Done(_) => return Ok(IdleEnd::NewData),
                    },
                    _ = &mut deadline => break IdleEnd::Timeout,
                    _ = wake.notified() => break IdleEnd::Woken,
                }
            }
        };
        if end == IdleEnd::Woken && stop.load(Ordering::SeqCst) {
            // DONE and LOGOUT in one write; the replies are waited for
            // briefly, and need not come.
            let mut ignore = |_| Ok(());
            self.conn.write(b"DONE\r\n").await?;
            let logout = self
                .conn
                .send("LOGOUT", &[Part::Text("LOGOUT")], &mut ignore)
                .await?;
            let _ = tokio::time::timeout(STOP_LOGOUT_WAIT, async {
                self.conn.finish(what, &tag, |_| Ok(())).await?;
                self.conn.finish("LOGOUT", &logout, |_| Ok(())).await
            })
            .await;
            return Ok(IdleEnd::Stopped);
        }
        self.conn.write(b"DONE\r\n").await?;
        self.conn.finish(what, &tag, |_| Ok(())).await?;
        Ok(end)
    }

    pub async fn select(&mut self, mailbox: &str) -> Result<Selected> {
        Ok(self.open("SELECT", mailbox, None).await?.0)
    }

    /// SELECT, and on a connection that has selected nothing yet, the
    /// discovery of mail from UID `from` on ([`Imap::discover`]) sent right
    /// behind it, so that both cost one round trip. The server answers
    /// the SELECT first, and runs the discovery in the mailbox it opened.
    ///
    /// Only where nothing was selected before: RFC 3501 (section 5.5)
    /// forbids sending commands together where the first changes what the
    /// next one means, and a server that ran the discovery before the
    /// SELECT would have answered it from the mailbox selected before, whose
    /// UIDs are not this one's; with nothing selected it can only refuse
    /// it. The discovery's outcome comes back as it was, a refusal
    /// included: the caller uses it only if the pass wants mail from `from`
    /// on (not when the SELECT shows nothing new, an empty mailbox, or a new
    /// UIDVALIDITY), and asks again, alone, if it was refused.
    pub async fn select_discovering(
        &mut self,
        mailbox: &str,
        from: Option<u32>,
    ) -> Result<(Selected, Option<Result<Discovery>>)> {
        let from = from.filter(|_| !self.selected_once);
        self.open("SELECT", mailbox, from).await
    }

    /// EXAMINE: SELECT read-only, for the commands that must change
    /// nothing (`verify`, `baseline`): not even `\Recent`.
    pub async fn examine(&mut self, mailbox: &str) -> Result<Selected> {
        Ok(self.open("EXAMINE", mailbox, None).await?.0)
    }

    async fn open(
        &mut self,
        verb: &'static str,
        mailbox: &str,
        discover_from: Option<u32>,
    ) -> Result<(Selected, Option<Result<Discovery>>)> {
        self.selected_once = true;
        let name = utf7::encode(mailbox);
        let q = quoted(&name);
        let arg = match &q {
            Some(q) => Part::Text(q),
            None => Part::Literal(name.as_bytes()),
        };
        let (mut exists, mut uidvalidity, mut uidnext) = (None, None, None);
        let head = format!("{verb} ");
        let on_data = |d| {
            match d {
                Data::Exists(n) => exists = Some(n),
                Data::Status {
                    code: Some(Code::UidValidity(v)),
                    ..
                } => uidvalidity = Some(v),
                Data::Status {
                    code: Some(Code::UidNext(n)),
                    ..
                } => uidnext = Some(n),
                _ => {}
            }
            Ok(())
        };
        let context = || format!("opening mailbox {mailbox:?} on {} ({verb})", self.peer);
        let (opened, discovery) = match discover_from {
            None => (
                self.conn
                    .run(verb, &[Part::Text(&head), arg], on_data)
                    .await,
                None,
            ),
            Some(from) => {
                let started = std::time::Instant::now();
                let mut ignore = |_| Ok(());
                let tag = self
                    .conn
                    .send(verb, &[Part::Text(&head), arg], &mut ignore)
                    .await
                    .with_context(context)?;
                let set = format!("{from}:*");
                let (what, parts) = discovery_command(&set);
                let behind = self.conn.send(&what, &parts, &mut ignore).await;
                let opened = self.conn.finish(verb, &tag, on_data).await;
                self.conn.note_round_trip(started.elapsed());
                // Read to its end whatever the SELECT's outcome, so that
                // the connection stays in step.
                let discovery = match behind {
                    Ok(tag) => {
                        let mut found = Discovered::default();
                        self.conn
                            .finish(&what, &tag, |d| found.take(d))
                            .await
                            .map(|_| found.into_parts())
                            .map_err(anyhow::Error::from)
                    }
                    Err(e) => Err(e.into()),
                };
                (opened, Some(discovery))
            }
        };
        opened.with_context(context)?;
        let Some(uidvalidity) = uidvalidity else {
            bail!("{} sent no UIDVALIDITY for {mailbox:?}", self.peer);
        };
        let Some(exists) = exists else {
            bail!("{} sent no EXISTS for {mailbox:?}", self.peer);
        };
        let uidnext = match uidnext {
            Some(n) => n,
            // RFC 3501 lets a server omit UIDNEXT; the highest UID + 1 is the
            // same thing for our purpose.
            None => self.search("ALL").await?.iter().max().map_or(1, |m| m + 1),
        };
        Ok((
            Selected {
                uidvalidity,
                uidnext,
                exists,
            },
            discovery,
        ))
    }

    /// `UID SEARCH query`. A NO or BAD, or a SEARCH result that does not
    /// read, is an error: never an empty set.
    pub async fn search(&mut self, query: &str) -> Result<BTreeSet<u32>> {
        let what = format!("UID SEARCH {query}");
        let mut found = BTreeSet::new();
        self.conn
            .run(
                &what,
                &[Part::Text("UID SEARCH "), Part::Text(query)],
                |d| {
                    match d {
                        Data::Search(v) => found.extend(v),
                        Data::Malformed { keyword, why } if keyword == "SEARCH" => {
                            return Err(why.to_string())
                        }
                        _ => {}
                    }
                    Ok(())
                },
            )
            .await?;
        Ok(found)
    }

    /// The messages from UID `from` on, with their sizes: what `UID SEARCH
    /// UID from:*` finds, and the sizes a pass needs before it fetches, in
    /// one round trip. Like a search, a FETCH line it cannot read fails the
    /// command (a message it missed would look absent, never new); a
    /// message without RFC822.SIZE is found, of unknown size.
    pub async fn discover(&mut self, from: u32) -> Result<Discovery> {
        let set = format!("{from}:*");
        let (what, parts) = discovery_command(&set);
        let mut found = Discovered::default();
        self.conn.run(&what, &parts, |d| found.take(d)).await?;
        Ok(found.into_parts())
    }

    /// Which of `uids` the selected mailbox still holds (a search, in
    /// batches). Servers may answer `UID n:*` with more than was asked;
    /// only the asked-for UIDs are returned.
    pub async fn which_exist(&mut self, uids: &BTreeSet<u32>) -> Result<BTreeSet<u32>> {
        let v: Vec<u32> = uids.iter().copied().collect();
        let mut found = BTreeSet::new();
        for set in uid_sets(&v) {
            found.extend(self.search(&format!("UID {set}")).await?);
        }
        found.retain(|u| uids.contains(u));
        Ok(found)
    }

    /// The sizes (RFC822.SIZE) of those of `uids` that still exist.
    pub async fn sizes(&mut self, uids: &[u32]) -> Result<HashMap<u32, u64>> {
        let mut sizes = HashMap::new();
        for set in uid_sets(uids) {
            let mut stream = self.fetch(&set, "(UID RFC822.SIZE)").await?;
            while let Some(f) = stream.next().await? {
                if let (Some(uid), Some(size)) = (f.uid, f.size) {
                    sizes.insert(uid, size);
                }
            }
        }
        Ok(sizes)
    }

    /// Starts `UID FETCH set items`; the responses are read as the caller
    /// takes them, so a large message is in memory once, and only while
    /// it is the one being read.
    pub async fn fetch(&mut self, set: &str, items: &str) -> Result<FetchStream<'_>> {
        let mut stream = FetchStream {
            conn: &mut self.conn,
            tag: None,
            what: String::new(),
            ahead: std::collections::VecDeque::new(),
        };
        stream.send_ahead(set, items).await?;
        Ok(stream)
    }

    /// Adds `\Seen` to `uids`, in batches.
    pub async fn add_seen(&mut self, uids: &[u32]) -> Result<()> {
        self.store(uids, "+FLAGS.SILENT (\\Seen)").await
    }

    /// `UID STORE` over `uids`, in batches; `what` is e.g.
    /// `+FLAGS.SILENT (\Deleted)`. Unsolicited FETCH (FLAGS) replies, which
    /// some servers send despite .SILENT, are ignored.
    pub async fn store(&mut self, uids: &[u32], what: &str) -> Result<()> {
        for set in uid_sets(uids) {
            let cmd = format!("UID STORE {set} {what}");
            self.simple(&cmd, &[Part::Text(&cmd)]).await?;
        }
        Ok(())
    }

    /// `UID EXPUNGE` (UIDPLUS) over `uids`.
    pub async fn uid_expunge(&mut self, uids: &[u32]) -> Result<()> {
        for set in uid_sets(uids) {
            let cmd = format!("UID EXPUNGE {set}");
            self.simple(&cmd, &[Part::Text(&cmd)]).await?;
        }
        Ok(())
    }

    /// Plain `EXPUNGE`: removes every message flagged `\Deleted`.
    pub async fn expunge_all_deleted(&mut self) -> Result<()> {
        Ok(self.simple("EXPUNGE", &[Part::Text("EXPUNGE")]).await?)
    }

    /// `UID MOVE` (RFC 6851) of `uids` to `target`.
    pub async fn uid_move(&mut self, uids: &[u32], target: &str) -> Result<()> {
        let target = utf7::encode(target);
        let q = quoted(&target);
        for set in uid_sets(uids) {
            let head = format!("UID MOVE {set} ");
            let arg = match &q {
                Some(q) => Part::Text(q),
                None => Part::Literal(target.as_bytes()),
            };
            self.simple("UID MOVE", &[Part::Text(&head), arg]).await?;
        }
        Ok(())
    }

    /// The mailbox carrying the `\Trash` special-use attribute (RFC 6154),
    /// by its name as a config writes it (decoded from modified UTF-7, as
    /// [`Imap::uid_move`] encodes it again).
    pub async fn trash_mailbox(&mut self) -> Result<Option<String>> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .find(|m| {
                m.attributes
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case("\\Trash"))
            })
            .map(|m| m.name))
    }

    /// Every mailbox on the server (`LIST "" "*"`), names decoded.
    pub async fn list(&mut self) -> Result<Vec<Listed>> {
        let mut found = Vec::new();
        self.conn
            .run("LIST", &[Part::Text("LIST \"\" \"*\"")], |d| {
                if let Data::List { attributes, name } = d {
                    let name = utf7::decode(&name).unwrap_or(name);
                    found.push(Listed { attributes, name });
                }
                Ok(())
            })
            .await
            .with_context(|| format!("listing the mailboxes on {}", self.peer))?;
        Ok(found)
    }

    /// Checks that the connection still answers.
    pub async fn noop(&mut self) -> Result<()> {
        Ok(self.simple("NOOP", &[Part::Text("NOOP")]).await?)
    }

    pub async fn logout(mut self) {
        let _ = tokio::time::timeout(
            LOGOUT_WAIT,
            self.conn.run("LOGOUT", &[Part::Text("LOGOUT")], |_| Ok(())),
        )
        .await;
        tracing::debug!(
            peer = self.peer,
            bytes_in = self.wire.read.load(Ordering::Relaxed),
            bytes_out = self.wire.written.load(Ordering::Relaxed),
            compressed = self.compressed,
            "IMAP session closed"
        );
    }
}

/// `UID FETCH set (UID RFC822.SIZE)`: the discovery's name and parts.
fn discovery_command(set: &str) -> (String, [Part<'_>; 3]) {
    (
        format!("UID FETCH {set} (UID RFC822.SIZE)"),
        [
            Part::Text("UID FETCH "),
            Part::Text(set),
            Part::Text(" (UID RFC822.SIZE)"),
        ],
    )
}

/// A discovery's answers as they come.
#[derive(Default)]
struct Discovered {
    found: BTreeSet<u32>,
    sizes: HashMap<u32, u64>,
}

impl Discovered {
    /// Like a search, a FETCH line that cannot be read fails the command
    /// (a message missed would look absent, never new).
    fn take(&mut self, d: Data) -> Result<(), String> {
        match d {
            // Without a UID: a flag change of another client.
            Data::Fetch(f) => {
                if let Some(uid) = f.uid {
                    self.found.insert(uid);
                    if let Some(size) = f.size {
                        self.sizes.insert(uid, size);
                    }
                }
            }
            Data::Malformed { keyword, why } if keyword == "FETCH" => return Err(why.to_string()),
            _ => {}
        }
        Ok(())
    }

    fn into_parts(self) -> Discovery {
        (self.found, self.sizes)
    }
}

/// What ends an IDLE: the mailbox changed.
fn matters_while_idle(d: &Data) -> bool {
    matches!(d, Data::Exists(_) | Data::Expunge(_) | Data::Fetch(_))
}

/// The responses of one `UID FETCH`, read as they are taken. `next`
/// returns `Ok(None)` only after the tagged OK: a NO, a BAD, a drop or a
/// timeout is an error, so "the server sent everything" and "the stream
/// stopped" are never the same value.
pub struct FetchStream<'a> {
    conn: &'a mut Conn,
    tag: Option<String>,
    what: String,
    /// Commands sent behind the one being read ([`FetchStream::send_ahead`]),
    /// with their names for errors.
    ahead: std::collections::VecDeque<(String, String)>,
}

impl FetchStream<'_> {
    /// Sends another `UID FETCH set items` now, behind the ones still being
    /// answered (RFC 3501 section 5.5 lets FETCH commands be pipelined):
    /// the stream goes on with its responses after theirs, and the server
    /// need not wait a round trip between the two. On a stream that has
    /// ended, it is the one read next.
    pub async fn send_ahead(&mut self, set: &str, items: &str) -> Result<(), ImapError> {
        let what = format!("UID FETCH {set} {items}");
        let mut ignore = |_| Ok(());
        let parts = [
            Part::Text("UID FETCH "),
            Part::Text(set),
            Part::Text(" "),
            Part::Text(items),
        ];
        let tag = self.conn.send(&what, &parts, &mut ignore).await?;
        if self.tag.is_none() {
            (self.tag, self.what) = (Some(tag), what);
        } else {
            self.ahead.push_back((tag, what));
        }
        Ok(())
    }

    /// The shortest round trip of the connection so far (see
    /// [`Conn::min_rtt`]).
    pub fn min_rtt(&self) -> Option<std::time::Duration> {
        self.conn.min_rtt()
    }

    /// The next message; None once every command sent has completed. A NO
    /// or BAD ends the stream with its error, after the commands sent
    /// ahead of it are read to their end too (the connection stays
    /// usable; their messages are not returned).
    pub async fn next(&mut self) -> Result<Option<Fetch>, ImapError> {
        let result = self.next_of_any().await;
        if let Err(e) = &result {
            if e.is_refusal() {
                while let Some((tag, what)) = self.ahead.pop_front() {
                    let _ = self.conn.finish(&what, &tag, |_| Ok(())).await;
                }
            }
            self.ahead.clear();
        }
        result
    }

    async fn next_of_any(&mut self) -> Result<Option<Fetch>, ImapError> {
        loop {
            let Some(tag) = self.tag.clone() else {
                return Ok(None);
            };
            let Some(f) = self.next_of(&tag).await? else {
                (self.tag, self.what) = match self.ahead.pop_front() {
                    Some((t, w)) => (Some(t), w),
                    None => (None, std::mem::take(&mut self.what)),
                };
                continue;
            };
            return Ok(Some(f));
        }
    }

    /// The next message of the command `tag`; None at its tagged OK.
    async fn next_of(&mut self, tag: &str) -> Result<Option<Fetch>, ImapError> {
        loop {
            match self.conn.step(&self.what, tag).await {
                Ok(Step::Data(Data::Fetch(f))) => return Ok(Some(f)),
                Ok(Step::Data(Data::Malformed { keyword, why })) => {
                    // Its message, if it was one of ours, is missing from
                    // the results, which the pass checks.
                    tracing::warn!(
                        peer = self.conn.peer,
                        keyword,
                        why,
                        "ignoring an unreadable response"
                    );
                }
                Ok(Step::Data(_)) => {}
                Ok(Step::Continue(text)) => {
                    self.tag = None;
                    return Err(self.conn.unexpected_continue(&self.what, &text));
                }
                Ok(Step::Done(_)) => return Ok(None),
                Err(e) => {
                    self.tag = None;
                    return Err(e);
                }
            }
        }
    }
}

/// Splits `uids` (in their order) into runs of at most `max_bytes` by
/// `sizes`; a message bigger than that is a run of its own, and one of
/// unknown size counts as nothing (it is gone, or the FETCH says so).
pub fn byte_batches(uids: &[u32], sizes: &HashMap<u32, u64>, max_bytes: u64) -> Vec<Vec<u32>> {
    let mut batches: Vec<Vec<u32>> = Vec::new();
    let mut bytes = 0u64;
    for &uid in uids {
        let size = sizes.get(&uid).copied().unwrap_or(0);
        match batches.last_mut() {
            Some(b) if bytes + size <= max_bytes => {
                b.push(uid);
                bytes += size;
            }
            _ => {
                batches.push(vec![uid]);
                bytes = size;
            }
        }
    }
    batches
}

/// Sorted UIDs as IMAP sequence sets ("1:4,7,9:12"), each short enough for
/// one command line.
pub fn uid_sets(uids: &[u32]) -> Vec<String> {
    uid_sets_split(uids)
        .into_iter()
        .map(|(set, _)| set)
        .collect()
}

/// [`uid_sets`], each with the UIDs it names, sorted.
pub fn uid_sets_split(uids: &[u32]) -> Vec<(String, Vec<u32>)> {
    let mut sorted: Vec<u32> = uids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut sets = Vec::new();
    let (mut cur, mut first) = (String::new(), 0);
    let mut i = 0;
    while i < sorted.len() {
        let at = i;
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        i += 1;
        let piece = if start == end {
            start.to_string()
        } else {
            format!("{start}:{end}")
        };
        if !cur.is_empty() && cur.len() + piece.len() + 1 > MAX_SET_LEN {
            sets.push((std::mem::take(&mut cur), sorted[first..at].to_vec()));
            first = at;
        }
        if !cur.is_empty() {
            cur.push(',');
        }
        cur.push_str(&piece);
    }
    if !cur.is_empty() {
        sets.push((cur, sorted[first..].to_vec()));
    }
    sets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets() {
        assert_eq!(uid_sets(&[]), Vec::<String>::new());
        assert_eq!(uid_sets(&[3, 1, 2, 7, 9, 10, 9]), vec!["1:3,7,9:10"]);
        let many: Vec<u32> = (0..5000).map(|i| i * 2).collect();
        let sets = uid_sets(&many);
        assert!(sets.len() > 1);
        assert!(sets.iter().all(|s| s.len() <= MAX_SET_LEN));
        let back: Vec<u32> = sets
            .iter()
            .flat_map(|s| s.split(','))
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(back, many);
        // Each set with the UIDs it names.
        let split = uid_sets_split(&many);
        assert_eq!(
            split.iter().map(|(s, _)| s).collect::<Vec<_>>(),
            sets.iter().collect::<Vec<_>>()
        );
        for (set, uids) in &split {
            let named: Vec<u32> = set.split(',').map(|p| p.parse().unwrap()).collect();
            assert_eq!(&named, uids);
        }
        assert_eq!(
            uid_sets_split(&[5, 3, 4, 9, 3]),
            vec![("3:5,9".to_string(), vec![3, 4, 5, 9])]
        );
    }

    #[test]
    fn when_to_compress() {
        use Compress::*;
        let slow = Some(Duration::from_millis(40));
        let lan = Some(Duration::from_micros(300));
        let mb = 10 << 20;
        // (policy, offered, active, will_idle, rtt, bytes) -> compress?
        let table = [
            ((Auto, true, false, false, slow, mb), true),
            ((Auto, true, false, false, lan, mb), false),
            ((Auto, true, false, false, None, mb), false),
            ((Auto, true, false, false, slow, 10_000), false),
            ((Auto, true, false, true, slow, mb), false),
            ((Auto, false, false, false, slow, mb), false),
            ((Auto, true, true, false, slow, mb), false),
            ((Passes, true, false, false, lan, 0), true),
            ((Passes, true, false, true, slow, mb), false),
            ((Never, true, false, false, slow, mb), false),
            ((Always, true, false, true, lan, 0), true),
            ((Always, true, true, true, lan, 0), false),
        ];
        for ((p, o, a, i, r, b), want) in table {
            assert_eq!(
                should_compress(p, o, a, i, r, b),
                want,
                "{p:?} {o} {a} {i} {r:?} {b}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn byte_batches_keep_order_and_stay_under_the_limit(
            sizes in proptest::collection::vec(0u64..3000, 0..60),
            max in 1u64..5000,
        ) {
            let uids: Vec<u32> = (1..=sizes.len() as u32).rev().collect();
            let by_uid: HashMap<u32, u64> = uids.iter().copied().zip(sizes.iter().copied()).collect();
            let batches = byte_batches(&uids, &by_uid, max);
            proptest::prop_assert_eq!(batches.concat(), uids.clone());
            for b in &batches {
                proptest::prop_assert!(!b.is_empty());
                let bytes: u64 = b.iter().map(|u| by_uid[u]).sum();
                proptest::prop_assert!(bytes <= max || b.len() == 1, "{:?} has {} bytes", b, bytes);
            }
            // Greedy: no batch could have taken the next one's first message.
            for w in batches.windows(2) {
                let bytes: u64 = w[0].iter().map(|u| by_uid[u]).sum();
                proptest::prop_assert!(bytes + by_uid[&w[1][0]] > max);
            }
        }
    }
}
