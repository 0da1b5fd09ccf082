//! Helpers for bench/run.sh, built as a cargo example (`bench-tools`):
//!
//! - `seed DIR N SEED [MIX]`: writes N messages into the Maildir DIR,
//!   deterministically from SEED. MIX `realistic` (default): 90 % text of
//!   2–20 KB, 9.7 % with a base64 attachment of 100 KB–2 MB (log-uniform),
//!   0.3 % of 10 MB; `small`: 2–20 KB only; `big50`: small ones plus one
//!   50 MB message.
//! - `barefetch HOST PORT USER PASSWORD CAFILE`: the limit. Logs in over
//!   TLS, selects INBOX, issues one `UID FETCH 1:* BODY.PEEK[]` and reads
//!   the answer to the end, discarding it. Prints messages and bytes.
//! - `pipe HOST PORT USER PASSWORD CAFILE SMTPHOST:PORT`: the end-to-end
//!   limit of an IMAP-to-SMTP pipe on this machine. The same FETCH, its
//!   messages streamed into one pipelined SMTP session (MAIL, RCPT and DATA
//!   sent together, the body after the 354, the next message's commands
//!   right after the "." without waiting for its 250), with no ledger and
//!   no per-message work beyond dot-stuffing.
//! - `shape PORT UPSTREAM RTT_MS MBIT STATS`: a slow link between the
//!   tools and Dovecot (the kernel's netem is not available here). It
//!   listens on 127.0.0.1:PORT and relays to UPSTREAM (HOST:PORT): each
//!   direction leaves at MBIT megabits a second and arrives RTT_MS / 2
//!   later, and a new connection waits one RTT first (TCP's handshake).
//!   Each connection, when it ends, appends to STATS: bytes up and down,
//!   the client's flights (a flight: the client sends after the server
//!   did, so a round trip), and its seconds. With SHAPE_TIMELINE=DIR, each
//!   connection also writes a file to DIR: when the client sent (seconds
//!   from the connection's start, bytes, the first bytes) and when the
//!   link towards the client idled, and how long: where a pull loses time.
//!   The seed names its messages as Dovecot's delivery does, with their
//!   sizes (`,S=…,W=…`).
//! - `seed … wan`: the realistic mix with text of a large vocabulary,
//!   which deflate shrinks about as much as real mail (the plain mix's
//!   text shrinks about twice as much).

