//! Failures: bad credentials, bad certificates, bad configs, misbehaving
//! servers, a changed UIDVALIDITY, two processes at once.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::fake::{fake_message, FakeImap, FakeSmtp, FakeSocks, ImapFault, ELSEWHERE};
use crate::harness::*;

fn edit(case: &Case, f: impl Fn(&str) -> String) {
    let t = std::fs::read_to_string(&case.config).unwrap();
    std::fs::write(&case.config, f(&t)).unwrap();
}

#[test]
fn wrong_password_exits_77_and_is_not_logged() {
    let case = Case::new(&smtp(), &["x@example.test"], "");
    std::fs::write(case.dir.join("password"), "wrong-hunter2\n").unwrap();
    let out = case.run(&["run", "-vv"]);
    assert_exit(&out, 77);
    let err = stderr(&out);
    assert!(err.contains("logging in"), "{err}");
    assert!(!err.contains("hunter2"), "the password leaked: {err}");
}

#[test]
fn password_never_printed_even_at_trace() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "");
    drop_message(&case.user, 0, &message(0, "bob@remote.test", "x"), false);
    let out = case.run(&["-vv", "run"]);
    assert_exit(&out, 0);
    let err = stderr(&out);
    assert!(
        err.contains("C: MAIL FROM:<bob@remote.test>"),
        "trace shows the protocol: {err}"
    );
    assert!(!err.contains("secret"), "{err}");
}

#[test]
fn untrusted_certificate_is_refused() {
    let case = Case::new(&smtp(), &["x@example.test"], "");
    set_ca_file(&case, None);
    let out = case.run(&["run"]);
    assert_exit(&out, 69);
    assert!(stderr(&out).contains("TLS handshake"), "{}", stderr(&out));
    // check names the cause and what to set.
    let out = case.run(&["check"]);
    assert_exit(&out, 69);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("the TLS handshake failed"), "{text}");
    assert!(text.contains("certificate verify failed"), "{text}");
}

#[test]
fn tls_pin_is_checked() {
    let pem = std::fs::read(env().dir.join("certs/server.pem")).unwrap();
    let der = openssl::x509::X509::from_pem(&pem)
        .unwrap()
        .to_der()
        .unwrap();
    let good: String = imapull::imap::spki_sha256(&der)
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], &format!("tls_pin_sha256 = \"{good}\""));
    drop_message(&case.user, 0, &message(0, "bob@remote.test", "x"), false);
    assert_exit(&case.run(&["run"]), 0);
    let bad = "00".repeat(32);
    edit(&case, |t| t.replace(&good, &bad));
    let out = case.run(&["run"]);
    assert_exit(&out, 69);
    assert!(
        stderr(&out).contains("does not match tls_pin_sha256"),
        "{}",
        stderr(&out)
    );
}

/// The account's config without its `ca_file`, or with another one.
fn set_ca_file(case: &Case, ca: Option<&std::path::Path>) {
    let line = ca.map(|p| format!("ca_file = {p:?}"));
    edit(case, |t| {
        t.lines()
            .filter_map(|l| match l.starts_with("ca_file") {
                true => line.clone(),
                false => Some(l.to_string()),
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
}

/// A CA of its own, which signed nothing the servers here present.
fn other_ca(dir: &std::path::Path) -> std::path::PathBuf {
    let (cert, key) = (dir.join("other-ca.pem"), dir.join("other-ca.key"));
    let ok = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=another CA"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl req failed");
    cert
}

/// Without `ca_file` the system's roots are trusted: OpenSSL's default
/// file, which SSL_CERT_FILE names here, so that the test CA stands in for
/// the system's.
#[test]
fn system_roots_are_trusted_without_ca_file() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "");
    set_ca_file(&case, None);
    drop_message(&case.user, 0, &message(0, "bob@remote.test", "x"), false);
    let system = [("SSL_CERT_FILE", env().ca_file.as_path())];
    assert_exit(&imapull_env(&case.config, &["run"], &system), 0);
    assert_eq!(wait_delivered(&rcpt, 1).len(), 1);
}

/// `ca_file` replaces the system's roots, as documented: a server the
/// system trusts is refused when its chain does not lead to `ca_file`.
/// A `ca_file` without a certificate is named as such, and one with the
/// server's own certificate is enough.
#[test]
fn ca_file_replaces_the_system_roots() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "");
    drop_message(&case.user, 0, &message(0, "bob@remote.test", "x"), false);
    let other = other_ca(&case.dir);
    set_ca_file(&case, Some(&other));
    let system = [("SSL_CERT_FILE", env().ca_file.as_path())];
    let out = imapull_env(&case.config, &["run"], &system);
    assert_exit(&out, 69);
    let err = stderr(&out);
    assert!(err.contains("TLS handshake"), "{err}");
    assert!(err.contains("certificate verify failed"), "{err}");
    assert!(
        err.contains("unable to get local issuer certificate"),
        "{err}"
    );
    assert_eq!(case.state_of(1), "none", "nothing was fetched");

    std::fs::write(&other, "").unwrap();
    let out = imapull_env(&case.config, &["run"], &system);
    assert_exit(&out, 69);
    assert!(
        stderr(&out).contains("holds no PEM certificate"),
        "{}",
        stderr(&out)
    );

    // The server's own certificate, which the test CA issued, is enough:
    // every certificate of the file is an anchor.
    set_ca_file(&case, Some(&env().dir.join("certs/server.pem")));
    assert_exit(&case.run(&["run"]), 0);
    assert_eq!(wait_delivered(&rcpt, 1).len(), 1);
}

