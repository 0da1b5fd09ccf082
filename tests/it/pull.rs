//! The one-shot pull against real servers: what a user would check.

use crate::fake::{fake_message, FakeSmtp};
use crate::harness::*;

#[test]
fn initial_unseen_delivers_unread_and_skips_read() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "");
    let msgs: Vec<Vec<u8>> = (0..4)
        .map(|n| message(n, "Bob <bob@remote.test>", &format!("body {n}")))
        .collect();
    drop_message(&case.user, 0, &msgs[0], true);
    drop_message(&case.user, 1, &msgs[1], false);
    drop_message(&case.user, 2, &msgs[2], true);
    drop_message(&case.user, 3, &msgs[3], false);
    let out = case.run(&["run"]);
    assert_exit(&out, 0);
    let got = wait_delivered(&rcpt, 2);
    assert_eq!(got.len(), 2, "only the two unread messages");
    let mut bodies: Vec<Vec<u8>> = got.iter().map(|f| split_delivered(f).body).collect();
    bodies.sort();
    let mut want = vec![as_stored(&msgs[1]), as_stored(&msgs[3])];
    want.sort();
    assert_eq!(bodies, want);
    let states: Vec<String> = case.rows().iter().map(|r| r.state.clone()).collect();
    assert_eq!(states.iter().filter(|s| *s == "skipped").count(), 2);
    assert_eq!(states.iter().filter(|s| *s == "delivered").count(), 2);
    // Everything is \Seen now: the two read ones were, the two pulled got it.
    assert!(flags(&case.user, "INBOX")
        .values()
        .all(|f| f.contains("\\Seen")));
    assert_eq!(settle_delivered(&rcpt).len(), 2);
}

#[test]
fn initial_all_delivers_everything() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "initial = \"all\"");
    for n in 0..3 {
        drop_message(&case.user, n, &message(n, "bob@remote.test", "x"), n == 0);
    }
    assert_exit(&case.run(&["run"]), 0);
    assert_eq!(wait_delivered(&rcpt, 3).len(), 3);
    assert!(case.rows().iter().all(|r| r.state == "delivered"));
}

#[test]
fn initial_none_only_sets_the_watermark() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "initial = \"none\"");
    for n in 0..3 {
        drop_message(&case.user, n, &message(n, "bob@remote.test", "old"), false);
    }
    assert_exit(&case.run(&["run"]), 0);
    assert!(case.rows().is_empty());
    // New mail after the first pass is pulled.
    drop_message(
        &case.user,
        10,
        &message(10, "bob@remote.test", "new"),
        false,
    );
    assert_exit(&case.run(&["run"]), 0);
    let got = wait_delivered(&rcpt, 1);
    assert_eq!(got.len(), 1);
    assert!(String::from_utf8_lossy(&got[0]).contains("\nnew\n"));
    assert_eq!(settle_delivered(&rcpt).len(), 1);
    let f = flags(&case.user, "INBOX");
    assert_eq!(
        f.values().filter(|f| f.contains("\\Seen")).count(),
        1,
        "old mail untouched: {f:?}"
    );
}

#[test]
fn second_pass_delivers_nothing_and_opens_no_smtp_session() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "");
    drop_message(&case.user, 0, &message(0, "bob@remote.test", "x"), false);
    assert_exit(&case.run(&["run"]), 0);
    assert_eq!(wait_delivered(&rcpt, 1).len(), 1);
    // The second pass is pointed at a counting server: it must not be used.
    let fake = FakeSmtp::start(|_, _| "250 ok".into());
    let text = std::fs::read_to_string(&case.config)
        .unwrap()
        .replace(&smtp(), &fake.url());
    std::fs::write(&case.config, text).unwrap();
    let out = case.run(&["run"]);
    assert_exit(&out, 0);
    assert!(stderr(&out).contains("nothing new"), "{}", stderr(&out));
    assert_eq!(
        fake.connections.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[test]
fn message_read_by_another_client_is_still_delivered() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "");
    assert_exit(&case.run(&["run"]), 0); // first contact, empty mailbox
                                         // A message arrives and someone reads it before our next pass.
    drop_message(
        &case.user,
        0,
        &message(0, "bob@remote.test", "read first"),
        true,
    );
    assert_exit(&case.run(&["run"]), 0);
    assert_eq!(wait_delivered(&rcpt, 1).len(), 1);
    assert_eq!(case.state_of(1), "delivered");
}

