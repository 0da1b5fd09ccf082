//! The middle of a pass: the plan's messages fetched, delivered and
//! recorded, one ledger write per message.
//!
//! The FETCH stream ([`feed_all`]) fills a bounded channel and the delivery
//! sessions ([`session_worker`]) drain it, so fetching overlaps delivering,
//! and memory holds a few messages, at most about [`IN_FLIGHT_BYTES`] plus
//! the largest, whatever the size of the mailbox. Messages are accepted one
//! at a time, in UID order: each one's final "." waits for its [`Turn`],
//! passed when the message before has its outcome committed and fsynced,
//! while its body is already on the wire. With `independent_sessions`, the
//! turns run per session instead: each session's messages are accepted in
//! order, one at a time, and the sessions accept theirs side by side.

use std::collections::HashMap;

use anyhow::{anyhow, Context as _, Result};
use futures_util::FutureExt as _;

use super::{Ctx, PassReport};
use crate::config::{Account, SenderPolicy};
use crate::deliver::client::{no_barrier, Barrier};
use crate::deliver::{headers, Deliverer, Delivery, Envelope, Outcome, Sessions, Upcoming};
use crate::imap::{byte_batches, uid_sets_split, Fetch, Imap, FETCH_ITEMS};
use crate::ledger::{Attempt, Durability, Epoch, LedgerFailure, State, GROUP_MAX_AGE};

/// Messages fetched and waiting for a delivery session, besides one per
/// session. Two keep the sessions busy while the next message arrives;
/// more would only cost memory.
pub const PIPELINE_DEPTH: usize = 2;

/// Bytes of fetched messages waiting for or in delivery, over all sessions.
/// A bigger message takes the whole budget and so goes alone: memory stays
/// near this plus the largest message, however many sessions there are.
pub const IN_FLIGHT_BYTES: usize = 8 << 20;

/// Bytes of fetched messages waiting for or in delivery over every pass of
/// the process (the accounts of a run, the daemon's mailboxes): many
/// accounts at once hold about this much mail whatever their number.
pub const PROCESS_IN_FLIGHT_BYTES: usize = 32 << 20;

/// The process's share of [`PROCESS_IN_FLIGHT_BYTES`].
fn process_budget() -> std::sync::Arc<tokio::sync::Semaphore> {
    static BUDGET: std::sync::OnceLock<std::sync::Arc<tokio::sync::Semaphore>> =
        std::sync::OnceLock::new();
    BUDGET
        .get_or_init(|| std::sync::Arc::new(tokio::sync::Semaphore::new(PROCESS_IN_FLIGHT_BYTES)))
        .clone()
}

/// A message's record is made while the next message's body goes out
/// ([`Unrecorded`]) when that body has at most this many bytes (one or two
/// writes, which a local server takes at once). A bigger one is sent
/// after the record: the message before would otherwise stay accepted and
/// not recorded for as long as that body is on the wire.
const RECORD_BEHIND_MAX: usize = 64 << 10;

/// Bytes asked for in one UID FETCH (a bigger message goes alone).
pub const FETCH_BATCH_BYTES: u64 = 16 << 20;

/// What the fetch and the deliveries did.
pub struct Run {
    /// UIDs whose outcome is recorded, sorted.
    pub attempted: Vec<u32>,
    /// Delivered, `\Seen` to be stored (with `mark_seen`).
    pub to_flag: Vec<u32>,
    /// Delivery stopped before the end (deferrals in a row, a signal).
    pub stopped_early: bool,
    /// The FETCH failed part-way (NO, BAD, a drop): the pass is an error.
    pub fetch_error: Option<anyhow::Error>,
}

/// A fetched message and its shares of [`IN_FLIGHT_BYTES`] and of
/// [`PROCESS_IN_FLIGHT_BYTES`], released when its delivery is over.
type InFlight = (
    Fetch,
    (
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::OwnedSemaphorePermit,
    ),
);

