//! `imapull import pullimap`: PullIMAP's INI config and statefile turned
//! into an imapull account and its ledger state, so that the first pass
//! delivers exactly what PullIMAP would have delivered next.
//!
//! The statefile is 32-bit big-endian integers: the mailbox's UIDVALIDITY,
//! the UIDNEXT up to which everything was delivered, then the UIDs
//! delivered by a run that was cut short (PullIMAP appends each after its
//! delivery and would mark them `\Seen` at its next run). They become the
//! watermark, and delivered rows whose flag imapull then stores.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

/// An INI file as PullIMAP reads it: `key = value` lines under
/// `[section]`s; the lines before the first section apply to all.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Ini {
    pub sections: Vec<(String, Vec<(String, String)>)>,
}

pub fn parse_ini(text: &str) -> Result<Ini> {
    let mut ini = Ini::default();
    ini.sections.push((String::new(), Vec::new()));
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            ini.sections.push((name.trim().to_string(), Vec::new()));
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            bail!(
                "line {}: neither [section] nor key = value: {line:?}",
                n + 1
            );
        };
        let last = ini.sections.last_mut().expect("one section at least");
        last.1.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(ini)
}

impl Ini {
    /// The options of `section`, over the ones before any section.
    pub fn options(&self, section: &str) -> Option<Vec<(String, String)>> {
        let own = self
            .sections
            .iter()
            .find(|(n, _)| n == section && !n.is_empty())?;
        let mut out: Vec<(String, String)> = self.sections[0].1.clone();
        for (k, v) in &own.1 {
            out.retain(|(ok, _)| ok != k);
            out.push((k.clone(), v.clone()));
        }
        Some(out)
    }
}

/// What a statefile says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub in_flight: Vec<u32>,
}

pub fn read_statefile(bytes: &[u8]) -> Result<State> {
    if bytes.len() < 8 || !bytes.len().is_multiple_of(4) {
        bail!(
            "{} bytes: a PullIMAP statefile is 32-bit integers, UIDVALIDITY and UIDNEXT first",
            bytes.len()
        );
    }
    let words: Vec<u32> = bytes
        .chunks(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(State {
        uidvalidity: words[0],
        uidnext: words[1],
        in_flight: words[2..].to_vec(),
    })
}

/// An imapull account from PullIMAP's options.
#[derive(Debug, PartialEq, Eq)]
pub struct Translated {
    /// The `[accounts.NAME]` table.
    pub toml: String,
    pub mailbox: String,
    /// The statefile PullIMAP used, if the options name one.
    pub statefile: Option<String>,
    /// One line per option: what became of it.
    pub report: Vec<String>,
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// `smtp:[127.0.0.1]:25` as imapull writes it (`smtp://127.0.0.1:25`).
fn deliver_url(v: &str) -> Option<String> {
    let (proto, rest) = v.split_once(':')?;
    let proto = proto.to_ascii_lowercase();
    if proto != "smtp" && proto != "lmtp" {
        return None;
    }
    let (host, port) = rest.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if host.contains(':') {
        format!("[{host}]")
    } else if host.is_empty() {
        "127.0.0.1".to_string()
    } else {
        host.to_string()
    };
    Some(format!("{proto}://{host}:{port}"))
}

fn yes(v: &str) -> bool {
    matches!(v.to_ascii_uppercase().as_str(), "YES" | "TRUE" | "1" | "ON")
}

/// The options PullIMAP has, and the account being written.
struct Out<'a> {
    options: &'a [(String, String)],
    lines: Vec<String>,
    report: Vec<String>,
}

impl Out<'_> {
    fn get(&self, k: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(ok, _)| ok == k)
            .map(|(_, v)| v.as_str())
    }

    /// `key = value` in the account, said to come `from` PullIMAP's option.
    fn put(&mut self, key: &str, value: String, from: &str) {
        self.lines.push(format!("{key} = {value}"));
        self.report.push(format!("{from} -> {key} = {value}"));
    }

    fn say(&mut self, line: impl Into<String>) {
        self.report.push(line.into());
    }
}

/// The options PullIMAP has that [`translate`] maps.
const MAPPED: &[&str] = &[
    "type",
    "command",
    "null-stderr",
    "host",
    "port",
    "STARTTLS",
    "proxy",
    "SSL_CAfile",
    "SSL_fingerprint",
    "username",
    "password",
    "mailbox",
    "deliver-method",
    "deliver-ehlo",
    "deliver-rcpt",
    "purge-after",
    "compress",
    "statefile",
];

