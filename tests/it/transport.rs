//! IMAP over a tunnel command (Dovecot's own imap binary, as `ssh host
//! /usr/lib/dovecot/imap` would run it) and through a SOCKS5 proxy.

use crate::fake::FakeSocks;
use crate::harness::*;

/// Rewrites the case's account to use a tunnel running `command`.
pub(crate) fn use_tunnel(case: &Case, command: &[String]) {
    let argv: Vec<String> = command.iter().map(|a| format!("{a:?}")).collect();
    let t = std::fs::read_to_string(&case.config).unwrap();
    let dropped = [
        "host",
        "port",
        "ca_file",
        "password_file",
        "transport",
        "command",
    ];
    let mut out = Vec::new();
    for l in t.lines() {
        if dropped.iter().any(|k| l.starts_with(&format!("{k} "))) {
            continue;
        }
        out.push(l.to_string());
        if l.starts_with("[accounts.") {
            out.push(format!(
                "transport = \"tunnel\"\ncommand = [{}]",
                argv.join(", ")
            ));
        }
    }
    std::fs::write(&case.config, out.join("\n")).unwrap();
}

pub(crate) fn dovecot_imap(user: &str) -> Vec<String> {
    vec![
        "/usr/lib/dovecot/imap".into(),
        "-c".into(),
        env().dovecot_conf.display().to_string(),
        "-u".into(),
        user.into(),
    ]
}

#[test]
fn tunnel_with_preauth_pulls_and_purges() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "purge_after = \"0\"");
    use_tunnel(&case, &dovecot_imap(&case.user));
    for n in 0..3 {
        drop_message(
            &case.user,
            n,
            &message(n, "bob@remote.test", "tunnelled"),
            false,
        );
    }
    let out = case.run(&["run"]);
    assert_exit(&out, 0);
    assert_eq!(wait_delivered(&rcpt, 3).len(), 3);
    assert!(
        flags(&case.user, "INBOX").is_empty(),
        "purged over the tunnel"
    );
    assert!(case
        .rows()
        .iter()
        .all(|r| r.state == "delivered" && r.purged_at.is_some()));
}

#[test]
fn tunnel_that_dies_mid_fetch_loses_nothing() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "compress = false\nimap_timeout = \"5s\"");
    for n in 0..4 {
        drop_message(
            &case.user,
            n,
            &message(n, "bob@remote.test", &"y".repeat(4000)),
            false,
        );
    }
    // The server's output is cut after 9000 bytes: somewhere in message 2.
    // (dd with bs=1, not head: head buffers its output until it is done.)
    // The server may then wait for a command instead of dying, so the
    // stream stalls rather than ends: the idle timeout (5 s here) ends it.
    let cut = format!(
        "{} | dd bs=1 count=9000 status=none",
        dovecot_imap(&case.user).join(" ")
    );
    use_tunnel(&case, &["sh".into(), "-c".into(), cut]);
    let out = case.run(&["run"]);
    assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
    let first = case.rows().len();
    assert!(first < 4, "the cut tunnel cannot have delivered everything");
    assert!(case.rows().iter().all(|r| r.state == "delivered"));
    // With a working tunnel, the rest arrives, nothing twice.
    use_tunnel(&case, &dovecot_imap(&case.user));
    assert_exit(&case.run(&["run"]), 0);
    assert_eq!(settle_delivered(&rcpt).len(), 4);
    assert_eq!(case.rows().len(), 4);
}

#[test]
fn tunnel_command_that_fails_says_why() {
    let case = Case::new(&smtp(), &["x@example.test"], "");
    use_tunnel(
        &case,
        &[
            "sh".into(),
            "-c".into(),
            "echo 'ssh: Could not resolve hostname nowhere' >&2; exit 255".into(),
        ],
    );
    let out = case.run(&["run"]);
    assert_exit(&out, 69);
    let err = stderr(&out);
    assert!(err.contains("exit status: 255"), "{err}");
    assert!(err.contains("Could not resolve hostname"), "{err}");
}

fn use_proxy(case: &Case, url: &str) {
    let t = std::fs::read_to_string(&case.config).unwrap();
    std::fs::write(
        &case.config,
        t.replace(
            "host = \"localhost\"",
            &format!("host = \"localhost\"\nproxy = {url:?}"),
        ),
    )
    .unwrap();
}

#[test]
fn socks5h_proxy_with_credentials() {
    let proxy = FakeSocks::start(Some(("tor", "s3cret")));
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "");
    use_proxy(
        &case,
        &format!("socks5h://tor:s3cret@127.0.0.1:{}", proxy.port),
    );
    drop_message(
        &case.user,
        0,
        &message(0, "bob@remote.test", "via proxy"),
        false,
    );
    assert_exit(&case.run(&["run"]), 0);
    assert_eq!(wait_delivered(&rcpt, 1).len(), 1);
    // The proxy resolved the name (socks5h), and TLS was checked end to end.
    assert_eq!(
        proxy.targets.lock().unwrap()[0],
        format!("localhost:{}", env().imaps_port)
    );
}