/// The fetch side's end of the pipeline.
struct Feed {
    tx: tokio::sync::mpsc::Sender<InFlight>,
    budget: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Feed {
    /// Hands a message of `len` bytes to the sessions once the budget has
    /// room; false when delivery has stopped.
    async fn hand_over(&self, f: Fetch, len: usize) -> bool {
        let share = len.clamp(1, IN_FLIGHT_BYTES) as u32;
        // The pass's own budget first, then the process's: a pass never
        // holds the process's share while it waits for its own.
        let pass = self
            .budget
            .clone()
            .acquire_many_owned(share)
            .await
            .expect("the semaphore is never closed");
        let process = process_budget()
            .acquire_many_owned(share)
            .await
            .expect("the semaphore is never closed");
        self.tx.send((f, (pass, process))).await.is_ok()
    }
}

/// What the delivery sessions take messages from, in UID order, and the
/// order in which they may complete.
struct Queue {
    rx: tokio::sync::mpsc::Receiver<InFlight>,
    /// Passed when the message taken last has its outcome recorded and
    /// fsynced: the next message's final "." waits for it. So however many
    /// sessions there are, at most one message at a time is between the
    /// local server's acceptance and a durable ledger row (the duplicate
    /// window of DESIGN.md), and messages are accepted in UID order. Not
    /// used with `independent_sessions`: each session keeps its own.
    last: Barrier,
}

/// What a pass's sessions share.
struct Shared<'a> {
    ctx: &'a Ctx<'a>,
    ledger: &'a Epoch,
    /// Who already has each deferred message.
    already: &'a HashMap<u32, Vec<String>>,
    queue: tokio::sync::Mutex<Queue>,
    tally: std::sync::Mutex<Tally>,
    /// The progress bar, once the fetch side knows the sizes (a long pass
    /// of `imapull run` on a terminal only).
    bar: std::sync::OnceLock<crate::progress::Bar>,
    /// One delivery session, or independent ones: a session takes the
    /// next message early, to send its envelope right after this one's "."
    /// ([`Upcoming`]). With more in turn, each takes a message only when it
    /// is free.
    look_ahead: bool,
    /// `independent_sessions` with more than one session: a message's turn
    /// follows the one its own session delivered before.
    independent: bool,
}

/// What the sessions did, shared between them.
#[derive(Default)]
struct Tally {
    /// Sorted once the pass is over.
    attempted: Vec<u32>,
    to_flag: Vec<u32>,
    delivered: u32,
    rejected: u32,
    deferred: u32,
    consecutive_deferrals: u32,
    stopped: bool,
}

impl Tally {
    /// Counts one outcome; true when it makes `max_deferrals` in a row.
    fn count(&mut self, uid: u32, outcome: Outcome, account: &Account) -> bool {
        self.attempted.push(uid);
        match outcome {
            Outcome::Delivered => {
                self.delivered += 1;
                self.consecutive_deferrals = 0;
                if account.mark_seen {
                    self.to_flag.push(uid);
                }
                false
            }
            Outcome::Rejected => {
                self.rejected += 1;
                self.consecutive_deferrals = 0;
                false
            }
            Outcome::Deferred => {
                self.deferred += 1;
                self.consecutive_deferrals += 1;
                self.consecutive_deferrals >= account.max_deferrals && !self.stopped
            }
        }
    }
}

/// Fetches the messages of `groups` (in that order; with the sizes known
/// already) and delivers and records each. An `Err` is a ledger failure, which stops everything; an
/// IMAP failure comes back in [`Run::fetch_error`], after what was fetched
/// before it is delivered and recorded.
pub async fn run(
    ctx: &Ctx<'_>,
    imap: &mut Imap,
    sessions: &mut Sessions,
    ledger: &Epoch,
    (groups, sizes): (&[&[u32]], HashMap<u32, u64>),
    already: &HashMap<u32, Vec<String>>,
    report: &mut PassReport,
) -> Result<Run> {
    let (tx, rx) = tokio::sync::mpsc::channel::<InFlight>(sessions.0.len() + PIPELINE_DEPTH);
    let independent = ctx.account.independent_sessions && sessions.0.len() > 1;
    let feed = Feed {
        tx,
        budget: std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_BYTES)),
    };
    let shared = Shared {
        ctx,
        ledger,
        already,
        queue: tokio::sync::Mutex::new(Queue {
            rx,
            last: no_barrier(),
        }),
        tally: std::sync::Mutex::new(Tally::default()),
        bar: std::sync::OnceLock::new(),
        look_ahead: sessions.0.len() == 1 || independent,
        independent,
    };
    let (done, mut finished) = tokio::sync::watch::channel(false);
    let (fetched, delivered, ()) = tokio::join!(
        feed_all(ctx.account, imap, (groups, sizes), feed, &shared),
        async {
            let t = drain(&shared, sessions).await;
            let _ = done.send(true);
            t
        },
        // durability = "grouped": commits that waited GROUP_MAX_AGE are
        // fsynced even while the next message is slow to come.
        async {
            if ctx.account.durability != Durability::Grouped {
                return;
            }
            loop {
                tokio::select! {
                    _ = finished.changed() => return,
                    _ = tokio::time::sleep(GROUP_MAX_AGE / 2) => {
                        if let Err(e) = ledger.handle().sync_due().await {
                            // The end of the pass syncs again and fails.
                            tracing::warn!("syncing the ledger: {e:#}");
                        }
                    }
                }
            }
        }
    );
    let t = delivered?;
    report.delivered += t.delivered;
    report.rejected += t.rejected;
    report.deferred += t.deferred;
    Ok(Run {
        attempted: t.attempted,
        to_flag: t.to_flag,
        stopped_early: t.stopped,
        fetch_error: fetched.err(),
    })
}

