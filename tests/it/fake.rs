//! Scripted servers for faults real servers will not produce on demand: an
//! SMTP server that answers 4xx/5xx for chosen messages, and an IMAP server
//! that misbehaves in set ways. Each runs on its own thread, on a free
//! 127.0.0.1 port, and stops when the test drops it.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One message as the fake SMTP server received it.
#[derive(Debug, Clone)]
pub struct Got {
    pub sender: String,
    pub recipients: Vec<String>,
    /// The DATA bytes, still dot-stuffed, without the final ".\r\n".
    pub data: Vec<u8>,
}

type Decide = dyn Fn(usize, &Got) -> String + Send + Sync;

pub struct FakeSmtp {
    pub port: u16,
    pub got: Arc<Mutex<Vec<Got>>>,
    /// What arrived after a 354 on connections that ended before the ".".
    pub cut_short: Arc<Mutex<Vec<Vec<u8>>>>,
    pub connections: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
}

impl FakeSmtp {
    /// `decide(n, msg)` gives the reply after DATA for the n-th message
    /// (from 0), e.g. "250 ok" or "451 later". Messages answered 2xx are kept.
    pub fn start(decide: impl Fn(usize, &Got) -> String + Send + Sync + 'static) -> FakeSmtp {
        FakeSmtp::with_size(100_000_000, decide)
    }

    /// Accepting everything, on a chosen port (a server that "comes back").
    pub fn start_on(port: u16) -> FakeSmtp {
        FakeSmtp::bind(
            TcpListener::bind(("127.0.0.1", port)).unwrap(),
            100_000_000,
            "250 ok",
            |_, _| "250 ok".into(),
        )
    }

    /// Like [`FakeSmtp::start`], announcing `SIZE size` in its EHLO reply.
    pub fn with_size(
        size: u64,
        decide: impl Fn(usize, &Got) -> String + Send + Sync + 'static,
    ) -> FakeSmtp {
        FakeSmtp::bind(
            TcpListener::bind("127.0.0.1:0").unwrap(),
            size,
            "250 ok",
            decide,
        )
    }

    /// A broken server: it refuses every recipient with `rcpt_reply` and
    /// still answers a pipelined DATA with 354 (RFC 2920 says 503/554).
    pub fn data_despite_no_recipient(rcpt_reply: &'static str) -> FakeSmtp {
        FakeSmtp::bind(
            TcpListener::bind("127.0.0.1:0").unwrap(),
            100_000_000,
            rcpt_reply,
            |_, _| "250 ok".into(),
        )
    }

