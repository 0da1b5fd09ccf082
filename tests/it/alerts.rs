//! Alerts: one notice when something needs the operator, one when it is
//! over, nothing in between and nothing twice across a restart; a notice
//! the local server refuses is held and sent later.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::daemon::Daemon;
use crate::fake::{fake_message, FakeSmtp, Fault, Got, MailServer};
use crate::harness::*;

const POSTMASTER: &str = "postmaster@example.test";

fn notices(smtp: &FakeSmtp) -> Vec<Got> {
    smtp.messages()
        .into_iter()
        .filter(|g| g.recipients.iter().any(|r| r == POSTMASTER))
        .collect()
}

fn subject(g: &Got) -> String {
    let text = String::from_utf8_lossy(&g.data).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("Subject: "))
        .unwrap_or_default()
        .to_string()
}

#[track_caller]
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "waited for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn logins(server: &MailServer) -> usize {
    server
        .commands()
        .iter()
        .filter(|c| c.contains(" LOGIN "))
        .count()
}

#[test]
fn a_login_that_starts_failing_under_the_daemon_gives_one_notice_and_one_on_recovery() {
    let server = MailServer::start("IDLE UIDPLUS", vec![fake_message(1)]);
    let smtp = FakeSmtp::start(|_, _| "250 ok".into());
    let case = Case::new(
        &smtp.url(),
        &["x@example.test"],
        &format!(
            "initial = \"all\"\ncatchup_interval = \"1h\"\nalert_to = \"{POSTMASTER}\"\n\
             alert_after = \"3s\""
        ),
    );
    case.use_imap_at(server.port, "none");
    let d = Daemon::start(&case);
    d.wait_log("delivered mailbox", 1);
    // The password is changed on the server: every login is refused.
    {
        let mut st = server.state.lock().unwrap();
        st.fault = Some(("LOGIN".into(), Fault::No));
        st.sticky = true;
    }
    let before = logins(&server);
    server.hang_up();
    wait_for("a refused login", || logins(&server) > before);
    // Failing, but not for alert_after yet (the first refused login comes
    // a backoff of at most a second after the drop): nothing told.
    assert!(notices(&smtp).is_empty());
    std::thread::sleep(Duration::from_millis(3100));
    // Each try (SIGUSR1 skips the backoff) looks again: one notice only.
    for _ in 0..3 {
        let n = logins(&server);
        d.wake();
        wait_for("another refused login", || logins(&server) > n);
        std::thread::sleep(Duration::from_millis(300));
    }
    let got = notices(&smtp);
    assert_eq!(
        got.len(),
        1,
        "{:?}",
        got.iter().map(subject).collect::<Vec<_>>()
    );
    let s = subject(&got[0]);
    assert!(s.contains(&case.user) && s.contains("failing since"), "{s}");
    let text = String::from_utf8_lossy(&got[0].data).into_owned();
    assert!(text.contains("injected"), "the server's words: {text}");
    assert!(
        text.contains(&format!("imapull check {}", case.user)),
        "{text}"
    );
    assert_eq!(got[0].sender, "", "a notice has the null sender");
    // The password is fixed: one notice that it works again.
    {
        let mut st = server.state.lock().unwrap();
        st.fault = None;
        st.sticky = false;
    }
    d.wake();
    wait_for("the recovery notice", || notices(&smtp).len() == 2);
    assert!(subject(&notices(&smtp)[1]).contains("working again"));
    assert_eq!(d.stop().0, Some(0));
    // A restart tells nothing again.
    let d = Daemon::start(&case);
    d.wait_log("pass done", 1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.stop().0, Some(0));
    assert_eq!(notices(&smtp).len(), 2);
}

#[test]
fn a_quarantine_notice_the_local_server_refuses_is_held_and_sent_later() {
    let accept_notices = Arc::new(AtomicBool::new(false));
    let smtp = {
        let accept = accept_notices.clone();
        FakeSmtp::start(move |_, g| {
            if !g.recipients.iter().any(|r| r == POSTMASTER) {
                "550 5.7.1 content refused".into()
            } else if accept.load(Ordering::SeqCst) {
                "250 ok".into()
            } else {
                "451 4.3.0 try later".into()
            }
        })
    };
    let server = MailServer::start("UIDPLUS", vec![fake_message(1)]);
    let case = Case::new(
        &smtp.url(),
        &["x@example.test"],
        &format!("initial = \"all\"\nalert_to = \"{POSTMASTER}\""),
    );
    case.use_imap_at(server.port, "none");
    let out = case.run(&["run"]);
    assert_exit(&out, 65);
    assert!(
        stderr(&out).contains("refused a notice"),
        "{}",
        stderr(&out)
    );
    // Refused again: logged once only, still kept.
    let out = case.run(&["run"]);
    assert!(
        !stderr(&out).contains("refused a notice"),
        "{}",
        stderr(&out)
    );
    accept_notices.store(true, Ordering::SeqCst);
    assert_exit(&case.run(&["run"]), 0);
    let got = notices(&smtp);
    assert_eq!(got.len(), 1);
    assert!(
        subject(&got[0]).contains("1 message(s) quarantined"),
        "{}",
        subject(&got[0])
    );
    let text = String::from_utf8_lossy(&got[0].data).into_owned();
    assert!(text.contains("550 5.7.1 content refused"), "{text}");
    assert!(text.contains("held back from"), "{text}");
    assert!(text.contains("451 4.3.0 try later"), "{text}");
    assert!(text.contains("imapull quarantine retry"), "{text}");
    assert_exit(&case.run(&["run"]), 0);
    assert_eq!(notices(&smtp).len(), 1, "told twice");
}
