//! The pass's decisions, as pure functions over plain data: what to look
//! for, which mail is new, what a FETCH left missing, and whether the
//! watermark moves. The I/O in [`super::pass`] only gathers their inputs
//! and carries out their answers. A failed SEARCH or FETCH never reaches
//! here as an empty set: it is an error of the pass before any of these
//! is asked.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::config::Initial;
use crate::imap::Selected;
use crate::ledger::{Known, MailboxState, OldRow};

/// What a pass must do, from SELECT and the ledger alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// UIDNEXT has not moved and nothing is deferred: no FETCH at all.
    NothingNew,
    /// Only the deferred messages are tried again.
    RetryOnly,
    /// Search for UIDs from the watermark on.
    SearchFrom(u32),
}

pub fn scan(sel: &Selected, watermark: u32, deferred: usize) -> Scan {
    let moved = sel.uidnext > watermark;
    if !moved && deferred == 0 {
        Scan::NothingNew
    } else if sel.exists == 0 || !moved {
        Scan::RetryOnly
    } else {
        Scan::SearchFrom(watermark)
    }
}

/// New mail: what the search found at or above the watermark that the
/// ledger does not know (a server may answer `UID n:*` with UID n-1).
pub fn new_mail(found: &BTreeSet<u32>, watermark: u32, known: &HashSet<u32>) -> Vec<u32> {
    found
        .iter()
        .copied()
        .filter(|u| *u >= watermark && !known.contains(u))
        .collect()
}

/// Requested UIDs that no FETCH response brought; `attempted` is sorted.
pub fn missing(requested: &[&[u32]], attempted: &[u32]) -> BTreeSet<u32> {
    requested
        .iter()
        .flat_map(|r| r.iter().copied())
        .filter(|u| attempted.binary_search(u).is_err())
        .collect()
}

/// What the missing UIDs are, once a search said which still exist.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Missing {
    /// Deferred before, gone now (another client expunged them).
    pub vanished: Vec<u32>,
    /// Still on the server, yet not returned: the FETCH failed for them;
    /// the pass is an error and they are tried again.
    pub unreturned: Vec<u32>,
}

pub fn judge_missing<V>(
    missing: &BTreeSet<u32>,
    still_there: &BTreeSet<u32>,
    deferred: &HashMap<u32, V>,
) -> Missing {
    let mut m = Missing::default();
    for &uid in missing {
        if still_there.contains(&uid) {
            m.unreturned.push(uid);
        } else if deferred.contains_key(&uid) {
            m.vanished.push(uid);
        }
        // Gone and never recorded: expunged before we saw it; nothing to do.
    }
    m
}

/// How a pass ends, from what the FETCH and the search for the missing
/// said.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Closing {
    /// Deferred before, gone now: recorded as vanished.
    pub vanished: Vec<u32>,
    /// Still on the server, not returned: the pass is an error.
    pub unreturned: Vec<u32>,
    /// The new watermark: UIDNEXT, only when every message below it has a
    /// ledger row, i.e. the pass was neither stopped early nor failed.
    pub watermark: Option<u32>,
}

pub fn close(uidnext: u32, stopped_early: bool, fetch_failed: bool, judged: Missing) -> Closing {
    let whole = !stopped_early && !fetch_failed && judged.unreturned.is_empty();
    Closing {
        vanished: judged.vanished,
        unreturned: judged.unreturned,
        watermark: whole.then_some(uidnext),
    }
}

/// What a pass does, from SELECT and what the ledger knows, before it
/// asks the server anything more.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// Delivered, `\Seen` never stored (a crash or a drop after the
    /// delivery): stored first.
    pub reflag: Vec<u32>,
    /// Deferred, tried again before new mail, oldest first.
    pub retry: Vec<u32>,
    /// Who already has each deferred message (LMTP's partial deliveries):
    /// a retry goes only to the rest.
    pub already: HashMap<u32, Vec<String>>,
    pub scan: Scan,
    /// UIDs at or above the watermark that the ledger has: never new.
    pub known: HashSet<u32>,
}