/// The certificate is checked against `host`: a name, through a proxy that
/// leads it to the test Dovecot, whose certificate is for localhost and
/// 127.0.0.1 only; and an address, which the certificate names.
#[test]
fn certificate_is_checked_against_the_host() {
    let proxy = FakeSocks::start(None);
    let case = Case::new(&smtp(), &["x@example.test"], "");
    edit(&case, |t| {
        t.replace(
            "host = \"localhost\"",
            &format!(
                "host = {ELSEWHERE:?}\nproxy = \"socks5h://127.0.0.1:{}\"",
                proxy.port
            ),
        )
    });
    let out = case.run(&["run"]);
    assert_exit(&out, 69);
    let err = stderr(&out);
    assert!(err.contains("certificate verify failed"), "{err}");
    assert!(err.contains("hostname mismatch"), "{err}");
    assert_eq!(
        proxy.targets.lock().unwrap()[0],
        format!("{ELSEWHERE}:{}", env().imaps_port)
    );

    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "");
    edit(&case, |t| {
        t.replace("host = \"localhost\"", "host = \"127.0.0.1\"")
    });
    drop_message(&case.user, 0, &message(0, "bob@remote.test", "x"), false);
    assert_exit(&case.run(&["run"]), 0);
    assert_eq!(wait_delivered(&rcpt, 1).len(), 1);
}

#[test]
fn starttls_not_offered_is_refused_before_login() {
    let fake = FakeImap::start(ImapFault::NoStarttls);
    let case = Case::new(&smtp(), &["x@example.test"], "");
    case.use_imap_at(fake.port, "starttls");
    let out = case.run(&["run"]);
    assert_exit(&out, 69);
    assert!(
        stderr(&out).contains("does not offer STARTTLS"),
        "{}",
        stderr(&out)
    );
    assert!(
        fake.commands()
            .iter()
            .all(|c| !c.to_ascii_uppercase().contains("LOGIN")),
        "{:?}",
        fake.commands()
    );
}

#[test]
fn preauth_on_a_network_connection_is_refused() {
    let fake = FakeImap::start(ImapFault::Preauth);
    let case = Case::new(&smtp(), &["x@example.test"], "");
    case.use_imap_at(fake.port, "none");
    let out = case.run(&["run"]);
    assert_exit(&out, 69);
    assert!(stderr(&out).contains("PREAUTH"), "{}", stderr(&out));
}

fn fake_imap_case(fault: ImapFault, smtp: &FakeSmtp) -> (FakeImap, Case) {
    let fake = FakeImap::start(fault);
    let case = Case::new(&smtp.url(), &["x@example.test"], "initial = \"all\"");
    case.use_imap_at(fake.port, "none");
    (fake, case)
}

