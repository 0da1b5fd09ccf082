//! Configuration: the TOML file as written, then a validated, resolved value.
//!
//! Two stages, as in ripgrep: [`RawConfig`] mirrors the file exactly (serde,
//! unknown keys refused, so a typo is an error rather than a silently ignored
//! setting), and [`Config`] is what the rest of the program uses: every default
//! applied, every account complete, secrets still unread. `toml` reports the
//! line, column and key of a syntax or type error; the checks that only make
//! sense after `[defaults]` is merged (a missing `recipients`, say) name the
//! account's table and its line themselves.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::secret::Secret;

mod oauth2;
pub use oauth2::{Flow, OAuth2, Provider, RawOAuth2};

/// How long a connect, a command or a read may take before the peer is
/// considered dead. Two minutes is generous for a live IMAP or SMTP server
/// and short enough that a hung run from a timer is noticed.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Decided by measurement: see docs/performance.md.
const DEFAULT_DURABILITY: Durability = Durability::Grouped;

/// Delivery sessions per pass, unless `delivery_sessions` says otherwise.
const DEFAULT_DELIVERY_SESSIONS: u32 = 1;

/// The largest message imapull fetches into memory, by default. Microsoft
/// 365 allows messages of up to 150 MB, the most of the large providers;
/// anything bigger is not mail a person sent, and holding it would cost a
/// small server its memory. A bigger message is quarantined, not fetched.
const DEFAULT_MAX_MESSAGE_SIZE: u64 = 150 << 20;

/// IMAP over implicit TLS (RFC 8314) and plain IMAP, for STARTTLS or none.
const IMAPS_PORT: u16 = 993;
const IMAP_PORT: u16 = 143;

/// The most removals per mailbox per purge: a mistake (a wrong
/// `purge_after`, a clock that jumped) removes no more than this before
/// the operator can notice; more than a day's mail for most mailboxes, so
/// ordinary retention is never held back for long.
const DEFAULT_PURGE_MAX: u32 = 500;

/// How often the purge runs after passes: retention is counted in days,
/// and each purge costs the server a SELECT, a SEARCH and a STORE.
const DEFAULT_PURGE_INTERVAL: Duration = Duration::from_secs(3600);

/// Daemon: IMAP connections per account. Dovecot allows 10 per user and
/// address by default (`mail_max_userip_connections`), Gmail 15 per
/// account; four leave room for the user's own clients.
const DEFAULT_MAX_CONNECTIONS: u32 = 4;

/// Deferrals in a row after which a pass stops: one deferral is a
/// message, five in a row is a sick local server, and the rest may as
/// well wait on the remote server than be downloaded for nothing.
const DEFAULT_MAX_DEFERRALS: u32 = 5;
/// Mail deferred for an hour means the local server has been refusing for
/// longer than a restart or a reload takes: worth a look, long before the
/// days after which a mail server would bounce it.
const DEFAULT_STUCK_AFTER: Duration = Duration::from_secs(3600);
/// An hour of failed logins or connections is past a provider's blip or a
/// server's restart, and soon enough for a changed password.
const DEFAULT_ALERT_AFTER: Duration = Duration::from_secs(3600);

/// Daemon: an IDLE is re-issued after this long. RFC 2177 says servers may
/// end an IDLE after 30 minutes of inactivity, so clients re-issue it
/// before that.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(29 * 60);

/// Daemon: how often a mailbox without IDLE is polled; the timer unit's
/// interval, so the daemon is never slower than a timer.
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// Daemon: a full check even while idling, for an IDLE that died without a
/// word (a NAT that forgot the connection): noticed within ten minutes,
/// for a SELECT that costs the server nothing it would notice.
const DEFAULT_CATCHUP_INTERVAL: Duration = Duration::from_secs(10 * 60);

/// The daemon's first retry of deferred mail: soon enough that a local
/// server back from a restart gets the mail within a minute, late enough
/// not to hammer one that is still down. Doubled up to [`DEFAULT_RETRY_MAX`],
/// as an MTA's queue does.
const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_secs(30);
/// The longest wait between two retries of deferred mail.
const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(600);

/// How many accounts one run works on at once, by default. A pass with
/// nothing new is bound by round trips: over a 40 ms link twenty accounts
/// took 0.88 s eight at a time, 0.42 s all at once, against 0.30 s for
/// one. Each holds one IMAP connection, and one to the local server only
/// while it delivers (twenty sessions are well within Postfix's and
/// Dovecot's defaults); the mail fetched and not yet delivered is bounded
/// for the whole process (`PROCESS_IN_FLIGHT_BYTES`), not per account.
const DEFAULT_PARALLEL_ACCOUNTS: usize = 20;

/// The file as written. Every field is optional here so that `[defaults]`
/// and `[accounts.NAME]` share one shape; [`Config::from_raw`] decides what
/// is required.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub ledger: Option<PathBuf>,
    pub parallel_accounts: Option<u32>,
    pub metrics_listen: Option<String>,
    #[serde(default)]
    pub defaults: RawAccount,
    #[serde(default)]
    pub accounts: BTreeMap<String, Spanned<RawAccount>>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawAccount {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub transport: Option<Transport>,
    pub command: Option<Vec<String>>,
    pub tunnel_stderr: Option<TunnelStderr>,
    pub proxy: Option<String>,
    pub tls: Option<TlsMode>,
    pub allow_plaintext: Option<bool>,
    pub ca_file: Option<PathBuf>,
    pub tls_pin_sha256: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub password_command: Option<Vec<String>>,
    pub auth: Option<AuthMethod>,
    pub oauth2_token_command: Option<Vec<String>>,
    pub oauth2: Option<RawOAuth2>,
    pub compress: Option<Compress>,
    pub max_message_size: Option<ByteSize>,
    pub mailboxes: Option<Vec<RawMailbox>>,
    pub deliver: Option<String>,
    pub ehlo: Option<String>,
    pub recipients: Option<Vec<String>>,
    pub sender: Option<String>,
    pub mark_seen: Option<bool>,
    pub initial: Option<Initial>,
    pub add_received: Option<bool>,
    pub imap_timeout: Option<HumanDuration>,
    pub deliver_timeout: Option<HumanDuration>,
    pub max_deferrals: Option<u32>,
    pub delivery_sessions: Option<u32>,
    pub independent_sessions: Option<bool>,
    pub durability: Option<Durability>,
    pub purge_after: Option<PurgeAfter>,
    pub purge_interval: Option<HumanDuration>,
    pub purge_max: Option<u32>,
    pub idle_timeout: Option<HumanDuration>,
    pub poll_interval: Option<HumanDuration>,
    pub catchup_interval: Option<HumanDuration>,
    pub retry_interval: Option<HumanDuration>,
    pub retry_max: Option<HumanDuration>,
    pub max_connections: Option<u32>,
    pub stuck_after: Option<HumanDuration>,
    pub alert_to: Option<String>,
    pub alert_after: Option<HumanDuration>,
}