/// Translates `options` (of one section) into an account called `name`.
/// Pure. `recipient` stands in for `deliver-rcpt` when PullIMAP had none.
pub fn translate(
    name: &str,
    options: &[(String, String)],
    recipient: Option<&str>,
) -> Result<Translated> {
    let mut o = Out {
        options,
        lines: vec![format!("[accounts.{name}]")],
        report: Vec::new(),
    };
    reach(&mut o)?;
    if let Some(u) = o.get("username").map(quote) {
        o.put("username", u, "username");
    }
    if let Some(p) = o.get("password").map(quote) {
        o.lines.push(format!("password = {p}"));
        o.say("password -> password (the file is written 0600)");
    }
    let mailbox = o.get("mailbox").unwrap_or("INBOX").to_string();
    let mailbox = crate::imap::utf7::decode(&mailbox).unwrap_or(mailbox);
    o.put("mailboxes", format!("[{}]", quote(&mailbox)), "mailbox");
    delivery(&mut o, recipient)?;
    // PullIMAP pulls everything at or above its UIDNEXT, read or not, and
    // the imported watermark says where that is.
    o.lines.push("initial = \"all\"".into());
    unmapped(&mut o);
    Ok(Translated {
        toml: o.lines.join("\n") + "\n",
        mailbox,
        statefile: o.get("statefile").map(str::to_string),
        report: o.report,
    })
}

/// `type` and what goes with it: a tunnel's command, or host, port, TLS,
/// proxy and the certificate's checks.
fn reach(o: &mut Out<'_>) -> Result<()> {
    let kind = o.get("type").unwrap_or("imaps").to_ascii_lowercase();
    if kind == "tunnel" {
        let cmd = o
            .get("command")
            .context("type = tunnel without a command")?;
        // Perl's exec (PullIMAP is Perl) hands a command with any of
        // these to the shell, and splits the rest into words.
        let argv: Vec<String> = if cmd.contains(|c: char| "$&*(){}[]'\";\\|?<>~`\n".contains(c)) {
            vec!["/bin/sh".into(), "-c".into(), cmd.to_string()]
        } else {
            cmd.split_whitespace().map(str::to_string).collect()
        };
        let list = argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(", ");
        o.put("transport", quote("tunnel"), "type = tunnel");
        o.put("command", format!("[{list}]"), "command");
        if o.get("null-stderr").is_some_and(yes) {
            o.put("tunnel_stderr", quote("null"), "null-stderr");
        }
        return Ok(());
    }
    if kind != "imap" && kind != "imaps" {
        bail!("type = {kind}: PullIMAP knows imap, imaps and tunnel");
    }
    let host = o.get("host").unwrap_or("localhost");
    let host = quote(host.trim_start_matches('[').trim_end_matches(']'));
    o.put("host", host, "host");
    if let Some(p) = o.get("port") {
        let p = p.parse::<u16>().context("port")?.to_string();
        o.put("port", p, "port");
    } else if kind == "imap" {
        o.put("port", "143".into(), "type = imap");
    }
    let tls = match (kind.as_str(), o.get("STARTTLS").is_none_or(yes)) {
        ("imaps", _) => "implicit",
        (_, true) => "starttls",
        (_, false) => "none",
    };
    o.put("tls", quote(tls), "type, STARTTLS");
    if tls == "none" {
        o.put("allow_plaintext", "true".into(), "STARTTLS = NO");
    }
    if let Some(p) = o.get("proxy") {
        // PullIMAP's default port for a proxy is 1080.
        let p = match p.rsplit_once(':') {
            Some((_, port)) if port.parse::<u16>().is_ok() => p.to_string(),
            _ => format!("{p}:1080"),
        };
        o.put("proxy", quote(&p), "proxy");
    }
    if let Some(f) = o.get("SSL_CAfile").map(quote) {
        o.put("ca_file", f, "SSL_CAfile");
    }
    if let Some(fp) = o.get("SSL_fingerprint").map(str::to_string) {
        let mut pins = fp.split_whitespace();
        let first = pins.next().unwrap_or_default();
        match first.split_once('$') {
            Some((algo, _)) if algo != "sha256" => o.say(format!(
                "SSL_fingerprint {first}: only SHA-256 pins are kept; not mapped"
            )),
            _ => {
                let hex = first.strip_prefix("sha256$").unwrap_or(first);
                o.put("tls_pin_sha256", quote(hex), "SSL_fingerprint");
            }
        }
        if pins.next().is_some() {
            o.say("SSL_fingerprint: more than one; imapull pins the first only");
        }
    }
    Ok(())
}