#[test]
fn fetch_answered_no_loses_nothing_and_marks_nothing_else() {
    let smtp = FakeSmtp::start(|_, _| "250 ok".into());
    let (fake, case) = fake_imap_case(ImapFault::FetchNo, &smtp);
    let out = case.run(&["run"]);
    assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("NO [SERVERBUG] cannot read message 2"),
        "{}",
        stderr(&out)
    );
    // Message 1 came and was delivered; 2 and 3 are untouched and unrecorded.
    let got = smtp.messages();
    assert_eq!(got.len(), 1);
    assert!(got[0].data.ends_with(&fake_message(1)));
    let rows = case.rows();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].uid, rows[0].state.as_str()), (1, "delivered"));
    let stores: Vec<String> = fake
        .commands()
        .into_iter()
        .filter(|c| c.contains("STORE"))
        .collect();
    assert_eq!(stores.len(), 1, "{stores:?}");
    assert!(stores[0].contains("STORE 1 +FLAGS.SILENT"), "{stores:?}");
    // The watermark did not move past the missing messages.
    let l = imapull::ledger::Ledger::open(&case.ledger).unwrap();
    assert_eq!(
        l.mailbox_state(&case.user, "INBOX")
            .unwrap()
            .unwrap()
            .watermark,
        1
    );
}

#[test]
fn connection_dropped_mid_fetch_loses_nothing() {
    let smtp = FakeSmtp::start(|_, _| "250 ok".into());
    let (fake, case) = fake_imap_case(ImapFault::DropMidFetch, &smtp);
    let out = case.run(&["run"]);
    assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
    let got = smtp.messages();
    assert_eq!(got.len(), 1, "only the complete message was delivered");
    let rows = case.rows();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].state, "delivered");
    // No flag could be stored (the connection is gone); the ledger knows.
    assert!(!rows[0].flagged);
    assert!(fake.commands().iter().all(|c| !c.contains("STORE")));
}

#[test]
fn uidvalidity_change_does_not_redeliver() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "");
    for n in 0..3 {
        drop_message(
            &case.user,
            n,
            &message(n, "bob@remote.test", &format!("m{n}")),
            false,
        );
    }
    assert_exit(&case.run(&["run"]), 0);
    assert_eq!(wait_delivered(&rcpt, 3).len(), 3);
    let before = uidvalidity(&case.user);
    // A server migration: the index is rebuilt, UIDs restart with a new
    // UIDVALIDITY. Dovecot renumbers when its uidlist and indexes are gone.
    let md = env().homes.join(&case.user).join("Maildir");
    for e in std::fs::read_dir(&md).unwrap() {
        let p = e.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("dovecot")
        {
            std::fs::remove_file(p).unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(1100)); // UIDVALIDITY is a timestamp
    drop_message(
        &case.user,
        10,
        &message(10, "bob@remote.test", "after"),
        false,
    );
    let after = uidvalidity(&case.user);
    assert_ne!(before, after);
    let out = case.run(&["run"]);
    assert_exit(&out, 0);
    let err = stderr(&out);
    assert!(
        err.contains("UIDVALIDITY changed: 3 message(s) matched"),
        "{err}"
    );
    let got = settle_delivered(&rcpt);
    assert_eq!(got.len(), 4, "only the new message was delivered");
    let rows = case.rows();
    assert!(rows.iter().all(|r| r.uidvalidity == after), "{rows:?}");
    assert_eq!(rows.iter().filter(|r| r.state == "delivered").count(), 4);
}

#[test]
fn second_process_on_the_same_account_exits_at_once() {
    let smtp = FakeSmtp::start(|_, _| {
        std::thread::sleep(Duration::from_secs(3));
        "250 ok".into()
    });
    let case = Case::new(&smtp.url(), &["x@example.test"], "");
    drop_message(&case.user, 0, &message(0, "bob@remote.test", "x"), false);
    let first = std::process::Command::new(env!("CARGO_BIN_EXE_imapull"))
        .arg("--config")
        .arg(&case.config)
        .arg("run")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while smtp.connections.load(Ordering::SeqCst) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "first run never delivered"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = std::time::Instant::now();
    let out = case.run(&["run"]);
    assert_exit(&out, 73);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "it waited for the lock"
    );
    assert!(
        stderr(&out).contains("locked by another imapull process"),
        "{}",
        stderr(&out)
    );
    let status = first.wait_with_output().unwrap().status;
    assert_eq!(status.code(), Some(0));
    assert_eq!(smtp.messages().len(), 1);
}