/// A mailbox as written: a name, or a table with its own settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawMailbox {
    Name(String),
    Table(RawMailboxTable),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMailboxTable {
    pub name: String,
    pub purge_after: Option<PurgeAfter>,
}

/// `purge_after`: "never", or how long after delivery the remote copy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeAfter {
    Never,
    After(Duration),
}

impl<'de> Deserialize<'de> for PurgeAfter {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim() == "never" {
            return Ok(PurgeAfter::Never);
        }
        humantime::parse_duration(s.trim())
            .map(PurgeAfter::After)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid purge_after {s:?}: {e} (use \"never\", \"0\", \"36h\", \"30d\")"
                ))
            })
    }
}

/// One mailbox to pull, with its retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxConfig {
    pub name: String,
    /// None: remote copies are never removed.
    pub purge_after: Option<Duration>,
}

/// A duration written the human way ("90s", "5m", "36h", "30d").
#[derive(Debug, Clone, Copy)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
    }
}

/// `auth` as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    Password,
    Xoauth2,
    Oauthbearer,
}

/// The SASL mechanisms that carry an OAuth 2.0 bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthMechanism {
    /// Google's and Microsoft's XOAUTH2.
    Xoauth2,
    /// RFC 7628.
    Oauthbearer,
}

/// How an account logs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// AUTHENTICATE PLAIN or LOGIN, with the account's password.
    Password,
    /// A bearer token, from `oauth2_token_command` or the `oauth2` table.
    OAuth2 {
        mechanism: OAuthMechanism,
        source: TokenSource,
    },
}

/// Where an account's bearer tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A program that prints an access token.
    Command(Vec<String>),
    /// imapull's own: the `oauth2` table.
    Builtin(Box<OAuth2>),
}

/// What survives a power cut or a kernel crash (a process that dies loses
/// nothing either way, and duplicates at most the message in flight).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Every outcome is fsynced before the next message's final ".".
    Message,
    /// Every outcome is committed before the next message's final "."; the
    /// fsyncs come at most 50 ms or 100 messages apart, and always before
    /// anything changes on the server and at the end of a pass.
    Grouped,
}

/// When COMPRESS=DEFLATE (RFC 4978) is used, if the server offers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compress {
    /// A pass's connection, when the link is slow and there is enough to
    /// fetch for it to pay; never a connection that will IDLE.
    Auto,
    /// Every pass's connection (`true`); never a connection that will IDLE.
    Passes,
    /// Never (`false`).
    Never,
    /// Every connection, IDLE ones too (Dovecot then cannot hibernate them).
    Always,
}

impl<'de> Deserialize<'de> for Compress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            B(bool),
            S(String),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::B(true) => Compress::Passes,
            Raw::B(false) => Compress::Never,
            Raw::S(s) if s == "auto" => Compress::Auto,
            Raw::S(s) if s == "always" => Compress::Always,
            Raw::S(s) => {
                return Err(serde::de::Error::custom(format!(
                    "invalid compress {s:?} (use \"auto\", true, false or \"always\")"
                )))
            }
        })
    }
}

/// A size in bytes: a number, or a string with a unit ("500K", "150M",
/// "2G"; powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    fn parse(s: &str) -> Option<u64> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits.parse().ok()?;
        let shift = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 0,
            "K" | "KB" | "KIB" => 10,
            "M" | "MB" | "MIB" => 20,
            "G" | "GB" | "GIB" => 30,
            _ => return None,
        };
        n.checked_mul(1u64 << shift)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        let bad = |s: &str| {
            serde::de::Error::custom(format!(
                "invalid size {s:?} (use a number of bytes, or \"500K\", \"150M\", \"2G\")"
            ))
        };
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map(ByteSize).ok_or_else(|| bad(&s)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Implicit,
    Starttls,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Tunnel,
}

/// Where a tunnel command's standard error goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelStderr {
    /// To imapull's log, at debug level (the last lines also go into the
    /// error when the command fails).
    Log,
    Null,
}

/// How the IMAP connection is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connect {
    /// TCP to `host:port`, directly or through a SOCKS5 proxy.
    Tcp { proxy: Option<Proxy> },
    /// IMAP over the stdin/stdout of a command, e.g. `ssh host /usr/lib/dovecot/imap`.
    Tunnel {
        command: Vec<String>,
        stderr: TunnelStderr,
    },
}

/// A SOCKS5 proxy (RFC 1928, with RFC 1929 user/password).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    pub host: String,
    pub port: u16,
    /// socks5h: the proxy resolves the IMAP host name (for Tor).
    pub remote_dns: bool,
    pub auth: Option<(String, Secret)>,
}

