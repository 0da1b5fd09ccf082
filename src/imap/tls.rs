//! TLS to the IMAP server: one client context per trust anchor, built once
//! per process on the blocking pool and ahead of the first handshake, and
//! the handshake itself.
//!
//! Building a context costs more CPU than the handshake it serves. The
//! system's trust store is a PEM bundle of some 140 certificates, which
//! OpenSSL 3 decodes in about 25 ms on the test machine; native-tls, which
//! imapull used before, loaded it twice per context (OpenSSL's default
//! paths, then the bundle its probe found), and went on to trust the system
//! roots beside `ca_file`. Here `ca_file` replaces the system's roots, as
//! the configuration reference says, and the bundle is read only for
//! accounts without one, once. The build starts when a run starts, or when
//! an account starts to connect, so it goes on beside the TCP handshake
//! instead of before the first ClientHello (docs/performance.md, "The TLS
//! context, built once and ahead"). tokio-openssl also reads into the
//! space it is handed without zeroing it, which tokio-native-tls did.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use anyhow::{anyhow, Context as _, Result};
use openssl::ssl::{
    Ssl, SslContext, SslContextBuilder, SslMethod, SslMode, SslOptions, SslVerifyMode,
};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::verify::{X509CheckFlags, X509VerifyFlags};
use openssl::x509::{X509VerifyResult, X509};

use crate::config::{Account, TlsMode};
use crate::net::{timed, Io};

/// A context being built, or built: the first caller builds it, the others
/// wait for that build. A failed build leaves it empty, so the next account
/// tries again and reports its own error.
type Cell = Arc<tokio::sync::OnceCell<SslContext>>;

struct Entry {
    /// The CA file as it was when its context was built (modification time
    /// and length): the daemon may run for months, and a reload after the
    /// file was replaced must not go on trusting the old one.
    stamp: Option<(SystemTime, u64)>,
    cell: Cell,
}

/// Contexts by CA file (`None`: the system's roots).
fn cache() -> &'static Mutex<HashMap<Option<PathBuf>, Entry>> {
    static CACHE: OnceLock<Mutex<HashMap<Option<PathBuf>, Entry>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn stamp(ca_file: Option<&Path>) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(ca_file?).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The cell of `ca_file`'s context, a new one if the file changed since
/// its context was built.
fn cell(ca_file: Option<&Path>) -> Cell {
    let stamp = stamp(ca_file);
    let mut cache = cache().lock().unwrap_or_else(|e| e.into_inner());
    let entry = cache
        .entry(ca_file.map(Path::to_path_buf))
        .or_insert_with(|| Entry {
            stamp,
            cell: Cell::default(),
        });
    if entry.stamp != stamp {
        *entry = Entry {
            stamp,
            cell: Cell::default(),
        };
    }
    entry.cell.clone()
}

/// `ca_file`'s context, built on the blocking pool if nobody has yet.
async fn context(ca_file: Option<&Path>) -> Result<SslContext> {
    built(cell(ca_file), ca_file.map(Path::to_path_buf)).await
}

/// The context of `cell`, built from `ca_file` if nobody has yet.
async fn built(cell: Cell, ca_file: Option<PathBuf>) -> Result<SslContext> {
    cell.get_or_try_init(|| async move {
        tokio::task::spawn_blocking(move || build(ca_file.as_deref()))
            .await
            .context("building the TLS context")?
    })
    .await
    .cloned()
}

/// Starts building the contexts these accounts will need, without waiting:
/// by the time their TCP handshakes end, the contexts are there. Errors
/// are left to each account's own handshake, which builds again.
pub fn prepare<'a>(accounts: impl IntoIterator<Item = &'a Account>) {
    let mut wanted: Vec<Option<&Path>> = accounts
        .into_iter()
        .filter(|a| a.tls != TlsMode::None)
        .map(|a| a.ca_file.as_deref())
        .collect();
    wanted.sort();
    wanted.dedup();
    for ca_file in wanted {
        let cell = cell(ca_file);
        if !cell.initialized() {
            tokio::spawn(built(cell, ca_file.map(Path::to_path_buf)));
        }
    }
}

