//! `imapull baseline`: the watermark set to the server's UIDNEXT without
//! delivering anything, for people who move from fetchmail or getmail and
//! whose old mail was pulled already. Holds the account's lock, as a run
//! does; reads the mailbox with EXAMINE.

use std::io::Write;

use anyhow::Result;

use crate::config::{Account, Config};
use crate::imap::Imap;
use crate::ledger::{LedgerHandle, MailboxLedger};

/// Baselines `mailbox` (all the account's when None); prints what it did.
pub async fn baseline(
    out: &mut impl Write,
    config: &Config,
    a: &Account,
    mailbox: Option<&str>,
    now: i64,
) -> Result<()> {
    let names: Vec<&str> = match mailbox {
        Some(m) if a.mailboxes.iter().any(|c| c.name == m) => vec![m],
        Some(m) => {
            return Err(crate::UnknownMailbox {
                account: a.name.clone(),
                name: m.to_string(),
                known: a
                    .mailboxes
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
            .into())
        }
        None => a.mailboxes.iter().map(|c| c.name.as_str()).collect(),
    };
    let _lock = crate::lock::try_lock(&config.ledger, &a.name)?;
    let ledger = LedgerHandle::new(crate::ledger::Ledger::open(&config.ledger)?);
    let mut imap = Imap::connect(a).await?;
    for name in names {
        let sel = imap.examine(name).await?;
        let mb = MailboxLedger::new(&ledger, &a.name, name);
        let before = mb.state().await?;
        mb.epoch(sel.uidvalidity)
            .start(sel.uidnext, sel.uidnext, now)
            .await?;
        let was = match before {
            None => "first contact".to_string(),
            Some(s) if s.uidvalidity != sel.uidvalidity => {
                format!(
                    "was UIDVALIDITY {}, watermark {}",
                    s.uidvalidity, s.watermark
                )
            }
            Some(s) => format!("was {}", s.watermark),
        };
        writeln!(
            out,
            "{}/{name}: watermark set to UIDNEXT {} (UIDVALIDITY {}; {was}); the {} message(s) \
             there now are not delivered, mail from now on is",
            a.name, sel.uidnext, sel.uidvalidity, sel.exists
        )?;
    }
    imap.logout().await;
    Ok(())
}