/// The fetch side: the sizes not known yet first (for the batches, the
/// size limit and COMPRESS), then the bodies, batch by batch.
async fn feed_all(
    account: &Account,
    imap: &mut Imap,
    (groups, known): (&[&[u32]], HashMap<u32, u64>),
    feed: Feed,
    shared: &Shared<'_>,
) -> Result<()> {
    // Sorted: a few bytes a message, looked up by binary search (a first
    // pull may ask for hundreds of thousands).
    let mut wanted: Vec<u32> = groups.iter().flat_map(|g| g.iter().copied()).collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut sizes = known;
    sizes.retain(|u, _| wanted.binary_search(u).is_ok());
    // One message is one batch whatever its size: no need to ask (the
    // daemon's usual case, a round trip saved). The new messages' sizes
    // came with their discovery; those to retry are asked for.
    let unknown: Vec<u32> = wanted
        .iter()
        .copied()
        .filter(|u| !sizes.contains_key(u))
        .collect();
    if wanted.len() > 1 && !unknown.is_empty() {
        sizes.extend(imap.sizes(&unknown).await?);
    }
    let max = account.max_message_size;
    // COMPRESS, if the link is slow and this much pays for it.
    let bytes: u64 = sizes.values().filter(|s| **s <= max).sum();
    imap.compress_for(bytes).await?;
    if let Some(bar) = crate::progress::start(shared.ledger.mailbox(), wanted.len(), bytes) {
        let _ = shared.bar.set(bar);
    }
    // Too large by RFC822.SIZE: recorded as rejected, never fetched. (One
    // without a known size is caught by the literal's announced size.)
    let too_large: std::collections::BTreeMap<u32, u64> = sizes
        .iter()
        .filter(|(_, s)| **s > max)
        .map(|(u, s)| (*u, *s))
        .collect();
    for (&uid, &size) in &too_large {
        if !feed.hand_over(Fetch::too_large(uid, size), 0).await {
            return Ok(());
        }
    }
    // Commands of about FETCH_BATCH_BYTES: when delivery stops early (the
    // local server is down, a signal), only the rest of the current one
    // (and of one sent ahead) is still downloaded, not the whole mailbox.
    let commands: Vec<Command> = groups
        .iter()
        .flat_map(|g| byte_batches(g, &sizes, FETCH_BATCH_BYTES))
        .flat_map(|b| {
            let b: Vec<u32> = b
                .into_iter()
                .filter(|u| !too_large.contains_key(u))
                .collect();
            commands(&b, &sizes)
        })
        .collect();
    drop(sizes);
    feed_commands(imap, &commands, &wanted, &feed).await
}

/// One UID FETCH to send: its set, and the bytes it asks for by
/// RFC822.SIZE.
struct Command {
    set: String,
    bytes: u64,
    messages: usize,
}

/// The commands that fetch `uids`, each a set short enough for one line.
fn commands(uids: &[u32], sizes: &HashMap<u32, u64>) -> Vec<Command> {
    uid_sets_split(uids)
        .into_iter()
        .map(|(set, uids)| Command {
            set,
            bytes: uids.iter().filter_map(|u| sizes.get(u)).sum(),
            messages: uids.len(),
        })
        .collect()
}

/// Bytes still to come, below which the next FETCH goes out ahead: what the
/// link carries in this many round trips. One would do if the rate were
/// even, but it is judged only as each message arrives, and a batch whose
/// last messages are text (which deflates two or three times as much as
/// the attachments before them) comes sooner than the average rate says:
/// with two, the link still idled 10–45 ms at most batches' ends.
const AHEAD_ROUND_TRIPS: u32 = 4;

/// Links whose round trip is shorter than this are not worth sending a
/// FETCH ahead for: waiting for one costs less than a millisecond or two.
const AHEAD_MIN_RTT: std::time::Duration = std::time::Duration::from_millis(2);

