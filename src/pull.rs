//! One pass over one mailbox: select, find new mail, fetch, deliver, record,
//! flag.
//!
//! The pass is a pipeline: the FETCH stream feeds a bounded channel and the
//! delivery sessions (`delivery_sessions`) drain it, so fetching overlaps
//! delivering, and memory holds a few messages, at most about
//! [`IN_FLIGHT_BYTES`] plus the largest, whatever the size of the mailbox.
//! Messages are accepted one at a time, in UID order: each one's final "."
//! waits until the one before has its outcome committed to the ledger and
//! fsynced, while its body is already on the wire. `\Seen` flags follow in
//! batches once the FETCH is done. The watermark advances only when every
//! message below the new UIDNEXT has a ledger row, so a pass cut short
//! never skips anything.

mod decide;

use std::collections::{HashMap, HashSet};

use anyhow::{anyhow, Context as _, Result};
use futures_util::FutureExt as _;

use crate::config::{Account, Initial, SenderPolicy};
use crate::deliver::client::{no_barrier, Barrier};
use crate::deliver::{headers, Deliverer, Envelope, Outcome, Sessions};
use crate::imap::{byte_batches, uid_sets, Fetch, Imap, FETCH_ITEMS};
use crate::ledger::{Attempt, LedgerHandle, MailboxState, MessageKey, OldRow, State};

/// Messages fetched and waiting for a delivery session, besides one per
/// session. Two keep the sessions busy while the next message arrives;
/// more would only cost memory.
pub const PIPELINE_DEPTH: usize = 2;

/// What a pass did, for the summary line and the exit code.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub delivered: u32,
    pub deferred: u32,
    pub rejected: u32,
    pub skipped: u32,
    pub vanished: u32,
    /// The pass stopped before the end (too many deferrals, IMAP trouble).
    pub incomplete: bool,
}

impl PassReport {
    pub fn add(&mut self, o: &PassReport) {
        self.delivered += o.delivered;
        self.deferred += o.deferred;
        self.rejected += o.rejected;
        self.skipped += o.skipped;
        self.vanished += o.vanished;
        self.incomplete |= o.incomplete;
    }
}

/// Everything a pass needs besides the two sessions.
pub struct Ctx<'a> {
    pub account: &'a Account,
    pub ledger: LedgerHandle,
    /// Seconds since the epoch; injected so tests can move time.
    pub now: &'a (dyn Fn() -> i64 + Sync),
    /// Set when the daemon is stopping: the message in flight finishes,
    /// the rest waits for the next start.
    pub stop: Option<&'a std::sync::atomic::AtomicBool>,
}

