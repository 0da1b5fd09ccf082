//! The command line: arguments, logging, exit codes. Everything else is in
//! the library.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use imapull::config::{default_config_path, Config};
use imapull::exit;

#[derive(Parser)]
#[command(
    name = "imapull",
    version,
    about = "Pull mail from IMAP mailboxes into a local SMTP/LMTP server"
)]
struct Cli {
    /// The configuration file (default: $IMAPULL_CONFIG, then
    /// /etc/imapull/imapull.toml as root, else ~/.config/imapull/imapull.toml).
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
    /// More output: -v debug, -vv trace (protocol lines; never passwords).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Write metrics (OpenMetrics text) to this file after each run, or
    /// after each round of passes in the daemon, atomically: for
    /// node_exporter's textfile collector.
    #[arg(long, global = true, value_name = "PATH")]
    metrics_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Import {
    /// PullIMAP's SECTION (its INI config and statefile) as an account of
    /// this configuration (--config; created if missing), with its ledger
    /// state: the first run delivers what PullIMAP would have next.
    Pullimap {
        /// The section of PullIMAP's config.
        section: String,
        /// PullIMAP's config file (default: PullIMAP's own,
        /// $XDG_CONFIG_HOME/pullimap/config).
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
        /// PullIMAP's statefile (default: what its config says).
        #[arg(long, value_name = "FILE")]
        statefile: Option<PathBuf>,
        /// The account's name here (default: the section's).
        #[arg(long)]
        account: Option<String>,
        /// Where to deliver, when PullIMAP's config has no deliver-rcpt.
        #[arg(long)]
        recipient: Option<String>,
    },
}

#[derive(Subcommand)]
enum OAuth2 {
    /// The first authorisation of an account with an `oauth2` table, or a
    /// new one when the provider refused its refresh token: prints a URL
    /// (and for the device flow, a code) to open in a browser on any
    /// machine, waits, and writes the token file.
    Authorize {
        account: String,
        /// The loopback port the provider sends the browser back to, for
        /// the authorisation-code flow (Google); any free one when not
        /// given. Fix it to forward it over SSH before you start.
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// How long to wait for the browser.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
}

#[derive(Subcommand)]
enum Quarantine {
    /// The quarantined messages, oldest first, with the IDs the other
    /// actions take.
    List {
        /// Only this account.
        account: Option<String>,
    },
    /// Try these again at the account's next pass (a running daemon is
    /// woken to do it now).
    Retry {
        /// IDs from `quarantine list`.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<i64>,
        /// Every quarantined message (of --account, if given).
        #[arg(long)]
        all: bool,
        /// With --all: only this account.
        #[arg(long, requires = "all")]
        account: Option<String>,
    },
    /// Stop trying these; retention (purge_after) then removes them from
    /// the server like delivered mail.
    Drop {
        /// IDs from `quarantine list`.
        #[arg(required = true)]
        ids: Vec<i64>,
    },
}

#[derive(Subcommand)]
enum Command {
    /// One pass over every configured account (or the ones named), then exit.
    Run {
        /// Account names from the config; all when none is given.
        accounts: Vec<String>,
    },
    /// Watch every configured mailbox and deliver new mail as it arrives
    /// (IMAP IDLE). SIGTERM/SIGINT stop, SIGHUP reloads the config,
    /// SIGUSR1 pulls everything now.
    Daemon,
    /// How each account and mailbox is doing, from the ledger: last pass,
    /// deliveries, deferred and quarantined mail, retention, last error,
    /// and whether a daemon or run holds it now. Safe while the daemon runs.
    Status {
        /// Account names from the config; all when none is given.
        accounts: Vec<String>,
        /// Exact and stable JSON (schema in docs/operations.md).
        #[arg(long)]
        json: bool,
        /// One line per message imapull has acted on instead.
        #[arg(long)]
        messages: bool,
        /// With --messages: only messages in this state (delivered,
        /// deferred, rejected, skipped, vanished).
        #[arg(long, requires = "messages")]
        state: Option<String>,
    },
    /// Compare each mailbox on the server with the ledger, changing
    /// nothing: exit 0 when they agree (a health check for a timer).
    Verify {
        /// Account names from the config; all when none is given.
        accounts: Vec<String>,
        /// Exact and stable JSON (schema in docs/operations.md).
        #[arg(long)]
        json: bool,
    },
    /// Set the watermark to the server's UIDNEXT without delivering: the
    /// mail there now is left alone, what comes later is pulled (for a move
    /// from fetchmail or getmail).
    Baseline {
        account: String,
        /// Only this mailbox; all of the account's when not given.
        mailbox: Option<String>,
    },
    /// Bring an account over from another tool.
    Import {
        #[command(subcommand)]
        from: Import,
    },
    /// The messages the local server rejected (5xx), kept on the remote
    /// server until you decide.
    Quarantine {
        #[command(subcommand)]
        action: Quarantine,
    },
    /// OAuth2 (accounts with an `oauth2` table).
    #[command(name = "oauth2")]
    OAuth2 {
        #[command(subcommand)]
        action: OAuth2,
    },
    /// Remove remote copies whose retention (purge_after) has passed, now.
    Purge {
        /// Account names from the config; all when none is given.
        accounts: Vec<String>,
        /// Only list what would be removed (from the ledger); touch nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check the configuration, then each account: log in (nothing fetched
    /// or flagged), the capabilities that matter, the mailboxes, and a
    /// session with the local server (no mail sent). Non-zero on any
    /// failure.
    Check {
        /// Account names from the config; all when none is given.
        accounts: Vec<String>,
    },
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    init_logging(cli.verbose, cli.quiet);
    {
        use std::io::IsTerminal as _;
        // A bar only for a one-shot run a person watches.
        if matches!(cli.command, Command::Run { .. })
            && !cli.quiet
            && std::io::stderr().is_terminal()
            && std::env::var_os("JOURNAL_STREAM").is_none()
        {
            imapull::progress::enable();
        }
    }
    std::process::exit(real_main(cli));
}

fn init_logging(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let level = match (quiet, verbose) {
        (true, _) => "warn",
        (_, 0) => "info",
        (_, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("IMAPULL_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    // Under systemd the journal adds its own timestamps.
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    use std::io::IsTerminal as _;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(|| LogWriter)
        .with_target(false);
    if under_journal {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

/// stderr, with the progress bars out of the way of each line.
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        imapull::progress::suspend(|| std::io::stderr().write(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn real_main(cli: Cli) -> i32 {
    let Some(path) = cli.config.or_else(default_config_path) else {
        eprintln!("imapull: no configuration file: use --config FILE or set IMAPULL_CONFIG");
        return exit::CONFIG;
    };
    // The one command that may create the configuration.
    if let Command::Import {
        from:
            Import::Pullimap {
                section,
                from,
                statefile,
                account,
                recipient,
            },
    } = &cli.command
    {
        use imapull::ops::import;
        let from = from.clone().unwrap_or_else(import::default_pullimap_config);
        let r = import::Request {
            config: &path,
            from: &from,
            statefile: statefile.as_deref(),
            section,
            account: account.as_deref(),
            recipient: recipient.as_deref(),
        };
        let mut out = std::io::stdout().lock();
        return finish(import::import(&mut out, &r, imapull::system_now()).map(|()| exit::OK));
    }
    let config = match Config::load(&path) {
        Ok(mut c) => {
            c.metrics_file = cli.metrics_file.clone();
            c
        }
        Err(e) => {
            eprintln!("imapull: {e}");
            return exit::CONFIG;
        }
    };
    // One thread, which looks at the sockets after every task it runs
    // (tokio's default is after 61). A run's passes and the daemon's tasks
    // wait on round trips, and each small message waits for the local
    // server's reply: noticing it at once matters more than a second core.
    // Measured on 2 cores with the servers beside imapull (see
    // docs/performance.md, "One thread"): against one worker thread (which
    // beat two), up to 30 % more small messages a second and as many large
    // ones, with less CPU; with the default interval it lost 16 % on small
    // messages. One core is plenty:
    // a realistic message costs imapull about 0.4 ms of CPU, a fraction of
    // what the local server spends on it.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .event_interval(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("imapull: cannot start the runtime: {e}");
            return exit::SOFTWARE;
        }
    };
    let mode = match cli.command {
        Command::Purge { .. } => imapull::Mode::Purge,
        _ => imapull::Mode::Pull,
    };
    match cli.command {
        Command::Check { accounts } => {
            if let Err(e) = imapull::check_accounts(&config, &accounts) {
                eprintln!("imapull: {e:#}");
                return exit::for_error(&e, exit::USAGE);
            }
            println!("{}: the configuration is valid", path.display());
            let chosen: Vec<&imapull::config::Account> = config
                .accounts
                .iter()
                .filter(|a| accounts.is_empty() || accounts.contains(&a.name))
                .collect();
            let mut out = std::io::stdout().lock();
            let parallel = config.parallel_accounts;
            rt.block_on(imapull::ops::check::check_all(&mut out, &chosen, parallel))
        }
        Command::Status {
            accounts,
            json,
            messages,
            state,
        } => finish(status(&config, &accounts, json, messages, state.as_deref())),
        Command::Quarantine { action } => finish(quarantine(&config, action)),
        Command::Import { .. } => unreachable!("handled before the configuration is loaded"),
        Command::Verify { accounts, json } => finish(rt.block_on(verify(&config, &accounts, json))),
        Command::Baseline { account, mailbox } => finish(rt.block_on(async {
            imapull::check_accounts(&config, std::slice::from_ref(&account))?;
            let a = config.account(&account).expect("checked");
            let mut out = std::io::stdout().lock();
            let now = imapull::system_now();
            imapull::ops::baseline::baseline(&mut out, &config, a, mailbox.as_deref(), now).await?;
            Ok(exit::OK)
        })),
        Command::OAuth2 {
            action:
                OAuth2::Authorize {
                    account,
                    port,
                    wait,
                },
        } => finish(rt.block_on(async {
            imapull::check_accounts(&config, std::slice::from_ref(&account))?;
            let a = config.account(&account).expect("checked");
            let imapull::config::Auth::OAuth2 {
                source: imapull::config::TokenSource::Builtin(o),
                ..
            } = &a.auth
            else {
                anyhow::bail!(
                    "the account {account} has no `oauth2` table in {}: nothing to authorise \
                     (an oauth2_token_command's helper has its own way)",
                    config.path.display()
                );
            };
            let opts = imapull::oauth::authorize::Options { port, wait };
            let mut out = std::io::stdout();
            match imapull::oauth::authorize::authorize(&mut out, a, o, &opts).await {
                Ok(()) => Ok(exit::OK),
                // Declined, timed out, refused: not authorised (EX_NOPERM).
                Err(e) => {
                    eprintln!("imapull: {e:#}");
                    Ok(exit::for_error(&e, exit::NOPERM))
                }
            }
        })),
        Command::Daemon => rt.block_on(daemon(path, config)),
        Command::Purge {
            accounts,
            dry_run: true,
        } => match rt.block_on(dry_run(&config, &accounts)) {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("imapull: {e:#}");
                exit::for_error(&e, exit::SOFTWARE)
            }
        },
        Command::Run { accounts } | Command::Purge { accounts, .. } => {
            let now: imapull::Clock = Arc::new(imapull::system_now);
            match rt.block_on(imapull::run_accounts(&config, &accounts, now, mode)) {
                Ok(results) => imapull::run_exit_code(&results),
                Err(e) => {
                    eprintln!("imapull: {e:#}");
                    exit::for_error(&e, exit::SOFTWARE)
                }
            }
        }
    }
}

/// Runs the daemon with the process's signals turned into controls.
async fn daemon(path: PathBuf, config: Config) -> i32 {
    use imapull::daemon::Control;
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let streams = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined1()),
    );
    let (Ok(mut term), Ok(mut int), Ok(mut hup), Ok(mut usr1)) = streams else {
        eprintln!("imapull: cannot install signal handlers");
        return exit::SOFTWARE;
    };
    tokio::spawn(async move {
        let mut stops = 0;
        loop {
            let ctl = tokio::select! {
                _ = term.recv() => Control::Stop,
                _ = int.recv() => Control::Stop,
                _ = hup.recv() => Control::Reload,
                _ = usr1.recv() => Control::PullNow,
            };
            if ctl == Control::Stop {
                stops += 1;
                if stops > 1 {
                    // A second SIGTERM: no more waiting. The ledger is
                    // consistent at every commit, so this loses nothing.
                    tracing::warn!("second stop signal: exiting now");
                    std::process::exit(exit::OK);
                }
            }
            if tx.send(ctl).await.is_err() {
                return;
            }
        }
    });
    let now: imapull::Clock = Arc::new(imapull::system_now);
    match imapull::daemon::run_daemon(path, config, rx, now).await {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("imapull: {e:#}");
            exit::for_error(&e, exit::SOFTWARE)
        }
    }
}

/// `imapull purge --dry-run`: the plan of every mailbox with a retention,
/// from the ledger alone (no connection, no lock).
async fn dry_run(config: &Config, only: &[String]) -> anyhow::Result<()> {
    imapull::check_accounts(config, only)?;
    let ledger = imapull::ledger::LedgerHandle::new(imapull::ledger::Ledger::open(&config.ledger)?);
    let now = imapull::system_now();
    for a in config
        .accounts
        .iter()
        .filter(|a| only.is_empty() || only.contains(&a.name))
    {
        for (mailbox, plan) in imapull::purge::dry_run(a, &ledger, now).await? {
            println!(
                "{} {}: {} to remove{}",
                a.name,
                mailbox,
                plan.due.len(),
                if plan.postponed > 0 {
                    format!(", {} more postponed by purge_max", plan.postponed)
                } else {
                    String::new()
                }
            );
            for d in plan.due {
                println!(
                    "  uid {:>7}  delivered {} ago  {}",
                    d.uid,
                    humantime::format_duration(std::time::Duration::from_secs(d.age.max(0) as u64)),
                    d.message_id.as_deref().unwrap_or("(no Message-ID)")
                );
            }
        }
    }
    println!("dry run: nothing was removed");
    Ok(())
}

/// The exit code of a command that only reads or marks the ledger.
fn finish(r: anyhow::Result<i32>) -> i32 {
    r.unwrap_or_else(|e| {
        eprintln!("imapull: {e:#}");
        exit::for_error(&e, exit::SOFTWARE)
    })
}

fn status(
    config: &Config,
    accounts: &[String],
    json: bool,
    messages: bool,
    state: Option<&str>,
) -> anyhow::Result<i32> {
    use std::io::Write as _;
    imapull::check_accounts(config, accounts)?;
    let ledger = imapull::ledger::Ledger::open(&config.ledger)?;
    let mut out = std::io::stdout().lock();
    let now = imapull::system_now();
    // A closed pipe (`imapull status | head`) ends the listing quietly.
    if messages {
        let state = match state {
            None => None,
            Some(s) => Some(
                imapull::ledger::State::parse(s)
                    .ok_or_else(|| imapull::UnknownState(s.to_string()))?,
            ),
        };
        let rows: Vec<imapull::ledger::Row> = ledger
            .rows(None)?
            .into_iter()
            .filter(|r| accounts.is_empty() || accounts.contains(&r.account))
            .filter(|r| state.is_none_or(|s| r.state() == Some(s)))
            .collect();
        let _ = print_rows(&mut out, &rows);
    } else {
        let report = imapull::ops::status::gather(config, &ledger, accounts, now)?;
        if json {
            let _ = serde_json::to_writer_pretty(&mut out, &report);
            let _ = writeln!(out);
        } else {
            let _ = imapull::ops::status::print(&mut out, &report, now);
        }
    }
    let _ = out.flush();
    Ok(exit::OK)
}

async fn verify(config: &Config, accounts: &[String], json: bool) -> anyhow::Result<i32> {
    use imapull::ops::verify;
    use std::io::Write as _;
    imapull::check_accounts(config, accounts)?;
    let ledger = imapull::ledger::LedgerHandle::new(imapull::ledger::Ledger::open(&config.ledger)?);
    let now = imapull::system_now();
    let chosen = config
        .accounts
        .iter()
        .filter(|a| accounts.is_empty() || accounts.contains(&a.name));
    // As many servers at once as `run` talks to, in the config's order.
    use futures_util::StreamExt as _;
    let verdicts: Vec<verify::AccountVerdict> =
        futures_util::stream::iter(chosen.map(|a| verify::verify(a, &ledger, now)))
            .buffered(config.parallel_accounts)
            .collect()
            .await;
    let mut out = std::io::stdout().lock();
    if json {
        let doc = serde_json::json!({ "schema": 1, "accounts": verdicts });
        let _ = serde_json::to_writer_pretty(&mut out, &doc);
        let _ = writeln!(out);
    } else {
        let _ = verify::print(&mut out, &verdicts);
    }
    Ok(verify::exit_code(&verdicts))
}

fn quarantine(config: &Config, action: Quarantine) -> anyhow::Result<i32> {
    use imapull::ledger::Which;
    use imapull::ops::quarantine as q;
    let mut ledger = imapull::ledger::Ledger::open(&config.ledger)?;
    let mut out = std::io::stdout().lock();
    let now = imapull::system_now();
    let (asked, done) = match action {
        Quarantine::List { account } => {
            imapull::check_accounts(config, account.as_slice())?;
            let _ = q::print_list(&mut out, &ledger.quarantined(account.as_deref())?);
            return Ok(exit::OK);
        }
        Quarantine::Retry {
            all: true, account, ..
        } => {
            imapull::check_accounts(config, account.as_slice())?;
            let which = Which::All(account.as_deref());
            (None, q::retry(&mut out, config, &mut ledger, &which, now)?)
        }
        Quarantine::Retry { ids, .. } => {
            let done = q::retry(&mut out, config, &mut ledger, &Which::Ids(&ids), now)?;
            (Some(ids.len()), done)
        }
        Quarantine::Drop { ids } => {
            let done = q::drop(&mut out, config, &mut ledger, &Which::Ids(&ids), now)?;
            (Some(ids.len()), done)
        }
    };
    // An ID that was not in the quarantine is the caller's mistake.
    Ok(if asked.is_some_and(|n| n > done) {
        exit::DATAERR
    } else {
        exit::OK
    })
}

fn print_rows(out: &mut impl std::io::Write, rows: &[imapull::ledger::Row]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>6} {:<12} {:<16} {:>10} {:>7} {:<10} {:>3} reply / Message-ID",
        "ID", "account", "mailbox", "uidvalid", "uid", "state", "try"
    )?;
    for r in rows {
        writeln!(
            out,
            "{:>6} {:<12} {:<16} {:>10} {:>7} {:<10} {:>3} {} {}",
            r.id,
            r.account,
            r.mailbox,
            r.uidvalidity,
            r.uid,
            r.state,
            r.attempts,
            r.last_reply.as_deref().unwrap_or("-"),
            r.message_id.as_deref().unwrap_or("")
        )?;
    }
    Ok(())
}
