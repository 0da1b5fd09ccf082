//! The IMAP side: connecting (TLS, STARTTLS, pinning), logging in, and the
//! few commands a pass needs, each bounded by a timeout.
//!
//! Built on async-imap. Its traps, and how they are handled here:
//! a tagged NO or BAD to `UID FETCH` ends the stream without an error, and a
//! dropped connection can end it normally too, so the caller checks that
//! every requested UID came back ([`crate::pull`]); its trace log prints
//! commands verbatim, LOGIN included, so `main` never enables it.

pub mod utf7;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use async_imap::imap_proto::{Response, Status};
use async_imap::types::Fetch;
use futures_util::{Stream, StreamExt as _};
use tokio::net::TcpStream;

use crate::config::{Account, Connect, PasswordSource, Proxy, TlsMode};
use crate::net::{timed, BoxIo, IdleTimeout, PreauthShim, WireStats};
use crate::secret::Secret;
use crate::tunnel::{self, TunnelInfo};

pub type Session = async_imap::Session<BoxIo>;

/// The attributes fetched for delivery. BODY.PEEK leaves `\Seen` alone: the
/// flag is stored only after the ledger has the delivery.
pub const FETCH_ITEMS: &str = "(UID RFC822.SIZE INTERNALDATE FLAGS BODY.PEEK[])";

/// A command line stays well under the 8 KB many servers accept.
const MAX_SET_LEN: usize = 4000;

/// Why an account could not be used at all; `main` maps these to exit codes.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Network, TLS, greeting: the server cannot be used now (EX_UNAVAILABLE).
    #[error("{0:#}")]
    Unavailable(anyhow::Error),
    /// The server refused our credentials, or they could not be read
    /// (EX_NOPERM).
    #[error("{0:#}")]
    Auth(anyhow::Error),
}

/// A logged-in IMAP connection.
pub struct Imap {
    pub session: Session,
    pub caps: HashSet<String>,
    pub peer: String,
    pub timeout: Duration,
    pub tunnel: Option<TunnelInfo>,
    /// The socket's silence limit (lengthened while idling) and byte counts.
    wire: WireStats,
}

/// How an IDLE ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleEnd {
    /// The server reported something (EXISTS, EXPUNGE, FETCH...).
    NewData,
    /// The wait ran out: time for a catch-up pass.
    Timeout,
    /// We ended it (pull now, stop).
    Woken,
}

/// What SELECT tells a pass.
#[derive(Debug, Clone, Copy)]
pub struct Selected {
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub exists: u32,
}