/// Whether the next FETCH should go out now: once fewer bytes are still
/// to come than the link carries in [`AHEAD_ROUND_TRIPS`] at the rate seen
/// so far (`received` in `elapsed`), or one message only (whose size is
/// known only whole).
fn ahead_due(
    outstanding: u64,
    messages: usize,
    received: u64,
    elapsed: std::time::Duration,
    rtt: std::time::Duration,
) -> bool {
    let rate = received as f64 / elapsed.as_secs_f64().max(1e-3);
    let ahead = rate * (rtt * AHEAD_ROUND_TRIPS).as_secs_f64();
    (outstanding as f64) < ahead || messages <= 1
}

/// The UID FETCHes of `commands`, their messages handed over as they come.
/// On a link with a long round trip the next command is sent while the
/// current one's last bytes are still on their way (about
/// [`AHEAD_ROUND_TRIPS`] of them, or its last message, however large), so
/// the link does not idle between commands. Once delivery has stopped, no new command is sent, and the
/// rest of those sent is still read, so the connection stays usable.
async fn feed_commands(
    imap: &mut Imap,
    commands: &[Command],
    wanted: &[u32],
    feed: &Feed,
) -> Result<()> {
    let mut commands = commands.iter();
    let Some(first) = commands.next() else {
        return Ok(());
    };
    let peer = imap.peer.clone();
    let context = || format!("UID FETCH from {peer}");
    // Bytes asked for and not received yet, and the rate they come at
    // since the first command went out (which counts its round trip, and
    // any wait for delivery: an estimate on the low side, which sends the
    // next command late rather than early).
    let since = std::time::Instant::now();
    let mut stream = imap.fetch(&first.set, FETCH_ITEMS).await?;
    let rtt = stream.min_rtt().filter(|r| *r >= AHEAD_MIN_RTT);
    let mut asked = Asked {
        bytes: first.bytes,
        messages: first.messages,
    };
    let mut received = 0u64;
    let mut receiver_gone = false;
    loop {
        // No timeout around a whole item: the socket's idle timeout bounds
        // silence, and a big message may take long on a slow link. The
        // stream ends only with the tagged OK; NO, BAD or a drop is an
        // error.
        let Some(f) = stream.next().await.with_context(context)? else {
            // Every command sent is done (what did not come is gone):
            // the next one, if any is left and delivery goes on.
            asked = Asked::default();
            if receiver_gone
                || !asked
                    .send_next(&mut stream, &mut commands)
                    .await
                    .with_context(context)?
            {
                return Ok(());
            }
            continue;
        };
        // Unsolicited FETCHes (another client's flag change) carry no
        // body; they are not ours.
        let ours = f.uid.is_some_and(|u| wanted.binary_search(&u).is_ok());
        let len = match (f.body(), f.body_too_large()) {
            (Some(b), _) => b.len(),
            (None, Some(_)) => 0,
            (None, None) => continue,
        };
        if !ours {
            continue;
        }
        asked.came(f.size.unwrap_or(len as u64).max(len as u64));
        received += len as u64;
        if !receiver_gone {
            receiver_gone = !feed.hand_over(f, len).await;
        }
        let Some(rtt) = rtt.filter(|_| !receiver_gone) else {
            continue;
        };
        if ahead_due(asked.bytes, asked.messages, received, since.elapsed(), rtt) {
            let (bytes, messages) = (asked.bytes, asked.messages);
            if asked
                .send_next(&mut stream, &mut commands)
                .await
                .with_context(context)?
            {
                tracing::debug!(peer, bytes, messages, "the next UID FETCH goes out ahead");
            }
        }
    }
}

/// What the UID FETCHes sent and not yet done still ask for.
#[derive(Default)]
struct Asked {
    bytes: u64,
    messages: usize,
}

impl Asked {
    /// A message of `size` bytes came.
    fn came(&mut self, size: u64) {
        self.bytes = self.bytes.saturating_sub(size);
        self.messages = self.messages.saturating_sub(1);
    }

    /// Sends the next of `commands` behind those still answered; false
    /// when none is left.
    async fn send_next(
        &mut self,
        stream: &mut crate::imap::FetchStream<'_>,
        commands: &mut std::slice::Iter<'_, Command>,
    ) -> Result<bool, crate::imap::ImapError> {
        let Some(c) = commands.next() else {
            return Ok(false);
        };
        stream.send_ahead(&c.set, FETCH_ITEMS).await?;
        self.bytes += c.bytes;
        self.messages += c.messages;
        Ok(true)
    }
}

