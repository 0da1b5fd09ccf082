//! When imapull asks for COMPRESS=DEFLATE: on a pass where the link is slow
//! and there is enough to fetch (`auto`, the default), on every pass
//! (`true`), never on a connection the daemon will IDLE on (short of
//! `"always"`), against the real Dovecot and a scripted far-away server.

use std::time::Duration;

use crate::fake::{fake_message, FakeSmtp, MailServer, SlowLink};
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

/// The round trip `auto` judged the link by, from imapull's debug log.
fn judged_rtt(log: &str) -> Option<Duration> {
    let at = log.find("rtt_us=")? + "rtt_us=".len();
    let digits: String = log[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    Some(Duration::from_micros(digits.parse().ok()?))
}

/// Runs `once` until imapull measured a fast link, as a loopback link is
/// unless the machine is loaded (a busy CI machine makes every round trip
/// slow); each run must have decided as its own measurement says. Gives the
/// first run that saw a fast link.
fn on_a_fast_link<T>(mut once: impl FnMut() -> (String, bool, T)) -> T {
    let mut seen = Vec::new();
    for _ in 0..20 {
        let (log, compressed, got) = once();
        let rtt = judged_rtt(&log).unwrap_or_else(|| panic!("no rtt_us logged: {log}"));
        assert_eq!(
            compressed,
            rtt >= imapull::imap::AUTO_COMPRESS_RTT,
            "auto decided against its own measurement of {rtt:?}: {log}"
        );
        if !compressed {
            return got;
        }
        seen.push(rtt);
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("loopback never measured faster than a WAN; round trips seen: {seen:?}");
}

/// One `compress = "auto"` pass of three big messages from a scripted
/// server that `slow` sets up: its log, whether it asked for COMPRESS, and
/// the commands the server saw.
fn fake_pass(slow: impl Fn(&mut crate::fake::MailState)) -> (String, bool, Vec<String>) {
    let server = MailServer::start("UIDPLUS COMPRESS=DEFLATE", big_messages(3));
    slow(&mut server.state.lock().unwrap());
    let smtp = FakeSmtp::start(|_, _| "250 ok".into());
    let case = Case::new(&smtp.url(), &["x@example.test"], "initial = \"all\"");
    case.use_imap_at(server.port, "none");
    let out = case.run(&["-v", "run"]);
    assert_exit(&out, 0);
    assert_eq!(smtp.messages().len(), 3);
    let cmds = server.commands();
    let asked = cmds.iter().any(|c| c.contains("COMPRESS DEFLATE"));
    (stderr(&out), asked, cmds)
}

#[test]
fn auto_compresses_a_pass_over_a_slow_link_only() {
    let pass = |delay: Duration| fake_pass(|st| st.delay = delay);
    // 30 ms each way is slow whatever the machine's load.
    let (_, asked, cmds) = pass(Duration::from_millis(30));
    assert!(asked, "{cmds:?}");
    // Asked before the messages, after the sizes; the scripted server says
    // BAD, and the pass goes on uncompressed.
    let at = |what: &str| cmds.iter().position(|c| c.contains(what)).unwrap();
    assert!(at("(UID RFC822.SIZE)") < at("COMPRESS") && at("COMPRESS") < at("BODY.PEEK[]"));
    let cmds = on_a_fast_link(|| pass(Duration::ZERO));
    assert!(cmds.iter().any(|c| c.contains("BODY.PEEK[]")), "{cmds:?}");
}

/// A server slow at its work (every command but NOOP takes 20 ms) on a
/// fast link: the round trip NOOP measures says fast, and nothing is
/// compressed.
#[test]
fn auto_times_a_noop_before_it_takes_a_busy_server_for_a_slow_link() {
    let cmds = on_a_fast_link(|| fake_pass(|st| st.work = Duration::from_millis(20)));
    assert!(cmds.iter().any(|c| c.contains("NOOP")), "{cmds:?}");
    assert!(!cmds.iter().any(|c| c.contains("COMPRESS")), "{cmds:?}");
}

/// Over a slow link to the real Dovecot's IMAPS (TLS 1.3), the greeting
/// comes a round trip after the handshake, with no work for the server:
/// that confirms the slow link, so `auto` compresses without a NOOP first.
/// A scripted server over plain TCP has no such greeting, and is sent
/// one (the tests above).
#[test]
fn auto_over_a_slow_tls_link_takes_the_greeting_for_its_noop() {
    let link = SlowLink::start(env().imaps_port, Duration::from_millis(15));
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "");
    let msgs = big_messages(2);
    for (i, m) in msgs.iter().enumerate() {
        drop_message(&case.user, i as u32, m, false);
    }
    case.use_imap_at(link.port, "implicit");
    let out = case.run(&["-vvv", "run"]);
    assert_exit(&out, 0);
    let log = stderr(&out);
    assert!(compressed_log(&out), "{log}");
    assert!(!log.contains(" NOOP "), "{log}");
    let got = wait_delivered(&rcpt, 2);
    for m in &msgs {
        assert!(got.iter().any(|g| split_delivered(g).body == as_stored(m)));
    }
}

#[test]
fn compress_true_deflates_a_pass_with_dovecot_and_auto_on_loopback_does_not() {
    let pass = |setting: &str| {
        let rcpt = new_recipient();
        let case = Case::new(&smtp(), &[&rcpt], &format!("compress = {setting}"));
        let msgs: Vec<Vec<u8>> = big_messages(2);
        for (i, m) in msgs.iter().enumerate() {
            drop_message(&case.user, i as u32, m, false);
        }
        let out = case.run(&["-v", "run"]);
        assert_exit(&out, 0);
        let got = wait_delivered(&rcpt, 2);
        for m in &msgs {
            assert!(
                got.iter().any(|g| split_delivered(g).body == as_stored(m)),
                "{setting}: a message changed on the way"
            );
        }
        (stderr(&out), compressed_log(&out), ())
    };
    let (log, compressed, ()) = pass("true");
    assert!(compressed, "{log}");
    on_a_fast_link(|| pass("\"auto\""));
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