impl Imap {
    pub async fn connect(account: &Account) -> Result<Imap, ConnectError> {
        let limit = account.imap_timeout;
        let unavailable = |e: anyhow::Error| ConnectError::Unavailable(e);

        let (mut client, peer, tunnel, wire) = match &account.connect {
            Connect::Tunnel { command, stderr } => {
                let peer = format!("tunnel {}", account.host);
                let (io, info) = tunnel::spawn(command, *stderr).map_err(unavailable)?;
                let io = IdleTimeout::new(io, limit);
                let wire = io.stats();
                let (shim, armed) = PreauthShim::new(io);
                let mut c = async_imap::Client::new(Box::new(shim) as BoxIo);
                let greeting = read_greeting(&mut c, &peer, limit, true)
                    .await
                    .map_err(|e| unavailable(with_exit_report(e, &info)))?;
                if greeting == Greeting::Preauth {
                    // Already authenticated by the tunnel (ssh). async-imap
                    // reaches a session only through a login: the shim
                    // answers this one itself; nothing goes to the server.
                    armed.store(true, std::sync::atomic::Ordering::SeqCst);
                    let session = timed(&peer, limit, async {
                        c.login("preauth", "preauth").await.map_err(|(e, _)| e)
                    })
                    .await
                    .map_err(unavailable)?;
                    return Imap::ready(account, session, peer, Some(info), wire).await;
                }
                (c, peer, Some(info), wire)
            }
            Connect::Tcp { proxy } => {
                let peer = format!("{}:{}", account.host, account.port);
                let tcp = connect_tcp(account, proxy.as_ref(), &peer)
                    .await
                    .map_err(unavailable)?;
                // Every read and write below is bounded by silence, not by size.
                let tcp = IdleTimeout::new(tcp, limit);
                let wire = tcp.stats();
                let c = match account.tls {
                    TlsMode::Implicit => {
                        let tls = tls_wrap(account, Box::new(tcp))
                            .await
                            .map_err(unavailable)?;
                        let mut c = async_imap::Client::new(tls);
                        read_greeting(&mut c, &peer, limit, false)
                            .await
                            .map_err(unavailable)?;
                        c
                    }
                    TlsMode::None => {
                        let mut c = async_imap::Client::new(Box::new(tcp) as BoxIo);
                        read_greeting(&mut c, &peer, limit, false)
                            .await
                            .map_err(unavailable)?;
                        c
                    }
                    TlsMode::Starttls => {
                        let mut c = async_imap::Client::new(Box::new(tcp) as BoxIo);
                        read_greeting(&mut c, &peer, limit, false)
                            .await
                            .map_err(unavailable)?;
                        let caps = client_capabilities(&mut c, &peer, limit)
                            .await
                            .map_err(unavailable)?;
                        if !caps.contains("STARTTLS") {
                            return Err(unavailable(anyhow!(
                                "{peer} does not offer STARTTLS; refusing to log in without TLS \
                                 (tls = \"starttls\" in the config)"
                            )));
                        }
                        timed(&peer, limit, c.run_command_and_check_ok("STARTTLS", None))
                            .await
                            .context("STARTTLS")
                            .map_err(unavailable)?;
                        // into_inner drops anything buffered before the
                        // handshake, so plaintext injected after STARTTLS is
                        // never read.
                        let tls = tls_wrap(account, c.into_inner())
                            .await
                            .map_err(unavailable)?;
                        async_imap::Client::new(tls)
                    }
                };
                (c, peer, None, wire)
            }
        };
        let caps = client_capabilities(&mut client, &peer, limit)
            .await
            .map_err(unavailable)?;
        if caps.contains("LOGINDISABLED") && !caps.contains("AUTH=PLAIN") {
            return Err(ConnectError::Auth(anyhow!(
                "{peer} refuses to log in (LOGINDISABLED) on this connection"
            )));
        }
        if matches!(account.password, PasswordSource::None) {
            return Err(ConnectError::Auth(anyhow!(
                "{peer} asks for a login, and the account has no password \
                 (a tunnel without PREAUTH needs `username` and a password)"
            )));
        }
        let password = read_password(&account.password).map_err(ConnectError::Auth)?;
        let login = if caps.contains("AUTH=PLAIN") {
            let auth = PlainAuth {
                user: account.username.clone(),
                password: password.clone(),
            };
            // SASL-IR (RFC 4959): the credentials go with the command, one
            // round trip less. The server then answers with the tagged OK
            // at once, and the authenticator is never asked.
            let mechanism = if caps.contains("SASL-IR") {
                use base64::Engine as _;
                let ir = base64::engine::general_purpose::STANDARD.encode(auth.response());
                format!("PLAIN {ir}")
            } else {
                "PLAIN".to_string()
            };
            timed(&peer, limit, async {
                client
                    .authenticate(mechanism, auth)
                    .await
                    .map_err(|(e, _)| e)
            })
            .await
        } else {
            timed(&peer, limit, async {
                client
                    .login(&account.username, password.expose())
                    .await
                    .map_err(|(e, _)| e)
            })
            .await
        };
        let session = login
            .with_context(|| format!("logging in to {peer} as {}", account.username))
            .map_err(|e| match e.downcast_ref::<async_imap::error::Error>() {
                Some(async_imap::error::Error::No(_)) | Some(async_imap::error::Error::Bad(_)) => {
                    ConnectError::Auth(e)
                }
                _ => ConnectError::Unavailable(e),
            })?;
        Imap::ready(account, session, peer, tunnel, wire).await
    }

