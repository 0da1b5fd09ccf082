//! Real servers for the tests: one private Dovecot (IMAP, IMAPS, LMTP) and
//! one private Postfix (SMTP into Maildirs), started once per test binary by
//! `scripts/testenv.sh` and stopped at exit, also when a test failed.
//!
//! Tests share the servers and stay apart by name: every test takes its own
//! IMAP user and its own recipient address.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub struct Env {
    pub dir: PathBuf,
    pub imap_port: u16,
    pub imaps_port: u16,
    pub lmtp_port: u16,
    pub smtp_port: u16,
    pub ca_file: PathBuf,
    pub dovecot_conf: PathBuf,
    pub vmail: PathBuf,
    pub homes: PathBuf,
}

static ENV: OnceLock<Env> = OnceLock::new();
static STOP_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);
static NEXT: AtomicU32 = AtomicU32::new(0);
static NEXT_USER: AtomicU32 = AtomicU32::new(0);
static NEXT_RCPT: AtomicU32 = AtomicU32::new(0);
static ADDUSER: Mutex<()> = Mutex::new(());

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

extern "C" fn stop_servers() {
    if let Some(dir) = STOP_DIR.lock().ok().and_then(|mut d| d.take()) {
        let _ = Command::new(root().join("scripts/testenv.sh"))
            .arg("stop")
            .arg(&dir)
            .status();
        if std::env::var_os("IMAPULL_KEEP_TESTDIR").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

pub fn env() -> &'static Env {
    ENV.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("imapull-it-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        *STOP_DIR.lock().unwrap() = Some(dir.clone());
        // SAFETY: registers a plain extern "C" fn; it runs at exit().
        unsafe { libc::atexit(stop_servers) };
        let introspection = start_introspection();
        let out = Command::new(root().join("scripts/testenv.sh"))
            .arg("start")
            .arg(&dir)
            .env(
                "TESTENV_OAUTH2_URL",
                format!("http://127.0.0.1:{introspection}/introspect"),
            )
            .output()
            .expect("running scripts/testenv.sh");
        if !out.status.success() {
            stop_servers();
            panic!(
                "could not start the test servers (are dovecot-imapd, dovecot-lmtpd and postfix installed?):\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = std::fs::read_to_string(dir.join("env")).unwrap();
        let vars: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let port = |k: &str| vars[k].parse().unwrap();
        Env {
            imap_port: port("IMAP_PORT"),
            imaps_port: port("IMAPS_PORT"),
            lmtp_port: port("LMTP_PORT"),
            smtp_port: port("SMTP_PORT"),
            ca_file: vars["CA_FILE"].into(),
            dovecot_conf: vars["DOVECOT_CONF"].into(),
            vmail: vars["VMAIL"].into(),
            homes: vars["HOMES"].into(),
            dir,
        }
    })
}

/// Bearer tokens Dovecot's oauth2 passdb accepts, and for whom.
static TOKENS: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

/// `token` logs in as `user` from now on.
pub fn grant_token(token: &str, user: &str) {
    TOKENS.lock().unwrap().insert(token.into(), user.into());
}

/// `token` is refused from now on (revoked, expired).
pub fn revoke_token(token: &str) {
    TOKENS.lock().unwrap().remove(token);
}

/// Token files to read when Dovecot asks about a token of their user: what
/// they held when the token was first used.
static WATCHED: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
static AT_USE: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

/// From now on, `path` is read each time a token of `user` is used.
pub fn watch_token_file(user: &str, path: &Path) {
    WATCHED.lock().unwrap().insert(user.into(), path.into());
}

/// What the watched token file held when `token` was first used.
pub fn token_file_at_use(token: &str) -> Option<String> {
    AT_USE.lock().unwrap().get(token).cloned()
}

/// The token-introspection endpoint Dovecot asks (RFC 7662, by POST): a
/// thread on 127.0.0.1 answering from [`TOKENS`]. Returns its port.
fn start_introspection() -> u16 {
    use std::io::Write as _;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let (_, body) = read_http_request(&s);
            let body = String::from_utf8_lossy(&body).into_owned();
            let token = body
                .split('&')
                .find_map(|kv| kv.strip_prefix("token="))
                .unwrap_or_default()
                .replace("%2B", "+")
                .replace("%2F", "/")
                .replace("%3D", "=");
            let user = TOKENS.lock().unwrap().get(&token).cloned();
            if let Some(path) = user
                .as_ref()
                .and_then(|u| WATCHED.lock().unwrap().get(u).cloned())
            {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                AT_USE.lock().unwrap().entry(token.clone()).or_insert(text);
            }
            let json = match user {
                Some(user) => format!("{{\"active\":\"true\",\"username\":\"{user}\"}}"),
                None => "{\"active\":\"false\"}".to_string(),
            };
            let mut w = s;
            let _ = write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{json}",
                json.len()
            );
        }
    });
    port
}