/// As a config writes it, without the credentials.
impl std::fmt::Display for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.remote_dns { "socks5h" } else { "socks5" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Initial {
    Unseen,
    All,
    None,
}

/// Where the password comes from. Read only when the account connects, so
/// that `imapull run other-account` does not run this account's command.
#[derive(Debug, Clone, PartialEq)]
pub enum PasswordSource {
    /// No password: only for a tunnel whose server greets with PREAUTH.
    None,
    Inline(Secret),
    File(PathBuf),
    Command(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliverTarget {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliverProtocol {
    Smtp,
    Lmtp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deliver {
    pub protocol: DeliverProtocol,
    pub target: DeliverTarget,
}

impl fmt::Display for Deliver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.protocol {
            DeliverProtocol::Smtp => "smtp",
            DeliverProtocol::Lmtp => "lmtp",
        };
        match &self.target {
            DeliverTarget::Tcp { host, port } if host.contains(':') => {
                write!(f, "{scheme}://[{host}]:{port}")
            }
            DeliverTarget::Tcp { host, port } => write!(f, "{scheme}://{host}:{port}"),
            DeliverTarget::Unix(p) => write!(f, "{scheme}://{}", p.display()),
        }
    }
}

/// The envelope sender: taken from the message, or fixed by the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderPolicy {
    Auto,
    Fixed(String),
}

/// One account, complete and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub name: String,
    /// The IMAP host (for a tunnel: a name for logs and the Received header).
    pub host: String,
    pub port: u16,
    pub connect: Connect,
    pub tls: TlsMode,
    pub ca_file: Option<PathBuf>,
    /// SHA-256 of the server's SubjectPublicKeyInfo, 32 bytes.
    pub tls_pin_sha256: Option<Vec<u8>>,
    pub username: String,
    pub password: PasswordSource,
    /// How the account logs in.
    pub auth: Auth,
    pub compress: Compress,
    /// Messages larger than this are quarantined unfetched (bytes).
    pub max_message_size: u64,
    pub mailboxes: Vec<MailboxConfig>,
    pub deliver: Deliver,
    pub ehlo: String,
    pub recipients: Vec<String>,
    pub sender: SenderPolicy,
    pub mark_seen: bool,
    pub initial: Initial,
    pub add_received: bool,
    pub imap_timeout: Duration,
    pub deliver_timeout: Duration,
    /// Consecutive deferrals after which a pass stops early.
    pub max_deferrals: u32,
    /// Delivery sessions a pass uses at once (their messages complete one
    /// at a time, in UID order, unless `independent_sessions`).
    pub delivery_sessions: usize,
    /// Each delivery session completes its messages without waiting for
    /// the others: the crash window becomes one message per session.
    pub independent_sessions: bool,
    /// How often the ledger is fsynced while mail is delivered.
    pub durability: Durability,
    /// How often the purge runs after a pass (not for `purge_after = 0`).
    pub purge_interval: Duration,
    /// The most removals per mailbox per purge; more are postponed.
    pub purge_max: u32,
    /// Daemon: an IDLE is re-issued after this long (RFC 2177: under 30 min).
    pub idle_timeout: Duration,
    /// Daemon: how often a mailbox without IDLE is polled.
    pub poll_interval: Duration,
    /// Daemon: how often an idling mailbox is checked anyway.
    pub catchup_interval: Duration,
    /// Daemon: the first retry of deferred mail comes this long after the
    /// pass that deferred it, each next one twice as long after...
    pub retry_interval: Duration,
    /// ...up to this.
    pub retry_max: Duration,
    /// Daemon: IMAP connections per account at most.
    pub max_connections: u32,
    /// A message deferred this long is stuck: `imapull verify` fails on it,
    /// and an alert is raised.
    pub stuck_after: Duration,
    /// Where alerts go (through `deliver`); None: they are logged.
    pub alert_to: Option<String>,
    /// An account failing this long raises an alert.
    pub alert_after: Duration,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub ledger: PathBuf,
    pub accounts: Vec<Account>,
    /// How many accounts `imapull run` works on at once.
    pub parallel_accounts: usize,
    /// The daemon serves `/metrics` and `/healthz` here.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Where metrics are written after each run or round of passes: from
    /// the command line (`--metrics-file`), not the file.
    pub metrics_file: Option<PathBuf>,
}

/// A configuration error, already worded for the operator (file, line, key).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        let config = Config::parse(path, &text)?;
        warn_if_world_readable(path, &text);
        Ok(config)
    }

    /// Parses and validates `text`; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            ConfigError(format!("{}: {}", path.display(), e.to_string().trim_end()))
        })?;
        Config::from_raw(path, text, raw)
    }

    fn from_raw(path: &Path, text: &str, raw: RawConfig) -> Result<Config, ConfigError> {
        if raw.accounts.is_empty() {
            return Err(ConfigError(format!(
                "{}: no [accounts.NAME] table: nothing to pull",
                path.display()
            )));
        }
        let ledger = match raw.ledger {
            Some(p) => p,
            None => default_ledger_path().ok_or_else(|| {
                ConfigError(format!(
                    "{}: `ledger` is not set and no default state directory is known \
                     (set STATE_DIRECTORY, XDG_STATE_HOME or HOME)",
                    path.display()
                ))
            })?,
        };
        let state_dir = ledger.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut accounts = Vec::new();
        for (name, spanned) in raw.accounts {
            let line = line_of(text, spanned.span().start);
            let here = |key: &str, msg: String| {
                ConfigError(format!(
                    "{}: line {line}: accounts.{name}: `{key}`: {msg}",
                    path.display()
                ))
            };
            let own = spanned.get_ref();
            let own_oauth2 = own.oauth2.is_some() || own.oauth2_token_command.is_some();
            let mut a = merge(&raw.defaults, spanned.into_inner());
            if !own_oauth2 && a.auth.unwrap_or(AuthMethod::Password) == AuthMethod::Password {
                // `[defaults]` may set up OAuth2 for the accounts that use it.
                (a.oauth2, a.oauth2_token_command) = (None, None);
            }
            let token_file = state_dir.join("oauth2").join(format!("{name}.json"));
            accounts.push(resolve_account(&name, a, &token_file, &here)?);
        }
        let parallel_accounts = match raw.parallel_accounts {
            None => DEFAULT_PARALLEL_ACCOUNTS,
            Some(0) => {
                return Err(ConfigError(format!(
                    "{}: `parallel_accounts`: must be at least 1",
                    path.display()
                )))
            }
            Some(n) => n as usize,
        };
        let metrics_listen = match raw.metrics_listen.as_deref() {
            None => None,
            Some(a) => Some(a.parse().map_err(|_| {
                ConfigError(format!(
                    "{}: `metrics_listen`: {a:?} is not an address and port such as \"127.0.0.1:9725\"",
                    path.display()
                ))
            })?),
        };
        Ok(Config {
            path: path.to_path_buf(),
            ledger,
            accounts,
            parallel_accounts,
            metrics_listen,
            metrics_file: None,
        })
    }

    pub fn account(&self, name: &str) -> Option<&Account> {
        self.accounts.iter().find(|a| a.name == name)
    }
}

/// Account values win over `[defaults]`, key by key.
fn merge(d: &RawAccount, a: RawAccount) -> RawAccount {
    macro_rules! pick {
        ($($f:ident),*) => {
            RawAccount {
                $($f: a.$f.or_else(|| d.$f.clone()),)*
                oauth2: RawOAuth2::merge(d.oauth2.as_ref(), a.oauth2),
            }
        };
    }
    pick!(
        host,
        port,
        transport,
        command,
        tunnel_stderr,
        proxy,
        tls,
        allow_plaintext,
        ca_file,
        tls_pin_sha256,
        username,
        password,
        password_file,
        password_command,
        auth,
        oauth2_token_command,
        compress,
        max_message_size,
        mailboxes,
        deliver,
        ehlo,
        recipients,
        sender,
        mark_seen,
        initial,
        add_received,
        imap_timeout,
        deliver_timeout,
        max_deferrals,
        delivery_sessions,
        independent_sessions,
        durability,
        purge_after,
        purge_interval,
        purge_max,
        idle_timeout,
        poll_interval,
        catchup_interval,
        retry_interval,
        retry_max,
        max_connections,
        stuck_after,
        alert_to,
        alert_after
    )
}

fn resolve_account(
    name: &str,
    a: RawAccount,
    token_file: &Path,
    here: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Account, ConfigError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || name.starts_with('.')
    {
        return Err(here(
            "name",
            "an account name may hold only letters, digits, '-', '_' and '.' \
             (it names a lock file and a systemd instance)"
                .into(),
        ));
    }
    let reach = match a.transport.unwrap_or(Transport::Tcp) {
        Transport::Tunnel => resolve_tunnel(&a, here)?,
        Transport::Tcp => resolve_tcp(&a, here)?,
    };
    common(name, a, token_file, here, reach)
}

/// How an account reaches its server, and as whom: what the transports
/// settle differently.
struct Reach {
    host: String,
    port: u16,
    connect: Connect,
    tls: TlsMode,
    tls_pin_sha256: Option<Vec<u8>>,
    username: String,
    password: PasswordSource,
}