/// Where mail goes, and what retention and compression PullIMAP had.
fn delivery(o: &mut Out<'_>, recipient: Option<&str>) -> Result<()> {
    let deliver = o.get("deliver-method").unwrap_or("smtp:[127.0.0.1]:25");
    let url = deliver_url(deliver)
        .with_context(|| format!("deliver-method = {deliver}: not PROTOCOL:[ADDRESS]:PORT"))?;
    o.put("deliver", quote(&url), "deliver-method");
    let ehlo = quote(o.get("deliver-ehlo").unwrap_or("localhost.localdomain"));
    o.put("ehlo", ehlo, "deliver-ehlo");
    let Some(rcpt) = o.get("deliver-rcpt").or(recipient).map(quote) else {
        bail!(
            "no deliver-rcpt: PullIMAP delivered to the local user name; give the address \
             with --recipient"
        );
    };
    o.put("recipients", format!("[{rcpt}]"), "deliver-rcpt");
    match o.get("purge-after").map(str::to_string) {
        Some(d) => {
            let days: u32 = d
                .parse()
                .with_context(|| format!("purge-after = {d}: not a number of days"))?;
            o.put("purge_after", quote(&format!("{days}d")), "purge-after");
        }
        None => o.say("(no purge-after) -> mail stays on the server, as with PullIMAP"),
    }
    if o.get("compress").is_some_and(|v| !yes(v)) {
        o.put("compress", "false".into(), "compress = NO");
    } else {
        o.say("compress -> left to imapull (\"auto\": on a slow link only)");
    }
    Ok(())
}

/// Names each option that has no meaning here, with why.
fn unmapped(o: &mut Out<'_>) {
    for (k, v) in o.options {
        if MAPPED.contains(&k.as_str()) {
            continue;
        }
        let why = match k.as_str() {
            "auth" => "imapull picks AUTHENTICATE PLAIN or LOGIN from the capabilities itself",
            "SSL_verify" if !yes(v) => {
                "imapull always verifies the certificate: use ca_file, or tls_pin_sha256 for a \
                 self-signed one"
            }
            "SSL_verify" => "imapull always verifies the certificate",
            "SSL_CApath" => "give the CA as one file in ca_file",
            "SSL_protocols" | "SSL_protocol_min" | "SSL_protocol_max" | "SSL_cipherlist"
            | "SSL_ciphersuites" => "imapull uses the system's OpenSSL defaults (TLS 1.2 and up)",
            "SSL_hostname" => "the name checked is host",
            "logfile" => "imapull logs to stderr (the journal under systemd)",
            _ => "unknown to imapull",
        };
        o.report.push(format!("{k} = {v}: not mapped: {why}"));
    }
}

/// Where PullIMAP keeps `section`'s statefile: the `statefile` option or
/// the section's name, relative to $XDG_DATA_HOME/pullimap.
pub fn statefile_path(option: Option<&str>, section: &str) -> PathBuf {
    let name = option.unwrap_or(section);
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_default();
    base.join("pullimap").join(p)
}

/// PullIMAP's own default config file.
pub fn default_pullimap_config() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_default()
        .join("pullimap/config")
}

/// What [`import`] is asked.
pub struct Request<'a> {
    /// imapull's config file: the account is added to it (it is created
    /// when missing).
    pub config: &'a Path,
    pub from: &'a Path,
    pub statefile: Option<&'a Path>,
    pub section: &'a str,
    pub account: Option<&'a str>,
    pub recipient: Option<&'a str>,
}

/// Translates, checks the result with the config parser, writes the
/// account and the ledger state, and prints what became of each option.
pub fn import(out: &mut impl std::io::Write, r: &Request<'_>, now: i64) -> Result<()> {
    let text = std::fs::read_to_string(r.from)
        .with_context(|| format!("reading PullIMAP's config {}", r.from.display()))?;
    let ini = parse_ini(&text).with_context(|| r.from.display().to_string())?;
    let options = ini
        .options(r.section)
        .with_context(|| format!("{} has no section [{}]", r.from.display(), r.section))?;
    let name = r.account.unwrap_or(r.section);
    let t = translate(name, &options, r.recipient)?;
    let state_path = match r.statefile {
        Some(p) => p.to_path_buf(),
        None => statefile_path(t.statefile.as_deref(), r.section),
    };
    let bytes = std::fs::read(&state_path)
        .with_context(|| format!("reading PullIMAP's statefile {}", state_path.display()))?;
    let state = read_statefile(&bytes).with_context(|| state_path.display().to_string())?;
    let existing = match std::fs::read_to_string(r.config) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", r.config.display())),
    };
    let joined = format!("{}\n{}", existing.trim_end(), t.toml);
    let config = crate::config::Config::parse(r.config, &joined)
        .map_err(anyhow::Error::new)
        .context("the imported account does not make a valid configuration; nothing was written")?;
    let mut ledger = crate::ledger::Ledger::open(&config.ledger)?;
    if ledger.mailbox_state(name, &t.mailbox)?.is_some() {
        bail!(
            "the ledger knows {name}/{} already; nothing was written",
            t.mailbox
        );
    }
    let st = crate::ledger::MailboxState {
        uidvalidity: state.uidvalidity,
        watermark: state.uidnext,
    };
    ledger.import_state(name, &t.mailbox, st, &state.in_flight, now)?;
    write_config(r.config, &joined)?;
    for line in &t.report {
        writeln!(out, "  {line}")?;
    }
    writeln!(
        out,
        "{name}/{}: UIDVALIDITY {}, watermark {} from {}{}; the account is in {}",
        t.mailbox,
        state.uidvalidity,
        state.uidnext,
        state_path.display(),
        if state.in_flight.is_empty() {
            String::new()
        } else {
            format!(
                " ({} delivered by a run that was cut short: recorded as delivered, \\Seen stored at the first pass)",
                state.in_flight.len()
            )
        },
        r.config.display()
    )?;
    writeln!(
        out,
        "next: `imapull check {name}`, then stop PullIMAP and `imapull run {name}`"
    )?;
    Ok(())
}