/// One HTTP/1.1 request from `s`: its request line and its body (by
/// Content-Length).
pub fn read_http_request(s: &std::net::TcpStream) -> (String, Vec<u8>) {
    use std::io::{BufRead as _, Read as _};
    let mut r = std::io::BufReader::new(s.try_clone().unwrap());
    let mut first = String::new();
    let _ = r.read_line(&mut first);
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    let _ = r.read_exact(&mut body);
    (first, body)
}

/// Takes the password out of a case's config (an OAuth2 account has none).
pub fn drop_password(case: &Case) {
    let text = std::fs::read_to_string(&case.config).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("password_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&case.config, text).unwrap();
}

/// A pseudo-random number below `max`, from the clock.
pub fn pseudo_random(max: u64) -> u64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    (n.wrapping_mul(6364136223846793005) >> 20) % max
}

/// A loopback port nothing listens on (the listener that found it is gone):
/// a local server that is down, or a port for the daemon to serve on.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A unique number for this test binary run.
pub fn unique() -> u32 {
    NEXT.fetch_add(1, Ordering::SeqCst)
}

/// A fresh IMAP user with an empty INBOX.
pub fn new_user() -> String {
    let e = env();
    let n = NEXT_USER.fetch_add(1, Ordering::SeqCst);
    assert!(n < 300, "testenv.sh lists u0..u299 only");
    let name = format!("u{n}");
    let _g = ADDUSER.lock().unwrap();
    let st = Command::new(root().join("scripts/testenv.sh"))
        .args(["adduser"])
        .arg(&e.dir)
        .arg(&name)
        .status()
        .unwrap();
    assert!(st.success());
    for sub in ["new", "cur", "tmp"] {
        let p = e.homes.join(&name).join("Maildir").join(sub);
        std::fs::create_dir_all(&p).unwrap();
    }
    chown_tree(&e.homes.join(&name));
    name
}

/// A fresh recipient address that Postfix delivers into its own Maildir.
pub fn new_recipient() -> String {
    let n = NEXT_RCPT.fetch_add(1, Ordering::SeqCst);
    assert!(n < 300, "testenv.sh lists t0..t299 only");
    format!("t{n}@example.test")
}

fn chown_tree(p: &Path) {
    std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            chown_tree(&e.unwrap().path());
        }
    }
}

