//! The operator's commands: what is working and what is stuck, without
//! opening SQLite. Each reads the ledger (and, for `check` and `verify`,
//! the servers) and changes only what its name says.

pub mod baseline;
pub mod check;
pub mod import;
pub mod quarantine;
pub mod status;
pub mod verify;