    /// After authentication: capabilities, COMPRESS.
    async fn ready(
        account: &Account,
        mut session: Session,
        peer: String,
        tunnel: Option<TunnelInfo>,
        wire: WireStats,
    ) -> Result<Imap, ConnectError> {
        let limit = account.imap_timeout;
        let unavailable = |e: anyhow::Error| ConnectError::Unavailable(e);
        // Capabilities may grow after login (Dovecot adds the extensions).
        let mut caps = cap_set(
            &timed(&peer, limit, session.capabilities())
                .await
                .map_err(unavailable)?,
        );
        if account.compress && caps.contains("COMPRESS=DEFLATE") {
            session = timed(&peer, limit, session.compress(|s| Box::new(s) as BoxIo))
                .await
                .context("COMPRESS DEFLATE")
                .map_err(unavailable)?;
            caps.insert("X-IMAPULL-COMPRESSED".into());
            tracing::debug!(peer, "COMPRESS=DEFLATE active");
        }
        Ok(Imap {
            session,
            caps,
            peer,
            timeout: limit,
            tunnel,
            wire,
        })
    }

    /// Why the tunnel command ended, if this is a tunnel and it has.
    pub fn tunnel_report(&self) -> Option<String> {
        self.tunnel.as_ref().and_then(TunnelInfo::exit_report)
    }

    /// IDLE (RFC 2177) for at most `wait`, or until `wake` is notified.
    /// Consumes the connection and gives it back after DONE. A connection
    /// that dies while idling is an error, not a wake-up: async-imap reports
    /// EOF like our own interrupt, so which one it was is tracked here.
    pub async fn idle(self, wait: Duration, wake: &tokio::sync::Notify) -> Result<(Imap, IdleEnd)> {
        let Imap {
            session,
            caps,
            peer,
            timeout,
            tunnel,
            wire,
        } = self;
        // While idling the server may be silent up to its keepalive
        // interval: let the socket wait as long as the IDLE itself.
        let normal = wire.limit_ms.load(Ordering::Relaxed);
        wire.limit_ms.store(
            (wait + Duration::from_secs(60)).as_millis() as u64,
            Ordering::Relaxed,
        );
        let mut handle = session.idle();
        timed(&peer, timeout, handle.init())
            .await
            .with_context(|| format!("IDLE on {peer}"))?;
        let mut woken = false;
        let response = {
            let (fut, interrupt) = handle.wait_with_timeout(wait);
            let mut fut = std::pin::pin!(fut);
            tokio::select! {
                r = &mut fut => r,
                _ = wake.notified() => {
                    woken = true;
                    drop(interrupt);
                    fut.await
                }
            }
        }
        .with_context(|| format!("IDLE on {peer}"))?;
        wire.limit_ms.store(normal, Ordering::Relaxed);
        let end = match response {
            async_imap::extensions::idle::IdleResponse::NewData(_) => IdleEnd::NewData,
            async_imap::extensions::idle::IdleResponse::Timeout => IdleEnd::Timeout,
            async_imap::extensions::idle::IdleResponse::ManualInterrupt if woken => IdleEnd::Woken,
            async_imap::extensions::idle::IdleResponse::ManualInterrupt => {
                bail!("{peer} closed the connection during IDLE")
            }
        };
        let session = timed(&peer, timeout, handle.done())
            .await
            .with_context(|| format!("DONE on {peer}"))?;
        Ok((
            Imap {
                session,
                caps,
                peer,
                timeout,
                tunnel,
                wire,
            },
            end,
        ))
    }

    pub fn has(&self, cap: &str) -> bool {
        self.caps.contains(cap)
    }

    pub async fn select(&mut self, mailbox: &str) -> Result<Selected> {
        let name = utf7::encode(mailbox);
        let mb = timed(&self.peer, self.timeout, self.session.select(&name))
            .await
            .with_context(|| format!("selecting mailbox {mailbox:?} on {}", self.peer))?;
        let uidvalidity = mb
            .uid_validity
            .ok_or_else(|| anyhow!("{} sent no UIDVALIDITY for {mailbox:?}", self.peer))?;
        let uidnext = match mb.uid_next {
            Some(n) => n,
            // RFC 3501 lets a server omit UIDNEXT; the highest UID + 1 is the
            // same thing for our purpose.
            None => self.search("ALL").await?.iter().max().map_or(1, |m| m + 1),
        };
        Ok(Selected {
            uidvalidity,
            uidnext,
            exists: mb.exists,
        })
    }