/// A client context that verifies the server's chain against `ca_file`'s
/// certificates, or the system's roots without one. The options and
/// ciphers are those of the openssl crate's `SslConnector`.
fn build(ca_file: Option<&Path>) -> Result<SslContext> {
    let mut b = SslContextBuilder::new(SslMethod::tls_client()).context("setting up TLS")?;
    let mut opts = SslOptions::ALL
        | SslOptions::NO_COMPRESSION
        | SslOptions::NO_SSLV2
        | SslOptions::NO_SSLV3
        | SslOptions::SINGLE_DH_USE
        | SslOptions::SINGLE_ECDH_USE;
    opts &= !SslOptions::DONT_INSERT_EMPTY_FRAGMENTS;
    b.set_options(opts);
    b.set_mode(
        SslMode::AUTO_RETRY
            | SslMode::ACCEPT_MOVING_WRITE_BUFFER
            | SslMode::ENABLE_PARTIAL_WRITE
            | SslMode::RELEASE_BUFFERS,
    );
    b.set_cipher_list("DEFAULT:!aNULL:!eNULL:!MD5:!3DES:!DES:!RC4:!IDEA:!SEED:!aDSS:!SRP:!PSK")
        .context("setting up TLS")?;
    b.set_verify(SslVerifyMode::PEER);
    match ca_file {
        Some(ca) => {
            let pem =
                std::fs::read(ca).with_context(|| format!("reading ca_file {}", ca.display()))?;
            let certs = X509::stack_from_pem(&pem)
                .with_context(|| format!("parsing ca_file {}", ca.display()))?;
            if certs.is_empty() {
                return Err(anyhow!(
                    "ca_file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                    ca.display()
                ));
            }
            let mut store = X509StoreBuilder::new().context("setting up TLS")?;
            // Every certificate of the file is an anchor, as in curl: the
            // server's own certificate, or an intermediate CA's, may be
            // given without the root above it. (Before, the system's roots
            // stood behind the file and could complete such a chain.)
            store
                .set_flags(X509VerifyFlags::PARTIAL_CHAIN)
                .context("setting up TLS")?;
            for cert in certs {
                store
                    .add_cert(cert)
                    .with_context(|| format!("adding a certificate of {}", ca.display()))?;
            }
            b.set_cert_store(store.build());
        }
        None => b
            .set_default_verify_paths()
            .context("loading the system's trusted certificates")?,
    }
    Ok(b.build())
}

/// A TLS handshake that failed, with why the certificate was refused when
/// it was (OpenSSL's error alone says only "certificate verify failed").
#[derive(Debug, thiserror::Error)]
#[error("{error}{}", .verify.as_ref().map(|v| format!(" ({v})")).unwrap_or_default())]
pub struct HandshakeFailed {
    error: openssl::ssl::Error,
    verify: Option<String>,
}

/// The handshake with `host` (a name or an address literal) over
/// `stream`: SNI for a name, and the certificate checked against the name
/// or the address, no partial wildcards, as the openssl crate's
/// `SslConnector` does.
pub async fn handshake<S: Io>(
    account: &Account,
    host: &str,
    peer: &str,
    stream: S,
) -> Result<tokio_openssl::SslStream<S>> {
    let ctx = context(account.ca_file.as_deref()).await?;
    let mut ssl = Ssl::new(&ctx).context("setting up TLS")?;
    let ip = host.parse::<IpAddr>().ok();
    if ip.is_none() {
        ssl.set_hostname(host).context("setting up TLS (SNI)")?;
    }
    let param = ssl.param_mut();
    param.set_hostflags(X509CheckFlags::NO_PARTIAL_WILDCARDS);
    match ip {
        Some(ip) => param.set_ip(ip),
        None => param.set_host(host),
    }
    .context("setting up TLS (the name to check)")?;
    let mut tls = tokio_openssl::SslStream::new(ssl, stream).context("setting up TLS")?;
    let done = timed(peer, account.imap_timeout, async {
        Pin::new(&mut tls).connect().await.map_err(|error| {
            let v = tls.ssl().verify_result();
            HandshakeFailed {
                error,
                verify: (v != X509VerifyResult::OK).then(|| v.error_string().to_string()),
            }
        })
    })
    .await;
    done.with_context(|| format!("TLS handshake with {peer}"))?;
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_ca_file_gets_a_new_context() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "one").unwrap();
        let first = cell(Some(&ca));
        first
            .set(
                SslContextBuilder::new(SslMethod::tls_client())
                    .unwrap()
                    .build(),
            )
            .unwrap();
        assert!(
            Arc::ptr_eq(&first, &cell(Some(&ca))),
            "unchanged: the same context"
        );
        std::fs::write(&ca, "two, longer").unwrap();
        let second = cell(Some(&ca));
        assert!(
            !Arc::ptr_eq(&first, &second),
            "changed: a context to build anew"
        );
        assert!(!second.initialized());
    }

    #[test]
    fn a_ca_file_without_certificates_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let e = build(Some(&ca)).unwrap_err();
        assert!(
            format!("{e:#}").contains("holds no PEM certificate"),
            "{e:#}"
        );
        let e = build(Some(&dir.path().join("missing.pem"))).unwrap_err();
        assert!(format!("{e:#}").contains("reading ca_file"), "{e:#}");
    }
}
