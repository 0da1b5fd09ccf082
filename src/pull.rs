//! One pass over one mailbox, in the shape of retention's (`purge.rs`):
//! read what the ledger knows once, plan, execute, close, commit.
//!
//! - [`pass`] selects the mailbox, sets up a first contact or a
//!   UIDVALIDITY change, and reads the ledger's [`Known`] once.
//! - [`decide::plan`] (pure) says what to flag again, what to retry and
//!   whether to search for new mail.
//! - [`pipeline::run`] fetches, delivers and records, one ledger write per
//!   message, as the crash promise requires.
//! - [`decide::close`] (pure) says what vanished, what is missing and where
//!   the watermark goes, and one transaction commits that with the flags.
//!
//! The watermark advances only when every message below the new UIDNEXT
//! has a ledger row, so a pass cut short never skips anything.

mod decide;
mod pipeline;

use std::collections::HashMap;

use anyhow::{anyhow, Result};

use crate::config::Account;
use crate::deliver::{headers, Sessions};
use crate::imap::{uid_sets, Imap, Selected};
use crate::ledger::{Epoch, Known, LedgerHandle, MailboxLedger, MailboxState, PassClose};
use decide::{FirstContact, Plan, Scan};
pub use pipeline::{FETCH_BATCH_BYTES, IN_FLIGHT_BYTES, PIPELINE_DEPTH};

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
    let mb = MailboxLedger::new(&ctx.ledger, &ctx.account.name, mailbox);
    let state = mb.state().await?;
    // The discovery may go out with the SELECT ([`Imap::select_discovering`]).
    let from = decide::discovery_from(state.as_ref(), ctx.account.initial);
    let (sel, early) = imap.select_discovering(mailbox, from).await?;
    let ledger = mb.epoch(sel.uidvalidity);
    let Some(watermark) = settle(ctx, imap, state.as_ref(), &ledger, &sel, report).await? else {
        return Ok(());
    };
    // Usable where it asked what this pass asks: from the same watermark,
    // under the same UIDVALIDITY (the messages a first contact recorded
    // as skipped are known, and left out below, like any known UID).
    let early = early.filter(|_| {
        from == Some(watermark)
            && state
                .as_ref()
                .is_none_or(|s| s.uidvalidity == sel.uidvalidity)
    });
    let known: Known = ledger.known(watermark).await?;
    let plan = decide::plan(&sel, watermark, known, ctx.account.mark_seen);
    // Flags a crash or a lost connection left unstored.
    if !plan.reflag.is_empty() {
        imap.add_seen(&plan.reflag).await?;
        ledger.mark_flagged(plan.reflag.clone()).await?;
    }
    let (new, sizes): (Vec<u32>, _) = match plan.scan {
        Scan::NothingNew => {
            tracing::debug!(mailbox, "nothing new (UIDNEXT {})", sel.uidnext);
            return Ok(());
        }
        Scan::RetryOnly => (vec![], HashMap::new()),
        // An error here (NO, BAD, a drop, a line it cannot read) ends the
        // pass: never "empty". The sizes come in the same round trip.
        Scan::SearchFrom(w) => {
            let (found, sizes) = match early {
                Some(Ok(d)) => d,
                // Refused beside the SELECT: asked again, alone, and
                // this time a refusal ends the pass.
                Some(Err(e)) => {
                    tracing::debug!(mailbox, "{e:#}; asking again");
                    imap.discover(w).await?
                }
                None => imap.discover(w).await?,
            };
            (decide::new_mail(&found, w, &plan.known), sizes)
        }
    };
    tracing::debug!(
        mailbox,
        retry = plan.retry.len(),
        new = new.len(),
        "fetching"
    );
    let groups: [&[u32]; 2] = [&plan.retry, &new];
    let run = pipeline::run(
        ctx,
        imap,
        sessions,
        &ledger,
        (&groups, sizes),
        &plan.already,
        report,
    )
    .await?;
    finish(ctx, imap, &ledger, &sel, &plan, &new, run, report).await
}

/// The watermark to go on from: the ledger's, once a first contact or a
/// UIDVALIDITY change has set the mailbox up. None: the pass is over
/// (first contact with `initial = "none"`).
async fn settle(
    ctx: &Ctx<'_>,
    imap: &mut Imap,
    state: Option<&MailboxState>,
    ledger: &Epoch,
    sel: &Selected,
    report: &mut PassReport,
) -> Result<Option<u32>> {
    match state {
        None => first_contact(ctx, imap, ledger, sel, report).await,
        Some(s) if s.uidvalidity != sel.uidvalidity => {
            resync(ctx, imap, ledger, s.uidvalidity, sel.exists).await?;
            Ok(Some(1))
        }
        Some(s) => Ok(Some(s.watermark)),
    }
}