    pub async fn search(&mut self, query: &str) -> Result<BTreeSet<u32>> {
        let r = timed(&self.peer, self.timeout, self.session.uid_search(query))
            .await
            .with_context(|| format!("UID SEARCH {query} on {}", self.peer))?;
        Ok(r.into_iter().collect())
    }

    /// Which of `uids` the selected mailbox still holds (a search, in
    /// batches). Servers may answer `UID n:*` with more than was asked;
    /// only the asked-for UIDs are returned.
    pub async fn which_exist(&mut self, uids: &BTreeSet<u32>) -> Result<BTreeSet<u32>> {
        let v: Vec<u32> = uids.iter().copied().collect();
        let mut found = BTreeSet::new();
        for set in uid_sets(&v) {
            found.extend(self.search(&format!("UID {set}")).await?);
        }
        found.retain(|u| uids.contains(u));
        Ok(found)
    }

    /// The sizes (RFC822.SIZE) of those of `uids` that still exist.
    pub async fn sizes(&mut self, uids: &[u32]) -> Result<HashMap<u32, u64>> {
        let mut sizes = HashMap::new();
        let peer = self.peer.clone();
        for set in uid_sets(uids) {
            let mut stream = self.fetch(&set, "(UID RFC822.SIZE)").await?;
            while let Some(f) = stream.next().await {
                let f = f.with_context(|| format!("UID FETCH (RFC822.SIZE) on {peer}"))?;
                if let (Some(uid), Some(size)) = (f.uid, f.size) {
                    sizes.insert(uid, u64::from(size));
                }
            }
        }
        Ok(sizes)
    }