/// The delivery side: every session's worker until the queue is empty or
/// delivery stops; then the last record's fsync, before anything else
/// (flags, the watermark) may follow.
async fn drain(shared: &Shared<'_>, sessions: &mut Sessions) -> Result<Tally> {
    let mut own: Vec<Barrier> = sessions.0.iter().map(|_| no_barrier()).collect();
    let workers = sessions
        .0
        .iter_mut()
        .zip(own.iter_mut())
        .map(|(d, own)| session_worker(shared, d, own));
    let results = futures_util::future::join_all(workers).await;
    // Dropping the receiver tells the fetch side to stop sending.
    let last = {
        let mut q = shared.queue.lock().await;
        q.rx.close();
        while q.rx.try_recv().is_ok() {}
        std::mem::replace(&mut q.last, no_barrier())
    };
    let mut synced = last.await;
    for own in own {
        synced = synced.and(own.await);
    }
    let mut t = std::mem::take(&mut *tally_of(&shared.tally));
    t.attempted.sort_unstable();
    // A ledger failure is fatal: nothing more may be delivered unrecorded.
    results.into_iter().collect::<Result<Vec<()>>>()?;
    synced
        .map_err(|e| anyhow!("syncing the ledger: {e}"))
        .map_err(|e| e.context(LedgerFailure))?;
    // What durability = "grouped" left unsynced, before anything changes
    // on the server (flags, expunges) and before the pass ends.
    shared
        .ledger
        .handle()
        .sync()
        .await
        .context("syncing the ledger at the end of the pass")?;
    Ok(t)
}

/// A message taken from the queue, with its turn and its transaction.
type Taken = (InFlight, Turn, Prepared);

/// One delivery session's loop: take the next message, deliver it (its
/// final "." waiting for the previous message's turn), record it, and hand
/// the turn on once the record is on disk. With one session, the message
/// after it is taken as soon as it is fetched, so that its envelope goes
/// out with this one's "."; its own "." still waits for its turn, and this
/// message's record is made while that body goes out ([`Unrecorded`]).
/// `own` is the turn of this session's last message, which the next one
/// follows when the sessions are independent.
async fn session_worker(
    shared: &Shared<'_>,
    deliverer: &mut Deliverer,
    own: &mut Barrier,
) -> Result<()> {
    let (ctx, mailbox) = (shared.ctx, shared.ledger.mailbox());
    let mut own = shared.independent.then_some(own);
    let mut ahead: Option<Taken> = None;
    // The last message's record, when the message after it was taken
    // ahead: made in that message's barrier, and finished here whatever
    // becomes of it, before the worker takes another or stops.
    let mut unrecorded: Option<Unrecorded> = None;
    loop {
        if tally_of(&shared.tally).stopped {
            Unrecorded::finish(unrecorded.take()).await?;
            // A message taken ahead and not delivered lets the rest go.
            if let Some((_, turn, _)) = ahead.take() {
                turn.pass_on()(Ok(()));
            }
            return Ok(());
        }
        let taken = match ahead.take() {
            Some(t) => Some(t),
            None => {
                Unrecorded::finish(unrecorded.take()).await?;
                next_turn(&shared.queue, &mut own)
                    .await
                    .map(|(item, turn)| prepared(shared, item, turn))
            }
        };
        let Some(((f, _permit), turn, this)) = taken else {
            return Ok(());
        };
        if ctx.stopping() || tally_of(&shared.tally).stopped {
            Unrecorded::finish(unrecorded.take()).await?;
            let mut t = tally_of(&shared.tally);
            if !t.stopped && ctx.stopping() {
                tracing::info!(mailbox, "stopping: the rest waits for the next start");
            }
            t.stopped = true;
            turn.pass_on()(Ok(()));
            return Ok(());
        }
        if shared.look_ahead {
            ahead = try_next_turn(&shared.queue, &mut own)
                .map(|(item, turn)| prepared(shared, item, turn));
        }
        let next = ahead
            .as_ref()
            .filter(|((nf, _), _, _)| nf.body_too_large().is_none())
            .map(|((nf, _), _, p)| Upcoming {
                env: &p.env,
                prefix: &p.prefix,
                msg: nf.body().unwrap_or_default(),
            });
        // This message's record waits for the next one's body only if that
        // is small ([`RECORD_BEHIND_MAX`]).
        let record_behind = next.is_some_and(|n| n.prefix.len() + n.msg.len() <= RECORD_BEHIND_MAX);
        // On an error the turn is dropped: the next message's barrier
        // fails and it is not completed either; the other sessions take
        // no new message.
        let delivered =
            deliver_one(shared, deliverer, &f, turn, this, next, unrecorded.as_ref()).await;
        // The record before this one, made in this message's barrier or
        // now: a failure of either is the ledger's, and ends the pass.
        let before = Unrecorded::finish(unrecorded.take()).await;
        let (outcome, record) = match before.and(delivered) {
            Ok(o) => o,
            Err(e) => {
                tally_of(&shared.tally).stopped = true;
                return Err(e);
            }
        };
        let uid = f.uid.expect("checked by the fetch side");
        if let Some(bar) = shared.bar.get() {
            bar.advance(f.body().map_or(0, |b| b.len() as u64));
        }
        let stop = {
            let mut t = tally_of(&shared.tally);
            let stop = t.count(uid, outcome, ctx.account);
            if stop {
                tracing::warn!(
                    mailbox,
                    "{} deliveries in a row deferred by {}; \
                     stopping this pass, the rest stays on the server",
                    t.consecutive_deferrals,
                    deliverer.target()
                );
                t.stopped = true;
            }
            stop
        };
        let record = Unrecorded::new(shared, record);
        if record_behind && !stop {
            unrecorded = Some(record);
        } else {
            Unrecorded::finish(Some(record)).await?;
        }
    }
}

