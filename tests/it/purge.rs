//! Retention against a real Dovecot with the clock moved by the test, and
//! against the scripted server for no-UIDPLUS and Gmail.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use imapull::config::Config;
use imapull::{run_accounts, Mode};

use crate::fake::{fake_message, FakeSmtp, MailServer};
use crate::harness::*;

const DAY: i64 = 86400;

/// Runs imapull in this process with a clock the test sets.
struct Clocked {
    now: Arc<AtomicI64>,
    rt: tokio::runtime::Runtime,
}

impl Clocked {
    fn new() -> Clocked {
        Clocked {
            now: Arc::new(AtomicI64::new(imapull::system_now())),
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    fn advance(&self, secs: i64) {
        self.now.fetch_add(secs, Ordering::SeqCst);
    }

    fn run(&self, case: &Case, mode: Mode) -> i32 {
        let config = Config::load(&case.config).unwrap();
        let now = self.now.clone();
        let results = self
            .rt
            .block_on(run_accounts(
                &config,
                &[],
                Arc::new(move || now.load(Ordering::SeqCst)),
                mode,
            ))
            .unwrap();
        imapull::run_exit_code(&results)
    }
}

fn uids(case: &Case) -> Vec<u32> {
    flags(&case.user, "INBOX").keys().copied().collect()
}

#[test]
fn only_due_delivered_messages_disappear() {
    let rcpt = new_recipient();
    let case = Case::new(
        &smtp(),
        &[&rcpt],
        "purge_after = \"30d\"\npurge_interval = \"1h\"",
    );
    let clock = Clocked::new();
    // Day 0: two good messages, one Postfix defers, one it rejects.
    drop_message(&case.user, 1, &message(1, "bob@remote.test", "a"), false);
    drop_message(&case.user, 2, &message(2, "bob@remote.test", "b"), false);
    drop_message(&case.user, 3, &message(3, "defer4@remote.test", "c"), false);
    drop_message(
        &case.user,
        4,
        &message(4, "reject5@remote.test", "d"),
        false,
    );
    assert_eq!(clock.run(&case, Mode::Pull), 65);
    // Day 10: one more delivered.
    clock.advance(10 * DAY);
    drop_message(&case.user, 5, &message(5, "bob@remote.test", "e"), false);
    clock.run(&case, Mode::Pull);
    assert_eq!(case.state_of(5), "delivered");
    // A message arrives that no pass has seen, and another client's message
    // sits in the mailbox too: neither is ours to remove.
    drop_message(&case.user, 6, &message(6, "bob@remote.test", "f"), false);
    assert_eq!(uids(&case), vec![1, 2, 3, 4, 5, 6]);

    // Day 31: only 1 and 2 are 30 days past delivery.
    clock.advance(21 * DAY);
    clock.run(&case, Mode::Purge);
    assert_eq!(uids(&case), vec![3, 4, 5, 6]);
    let purged: Vec<u32> = case
        .rows()
        .iter()
        .filter(|r| r.purged_at.is_some())
        .map(|r| r.uid)
        .collect();
    assert_eq!(purged, vec![1, 2]);

    // Day 41: 5 is due now; the deferred, the rejected and the unknown stay.
    clock.advance(10 * DAY);
    clock.run(&case, Mode::Purge);
    assert_eq!(uids(&case), vec![3, 4, 6]);
}

#[test]
fn purge_after_zero_removes_right_after_delivery_even_without_seen() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "purge_after = \"0\"\nmark_seen = false");
    let clock = Clocked::new();
    for n in 0..3 {
        drop_message(&case.user, n, &message(n, "bob@remote.test", "x"), false);
    }
    assert_eq!(clock.run(&case, Mode::Pull), 0);
    assert_eq!(wait_delivered(&rcpt, 3).len(), 3);
    assert!(uids(&case).is_empty());
    assert!(case
        .rows()
        .iter()
        .all(|r| r.purged_at.is_some() && r.state == "delivered"));
}

#[test]
fn interval_limits_how_often_the_purge_runs() {
    let rcpt = new_recipient();
    let case = Case::new(
        &smtp(),
        &[&rcpt],
        "purge_after = \"1d\"\npurge_interval = \"2d\"",
    );
    let clock = Clocked::new();
    drop_message(&case.user, 0, &message(0, "bob@remote.test", "x"), false);
    clock.run(&case, Mode::Pull); // delivered; the purge ran, nothing was due
    clock.advance(DAY + 3600);
    clock.run(&case, Mode::Pull); // due, but the last purge is only 25 h old
    assert_eq!(uids(&case), vec![1]);
    clock.advance(DAY);
    clock.run(&case, Mode::Pull); // 49 h since the last purge: it runs
    assert!(uids(&case).is_empty());
}

#[test]
fn the_cap_holds() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "purge_after = \"1d\"\npurge_max = 2");
    let clock = Clocked::new();
    for n in 0..5 {
        drop_message(&case.user, n, &message(n, "bob@remote.test", "x"), false);
    }
    clock.run(&case, Mode::Pull);
    clock.advance(2 * DAY);
    clock.run(&case, Mode::Purge);
    assert_eq!(uids(&case), vec![3, 4, 5]);
    clock.run(&case, Mode::Purge);
    assert_eq!(uids(&case), vec![5]);
}