    /// Starts `UID FETCH set items`. The stream's reads are bounded by the
    /// connection's idle timeout, so a large message may take as long as it
    /// needs while bytes keep arriving.
    pub async fn fetch(
        &mut self,
        set: &str,
        items: &str,
    ) -> Result<impl Stream<Item = async_imap::error::Result<Fetch>> + '_ + Send + Unpin> {
        let peer = self.peer.clone();
        timed(
            &peer,
            self.timeout,
            self.session.uid_fetch(set.to_string(), items.to_string()),
        )
        .await
        .with_context(|| format!("UID FETCH on {peer}"))
    }

    /// Adds `\Seen` to `uids`, in batches.
    pub async fn add_seen(&mut self, uids: &[u32]) -> Result<()> {
        self.store(uids, "+FLAGS.SILENT (\\Seen)").await
    }

    /// `UID STORE` over `uids`, in batches; `what` is e.g.
    /// `+FLAGS.SILENT (\Deleted)`.
    pub async fn store(&mut self, uids: &[u32], what: &str) -> Result<()> {
        for set in uid_sets(uids) {
            let peer = self.peer.clone();
            let limit = self.timeout;
            timed(&peer, limit, async {
                drain(self.session.uid_store(&set, what).await?).await
            })
            .await
            .with_context(|| format!("UID STORE {what} on {peer}"))?;
        }
        Ok(())
    }

    /// `UID EXPUNGE` (UIDPLUS) over `uids`. Like FETCH, the reply stream
    /// ends quietly on NO: the caller checks the result with a search.
    pub async fn uid_expunge(&mut self, uids: &[u32]) -> Result<()> {
        for set in uid_sets(uids) {
            let peer = self.peer.clone();
            let limit = self.timeout;
            timed(&peer, limit, async {
                drain(self.session.uid_expunge(&set).await?).await
            })
            .await
            .with_context(|| format!("UID EXPUNGE on {peer}"))?;
        }
        Ok(())
    }

    /// Plain `EXPUNGE`: removes every message flagged `\Deleted`.
    pub async fn expunge_all_deleted(&mut self) -> Result<()> {
        let peer = self.peer.clone();
        timed(&peer, self.timeout, async {
            drain(self.session.expunge().await?).await
        })
        .await
        .with_context(|| format!("EXPUNGE on {peer}"))
    }

    /// `UID MOVE` (RFC 6851) of `uids` to `target`.
    pub async fn uid_move(&mut self, uids: &[u32], target: &str) -> Result<()> {
        let target = utf7::encode(target);
        for set in uid_sets(uids) {
            let peer = self.peer.clone();
            timed(&peer, self.timeout, self.session.uid_mv(&set, &target))
                .await
                .with_context(|| format!("UID MOVE to {target:?} on {peer}"))?;
        }
        Ok(())
    }

    /// The mailbox carrying the `\Trash` special-use attribute (RFC 6154).
    pub async fn trash_mailbox(&mut self) -> Result<Option<String>> {
        use async_imap::imap_proto::NameAttribute;
        let peer = self.peer.clone();
        timed(&peer, self.timeout, async {
            let names = self.session.list(Some(""), Some("*")).await?;
            let mut names = std::pin::pin!(names);
            let mut found = None;
            while let Some(n) = names.next().await {
                let n = n?;
                if found.is_none()
                    && n.attributes()
                        .iter()
                        .any(|a| matches!(a, NameAttribute::Trash))
                {
                    found = Some(n.name().to_string());
                }
            }
            Ok::<_, async_imap::error::Error>(found)
        })
        .await
        .with_context(|| format!("LIST on {peer}"))
    }

    /// Checks that the connection still answers (after a FETCH stream ended,
    /// to tell "done" from "dropped").
    pub async fn noop(&mut self) -> Result<()> {
        timed(&self.peer, self.timeout, self.session.noop())
            .await
            .with_context(|| format!("NOOP on {}", self.peer))
    }

    pub async fn logout(mut self) {
        let _ = timed(&self.peer, Duration::from_secs(5), self.session.logout()).await;
        tracing::debug!(
            peer = self.peer,
            bytes_in = self.wire.read.load(Ordering::Relaxed),
            bytes_out = self.wire.written.load(Ordering::Relaxed),
            compressed = self.has("X-IMAPULL-COMPRESSED"),
            "IMAP session closed"
        );
    }
}

/// Reads a command's response stream to its end (STORE, EXPUNGE: the items
/// themselves are not needed), failing on the first error.
async fn drain<T>(
    s: impl futures_util::Stream<Item = async_imap::error::Result<T>>,
) -> async_imap::error::Result<()> {
    let mut s = std::pin::pin!(s);
    while let Some(r) = s.next().await {
        r?;
    }
    Ok(())
}

/// Upper-cased capability names, AUTH= ones included.
fn cap_set(caps: &async_imap::types::Capabilities) -> HashSet<String> {
    use async_imap::types::Capability;
    caps.iter()
        .map(|c| match c {
            Capability::Imap4rev1 => "IMAP4REV1".to_string(),
            Capability::Auth(a) => format!("AUTH={}", a.to_ascii_uppercase()),
            Capability::Atom(a) => a.to_ascii_uppercase(),
        })
        .collect()
}