    fn bind(
        listener: TcpListener,
        size: u64,
        rcpt_reply: &'static str,
        decide: impl Fn(usize, &Got) -> String + Send + Sync + 'static,
    ) -> FakeSmtp {
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let cut_short = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let decide: Arc<Decide> = Arc::new(decide);
        let counter = Arc::new(AtomicU32::new(0));
        {
            let (got, cut_short, connections, stop) = (
                got.clone(),
                cut_short.clone(),
                connections.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(false).unwrap();
                            connections.fetch_add(1, Ordering::SeqCst);
                            let (got, cut_short, decide, counter) = (
                                got.clone(),
                                cut_short.clone(),
                                decide.clone(),
                                counter.clone(),
                            );
                            std::thread::spawn(move || {
                                let stores = Stores {
                                    got: &got,
                                    cut_short: &cut_short,
                                };
                                let _ =
                                    smtp_session(s, size, rcpt_reply, stores, &*decide, &counter);
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            });
        }
        FakeSmtp {
            port,
            got,
            cut_short,
            connections,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    pub fn messages(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for FakeSmtp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Where a session keeps what it received.
struct Stores<'a> {
    got: &'a Mutex<Vec<Got>>,
    cut_short: &'a Mutex<Vec<Vec<u8>>>,
}

fn smtp_session(
    s: TcpStream,
    size: u64,
    rcpt_reply: &str,
    stores: Stores<'_>,
    decide: &Decide,
    counter: &AtomicU32,
) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    // Each reply is its own write: without this, Nagle's algorithm and the
    // client's delayed ACK hold every second one back for 40 ms.
    s.set_nodelay(true)?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    w.write_all(b"220 fake ESMTP\r\n")?;
    let mut cur = Got {
        sender: String::new(),
        recipients: vec![],
        data: vec![],
    };
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            w.write_all(
                format!("250-fake\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE {size}\r\n")
                    .as_bytes(),
            )?;
        } else if upper.starts_with("MAIL FROM:") {
            let a = line[10..].trim();
            cur = Got {
                sender: a[1..a.find('>').unwrap()].to_string(),
                recipients: vec![],
                data: vec![],
            };
            w.write_all(b"250 ok\r\n")?;
        } else if upper.starts_with("RCPT TO:") {
            let a = line[8..].trim();
            cur.recipients.push(a[1..a.len() - 1].to_string());
            w.write_all(format!("{rcpt_reply}\r\n").as_bytes())?;
        } else if upper.starts_with("DATA") {
            w.write_all(b"354 go\r\n")?;
            let mut data = Vec::new();
            loop {
                let mut l = Vec::new();
                r.read_until(b'\n', &mut l)?;
                if l.is_empty() {
                    stores.cut_short.lock().unwrap().push(data);
                    return Ok(());
                }
                if l == b".\r\n" {
                    break;
                }
                data.extend_from_slice(&l);
            }
            cur.data = data;
            let n = counter.fetch_add(1, Ordering::SeqCst) as usize;
            let reply = decide(n, &cur);
            if reply.starts_with('2') {
                stores.got.lock().unwrap().push(cur.clone());
            }
            if reply == "drop" {
                return Ok(());
            }
            w.write_all(format!("{reply}\r\n").as_bytes())?;
        } else if upper.starts_with("RSET") || upper.starts_with("NOOP") {
            w.write_all(b"250 ok\r\n")?;
        } else if upper.starts_with("QUIT") {
            w.write_all(b"221 bye\r\n")?;
            return Ok(());
        } else {
            w.write_all(b"500 what\r\n")?;
        }
    }
}

/// How the fake IMAP server misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImapFault {
    /// Capabilities without STARTTLS on a plain connection.
    NoStarttls,
    /// `* PREAUTH` greeting.
    Preauth,
    /// UID FETCH sends the first message, then a tagged NO.
    FetchNo,
    /// UID FETCH sends the first message and half the second, then closes.
    DropMidFetch,
}

pub struct FakeImap {
    pub port: u16,
    /// Every command line received (LOGIN lines included).
    pub log: Arc<Mutex<Vec<String>>>,
}

pub fn fake_message(uid: u32) -> Vec<u8> {
    format!(
        "From: fake@remote.test\r\nSubject: fake {uid}\r\nMessage-ID: <fake{uid}@remote.test>\r\n\r\nbody {uid}\r\n"
    )
    .into_bytes()
}

impl FakeImap {
    /// Serves one connection with three messages (UIDs 1..=3) and `fault`.
    pub fn start(fault: ImapFault) -> FakeImap {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l2 = log.clone();
        std::thread::spawn(move || {
            // The connection attempts of one test: serve them in turn.
            for s in listener.incoming().take(4) {
                let Ok(s) = s else { return };
                let _ = imap_session(s, fault, &l2);
            }
        });
        FakeImap { port, log }
    }