#[test]
fn awkward_messages_arrive_byte_for_byte() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "");
    let bare_lf =
        b"From: lf@remote.test\nSubject: bare LF\nMessage-ID: <lf@x>\n\nline one\nline two\n"
            .to_vec();
    let lone_dot = b"From: dot@remote.test\r\nSubject: dots\r\nMessage-ID: <dot@x>\r\n\r\nbefore\r\n.\r\n..two\r\n.after\r\nend".to_vec();
    let utf8 = "From: Jürgen <j@remote.test>\r\nSubject: =?UTF-8?Q?gr=C3=BC=C3=9Fe?=\r\nMessage-ID: <u8@x>\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln — ☃\r\n".as_bytes().to_vec();
    let no_return_path =
        b"Subject: no sender headers at all\r\nMessage-ID: <nrp@x>\r\n\r\nanonymous\r\n".to_vec();
    let with_return_path = b"Return-Path: <bounces@lists.remote.test>\r\nFrom: Person <person@remote.test>\r\nSubject: rp\r\nMessage-ID: <rp@x>\r\n\r\nx\r\n".to_vec();
    // 20 MB: a base64 attachment in 76-character lines.
    let mut big = b"From: big@remote.test\r\nSubject: big\r\nMessage-ID: <big@x>\r\nMIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n".to_vec();
    let line = [b'Q'; 76];
    while big.len() < 20 * 1024 * 1024 {
        big.extend_from_slice(&line);
        big.extend_from_slice(b"\r\n");
    }
    let msgs = [
        &bare_lf,
        &lone_dot,
        &utf8,
        &no_return_path,
        &with_return_path,
        &big,
    ];
    for (n, m) in msgs.iter().enumerate() {
        drop_message(&case.user, n as u32, m, false);
    }
    let out = case.run(&["run"]);
    assert_exit(&out, 0);
    let got = wait_delivered(&rcpt, msgs.len());
    assert_eq!(got.len(), msgs.len());
    for m in msgs {
        let want = as_stored(m);
        let d = got
            .iter()
            .map(|f| split_delivered(f))
            .find(|d| d.body == want)
            .unwrap_or_else(|| {
                panic!(
                    "no delivered copy of {:?}",
                    String::from_utf8_lossy(&m[..m.len().min(60)])
                )
            });
        assert_eq!(d.delivered_to, rcpt);
        assert!(
            d.imapull_received
                .contains(&format!("account {}, mailbox INBOX", case.user)),
            "{}",
            d.imapull_received
        );
        let expect_sender = match m.get(..12) {
            Some(b"From: lf@rem") => "<lf@remote.test>",
            Some(b"From: dot@re") => "<dot@remote.test>",
            Some(b"Subject: no ") => "<>",
            Some(b"Return-Path:") => "<bounces@lists.remote.test>",
            Some(b"From: big@re") => "<big@remote.test>",
            _ => "<j@remote.test>",
        };
        assert_eq!(d.return_path, expect_sender);
    }
    assert!(case
        .rows()
        .iter()
        .all(|r| r.state == "delivered" && r.flagged));
}

#[test]
fn lmtp_delivers_to_dovecot_per_recipient() {
    // Two IMAP users stand for two local mailboxes reached over Dovecot LMTP.
    let dest1 = new_user();
    let dest2 = new_user();
    let case = Case::new(
        &lmtp(),
        &[
            &format!("{dest1}@example.test"),
            &format!("{dest2}@example.test"),
        ],
        "",
    );
    drop_message(
        &case.user,
        0,
        &message(0, "bob@remote.test", "via lmtp"),
        false,
    );
    assert_exit(&case.run(&["run"]), 0);
    for d in [&dest1, &dest2] {
        assert_eq!(flags(d, "INBOX").len(), 1, "{d} got the message");
    }
    let row = &case.rows()[0];
    assert_eq!(row.state, "delivered");
    assert_eq!(row.delivered_to.len(), 2);
}

