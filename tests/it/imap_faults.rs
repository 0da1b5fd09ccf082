//! The whole pass against a scripted IMAP server that answers one command
//! NO, BAD, BYE, or hangs up: for every command a pass sends, with each
//! `initial`. What must hold after the faulty run: nothing marked `\Seen`
//! that was not delivered, nothing recorded that did not happen, the
//! watermark not past anything unproven, and a run that exits 0 delivered
//! everything. After one clean run, every message is delivered exactly
//! once. The cases run in parallel, each with its own servers.

use std::collections::BTreeMap;

use crate::fake::{fake_message, FakeSmtp, Fault, MailServer};
use crate::harness::{stderr, Case};

/// What a fault is injected into: a substring of the command line.
const COMMANDS: &[&str] = &[
    "CAPABILITY",
    "LOGIN",
    "SELECT",
    "UID SEARCH",
    "RFC822.SIZE)",
    "BODY.PEEK[HEADER]",
    "BODY.PEEK[]",
    "UID STORE",
    "LOGOUT",
];

const FAULTS: &[Fault] = &[Fault::No, Fault::Bad, Fault::Bye, Fault::Drop];

/// Four messages; message 2 was read by another client before the first
/// pass, so `initial = "unseen"` skips it.
fn server() -> MailServer {
    let server = MailServer::start("UIDPLUS", (1..=4).map(fake_message).collect());
    server.state.lock().unwrap().inbox[1]
        .flags
        .insert("\\Seen".into());
    server
}

fn expected(initial: &str) -> Vec<u32> {
    match initial {
        "all" => vec![1, 2, 3, 4],
        "unseen" => vec![1, 3, 4],
        _ => vec![],
    }
}

/// Which UIDs the local server received, and how often.
fn received(smtp: &FakeSmtp) -> BTreeMap<u32, usize> {
    let mut got = BTreeMap::new();
    for m in smtp.messages() {
        let text = String::from_utf8_lossy(&m.data).into_owned();
        let uid = (1..=9u32)
            .find(|u| text.contains(&format!("Subject: fake {u}\r\n")))
            .unwrap_or_else(|| panic!("an unknown message: {text}"));
        *got.entry(uid).or_default() += 1;
    }
    got
}

fn seen_on_server(server: &MailServer) -> Vec<u32> {
    let st = server.state.lock().unwrap();
    st.inbox
        .iter()
        .filter(|m| m.flags.contains("\\Seen"))
        .map(|m| m.uid)
        .collect()
}

/// One case: the faulty run, the checks, a clean run, the checks.
fn case(command: &str, fault: Fault, initial: &str) -> Result<(), String> {
    let label = format!("{fault:?} to {command} with initial = {initial}");
    let server = server();
    let smtp = FakeSmtp::start(|_, _| "250 ok".into());
    server.state.lock().unwrap().fault = Some((command.to_string(), fault));
    let c = Case::new(
        &smtp.url(),
        &["x@example.test"],
        &format!("initial = \"{initial}\"\nimap_timeout = \"10s\""),
    );
    c.use_imap_at(server.port, "none");
    let want = expected(initial);

    let out = c.run(&["run"]);
    let got = received(&smtp);
    let rows = c.rows();
    let check = |what: &str, ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(format!("{label}: {what}\n{}", stderr(&out)))
        }
    };
    // Nothing marked \Seen that was not delivered (2 was seen already).
    for uid in seen_on_server(&server) {
        check(
            &format!("UID {uid} is \\Seen but was not delivered"),
            uid == 2 || got.contains_key(&uid),
        )?;
    }
    // Nothing recorded as delivered that the server did not get; nothing
    // recorded as skipped that was unread.
    for r in &rows {
        match r.state.as_str() {
            "delivered" => check(
                &format!("row {} delivered, never received", r.uid),
                got.contains_key(&r.uid),
            )?,
            "skipped" => check(&format!("row {} skipped", r.uid), r.uid == 2)?,
            s => check(&format!("row {} in state {s}", r.uid), false)?,
        }
    }
    // The watermark is not past a message that has no row.
    let ledger = imapull::ledger::Ledger::open(&c.ledger).unwrap();
    if let Some(st) = ledger.mailbox_state(&c.user, "INBOX").unwrap() {
        for uid in &want {
            if !rows.iter().any(|r| r.uid == *uid) {
                check(
                    &format!("watermark {} is past unrecorded UID {uid}", st.watermark),
                    st.watermark <= *uid,
                )?;
            }
        }
    }
    // Exit 0 only when everything is done.
    if out.status.code() == Some(0) {
        check(
            "exit 0 with messages left undelivered",
            got.keys().copied().collect::<Vec<_>>() == want,
        )?;
    }

    // A clean run finishes the job, and nothing comes twice.
    let again = c.run(&["run"]);
    let got = received(&smtp);
    let check = |what: &str, ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(format!("{label}, second run: {what}\n{}", stderr(&again)))
        }
    };
    check("exit code", again.status.code() == Some(0))?;
    check(
        &format!("received {got:?}, want each of {want:?} once"),
        got.keys().copied().collect::<Vec<_>>() == want && got.values().all(|n| *n == 1),
    )?;
    let mut seen = seen_on_server(&server);
    seen.retain(|u| *u != 2);
    let mut want_seen = want.clone();
    want_seen.retain(|u| *u != 2);
    check(&format!("\\Seen on {seen:?}"), seen == want_seen)?;
    Ok(())
}