/// An account reached over TCP (directly or through a SOCKS5 proxy).
fn resolve_tcp(
    a: &RawAccount,
    here: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Reach, ConfigError> {
    if a.command.is_some() || a.tunnel_stderr.is_some() {
        return Err(here("command", "only for transport = \"tunnel\"".into()));
    }
    let host = a
        .host
        .clone()
        .filter(|h| !h.trim().is_empty())
        .ok_or_else(|| here("host", "missing: the IMAP server's name or address".into()))?;
    let proxy = match &a.proxy {
        None => None,
        Some(p) => Some(parse_proxy(p).map_err(|e| here("proxy", e))?),
    };
    let tls = a.tls.unwrap_or(TlsMode::Implicit);
    let port = a.port.unwrap_or(match tls {
        TlsMode::Implicit => IMAPS_PORT,
        _ => IMAP_PORT,
    });
    if tls == TlsMode::None && !is_loopback(&host) && !a.allow_plaintext.unwrap_or(false) {
        return Err(here(
            "tls",
            format!(
                "\"none\" would send the password in clear to {host}; \
                 it is allowed only for a loopback host or with `allow_plaintext = true`"
            ),
        ));
    }
    let tls_pin_sha256 = match a.tls_pin_sha256.clone() {
        None => None,
        Some(p) => Some(parse_pin(&p).ok_or_else(|| {
            here(
                "tls_pin_sha256",
                "expected the SHA-256 of the server's public key, as 64 hex digits or base64 \
                 (openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | \
                 openssl dgst -sha256)"
                    .into(),
            )
        })?),
    };
    let username = a
        .username
        .clone()
        .ok_or_else(|| here("username", "missing: the IMAP login name".into()))?;
    let oauth = matches!(a.auth, Some(AuthMethod::Xoauth2 | AuthMethod::Oauthbearer));
    let password =
        match password_source(a, here)? {
            Some(_) if oauth => return Err(here(
                "password",
                "does not apply with an OAuth2 `auth`: the token comes from the `oauth2` table \
                 or oauth2_token_command"
                    .into(),
            )),
            Some(p) => p,
            None if oauth => PasswordSource::None,
            None => {
                return Err(here(
                    "password",
                    "missing: set one of `password`, `password_file`, `password_command`".into(),
                ))
            }
        };
    Ok(Reach {
        host,
        port,
        connect: Connect::Tcp { proxy },
        tls,
        tls_pin_sha256,
        username,
        password,
    })
}

/// An account reached through a command: no TLS of its own (the command,
/// typically ssh, protects the link), a PREAUTH greeting accepted, and a
/// password only if the server still asks for one.
fn resolve_tunnel(
    a: &RawAccount,
    here: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Reach, ConfigError> {
    let command = a.command.clone().unwrap_or_default();
    if command.is_empty() || command[0].is_empty() {
        return Err(here(
            "command",
            "missing: the program to run, e.g. [\"ssh\", \"mail.example.net\", \"/usr/lib/dovecot/imap\"]".into(),
        ));
    }
    for (key, set) in [
        ("port", a.port.is_some()),
        ("tls", a.tls.is_some()),
        ("proxy", a.proxy.is_some()),
        ("ca_file", a.ca_file.is_some()),
        ("tls_pin_sha256", a.tls_pin_sha256.is_some()),
        ("allow_plaintext", a.allow_plaintext.is_some()),
    ] {
        if set {
            return Err(here(key, "does not apply to transport = \"tunnel\"".into()));
        }
    }
    let host = a
        .host
        .clone()
        .filter(|h| !h.trim().is_empty())
        .unwrap_or_else(|| tunnel_name(&command));
    Ok(Reach {
        host,
        port: 0,
        connect: Connect::Tunnel {
            command,
            stderr: a.tunnel_stderr.unwrap_or(TunnelStderr::Log),
        },
        tls: TlsMode::None,
        tls_pin_sha256: None,
        username: a.username.clone().unwrap_or_default(),
        password: password_source(a, here)?.unwrap_or(PasswordSource::None),
    })
}

/// A short name for a tunnel in logs: the first argument that is not an
/// option after the program ("mail.example.net" for ssh), else the program.
fn tunnel_name(command: &[String]) -> String {
    command
        .iter()
        .skip(1)
        .find(|a| !a.starts_with('-') && !a.starts_with('/'))
        .unwrap_or(&command[0])
        .clone()
}

fn password_source(
    a: &RawAccount,
    here: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Option<PasswordSource>, ConfigError> {
    Ok(Some(
        match (
            a.password.clone(),
            a.password_file.clone(),
            a.password_command.clone(),
        ) {
            (Some(p), None, None) => PasswordSource::Inline(Secret::new(p)),
            (None, Some(f), None) => PasswordSource::File(f),
            (None, None, Some(c)) if !c.is_empty() => PasswordSource::Command(c),
            (None, None, Some(_)) => {
                return Err(here("password_command", "must name a program".into()))
            }
            (None, None, None) => return Ok(None),
            _ => {
                return Err(here(
                    "password",
                    "set only one of `password`, `password_file`, `password_command`".into(),
                ))
            }
        },
    ))
}

/// The settings every transport shares.
fn common(
    name: &str,
    a: RawAccount,
    token_file: &Path,
    here: &dyn Fn(&str, String) -> ConfigError,
    reach: Reach,
) -> Result<Account, ConfigError> {
    let mailboxes = resolve_mailboxes(a.mailboxes.clone(), a.purge_after, here)?;
    let (deliver, recipients, sender) = resolve_delivery(&a, here)?;
    let ehlo = match a.ehlo.clone() {
        Some(e) if e.is_empty() || e.contains(|c: char| c.is_whitespace() || c.is_control()) => {
            return Err(here("ehlo", format!("{e:?} is not a host name")))
        }
        Some(e) => e,
        None => local_hostname(),
    };
    let limits = resolve_limits(&a, here)?;
    let alert_to = resolve_alert_to(&a, here)?;
    let auth = resolve_auth(&a, token_file, here)?;
    let Reach {
        host,
        port,
        connect,
        tls,
        tls_pin_sha256,
        username,
        password,
    } = reach;
    Ok(Account {
        name: name.to_string(),
        host,
        port,
        connect,
        tls,
        ca_file: a.ca_file,
        tls_pin_sha256,
        username,
        password,
        auth,
        compress: a.compress.unwrap_or(Compress::Auto),
        max_message_size: limits.max_message_size,
        mailboxes,
        deliver,
        ehlo,
        recipients,
        sender,
        mark_seen: a.mark_seen.unwrap_or(true),
        initial: a.initial.unwrap_or(Initial::Unseen),
        add_received: a.add_received.unwrap_or(true),
        imap_timeout: dur(a.imap_timeout, DEFAULT_TIMEOUT),
        deliver_timeout: dur(a.deliver_timeout, DEFAULT_TIMEOUT),
        max_deferrals: limits.max_deferrals,
        delivery_sessions: limits.delivery_sessions,
        independent_sessions: a.independent_sessions.unwrap_or(false),
        durability: a.durability.unwrap_or(DEFAULT_DURABILITY),
        purge_interval: dur(a.purge_interval, DEFAULT_PURGE_INTERVAL),
        purge_max: limits.purge_max,
        idle_timeout: dur(a.idle_timeout, DEFAULT_IDLE_TIMEOUT),
        poll_interval: dur(a.poll_interval, DEFAULT_POLL_INTERVAL),
        catchup_interval: dur(a.catchup_interval, DEFAULT_CATCHUP_INTERVAL),
        retry_interval: limits.retry_interval,
        retry_max: limits.retry_max,
        max_connections: limits.max_connections,
        stuck_after: dur(a.stuck_after, DEFAULT_STUCK_AFTER),
        alert_to,
        alert_after: dur(a.alert_after, DEFAULT_ALERT_AFTER),
    })
}

fn resolve_auth(
    a: &RawAccount,
    token_file: &Path,
    here: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Auth, ConfigError> {
    let mechanism = match a.auth.unwrap_or(AuthMethod::Password) {
        AuthMethod::Password => {
            for (set, key) in [
                (a.oauth2_token_command.is_some(), "oauth2_token_command"),
                (a.oauth2.is_some(), "oauth2"),
            ] {
                if set {
                    return Err(here(
                        key,
                        "only with auth = \"xoauth2\" or \"oauthbearer\"".into(),
                    ));
                }
            }
            return Ok(Auth::Password);
        }
        AuthMethod::Xoauth2 => OAuthMechanism::Xoauth2,
        AuthMethod::Oauthbearer => OAuthMechanism::Oauthbearer,
    };
    let source = match (a.oauth2_token_command.clone(), &a.oauth2) {
        (Some(_), Some(_)) => {
            return Err(here(
                "oauth2_token_command",
                "either a token command or an `oauth2` table, not both".into(),
            ))
        }
        (Some(c), None) if !c.is_empty() && !c[0].is_empty() => TokenSource::Command(c),
        (None, Some(t)) => TokenSource::Builtin(Box::new(oauth2::resolve(t, token_file, here)?)),
        _ => {
            return Err(here(
                "oauth2",
                "missing: an `[accounts.NAME.oauth2]` table (provider, client_id), or \
                 `oauth2_token_command`, the program that prints an access token"
                    .into(),
            ))
        }
    };
    Ok(Auth::OAuth2 { mechanism, source })
}

fn resolve_alert_to(
    a: &RawAccount,
    here: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Option<String>, ConfigError> {
    match a.alert_to.as_deref() {
        None => Ok(None),
        Some(to) if is_plausible_address(to) && !to.is_empty() => Ok(Some(to.to_string())),
        Some(to) => Err(here("alert_to", format!("{to:?} is not an address"))),
    }
}

/// The mailboxes to pull, each with its retention (the account's unless
/// it has its own); INBOX when none are named.
fn resolve_mailboxes(
    raw: Option<Vec<RawMailbox>>,
    account_purge: Option<PurgeAfter>,
    here: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Vec<MailboxConfig>, ConfigError> {
    let account_purge = account_purge.unwrap_or(PurgeAfter::Never);
    let as_option = |p: PurgeAfter| match p {
        PurgeAfter::Never => None,
        PurgeAfter::After(d) => Some(d),
    };
    let mailboxes: Vec<MailboxConfig> = raw
        .unwrap_or_else(|| vec![RawMailbox::Name("INBOX".to_string())])
        .into_iter()
        .map(|m| match m {
            RawMailbox::Name(name) => MailboxConfig {
                name,
                purge_after: as_option(account_purge),
            },
            RawMailbox::Table(t) => MailboxConfig {
                name: t.name,
                purge_after: as_option(t.purge_after.unwrap_or(account_purge)),
            },
        })
        .collect();
    if mailboxes.is_empty() {
        return Err(here("mailboxes", "empty: name at least one mailbox".into()));
    }
    let mut seen = std::collections::HashSet::new();
    for m in &mailboxes {
        let m = &m.name;
        if m.is_empty() || m.contains(['\r', '\n', '\0']) {
            return Err(here("mailboxes", format!("invalid mailbox name {m:?}")));
        }
        if !seen.insert(m.clone()) {
            return Err(here("mailboxes", format!("{m:?} is listed twice")));
        }
    }
    Ok(mailboxes)
}

/// Where mail goes: the local server, the recipients, the envelope sender.
fn resolve_delivery(
    a: &RawAccount,
    here: &dyn Fn(&str, String) -> ConfigError,
) -> Result<(Deliver, Vec<String>, SenderPolicy), ConfigError> {
    let deliver = parse_deliver(
        a.deliver
            .as_deref()
            .ok_or_else(|| here("deliver", "missing: e.g. \"smtp://127.0.0.1:25\"".into()))?,
    )
    .map_err(|e| here("deliver", e))?;
    let recipients = a.recipients.clone().unwrap_or_default();
    if recipients.is_empty() {
        return Err(here(
            "recipients",
            "missing: at least one local address to deliver to".into(),
        ));
    }
    for r in &recipients {
        if !is_plausible_address(r) || r.is_empty() {
            return Err(here("recipients", format!("{r:?} is not an address")));
        }
    }
    let sender = match a.sender.as_deref() {
        None | Some("auto") => SenderPolicy::Auto,
        Some("<>") | Some("") => SenderPolicy::Fixed(String::new()),
        Some(s) if is_plausible_address(s) => SenderPolicy::Fixed(s.to_string()),
        Some(s) => {
            return Err(here(
                "sender",
                format!("{s:?} is neither \"auto\", \"<>\" nor an address"),
            ))
        }
    };
    Ok((deliver, recipients, sender))
}

/// The numeric settings that have a range.
struct Limits {
    purge_max: u32,
    max_connections: u32,
    max_message_size: u64,
    retry_interval: Duration,
    retry_max: Duration,
    max_deferrals: u32,
    delivery_sessions: usize,
}

fn resolve_limits(
    a: &RawAccount,
    here: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Limits, ConfigError> {
    let at_least_1 = |key: &str, v: u32, why: &str| {
        if v == 0 {
            Err(here(key, format!("must be at least 1{why}")))
        } else {
            Ok(v)
        }
    };
    let purge_max = at_least_1(
        "purge_max",
        a.purge_max.unwrap_or(DEFAULT_PURGE_MAX),
        " (unset purge_after to never remove)",
    )?;
    let max_connections = at_least_1(
        "max_connections",
        a.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        "",
    )?;
    for (key, d) in [
        ("idle_timeout", a.idle_timeout),
        ("poll_interval", a.poll_interval),
        ("catchup_interval", a.catchup_interval),
        ("stuck_after", a.stuck_after),
        ("alert_after", a.alert_after),
    ] {
        if d.is_some_and(|d| d.0.is_zero()) {
            return Err(here(key, "must be longer than 0".into()));
        }
    }
    let max_message_size = a.max_message_size.map_or(DEFAULT_MAX_MESSAGE_SIZE, |s| s.0);
    if max_message_size < 1024 {
        return Err(here("max_message_size", "must be at least 1K".into()));
    }
    let retry_interval = dur(a.retry_interval, DEFAULT_RETRY_INTERVAL);
    let retry_max = dur(a.retry_max, DEFAULT_RETRY_MAX);
    if retry_interval.is_zero() {
        return Err(here("retry_interval", "must be longer than 0".into()));
    }
    if retry_max < retry_interval {
        return Err(here("retry_max", "must be at least retry_interval".into()));
    }
    let max_deferrals = at_least_1(
        "max_deferrals",
        a.max_deferrals.unwrap_or(DEFAULT_MAX_DEFERRALS),
        "",
    )?;
    let delivery_sessions = a.delivery_sessions.unwrap_or(DEFAULT_DELIVERY_SESSIONS);
    if !(1..=16).contains(&delivery_sessions) {
        return Err(here("delivery_sessions", "must be from 1 to 16".into()));
    }
    Ok(Limits {
        purge_max,
        max_connections,
        max_message_size,
        retry_interval,
        retry_max,
        max_deferrals,
        delivery_sessions: delivery_sessions as usize,
    })
}

fn dur(d: Option<HumanDuration>, default: Duration) -> Duration {
    d.map_or(default, |d| d.0)
}

/// An address good enough to put in an SMTP envelope: no spaces, controls or
/// angle brackets, which would let a config value inject SMTP syntax.
pub fn is_plausible_address(s: &str) -> bool {
    !s.chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>'))
}

fn parse_deliver(url: &str) -> Result<Deliver, String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        format!("{url:?}: expected smtp://HOST:PORT, lmtp://HOST:PORT or lmtp:///socket/path")
    })?;
    let protocol = match scheme {
        "smtp" => DeliverProtocol::Smtp,
        "lmtp" => DeliverProtocol::Lmtp,
        _ => return Err(format!("{url:?}: scheme must be smtp or lmtp")),
    };
    if rest.starts_with('/') {
        return Ok(Deliver {
            protocol,
            target: DeliverTarget::Unix(PathBuf::from(rest)),
        });
    }
    let default_port = match protocol {
        DeliverProtocol::Smtp => 25,
        DeliverProtocol::Lmtp => 24,
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, after) = r
            .split_once(']')
            .ok_or_else(|| format!("{url:?}: unclosed '['"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(format!("{url:?}: unexpected {after:?} after ']'")),
        };
        (h.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse()
            .map_err(|_| format!("{url:?}: {p:?} is not a port number"))?,
    };
    Ok(Deliver {
        protocol,
        target: DeliverTarget::Tcp { host, port },
    })
}

/// `socks5://[user:password@]host:port` or `socks5h://...`.
fn parse_proxy(url: &str) -> Result<Proxy, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url:?}: expected socks5://HOST:PORT or socks5h://HOST:PORT"))?;
    let remote_dns = match scheme {
        "socks5" => false,
        "socks5h" => true,
        _ => {
            return Err(format!(
                "{url:?}: only socks5:// and socks5h:// proxies are supported"
            ))
        }
    };
    let rest = rest.trim_end_matches('/');
    let (auth, hostport) = match rest.rsplit_once('@') {
        Some((cred, hp)) => {
            let (u, p) = cred
                .split_once(':')
                .ok_or_else(|| "proxy credentials must be user:password".to_string())?;
            (Some((u.to_string(), Secret::new(p.to_string()))), hp)
        }
        None => (None, rest),
    };
    let target = parse_deliver(&format!("smtp://{hostport}"))?;
    match target.target {
        DeliverTarget::Tcp { host, port } if hostport.contains(':') => Ok(Proxy {
            host,
            port,
            remote_dns,
            auth,
        }),
        _ => Err(format!("{url:?}: the proxy needs a host and a port")),
    }
}

fn parse_pin(s: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let s = s.trim();
    let s = s.strip_prefix("sha256//").unwrap_or(s);
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
            .collect();
    }
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .ok()
        .filter(|b| b.len() == 32)
}

pub fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

pub fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && !s.contains(char::is_whitespace))
        .unwrap_or_else(|| "localhost".to_string())
}