#[test]
fn changed_uidvalidity_removes_nothing_until_resynced() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "purge_after = \"1d\"");
    let clock = Clocked::new();
    for n in 0..3 {
        drop_message(&case.user, n, &message(n, "bob@remote.test", "x"), false);
    }
    clock.run(&case, Mode::Pull);
    let old = uidvalidity(&case.user);
    doveadm(&[
        "mailbox",
        "update",
        "-u",
        &case.user,
        "--uid-validity",
        &(old + 1000).to_string(),
        "INBOX",
    ]);
    clock.advance(2 * DAY);
    clock.run(&case, Mode::Purge);
    assert_eq!(
        uids(&case),
        vec![1, 2, 3],
        "nothing removed under a new UIDVALIDITY"
    );
    assert!(case.rows().iter().all(|r| r.purged_at.is_none()));
    // A pull re-keys the rows by Message-ID and size; then they go.
    clock.run(&case, Mode::Pull);
    assert!(uids(&case).is_empty());
    assert!(case
        .rows()
        .iter()
        .all(|r| r.uidvalidity == old + 1000 && r.purged_at.is_some()));
    assert_eq!(
        settle_delivered(&rcpt).len(),
        3,
        "and nothing was delivered twice"
    );
}

#[test]
fn dry_run_lists_and_touches_nothing_then_purge_removes() {
    let rcpt = new_recipient();
    let case = Case::new(
        &smtp(),
        &[&rcpt],
        "purge_after = \"0\"\npurge_interval = \"1000d\"",
    );
    drop_message(&case.user, 0, &message(0, "bob@remote.test", "x"), false);
    // Deliver with purge off, so the remote copies remain.
    let t = std::fs::read_to_string(&case.config).unwrap();
    std::fs::write(&case.config, t.replace("purge_after = \"0\"", "")).unwrap();
    assert_exit(&case.run(&["run"]), 0);
    std::fs::write(&case.config, &t).unwrap();
    let out = case.run(&["purge", "--dry-run"]);
    assert_exit(&out, 0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("INBOX: 1 to remove"), "{text}");
    assert!(
        text.contains("uid       1") && text.contains("<msg0."),
        "{text}"
    );
    assert!(text.contains("nothing was removed"), "{text}");
    assert_eq!(uids(&case), vec![1]);
    assert_exit(&case.run(&["purge"]), 0);
    assert!(uids(&case).is_empty());
}

fn fake_case(server: &MailServer, smtp: &FakeSmtp, extra: &str) -> Case {
    let case = Case::new(
        &smtp.url(),
        &["x@example.test"],
        &format!("initial = \"all\"\n{extra}"),
    );
    case.use_imap_at(server.port, "none");
    case
}

#[test]
fn without_uidplus_another_clients_deleted_message_is_not_expunged() {
    let server = MailServer::start("", (1..=3).map(fake_message).collect());
    // Message 3 is refused by the local server, so it is not ours; another
    // client has marked it \Deleted.
    let smtp = FakeSmtp::start(|n, _| {
        if n == 2 {
            "554 no".into()
        } else {
            "250 ok".into()
        }
    });
    server.state.lock().unwrap().inbox[2]
        .flags
        .insert("\\Deleted".into());
    let case = fake_case(&server, &smtp, "purge_after = \"0\"");
    let out = case.run(&["run"]);
    assert_exit(&out, 65);
    assert!(
        stderr(&out).contains("other message(s)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(server.inbox_uids(), vec![1, 2, 3]);
    assert!(!server.commands().iter().any(|c| c.contains("EXPUNGE")));
    assert!(case.rows().iter().all(|r| r.purged_at.is_none()));
    // Once the other client changed its mind, ours go with a plain EXPUNGE.
    server.state.lock().unwrap().inbox[2].flags.clear();
    assert_exit(&case.run(&["purge"]), 0);
    assert_eq!(server.inbox_uids(), vec![3]);
    assert!(server.commands().iter().any(|c| c.ends_with(" EXPUNGE")));
}

#[test]
fn gmail_moves_to_trash_instead_of_expunging() {
    let server = MailServer::start(
        "X-GM-EXT-1 MOVE UIDPLUS",
        (1..=3).map(fake_message).collect(),
    );
    let smtp = FakeSmtp::start(|_, _| "250 ok".into());
    let case = fake_case(&server, &smtp, "purge_after = \"0\"");
    assert_exit(&case.run(&["run"]), 0);
    assert!(server.inbox_uids().is_empty());
    assert_eq!(server.state.lock().unwrap().trash.len(), 3);
    let cmds = server.commands();
    assert!(
        cmds.iter()
            .any(|c| c.contains("UID MOVE 1:3 \"[Gmail]/Trash\"")),
        "{cmds:?}"
    );
    assert!(!cmds.iter().any(|c| c.contains("EXPUNGE")), "{cmds:?}");
}