pub fn plan(sel: &Selected, watermark: u32, known: Known, mark_seen: bool) -> Plan {
    let Known {
        unflagged,
        pending,
        from_watermark,
    } = known;
    Plan {
        reflag: if mark_seen { unflagged } else { Vec::new() },
        retry: pending.iter().map(|p| p.uid).collect(),
        scan: scan(sel, watermark, pending.len()),
        already: pending
            .into_iter()
            .map(|p| (p.uid, p.delivered_to))
            .collect(),
        known: from_watermark,
    }
}

/// The first pass of a mailbox, by `initial`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstContact {
    /// Only mail that arrives from now on: the watermark is UIDNEXT, and
    /// the pass is over.
    OnlyNew { watermark: u32 },
    /// The read messages are recorded as skipped; the rest is new.
    SkipSeen,
    /// Everything there is new (watermark 1).
    Everything,
}

pub fn first_contact(initial: Initial, sel: &Selected) -> FirstContact {
    match initial {
        Initial::None => FirstContact::OnlyNew {
            watermark: sel.uidnext,
        },
        Initial::Unseen if sel.exists > 0 => FirstContact::SkipSeen,
        Initial::Unseen | Initial::All => FirstContact::Everything,
    }
}

/// Where the pass will look for new mail from, as far as the ledger says
/// before the SELECT: the mailbox's watermark, or 1 on a first contact that
/// takes the mail there ([`first_contact`]'s `SkipSeen` and `Everything`).
/// None: a first contact that only records UIDNEXT. The discovery sent with
/// the SELECT asks from here; the pass uses it only if it asks the same.
pub fn discovery_from(state: Option<&MailboxState>, initial: Initial) -> Option<u32> {
    match (state, initial) {
        (Some(s), _) => Some(s.watermark),
        (None, Initial::None) => None,
        (None, Initial::Unseen | Initial::All) => Some(1),
    }
}

/// A skipped message's row: UID, Message-ID and size, kept so that a later
/// UIDVALIDITY change can recognise it too.
pub type SkippedRow = (u32, Option<String>, Option<u64>);

/// The rows for the read messages (`seen`, sorted) at first contact: one
/// per message, with what the header fetch brought; a message it missed is
/// still recorded, so that it is not mistaken for new mail.
pub fn skipped_rows(seen: &[u32], fetched: Vec<SkippedRow>) -> Vec<SkippedRow> {
    let mut rows: Vec<SkippedRow> = fetched
        .into_iter()
        .filter(|r| seen.binary_search(&r.0).is_ok())
        .collect();
    let got: HashSet<u32> = rows.iter().map(|r| r.0).collect();
    rows.extend(
        seen.iter()
            .filter(|u| !got.contains(u))
            .map(|u| (*u, None, None)),
    );
    rows
}