#[test]
fn lmtp_one_recipient_refused_quarantines_without_duplicating() {
    let dest = new_user();
    let good = format!("{dest}@example.test");
    let case = Case::new(&lmtp(), &[&good, "nosuchuser@example.test"], "");
    drop_message(&case.user, 0, &message(0, "bob@remote.test", "half"), false);
    let out = case.run(&["run"]);
    assert_exit(&out, 65);
    let row = &case.rows()[0];
    assert_eq!(row.state, "rejected");
    assert_eq!(row.delivered_to, vec![good.clone()]);
    assert!(
        row.last_reply.as_deref().unwrap().contains("nosuchuser"),
        "{row:?}"
    );
    assert_eq!(flags(&dest, "INBOX").len(), 1);
    // Not \Seen on the server: it is not delivered.
    assert!(!flags(&case.user, "INBOX")[&1].contains("\\Seen"));
    // A later pass does not send it again (quarantine is for the operator).
    assert_exit(&case.run(&["run"]), 0);
    assert_eq!(flags(&dest, "INBOX").len(), 1);
}

#[test]
fn postfix_5xx_on_one_message_quarantines_only_that_one() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "");
    for n in 0..5 {
        let from = if n == 2 {
            "reject5@remote.test"
        } else {
            "ok@remote.test"
        };
        drop_message(&case.user, n, &message(n, from, "x"), false);
    }
    let out = case.run(&["run"]);
    assert_exit(&out, 65);
    assert_eq!(wait_delivered(&rcpt, 4).len(), 4);
    assert_eq!(case.state_of(3), "rejected");
    let row = case.rows().into_iter().find(|r| r.uid == 3).unwrap();
    assert!(row.last_reply.unwrap().contains("554"));
    let f = flags(&case.user, "INBOX");
    assert!(!f[&3].contains("\\Seen"));
    assert_eq!(f.values().filter(|f| f.contains("\\Seen")).count(), 4);
    assert_eq!(settle_delivered(&rcpt).len(), 4);
}