impl<'a> Ctx<'a> {
    /// What a pass needs for `account`, built the same way by `imapull run`
    /// and the daemon (which passes its stop flag).
    pub fn new(
        account: &'a Account,
        ledger: LedgerHandle,
        now: &'a crate::Clock,
        stop: Option<&'a std::sync::atomic::AtomicBool>,
    ) -> Ctx<'a> {
        Ctx {
            account,
            ledger,
            now: &**now,
            stop,
        }
    }

    fn stopping(&self) -> bool {
        self.stop
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// Runs one pass of `mailbox`. An `Err` means the IMAP side failed; what was
/// delivered before that is recorded and stays recorded.
pub async fn pass(
    ctx: &Ctx<'_>,
    imap: &mut Imap,
    sessions: &mut Sessions,
    mailbox: &str,
    report: &mut PassReport,
) -> Result<()> {
    let acct = ctx.account.name.clone();
    let mb = mailbox.to_string();
    let sel = imap.select(mailbox).await?;

    let state = {
        let (a, m) = (acct.clone(), mb.clone());
        ctx.ledger.call(move |l| l.mailbox_state(&a, &m)).await?
    };
    let state = match state {
        None => match first_contact(ctx, imap, mailbox, sel, report).await? {
            Some(s) => s,
            None => return Ok(()),
        },
        Some(s) if s.uidvalidity != sel.uidvalidity => {
            resync(
                ctx,
                imap,
                mailbox,
                s.uidvalidity,
                sel.uidvalidity,
                sel.exists,
            )
            .await?
        }
        Some(s) => s,
    };
    let uv = sel.uidvalidity;

    // Flags a crash or a lost connection left unstored.
    if ctx.account.mark_seen {
        let (a, m) = (acct.clone(), mb.clone());
        let unflagged = ctx.ledger.call(move |l| l.unflagged(&a, &m, uv)).await?;
        store_seen(ctx, imap, mailbox, uv, &unflagged).await?;
    }

    let pending = {
        let (a, m) = (acct.clone(), mb.clone());
        ctx.ledger.call(move |l| l.pending(&a, &m, uv)).await?
    };
    let new: Vec<u32> = match decide::scan(&sel, state.watermark, pending.len()) {
        decide::Scan::NothingNew => {
            tracing::debug!(mailbox, "nothing new (UIDNEXT {})", sel.uidnext);
            return Ok(());
        }
        decide::Scan::RetryOnly => vec![],
        decide::Scan::SearchFrom(w) => {
            // An error here (NO, BAD, a drop) ends the pass: never "empty".
            let found = imap.search(&format!("UID {w}:*")).await?;
            let (a, m) = (acct.clone(), mb.clone());
            let known = ctx
                .ledger
                .call(move |l| l.known_uids_from(&a, &m, uv, w))
                .await?;
            decide::new_mail(&found, w, &known)
        }
    };
    let already: HashMap<u32, Vec<String>> = pending
        .iter()
        .map(|p| (p.uid, p.delivered_to.clone()))
        .collect();
    let retry: Vec<u32> = pending.iter().map(|p| p.uid).collect();
    tracing::debug!(mailbox, retry = retry.len(), new = new.len(), "fetching");

    let outcome = fetch_and_deliver(
        ctx,
        imap,
        sessions,
        mailbox,
        uv,
        &[retry.clone(), new.clone()],
        &already,
        report,
    )
    .await;
    let (attempted, to_flag, stopped_early, fetch_error) = outcome?;

    // Every requested UID either came back or is gone from the server;
    // anything else is a FETCH that failed part-way.
    let mut missing_error = None;
    if !stopped_early && fetch_error.is_none() {
        let missing = decide::missing(&[&retry, &new], &attempted);
        if !missing.is_empty() {
            let still_there = imap.which_exist(&missing).await?;
            let judged = decide::judge_missing(&missing, &still_there, &already);
            if !judged.vanished.is_empty() {
                let vanished = judged.vanished;
                tracing::warn!(
                    mailbox,
                    ?vanished,
                    "deferred messages disappeared from the server before they could be retried"
                );
                report.vanished += vanished.len() as u32;
                let (a, m, now) = (acct.clone(), mb.clone(), (ctx.now)());
                ctx.ledger
                    .call(move |l| l.mark_vanished(&a, &m, uv, &vanished, now))
                    .await?;
            }
            if !judged.unreturned.is_empty() {
                missing_error = Some(anyhow!(
                    "{} did not return {} requested message(s) (UIDs {}); they stay on the server and are tried next pass",
                    imap.peer,
                    judged.unreturned.len(),
                    uid_sets(&judged.unreturned).join(",")
                ));
            }
        }
    }

    store_seen(ctx, imap, mailbox, uv, &to_flag).await?;

    let failure = fetch_error.or(missing_error);
    let watermark = decide::watermark_after(
        state.watermark,
        sel.uidnext,
        stopped_early,
        failure.is_some(),
    );
    if let Some(e) = failure {
        report.incomplete = true;
        return Err(e);
    }
    if stopped_early {
        report.incomplete = true;
    } else {
        // A whole pass: recorded (with its time) even when UIDNEXT stayed.
        let (a, m, now) = (acct.clone(), mb.clone(), (ctx.now)());
        let st = MailboxState {
            uidvalidity: uv,
            watermark,
        };
        ctx.ledger
            .call(move |l| l.set_mailbox_state(&a, &m, st, now))
            .await?;
    }
    Ok(())
}

/// UIDs attempted (sorted), UIDs to flag, stopped early, the FETCH's error.
type Fetched = (Vec<u32>, Vec<u32>, bool, Option<anyhow::Error>);

/// Bytes of fetched messages waiting for or in delivery, over all sessions.
/// A bigger message takes the whole budget and so goes alone: memory stays
/// near this plus the largest message, however many sessions there are.
pub const IN_FLIGHT_BYTES: usize = 8 << 20;

/// Bytes asked for in one UID FETCH (a bigger message goes alone).
pub const FETCH_BATCH_BYTES: u64 = 16 << 20;

/// A fetched message and its share of [`IN_FLIGHT_BYTES`], released when
/// its delivery is over.
type InFlight = (Fetch, tokio::sync::OwnedSemaphorePermit);

/// What the delivery sessions take messages from, in UID order, and the
/// order in which they may complete.
struct Queue {
    rx: tokio::sync::mpsc::Receiver<InFlight>,
    /// Passed when the message taken last has its outcome recorded and
    /// fsynced: the next message's final "." waits for it. So however many
    /// sessions there are, at most one message at a time is between the
    /// local server's acceptance and a durable ledger row (the duplicate
    /// window of DESIGN.md), and messages are accepted in UID order.
    last: Barrier,
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

#[allow(clippy::too_many_arguments)]
async fn fetch_and_deliver(
    ctx: &Ctx<'_>,
    imap: &mut Imap,
    sessions: &mut Sessions,
    mailbox: &str,
    uv: u32,
    groups: &[Vec<u32>],
    already: &HashMap<u32, Vec<String>>,
    report: &mut PassReport,
) -> Result<Fetched> {
    // Sorted: a few bytes a message, looked up by binary search (a first
    // pull may ask for hundreds of thousands).
    let mut wanted: Vec<u32> = groups.iter().flatten().copied().collect();
    wanted.sort_unstable();
    wanted.dedup();
    let (tx, rx) = tokio::sync::mpsc::channel::<InFlight>(sessions.0.len() + PIPELINE_DEPTH);
    let budget = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_BYTES));
    let peer = imap.peer.clone();

    let fetch_side = {
        let imap = &mut *imap;
        let wanted = &wanted;
        async move {
            // Batches of about FETCH_BATCH_BYTES: when delivery stops early
            // (the local server is down, a signal), only the rest of the
            // current batch is still downloaded, not the whole mailbox.
            // One message is one batch whatever its size: no need to
            // ask (the daemon's usual case, a round trip saved).
            let sizes = if wanted.len() > 1 {
                imap.sizes(wanted).await?
            } else {
                HashMap::new()
            };
            let max = ctx.account.max_message_size;
            // COMPRESS, if the link is slow and this much pays for it.
            let bytes: u64 = sizes.values().filter(|s| **s <= max).sum();
            imap.compress_for(bytes).await?;
            // Too large by RFC822.SIZE: recorded as rejected, never
            // fetched. (One without a known size is caught by the
            // literal's announced size instead.)
            let too_large: HashMap<u32, u64> = sizes
                .iter()
                .filter(|(_, s)| **s > max)
                .map(|(u, s)| (*u, *s))
                .collect();
            let batches: Vec<Vec<u32>> = groups
                .iter()
                .flat_map(|g| byte_batches(g, &sizes, FETCH_BATCH_BYTES))
                .collect();
            drop(sizes);
            let hand_over = |f: Fetch, len: usize| {
                let (tx, budget) = (&tx, &budget);
                async move {
                    let share = len.clamp(1, IN_FLIGHT_BYTES) as u32;
                    let permit = budget
                        .clone()
                        .acquire_many_owned(share)
                        .await
                        .expect("the semaphore is never closed");
                    // An error: delivery stopped.
                    tx.send((f, permit)).await.is_ok()
                }
            };
            'batches: for batch in batches {
                let (big, batch): (Vec<u32>, Vec<u32>) =
                    batch.into_iter().partition(|u| too_large.contains_key(u));
                for uid in big {
                    if !hand_over(Fetch::too_large(uid, too_large[&uid]), 0).await {
                        break 'batches;
                    }
                }
                let mut receiver_gone = false;
                for set in uid_sets(&batch) {
                    let mut stream = imap.fetch(&set, FETCH_ITEMS).await?;
                    // No timeout around a whole item: the socket's idle
                    // timeout bounds silence, and a big message may
                    // take long on a slow link. The stream ends only
                    // with the tagged OK; NO, BAD or a drop is an error.
                    while let Some(f) = stream
                        .next()
                        .await
                        .with_context(|| format!("UID FETCH from {peer}"))?
                    {
                        // Unsolicited FETCHes (another client's flag
                        // change) carry no body; they are not ours.
                        let ours = f.uid.is_some_and(|u| wanted.binary_search(&u).is_ok());
                        let len = match (f.body(), f.body_too_large()) {
                            (Some(b), _) => b.len(),
                            (None, Some(_)) => 0,
                            (None, None) => continue,
                        };
                        if !ours || receiver_gone {
                            // Delivery stopped: read the rest of the
                            // response so the connection stays usable.
                            continue;
                        }
                        receiver_gone = !hand_over(f, len).await;
                    }
                    if receiver_gone {
                        break 'batches;
                    }
                }
            }
            drop(tx);
            Ok::<_, anyhow::Error>(())
        }
    };

    let deliver_side = async {
        let queue = tokio::sync::Mutex::new(Queue {
            rx,
            last: no_barrier(),
        });
        let tally = std::sync::Mutex::new(Tally::default());
        let workers = sessions
            .0
            .iter_mut()
            .map(|d| session_worker(ctx, d, &queue, &tally, mailbox, uv, already));
        let results = futures_util::future::join_all(workers).await;
        // Dropping the receiver tells the fetch side to stop sending.
        let Queue { rx, last } = queue.into_inner();
        drop(rx);
        // Everything recorded is on disk before flags are stored or the
        // watermark moves.
        let synced = last.await;
        let mut t = tally.into_inner().unwrap_or_else(|p| p.into_inner());
        t.attempted.sort_unstable();
        report.delivered += t.delivered;
        report.rejected += t.rejected;
        report.deferred += t.deferred;
        // A ledger failure is fatal: nothing more may be delivered unrecorded.
        results.into_iter().collect::<Result<Vec<()>>>()?;
        synced
            .map_err(|e| anyhow!("syncing the ledger: {e}"))
            .map_err(|e| e.context(crate::ledger::LedgerFailure))?;
        Ok::<_, anyhow::Error>((t.attempted, t.to_flag, t.stopped))
    };

    let (fetched, delivered) = tokio::join!(fetch_side, deliver_side);
    let (attempted, to_flag, stopped) = delivered?;
    Ok((attempted, to_flag, stopped, fetched.err()))
}

