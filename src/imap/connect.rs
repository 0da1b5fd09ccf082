//! Reaching a logged-in IMAP session, step by step: the transport (TCP,
//! SOCKS5 or a tunnel command, with implicit TLS), the greeting, STARTTLS,
//! the login, and COMPRESS.
//!
//! Capabilities are taken from where the server volunteers them (the
//! greeting's and the login reply's `[CAPABILITY ...]` codes, as Dovecot
//! sends them) and asked for only when it did not: each CAPABILITY saved is
//! a round trip on a slow link.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::net::TcpStream;

use super::conn::{quoted, Conn, Done, ImapError, Part, Step};
use super::response::{Code, Data, Response, Status};
use super::Imap;
use crate::config::{
    Account, Auth, Compress, Connect, OAuthMechanism, PasswordSource, Proxy, TlsMode, TokenSource,
};
use crate::credentials::read_password;
use crate::net::{connect_each, resolve, timed, BoxIo, IdleTimeout, WireStats};
use crate::secret::Secret;
use crate::tunnel::{self, TunnelInfo};

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

fn unavailable(e: impl Into<anyhow::Error>) -> ConnectError {
    ConnectError::Unavailable(e.into())
}

/// A byte stream to the server, before any IMAP.
pub struct Transport {
    pub io: BoxIo,
    pub peer: String,
    pub tunnel: Option<TunnelInfo>,
    pub wire: WireStats,
    /// When implicit TLS's handshake ended. Over TLS 1.3 the server sends
    /// its greeting once it has the client's Finished, which the end of the
    /// handshake has just sent: the greeting comes one round trip later
    /// and costs the server nothing, so it times the link itself
    /// ([`Imap::compress_for`]). Over TLS 1.2 it comes at once (the
    /// client's handshake ends with the server's Finished), too soon to
    /// say a link is slow, which is the only use made of it.
    pub tls_done: Option<std::time::Instant>,
}

pub async fn connect(account: &Account) -> Result<Imap, ConnectError> {
    let t = transport(account).await?;
    establish(account, t, false).await
}

/// IMAP over an open transport: greeting, STARTTLS, login, COMPRESS.
/// `preauth_ok` accepts a PREAUTH greeting without a tunnel (for tests of
/// the protocol over an in-memory stream).
pub async fn establish(
    account: &Account,
    t: Transport,
    preauth_ok: bool,
) -> Result<Imap, ConnectError> {
    let tunnel = t.tunnel;
    let mut conn = Conn::new(t.io, t.peer.clone(), account.max_message_size);
    let greeting = match greeting(&mut conn, tunnel.is_some() || preauth_ok).await {
        Ok(g) => g,
        Err(e) => return Err(unavailable(with_exit_report(e, tunnel.as_ref()).await)),
    };
    let greeted_in = t.tls_done.map(|at| at.elapsed());
    let mut caps = greeting.caps;
    if greeting.preauth {
        // Already authenticated by the tunnel (ssh).
        let caps = known_or_asked(&mut conn, caps).await?;
        return ready(account, conn, caps, t.wire, tunnel, greeted_in).await;
    }
    if account.tls == TlsMode::Starttls && matches!(account.connect, Connect::Tcp { .. }) {
        conn = starttls(account, conn, caps.take()).await?;
    }
    let caps = known_or_asked(&mut conn, caps).await?;
    let caps = login(account, &mut conn, &caps).await?;
    let caps = known_or_asked(&mut conn, caps).await?;
    ready(account, conn, caps, t.wire, tunnel, greeted_in).await
}

/// TCP (direct or through SOCKS5) with implicit TLS if configured, or the
/// tunnel command; bounded by silence from here on.
async fn transport(account: &Account) -> Result<Transport, ConnectError> {
    // The TLS context is built while the TCP handshake goes on.
    super::tls::prepare([account]);
    let limit = account.imap_timeout;
    match &account.connect {
        Connect::Tunnel { command, stderr } => {
            let peer = format!("tunnel {}", account.host);
            let (io, info) = tunnel::spawn(command, *stderr).map_err(unavailable)?;
            let io = IdleTimeout::new(io, limit);
            let wire = io.stats();
            Ok(Transport {
                io: Box::new(io),
                peer,
                tunnel: Some(info),
                wire,
                tls_done: None,
            })
        }
        Connect::Tcp { proxy } => {
            let peer = format!("{}:{}", account.host, account.port);
            let tcp = connect_tcp(account, proxy.as_ref(), &peer)
                .await
                .map_err(unavailable)?;
            // Every read and write below is bounded by silence, not by size.
            let tcp = IdleTimeout::new(tcp, limit);
            let wire = tcp.stats();
            let (io, tls_done): (BoxIo, _) = match account.tls {
                TlsMode::Implicit => (
                    tls_wrap(account, Box::new(tcp))
                        .await
                        .map_err(unavailable)?,
                    Some(std::time::Instant::now()),
                ),
                TlsMode::None | TlsMode::Starttls => (Box::new(tcp), None),
            };
            Ok(Transport {
                io,
                peer,
                tunnel: None,
                wire,
                tls_done,
            })
        }
    }
}

