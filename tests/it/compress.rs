//! When imapull asks for COMPRESS=DEFLATE: on a pass where the link is slow
//! and there is enough to fetch (`auto`, the default), on every pass
//! (`true`), never on a connection the daemon will IDLE on (short of
//! `"always"`), against the real Dovecot and a scripted far-away server.

use std::time::Duration;

use crate::fake::{fake_message, FakeSmtp, MailServer};
use crate::harness::*;

fn big_messages(n: u32) -> Vec<Vec<u8>> {
    (1..=n)
        .map(|i| {
            let mut m = fake_message(i);
            m.extend(std::iter::repeat_n(b"some text of a mail\r\n".as_slice(), 8000).flatten());
            m
        })
        .collect()
}

fn compressed_log(out: &std::process::Output) -> bool {
    stderr(out).contains("COMPRESS=DEFLATE active")
}

#[test]
fn auto_compresses_a_pass_over_a_slow_link_only() {
    for (delay, want) in [(Duration::from_millis(30), true), (Duration::ZERO, false)] {
        let server = MailServer::start("UIDPLUS COMPRESS=DEFLATE", big_messages(3));
        server.state.lock().unwrap().delay = delay;
        let smtp = FakeSmtp::start(|_, _| "250 ok".into());
        let case = Case::new(&smtp.url(), &["x@example.test"], "initial = \"all\"");
        case.use_imap_at(server.port, "none");
        assert_exit(&case.run(&["-v", "run"]), 0);
        let asked = server
            .commands()
            .iter()
            .any(|c| c.contains("COMPRESS DEFLATE"));
        assert_eq!(asked, want, "delay {delay:?}: {:?}", server.commands());
        if want {
            // Asked before the messages, after the sizes; the scripted
            // server says BAD, and the pass goes on uncompressed.
            let cmds = server.commands();
            let at = |what: &str| cmds.iter().position(|c| c.contains(what)).unwrap();
            assert!(at("(UID RFC822.SIZE)") < at("COMPRESS") && at("COMPRESS") < at("BODY.PEEK[]"));
        }
        assert_eq!(smtp.messages().len(), 3);
    }
}

#[test]
fn compress_true_deflates_a_pass_with_dovecot_and_auto_on_loopback_does_not() {
    for (setting, want) in [("true", true), ("\"auto\"", false)] {
        let rcpt = new_recipient();
        let case = Case::new(&smtp(), &[&rcpt], &format!("compress = {setting}"));
        let msgs: Vec<Vec<u8>> = big_messages(2);
        for (i, m) in msgs.iter().enumerate() {
            drop_message(&case.user, i as u32, m, false);
        }
        let out = case.run(&["-v", "run"]);
        assert_exit(&out, 0);
        assert_eq!(compressed_log(&out), want, "{setting}: {}", stderr(&out));
        let got = wait_delivered(&rcpt, 2);
        for m in &msgs {
            assert!(
                got.iter().any(|g| split_delivered(g).body == as_stored(m)),
                "{setting}: a message changed on the way"
            );
        }
    }
}

/// The daemon's IDLE connection stays uncompressed with `compress = true`
/// (Dovecot cannot hibernate a compressed session), and is compressed with
/// `"always"`; mail arrives either way.
#[test]
fn an_idle_connection_is_compressed_only_when_always() {
    for (setting, want) in [("true", false), ("\"always\"", true)] {
        let rcpt = new_recipient();
        let case = Case::new(&smtp(), &[&rcpt], &format!("compress = {setting}"));
        for (i, m) in big_messages(2).iter().enumerate() {
            drop_message(&case.user, i as u32, m, false);
        }
        let d = crate::daemon::Daemon::start(&case);
        wait_delivered(&rcpt, 2);
        drop_message(
            &case.user,
            9,
            &message(9, "late@remote.test", "while idling"),
            false,
        );
        wait_delivered(&rcpt, 3);
        let (code, log) = d.stop();
        assert_eq!(code, Some(0), "{log}");
        assert_eq!(
            log.contains("COMPRESS=DEFLATE active"),
            want,
            "{setting}: {log}"
        );
    }
}