    pub fn commands(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

fn imap_session(s: TcpStream, fault: ImapFault, log: &Mutex<Vec<String>>) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    if fault == ImapFault::Preauth {
        w.write_all(b"* PREAUTH [CAPABILITY IMAP4rev1] welcome\r\n")?;
    } else {
        w.write_all(b"* OK fake IMAP ready\r\n")?;
    }
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        log.lock().unwrap().push(line.trim_end().to_string());
        let mut parts = line.trim_end().splitn(3, ' ');
        let tag = parts.next().unwrap_or("*").to_string();
        let cmd = parts.next().unwrap_or("").to_ascii_uppercase();
        let rest = parts.next().unwrap_or("").to_string();
        let ok = |w: &mut TcpStream, what: &str| {
            w.write_all(format!("{tag} OK {what} done\r\n").as_bytes())
        };
        match cmd.as_str() {
            "CAPABILITY" => {
                w.write_all(b"* CAPABILITY IMAP4rev1 UIDPLUS\r\n")?;
                ok(&mut w, "CAPABILITY")?;
            }
            "LOGIN" => ok(&mut w, "LOGIN")?,
            "SELECT" => {
                w.write_all(b"* 3 EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 42] v\r\n* OK [UIDNEXT 4] n\r\n* FLAGS (\\Seen)\r\n")?;
                w.write_all(format!("{tag} OK [READ-WRITE] SELECT done\r\n").as_bytes())?;
            }
            "NOOP" => ok(&mut w, "NOOP")?,
            "LOGOUT" => {
                w.write_all(b"* BYE bye\r\n")?;
                ok(&mut w, "LOGOUT")?;
                return Ok(());
            }
            "UID" => {
                let sub = rest.split(' ').next().unwrap_or("").to_ascii_uppercase();
                match sub.as_str() {
                    "SEARCH" => {
                        w.write_all(b"* SEARCH 1 2 3\r\n")?;
                        ok(&mut w, "SEARCH")?;
                    }
                    "FETCH" if !rest.to_ascii_uppercase().contains("BODY") => {
                        // The sizes, asked before the messages.
                        for n in 1..=3 {
                            let size = fake_message(n).len();
                            w.write_all(
                                format!("* {n} FETCH (UID {n} RFC822.SIZE {size})\r\n").as_bytes(),
                            )?;
                        }
                        ok(&mut w, "FETCH")?;
                    }
                    "FETCH" => {
                        let m = fake_message(1);
                        w.write_all(format!("* 1 FETCH (UID 1 RFC822.SIZE {} FLAGS () INTERNALDATE \"23-Nov-2026 10:00:00 +0000\" BODY[] {{{}}}\r\n", m.len(), m.len()).as_bytes())?;
                        w.write_all(&m)?;
                        w.write_all(b")\r\n")?;
                        match fault {
                            ImapFault::FetchNo => {
                                w.write_all(
                                    format!("{tag} NO [SERVERBUG] cannot read message 2\r\n")
                                        .as_bytes(),
                                )?;
                            }
                            ImapFault::DropMidFetch => {
                                let m2 = fake_message(2);
                                w.write_all(format!("* 2 FETCH (UID 2 RFC822.SIZE {} FLAGS () BODY[] {{{}}}\r\n", m2.len(), m2.len()).as_bytes())?;
                                w.write_all(&m2[..m2.len() / 2])?;
                                w.flush()?;
                                return Ok(());
                            }
                            _ => ok(&mut w, "FETCH")?,
                        }
                    }
                    "STORE" => ok(&mut w, "STORE")?,
                    _ => w.write_all(format!("{tag} BAD unknown\r\n").as_bytes())?,
                }
            }
            _ => w.write_all(format!("{tag} BAD unknown\r\n").as_bytes())?,
        }
    }
}

/// A message in [`MailServer`].
#[derive(Debug, Clone)]
pub struct Msg {
    pub uid: u32,
    pub flags: std::collections::BTreeSet<String>,
    pub body: Vec<u8>,
}

/// The state of [`MailServer`], open to the test between runs.
#[derive(Debug, Default)]
pub struct MailState {
    pub inbox: Vec<Msg>,
    pub trash: Vec<Msg>,
    pub uidnext: u32,
    pub log: Vec<String>,
    /// Answer the first command line that starts with `.0` (after the tag)
    /// this way instead, then forget it.
    pub fault: Option<(String, Fault)>,
    /// Send what real servers send unasked before every tagged reply:
    /// unknown responses, progress lines, flag changes, RECENT, odd codes.
    pub chatty: bool,
    /// During the next FETCH of bodies, this UID is expunged.
    pub expunge_mid_fetch: Option<u32>,
    /// Wait this long before every reply: a server across a slow link.
    pub delay: Duration,
    /// Wait this long before every reply but NOOP's: a busy server on a
    /// fast link (a large mailbox's SELECT, SEARCH, FETCH take time).
    pub work: Duration,
    /// Keep `fault` after it was injected: every such command fails.
    pub sticky: bool,
    /// The session being served, for [`MailServer::hang_up`].
    pub current: Option<TcpStream>,
}