/// The config with the account added, written 0600 (it holds a password)
/// by a rename, so that a crash leaves the old file or the new one.
fn write_config(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".import.tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
# global options
deliver-rcpt = me@example.org
[work]
type = imap
host = [192.0.2.7]
STARTTLS = YES
username = alice
password = s3cr\"et
mailbox = Entw&APw-rfe
deliver-method = lmtp:[::1]:24
purge-after = 30
SSL_fingerprint = sha256$0123 abcd
auth = PLAIN
SSL_protocol_min = TLSv1.2
[other]
type = tunnel
command = ssh mail.example.net /usr/lib/dovecot/imap
null-stderr = YES
";

    #[test]
    fn pullimap_options_become_an_account() {
        let ini = parse_ini(SAMPLE).unwrap();
        let t = translate("work", &ini.options("work").unwrap(), None).unwrap();
        for want in [
            "host = \"192.0.2.7\"",
            "port = 143",
            "tls = \"starttls\"",
            "username = \"alice\"",
            "password = 's3cr\"et'",
            "mailboxes = [\"Entwürfe\"]",
            "deliver = \"lmtp://[::1]:24\"",
            "recipients = [\"me@example.org\"]",
            "purge_after = \"30d\"",
            "tls_pin_sha256 = \"0123\"",
            "initial = \"all\"",
        ] {
            assert!(t.toml.contains(want), "{want} in\n{}", t.toml);
        }
        let unmapped: Vec<&String> = t
            .report
            .iter()
            .filter(|l| l.contains("not mapped"))
            .collect();
        assert_eq!(unmapped.len(), 2, "{unmapped:?}");
        assert!(t.report.iter().any(|l| l.contains("pins the first only")));
        let t = translate("other", &ini.options("other").unwrap(), None).unwrap();
        assert!(t
            .toml
            .contains("command = [\"ssh\", \"mail.example.net\", \"/usr/lib/dovecot/imap\"]"));
        assert!(t.toml.contains("tunnel_stderr = \"null\""));
        assert!(ini.options("nope").is_none());
    }

    #[test]
    fn without_a_recipient_it_asks_for_one() {
        let opts = vec![("host".to_string(), "h".to_string())];
        assert!(translate("a", &opts, None).is_err());
        assert!(translate("a", &opts, Some("x@y.org"))
            .unwrap()
            .toml
            .contains("recipients = [\"x@y.org\"]"));
    }

    #[test]
    fn statefiles() {
        let mut b = Vec::new();
        for w in [1700000000u32, 42, 42, 43] {
            b.extend(w.to_be_bytes());
        }
        assert_eq!(
            read_statefile(&b).unwrap(),
            State {
                uidvalidity: 1700000000,
                uidnext: 42,
                in_flight: vec![42, 43]
            }
        );
        assert!(read_statefile(&b[..6]).is_err());
        assert!(read_statefile(&b[..9]).is_err());
    }

    #[test]
    fn deliver_methods() {
        assert_eq!(
            deliver_url("smtp:[127.0.0.1]:25").as_deref(),
            Some("smtp://127.0.0.1:25")
        );
        assert_eq!(
            deliver_url("LMTP:[::1]:24").as_deref(),
            Some("lmtp://[::1]:24")
        );
        assert_eq!(
            deliver_url("smtp:mx.example:2525").as_deref(),
            Some("smtp://mx.example:2525")
        );
        assert_eq!(deliver_url("pop3:[h]:1"), None);
        assert_eq!(deliver_url("smtp:[h]:x"), None);
    }
}
