//! Retention: removing remote copies once delivery is proven and the
//! retention period has passed. The most dangerous thing imapull does.
//!
//! Three parts, kept apart so each can be checked on its own:
//! - [`plan`], pure: from ledger rows, the mailbox's UIDVALIDITY, the clock
//!   and the policy, the UIDs that are due. Only rows in state `delivered`
//!   (or quarantined ones the operator dropped, `imapull quarantine drop`),
//!   under the current UIDVALIDITY, delivered (dropped) at least
//!   `purge_after` ago, and not already removed, ever qualify.
//!   Property-tested.
//! - [`remove`], the one function in imapull that removes mail from a
//!   server. It re-checks UIDVALIDITY itself and touches exactly the UIDs it
//!   is given.
//! - [`purge_mailbox`], which ties them to the ledger and the schedule.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::config::{Account, MailboxConfig};
use crate::imap::Imap;
use crate::ledger::{LedgerHandle, MailboxLedger, PurgeRow, PurgeView};

/// What retention a mailbox has, resolved from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Counted from our delivery time, not the remote INTERNALDATE.
    pub after: Duration,
    /// The most removals in one purge; the rest waits for the next one.
    pub max: usize,
}

/// One message due for removal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub uid: u32,
    /// Seconds since delivery (or since the operator dropped it).
    pub age: i64,
    pub message_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Due now, oldest UID first, at most `policy.max`.
    pub due: Vec<Due>,
    /// Due, but over the cap: postponed to the next purge.
    pub postponed: usize,
}

/// Decides what is due. Pure: no clock, no I/O.
pub fn plan(rows: &[PurgeRow], uidvalidity: u32, now: i64, policy: Policy) -> Plan {
    let after = i64::try_from(policy.after.as_secs()).unwrap_or(i64::MAX);
    let mut due: Vec<Due> = rows
        .iter()
        .filter(|r| r.uidvalidity == uidvalidity && r.purged_at.is_none())
        .filter_map(|r| {
            let released = r.released_at()?;
            let age = now.checked_sub(released)?;
            (age >= after).then(|| Due {
                uid: r.uid,
                age,
                message_id: r.message_id.clone(),
            })
        })
        .collect();
    due.sort_by_key(|d| d.uid);
    due.dedup_by_key(|d| d.uid);
    let postponed = due.len().saturating_sub(policy.max);
    due.truncate(policy.max);
    Plan { due, postponed }
}

/// How the messages left the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// `\Deleted` then `UID EXPUNGE` (UIDPLUS).
    UidExpunge,
    /// `\Deleted` then a plain `EXPUNGE`, when no other message was marked.
    Expunge,
    /// Gmail: moved to the `\Trash` mailbox, since expunging only archives.
    MovedTo(String),
    /// None of them was on the server any more.
    AlreadyGone,
}

/// What [`remove`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// These UIDs are no longer in the mailbox.
    Removed { uids: Vec<u32>, method: Method },
    /// Nothing was removed, for the reason given (logged as a warning).
    Skipped(String),
}

/// Removes exactly `uids` from `mailbox`, provided its UIDVALIDITY is still
/// `uidvalidity`. The only function that removes mail from a server.
pub async fn remove(
    imap: &mut Imap,
    mailbox: &str,
    uidvalidity: u32,
    uids: &[u32],
) -> Result<Removal> {
    let sel = imap.select(mailbox).await?;
    if sel.uidvalidity != uidvalidity {
        return Ok(Removal::Skipped(format!(
            "UIDVALIDITY of {mailbox:?} is now {} (the ledger knows {uidvalidity}); nothing removed \
             until a pull has matched the messages again",
            sel.uidvalidity
        )));
    }
    let wanted: BTreeSet<u32> = uids.iter().copied().collect();
    let present = imap.which_exist(&wanted).await?;
    if present.is_empty() {
        return Ok(Removal::Removed {
            uids: wanted.into_iter().collect(),
            method: Method::AlreadyGone,
        });
    }
    let present_v: Vec<u32> = present.iter().copied().collect();
    let method = if imap.has("X-GM-EXT-1") {
        let Some(trash) = imap.trash_mailbox().await? else {
            return Ok(Removal::Skipped(
                "Gmail without a \\Trash mailbox: an expunge there would only archive".into(),
            ));
        };
        if !imap.has("MOVE") {
            return Ok(Removal::Skipped("Gmail without MOVE: not removing".into()));
        }
        imap.uid_move(&present_v, &trash).await?;
        Method::MovedTo(trash)
    } else if imap.has("UIDPLUS") {
        imap.store(&present_v, "+FLAGS.SILENT (\\Deleted)").await?;
        imap.uid_expunge(&present_v).await?;
        Method::UidExpunge
    } else {
        // A plain EXPUNGE removes every \Deleted message, also another
        // client's: only when ours are the only ones, before and after.
        let others = |marked: BTreeSet<u32>| marked.difference(&present).count();
        let n = others(imap.search("DELETED").await?);
        if n > 0 {
            return Ok(Removal::Skipped(format!(
                "no UIDPLUS, and {n} other message(s) in {mailbox:?} are marked \\Deleted: \
                 a plain EXPUNGE would remove them too"
            )));
        }
        imap.store(&present_v, "+FLAGS.SILENT (\\Deleted)").await?;
        let n = others(imap.search("DELETED").await?);
        if n > 0 {
            // Someone marked a message meanwhile: put ours back as they were.
            imap.store(&present_v, "-FLAGS.SILENT (\\Deleted)").await?;
            return Ok(Removal::Skipped(format!(
                "no UIDPLUS, and {n} other message(s) in {mailbox:?} were marked \\Deleted \
                 meanwhile; not expunging"
            )));
        }
        imap.expunge_all_deleted().await?;
        Method::Expunge
    };
    // The reply streams end quietly on NO: check what is really gone.
    let left = imap.which_exist(&present).await?;
    if !left.is_empty() {
        bail!(
            "{} still holds {} of the messages it was asked to remove from {mailbox:?} (UIDs {:?})",
            imap.peer,
            left.len(),
            left
        );
    }
    Ok(Removal::Removed {
        uids: wanted.into_iter().collect(),
        method,
    })
}