/// An injected answer to one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    No,
    Bad,
    /// `* BYE`, then the connection closes.
    Bye,
    /// The connection closes without an answer.
    Drop,
}

const CHATTER: &str = "* XFOO 17 (something new) \"x\"\r\n\
    * OK Searched 91% of the mailbox, ETA 0:01\r\n\
    * 1 RECENT\r\n\
    * OK [MYRIGHTS \"acdilrsw\"] rights\r\n\
    * OK [HIGHESTMODSEQ 123456] m\r\n\
    * OK [X-ODD (a b)] odd\r\n";

/// A small stateful IMAP server with one INBOX and a `\Trash` mailbox, for
/// what Dovecot will not do: no UIDPLUS, or Gmail's capabilities.
pub struct MailServer {
    pub port: u16,
    pub state: Arc<Mutex<MailState>>,
    stop: Arc<AtomicBool>,
}

impl MailServer {
    pub fn start(caps: &str, messages: Vec<Vec<u8>>) -> MailServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut st = MailState {
            uidnext: 1,
            ..MailState::default()
        };
        for body in messages {
            let uid = st.uidnext;
            st.uidnext += 1;
            st.inbox.push(Msg {
                uid,
                flags: Default::default(),
                body,
            });
        }
        let state = Arc::new(Mutex::new(st));
        let stop = Arc::new(AtomicBool::new(false));
        let caps = caps.to_string();
        {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(false).unwrap();
                            let _ = mail_session(s, &caps, &state);
                            // The last handle on the session: closing it
                            // is what the client sees.
                            state.lock().unwrap().current = None;
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            });
        }
        MailServer { port, state, stop }
    }

    pub fn inbox_uids(&self) -> Vec<u32> {
        self.state
            .lock()
            .unwrap()
            .inbox
            .iter()
            .map(|m| m.uid)
            .collect()
    }

    pub fn commands(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    /// Closes the session being served (an idling client sees the
    /// connection drop, and reconnects).
    pub fn hang_up(&self) {
        if let Some(s) = self.state.lock().unwrap().current.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for MailServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn parse_set(set: &str, max: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for part in set.split(',') {
        let num = |s: &str| if s == "*" { max } else { s.parse().unwrap() };
        match part.split_once(':') {
            Some((a, b)) => {
                let (a, b) = (num(a), num(b));
                out.extend(a.min(b)..=a.max(b));
            }
            None => out.push(num(part)),
        }
    }
    out
}

fn mail_session(s: TcpStream, caps: &str, state: &Mutex<MailState>) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_nodelay(true)?;
    state.lock().unwrap().current = s.try_clone().ok();
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    w.write_all(b"* OK fake mail server\r\n")?;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let l = line.trim_end().to_string();
        let mut st = state.lock().unwrap();
        st.log.push(l.clone());
        let mut parts = l.splitn(3, ' ');
        let tag = parts.next().unwrap_or("*").to_string();
        let command = l
            .split_once(' ')
            .map_or("", |(_, c)| c)
            .to_ascii_uppercase();
        let injected = match &st.fault {
            Some((prefix, f)) if command.starts_with(prefix.as_str()) => Some(*f),
            _ => None,
        };
        if let Some(f) = injected {
            if !st.sticky {
                st.fault = None;
            }
            match f {
                Fault::No => {
                    w.write_all(format!("{tag} NO [UNAVAILABLE] injected\r\n").as_bytes())?;
                    continue;
                }
                Fault::Bad => {
                    w.write_all(format!("{tag} BAD injected\r\n").as_bytes())?;
                    continue;
                }
                Fault::Bye => {
                    w.write_all(b"* BYE injected\r\n")?;
                    return Ok(());
                }
                Fault::Drop => return Ok(()),
            }
        }
        let is_noop = line
            .split_whitespace()
            .nth(1)
            .is_some_and(|c| c.eq_ignore_ascii_case("NOOP"));
        let wait = st.delay + if is_noop { Duration::ZERO } else { st.work };
        if !wait.is_zero() {
            drop(st);
            std::thread::sleep(wait);
            st = state.lock().unwrap();
        }
        if st.chatty {
            w.write_all(CHATTER.as_bytes())?;
        }
        let cmd = parts.next().unwrap_or("").to_ascii_uppercase();
        let rest = parts.next().unwrap_or("").to_string();
        let mut out = String::new();
        let mut bytes: Vec<u8> = Vec::new();
        let max = st.inbox.iter().map(|m| m.uid).max().unwrap_or(0);
        match cmd.as_str() {
            "CAPABILITY" => out.push_str(&format!("* CAPABILITY IMAP4rev1 {caps}\r\n")),
            "LOGIN" | "NOOP" => {}
            "LOGOUT" => {
                w.write_all(format!("* BYE bye\r\n{tag} OK done\r\n").as_bytes())?;
                return Ok(());
            }
            "SELECT" => out.push_str(&format!(
                "* {} EXISTS\r\n* OK [UIDVALIDITY 9] v\r\n* OK [UIDNEXT {}] n\r\n* FLAGS (\\Seen \\Deleted)\r\n",
                st.inbox.len(),
                st.uidnext
            )),
            "IDLE" => {
                // Accept IDLE, then say nothing until DONE: the silent
                // server the catch-up check is for.
                drop(st);
                w.write_all(b"+ idling\r\n")?;
                let mut done = String::new();
                if r.read_line(&mut done)? == 0 {
                    return Ok(());
                }
                w.write_all(format!("{tag} OK IDLE done\r\n").as_bytes())?;
                continue;
            }
            "LIST" => out.push_str(
                "* LIST (\\HasNoChildren) \"/\" INBOX\r\n* LIST (\\HasNoChildren \\Trash) \"/\" \"[Gmail]/Trash\"\r\n",
            ),
            "EXPUNGE" => {
                let mut i = 0;
                while i < st.inbox.len() {
                    if st.inbox[i].flags.contains("\\Deleted") {
                        st.inbox.remove(i);
                        out.push_str(&format!("* {} EXPUNGE\r\n", i + 1));
                    } else {
                        i += 1;
                    }
                }
            }
            "UID" => {
                let mut words = rest.splitn(3, ' ');
                let sub = words.next().unwrap_or("").to_ascii_uppercase();
                let arg = words.next().unwrap_or("").to_string();
                let more = words.next().unwrap_or("").to_string();
                match sub.as_str() {
                    "SEARCH" => {
                        let hits: Vec<u32> = match arg.to_ascii_uppercase().as_str() {
                            "ALL" => st.inbox.iter().map(|m| m.uid).collect(),
                            "UNSEEN" => st.inbox.iter().filter(|m| !m.flags.contains("\\Seen")).map(|m| m.uid).collect(),
                            "DELETED" => st.inbox.iter().filter(|m| m.flags.contains("\\Deleted")).map(|m| m.uid).collect(),
                            "UID" => {
                                let want = parse_set(&more, max);
                                st.inbox.iter().map(|m| m.uid).filter(|u| want.contains(u)).collect()
                            }
                            _ => vec![],
                        };
                        let list: Vec<String> = hits.iter().map(u32::to_string).collect();
                        out.push_str(&format!("* SEARCH {}\r\n", list.join(" ")).replace("SEARCH \r", "SEARCH\r"));
                    }
                    "FETCH" if !more.contains("BODY") => {
                        let want = parse_set(&arg, max);
                        for (i, m) in st.inbox.iter().enumerate().filter(|(_, m)| want.contains(&m.uid)) {
                            out.push_str(&format!("* {} FETCH (UID {} RFC822.SIZE {})\r\n", i + 1, m.uid, m.body.len()));
                        }
                    }
                    "FETCH" => {
                        let want = parse_set(&arg, max);
                        let header_only = more.contains("HEADER");
                        // Another client expunges this message while the
                        // FETCH runs: the server says EXPUNGE where the
                        // message would have come, and later sequence
                        // numbers shift down by one.
                        let gone = st.expunge_mid_fetch.take();
                        let mut shift = 0;
                        for (i, m) in st.inbox.iter().enumerate() {
                            if !want.contains(&m.uid) {
                                continue;
                            }
                            if Some(m.uid) == gone {
                                bytes.extend_from_slice(format!("* {} EXPUNGE\r\n", i + 1).as_bytes());
                                shift = 1;
                                continue;
                            }
                            let (name, data) = if header_only {
                                let end = m.body.windows(4).position(|w| w == b"\r\n\r\n").map_or(m.body.len(), |p| p + 4);
                                ("BODY[HEADER]", &m.body[..end])
                            } else {
                                ("BODY[]", &m.body[..])
                            };
                            let flags: Vec<&str> = m.flags.iter().map(String::as_str).collect();
                            bytes.extend_from_slice(format!(
                                "* {} FETCH (UID {} RFC822.SIZE {} FLAGS ({}) INTERNALDATE \"23-Nov-2026 10:00:00 +0000\" {name} {{{}}}\r\n",
                                i + 1 - shift, m.uid, m.body.len(), flags.join(" "), data.len()
                            ).as_bytes());
                            bytes.extend_from_slice(data);
                            bytes.extend_from_slice(b")\r\n");
                            if st.chatty {
                                bytes.extend_from_slice(b"* 1 FETCH (FLAGS (\\Seen))\r\n* 7 EXISTS\r\n");
                            }
                        }
                        if let Some(uid) = gone {
                            st.inbox.retain(|m| m.uid != uid);
                        }
                    }
                    "STORE" => {
                        let want = parse_set(&arg, max);
                        if st.chatty {
                            // Despite .SILENT, as some servers do.
                            for (i, m) in st.inbox.iter().enumerate().filter(|(_, m)| want.contains(&m.uid)) {
                                out.push_str(&format!("* {} FETCH (UID {} FLAGS (\\Seen))\r\n", i + 1, m.uid));
                            }
                        }
                        let add = more.starts_with('+');
                        let flags: Vec<String> = more[more.find('(').unwrap() + 1..more.find(')').unwrap()]
                            .split(' ')
                            .map(str::to_string)
                            .collect();
                        for m in st.inbox.iter_mut().filter(|m| want.contains(&m.uid)) {
                            for f in &flags {
                                if add {
                                    m.flags.insert(f.clone());
                                } else {
                                    m.flags.remove(f);
                                }
                            }
                        }
                    }
                    "EXPUNGE" => {
                        let want = parse_set(&arg, max);
                        let mut i = 0;
                        while i < st.inbox.len() {
                            if want.contains(&st.inbox[i].uid) && st.inbox[i].flags.contains("\\Deleted") {
                                st.inbox.remove(i);
                                out.push_str(&format!("* {} EXPUNGE\r\n", i + 1));
                            } else {
                                i += 1;
                            }
                        }
                    }
                    "MOVE" => {
                        let want = parse_set(&arg, max);
                        let mut i = 0;
                        while i < st.inbox.len() {
                            if want.contains(&st.inbox[i].uid) {
                                let m = st.inbox.remove(i);
                                st.trash.push(m);
                                out.push_str(&format!("* {} EXPUNGE\r\n", i + 1));
                            } else {
                                i += 1;
                            }
                        }
                    }
                    _ => {
                        w.write_all(format!("{tag} BAD unknown\r\n").as_bytes())?;
                        continue;
                    }
                }
            }
            _ => {
                w.write_all(format!("{tag} BAD unknown\r\n").as_bytes())?;
                continue;
            }
        }
        drop(st);
        w.write_all(out.as_bytes())?;
        w.write_all(&bytes)?;
        w.write_all(format!("{tag} OK {cmd} done\r\n").as_bytes())?;
    }
}

