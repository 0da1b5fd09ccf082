//! `imapull daemon` against the real servers and scripted ones.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::fake::{fake_message, BusyImap, FakeSmtp, MailServer};
use crate::harness::*;

/// A running daemon whose log goes to a file; killed if still running
/// when dropped.
pub struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    pub fn start(case: &Case) -> Daemon {
        Daemon::start_with(case, &[])
    }

    /// With more options before `daemon`.
    pub fn start_with(case: &Case, options: &[&str]) -> Daemon {
        let log = case.dir.join(format!("daemon-{}.log", unique()));
        let child = Command::new(env!("CARGO_BIN_EXE_imapull"))
            .arg("--config")
            .arg(&case.config)
            .args(options)
            .args(["-v", "daemon"])
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let d = Daemon { child, log };
        d.wait_log("daemon started", 1);
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `what` appears `n` times in the log.
    #[track_caller]
    pub fn wait_log(&self, what: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.log().matches(what).count() < n {
            assert!(
                Instant::now() < deadline,
                "waited for {n}× {what:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGUSR1: pull everything now (and reconnect now).
    pub fn wake(&self) {
        self.signal(libc::SIGUSR1);
    }

    fn signal(&self, sig: i32) {
        // SAFETY: our own child's PID.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    pub fn stop(mut self) -> (Option<i32>, String) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st.code(), self.log());
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not stop:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn save(user: &str, mailbox: &str, msg: &[u8]) {
    use std::io::Write;
    let mut c = Command::new("doveadm")
        .arg("-c")
        .arg(&env().dovecot_conf)
        .args(["save", "-u", user, "-m", mailbox])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(msg).unwrap();
    assert!(c.wait().unwrap().success());
}

/// Adds a second account (another user) to the case's config.
fn add_account(case: &Case, user: &str, extra: &str) {
    let t = std::fs::read_to_string(&case.config).unwrap();
    let first = t.split("[accounts.").nth(1).unwrap();
    let body: String = first
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with("username") && !l.starts_with("mailboxes"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(
        &case.config,
        format!("{t}\n[accounts.{user}]\nusername = {user:?}\n{body}{extra}\n"),
    )
    .unwrap();
}

#[test]
fn idle_delivers_within_seconds_on_every_mailbox() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "mailboxes = [\"INBOX\", \"Work\"]");
    doveadm(&["mailbox", "create", "-u", &case.user, "Work"]);
    let other = new_user();
    add_account(&case, &other, "");
    let d = Daemon::start(&case);
    // The first passes are done and all three connections idle.
    d.wait_log("pass done", 3);
    std::thread::sleep(Duration::from_millis(500));
    let targets = [
        (case.user.clone(), "INBOX"),
        (case.user.clone(), "Work"),
        (other.clone(), "INBOX"),
    ];
    let mut delays = Vec::new();
    for (i, (user, mailbox)) in targets.iter().enumerate() {
        let t0 = Instant::now();
        save(
            user,
            mailbox,
            &message(100 + i as u32, "bob@remote.test", mailbox),
        );
        assert_eq!(wait_delivered(&rcpt, i + 1).len(), i + 1, "{}", d.log());
        delays.push(t0.elapsed());
    }
    eprintln!("daemon latency, APPEND to delivery into Postfix's Maildir: {delays:?}");
    let (code, log) = d.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("stopped"), "{log}");
}

/// A daemon starting on many accounts connects, logs in and runs first
/// passes `parallel_accounts` at a time, not all at once.
#[test]
fn accounts_connect_and_pass_parallel_accounts_at_a_time() {
    let server = BusyImap::start(Duration::from_millis(300));
    let smtp = FakeSmtp::start(|_, _| "250 ok".into());
    let case = Case::new(&smtp.url(), &["x@example.test"], "");
    case.use_imap_at(server.port, "none");
    for i in 0..5 {
        add_account(&case, &format!("more{i}"), "");
    }
    let t = std::fs::read_to_string(&case.config).unwrap();
    std::fs::write(&case.config, format!("parallel_accounts = 2\n{t}")).unwrap();
    let d = Daemon::start(&case);
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.idling.load(std::sync::atomic::Ordering::SeqCst) < 6 {
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Six at once without the limit; two side by side with it.
    assert_eq!(
        server.most.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "{}",
        d.log()
    );
    assert_eq!(d.stop().0, Some(0));
}

#[test]
fn sighup_adds_and_removes_mailboxes_and_survives_a_broken_config() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "");
    doveadm(&["mailbox", "create", "-u", &case.user, "Work"]);
    let d = Daemon::start(&case);
    d.wait_log("pass done", 1);
    let good = std::fs::read_to_string(&case.config).unwrap();
    // Add a mailbox.
    std::fs::write(
        &case.config,
        format!("{good}mailboxes = [\"INBOX\", \"Work\"]\n"),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("configuration reloaded", 1);
    save(&case.user, "Work", &message(1, "bob@remote.test", "work"));
    assert_eq!(wait_delivered(&rcpt, 1).len(), 1, "{}", d.log());
    // A broken config is refused; the old one keeps running.
    std::fs::write(&case.config, format!("{good}mailboxes = 7\n")).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("configuration not reloaded", 1);
    assert!(d.log().contains("line"), "{}", d.log());
    save(&case.user, "Work", &message(2, "bob@remote.test", "still"));
    assert_eq!(wait_delivered(&rcpt, 2).len(), 2, "{}", d.log());
    // Remove it again: only INBOX is watched.
    std::fs::write(&case.config, &good).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("configuration reloaded", 2);
    let log = d.log();
    assert!(log.contains("stopped=1"), "{log}");
    save(&case.user, "INBOX", &message(3, "bob@remote.test", "inbox"));
    assert_eq!(wait_delivered(&rcpt, 3).len(), 3, "{}", d.log());
    assert_eq!(d.stop().0, Some(0));
}

#[test]
fn local_server_down_defers_then_delivers_after_it_is_back() {
    let port = free_port();
    let case = Case::new(&format!("smtp://127.0.0.1:{port}"), &["x@example.test"], "");
    let d = Daemon::start(&case);
    d.wait_log("pass done", 1);
    save(&case.user, "INBOX", &message(1, "bob@remote.test", "x"));
    d.wait_log("deferred", 1);
    assert_eq!(case.state_of(1), "deferred");
    // The server comes back; SIGUSR1 pulls (and retries) now.
    let smtp = FakeSmtp::start_on(port);
    d.signal(libc::SIGUSR1);
    d.wait_log("delivered mailbox", 1);
    assert_eq!(smtp.messages().len(), 1);
    assert_eq!(case.state_of(1), "delivered");
    assert_eq!(d.stop().0, Some(0));
}

/// Regression: with the local server stopped and started again, deferred
/// mail waited for new mail or the catch-up (10 minutes). It has its own
/// retry schedule now: here 1 s, with a catch-up an hour away, and no
/// signal: the retry delivers it, once.
#[test]
fn deferred_mail_is_retried_on_its_own_schedule() {
    let port = free_port();
    let case = Case::new(
        &format!("smtp://127.0.0.1:{port}"),
        &["x@example.test"],
        "retry_interval = \"1s\"\nretry_max = \"2s\"\ncatchup_interval = \"1h\"",
    );
    let d = Daemon::start(&case);
    d.wait_log("pass done", 1);
    save(&case.user, "INBOX", &message(1, "bob@remote.test", "x"));
    d.wait_log("retrying in", 1);
    assert_eq!(case.state_of(1), "deferred");
    // `imapull status` says when the daemon tries again.
    let status = case.run(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(text.contains("1, the oldest since"), "{text}");
    assert!(text.contains("the daemon retries at"), "{text}");
    // Still down at the next retry or two: deferred again, not lost.
    d.wait_log("retrying in", 2);
    let smtp = FakeSmtp::start_on(port);
    d.wait_log("delivered mailbox", 1);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(smtp.messages().len(), 1, "{}", d.log());
    assert_eq!(case.state_of(1), "delivered");
    let text = String::from_utf8_lossy(&case.run(&["status"]).stdout).into_owned();
    assert!(!text.contains("the daemon retries"), "{text}");
    assert_eq!(d.stop().0, Some(0));
}

#[test]
fn silent_idle_is_caught_up_and_servers_without_idle_are_polled() {
    for caps in ["IDLE UIDPLUS", "UIDPLUS"] {
        let server = MailServer::start(caps, vec![fake_message(1)]);
        let smtp = FakeSmtp::start(|_, _| "250 ok".into());
        let case = Case::new(
            &smtp.url(),
            &["x@example.test"],
            "initial = \"all\"\ncatchup_interval = \"2s\"\npoll_interval = \"1s\"",
        );
        case.use_imap_at(server.port, "none");
        let d = Daemon::start(&case);
        d.wait_log("delivered mailbox", 1);
        // New mail the server never announces.
        {
            let mut st = server.state.lock().unwrap();
            let uid = st.uidnext;
            st.uidnext += 1;
            st.inbox.push(crate::fake::Msg {
                uid,
                flags: Default::default(),
                body: fake_message(2),
            });
        }
        d.wait_log("delivered mailbox", 2);
        assert_eq!(smtp.messages().len(), 2);
        let cmds = server.commands();
        assert_eq!(
            cmds.iter().any(|c| c.ends_with(" IDLE")),
            caps.contains("IDLE"),
            "{caps}: {cmds:?}"
        );
        assert_eq!(d.stop().0, Some(0));
    }
}

#[test]
fn dovecot_restart_is_survived() {
    // A Dovecot of its own: the shared one serves the other tests.
    let dir = env().dir.join(format!("own-{}", unique()));
    let script = root().join("scripts/testenv.sh");
    assert!(Command::new(&script)
        .arg("start")
        .arg(&dir)
        .status()
        .unwrap()
        .success());
    struct Stop(PathBuf, PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = Command::new(&self.0).arg("stop").arg(&self.1).status();
        }
    }
    let _stop = Stop(script.clone(), dir.clone());
    assert!(Command::new(&script)
        .arg("adduser")
        .arg(&dir)
        .arg("demo")
        .status()
        .unwrap()
        .success());
    let vars = std::fs::read_to_string(dir.join("env")).unwrap();
    let var = |k: &str| {
        vars.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap()
            .to_string()
    };
    let conf = var("DOVECOT_CONF");
    let smtp = FakeSmtp::start(|_, _| "250 ok".into());
    let case = Case::new(&smtp.url(), &["x@example.test"], "");
    let t = std::fs::read_to_string(&case.config)
        .unwrap()
        .replace(
            &format!("port = {}", env().imaps_port),
            &format!("port = {}", var("IMAPS_PORT")),
        )
        .replace(&env().ca_file.display().to_string(), &var("CA_FILE"))
        .replace(
            &format!("username = {:?}", case.user),
            "username = \"demo\"",
        );
    std::fs::write(&case.config, t).unwrap();
    let d = Daemon::start(&case);
    d.wait_log("pass done", 1);
    // Stop Dovecot; mail arrives meanwhile (straight into the Maildir).
    let pid: i32 = std::fs::read_to_string(dir.join("dovecot/run/master.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    unsafe { libc::kill(pid, libc::SIGTERM) };
    d.wait_log("connection lost", 1);
    let md = dir.join("home/demo/Maildir");
    for sub in ["new", "cur", "tmp"] {
        std::fs::create_dir_all(md.join(sub)).unwrap();
    }
    std::fs::write(
        md.join("new/1.restart.test"),
        message(1, "bob@remote.test", "while down"),
    )
    .unwrap();
    std::process::Command::new("chown")
        .args(["-R", "nobody:nogroup"])
        .arg(&md)
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(Command::new("dovecot")
        .arg("-c")
        .arg(&conf)
        .status()
        .unwrap()
        .success());
    d.wait_log("delivered mailbox", 1);
    assert_eq!(smtp.messages().len(), 1);
    assert_eq!(d.stop().0, Some(0));
}

#[test]
fn sigterm_during_a_large_delivery_loses_nothing() {
    // A slow local server: the message is in flight when SIGTERM comes.
    let smtp = FakeSmtp::start(|_, _| {
        std::thread::sleep(Duration::from_secs(2));
        "250 ok".into()
    });
    // One session: with two, the second message would already be on the
    // wire as well, and it too would be finished.
    let case = Case::new(&smtp.url(), &["x@example.test"], "delivery_sessions = 1");
    let big = message(1, "bob@remote.test", &"z".repeat(5_000_000));
    drop_message(&case.user, 1, &big, false);
    drop_message(&case.user, 2, &message(2, "bob@remote.test", "next"), false);
    let d = Daemon::start(&case);
    while smtp.connections.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, log) = d.stop();
    assert_eq!(code, Some(0), "{log}");
    // The message in flight finished and is recorded; the next one waits.
    assert_eq!(smtp.messages().len(), 1, "{log}");
    assert_eq!(case.state_of(1), "delivered");
    assert_eq!(case.state_of(2), "none");
    // The next start delivers the rest, nothing twice.
    let d = Daemon::start(&case);
    d.wait_log("delivered mailbox", 1);
    assert_eq!(d.stop().0, Some(0));
    assert_eq!(smtp.messages().len(), 2);
}

#[test]
fn second_sigterm_exits_at_once() {
    let smtp = FakeSmtp::start(|_, _| {
        std::thread::sleep(Duration::from_secs(5));
        "250 ok".into()
    });
    let case = Case::new(&smtp.url(), &["x@example.test"], "");
    drop_message(&case.user, 1, &message(1, "bob@remote.test", "slow"), false);
    let mut d = Daemon::start(&case);
    while smtp.connections.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(20));
    }
    d.signal(libc::SIGTERM);
    d.wait_log("stopping", 1);
    let t0 = Instant::now();
    d.signal(libc::SIGTERM);
    let status = d.child.wait().unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "it waited for the delivery"
    );
    assert_eq!(status.code(), Some(0));
    assert!(d.log().contains("second stop signal"), "{}", d.log());
    // The message in flight was not half-recorded: the ledger has nothing
    // for it, and the next start delivers it.
    assert_eq!(case.state_of(1), "none");
}

#[test]
fn idle_over_a_tunnel() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "");
    crate::transport::use_tunnel(&case, &crate::transport::dovecot_imap(&case.user));
    let d = Daemon::start(&case);
    d.wait_log("pass done", 1);
    std::thread::sleep(Duration::from_millis(300));
    save(
        &case.user,
        "INBOX",
        &message(1, "bob@remote.test", "tunnel idle"),
    );
    assert_eq!(wait_delivered(&rcpt, 1).len(), 1, "{}", d.log());
    assert!(d.log().contains("IDLE ended"), "{}", d.log());
    assert_eq!(d.stop().0, Some(0));
}