struct Greeting {
    preauth: bool,
    caps: Option<HashSet<String>>,
}

/// Reads the greeting: OK, or PREAUTH (accepted only over a tunnel, where
/// ssh authenticated), or BYE.
async fn greeting(conn: &mut Conn, tunnel: bool) -> Result<Greeting> {
    let peer = conn.peer.clone();
    let r = conn
        .read()
        .await
        .with_context(|| format!("reading the greeting of {peer}"))?;
    let Response::Data(Data::Status { status, code, text }) = r else {
        bail!("{peer} sent an unexpected greeting");
    };
    let caps = match code {
        Some(Code::Capability(c)) => Some(c.into_iter().collect()),
        _ => None,
    };
    match status {
        Status::Ok => Ok(Greeting {
            preauth: false,
            caps,
        }),
        Status::Preauth if tunnel => Ok(Greeting {
            preauth: true,
            caps,
        }),
        Status::Preauth => bail!(
            "{peer} greeted with PREAUTH on a network connection; refusing it, since a man in \
             the middle could use it to skip authentication and TLS (PREAUTH is accepted only \
             over a tunnel)"
        ),
        Status::Bye => bail!("{peer} refused the connection: {text}"),
        Status::No | Status::Bad => bail!("{peer} sent an unexpected greeting: {text}"),
    }
}

/// The capabilities the server volunteered, or else asked for: a round
/// trip only where it said nothing.
async fn known_or_asked(
    conn: &mut Conn,
    known: Option<HashSet<String>>,
) -> Result<HashSet<String>, ConnectError> {
    match known {
        Some(c) => Ok(c),
        None => capabilities(conn).await.map_err(unavailable),
    }
}

/// CAPABILITY, upper-cased, AUTH= ones included.
pub(super) async fn capabilities(conn: &mut Conn) -> Result<HashSet<String>, ImapError> {
    let mut caps = HashSet::new();
    conn.run("CAPABILITY", &[Part::Text("CAPABILITY")], |d| {
        if let Data::Capability(c) = d {
            caps.extend(c);
        }
        Ok(())
    })
    .await?;
    Ok(caps)
}

async fn starttls(
    account: &Account,
    mut conn: Conn,
    caps: Option<HashSet<String>>,
) -> Result<Conn, ConnectError> {
    let peer = conn.peer.clone();
    let caps = known_or_asked(&mut conn, caps).await?;
    if !caps.contains("STARTTLS") {
        return Err(unavailable(anyhow!(
            "{peer} does not offer STARTTLS; refusing to log in without TLS \
             (tls = \"starttls\" in the config)"
        )));
    }
    conn.run("STARTTLS", &[Part::Text("STARTTLS")], |_| Ok(()))
        .await
        .map_err(unavailable)?;
    // Anything read after the OK came before the handshake: plaintext a
    // man in the middle may have injected. It is dropped unread.
    let (io, _injected) = conn.into_parts();
    let tls = tls_wrap(account, io).await.map_err(unavailable)?;
    Ok(Conn::new(tls, peer, account.max_message_size))
}