/// Runs `cases` on a few threads; returns every failure.
fn in_parallel(cases: Vec<(String, Fault, String)>) -> Vec<String> {
    let cases = std::sync::Mutex::new(cases);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let Some((cmd, fault, initial)) = cases.lock().unwrap().pop() else {
                    return;
                };
                if let Err(e) = case(&cmd, fault, &initial) {
                    failures.lock().unwrap().push(e);
                }
            });
        }
    });
    failures.into_inner().unwrap()
}

#[test]
fn every_command_failing_every_way_loses_nothing() {
    let mut cases = Vec::new();
    for command in COMMANDS {
        for &fault in FAULTS {
            for initial in ["all", "unseen", "none"] {
                cases.push((command.to_string(), fault, initial.to_string()));
            }
        }
    }
    let failures = in_parallel(cases);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The reported case: a NO to UID SEARCH on the first pass with
/// `initial = "all"` made the mailbox look empty, for good. New mail is now
/// found by a UID FETCH of the UIDs and sizes from the watermark on (sent
/// with the SELECT, and once more alone if refused there); a NO to it is
/// no empty mailbox either.
#[test]
fn new_mail_search_answered_no_is_not_an_empty_mailbox() {
    let server = server();
    let smtp = FakeSmtp::start(|_, _| "250 ok".into());
    {
        let mut st = server.state.lock().unwrap();
        st.fault = Some(("UID FETCH 1:* (UID RFC822.SIZE)".into(), Fault::No));
        st.sticky = true;
    }
    let c = Case::new(&smtp.url(), &["x@example.test"], "initial = \"all\"");
    c.use_imap_at(server.port, "none");
    let out = c.run(&["run"]);
    assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("NO [UNAVAILABLE] injected"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("nothing new"), "{}", stderr(&out));
    assert!(smtp.messages().is_empty());
    server.state.lock().unwrap().fault = None;
    crate::harness::assert_exit(&c.run(&["run"]), 0);
    assert_eq!(received(&smtp).len(), 4);
}

/// A server that sends everything real servers send unasked, before every
/// reply and between FETCH items: the pass does not notice.
#[test]
fn a_chatty_server_changes_nothing() {
    let server = server();
    server.state.lock().unwrap().chatty = true;
    let smtp = FakeSmtp::start(|_, _| "250 ok".into());
    let c = Case::new(&smtp.url(), &["x@example.test"], "initial = \"unseen\"");
    c.use_imap_at(server.port, "none");
    crate::harness::assert_exit(&c.run(&["run"]), 0);
    let got = received(&smtp);
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![1, 3, 4]);
    assert_eq!(seen_on_server(&server), vec![1, 2, 3, 4]);
}

/// Another client expunges message 3 while the FETCH runs: the others are
/// delivered once, each with its own bytes, and nothing is mislabelled.
#[test]
fn an_expunge_during_the_fetch_mislabels_nothing() {
    let server = server();
    server.state.lock().unwrap().expunge_mid_fetch = Some(3);
    let smtp = FakeSmtp::start(|_, _| "250 ok".into());
    let c = Case::new(&smtp.url(), &["x@example.test"], "initial = \"all\"");
    c.use_imap_at(server.port, "none");
    crate::harness::assert_exit(&c.run(&["run"]), 0);
    for m in smtp.messages() {
        let text = String::from_utf8_lossy(&m.data).into_owned();
        let uid: u32 = text
            .split("Subject: fake ")
            .nth(1)
            .and_then(|r| r.split("\r\n").next())
            .and_then(|u| u.parse().ok())
            .unwrap();
        assert!(m.data.ends_with(&fake_message(uid)));
    }
    assert_eq!(
        received(&smtp).keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 4]
    );
    let rows = c.rows();
    let recorded: Vec<(u32, String)> = rows.iter().map(|r| (r.uid, r.state.clone())).collect();
    assert_eq!(
        recorded,
        vec![
            (1, "delivered".to_string()),
            (2, "delivered".to_string()),
            (4, "delivered".to_string())
        ]
    );
    crate::harness::assert_exit(&c.run(&["run"]), 0);
    assert_eq!(smtp.messages().len(), 3);
}