/// Puts a message into the user's INBOX as a Maildir file, optionally read.
pub fn drop_message(user: &str, n: u32, msg: &[u8], seen: bool) {
    let md = env().homes.join(user).join("Maildir");
    let name = format!("{}.M{n}P{}.test", 1_700_000_000 + n, std::process::id());
    let path = if seen {
        md.join("cur").join(format!("{name}:2,S"))
    } else {
        md.join("new").join(name)
    };
    let tmp = md.join("tmp").join(format!("{n}.tmp"));
    std::fs::write(&tmp, msg).unwrap();
    std::os::unix::fs::chown(&tmp, Some(65534), Some(65534)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

/// A simple message with a Message-ID and the given sender and body.
pub fn message(n: u32, from: &str, body: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: someone@remote.test\r\nSubject: message {n}\r\n\
         Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <msg{n}.{}@remote.test>\r\n\r\n{body}\r\n",
        std::process::id()
    )
    .into_bytes()
}

/// Runs doveadm against the private Dovecot.
pub fn doveadm(args: &[&str]) -> String {
    let out = Command::new("doveadm")
        .arg("-c")
        .arg(&env().dovecot_conf)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "doveadm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// UID -> flags of every message in the mailbox.
pub fn flags(user: &str, mailbox: &str) -> BTreeMap<u32, String> {
    let out = doveadm(&["fetch", "-u", user, "uid flags", "mailbox", mailbox]);
    let mut map = BTreeMap::new();
    let mut uid = None;
    for line in out.lines() {
        if let Some(u) = line.strip_prefix("uid: ") {
            uid = Some(u.trim().parse().unwrap());
        } else if let Some(f) = line.strip_prefix("flags:") {
            map.insert(uid.take().unwrap(), f.trim().to_string());
        }
    }
    map
}

pub fn uidvalidity(user: &str) -> u32 {
    let out = doveadm(&[
        "-f",
        "flow",
        "mailbox",
        "status",
        "-u",
        user,
        "uidvalidity",
        "INBOX",
    ]);
    let v = out
        .split("uidvalidity=")
        .nth(1)
        .unwrap_or_else(|| panic!("doveadm said {out:?}"));
    v.chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

/// Messages Postfix has delivered to `rcpt` so far, in file name order.
pub fn delivered_now(rcpt: &str) -> Vec<Vec<u8>> {
    let local = rcpt.split('@').next().unwrap();
    let dir = env().vmail.join(local).join("Maildir").join("new");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// Messages Postfix delivered to `rcpt`, waiting (up to 30 s) until `n`
/// have arrived.
pub fn wait_delivered(rcpt: &str, n: usize) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = delivered_now(rcpt);
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits a little for stragglers, then returns everything delivered to
/// `rcpt` (for checks that nothing more arrived).
pub fn settle_delivered(rcpt: &str) -> Vec<Vec<u8>> {
    std::thread::sleep(Duration::from_millis(1500));
    delivered_now(rcpt)
}

/// A delivered file split into what Postfix and imapull added and the
/// original message.
pub struct Delivered {
    pub return_path: String,
    pub delivered_to: String,
    pub imapull_received: String,
    pub body: Vec<u8>,
}

pub fn split_delivered(file: &[u8]) -> Delivered {
    let text = file;
    let mut pos = 0;
    let mut return_path = String::new();
    let mut delivered_to = String::new();
    let mut imapull_received = String::new();
    let mut in_ours = false;
    while pos < text.len() {
        let end = text[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(text.len(), |i| pos + i + 1);
        let line = String::from_utf8_lossy(&text[pos..end]).to_string();
        if in_ours && line.starts_with('\t') {
            imapull_received.push_str(&line);
            pos = end;
            continue;
        }
        if in_ours {
            break;
        }
        if let Some(r) = line.strip_prefix("Return-Path: ") {
            return_path = r.trim().to_string();
        } else if let Some(d) = line.strip_prefix("Delivered-To: ") {
            delivered_to = d.trim().to_string();
        } else if line.starts_with("Received: ") && line.contains("with IMAP (imapull") {
            imapull_received.push_str(&line);
            in_ours = true;
        }
        pos = end;
    }
    Delivered {
        return_path,
        delivered_to,
        imapull_received,
        body: text[pos..].to_vec(),
    }
}

/// What a Maildir file should hold for an original message: every line
/// ending LF (Postfix stores LF), a final newline.
pub fn as_stored(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < msg.len() {
        match msg[i] {
            b'\r' if msg.get(i + 1) == Some(&b'\n') => {
                out.push(b'\n');
                i += 1;
            }
            b'\r' | b'\n' => out.push(b'\n'),
            b => out.push(b),
        }
        i += 1;
    }
    if !out.is_empty() && !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    out
}

/// One test's private directory: its config and ledger.
pub struct Case {
    pub dir: PathBuf,
    pub user: String,
    pub config: PathBuf,
    pub ledger: PathBuf,
}

impl Case {
    /// A new user and a config that pulls it over IMAPS into `deliver` for
    /// `recipients`; `extra` is appended to the account table.
    pub fn new(deliver: &str, recipients: &[&str], extra: &str) -> Case {
        let user = new_user();
        Case::for_user(user, deliver, recipients, extra)
    }

    pub fn for_user(user: String, deliver: &str, recipients: &[&str], extra: &str) -> Case {
        let e = env();
        let dir = e.dir.join("cases").join(format!("{user}-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let ledger = dir.join("ledger.sqlite3");
        let config = dir.join("imapull.toml");
        let rcpts: Vec<String> = recipients.iter().map(|r| format!("{r:?}")).collect();
        let text = format!(
            "ledger = {ledger:?}\n\n[accounts.{user}]\nhost = \"localhost\"\nport = {port}\n\
             ca_file = {ca:?}\nusername = {user:?}\npassword_file = {pw:?}\n\
             deliver = {deliver:?}\nrecipients = [{rcpts}]\n{extra}\n",
            port = e.imaps_port,
            ca = e.ca_file,
            pw = dir.join("password"),
            rcpts = rcpts.join(", "),
        );
        std::fs::write(dir.join("password"), "secret\n").unwrap();
        std::fs::write(&config, text).unwrap();
        Case {
            dir,
            user,
            config,
            ledger,
        }
    }

    /// Points the account at a scripted IMAP server on 127.0.0.1:`port`,
    /// with `tls` ("none", "starttls").
    pub fn use_imap_at(&self, port: u16, tls: &str) {
        let t = std::fs::read_to_string(&self.config)
            .unwrap()
            .replace(
                &format!("port = {}", env().imaps_port),
                &format!("port = {port}\ntls = \"{tls}\""),
            )
            .replace("host = \"localhost\"", "host = \"127.0.0.1\"");
        std::fs::write(&self.config, t).unwrap();
    }

    pub fn run(&self, args: &[&str]) -> Output {
        imapull(&self.config, args)
    }

    pub fn rows(&self) -> Vec<imapull::ledger::Row> {
        imapull::ledger::Ledger::open(&self.ledger)
            .unwrap()
            .rows(None)
            .unwrap()
    }

    pub fn state_of(&self, uid: u32) -> String {
        self.rows()
            .into_iter()
            .find(|r| r.uid == uid)
            .map(|r| r.state)
            .unwrap_or_else(|| "none".into())
    }
}

pub fn smtp() -> String {
    format!("smtp://127.0.0.1:{}", env().smtp_port)
}

pub fn lmtp() -> String {
    format!("lmtp://127.0.0.1:{}", env().lmtp_port)
}

pub fn imapull(config: &Path, args: &[&str]) -> Output {
    run_imapull(Command::new(env!("CARGO_BIN_EXE_imapull")), config, args)
}

/// Runs imapull with these environment variables set.
pub fn imapull_env(config: &Path, args: &[&str], vars: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imapull"));
    cmd.envs(vars.iter().copied());
    run_imapull(cmd, config, args)
}

/// Runs `cmd` (imapull, or a wrapper whose last argument is imapull) on
/// `config` with `args`, colourless and with the user's log level unset.
fn run_imapull(mut cmd: Command, config: &Path, args: &[&str]) -> Output {
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("IMAPULL_LOG")
        .output()
        .unwrap()
}

/// `/etc/hosts` as Debian 12 ships it: `localhost` is `::1` first.
pub const HOSTS_DEBIAN: &str = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n";
/// `/etc/hosts` as some machines have it: IPv4 only.
pub const HOSTS_V4_ONLY: &str = "127.0.0.1 localhost\n";

/// Runs imapull with `hosts` as its `/etc/hosts`, whatever the machine's
/// says: in a private mount namespace (`unshare -m`, as root), the file
/// bind-mounted over the real one. None where the machine cannot do that.
pub fn imapull_with_hosts(config: &Path, args: &[&str], hosts: &str) -> Option<Output> {
    let ok = Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("unshare -m is not available here: the /etc/hosts variant is not run");
        return None;
    }
    let file = env().dir.join(format!("hosts-{}", unique()));
    std::fs::write(&file, hosts).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args([
        "-m",
        "sh",
        "-c",
        "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
    ])
    .arg(&file)
    .arg(env!("CARGO_BIN_EXE_imapull"));
    let out = run_imapull(cmd, config, args);
    let _ = std::fs::remove_file(&file);
    Some(out)
}

/// The exit code, with the output shown when it is not the expected one.
#[track_caller]
pub fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