/// CAPABILITY before login: async-imap has it only on a logged-in session,
/// so the untagged reply is collected from the unsolicited channel.
async fn client_capabilities(
    c: &mut async_imap::Client<BoxIo>,
    peer: &str,
    limit: Duration,
) -> Result<HashSet<String>> {
    use async_imap::imap_proto::Capability as C;
    use async_imap::types::UnsolicitedResponse;
    let (tx, rx) = async_channel::unbounded();
    timed(
        peer,
        limit,
        c.run_command_and_check_ok("CAPABILITY", Some(tx)),
    )
    .await
    .with_context(|| format!("CAPABILITY on {peer}"))?;
    let mut caps = HashSet::new();
    while let Ok(r) = rx.try_recv() {
        if let UnsolicitedResponse::Other(data) = r {
            if let Response::Capabilities(list) = data.parsed() {
                caps.extend(list.iter().map(|c| match c {
                    C::Imap4rev1 => "IMAP4REV1".to_string(),
                    C::Auth(a) => format!("AUTH={}", a.to_ascii_uppercase()),
                    C::Atom(a) => a.to_ascii_uppercase(),
                }));
            }
        }
    }
    Ok(caps)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Greeting {
    Ok,
    Preauth,
}

fn with_exit_report(e: anyhow::Error, info: &TunnelInfo) -> anyhow::Error {
    match info.exit_report() {
        Some(r) => e.context(r),
        None => e,
    }
}

/// TCP to the server, directly or through the SOCKS5 proxy.
async fn connect_tcp(account: &Account, proxy: Option<&Proxy>, peer: &str) -> Result<TcpStream> {
    let limit = account.imap_timeout;
    let host = account.host.trim_start_matches('[').trim_end_matches(']');
    let tcp = match proxy {
        None => timed(peer, limit, TcpStream::connect((host, account.port)))
            .await
            .with_context(|| format!("connecting to {peer}"))?,
        Some(p) => {
            let via = format!("{peer} through the SOCKS5 proxy {}:{}", p.host, p.port);
            let proxy_addr = (p.host.as_str(), p.port);
            let fut = async {
                // socks5h: the proxy resolves the name (Tor); socks5: we do.
                let target: tokio_socks::TargetAddr<'_> = if p.remote_dns {
                    tokio_socks::TargetAddr::Domain(host.into(), account.port)
                } else {
                    let addr = tokio::net::lookup_host((host, account.port))
                        .await?
                        .next()
                        .ok_or_else(|| anyhow!("{host} has no address"))?;
                    tokio_socks::TargetAddr::Ip(addr)
                };
                let s = match &p.auth {
                    None => tokio_socks::tcp::Socks5Stream::connect(proxy_addr, target).await?,
                    Some((user, pw)) => {
                        tokio_socks::tcp::Socks5Stream::connect_with_password(
                            proxy_addr,
                            target,
                            user,
                            pw.expose(),
                        )
                        .await?
                    }
                };
                Ok::<_, anyhow::Error>(s.into_inner())
            };
            timed(peer, limit, fut)
                .await
                .with_context(|| format!("connecting to {via}"))?
        }
    };
    tcp.set_nodelay(true).ok();
    Ok(tcp)
}

async fn read_greeting(
    c: &mut async_imap::Client<BoxIo>,
    peer: &str,
    limit: Duration,
    allow_preauth: bool,
) -> Result<Greeting> {
    let r = timed(peer, limit, c.read_response())
        .await
        .with_context(|| format!("reading the greeting of {peer}"))?
        .ok_or_else(|| anyhow!("{peer} closed the connection before greeting"))?;
    match r.parsed() {
        Response::Data {
            status: Status::Ok, ..
        } => Ok(Greeting::Ok),
        Response::Data {
            status: Status::PreAuth,
            ..
        } if allow_preauth => Ok(Greeting::Preauth),
        Response::Data {
            status: Status::PreAuth,
            ..
        } => bail!(
            "{peer} greeted with PREAUTH on a network connection; refusing it, since a man in \
             the middle could use it to skip authentication and TLS (PREAUTH is accepted only \
             over a tunnel)"
        ),
        Response::Data {
            status: Status::Bye,
            outcome,
        } => bail!(
            "{peer} refused the connection: {}",
            outcome.information.as_deref().unwrap_or("BYE")
        ),
        _ => bail!("{peer} sent an unexpected greeting"),
    }
}