#[test]
fn fourxx_on_message_k_is_retried_alone_next_pass() {
    let case = Case::new("smtp://127.0.0.1:1", &["x@example.test"], "");
    for n in 0..5 {
        drop_message(
            &case.user,
            n,
            &message(n, "bob@remote.test", &format!("m{n}")),
            false,
        );
    }
    // The 3rd message (n = 2) is deferred once.
    let fake = FakeSmtp::start(|n, _| {
        if n == 2 {
            "451 4.3.0 try again".into()
        } else {
            "250 ok".into()
        }
    });
    let set = |url: &str| {
        let t = std::fs::read_to_string(&case.config).unwrap();
        let t = t
            .lines()
            .map(|l| {
                if l.starts_with("deliver") {
                    format!("deliver = {url:?}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&case.config, t).unwrap();
    };
    set(&fake.url());
    let out = case.run(&["run"]);
    assert_exit(&out, 75);
    assert_eq!(fake.messages().len(), 4);
    assert!(fake
        .messages()
        .iter()
        .all(|m| m.sender == "bob@remote.test" && m.recipients == ["x@example.test"]));
    assert_eq!(case.state_of(3), "deferred");
    assert!(!flags(&case.user, "INBOX")[&3].contains("\\Seen"));
    // Next pass: only the deferred one is sent, and it goes through.
    let out = case.run(&["run"]);
    assert_exit(&out, 0);
    let got = fake.messages();
    assert_eq!(got.len(), 5);
    assert!(String::from_utf8_lossy(&got[4].data).contains("m2"));
    let row = case.rows().into_iter().find(|r| r.uid == 3).unwrap();
    assert_eq!((row.state.as_str(), row.attempts), ("delivered", 2));
    assert!(flags(&case.user, "INBOX")
        .values()
        .all(|f| f.contains("\\Seen")));
}

#[test]
fn smtp_server_down_defers_and_leaves_mail_on_the_server() {
    // Nothing listens on port 1.
    let case = Case::new(
        "smtp://127.0.0.1:1",
        &["x@example.test"],
        // One session, so that no other attempt is under way when the
        // third deferral stops the pass.
        "max_deferrals = 3\ndelivery_sessions = 1",
    );
    for n in 0..5 {
        drop_message(&case.user, n, &message(n, "bob@remote.test", "x"), false);
    }
    let out = case.run(&["run"]);
    assert_exit(&out, 75);
    assert!(
        stderr(&out).contains("stopping this pass"),
        "{}",
        stderr(&out)
    );
    let rows = case.rows();
    assert_eq!(rows.len(), 3, "the pass stopped after 3 deferrals");
    assert!(rows.iter().all(|r| r.state == "deferred"));
    assert!(flags(&case.user, "INBOX")
        .values()
        .all(|f| !f.contains("\\Seen")));
    // Once the server is back, everything goes, the deferred ones first.
    let rcpt = new_recipient();
    let t = std::fs::read_to_string(&case.config)
        .unwrap()
        .replace("smtp://127.0.0.1:1", &smtp())
        .replace("x@example.test", &rcpt);
    std::fs::write(&case.config, t).unwrap();
    assert_exit(&case.run(&["run"]), 0);
    assert_eq!(wait_delivered(&rcpt, 5).len(), 5);
}

#[test]
fn sender_can_be_fixed_and_received_switched_off() {
    let rcpt = new_recipient();
    let case = Case::new(
        &smtp(),
        &[&rcpt],
        "sender = \"fetch@example.org\"\nadd_received = false",
    );
    let m = message(0, "bob@remote.test", "x");
    drop_message(&case.user, 0, &m, false);
    assert_exit(&case.run(&["run"]), 0);
    let got = wait_delivered(&rcpt, 1);
    let d = split_delivered(&got[0]);
    assert_eq!(d.return_path, "<fetch@example.org>");
    assert!(d.imapull_received.is_empty());
    assert!(got[0].ends_with(&as_stored(&m)));
}

#[test]
fn mark_seen_false_leaves_flags_alone() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "mark_seen = false");
    drop_message(&case.user, 0, &message(0, "bob@remote.test", "x"), false);
    assert_exit(&case.run(&["run"]), 0);
    assert_eq!(wait_delivered(&rcpt, 1).len(), 1);
    assert!(!flags(&case.user, "INBOX")[&1].contains("\\Seen"));
    // ... and it is still not delivered twice.
    assert_exit(&case.run(&["run"]), 0);
    assert_eq!(settle_delivered(&rcpt).len(), 1);
}

#[test]
fn several_mailboxes_and_starttls() {
    let rcpt = new_recipient();
    let user = new_user();
    doveadm(&["mailbox", "create", "-u", &user, "Lists/rust"]);
    let port = crate::harness::env().imap_port;
    let case = Case::for_user(
        user.clone(),
        &smtp(),
        &[&rcpt],
        &format!("mailboxes = [\"INBOX\", \"Lists/rust\"]\ntls = \"starttls\"\nport = {port}"),
    );
    // Case::for_user wrote the IMAPS port first; the account's own `port`
    // line comes later, so replace the first one.
    let t = std::fs::read_to_string(&case.config).unwrap();
    let t = t.replacen(
        &format!("port = {}\n", crate::harness::env().imaps_port),
        "",
        1,
    );
    std::fs::write(&case.config, t).unwrap();
    drop_message(&user, 0, &message(0, "bob@remote.test", "inbox"), false);
    let m = message(1, "list@remote.test", "list");
    let out = std::process::Command::new("doveadm")
        .arg("-c")
        .arg(&crate::harness::env().dovecot_conf)
        .args(["save", "-u", &user, "-m", "Lists/rust"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&m)?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success());
    let out = case.run(&["run"]);
    assert_exit(&out, 0);
    assert_eq!(wait_delivered(&rcpt, 2).len(), 2);
    let mailboxes: Vec<String> = case.rows().iter().map(|r| r.mailbox.clone()).collect();
    assert_eq!(mailboxes, vec!["INBOX", "Lists/rust"]);
}

#[test]
fn message_over_the_servers_size_limit_is_quarantined_unsent() {
    let fake = FakeSmtp::with_size(1000, |_, _| "250 ok".into());
    let case = Case::new(&fake.url(), &["x@example.test"], "");
    drop_message(
        &case.user,
        0,
        &message(0, "bob@remote.test", "small"),
        false,
    );
    drop_message(
        &case.user,
        1,
        &message(1, "bob@remote.test", &"big ".repeat(500)),
        false,
    );
    drop_message(
        &case.user,
        2,
        &message(2, "bob@remote.test", "small too"),
        false,
    );
    let out = case.run(&["run"]);
    assert_exit(&out, 65);
    assert_eq!(fake.messages().len(), 2, "the big one was never sent");
    let row = case.rows().into_iter().find(|r| r.uid == 2).unwrap();
    assert_eq!(row.state, "rejected");
    assert!(row
        .last_reply
        .unwrap()
        .contains("over the SIZE limit of 1000"));
    assert!(!flags(&case.user, "INBOX")[&2].contains("\\Seen"));
}

/// A local server slow to answer (30 ms a message) for the tests of
/// several sessions: what `look` made of each message when its "." came
/// (given the ledger and the message), and the most messages that waited
/// for their reply at once.
struct SlowSmtp<T> {
    fake: FakeSmtp,
    ledger: std::sync::Arc<std::sync::OnceLock<std::path::PathBuf>>,
    most_waiting: std::sync::Arc<std::sync::atomic::AtomicU32>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<T>>>,
}

impl<T: Clone + Send + 'static> SlowSmtp<T> {
    fn start(
        look: impl Fn(usize, &rusqlite::Connection, &crate::fake::Got) -> T + Send + Sync + 'static,
    ) -> SlowSmtp<T> {
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::sync::Arc;
        let ledger: Arc<std::sync::OnceLock<std::path::PathBuf>> = Arc::default();
        let waiting = Arc::new(AtomicU32::new(0));
        let most_waiting = Arc::new(AtomicU32::new(0));
        let seen: Arc<std::sync::Mutex<Vec<T>>> = Arc::default();
        let fake = {
            let (ledger, most_waiting, seen) = (ledger.clone(), most_waiting.clone(), seen.clone());
            FakeSmtp::start(move |n, got| {
                let now = waiting.fetch_add(1, Ordering::SeqCst) + 1;
                most_waiting.fetch_max(now, Ordering::SeqCst);
                let db = rusqlite::Connection::open(ledger.get().unwrap()).unwrap();
                db.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
                seen.lock().unwrap().push(look(n, &db, got));
                // Slow to answer: another session's "." would come
                // meanwhile, unless the sessions are kept in turn.
                std::thread::sleep(std::time::Duration::from_millis(30));
                waiting.fetch_sub(1, Ordering::SeqCst);
                "250 ok".into()
            })
        };
        SlowSmtp {
            fake,
            ledger,
            most_waiting,
            seen,
        }
    }

    /// A pass of 12 messages, some large (so that bodies are still on the
    /// wire while others end), with `settings`; what `look` saw.
    fn pass(&self, settings: &str) -> (Case, Vec<T>) {
        let case = Case::new(&self.fake.url(), &["x@example.test"], settings);
        self.ledger.set(case.ledger.clone()).unwrap();
        for n in 0..12 {
            let body = "x".repeat(if n % 3 == 0 { 300_000 } else { 100 });
            drop_message(&case.user, n, &message(n, "bob@remote.test", &body), false);
        }
        assert_exit(&case.run(&["run"]), 0);
        let seen = self.seen.lock().unwrap().clone();
        (case, seen)
    }

    fn most_waiting(&self) -> u32 {
        self.most_waiting.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A header's value in a message as the local server got it.
fn header_of(got: &crate::fake::Got, name: &str) -> String {
    let text = String::from_utf8_lossy(&got.data);
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or("?")
        .trim()
        .to_string()
}

/// With several delivery sessions, messages still complete one at a time
/// and in UID order: when the local server gets a message's final ".", the
/// ledger already holds every message before it, and no other message is
/// waiting for its reply (the duplicate window stays one message).
#[test]
fn parallel_sessions_complete_one_message_at_a_time_in_uid_order() {
    let smtp = rows_at_each_end();
    let (_case, seen) = smtp.pass("delivery_sessions = 3\n");
    assert!(
        smtp.fake
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 2,
        "more than one session was used"
    );
    assert_eq!(smtp.most_waiting(), 1);
    each_ended_after_the_ones_before(&seen, "three sessions");
}

/// A local server that looks, at each message's final ".", how many
/// messages the ledger has delivered; and the message's subject.
fn rows_at_each_end() -> SlowSmtp<(usize, i64, String)> {
    SlowSmtp::start(|n, db, got| {
        let recorded: i64 = db
            .query_row(
                "SELECT count(*) FROM message WHERE state = 'delivered'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        (n, recorded, header_of(got, "Subject: "))
    })
}

/// What [`rows_at_each_end`] saw of the 12 messages: each ended in UID
/// order, with every message before it in the ledger already.
fn each_ended_after_the_ones_before(seen: &[(usize, i64, String)], what: &str) {
    assert_eq!(seen.len(), 12, "{what}");
    for (n, recorded, subject) in seen {
        assert_eq!(
            *recorded, *n as i64,
            "{what}: ledger rows when message {n} ended"
        );
        assert_eq!(*subject, format!("message {n}"), "{what}: UID order");
    }
}

/// With one delivery session (the default), a message's record is made
/// while the next message's body goes out, and still before that
/// message's final ".": when the local server gets a message's ".", the
/// ledger holds every message before it, with either durability.
#[test]
fn one_session_records_each_message_before_the_next_one_ends() {
    for durability in ["grouped", "message"] {
        let smtp = rows_at_each_end();
        let (case, seen) = smtp.pass(&format!("durability = \"{durability}\"\n"));
        each_ended_after_the_ones_before(&seen, durability);
        let rows = case.rows();
        assert_eq!(rows.len(), 12, "{durability}");
        assert!(rows.iter().all(|r| r.state == "delivered"), "{durability}");
    }
}

/// With `independent_sessions`, the sessions accept messages side by side,
/// and each keeps the promise for its own: when the local server gets a
/// message's final ".", the ledger holds every message that session
/// delivered before it. Nothing is delivered twice or left out.
#[test]
fn independent_sessions_accept_side_by_side_each_in_its_own_order() {
    // Per message: the session's thread, its Message-ID, and what the
    // ledger had delivered when its "." came.
    let smtp = SlowSmtp::start(|_, db, got| {
        let recorded: Vec<String> = db
            .prepare("SELECT message_id FROM message WHERE state = 'delivered'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        (
            std::thread::current().id(),
            header_of(got, "Message-ID: "),
            recorded,
        )
    });
    let (case, seen) = smtp.pass("delivery_sessions = 3\nindependent_sessions = true\n");
    assert!(
        smtp.most_waiting() >= 2,
        "sessions waited for their replies at the same time"
    );
    let mut ids: Vec<&String> = seen.iter().map(|(_, id, _)| id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((seen.len(), ids.len()), (12, 12), "each message once");
    for (i, (session, id, recorded)) in seen.iter().enumerate() {
        for (_, before, _) in seen[..i].iter().filter(|(s, _, _)| s == session) {
            assert!(
                recorded.contains(before),
                "{before} was recorded before its session sent {id}"
            );
        }
    }
    let rows = case.rows();
    assert_eq!(rows.len(), 12);
    assert!(rows.iter().all(|r| r.state == "delivered"));
}

/// Over a link with a round trip (a scripted server that waits 5 ms before
/// each answer), the next batch's FETCH goes out before the current one
/// ends: 40 messages of 1 MB in three batches, each fetched and delivered
/// once, in UID order, and the pass ends cleanly.
#[test]
fn batches_sent_ahead_on_a_slow_link_fetch_each_message_once() {
    use std::time::Duration;
    let messages: Vec<Vec<u8>> = (1..=40)
        .map(|n| message(n, "bob@remote.test", &format!("{n:>7}\r\n").repeat(110_000)))
        .collect();
    let server = crate::fake::MailServer::start("UIDPLUS", messages);
    server.state.lock().unwrap().delay = Duration::from_millis(5);
    let smtp = FakeSmtp::start(|_, _| "250 ok".into());
    let case = Case::new(
        &smtp.url(),
        &["x@example.test"],
        "initial = \"all\"\ncompress = false",
    );
    case.use_imap_at(server.port, "none");
    let out = case.run(&["-v", "run"]);
    assert_exit(&out, 0);
    assert!(
        stderr(&out).contains("the next UID FETCH goes out ahead"),
        "{}",
        stderr(&out)
    );
    let subjects: Vec<String> = smtp
        .messages()
        .iter()
        .map(|m| {
            let text = String::from_utf8_lossy(&m.data[..2000]).to_string();
            text.lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();
    let want: Vec<String> = (1..=40).map(|n| format!("message {n}")).collect();
    assert_eq!(subjects, want);
    let bodies: Vec<String> = server
        .commands()
        .into_iter()
        .filter(|c| c.contains("BODY.PEEK[]"))
        .collect();
    assert!(bodies.len() >= 3, "{bodies:?}");
    assert_eq!(case.rows().len(), 40);
}

/// When delivery stops early, only the rest of the current FETCH batch
/// (about 16 MB) is still downloaded, not the whole mailbox.
#[test]
fn a_pass_stopped_early_does_not_download_the_whole_mailbox() {
    let case = Case::new(
        "smtp://127.0.0.1:1",
        &["x@example.test"],
        "max_deferrals = 2\ndelivery_sessions = 1\ncompress = false",
    );
    // 12 messages of 3 MB: 36 MB, in batches of five.
    for n in 0..12 {
        let body = format!("{n}").repeat(3_000_000);
        drop_message(&case.user, n, &message(n, "bob@remote.test", &body), false);
    }
    let out = case.run(&["-v", "run"]);
    assert_exit(&out, 75);
    let log = stderr(&out);
    assert_eq!(case.rows().len(), 2, "{log}");
    let bytes_in: u64 = log
        .split("bytes_in=")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no bytes_in in the log: {log}"));
    assert!(
        bytes_in < 17_000_000,
        "{bytes_in} bytes downloaded for a pass that stopped after two messages"
    );
}

/// An emptied mailbox (UIDNEXT moved, nothing left): some servers refuse a
/// FETCH of a set whose "*" names no message, where a SEARCH was fine. The
/// discovery that went out with the SELECT is refused here; `decide::scan`
/// ends the pass at the SELECT's EXISTS 0, so the refusal is no failure,
/// and nothing more is asked.
#[test]
fn an_emptied_mailbox_is_not_fetched_from() {
    let server = crate::fake::MailServer::start("UIDPLUS", (1..=3).map(fake_message).collect());
    {
        let mut st = server.state.lock().unwrap();
        st.inbox.clear();
        st.fault = Some(("UID FETCH".into(), crate::fake::Fault::Bad));
        st.sticky = true;
    }
    let smtp = FakeSmtp::start(|_, _| "250 ok".into());
    let case = Case::new(&smtp.url(), &["x@example.test"], "initial = \"all\"");
    case.use_imap_at(server.port, "none");
    assert_exit(&case.run(&["run"]), 0);
    let cmds = server.commands();
    assert!(cmds.iter().any(|c| c.contains(" SELECT ")), "{cmds:?}");
    let fetches: Vec<&String> = cmds.iter().filter(|c| c.contains("FETCH")).collect();
    assert_eq!(fetches.len(), 1, "{cmds:?}");
    assert!(
        fetches[0].ends_with("UID FETCH 1:* (UID RFC822.SIZE)"),
        "{cmds:?}"
    );
    assert!(smtp.messages().is_empty());
}