/// What one purge of one mailbox did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeReport {
    pub removed: usize,
    pub postponed: usize,
    pub skipped: bool,
}

/// Whether a purge is due now: `purge_after = 0` purges after every pass,
/// anything else at most every `purge_interval`.
pub fn purge_is_due(
    policy_after: Duration,
    interval: Duration,
    last: Option<i64>,
    now: i64,
) -> bool {
    if policy_after.is_zero() {
        return true;
    }
    match last {
        None => true,
        Some(t) => now.saturating_sub(t) >= i64::try_from(interval.as_secs()).unwrap_or(i64::MAX),
    }
}

/// Purges one mailbox if it has a retention and (unless `on_demand`) its
/// purge is due. The IMAP connection may have any mailbox selected.
pub async fn purge_mailbox(
    account: &Account,
    ledger: &LedgerHandle,
    imap: &mut Imap,
    mb: &MailboxConfig,
    now: i64,
    on_demand: bool,
) -> Result<PurgeReport> {
    let Some(after) = mb.purge_after else {
        return Ok(PurgeReport::default());
    };
    let mbl = MailboxLedger::new(ledger, &account.name, &mb.name);
    let PurgeView {
        state,
        last_purge_at: last,
        rows,
    } = mbl.for_purge().await?;
    let Some(state) = state else {
        return Ok(PurgeReport::default());
    };
    if !on_demand && !purge_is_due(after, account.purge_interval, last, now) {
        return Ok(PurgeReport::default());
    }
    let policy = Policy {
        after,
        max: account.purge_max as usize,
    };
    let plan = plan(&rows, state.uidvalidity, now, policy);
    if plan.postponed > 0 {
        tracing::warn!(
            mailbox = mb.name,
            "{} messages are due for removal, over purge_max = {}; {} postponed to the next purge",
            plan.due.len() + plan.postponed,
            policy.max,
            plan.postponed
        );
    }
    let uids: Vec<u32> = plan.due.iter().map(|d| d.uid).collect();
    let mut report = PurgeReport {
        postponed: plan.postponed,
        ..PurgeReport::default()
    };
    let removed = if uids.is_empty() {
        Vec::new()
    } else {
        match remove(imap, &mb.name, state.uidvalidity, &uids).await? {
            Removal::Removed { uids, method } => {
                tracing::info!(
                    mailbox = mb.name,
                    count = uids.len(),
                    ?method,
                    "removed from the server"
                );
                uids
            }
            Removal::Skipped(why) => {
                tracing::warn!(mailbox = mb.name, "purge skipped: {why}");
                report.skipped = true;
                return Ok(report);
            }
        }
    };
    report.removed = removed.len();
    mbl.epoch(state.uidvalidity)
        .mark_purged(removed, now)
        .await?;
    Ok(report)
}