/// AUTHENTICATE PLAIN (with SASL-IR when offered) or LOGIN. Returns the
/// capabilities the server sent with its OK, if it did.
async fn login(
    account: &Account,
    conn: &mut Conn,
    caps: &HashSet<String>,
) -> Result<Option<HashSet<String>>, ConnectError> {
    let peer = conn.peer.clone();
    if caps.contains("LOGINDISABLED") && !caps.contains("AUTH=PLAIN") {
        return Err(ConnectError::Auth(anyhow!(
            "{peer} refuses to log in (LOGINDISABLED) on this connection"
        )));
    }
    if let Auth::OAuth2 { mechanism, source } = &account.auth {
        return oauth_login(account, conn, caps, *mechanism, source).await;
    }
    if matches!(account.password, PasswordSource::None) {
        return Err(ConnectError::Auth(anyhow!(
            "{peer} asks for a login, and the account has no password \
             (a tunnel without PREAUTH needs `username` and a password)"
        )));
    }
    conn.use_capabilities(caps);
    let password = read_password(&account.password).map_err(ConnectError::Auth)?;
    let done = if caps.contains("AUTH=PLAIN") {
        let response = plain_response(&account.username, &password);
        sasl(conn, "PLAIN", &response, caps.contains("SASL-IR"), b"\r\n")
            .await
            .map(|(done, _)| done)
            .map_err(|(e, _)| e)
    } else {
        login_command(conn, &account.username, &password).await
    };
    let done = done.map_err(|e| {
        let refused = e.is_refusal();
        let e =
            anyhow::Error::new(e).context(format!("logging in to {peer} as {}", account.username));
        if refused {
            ConnectError::Auth(e)
        } else {
            ConnectError::Unavailable(e)
        }
    })?;
    Ok(match done.code {
        Some(Code::Capability(c)) => Some(c.into_iter().collect()),
        _ => None,
    })
}

/// AUTHENTICATE XOAUTH2 or OAUTHBEARER with a token from the account's
/// source. A refused token is asked for again once (the command may refresh
/// it; the built-in source refreshes it) and tried again on the same
/// connection before the login counts as refused; the server's failure
/// report (base64 JSON) is decoded into the error.
async fn oauth_login(
    account: &Account,
    conn: &mut Conn,
    caps: &HashSet<String>,
    mechanism: OAuthMechanism,
    source: &TokenSource,
) -> Result<Option<HashSet<String>>, ConnectError> {
    let peer = conn.peer.clone();
    let name = match mechanism {
        OAuthMechanism::Xoauth2 => "XOAUTH2",
        OAuthMechanism::Oauthbearer => "OAUTHBEARER",
    };
    if !caps.contains(&format!("AUTH={name}")) {
        let offered: Vec<&str> = caps
            .iter()
            .filter_map(|c| c.strip_prefix("AUTH="))
            .collect();
        return Err(ConnectError::Auth(anyhow!(
            "{peer} does not offer AUTH={name} (it offers {})",
            if offered.is_empty() {
                "none".to_string()
            } else {
                offered.join(", ")
            }
        )));
    }
    conn.use_capabilities(caps);
    let mut refused = None;
    let mut refused_token = None;
    for attempt in 0..2 {
        let token = bearer_token(account, source, refused_token.as_ref()).await?;
        let response = oauth_response(
            mechanism,
            &account.username,
            &account.host,
            account.port,
            &token,
        );
        // RFC 7628 section 3.2.3: a failure report is answered with ^A;
        // XOAUTH2 takes an empty line.
        let abort: &[u8] = match mechanism {
            OAuthMechanism::Xoauth2 => b"\r\n",
            OAuthMechanism::Oauthbearer => b"AQ==\r\n",
        };
        match sasl(conn, name, &response, caps.contains("SASL-IR"), abort).await {
            Ok((done, _)) => {
                return Ok(match done.code {
                    Some(Code::Capability(c)) => Some(c.into_iter().collect()),
                    _ => None,
                })
            }
            Err((e, report)) if e.is_refusal() => {
                let why = report.as_deref().map(failure_report).unwrap_or_default();
                refused = Some(anyhow::Error::new(e).context(format!(
                    "{peer} refused the OAuth2 token of {}{why}",
                    account.username
                )));
                if attempt == 0 {
                    let from = match source {
                        TokenSource::Command(_) => "oauth2_token_command",
                        TokenSource::Builtin(_) => "the token endpoint",
                    };
                    tracing::info!(peer, "{name} token refused; asking {from} for a fresh one");
                }
                refused_token = Some(token);
            }
            Err((e, _)) => {
                return Err(ConnectError::Unavailable(
                    anyhow::Error::new(e).context(format!("logging in to {peer} ({name})")),
                ))
            }
        }
    }
    Err(ConnectError::Auth(refused.expect("two refusals")))
}

/// An access token from the account's source: the command (run off the
/// async threads), or the built-in source, which refreshes `refused`.
async fn bearer_token(
    account: &Account,
    source: &TokenSource,
    refused: Option<&Secret>,
) -> Result<Secret, ConnectError> {
    match source {
        TokenSource::Command(argv) => {
            let argv = argv.clone();
            let token = tokio::task::spawn_blocking(move || {
                crate::credentials::secret_from_command("oauth2_token_command", &argv)
                    .map(|t| (t, argv))
            })
            .await
            .map_err(|e| ConnectError::Auth(e.into()))?
            .map_err(ConnectError::Auth)?;
            if token.0.expose().is_empty() {
                return Err(ConnectError::Auth(anyhow!(
                    "oauth2_token_command {:?} printed no token",
                    token.1[0]
                )));
            }
            Ok(token.0)
        }
        TokenSource::Builtin(cfg) => {
            crate::oauth::access_token(&account.name, cfg, refused, crate::system_now())
                .await
                .map_err(|e| match e {
                    crate::oauth::TokenError::Reauthorize(e) => ConnectError::Auth(e),
                    crate::oauth::TokenError::Unavailable(e) => ConnectError::Unavailable(e),
                })
        }
    }
}

