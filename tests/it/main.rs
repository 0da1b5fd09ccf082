//! Integration tests: imapull as a binary against a real Dovecot and a real
//! Postfix (see harness.rs), and scripted servers for faults (fake.rs).
//! One test binary, so the servers start once.

mod fake;
mod harness;
mod provider;

mod alerts;
mod compress;
mod daemon;
mod faults;
mod imap_faults;
mod kill;
mod metrics;
mod oauth2;
mod oauth2_builtin;
mod ops;
mod pull;
mod purge;
mod systemd;
mod transport;