/// `$STATE_DIRECTORY` (systemd), `/var/lib/imapull` as root, else the XDG
/// state directory.
fn default_ledger_path() -> Option<PathBuf> {
    const FILE: &str = "ledger.sqlite3";
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY") {
        // systemd may list several directories separated by ':'; the first is ours.
        let first = dir.to_string_lossy().split(':').next()?.to_string();
        return Some(PathBuf::from(first).join(FILE));
    }
    if is_root() {
        return Some(PathBuf::from("/var/lib/imapull").join(FILE));
    }
    xdg_dir("XDG_STATE_HOME", ".local/state").map(|d| d.join("imapull").join(FILE))
}

/// `--config`, then `$IMAPULL_CONFIG`, then the system or user location.
pub fn default_config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("IMAPULL_CONFIG") {
        return Some(PathBuf::from(p));
    }
    if is_root() {
        return Some(PathBuf::from("/etc/imapull/imapull.toml"));
    }
    xdg_dir("XDG_CONFIG_HOME", ".config").map(|d| d.join("imapull").join("imapull.toml"))
}

fn xdg_dir(var: &str, fallback: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(fallback)),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn warn_if_world_readable(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let has_password = text.lines().any(|l| {
        l.trim_start().starts_with("password")
            && l.contains('=')
            && !l.trim_start().starts_with("password_")
    });
    if !has_password {
        return;
    }
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o004 != 0 {
            tracing::warn!(
                "{} contains a password and is readable by every user; \
                 chmod o-r it, or use password_file / password_command",
                path.display()
            );
        }
    }
}