/// The initial response of XOAUTH2 (Google's and Microsoft's) or
/// OAUTHBEARER (RFC 7628: a GS2 header, then key=value pairs, each ended by
/// ^A), base64.
fn oauth_response(
    mechanism: OAuthMechanism,
    user: &str,
    host: &str,
    port: u16,
    token: &Secret,
) -> Secret {
    use base64::Engine as _;
    let raw = match mechanism {
        OAuthMechanism::Xoauth2 => format!("user={user}\x01auth=Bearer {}\x01\x01", token.expose()),
        OAuthMechanism::Oauthbearer => {
            // A "," or "=" in the user name is escaped (RFC 5801).
            let user = user.replace('=', "=3D").replace(',', "=2C");
            format!(
                "n,a={user},\x01host={host}\x01port={port}\x01auth=Bearer {}\x01\x01",
                token.expose()
            )
        }
    };
    Secret::new(base64::engine::general_purpose::STANDARD.encode(raw))
}

/// The server's failure report (RFC 7628 section 3.2.2: base64 of a JSON
/// object with `status`, `scope`, `openid-configuration`), in words.
pub fn failure_report(challenge: &str) -> String {
    use base64::Engine as _;
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(challenge.trim()) else {
        return String::new();
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return format!(": {}", String::from_utf8_lossy(&bytes));
    };
    let field = |k: &str| {
        v.get(k)
            .and_then(|s| s.as_str())
            .map(|s| format!("{k} {s}"))
    };
    let parts: Vec<String> = ["status", "scope", "schemes"]
        .iter()
        .filter_map(|k| field(k))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// RFC 4616: authzid (empty), NUL, authcid, NUL, password.
fn plain_response(user: &str, password: &Secret) -> Secret {
    use base64::Engine as _;
    let mut r = Vec::new();
    r.push(0);
    r.extend_from_slice(user.as_bytes());
    r.push(0);
    r.extend_from_slice(password.expose().as_bytes());
    Secret::new(base64::engine::general_purpose::STANDARD.encode(r))
}

/// A failed SASL exchange: the error, and the challenge the server sent
/// after our response (its failure report), if it sent one.
type SaslError = (ImapError, Option<String>);

/// `AUTHENTICATE mechanism`, the base64 `response` sent with the command
/// (SASL-IR, RFC 4959: one round trip less) or after the server's "+". A
/// further challenge (a failure report, as XOAUTH2 and OAUTHBEARER send)
/// is answered with `abort`, after which the server says NO; the report
/// comes back with the error.
async fn sasl(
    conn: &mut Conn,
    mechanism: &str,
    response: &Secret,
    initial: bool,
    abort: &[u8],
) -> Result<(Done, Option<String>), SaslError> {
    let what = format!("AUTHENTICATE {mechanism}");
    let mut ignore = |_| Ok(());
    let first = format!("AUTHENTICATE {mechanism}");
    let tag = if initial {
        let ir = format!(" {}", response.expose());
        conn.send(&what, &[Part::Text(&first), Part::Text(&ir)], &mut ignore)
            .await
            .map_err(|e| (e, None))?
    } else {
        let tag = conn
            .send(&what, &[Part::Text(&first)], &mut ignore)
            .await
            .map_err(|e| (e, None))?;
        conn.wait_continue(&what, &tag, &mut ignore)
            .await
            .map_err(|e| (e, None))?;
        conn.write(format!("{}\r\n", response.expose()).as_bytes())
            .await
            .map_err(|e| (e, None))?;
        tag
    };
    let mut report = None;
    loop {
        match conn.step(&what, &tag).await {
            Ok(Step::Data(_)) => {}
            // A challenge after our response: end the exchange; the
            // server then says NO.
            Ok(Step::Continue(text)) => {
                report = Some(text);
                conn.write(abort).await.map_err(|e| (e, report.clone()))?;
            }
            Ok(Step::Done(done)) => return Ok((done, report)),
            Err(e) => return Err((e, report)),
        }
    }
}

async fn login_command(conn: &mut Conn, user: &str, password: &Secret) -> Result<Done, ImapError> {
    let (qu, qp) = (quoted(user), quoted(password.expose()));
    let user_part = match &qu {
        Some(q) => Part::Text(q),
        None => Part::Literal(user.as_bytes()),
    };
    let pass_part = match &qp {
        Some(q) => Part::Text(q),
        None => Part::Literal(password.expose().as_bytes()),
    };
    conn.run(
        "LOGIN",
        &[Part::Text("LOGIN "), user_part, Part::Text(" "), pass_part],
        |_| Ok(()),
    )
    .await
}

/// After authentication: COMPRESS at once with `compress = "always"`;
/// otherwise a pass decides ([`Imap::compress_for`]).
async fn ready(
    account: &Account,
    mut conn: Conn,
    caps: HashSet<String>,
    wire: WireStats,
    tunnel: Option<TunnelInfo>,
    greeted_in: Option<std::time::Duration>,
) -> Result<Imap, ConnectError> {
    conn.use_capabilities(&caps);
    // The greeting and the login were read outside a command's end, where
    // the buffer is given back: a connection waiting for its first pass
    // would hold a read's worth.
    conn.release_buffer();
    let normal_limit = wire.limit_ms.load(Ordering::Relaxed);
    let mut names: Vec<&str> = caps.iter().map(String::as_str).collect();
    names.sort_unstable();
    let mut imap = Imap {
        peer: conn.peer.clone(),
        conn,
        caps: names.join(" ").into_boxed_str(),
        tunnel,
        wire,
        normal_limit,
        compressed: false,
        compress: account.compress,
        will_idle: false,
        greeted_in,
        selected_once: false,
    };
    if account.compress == Compress::Always {
        imap.compress_for(0).await.map_err(unavailable)?;
    }
    Ok(imap)
}

async fn with_exit_report(e: anyhow::Error, info: Option<&TunnelInfo>) -> anyhow::Error {
    let report = match info {
        Some(i) => i.settled_exit_report().await,
        None => None,
    };
    match report {
        Some(r) => e.context(r),
        None => e,
    }
}

/// TCP to the server, directly or through the SOCKS5 proxy. Every address
/// the name resolves to is tried in turn (see [`connect_each`]).
async fn connect_tcp(account: &Account, proxy: Option<&Proxy>, peer: &str) -> Result<TcpStream> {
    let limit = account.imap_timeout;
    let host = account.host.trim_start_matches('[').trim_end_matches(']');
    let port = account.port;
    let tcp = match proxy {
        None => {
            let addrs = resolve(host, port).await?;
            connect_each(peer, &addrs, limit, |a| async move {
                Ok(TcpStream::connect(a).await?)
            })
            .await?
        }
        Some(p) => {
            let via = format!("{peer} through the SOCKS5 proxy {}:{}", p.host, p.port);
            let proxy_addr = (p.host.as_str(), p.port);
            let through = |target: tokio_socks::TargetAddr<'static>| async move {
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
            if p.remote_dns {
                // socks5h: the proxy resolves the name (Tor).
                let target = tokio_socks::TargetAddr::Domain(host.to_string().into(), port);
                timed(peer, limit, through(target))
                    .await
                    .with_context(|| format!("connecting to {via}"))?
            } else {
                // socks5: we resolve, and ask for each address in turn.
                let addrs = resolve(host, port).await?;
                connect_each(&via, &addrs, limit, |a| {
                    through(tokio_socks::TargetAddr::Ip(a))
                })
                .await?
            }
        }
    };
    tcp.set_nodelay(true).ok();
    Ok(tcp)
}

/// Bytes read from the socket at once below TLS.
const TLS_READ_BUFFER: usize = 64 * 1024;

async fn tls_wrap(account: &Account, stream: BoxIo) -> Result<BoxIo> {
    let peer = format!("{}:{}", account.host, account.port);
    let host = account.host.trim_start_matches('[').trim_end_matches(']');
    // OpenSSL reads a record's 5-byte header and then its body, two reads
    // per record; a buffer below it turns those into one large read per
    // burst of records (a 108 MB FETCH: 56,000 reads became 4,700).
    // The buffer is held only while it holds bytes: idle connections keep
    // none.
    let stream = crate::net::ReadAhead::new(TLS_READ_BUFFER, stream);
    let tls = super::tls::handshake(account, host, &peer, stream).await?;
    if let Some(pin) = &account.tls_pin_sha256 {
        let cert = tls
            .ssl()
            .peer_certificate()
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