/// The end of a pass: what the FETCH left missing is looked up, `\Seen`
/// stored, and the vanished rows, the flags and the watermark committed in
/// one transaction ([`decide::close`] decides which).
#[allow(clippy::too_many_arguments)]
async fn finish(
    ctx: &Ctx<'_>,
    imap: &mut Imap,
    ledger: &Epoch,
    sel: &Selected,
    plan: &Plan,
    new: &[u32],
    run: pipeline::Run,
    report: &mut PassReport,
) -> Result<()> {
    let mailbox = ledger.mailbox();
    // Every requested UID either came back or is gone from the server;
    // anything else is a FETCH that failed part-way.
    let mut judged = decide::Missing::default();
    if !run.stopped_early && run.fetch_error.is_none() {
        let missing = decide::missing(&[&plan.retry, new], &run.attempted);
        if !missing.is_empty() {
            let still_there = imap.which_exist(&missing).await?;
            judged = decide::judge_missing(&missing, &still_there, &plan.already);
        }
    }
    let closing = decide::close(
        sel.uidnext,
        run.stopped_early,
        run.fetch_error.is_some(),
        judged,
    );
    if !closing.vanished.is_empty() {
        tracing::warn!(
            mailbox,
            vanished = ?closing.vanished,
            "deferred messages disappeared from the server before they could be retried"
        );
        report.vanished += closing.vanished.len() as u32;
    }
    let stored = if run.to_flag.is_empty() {
        Ok(())
    } else {
        imap.add_seen(&run.to_flag).await
    };
    let commit = PassClose {
        vanished: closing.vanished,
        flagged: if stored.is_ok() {
            run.to_flag
        } else {
            Vec::new()
        },
        watermark: closing.watermark.filter(|_| stored.is_ok()),
    };
    ledger.close_pass(commit, (ctx.now)()).await?;
    stored?;
    if let Some(e) = run.fetch_error {
        report.incomplete = true;
        return Err(e);
    }
    if !closing.unreturned.is_empty() {
        report.incomplete = true;
        return Err(anyhow!(
            "{} did not return {} requested message(s) (UIDs {}); they stay on the server and are tried next pass",
            imap.peer,
            closing.unreturned.len(),
            uid_sets(&closing.unreturned).join(",")
        ));
    }
    report.incomplete |= run.stopped_early;
    Ok(())
}

/// A mailbox never seen before: set up as `initial` says. Returns the
/// watermark to continue from, or None when the pass is done.
async fn first_contact(
    ctx: &Ctx<'_>,
    imap: &mut Imap,
    ledger: &Epoch,
    sel: &Selected,
    report: &mut PassReport,
) -> Result<Option<u32>> {
    let mailbox = ledger.mailbox();
    let initial = ctx.account.initial;
    let now = (ctx.now)();
    tracing::info!(mailbox, ?initial, "first pass of this mailbox");
    match decide::first_contact(initial, sel) {
        FirstContact::OnlyNew { watermark } => {
            ledger.start(watermark, watermark, now).await?;
            return Ok(None);
        }
        FirstContact::SkipSeen => {
            let rows = read_messages(imap).await?;
            report.skipped = rows.len() as u32;
            tracing::info!(
                mailbox,
                skipped = rows.len(),
                "already-read messages recorded as skipped"
            );
            ledger.record_skipped(rows, now).await?;
        }
        FirstContact::Everything => {}
    }
    ledger.start(1, 1, now).await?;
    Ok(Some(1))
}

/// The read messages of the selected mailbox, as skipped rows, with their
/// Message-ID and size.
async fn read_messages(imap: &mut Imap) -> Result<Vec<decide::SkippedRow>> {
    let all = imap.search("ALL").await?;
    let unseen = imap.search("UNSEEN").await?;
    let seen: Vec<u32> = all.difference(&unseen).copied().collect();
    let mut fetched = Vec::with_capacity(seen.len());
    for set in uid_sets(&seen) {
        let mut stream = imap
            .fetch(&set, "(UID RFC822.SIZE BODY.PEEK[HEADER])")
            .await?;
        while let Some(f) = stream.next().await? {
            if let Some(uid) = f.uid {
                fetched.push((uid, f.header().and_then(headers::message_id), f.size));
            }
        }
    }
    Ok(decide::skipped_rows(&seen, fetched))
}

/// UIDVALIDITY changed: match the mailbox's messages to ledger rows by
/// Message-ID and size, re-key the matches, and let the rest count as new
/// (watermark 1).
async fn resync(
    ctx: &Ctx<'_>,
    imap: &mut Imap,
    ledger: &Epoch,
    old_uv: u32,
    exists: u32,
) -> Result<()> {
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
    let moves = decide::match_old_rows(remote, ledger.old_rows().await?);
    let matched = moves.len();
    ledger.rekey(moves, 1, (ctx.now)()).await?;
    tracing::warn!(
        mailbox = ledger.mailbox(),
        old_uidvalidity = old_uv,
        new_uidvalidity = ledger.uidvalidity(),
        matched,
        new = total - matched,
        "UIDVALIDITY changed: {matched} message(s) matched the ledger by Message-ID and size \
         and are not delivered again; {} treated as new",
        total - matched
    );
    Ok(())
}