use std::io::Write;
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A small deterministic generator (PCG-style LCG; no crate needed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
    fn unit(&mut self) -> f64 {
        self.next() as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

const WORDS: &[&str] = &[
    "the", "mail", "server", "message", "delivery", "queue", "relay", "imap", "local", "about",
    "meeting", "tomorrow", "please", "attached", "report", "thanks", "regards", "project",
    "update", "review", "would", "could", "should", "before", "after", "weekend", "invoice",
    "budget",
];

/// Text of the small vocabulary, or (`varied`) of a large one, its words
/// drawn with a skew as in a language.
fn text(rng: &mut Rng, size: usize, out: &mut Vec<u8>, varied: bool) {
    let start = out.len();
    let mut line = 0;
    let mut word = Vec::new();
    while out.len() - start < size {
        word.clear();
        if varied {
            // Word k of 20,000, k skewed towards the common ones; its
            // letters follow from k.
            let k = (20_000.0 * rng.unit().powi(3)) as u64;
            let mut h = k.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            const LETTERS: &[u8] = b"eeeeeeeeeeeettttttttaaaaaaaaoooooooiiiiiiinnnnnnnssssss\
                hhhhhhrrrrrrddddlllllcccuuummmwwffggyyppbbvkjxqz";
            let len = 2 + (h % 9) as usize;
            for _ in 0..len {
                h ^= h << 13;
                h ^= h >> 7;
                h ^= h << 17;
                word.push(LETTERS[(h % LETTERS.len() as u64) as usize]);
            }
            if k.is_multiple_of(7) {
                word.extend_from_slice(b",");
            }
        } else {
            word.extend_from_slice(WORDS[rng.range(0, WORDS.len() as u64) as usize].as_bytes());
        }
        let w = &word;
        out.extend_from_slice(w);
        line += w.len() + 1;
        if line > 70 {
            out.extend_from_slice(b"\r\n");
            line = 0;
        } else {
            out.push(b' ');
        }
    }
    out.extend_from_slice(b"\r\n");
}

fn base64_lines(rng: &mut Rng, size: usize, out: &mut Vec<u8>) {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut n = 0;
    while n < size {
        for _ in 0..76 {
            out.push(B64[(rng.next() & 63) as usize]);
        }
        out.extend_from_slice(b"\r\n");
        n += 78;
    }
}

fn message(rng: &mut Rng, i: u64, size: usize, varied: bool) -> Vec<u8> {
    let mut m = format!(
        "Return-Path: <sender{}@bench.example>\r\nFrom: Sender {} <sender{}@bench.example>\r\n\
         To: bench@example.test\r\nSubject: benchmark message {i}\r\n\
         Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <bench{i}@bench.example>\r\n\
         MIME-Version: 1.0\r\n",
        i % 97,
        i % 97,
        i % 97
    )
    .into_bytes();
    if size < 50_000 {
        m.extend_from_slice(b"Content-Type: text/plain; charset=us-ascii\r\n\r\n");
        text(rng, size, &mut m, varied);
    } else {
        m.extend_from_slice(
            b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n",
        );
        text(rng, 2000, &mut m, varied);
        m.extend_from_slice(
            b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n",
        );
        base64_lines(rng, size, &mut m);
        m.extend_from_slice(b"--b--\r\n");
    }
    m
}

fn seed(dir: &Path, n: u64, seed: u64, mix: &str) -> std::io::Result<()> {
    let mut rng = Rng(seed);
    for sub in ["new", "cur", "tmp"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let mut total = 0u64;
    for i in 0..n {
        let size = match mix {
            "small" => rng.range(2_000, 20_000) as usize,
            "big50" if i == n / 2 => 50_000_000,
            "big50" => rng.range(2_000, 20_000) as usize,
            _ => {
                let p = rng.unit();
                if p < 0.9 {
                    rng.range(2_000, 20_000) as usize
                } else if p < 0.997 {
                    (100_000f64 * 20f64.powf(rng.unit())) as usize
                } else {
                    10_000_000
                }
            }
        };
        let m = message(&mut rng, i, size, mix == "wan");
        total += m.len() as u64;
        // Unread, in cur/ so Dovecot need not move it, and named as
        // Dovecot's own delivery (LMTP, LDA) names a message: with its size
        // on disk (S=) and its size with CRLF line ends (W=, RFC822.SIZE;
        // the same here, every line ends in CRLF). Without W= the server
        // reads every message whole to answer a FETCH of RFC822.SIZE.
        let mut f = std::fs::File::create(dir.join("cur").join(format!(
            "{}.{i}.bench,S={len},W={len}:2,",
            1_700_000_000 + i,
            len = m.len()
        )))?;
        f.write_all(&m)?;
    }
    println!(
        "{n} messages, {total} bytes, mean {} bytes",
        total / n.max(1)
    );
    Ok(())
}

/// What one relayed connection carried.
#[derive(Default)]
struct LinkStats {
    up: std::sync::atomic::AtomicU64,
    down: std::sync::atomic::AtomicU64,
    /// Times the client sent after the server had (or first): round trips.
    flights: std::sync::atomic::AtomicU64,
    /// 1: the client sent last; 2: the server did.
    last: std::sync::atomic::AtomicU8,
    /// With SHAPE_TIMELINE set: the client's flights and the times the
    /// link towards the client idled, in seconds from the connection's
    /// start, written to a file of that directory when the connection ends.
    timeline: Option<std::sync::Mutex<Vec<String>>>,
    t0: Option<tokio::time::Instant>,
}

async fn shape(
    port: u16,
    upstream: String,
    rtt: std::time::Duration,
    mbit: f64,
    stats: std::path::PathBuf,
) -> anyhow::Result<()> {
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let bytes_per_sec = mbit * 1e6 / 8.0;
    loop {
        let (c, _) = l.accept().await?;
        let (upstream, stats) = (upstream.clone(), stats.clone());
        tokio::spawn(async move {
            let t0 = std::time::Instant::now();
            // TCP's handshake takes a round trip on a real link.
            tokio::time::sleep(rtt).await;
            let Ok(u) = tokio::net::TcpStream::connect(&upstream).await else {
                return;
            };
            let _ = (c.set_nodelay(true), u.set_nodelay(true));
            let (cr, cw) = c.into_split();
            let (ur, uw) = u.into_split();
            let timeline = std::env::var_os("SHAPE_TIMELINE");
            let st = std::sync::Arc::new(LinkStats {
                timeline: timeline.is_some().then(Default::default),
                t0: Some(t0.into()),
                ..Default::default()
            });
            tokio::join!(
                link(cr, uw, rtt / 2, bytes_per_sec, 1, st.clone()),
                link(ur, cw, rtt / 2, bytes_per_sec, 2, st.clone())
            );
            use std::sync::atomic::Ordering::Relaxed;
            let line = format!(
                "up={} down={} flights={} secs={:.3}\n",
                st.up.load(Relaxed),
                st.down.load(Relaxed),
                st.flights.load(Relaxed),
                t0.elapsed().as_secs_f64()
            );
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&stats)
            {
                let _ = f.write_all(line.as_bytes());
            }
            if let (Some(dir), Some(events)) = (timeline, &st.timeline) {
                let name = format!("{}.{}", std::process::id(), t0.elapsed().as_nanos());
                let events = events.lock().map(|e| e.join("\n")).unwrap_or_default();
                let _ = std::fs::write(std::path::Path::new(&dir).join(name), events + "\n");
            }
        });
    }
}

/// One direction of the link: what is read leaves at the link's rate (the
/// next read waits until it has), and is written `delay` later.
async fn link(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    delay: std::time::Duration,
    bytes_per_sec: f64,
    side: u8,
    st: std::sync::Arc<LinkStats>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    // In flight: up to 4 MB, more than any bandwidth-delay product here.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(256);
    let writer = tokio::spawn(async move {
        while let Some((at, buf)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if w.write_all(&buf).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    let mut free_at = tokio::time::Instant::now();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let now = tokio::time::Instant::now();
        let secs = |t: tokio::time::Instant| {
            t.saturating_duration_since(st.t0.unwrap_or(t))
                .as_secs_f64()
        };
        if side == 1 {
            st.up.fetch_add(n as u64, Relaxed);
            if st.last.swap(1, Relaxed) != 1 {
                st.flights.fetch_add(1, Relaxed);
            }
            if let Some(t) = &st.timeline {
                let head = String::from_utf8_lossy(&buf[..n.min(60)]).replace(['\r', '\n'], " ");
                t.lock()
                    .unwrap()
                    .push(format!("{:.4} up {n} {head}", secs(now)));
            }
        } else {
            // The link towards the client idled since it was last free.
            if let Some(t) = &st.timeline {
                if now > free_at + std::time::Duration::from_millis(2) {
                    t.lock().unwrap().push(format!(
                        "{:.4} idle {:.4}",
                        secs(free_at),
                        (now - free_at).as_secs_f64()
                    ));
                }
            }
            st.down.fetch_add(n as u64, Relaxed);
            st.last.store(2, Relaxed);
        }
        // The link's schedule goes on from where it was, unless it has been
        // idle (a timer that wakes a millisecond late must not cost the
        // link a millisecond a chunk).
        if now > free_at + std::time::Duration::from_millis(5) {
            free_at = now;
        }
        free_at += std::time::Duration::from_secs_f64(n as f64 / bytes_per_sec);
        if tx.send((free_at + delay, buf[..n].to_vec())).await.is_err() {
            break;
        }
        // The link is busy until then: so is the sender.
        tokio::time::sleep_until(free_at).await;
    }
    drop(tx);
    let _ = writer.await;
}

type Imap = tokio::io::BufStream<tokio_native_tls::TlsStream<tokio::net::TcpStream>>;

/// Reads until `tag` has been seen; the bytes read.
async fn until<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut [u8],
    tag: &[u8],
) -> anyhow::Result<u64> {
    let mut tail: Vec<u8> = Vec::new();
    let mut total = 0u64;
    loop {
        let n = s.read(buf).await?;
        anyhow::ensure!(n > 0, "connection closed");
        total += n as u64;
        tail.extend_from_slice(&buf[..n]);
        if tail.windows(tag.len()).any(|w| w == tag) {
            return Ok(total);
        }
        let keep = tail.len().saturating_sub(tag.len());
        tail.drain(..keep);
    }
}

/// TLS, the greeting, LOGIN and SELECT INBOX (small answers, read until
/// the tag).
async fn login(host: &str, port: u16, user: &str, pass: &str, ca: &str) -> anyhow::Result<Imap> {
    let tcp = tokio::net::TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    let cert = native_tls::Certificate::from_pem(&std::fs::read(ca)?)?;
    let connector = native_tls::TlsConnector::builder()
        .add_root_certificate(cert)
        .build()?;
    let tls = tokio_native_tls::TlsConnector::from(connector)
        .connect(host, tcp)
        .await?;
    let mut s = tokio::io::BufStream::with_capacity(256 * 1024, 256 * 1024, tls);
    let mut buf = vec![0u8; 4096];
    until(&mut s, &mut buf, b"\r\n").await?;
    s.write_all(format!("a LOGIN \"{user}\" \"{pass}\"\r\nb SELECT INBOX\r\n").as_bytes())
        .await?;
    s.flush().await?;
    until(&mut s, &mut buf, b"\r\nb OK").await?;
    Ok(s)
}

async fn barefetch(host: &str, port: u16, user: &str, pass: &str, ca: &str) -> anyhow::Result<()> {
    let mut s = login(host, port, user, pass, ca).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let t0 = std::time::Instant::now();
    s.write_all(b"c UID FETCH 1:* BODY.PEEK[]\r\n").await?;
    s.flush().await?;
    let bytes = until(&mut s, &mut buf, b"\r\nc OK").await?;
    let secs = t0.elapsed().as_secs_f64();
    println!("barefetch: {bytes} bytes in {secs:.3}s");
    Ok(())
}

/// The FETCH's literals, each sent on as a message as soon as it is whole.
async fn fetch_literals(mut s: Imap, tx: tokio::sync::mpsc::Sender<Vec<u8>>) -> anyhow::Result<()> {
    s.write_all(b"c UID FETCH 1:* BODY.PEEK[]\r\n").await?;
    s.flush().await?;
    let mut buf: Vec<u8> = Vec::with_capacity(512 * 1024);
    let mut pos = 0;
    let mut chunk = vec![0u8; 256 * 1024];
    loop {
        // One line, or one literal after its line.
        if let Some(eol) = memchr::memmem::find(&buf[pos..], b"\r\n").map(|e| pos + e) {
            let line = &buf[pos..eol];
            if line.starts_with(b"c OK") {
                return Ok(());
            }
            anyhow::ensure!(!line.starts_with(b"c "), "the FETCH failed");
            let literal = line
                .ends_with(b"}")
                .then(|| line.iter().rposition(|b| *b == b'{'))
                .flatten()
                .and_then(|o| std::str::from_utf8(&line[o + 1..line.len() - 1]).ok())
                .and_then(|n| n.parse::<usize>().ok());
            match literal {
                Some(n) if buf.len() >= eol + 2 + n => {
                    let m = buf[eol + 2..eol + 2 + n].to_vec();
                    pos = eol + 2 + n;
                    if tx.send(m).await.is_err() {
                        return Ok(());
                    }
                    continue;
                }
                Some(_) => {}
                None => {
                    pos = eol + 2;
                    continue;
                }
            }
        }
        if pos > 0 {
            buf.drain(..pos);
            pos = 0;
        }
        let n = s.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "the IMAP server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads one SMTP reply (all its lines); its code.
async fn reply<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> anyhow::Result<u16> {
    use tokio::io::AsyncBufReadExt as _;
    loop {
        let mut line = String::new();
        anyhow::ensure!(r.read_line(&mut line).await? > 0, "the SMTP server closed");
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0));
        }
    }
}

async fn pipe(
    host: &str,
    port: u16,
    user: &str,
    pass: &str,
    ca: &str,
    smtp: &str,
) -> anyhow::Result<()> {
    let imap = login(host, port, user, pass, ca).await?;
    let tcp = tokio::net::TcpStream::connect(smtp).await?;
    tcp.set_nodelay(true)?;
    let (r, w) = tcp.into_split();
    let mut r = tokio::io::BufReader::new(r);
    let mut w = tokio::io::BufWriter::with_capacity(256 * 1024, w);
    anyhow::ensure!(reply(&mut r).await? == 220, "no SMTP greeting");
    w.write_all(b"EHLO bench\r\n").await?;
    w.flush().await?;
    anyhow::ensure!(reply(&mut r).await? == 250, "EHLO refused");
    let t0 = std::time::Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let smtp_side = async move {
        let mut sent = 0u64;
        let mut stuffed = Vec::with_capacity(256 * 1024);
        while let Some(m) = rx.recv().await {
            w.write_all(
                b"MAIL FROM:<bench@remote.test>\r\nRCPT TO:<bench@example.test>\r\nDATA\r\n",
            )
            .await?;
            w.flush().await?;
            // The previous message's 250, MAIL's, RCPT's, then the 354.
            loop {
                match reply(&mut r).await? {
                    354 => break,
                    250 => {}
                    c => anyhow::bail!("SMTP reply {c}"),
                }
            }
            stuffed.clear();
            let mut at_line_start = true;
            for &b in &m {
                if at_line_start && b == b'.' {
                    stuffed.push(b'.');
                }
                stuffed.push(b);
                at_line_start = b == b'\n';
            }
            if !stuffed.ends_with(b"\r\n") {
                stuffed.extend_from_slice(b"\r\n");
            }
            stuffed.extend_from_slice(b".\r\n");
            w.write_all(&stuffed).await?;
            sent += 1;
        }
        w.write_all(b"QUIT\r\n").await?;
        w.flush().await?;
        while reply(&mut r).await? != 221 {}
        anyhow::Ok(sent)
    };
    // The fetch side on a task of its own, so it runs beside the SMTP side.
    let fetched = tokio::spawn(fetch_literals(imap, tx));
    let sent = smtp_side.await?;
    fetched.await??;
    println!(
        "pipe: {sent} messages in {:.3}s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("seed") => {
            let mix = args.get(5).map(String::as_str).unwrap_or("realistic");
            seed(Path::new(&args[2]), args[3].parse()?, args[4].parse()?, mix)?;
        }
        Some("barefetch") => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(barefetch(
                &args[2],
                args[3].parse()?,
                &args[4],
                &args[5],
                &args[6],
            ))?;
        }
        Some("pipe") => {
            // Both sides at once, on the machine's cores, as imapull runs.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(pipe(
                &args[2],
                args[3].parse()?,
                &args[4],
                &args[5],
                &args[6],
                &args[7],
            ))?;
        }
        Some("shape") => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(shape(
                args[2].parse()?,
                args[3].clone(),
                std::time::Duration::from_millis(args[4].parse()?),
                args[5].parse()?,
                args[6].clone().into(),
            ))?;
        }
        _ => anyhow::bail!(
            "usage: bench-tools seed DIR N SEED [MIX] | barefetch HOST PORT USER PASS CAFILE \
             | pipe HOST PORT USER PASS CAFILE SMTPHOST:PORT \
             | shape PORT UPSTREAM RTT_MS MBIT STATS"
        ),
    }
    Ok(())
}