/// A TLS client context per CA file, built once per process: building one
/// loads the system's trust store, which costs tens of milliseconds of CPU,
/// and a run over twenty accounts would pay it twenty times.
fn tls_connector(ca_file: Option<&std::path::Path>) -> Result<native_tls::TlsConnector> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<Option<std::path::PathBuf>, native_tls::TlsConnector>>> =
        OnceLock::new();
    let key = ca_file.map(std::path::Path::to_path_buf);
    let cache = CACHE.get_or_init(Default::default);
    if let Some(c) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(c);
    }
    let mut builder = native_tls::TlsConnector::builder();
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("reading ca_file {}", ca.display()))?;
        let certs = native_tls::Certificate::stack_from_pem(&pem)
            .with_context(|| format!("parsing ca_file {}", ca.display()))?;
        for cert in certs {
            builder.add_root_certificate(cert);
        }
    }
    let connector = builder.build().context("setting up TLS")?;
    if let Ok(mut c) = cache.lock() {
        c.insert(key, connector.clone());
    }
    Ok(connector)
}

/// Bytes read from the socket at once below TLS.
const TLS_READ_BUFFER: usize = 64 * 1024;

async fn tls_wrap(account: &Account, stream: BoxIo) -> Result<BoxIo> {
    let peer = format!("{}:{}", account.host, account.port);
    let connector =
        tokio_native_tls::TlsConnector::from(tls_connector(account.ca_file.as_deref())?);
    let host = account.host.trim_start_matches('[').trim_end_matches(']');
    // OpenSSL reads a record's 5-byte header and then its body, two reads
    // per record; a buffer below it turns those into one large read per
    // burst of records (a 108 MB FETCH: 56,000 reads became 4,700).
    let stream = tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, stream);
    let tls = timed(&peer, account.imap_timeout, connector.connect(host, stream))
        .await
        .with_context(|| format!("TLS handshake with {peer}"))?;
    if let Some(pin) = &account.tls_pin_sha256 {
        let cert = tls
            .get_ref()
            .peer_certificate()?
            .ok_or_else(|| anyhow!("{peer} sent no certificate"))?;
        let got = spki_sha256(&cert.to_der()?)?;
        if &got != pin {
            bail!(
                "{peer}: the server's public key (sha256 {}) does not match tls_pin_sha256",
                hex(&got)
            );
        }
    }
    Ok(Box::new(tls))
}

/// SHA-256 of the certificate's SubjectPublicKeyInfo (the HPKP/curl pin).
pub fn spki_sha256(der: &[u8]) -> Result<Vec<u8>> {
    let x509 = openssl::x509::X509::from_der(der)?;
    let spki = x509.public_key()?.public_key_to_der()?;
    Ok(openssl::sha::sha256(&spki).to_vec())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn read_password(src: &PasswordSource) -> Result<Secret> {
    fn strip(mut s: String) -> String {
        if s.ends_with('\n') {
            s.pop();
            if s.ends_with('\r') {
                s.pop();
            }
        }
        s
    }
    match src {
        PasswordSource::None => Ok(Secret::new(String::new())),
        PasswordSource::Inline(s) => Ok(s.clone()),
        PasswordSource::File(p) => {
            let p = &expand_credentials(p)?;
            let s = std::fs::read_to_string(p)
                .with_context(|| format!("reading password_file {}", p.display()))?;
            Ok(Secret::new(strip(s)))
        }
        PasswordSource::Command(argv) => {
            let out = std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::inherit())
                .output()
                .with_context(|| format!("running password_command {:?}", argv[0]))?;
            if !out.status.success() {
                bail!("password_command {:?} failed: {}", argv[0], out.status);
            }
            let s = String::from_utf8(out.stdout)
                .map_err(|_| anyhow!("password_command {:?} printed non-UTF-8", argv[0]))?;
            Ok(Secret::new(strip(s)))
        }
    }
}

/// Expands `${CREDENTIALS_DIRECTORY}` (or `$CREDENTIALS_DIRECTORY`) in a
/// password_file path: where systemd's `LoadCredential=` puts secrets.
fn expand_credentials(p: &std::path::Path) -> Result<std::path::PathBuf> {
    let s = p.to_string_lossy();
    let pattern = ["${CREDENTIALS_DIRECTORY}", "$CREDENTIALS_DIRECTORY"]
        .into_iter()
        .find(|pat| s.contains(pat));
    let Some(pattern) = pattern else {
        return Ok(p.to_path_buf());
    };
    let dir = std::env::var("CREDENTIALS_DIRECTORY").map_err(|_| {
        anyhow!(
            "password_file {s:?} names $CREDENTIALS_DIRECTORY, but CREDENTIALS_DIRECTORY is not set \
             (it is set by systemd's LoadCredential=)"
        )
    })?;
    Ok(s.replace(pattern, &dir).into())
}