fn prepared(shared: &Shared<'_>, item: InFlight, turn: Turn) -> Taken {
    let p = prepare(shared, &item.0);
    (item, turn, p)
}

/// The next message and its turn, or None once the fetch side is done.
/// The turn follows `own` (an independent session's last) or else the
/// message any session took last.
async fn next_turn(
    queue: &tokio::sync::Mutex<Queue>,
    own: &mut Option<&mut Barrier>,
) -> Option<(InFlight, Turn)> {
    let mut q = queue.lock().await;
    let item = q.rx.recv().await?;
    Some((item, take_turn(own.as_deref_mut().unwrap_or(&mut q.last))))
}

/// The next message and its turn if it is fetched already (and no other
/// session is taking one now).
fn try_next_turn(
    queue: &tokio::sync::Mutex<Queue>,
    own: &mut Option<&mut Barrier>,
) -> Option<(InFlight, Turn)> {
    let mut q = queue.try_lock().ok()?;
    let item = q.rx.try_recv().ok()?;
    Some((item, take_turn(own.as_deref_mut().unwrap_or(&mut q.last))))
}

/// The turn of the message just taken: after the one taken before it
/// (`last`, which it replaces).
fn take_turn(last: &mut Barrier) -> Turn {
    let (done, turn) = tokio::sync::oneshot::channel();
    let next = async move {
        turn.await
            .unwrap_or_else(|_| Err("the previous delivery did not finish".into()))
    }
    .boxed()
    .shared();
    let prev = std::mem::replace(last, next);
    Turn { prev, done }
}