/// What `imapull purge --dry-run` shows: the plan, from the ledger alone.
pub async fn dry_run(
    account: &Account,
    ledger: &LedgerHandle,
    now: i64,
) -> Result<Vec<(String, Plan)>> {
    let mut out = Vec::new();
    for mb in &account.mailboxes {
        let Some(after) = mb.purge_after else {
            continue;
        };
        let view = MailboxLedger::new(ledger, &account.name, &mb.name)
            .for_purge()
            .await?;
        let (Some(state), rows) = (view.state, view.rows) else {
            continue;
        };
        let policy = Policy {
            after,
            max: account.purge_max as usize,
        };
        out.push((mb.name.clone(), plan(&rows, state.uidvalidity, now, policy)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::State;
    use proptest::prelude::*;

    const DAY: i64 = 86400;

    fn row(uid: u32, state: &str, delivered_at: Option<i64>) -> PurgeRow {
        PurgeRow {
            uidvalidity: 7,
            uid,
            state: state.into(),
            delivered_at,
            purged_at: None,
            message_id: Some(format!("<{uid}@x>")),
            dropped_at: None,
        }
    }

    fn policy(days: u64, max: usize) -> Policy {
        Policy {
            after: Duration::from_secs(days * DAY as u64),
            max,
        }
    }

    #[test]
    fn only_delivered_and_old_enough() {
        let now = 100 * DAY;
        let rows = vec![
            row(1, "delivered", Some(now - 31 * DAY)),
            row(2, "delivered", Some(now - 29 * DAY)),
            row(3, "deferred", Some(now - 40 * DAY)),
            row(4, "rejected", None),
            row(5, "skipped", None),
            row(6, "delivered", Some(now - 30 * DAY)),
            row(7, "vanished", None),
        ];
        let p = plan(&rows, 7, now, policy(30, 500));
        assert_eq!(p.due.iter().map(|d| d.uid).collect::<Vec<_>>(), vec![1, 6]);
        assert_eq!(p.due[0].age, 31 * DAY);
        assert_eq!(p.postponed, 0);
    }

    #[test]
    fn a_dropped_quarantined_message_counts_from_its_drop() {
        let now = 100 * DAY;
        let mut dropped = row(1, "rejected", None);
        dropped.dropped_at = Some(now - 31 * DAY);
        let mut recent = row(2, "rejected", None);
        recent.dropped_at = Some(now - DAY);
        // Dropped only makes a rejected row eligible, no other.
        let mut deferred = row(3, "deferred", None);
        deferred.dropped_at = Some(0);
        let p = plan(&[dropped, recent, deferred], 7, now, policy(30, 500));
        assert_eq!(p.due.iter().map(|d| d.uid).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn other_uidvalidity_and_purged_rows_never_qualify() {
        let now = 100 * DAY;
        let mut old = row(1, "delivered", Some(0));
        old.uidvalidity = 6;
        let mut gone = row(2, "delivered", Some(0));
        gone.purged_at = Some(DAY);
        assert!(plan(&[old, gone], 7, now, policy(0, 500)).due.is_empty());
    }

    #[test]
    fn zero_means_right_away_and_future_deliveries_wait() {
        let rows = vec![
            row(1, "delivered", Some(1000)),
            row(2, "delivered", Some(2000)),
        ];
        let p = plan(&rows, 7, 1000, policy(0, 500));
        assert_eq!(p.due.iter().map(|d| d.uid).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn the_cap_postpones_the_newest() {
        let rows: Vec<PurgeRow> = (1..=10)
            .rev()
            .map(|u| row(u, "delivered", Some(0)))
            .collect();
        let p = plan(&rows, 7, DAY, policy(0, 3));
        assert_eq!(
            p.due.iter().map(|d| d.uid).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(p.postponed, 7);
    }

    #[test]
    fn schedule() {
        let h = Duration::from_secs(3600);
        assert!(purge_is_due(Duration::ZERO, h, Some(100), 100));
        assert!(purge_is_due(h, h, None, 100));
        assert!(!purge_is_due(h, h, Some(100), 100 + 3599));
        assert!(purge_is_due(h, h, Some(100), 100 + 3600));
    }

    fn any_row() -> impl Strategy<Value = PurgeRow> {
        (
            5u32..9,
            1u32..50,
            prop_oneof![
                Just("delivered"),
                Just("deferred"),
                Just("rejected"),
                Just("skipped"),
                Just("vanished")
            ],
            proptest::option::of(0i64..200),
            proptest::option::of(0i64..200),
            proptest::option::of(0i64..200),
        )
            .prop_map(|(uv, uid, state, d, p, dropped)| PurgeRow {
                uidvalidity: uv,
                uid,
                state: state.to_string(),
                delivered_at: d,
                purged_at: p,
                message_id: None,
                dropped_at: dropped,
            })
    }

    /// Delivered, or rejected and dropped by the operator: spelled out
    /// here apart from `released_at`, which the property checks.
    fn released(r: &PurgeRow) -> bool {
        r.state() == Some(State::Delivered)
            || (r.state() == Some(State::Rejected) && r.dropped_at.is_some())
    }

    proptest! {
        /// Whatever the ledger holds, a planned UID is a delivered (or a
        /// dropped quarantined), unpurged row of the current UIDVALIDITY,
        /// old enough; the plan respects the cap; nothing due is silently
        /// left out.
        #[test]
        fn plan_is_safe(rows in proptest::collection::vec(any_row(), 0..40),
                        uv in 5u32..9, now in 0i64..300, after in 0u64..100, max in 1usize..10) {
            let p = plan(&rows, uv, now, Policy { after: Duration::from_secs(after), max });
            prop_assert!(p.due.len() <= max);
            for d in &p.due {
                prop_assert!(rows.iter().any(|r| r.uid == d.uid && r.uidvalidity == uv
                    && released(r) && r.purged_at.is_none()
                    && r.released_at().is_some_and(|t| now - t >= after as i64)));
            }
            let eligible: BTreeSet<u32> = rows.iter()
                .filter(|r| r.uidvalidity == uv && released(r) && r.purged_at.is_none()
                    && r.released_at().is_some_and(|t| now - t >= after as i64))
                .map(|r| r.uid).collect();
            prop_assert_eq!(p.due.len() + p.postponed, eligible.len());
            prop_assert!(p.due.windows(2).all(|w| w[0].uid < w[1].uid));
        }
    }
}