#[test]
fn socks5_resolves_locally() {
    let proxy = FakeSocks::start(None);
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "");
    use_proxy(&case, &format!("socks5://127.0.0.1:{}", proxy.port));
    drop_message(&case.user, 0, &message(0, "bob@remote.test", "x"), false);
    assert_exit(&case.run(&["run"]), 0);
    assert_eq!(
        proxy.targets.lock().unwrap().last().unwrap(),
        &format!("127.0.0.1:{}", env().imaps_port)
    );
}

/// Regression: on a stock Debian 12, `localhost` is `::1` first; imapull
/// asked the proxy for that address only, and Dovecot listens on
/// 127.0.0.1 only, so the run failed (exit 69). Every address is tried in
/// turn, through the proxy and directly, to IMAP and to SMTP alike.
#[test]
fn localhost_resolving_to_ipv6_first_or_ipv4_only() {
    for hosts in [HOSTS_DEBIAN, HOSTS_V4_ONLY] {
        let proxy = FakeSocks::start(None);
        let rcpt = new_recipient();
        let smtp_by_name = format!("smtp://localhost:{}", env().smtp_port);
        let case = Case::new(&smtp_by_name, &[&rcpt], "");
        drop_message(
            &case.user,
            0,
            &message(0, "bob@remote.test", "direct"),
            false,
        );
        let Some(out) = imapull_with_hosts(&case.config, &["run"], hosts) else {
            return;
        };
        assert_exit(&out, 0);
        wait_delivered(&rcpt, 1);

        use_proxy(&case, &format!("socks5://127.0.0.1:{}", proxy.port));
        drop_message(
            &case.user,
            1,
            &message(1, "bob@remote.test", "proxied"),
            false,
        );
        let out = imapull_with_hosts(&case.config, &["run"], hosts).unwrap();
        assert_exit(&out, 0);
        wait_delivered(&rcpt, 2);
        let targets = proxy.targets.lock().unwrap().clone();
        let v4 = format!("127.0.0.1:{}", env().imaps_port);
        assert_eq!(targets.last(), Some(&v4), "{hosts:?}: {targets:?}");
        if hosts == HOSTS_DEBIAN {
            assert_eq!(
                targets[0],
                format!("::1:{}", env().imaps_port),
                "{targets:?}"
            );
        }
    }
}

#[test]
fn wrong_proxy_credentials_are_a_clear_error() {
    let proxy = FakeSocks::start(Some(("tor", "s3cret")));
    let case = Case::new(&smtp(), &["x@example.test"], "");
    use_proxy(
        &case,
        &format!("socks5h://tor:wrong@127.0.0.1:{}", proxy.port),
    );
    let out = case.run(&["run"]);
    assert_exit(&out, 69);
    let err = stderr(&out);
    assert!(err.contains("through the SOCKS5 proxy"), "{err}");
    assert!(!err.contains("wrong"), "the proxy password leaked: {err}");
}

/// A private sshd on a loopback port, with its own host key and one
/// authorized client key, stopped when dropped.
struct Sshd {
    child: std::process::Child,
    port: u16,
    key: std::path::PathBuf,
}

impl Sshd {
    fn start() -> Option<Sshd> {
        if !std::path::Path::new("/usr/sbin/sshd").exists() {
            return None;
        }
        let dir = env().dir.join(format!("sshd-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let keygen = |name: &str| {
            let st = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(name))
                .status()
                .unwrap();
            assert!(st.success());
        };
        keygen("host_key");
        keygen("client_key");
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = format!(
            "ListenAddress 127.0.0.1:{port}\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\n\
             StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nUsePAM no\nLogLevel ERROR\n",
            dir.join("host_key").display(),
            dir.join("authorized_keys").display(),
            dir.join("sshd.pid").display(),
        );
        std::fs::write(dir.join("sshd_config"), conf).unwrap();
        let mut child = std::process::Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(dir.join("sshd_config"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Sshd {
                    child,
                    port,
                    key: dir.join("client_key"),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("sshd did not start");
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn tunnel_over_real_ssh() {
    let Some(sshd) = Sshd::start() else {
        eprintln!("openssh-server not installed: the real-ssh tunnel test is skipped");
        return;
    };
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "");
    let remote = dovecot_imap(&case.user).join(" ");
    use_tunnel(
        &case,
        &[
            "ssh".into(),
            "-C".into(),
            "-i".into(),
            sshd.key.display().to_string(),
            "-p".into(),
            sshd.port.to_string(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
            "root@127.0.0.1".into(),
            remote,
        ],
    );
    for n in 0..3 {
        drop_message(
            &case.user,
            n,
            &message(n, "bob@remote.test", "over ssh"),
            false,
        );
    }
    let out = case.run(&["run"]);
    assert_exit(&out, 0);
    assert_eq!(wait_delivered(&rcpt, 3).len(), 3);
    assert!(flags(&case.user, "INBOX")
        .values()
        .all(|f| f.contains("\\Seen")));
}