struct PlainAuth {
    user: String,
    password: Secret,
}

impl PlainAuth {
    /// RFC 4616: authzid (empty), NUL, authcid, NUL, password.
    fn response(&self) -> Vec<u8> {
        let mut r = Vec::new();
        r.push(0);
        r.extend_from_slice(self.user.as_bytes());
        r.push(0);
        r.extend_from_slice(self.password.expose().as_bytes());
        r
    }
}

impl async_imap::Authenticator for PlainAuth {
    type Response = Vec<u8>;
    fn process(&mut self, _challenge: &[u8]) -> Vec<u8> {
        self.response()
    }
}

/// Splits `uids` (in their order) into runs of at most `max_bytes` by
/// `sizes`; a message bigger than that is a run of its own, and one of
/// unknown size counts as nothing (it is gone, or the FETCH says so).
pub fn byte_batches(uids: &[u32], sizes: &HashMap<u32, u64>, max_bytes: u64) -> Vec<Vec<u32>> {
    let mut batches: Vec<Vec<u32>> = Vec::new();
    let mut bytes = 0u64;
    for &uid in uids {
        let size = sizes.get(&uid).copied().unwrap_or(0);
        match batches.last_mut() {
            Some(b) if bytes + size <= max_bytes => {
                b.push(uid);
                bytes += size;
            }
            _ => {
                batches.push(vec![uid]);
                bytes = size;
            }
        }
    }
    batches
}

/// Sorted UIDs as IMAP sequence sets ("1:4,7,9:12"), each short enough for
/// one command line.
pub fn uid_sets(uids: &[u32]) -> Vec<String> {
    let mut sorted: Vec<u32> = uids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut sets = Vec::new();
    let mut cur = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        i += 1;
        let piece = if start == end {
            start.to_string()
        } else {
            format!("{start}:{end}")
        };
        if !cur.is_empty() && cur.len() + piece.len() + 1 > MAX_SET_LEN {
            sets.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(',');
        }
        cur.push_str(&piece);
    }
    if !cur.is_empty() {
        sets.push(cur);
    }
    sets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets() {
        assert_eq!(uid_sets(&[]), Vec::<String>::new());
        assert_eq!(uid_sets(&[3, 1, 2, 7, 9, 10, 9]), vec!["1:3,7,9:10"]);
        let many: Vec<u32> = (0..5000).map(|i| i * 2).collect();
        let sets = uid_sets(&many);
        assert!(sets.len() > 1);
        assert!(sets.iter().all(|s| s.len() <= MAX_SET_LEN));
        let back: Vec<u32> = sets
            .iter()
            .flat_map(|s| s.split(','))
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(back, many);
    }

    proptest::proptest! {
        #[test]
        fn byte_batches_keep_order_and_stay_under_the_limit(
            sizes in proptest::collection::vec(0u64..3000, 0..60),
            max in 1u64..5000,
        ) {
            let uids: Vec<u32> = (1..=sizes.len() as u32).rev().collect();
            let by_uid: HashMap<u32, u64> = uids.iter().copied().zip(sizes.iter().copied()).collect();
            let batches = byte_batches(&uids, &by_uid, max);
            proptest::prop_assert_eq!(batches.concat(), uids.clone());
            for b in &batches {
                proptest::prop_assert!(!b.is_empty());
                let bytes: u64 = b.iter().map(|u| by_uid[u]).sum();
                proptest::prop_assert!(bytes <= max || b.len() == 1, "{:?} has {} bytes", b, bytes);
            }
            // Greedy: no batch could have taken the next one's first message.
            for w in batches.windows(2) {
                let bytes: u64 = w[0].iter().map(|u| by_uid[u]).sum();
                proptest::prop_assert!(bytes + by_uid[&w[1][0]] > max);
            }
        }
    }
}