/// The tally, also after a panic elsewhere (it is only counters).
fn tally_of(t: &std::sync::Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// A message's place in the order of acceptance: what its final "." waits
/// for, and how it lets the next message go.
struct Turn {
    prev: Barrier,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

impl Turn {
    /// What to do once this message's ledger row is on disk (or could not
    /// get there): let the next message go, as soon as the previous one
    /// has too. Runs on the ledger's thread, which wakes the next message
    /// directly when, as usual, the previous one is long done.
    fn pass_on(self) -> impl FnOnce(Result<()>) + Send + 'static {
        let Turn { prev, done } = self;
        let runtime = tokio::runtime::Handle::current();
        move |synced: Result<()>| {
            let synced = synced.map_err(|e| format!("{e:#}"));
            match prev.peek().cloned() {
                Some(r) => {
                    let _ = done.send(r.and(synced));
                }
                None => {
                    runtime.spawn(async move {
                        let r = prev.await;
                        let _ = done.send(r.and(synced));
                    });
                }
            }
        }
    }
}

/// A message's transaction, decided once (also when it is taken ahead):
/// who is still to get it, and the trace header.
struct Prepared {
    env: Envelope,
    prefix: Vec<u8>,
    now: i64,
}

fn prepare(shared: &Shared<'_>, f: &Fetch) -> Prepared {
    let (a, ledger) = (shared.ctx.account, shared.ledger);
    let uid = f.uid.expect("checked by the fetch side");
    let body = f.body().unwrap_or_default();
    let done: &[String] = shared.already.get(&uid).map(Vec::as_slice).unwrap_or(&[]);
    let now = (shared.ctx.now)();
    let prefix = if a.add_received && f.body_too_large().is_none() {
        received_header(a, ledger.mailbox(), ledger.uidvalidity(), uid, now)
    } else {
        Vec::new()
    };
    Prepared {
        env: envelope(a, body, done),
        prefix,
        now,
    }
}

/// Delivers one message; returns its outcome and its record, to be made
/// by the caller ([`Unrecorded`]). `before`, the previous message's record
/// when it is not made yet, is made in this message's barrier: once its
/// body is written, before its final ".".
async fn deliver_one(
    shared: &Shared<'_>,
    deliverer: &mut Deliverer,
    f: &Fetch,
    turn: Turn,
    this: Prepared,
    next: Option<Upcoming<'_>>,
    before: Option<&Unrecorded>,
) -> Result<(Outcome, Record)> {
    let (a, ledger) = (shared.ctx.account, shared.ledger);
    let uid = f.uid.expect("checked by the fetch side");
    // Empty for a message over max_message_size, which is not sent.
    let body = f.body().unwrap_or_default();
    let done: &[String] = shared.already.get(&uid).map(Vec::as_slice).unwrap_or(&[]);
    let Prepared { env, prefix, now } = this;
    let d = if let Some(size) = f.body_too_large() {
        Delivery::all(
            Outcome::Rejected,
            format!(
                "not fetched: the message has {size} bytes, more than max_message_size \
                 ({} bytes)",
                a.max_message_size
            ),
        )
    } else if env.recipients.is_empty() {
        // Every recipient already has it (a crash after the last LMTP
        // reply): nothing to send.
        Delivery::all(
            Outcome::Delivered,
            "every recipient had already accepted it",
        )
    } else {
        let barrier = match before {
            Some(b) => b.in_barrier(turn.prev.clone()),
            None => turn.prev.clone(),
        };
        deliverer
            .deliver(&env, &prefix, body, Some(barrier), next)
            .await
            // Not sent: the previous delivery may not be on disk. Stop.
            .map_err(|e| anyhow::Error::new(e).context(LedgerFailure))?
    };
    let mut delivered_to = done.to_vec();
    delivered_to.extend(d.accepted.iter().cloned());
    let attempt = Attempt {
        key: ledger.key(uid),
        message_id: headers::message_id(body),
        size: f.body_too_large().unwrap_or(body.len() as u64),
        internaldate: f.internal_date_rfc3339(),
        state: match d.outcome {
            Outcome::Delivered => State::Delivered,
            Outcome::Deferred => State::Deferred,
            Outcome::Rejected => State::Rejected,
        },
        reply: d.reply.clone(),
        delivered_to,
        now,
    };
    let log = Logged {
        uid,
        size: body.len(),
        message_id: attempt.message_id.clone(),
        sender: env.sender,
        delivery: d,
    };
    Ok((log.delivery.outcome, Record { attempt, turn, log }))
}

/// A message's outcome, to be recorded; its turn passes on once the record
/// is on disk.
struct Record {
    attempt: Attempt,
    turn: Turn,
    log: Logged,
}

/// A message's line in the log, written once its outcome is recorded.
struct Logged {
    uid: u32,
    size: usize,
    message_id: Option<String>,
    sender: String,
    delivery: Delivery,
}

/// A message's record on its way to the ledger. With one delivery session
/// (or independent ones, each for its own messages) the next message's
/// body goes out right after this message's reply:
/// when it is small ([`RECORD_BEHIND_MAX`]), the record is made in that
/// message's barrier, after its body is written and before its final "."
/// (which must wait for it), so that the local server takes the body in
/// while the ledger commits. The crash window stays one
/// message: the next one cannot be accepted before this row is committed.
/// With `durability = "message"` the record (commit and fsync, on the
/// blocking pool) starts at once and only its answer is awaited later.
#[derive(Clone)]
struct Unrecorded(std::sync::Arc<std::sync::Mutex<Recording>>);

enum Recording {
    Waiting(Box<(Epoch, Durability, Record)>),
    Started {
        committed: tokio::sync::oneshot::Receiver<Result<()>>,
        ledger: Epoch,
        log: Logged,
    },
    Finished,
}

impl Unrecorded {
    fn new(shared: &Shared<'_>, record: Record) -> Unrecorded {
        let durability = shared.ctx.account.durability;
        let u = Unrecorded(std::sync::Arc::new(std::sync::Mutex::new(
            Recording::Waiting(Box::new((shared.ledger.clone(), durability, record))),
        )));
        if durability == Durability::Message {
            u.start();
        }
        u
    }

    /// Makes the record, if it is not made yet.
    fn start(&self) {
        let mut r = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *r = match std::mem::replace(&mut *r, Recording::Finished) {
            Recording::Waiting(w) => {
                let (ledger, durability, Record { attempt, turn, log }) = *w;
                Recording::Started {
                    committed: ledger.record_then_sync(attempt, durability, turn.pass_on()),
                    ledger,
                    log,
                }
            }
            other => other,
        };
    }

    /// `prev`, with this record made first when it is polled: the barrier
    /// of the next message, awaited once its body is written.
    fn in_barrier(&self, prev: Barrier) -> Barrier {
        let me = self.clone();
        async move {
            me.start();
            prev.await
        }
        .boxed()
        .shared()
    }

    /// Makes the record if it is not made yet, waits until it is committed,
    /// and logs the message's outcome. An error is the ledger's.
    async fn finish(u: Option<Unrecorded>) -> Result<()> {
        let Some(u) = u else { return Ok(()) };
        u.start();
        let started = std::mem::replace(
            &mut *u.0.lock().unwrap_or_else(|p| p.into_inner()),
            Recording::Finished,
        );
        let Recording::Started {
            committed,
            ledger,
            log,
        } = started
        else {
            return Ok(());
        };
        committed
            .await
            .unwrap_or_else(|_| Err(anyhow!("the ledger task ended").context(LedgerFailure)))
            .context("recording a delivery in the ledger")?;
        let Logged {
            uid,
            size,
            message_id,
            sender,
            delivery,
        } = log;
        log_outcome(ledger.mailbox(), uid, size, message_id, &sender, &delivery);
        Ok(())
    }
}

/// The envelope of a message: its sender as the account says, and the
/// recipients that do not have it yet.
fn envelope(a: &Account, body: &[u8], done: &[String]) -> Envelope {
    Envelope {
        sender: match &a.sender {
            SenderPolicy::Auto => headers::envelope_sender(body),
            SenderPolicy::Fixed(s) => s.clone(),
        },
        recipients: a
            .recipients
            .iter()
            .filter(|r| !done.contains(r))
            .cloned()
            .collect(),
    }
}

/// One line per message; the level says how it went.
fn log_outcome(
    mailbox: &str,
    uid: u32,
    size: usize,
    message_id: Option<String>,
    sender: &str,
    d: &Delivery,
) {
    let mid = message_id.as_deref().unwrap_or("-");
    macro_rules! log {
        ($level:ident, $what:literal) => {
            tracing::$level!(
                mailbox,
                uid,
                size,
                message_id = mid,
                sender,
                reply = d.reply,
                $what
            )
        };
    }
    match d.outcome {
        Outcome::Delivered => log!(info, "delivered"),
        Outcome::Deferred => log!(warn, "deferred"),
        Outcome::Rejected => log!(error, "rejected (quarantined)"),
    }
}

/// A trace header naming where the message came from (RFC 5321 section
/// 4.4 style). Only printable ASCII from the config goes in.
fn received_header(a: &Account, mailbox: &str, uv: u32, uid: u32, now: i64) -> Vec<u8> {
    let clean = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_ascii_graphic() && !matches!(c, '(' | ')' | '\\' | ';'))
            .collect()
    };
    let date = chrono::DateTime::from_timestamp(now, 0)
        .unwrap_or_default()
        .to_rfc2822();
    format!(
        "Received: from {host} by {by} with IMAP (imapull {v})\r\n\
         \tid {uv}.{uid} (account {acct}, mailbox {mb}); {date}\r\n",
        host = clean(&a.host),
        by = clean(&a.ehlo),
        v = env!("CARGO_PKG_VERSION"),
        acct = clean(&a.name),
        mb = clean(&crate::imap::utf7::encode(mailbox)),
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_next_fetch_goes_out_four_round_trips_before_the_end() {
        let ms = Duration::from_millis;
        // 6.25 MB/s (50 Mbit/s) for a second; 40 ms: 1 MB in four trips.
        let at =
            |outstanding, messages| ahead_due(outstanding, messages, 6_250_000, ms(1000), ms(40));
        assert!(!at(2_000_000, 10));
        assert!(!at(1_100_000, 5));
        assert!(at(900_000, 5));
        // The last message, however large.
        assert!(at(9_000_000, 1));
        // Nothing seen yet: no rate, so only the last message counts.
        assert!(!ahead_due(1_000, 3, 0, ms(100), ms(40)));
    }

    #[test]
    fn commands_carry_the_bytes_and_messages_they_ask_for() {
        let sizes: HashMap<u32, u64> = [(1, 10), (2, 20), (5, 50)].into();
        let c = commands(&[5, 1, 2, 7], &sizes);
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].set.as_str(), c[0].bytes, c[0].messages),
            ("1:2,5,7", 80, 4)
        );
    }
}