/// One delivery session's loop: take the next message, deliver it (its
/// final "." waiting for the previous message's turn), record it, and hand
/// the turn on once the record is on disk.
async fn session_worker(
    ctx: &Ctx<'_>,
    deliverer: &mut Deliverer,
    queue: &tokio::sync::Mutex<Queue>,
    tally: &std::sync::Mutex<Tally>,
    mailbox: &str,
    uv: u32,
    already: &HashMap<u32, Vec<String>>,
) -> Result<()> {
    loop {
        if tally_of(tally).stopped {
            return Ok(());
        }
        let ((f, _permit), turn) = {
            let mut q = queue.lock().await;
            let Some(item) = q.rx.recv().await else {
                return Ok(());
            };
            let (done, turn) = tokio::sync::oneshot::channel();
            let next = async move {
                turn.await
                    .unwrap_or_else(|_| Err("the previous delivery did not finish".into()))
            }
            .boxed()
            .shared();
            let prev = std::mem::replace(&mut q.last, next);
            (item, Turn { prev, done })
        };
        if ctx.stopping() || tally_of(tally).stopped {
            let mut t = tally_of(tally);
            if !t.stopped && ctx.stopping() {
                tracing::info!(mailbox, "stopping: the rest waits for the next start");
            }
            t.stopped = true;
            turn.pass_on()(Ok(()));
            return Ok(());
        }
        let uid = f.uid.expect("checked by the fetch side");
        // Empty for a message over max_message_size, which is not sent.
        let body = f.body().unwrap_or_default();
        // On an error the turn is dropped: the next message's barrier
        // fails and it is not completed either; the other sessions take
        // no new message.
        let outcome =
            match deliver_one(ctx, deliverer, mailbox, uv, uid, &f, body, already, turn).await {
                Ok(o) => o,
                Err(e) => {
                    tally_of(tally).stopped = true;
                    return Err(e);
                }
            };
        let mut t = tally_of(tally);
        t.attempted.push(uid);
        match outcome {
            Outcome::Delivered => {
                t.delivered += 1;
                t.consecutive_deferrals = 0;
                if ctx.account.mark_seen {
                    t.to_flag.push(uid);
                }
            }
            Outcome::Rejected => {
                t.rejected += 1;
                t.consecutive_deferrals = 0;
            }
            Outcome::Deferred => {
                t.deferred += 1;
                t.consecutive_deferrals += 1;
                if t.consecutive_deferrals >= ctx.account.max_deferrals && !t.stopped {
                    tracing::warn!(
                        mailbox,
                        "{} deliveries in a row deferred by {}; \
                         stopping this pass, the rest stays on the server",
                        t.consecutive_deferrals,
                        deliverer.target()
                    );
                    t.stopped = true;
                }
            }
        }
    }
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

/// Delivers one message, records the outcome, and passes the turn on once
/// the record is on disk.
#[allow(clippy::too_many_arguments)]
async fn deliver_one(
    ctx: &Ctx<'_>,
    deliverer: &mut Deliverer,
    mailbox: &str,
    uv: u32,
    uid: u32,
    f: &Fetch,
    body: &[u8],
    already: &HashMap<u32, Vec<String>>,
    turn: Turn,
) -> Result<Outcome> {
    let a = ctx.account;
    let done: &[String] = already.get(&uid).map(Vec::as_slice).unwrap_or(&[]);
    let recipients: Vec<String> = a
        .recipients
        .iter()
        .filter(|r| !done.contains(r))
        .cloned()
        .collect();
    let sender = match &a.sender {
        SenderPolicy::Auto => headers::envelope_sender(body),
        SenderPolicy::Fixed(s) => s.clone(),
    };
    let message_id = headers::message_id(body);
    let now = (ctx.now)();
    let prefix = if a.add_received {
        received_header(a, mailbox, uv, uid, now)
    } else {
        Vec::new()
    };
    let d = if let Some(size) = f.body_too_large() {
        crate::deliver::Delivery {
            outcome: Outcome::Rejected,
            reply: format!(
                "not fetched: the message has {size} bytes, more than max_message_size \
                 ({} bytes)",
                a.max_message_size
            ),
            accepted: vec![],
        }
    } else if recipients.is_empty() {
        // Every recipient already has it (a crash after the last LMTP
        // reply): nothing to send.
        crate::deliver::Delivery {
            outcome: Outcome::Delivered,
            reply: "every recipient had already accepted it".into(),
            accepted: vec![],
        }
    } else {
        deliverer
            .deliver(
                &Envelope {
                    sender: sender.clone(),
                    recipients,
                },
                &prefix,
                body,
                Some(turn.prev.clone()),
            )
            .await
            // Not sent: the previous delivery may not be on disk. Stop.
            .map_err(|e| anyhow::Error::new(e).context(crate::ledger::LedgerFailure))?
    };
    let mut delivered_to = done.to_vec();
    delivered_to.extend(d.accepted.iter().cloned());
    let state = match d.outcome {
        Outcome::Delivered => State::Delivered,
        Outcome::Deferred => State::Deferred,
        Outcome::Rejected => State::Rejected,
    };
    let attempt = Attempt {
        key: MessageKey {
            account: a.name.clone(),
            mailbox: mailbox.to_string(),
            uidvalidity: uv,
            uid,
        },
        message_id: message_id.clone(),
        size: f.body_too_large().unwrap_or(body.len() as u64),
        internaldate: f.internal_date_rfc3339(),
        state,
        reply: d.reply.clone(),
        delivered_to,
        now,
    };
    let recorded = ctx.ledger.record_then_sync(attempt, turn.pass_on());
    recorded
        .await
        .unwrap_or_else(|_| {
            Err(anyhow!("the ledger task ended").context(crate::ledger::LedgerFailure))
        })
        .context("recording a delivery in the ledger")?;
    let mid = message_id.as_deref().unwrap_or("-");
    // One line per message; the level says how it went.
    macro_rules! log {
        ($level:ident, $what:literal) => {
            tracing::$level!(
                mailbox,
                uid,
                size = body.len(),
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
    Ok(d.outcome)
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

async fn store_seen(
    ctx: &Ctx<'_>,
    imap: &mut Imap,
    mailbox: &str,
    uv: u32,
    uids: &[u32],
) -> Result<()> {
    if uids.is_empty() {
        return Ok(());
    }
    imap.add_seen(uids).await?;
    let (a, m, u) = (ctx.account.name.clone(), mailbox.to_string(), uids.to_vec());
    ctx.ledger
        .call(move |l| l.mark_flagged(&a, &m, uv, &u))
        .await
}

/// A mailbox never seen before. Returns the state to continue from, or None
/// when the pass is done (`initial = "none"`).
async fn first_contact(
    ctx: &Ctx<'_>,
    imap: &mut Imap,
    mailbox: &str,
    sel: crate::imap::Selected,
    report: &mut PassReport,
) -> Result<Option<MailboxState>> {
    let (a, m, now) = (ctx.account.name.clone(), mailbox.to_string(), (ctx.now)());
    let uv = sel.uidvalidity;
    let initial = ctx.account.initial;
    tracing::info!(mailbox, ?initial, "first pass of this mailbox");
    if initial == Initial::None {
        let st = MailboxState {
            uidvalidity: uv,
            watermark: sel.uidnext,
        };
        ctx.ledger
            .call(move |l| l.set_mailbox_state(&a, &m, st, now))
            .await?;
        return Ok(None);
    }
    if initial == Initial::Unseen && sel.exists > 0 {
        let all = imap.search("ALL").await?;
        let unseen = imap.search("UNSEEN").await?;
        let seen: Vec<u32> = all.difference(&unseen).copied().collect();
        // Message-ID and size are kept so that a later UIDVALIDITY change
        // can recognise these too.
        let mut rows = Vec::with_capacity(seen.len());
        for set in uid_sets(&seen) {
            let mut stream = imap
                .fetch(&set, "(UID RFC822.SIZE BODY.PEEK[HEADER])")
                .await?;
            while let Some(f) = stream.next().await? {
                if let Some(uid) = f.uid.filter(|u| seen.binary_search(u).is_ok()) {
                    rows.push((uid, f.header().and_then(headers::message_id), f.size));
                }
            }
        }
        // Any seen message the header fetch missed is still recorded, so
        // that it is not mistaken for new mail.
        let got: HashSet<u32> = rows.iter().map(|r| r.0).collect();
        rows.extend(
            seen.iter()
                .filter(|u| !got.contains(u))
                .map(|u| (*u, None, None)),
        );
        report.skipped = rows.len() as u32;
        tracing::info!(
            mailbox,
            skipped = rows.len(),
            "already-read messages recorded as skipped"
        );
        let (a, m) = (a.clone(), m.clone());
        ctx.ledger
            .call(move |l| l.record_skipped(&a, &m, uv, &rows, now))
            .await?;
    }
    let st = MailboxState {
        uidvalidity: uv,
        watermark: 1,
    };
    ctx.ledger
        .call(move |l| l.set_mailbox_state(&a, &m, st, now))
        .await?;
    Ok(Some(st))
}

/// UIDVALIDITY changed: match the mailbox's messages to ledger rows by
/// Message-ID and size, re-key the matches, and let the rest count as new.
async fn resync(
    ctx: &Ctx<'_>,
    imap: &mut Imap,
    mailbox: &str,
    old_uv: u32,
    new_uv: u32,
    exists: u32,
) -> Result<MailboxState> {
    let (a, m, now) = (ctx.account.name.clone(), mailbox.to_string(), (ctx.now)());
    let mut remote: HashMap<(String, i64), Vec<u32>> = HashMap::new();
    let mut total = 0usize;
    if exists > 0 {
        let mut stream = imap
            .fetch("1:*", "(UID RFC822.SIZE BODY.PEEK[HEADER])")
            .await?;
        while let Some(f) = stream.next().await? {
            let (Some(uid), Some(size)) = (f.uid, f.size) else {
                continue;
            };
            total += 1;
            if let Some(mid) = f.header().and_then(headers::message_id) {
                remote.entry((mid, size as i64)).or_default().push(uid);
            }
        }
    }
    let old = {
        let (a, m) = (a.clone(), m.clone());
        ctx.ledger.call(move |l| l.old_rows(&a, &m, new_uv)).await?
    };
    let mut moves: Vec<(OldRow, u32)> = Vec::new();
    for row in old {
        if let Some(uids) = remote.get_mut(&(row.message_id.clone(), row.size)) {
            if !uids.is_empty() {
                let uid = uids.remove(0);
                moves.push((row, uid));
            }
        }
    }
    let matched = moves.len();
    let st = MailboxState {
        uidvalidity: new_uv,
        watermark: 1,
    };
    ctx.ledger
        .call(move |l| l.rekey(&a, &m, &moves, st, now))
        .await?;
    tracing::warn!(
        mailbox,
        old_uidvalidity = old_uv,
        new_uidvalidity = new_uv,
        matched,
        new = total - matched,
        "UIDVALIDITY changed: {matched} message(s) matched the ledger by Message-ID and size \
         and are not delivered again; {} treated as new",
        total - matched
    );
    Ok(st)
}