/// An IMAP server for many clients at once, each with an empty INBOX to
/// IDLE on. It counts how many sessions it saw at work at the same time:
/// from the connection to the end of the login, and while a SELECT is
/// answered. The greeting and the SELECT's answer each wait `delay`, so
/// that clients that start together overlap.
pub struct BusyImap {
    pub port: u16,
    /// The most sessions at work at once.
    pub most: Arc<AtomicUsize>,
    /// Sessions that reached IDLE.
    pub idling: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl BusyImap {
    pub fn start(delay: Duration) -> BusyImap {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let most = Arc::new(AtomicUsize::new(0));
        let idling = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let working = Arc::new(AtomicUsize::new(0));
        let (m, i, st) = (most.clone(), idling.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        let (w, m, i) = (working.clone(), m.clone(), i.clone());
                        std::thread::spawn(move || busy_session(s, delay, &w, &m, &i));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        BusyImap {
            port,
            most,
            idling,
            stop,
        }
    }
}

impl Drop for BusyImap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn busy_session(
    s: TcpStream,
    delay: Duration,
    working: &AtomicUsize,
    most: &AtomicUsize,
    idling: &AtomicUsize,
) -> std::io::Result<()> {
    let start = || {
        let now = working.fetch_add(1, Ordering::SeqCst) + 1;
        most.fetch_max(now, Ordering::SeqCst);
    };
    let end = || working.fetch_sub(1, Ordering::SeqCst);
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    start();
    std::thread::sleep(delay);
    w.write_all(b"* OK [CAPABILITY IMAP4rev1 IDLE AUTH=PLAIN SASL-IR] busy\r\n")?;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let (tag, command) = line.trim_end().split_once(' ').unwrap_or(("*", ""));
        let (tag, verb) = (
            tag.to_string(),
            command.split(' ').next().unwrap_or("").to_ascii_uppercase(),
        );
        let answer = match verb.as_str() {
            "AUTHENTICATE" | "LOGIN" => {
                let ok = format!("{tag} OK [CAPABILITY IMAP4rev1 IDLE] in\r\n");
                // Ended as the answer goes: the client's permit outlasts it.
                end();
                ok
            }
            "SELECT" | "EXAMINE" => {
                start();
                std::thread::sleep(delay);
                end();
                format!(
                    "* 0 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n* OK [UIDNEXT 1] n\r\n\
                     {tag} OK [READ-WRITE] selected\r\n"
                )
            }
            "IDLE" => {
                idling.fetch_add(1, Ordering::SeqCst);
                w.write_all(b"+ idling\r\n")?;
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                format!("{tag} OK idle done\r\n")
            }
            "LOGOUT" => {
                w.write_all(format!("* BYE bye\r\n{tag} OK out\r\n").as_bytes())?;
                return Ok(());
            }
            _ => format!("{tag} OK done\r\n"),
        };
        w.write_all(answer.as_bytes())?;
    }
}

/// A SOCKS5 proxy (RFC 1928) for tests: CONNECT only, to loopback only
/// ("localhost", 127.0.0.1 or ::1; IPv4, IPv6 and name requests), with user/password (RFC 1929) if `auth` is
/// set. Records the targets it was asked for. The name [`ELSEWHERE`] leads
/// to 127.0.0.1 too: a server whose certificate is for another name.
/// A name that only [`FakeSocks`] resolves, to 127.0.0.1.
pub const ELSEWHERE: &str = "imap.elsewhere.test";

pub struct FakeSocks {
    pub port: u16,
    pub targets: Arc<Mutex<Vec<String>>>,
}

impl FakeSocks {
    pub fn start(auth: Option<(&str, &str)>) -> FakeSocks {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let targets = Arc::new(Mutex::new(Vec::new()));
        let auth = auth.map(|(u, p)| (u.to_string(), p.to_string()));
        let t2 = targets.clone();
        std::thread::spawn(move || {
            for s in listener.incoming().take(16) {
                let Ok(s) = s else { return };
                let (auth, t2) = (auth.clone(), t2.clone());
                std::thread::spawn(move || {
                    let _ = socks_session(s, auth, &t2);
                });
            }
        });
        FakeSocks { port, targets }
    }
}

fn socks_session(
    mut s: TcpStream,
    auth: Option<(String, String)>,
    targets: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut hdr = [0u8; 2];
    s.read_exact(&mut hdr)?;
    let mut methods = vec![0u8; hdr[1] as usize];
    s.read_exact(&mut methods)?;
    let want = if auth.is_some() { 2 } else { 0 };
    if !methods.contains(&want) {
        s.write_all(&[5, 0xff])?;
        return Ok(());
    }
    s.write_all(&[5, want])?;
    if let Some((user, pass)) = auth {
        let mut v = [0u8; 2];
        s.read_exact(&mut v)?;
        let mut u = vec![0u8; v[1] as usize];
        s.read_exact(&mut u)?;
        let mut l = [0u8; 1];
        s.read_exact(&mut l)?;
        let mut p = vec![0u8; l[0] as usize];
        s.read_exact(&mut p)?;
        if u != user.as_bytes() || p != pass.as_bytes() {
            s.write_all(&[1, 1])?;
            return Ok(());
        }
        s.write_all(&[1, 0])?;
    }
    let mut req = [0u8; 4];
    s.read_exact(&mut req)?;
    let host = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            s.read_exact(&mut a)?;
            std::net::Ipv4Addr::from(a).to_string()
        }
        3 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l)?;
            let mut d = vec![0u8; l[0] as usize];
            s.read_exact(&mut d)?;
            String::from_utf8_lossy(&d).into_owned()
        }
        4 => {
            let mut a = [0u8; 16];
            s.read_exact(&mut a)?;
            std::net::Ipv6Addr::from(a).to_string()
        }
        _ => {
            s.write_all(&[5, 8, 0, 1, 0, 0, 0, 0, 0, 0])?;
            return Ok(());
        }
    };
    let mut p = [0u8; 2];
    s.read_exact(&mut p)?;
    let port = u16::from_be_bytes(p);
    targets.lock().unwrap().push(format!("{host}:{port}"));
    // Loopback only: this proxy never reaches beyond the machine.
    let up = match host.as_str() {
        "localhost" | "127.0.0.1" | "::1" => TcpStream::connect((host.as_str(), port)),
        ELSEWHERE => TcpStream::connect(("127.0.0.1", port)),
        _ => {
            s.write_all(&[5, 2, 0, 1, 0, 0, 0, 0, 0, 0])?;
            return Ok(());
        }
    };
    let up = match up {
        Ok(up) => up,
        Err(_) => {
            // Connection refused (5), as a real proxy says it.
            s.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0])?;
            return Ok(());
        }
    };
    s.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, p[0], p[1]])?;
    s.set_read_timeout(None)?;
    let (mut a, mut b) = (s.try_clone()?, up.try_clone()?);
    let (mut c, mut d) = (s, up);
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut a, &mut b);
        let _ = b.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut d, &mut c);
    let _ = c.shutdown(std::net::Shutdown::Write);
    let _ = t.join();
    Ok(())
}

/// A far-away link to a real server: a relay on 127.0.0.1 that delivers
/// what each side sends `one_way` later, in order (a round trip of twice
/// that), to 127.0.0.1:`upstream`. Its threads end with the connections
/// and the test process.
pub struct SlowLink {
    pub port: u16,
}

impl SlowLink {
    pub fn start(upstream: u16, one_way: Duration) -> SlowLink {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in listener.incoming().take(16) {
                let Ok(s) = s else { return };
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    return;
                };
                let _ = (s.set_nodelay(true), up.set_nodelay(true));
                for (from, to) in [(&s, &up), (&up, &s)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                        return;
                    };
                    std::thread::spawn(move || delayed_copy(from, to, one_way));
                }
            }
        });
        SlowLink { port }
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read.
fn delayed_copy(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    use std::io::Read;
    let (tx, rx) = std::sync::mpsc::channel::<(std::time::Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        for (at, chunk) in rx {
            std::thread::sleep(at.saturating_duration_since(std::time::Instant::now()));
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0
            || tx
                .send((std::time::Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
}