/// A message over max_message_size is quarantined with the reason and not
/// fetched; the others are delivered.
#[test]
fn a_message_over_max_message_size_is_quarantined_unfetched() {
    let mut msgs: Vec<Vec<u8>> = (1..=3).map(fake_message).collect();
    msgs[1].extend(std::iter::repeat_n(b'x', 4000));
    msgs[1].extend_from_slice(b"\r\n");
    let server = MailServer::start("UIDPLUS", msgs);
    let smtp = FakeSmtp::start(|_, _| "250 ok".into());
    let c = Case::new(
        &smtp.url(),
        &["x@example.test"],
        "initial = \"all\"\nmax_message_size = \"2K\"",
    );
    c.use_imap_at(server.port, "none");
    let out = c.run(&["run"]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "a quarantined message fails the run"
    );
    assert_eq!(
        received(&smtp).keys().copied().collect::<Vec<_>>(),
        vec![1, 3]
    );
    assert_eq!(c.state_of(2), "rejected");
    let row = c.rows().into_iter().find(|r| r.uid == 2).unwrap();
    let reply = row.last_reply.unwrap_or_default();
    assert!(reply.contains("max_message_size"), "{reply}");
    // Its body was never asked for.
    let fetches: Vec<String> = server
        .commands()
        .into_iter()
        .filter(|l| l.contains("BODY.PEEK[]"))
        .collect();
    assert!(
        fetches
            .iter()
            .all(|l| !l.contains(" 2 ") && !l.contains("1:3")),
        "{fetches:?}"
    );
    assert!(!seen_on_server(&server).contains(&2));
}

/// A mailbox the ledger knows: the discovery goes out with the SELECT. A
/// refusal of it there is asked again alone, and mail comes; a refusal of
/// both, a BYE or a drop ends the run with an error, delivers nothing, and
/// the next run delivers the new mail once.
#[test]
fn a_fault_to_the_discovery_sent_with_the_select_loses_nothing() {
    for (fault, sticky) in [
        (Fault::No, false),
        (Fault::Bad, false),
        (Fault::No, true),
        (Fault::Bye, false),
        (Fault::Drop, false),
    ] {
        let label = format!("{fault:?}, sticky {sticky}");
        let server = server();
        let smtp = FakeSmtp::start(|_, _| "250 ok".into());
        let c = Case::new(
            &smtp.url(),
            &["x@example.test"],
            "initial = \"all\"\nimap_timeout = \"10s\"",
        );
        c.use_imap_at(server.port, "none");
        crate::harness::assert_exit(&c.run(&["run"]), 0);
        assert_eq!(received(&smtp).len(), 4, "{label}");
        {
            let mut st = server.state.lock().unwrap();
            st.inbox.push(crate::fake::Msg {
                uid: 5,
                flags: Default::default(),
                body: fake_message(5),
            });
            st.uidnext = 6;
            st.log.clear();
            st.fault = Some(("UID FETCH 5:* (UID RFC822.SIZE)".into(), fault));
            st.sticky = sticky;
        }
        let out = c.run(&["run"]);
        let log: Vec<String> = server
            .commands()
            .iter()
            .map(|l| l.split_once(' ').map_or("", |(_, c)| c).to_string())
            .collect();
        let select = log.iter().position(|l| l.starts_with("SELECT")).unwrap();
        assert_eq!(
            log[select + 1],
            "UID FETCH 5:* (UID RFC822.SIZE)",
            "{label}: {log:?}"
        );
        if matches!(fault, Fault::No | Fault::Bad) && !sticky {
            crate::harness::assert_exit(&out, 0);
            assert_eq!(log[select + 2], log[select + 1], "{label}: asked again");
            assert_eq!(received(&smtp).get(&5), Some(&1), "{label}");
        } else {
            assert_ne!(out.status.code(), Some(0), "{label}: {}", stderr(&out));
            assert!(!received(&smtp).contains_key(&5), "{label}");
            assert!(!stderr(&out).contains("nothing new"), "{label}");
            {
                let mut st = server.state.lock().unwrap();
                st.fault = None;
                st.sticky = false;
            }
            crate::harness::assert_exit(&c.run(&["run"]), 0);
            assert_eq!(received(&smtp).get(&5), Some(&1), "{label}");
        }
        assert!(
            received(&smtp).values().all(|n| *n == 1),
            "{label}: {:?}",
            received(&smtp)
        );
    }
}

/// The discovery sent with the SELECT is refused where the SELECT shows
/// there is nothing to discover (as some servers refuse `n:*` in an empty
/// mailbox): the pass needed no discovery, and is no failure.
#[test]
fn a_refused_discovery_the_pass_did_not_need_is_no_failure() {
    let server = server();
    let smtp = FakeSmtp::start(|_, _| "250 ok".into());
    let c = Case::new(&smtp.url(), &["x@example.test"], "initial = \"all\"");
    c.use_imap_at(server.port, "none");
    crate::harness::assert_exit(&c.run(&["run"]), 0);
    {
        let mut st = server.state.lock().unwrap();
        st.inbox.clear();
        st.log.clear();
        st.fault = Some(("UID FETCH 5:* (UID RFC822.SIZE)".into(), Fault::Bad));
        st.sticky = true;
    }
    let out = c.run(&["run"]);
    crate::harness::assert_exit(&out, 0);
    let log = server.commands();
    assert!(
        log.iter()
            .any(|l| l.ends_with("UID FETCH 5:* (UID RFC822.SIZE)")),
        "{log:?}"
    );
    assert_eq!(received(&smtp).len(), 4);
}