#[test]
fn bad_configs_name_file_line_and_key() {
    let dir = env().dir.join(format!("badconf-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = "ledger = \"/tmp/never\"\n[accounts.a]\nhost = \"h\"\nusername = \"u\"\npassword = \"p\"\ndeliver = \"smtp://127.0.0.1:25\"\nrecipients = [\"r@x\"]\n";
    let cases = [
        (format!("{base}colour = \"blue\"\n"), "line 8", "colour"),
        (
            base.replace("host = \"h\"", "host = \"h\"\nport = \"993\""),
            "line 4",
            "port",
        ),
        (
            base.replace("recipients = [\"r@x\"]\n", ""),
            "line 2",
            "recipients",
        ),
        (
            base.replace("smtp://127.0.0.1:25", "mailto:x"),
            "line 2",
            "deliver",
        ),
    ];
    for (text, line, key) in cases {
        let path = dir.join("imapull.toml");
        std::fs::write(&path, &text).unwrap();
        let out = imapull(&path, &["run"]);
        assert_exit(&out, 78);
        let err = stderr(&out);
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains(line), "{line}: {err}");
        assert!(err.contains(key), "{key}: {err}");
    }
}

#[test]
fn unknown_account_is_a_usage_error() {
    let case = Case::new(&smtp(), &["x@example.test"], "");
    let out = case.run(&["run", "nope"]);
    assert_exit(&out, 64);
}

/// The next message is not completed until the previous delivery's ledger
/// row is on disk: a failed sync aborts it before the final ".", so the
/// server never accepts it.
#[test]
fn failed_ledger_sync_keeps_the_next_message_from_being_accepted() {
    use imapull::config::{Deliver, DeliverProtocol, DeliverTarget};
    use imapull::deliver::{Deliverer, Envelope, Outcome};
    let smtp = FakeSmtp::start(|_, _| "250 ok".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let target = Deliver {
            protocol: DeliverProtocol::Smtp,
            target: DeliverTarget::Tcp {
                host: "127.0.0.1".into(),
                port: smtp.port,
            },
        };
        let mut d = Deliverer::new(target, "test".into(), Duration::from_secs(10));
        let env = Envelope {
            sender: "a@x".into(),
            recipients: vec!["b@x".into()],
        };
        let msg = message(1, "a@x", &"q".repeat(200_000));
        use futures_util::FutureExt as _;
        let r = d
            .deliver(
                &env,
                b"",
                &msg,
                Some(imapull::deliver::client::no_barrier()),
                None,
            )
            .await
            .unwrap();
        assert_eq!(r.outcome, Outcome::Delivered);
        let failing = futures_util::future::ready(Err("disk on fire".to_string()))
            .boxed()
            .shared();
        let e = d
            .deliver(&env, b"", &msg, Some(failing), None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("disk on fire"), "{e}");
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        smtp.messages().len(),
        1,
        "the second message was never completed"
    );
}

/// A server that refuses every recipient but answers the pipelined DATA
/// with 354 anyway is waiting for a message nobody should get: imapull
/// drops the connection instead of sending one, and quarantines the
/// message with the recipient's refusal.
#[test]
fn data_accepted_without_recipients_drops_the_connection() {
    let smtp = FakeSmtp::data_despite_no_recipient("550 5.1.1 no such user");
    let case = Case::new(&smtp.url(), &["x@example.test"], "");
    for n in 0..2 {
        drop_message(&case.user, n, &message(n, "bob@remote.test", "x"), false);
    }
    let out = case.run(&["run"]);
    assert_exit(&out, 65);
    std::thread::sleep(Duration::from_millis(200));
    assert!(smtp.messages().is_empty(), "no message was completed");
    // Not a byte after the 354: not the message, not even an RSET that a
    // server in DATA would take for its first line.
    let cut = smtp.cut_short.lock().unwrap().clone();
    assert_eq!(cut, vec![Vec::<u8>::new(); 2]);
    assert_eq!(
        smtp.connections.load(Ordering::SeqCst),
        2,
        "each aborted transaction cost its connection"
    );
    for row in case.rows() {
        assert_eq!(row.state, "rejected");
        assert!(row.last_reply.unwrap().contains("550 5.1.1"));
    }
}
