//! The pass's decisions, as pure functions over plain data: what to look
//! for, which mail is new, what a FETCH left missing, and whether the
//! watermark moves. The I/O in [`super::pass`] only gathers their inputs
//! and carries out their answers. A failed SEARCH or FETCH never reaches
//! here as an empty set: it is an error of the pass before any of these
//! is asked.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::imap::Selected;

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

/// The watermark after the pass: UIDNEXT only when every message below it
/// has a ledger row, i.e. the pass was neither stopped early nor failed.
pub fn watermark_after(current: u32, uidnext: u32, stopped_early: bool, failed: bool) -> u32 {
    if stopped_early || failed {
        current
    } else {
        uidnext
    }
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
        // (stopped early, failed) -> watermark
        for ((stopped, failed), want) in [
            ((false, false), 20),
            ((true, false), 10),
            ((false, true), 10),
            ((true, true), 10),
        ] {
            assert_eq!(watermark_after(10, 20, stopped, failed), want);
        }
    }
}