/// The one account `text` defines, for the tests that need an [`Account`].
#[cfg(test)]
pub(crate) fn one_account(text: &str) -> Account {
    Config::parse(std::path::Path::new("t.toml"), text)
        .unwrap()
        .accounts
        .remove(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[accounts.work]
host = "imap.example.net"
username = "me"
password = "pw"
deliver = "lmtp:///run/dovecot/lmtp"
recipients = ["me@example.org"]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(
            Path::new("/etc/imapull/imapull.toml"),
            &format!("ledger = \"/tmp/l\"\n{text}"),
        )
    }

    #[test]
    fn compress_values() {
        for (v, want) in [
            ("true", Compress::Passes),
            ("false", Compress::Never),
            ("\"auto\"", Compress::Auto),
            ("\"always\"", Compress::Always),
        ] {
            let c = parse(&format!("{MIN}compress = {v}\n")).unwrap();
            assert_eq!(c.accounts[0].compress, want, "{v}");
        }
        let e = parse(&format!("{MIN}compress = \"yes\"\n")).unwrap_err().0;
        assert!(e.contains("compress") && e.contains("auto"), "{e}");
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MIN).unwrap();
        let a = &c.accounts[0];
        assert_eq!(a.port, 993);
        assert_eq!(a.tls, TlsMode::Implicit);
        assert_eq!(
            a.mailboxes,
            vec![MailboxConfig {
                name: "INBOX".into(),
                purge_after: None
            }]
        );
        assert_eq!(a.purge_max, 500);
        assert_eq!(a.purge_interval, Duration::from_secs(3600));
        assert!(a.mark_seen && a.add_received);
        assert_eq!(a.compress, Compress::Auto);
        assert_eq!(a.initial, Initial::Unseen);
        assert_eq!(a.sender, SenderPolicy::Auto);
        assert_eq!((a.delivery_sessions, a.independent_sessions), (1, false));
        assert_eq!(
            a.deliver,
            Deliver {
                protocol: DeliverProtocol::Lmtp,
                target: DeliverTarget::Unix("/run/dovecot/lmtp".into())
            }
        );
    }

    #[test]
    fn oauth2_takes_a_token_command_and_no_password() {
        let oauth = MIN.replace(
            "password = \"pw\"",
            "auth = \"xoauth2\"\noauth2_token_command = [\"helper\", \"work\"]",
        );
        let c = parse(&oauth).unwrap();
        assert_eq!(
            c.accounts[0].auth,
            Auth::OAuth2 {
                mechanism: OAuthMechanism::Xoauth2,
                source: TokenSource::Command(vec!["helper".into(), "work".into()])
            }
        );
        // The built-in source, its token file beside the ledger by default.
        let table = "[accounts.work.oauth2]\nprovider = \"microsoft\"\nclient_id = \"c\"\n";
        let builtin = MIN.replace("password = \"pw\"", "auth = \"xoauth2\"") + table;
        match &parse(&builtin).unwrap().accounts[0].auth {
            Auth::OAuth2 {
                source: TokenSource::Builtin(o),
                ..
            } => assert_eq!(o.token_file, Path::new("/tmp/oauth2/work.json")),
            other => panic!("{other:?}"),
        }
        assert_eq!(parse(MIN).unwrap().accounts[0].auth, Auth::Password);
        for (text, key) in [
            // A password beside a token.
            (
                MIN.replace(
                    "password = \"pw\"",
                    "password = \"pw\"\nauth = \"oauthbearer\"",
                ),
                "password",
            ),
            // No token source.
            (
                MIN.replace("password = \"pw\"", "auth = \"oauthbearer\""),
                "oauth2",
            ),
            // Both token sources.
            (
                MIN.replace(
                    "password = \"pw\"",
                    "auth = \"xoauth2\"\noauth2_token_command = [\"h\"]",
                ) + table,
                "not both",
            ),
            // A table without an OAuth2 auth.
            (MIN.to_string() + table, "oauth2"),
            // The table's own keys are checked, and named.
            (
                MIN.replace("password = \"pw\"", "auth = \"xoauth2\"")
                    + "[accounts.work.oauth2]\nprovider = \"google\"\n",
                "oauth2.client_id",
            ),
            // A token command without an OAuth2 auth.
            (
                MIN.replace(
                    "password = \"pw\"",
                    "password = \"pw\"\noauth2_token_command = [\"h\"]",
                ),
                "oauth2_token_command",
            ),
        ] {
            let e = parse(&text).unwrap_err().0;
            assert!(
                e.contains(&format!("`{key}`")) || e.contains(key),
                "{key}: {e}"
            );
        }
    }

    #[test]
    fn a_defaults_oauth2_table_serves_the_oauth2_accounts_only() {
        let text = r#"
[defaults]
auth = "xoauth2"
deliver = "lmtp:///run/dovecot/lmtp"
recipients = ["me@example.org"]
[defaults.oauth2]
provider = "microsoft"
client_id = "shared"

[accounts.work]
host = "outlook.office365.com"
username = "me@example.org"
[accounts.work.oauth2]
tenant = "example.org"

[accounts.old]
host = "imap.example.net"
username = "me"
auth = "password"
password = "pw"
"#;
        let c = parse(text).unwrap();
        match &c.account("work").unwrap().auth {
            Auth::OAuth2 {
                source: TokenSource::Builtin(o),
                ..
            } => {
                assert_eq!(o.client_id, "shared");
                assert!(o.token_url.contains("/example.org/"), "{}", o.token_url);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.account("old").unwrap().auth, Auth::Password);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = parse(&format!("{MIN}hots = \"x\"\n")).unwrap_err().0;
        assert!(e.contains("/etc/imapull/imapull.toml"), "{e}");
        assert!(e.contains("line 9"), "{e}");
        assert!(e.contains("hots"), "{e}");
    }

    #[test]
    fn wrong_type_names_line_and_key() {
        let e = parse(&MIN.replace("host = \"imap.example.net\"", "host = \"h\"\nport = \"x\""))
            .unwrap_err()
            .0;
        assert!(e.contains("line 5"), "{e}");
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn missing_recipients_names_account_and_line() {
        let e = parse(&MIN.replace("recipients = [\"me@example.org\"]", ""))
            .unwrap_err()
            .0;
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("accounts.work"), "{e}");
        assert!(e.contains("recipients"), "{e}");
    }

    #[test]
    fn defaults_are_inherited_and_overridden() {
        let text = r#"
[defaults]
deliver = "smtp://[::1]:2525"
recipients = ["a@x"]
mark_seen = false
delivery_sessions = 2
independent_sessions = true
[accounts.one]
host = "h"
username = "u"
password_file = "/p"
[accounts.two]
host = "h"
username = "u"
password_command = ["pass", "show", "imap"]
mark_seen = true
recipients = ["b@x", "c@x"]
independent_sessions = false
"#;
        let c = parse(text).unwrap();
        let one = c.account("one").unwrap();
        let two = c.account("two").unwrap();
        assert!(!one.mark_seen && two.mark_seen);
        assert!(one.independent_sessions && !two.independent_sessions);
        assert_eq!((one.delivery_sessions, two.delivery_sessions), (2, 2));
        assert_eq!(one.recipients, vec!["a@x"]);
        assert_eq!(two.recipients, vec!["b@x", "c@x"]);
        assert_eq!(one.deliver.to_string(), "smtp://[::1]:2525");
    }

    #[test]
    fn plaintext_refused_off_loopback() {
        let e = parse(&MIN.replace("deliver", "tls = \"none\"\ndeliver"))
            .unwrap_err()
            .0;
        assert!(e.contains("`tls`"), "{e}");
        let ok = MIN
            .replace("imap.example.net", "127.0.0.1")
            .replace("deliver", "tls = \"none\"\ndeliver");
        assert_eq!(parse(&ok).unwrap().accounts[0].port, 143);
        let explicit = MIN.replace("deliver", "tls = \"none\"\nallow_plaintext = true\ndeliver");
        assert!(parse(&explicit).is_ok());
    }

    #[test]
    fn two_password_sources_refused() {
        let e = parse(&MIN.replace(
            "password = \"pw\"",
            "password = \"pw\"\npassword_file = \"/x\"",
        ))
        .unwrap_err()
        .0;
        assert!(e.contains("only one"), "{e}");
    }

    #[test]
    fn deliver_urls() {
        let t = |u: &str| parse_deliver(u).map(|d| d.to_string());
        assert_eq!(t("smtp://127.0.0.1:25").unwrap(), "smtp://127.0.0.1:25");
        assert_eq!(t("smtp://localhost").unwrap(), "smtp://localhost:25");
        assert_eq!(t("lmtp://[::1]:24").unwrap(), "lmtp://[::1]:24");
        assert_eq!(t("lmtp://[::1]").unwrap(), "lmtp://[::1]:24");
        assert_eq!(t("smtp:///var/spool/x").unwrap(), "smtp:///var/spool/x");
        assert!(t("http://x").is_err());
        assert!(t("smtp://x:y").is_err());
        assert!(t("127.0.0.1:25").is_err());
    }

    #[test]
    fn pins() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_pin(&hex).unwrap(), vec![0xab; 32]);
        assert_eq!(
            parse_pin("q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=").unwrap(),
            vec![0xab; 32]
        );
        assert!(parse_pin("abc").is_none());
    }

    #[test]
    fn bad_account_name() {
        let e = parse(&MIN.replace("[accounts.work]", "[accounts.\"a b\"]"))
            .unwrap_err()
            .0;
        assert!(e.contains("account name"), "{e}");
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../imapull.example.toml");
        let c = Config::parse(Path::new("imapull.example.toml"), text).unwrap();
        assert_eq!(c.accounts.len(), 3);
        assert!(matches!(
            c.account("work").unwrap().auth,
            Auth::OAuth2 {
                source: TokenSource::Builtin(_),
                ..
            }
        ));
        let relay = c.account("relay").unwrap();
        assert_eq!(relay.port, 143);
        assert_eq!(relay.deliver.to_string(), "smtp://127.0.0.1:25");
        assert_eq!(
            c.account("provider").unwrap().deliver.to_string(),
            "lmtp:///run/dovecot/lmtp"
        );
    }

    /// Every key the parser accepts is in the reference. The list comes
    /// from the parser itself: serde names the expected fields when it
    /// refuses an unknown one.
    #[test]
    fn every_key_is_documented() {
        let doc = include_str!("../docs/configuration.md");
        let mut keys = Vec::new();
        for text in [
            "zzz = 1\n",
            "[accounts.a]\nzzz = 1\n",
            "[accounts.a.oauth2]\nzzz = 1\n",
        ] {
            let e = toml::from_str::<RawConfig>(text).unwrap_err().to_string();
            let expected = e
                .split("expected one of")
                .nth(1)
                .expect("serde lists the fields");
            keys.extend(expected.split('`').skip(1).step_by(2).map(str::to_string));
        }
        assert!(keys.len() > 20, "{keys:?}");
        for k in keys {
            assert!(
                doc.contains(&format!("`{k}`")),
                "docs/configuration.md lacks `{k}`"
            );
        }
    }

    #[test]
    fn purge_after_per_account_and_mailbox() {
        let c = parse(&format!(
            "{MIN}purge_after = \"30d\"\nmailboxes = [\"INBOX\", {{ name = \"Spam\", purge_after = \"0\" }}, {{ name = \"Keep\", purge_after = \"never\" }}]\n"
        ))
        .unwrap();
        let m = &c.accounts[0].mailboxes;
        assert_eq!(m[0].purge_after, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(m[1].purge_after, Some(Duration::ZERO));
        assert_eq!(m[2].purge_after, None);
        let e = parse(&format!("{MIN}purge_after = \"soon\"\n"))
            .unwrap_err()
            .0;
        assert!(e.contains("purge_after") && e.contains("line 9"), "{e}");
        let e = parse(&format!(
            "{MIN}mailboxes = [{{ name = \"x\", purge = \"1d\" }}]\n"
        ))
        .unwrap_err()
        .0;
        assert!(e.contains("line 9"), "{e}");
    }

    #[test]
    fn tunnels() {
        let t = "[accounts.relay]\ntransport = \"tunnel\"\ncommand = [\"ssh\", \"-C\", \"relay.example.org\", \"/usr/lib/dovecot/imap\"]\ndeliver = \"lmtp://[::1]\"\nrecipients = [\"a@x\"]\n";
        let c = parse(t).unwrap();
        let a = &c.accounts[0];
        assert_eq!(a.host, "relay.example.org");
        assert!(matches!(a.password, PasswordSource::None));
        assert!(
            matches!(&a.connect, Connect::Tunnel { command, stderr: TunnelStderr::Log } if command.len() == 4)
        );
        let e = parse(&t.replace("transport", "port = 993\ntransport"))
            .unwrap_err()
            .0;
        assert!(e.contains("`port`") && e.contains("tunnel"), "{e}");
        let e = parse(&t.replace(
            "command = [\"ssh\", \"-C\", \"relay.example.org\", \"/usr/lib/dovecot/imap\"]",
            "",
        ))
        .unwrap_err()
        .0;
        assert!(e.contains("`command`"), "{e}");
        let e = parse(&format!("{MIN}command = [\"ssh\"]\n")).unwrap_err().0;
        assert!(e.contains("`command`"), "{e}");
    }

    #[test]
    fn proxies() {
        let p = parse_proxy("socks5h://tor:pw@127.0.0.1:9050").unwrap();
        assert!(p.remote_dns);
        assert_eq!((p.host.as_str(), p.port), ("127.0.0.1", 9050));
        assert_eq!(p.auth.as_ref().unwrap().0, "tor");
        assert_eq!(p.auth.as_ref().unwrap().1.expose(), "pw");
        let p = parse_proxy("socks5://[::1]:1080").unwrap();
        assert!(!p.remote_dns && p.auth.is_none() && p.host == "::1");
        assert!(parse_proxy("http://x:1").is_err());
        assert!(parse_proxy("socks5://x").is_err());
        assert!(parse_proxy("socks5://user@x:1").is_err());
        let e = parse(&format!("{MIN}proxy = \"socks4://x:1\"\n"))
            .unwrap_err()
            .0;
        assert!(e.contains("`proxy`"), "{e}");
        assert!(!format!("{p:?}").contains("pw"));
    }

    #[test]
    fn durations() {
        let c = parse(&format!(
            "{MIN}imap_timeout = \"90s\"\ndeliver_timeout = \"5m\"\n"
        ))
        .unwrap();
        assert_eq!(c.accounts[0].imap_timeout, Duration::from_secs(90));
        assert_eq!(c.accounts[0].deliver_timeout, Duration::from_secs(300));
        let e = parse(&format!("{MIN}imap_timeout = \"soon\"\n"))
            .unwrap_err()
            .0;
        assert!(e.contains("imap_timeout") && e.contains("line 9"), "{e}");
    }
}