/// After a UIDVALIDITY change: each old row matched to a message now on
/// the server with the same Message-ID and size, at most one row to a
/// message, the lowest UID first. `remote` maps (Message-ID, size) to the
/// UIDs carrying it, in UID order.
pub fn match_old_rows(
    mut remote: HashMap<(String, i64), Vec<u32>>,
    old: Vec<OldRow>,
) -> Vec<(OldRow, u32)> {
    let mut moves = Vec::new();
    for row in old {
        if let Some(uids) = remote.get_mut(&(row.message_id.clone(), row.size)) {
            if !uids.is_empty() {
                let uid = uids.remove(0);
                moves.push((row, uid));
            }
        }
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(uidnext: u32, exists: u32) -> Selected {
        Selected {
            uidvalidity: 1,
            uidnext,
            exists,
        }
    }

    #[test]
    fn what_to_scan() {
        // (UIDNEXT, EXISTS, watermark, deferred) -> scan
        let table = [
            ((10, 5, 10, 0), Scan::NothingNew),
            ((10, 5, 10, 2), Scan::RetryOnly),
            ((12, 5, 10, 0), Scan::SearchFrom(10)),
            ((12, 5, 10, 2), Scan::SearchFrom(10)),
            // New UIDs came and went: the mailbox is empty now.
            ((12, 0, 10, 0), Scan::RetryOnly),
            // First pass of a mailbox (watermark 1).
            ((1, 0, 1, 0), Scan::NothingNew),
            ((5, 4, 1, 0), Scan::SearchFrom(1)),
        ];
        for ((next, exists, w, d), want) in table {
            assert_eq!(
                scan(&sel(next, exists), w, d),
                want,
                "{next} {exists} {w} {d}"
            );
        }
    }

    #[test]
    fn which_mail_is_new() {
        let found: BTreeSet<u32> = [9, 10, 11, 12].into();
        let known: HashSet<u32> = [11].into();
        // Below the watermark (a server's answer to UID 10:*) and known
        // ones are not new.
        assert_eq!(new_mail(&found, 10, &known), vec![10, 12]);
        // A search that found nothing (a tagged OK with no data) means no
        // new mail; a search that failed never gets here.
        assert_eq!(new_mail(&BTreeSet::new(), 10, &known), Vec::<u32>::new());
    }

    #[test]
    fn what_a_fetch_left_missing() {
        let retry = [3u32, 5];
        let new = [10u32, 11, 12];
        assert_eq!(
            missing(&[&retry, &new], &[3, 10, 12]),
            BTreeSet::from([5, 11])
        );
        assert!(missing(&[&retry, &new], &[3, 5, 10, 11, 12]).is_empty());
    }

    #[test]
    fn judging_the_missing() {
        let deferred: HashMap<u32, ()> = [(5, ())].into();
        let missing: BTreeSet<u32> = [5, 11, 12].into();
        // 11 is still there but was not returned: the FETCH failed for it.
        // 5 was deferred and is gone: vanished. 12 is gone, never seen:
        // expunged during the pass, nothing to record.
        let m = judge_missing(&missing, &[11].into(), &deferred);
        assert_eq!(
            m,
            Missing {
                vanished: vec![5],
                unreturned: vec![11]
            }
        );
        // Everything gone, nothing deferred: an EXPUNGE during the pass.
        assert_eq!(
            judge_missing(&[12].into(), &BTreeSet::new(), &deferred),
            Missing::default()
        );
    }

    #[test]
    fn the_watermark_moves_only_after_a_whole_pass() {
        let unreturned = || Missing {
            vanished: vec![],
            unreturned: vec![7],
        };
        // (stopped early, FETCH failed, what the missing were) -> watermark
        let table = [
            ((false, false, Missing::default()), Some(20)),
            // A pass stopped early (deferrals in a row, a signal).
            ((true, false, Missing::default()), None),
            // A FETCH that failed part-way.
            ((false, true, Missing::default()), None),
            ((true, true, Missing::default()), None),
            // A UID the FETCH did not return though it is still there.
            ((false, false, unreturned()), None),
        ];
        for ((stopped, failed, judged), want) in table {
            let c = close(20, stopped, failed, judged);
            assert_eq!(c.watermark, want, "{stopped} {failed} {c:?}");
        }
        // Vanished mail is recorded whatever else happened.
        let judged = Missing {
            vanished: vec![5],
            unreturned: vec![7],
        };
        let c = close(20, false, false, judged);
        assert_eq!(
            (c.vanished, c.unreturned, c.watermark),
            (vec![5], vec![7], None)
        );
    }

    fn known(unflagged: &[u32], pending: &[(u32, &[&str])], above: &[u32]) -> Known {
        Known {
            unflagged: unflagged.to_vec(),
            pending: pending
                .iter()
                .map(|(uid, to)| crate::ledger::Pending {
                    uid: *uid,
                    delivered_to: to.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
            from_watermark: above.iter().copied().collect(),
        }
    }

    #[test]
    fn the_plan() {
        let k = known(&[2, 4], &[(3, &[]), (6, &["a@x"])], &[10]);
        let p = plan(&sel(12, 8), 10, k.clone(), true);
        assert_eq!(p.reflag, vec![2, 4]);
        assert_eq!(p.retry, vec![3, 6]);
        assert_eq!(p.already[&6], vec!["a@x".to_string()]);
        assert_eq!(p.already[&3], Vec::<String>::new());
        assert_eq!(p.scan, Scan::SearchFrom(10));
        assert_eq!(p.known, HashSet::from([10]));
        // mark_seen = false: no flag is ever stored, not even as a repair.
        assert!(plan(&sel(12, 8), 10, k.clone(), false).reflag.is_empty());
        // Nothing new and nothing deferred: no FETCH, whatever is unflagged.
        let p = plan(&sel(10, 8), 10, known(&[2], &[], &[]), true);
        assert_eq!((p.scan, p.reflag), (Scan::NothingNew, vec![2]));
        // Deferred mail only.
        assert_eq!(plan(&sel(10, 8), 10, k, true).scan, Scan::RetryOnly);
    }

    #[test]
    fn first_contact_by_initial() {
        use Initial::*;
        let table = [
            ((None, 5), FirstContact::OnlyNew { watermark: 12 }),
            ((None, 0), FirstContact::OnlyNew { watermark: 12 }),
            ((Unseen, 5), FirstContact::SkipSeen),
            // An empty mailbox: nothing to search for.
            ((Unseen, 0), FirstContact::Everything),
            ((All, 5), FirstContact::Everything),
        ];
        for ((initial, exists), want) in table {
            assert_eq!(
                first_contact(initial, &sel(12, exists)),
                want,
                "{initial:?}"
            );
        }
    }

    /// The discovery sent with the SELECT asks from where the pass will:
    /// the watermark, or on a first contact where `first_contact` starts
    /// (1), and nothing where it only records UIDNEXT.
    #[test]
    fn the_discovery_with_the_select_asks_from_where_the_pass_will() {
        use Initial::*;
        let known = MailboxState {
            uidvalidity: 7,
            watermark: 40,
        };
        for initial in [None, Unseen, All] {
            assert_eq!(discovery_from(Some(&known), initial), Some(40));
            for exists in [0, 5] {
                let want = match first_contact(initial, &sel(12, exists)) {
                    FirstContact::OnlyNew { .. } => Option::None,
                    FirstContact::SkipSeen | FirstContact::Everything => Some(1),
                };
                assert_eq!(discovery_from(Option::None, initial), want, "{initial:?}");
            }
        }
    }

    #[test]
    fn every_read_message_gets_a_skipped_row() {
        let fetched = vec![
            (2, Some("<b>".to_string()), Some(20)),
            // Unsolicited, or not among the read ones: not recorded.
            (3, Some("<c>".to_string()), Some(30)),
        ];
        // 5's header did not come back: recorded anyway, without details,
        // so that it is never delivered as new mail.
        assert_eq!(
            skipped_rows(&[2, 5], fetched),
            vec![(2, Some("<b>".to_string()), Some(20)), (5, None, None)]
        );
    }

    #[test]
    fn a_uidvalidity_change_matches_by_message_id_and_size() {
        let old = |uid, mid: &str, size| OldRow {
            uidvalidity: 1,
            uid,
            message_id: mid.into(),
            size,
        };
        let remote: HashMap<(String, i64), Vec<u32>> = [
            (("<a>".to_string(), 100), vec![7]),
            // Two copies of one message: each old row takes one.
            (("<d>".to_string(), 50), vec![8, 9]),
        ]
        .into();
        let moves = match_old_rows(
            remote,
            vec![
                old(1, "<a>", 100),
                // Same Message-ID, other size: another message.
                old(2, "<a>", 101),
                old(3, "<d>", 50),
                old(4, "<d>", 50),
                old(5, "<d>", 50),
                // Not on the server any more.
                old(6, "<gone>", 10),
            ],
        );
        let got: Vec<(u32, u32)> = moves.iter().map(|(r, u)| (r.uid, *u)).collect();
        assert_eq!(got, vec![(1, 7), (3, 8), (4, 9)]);
    }
}
