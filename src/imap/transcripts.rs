//! Transcript tests of the IMAP client: what the server sends, byte for
//! byte, over an in-memory stream, and what imapull must make of it.
//!
//! Each command has one clean exchange. From it the tests derive the
//! variants a real server produces on its own schedule: every oddity in
//! [`ODDITIES`] inserted before every line the server sends, the tagged OK
//! turned into NO or BAD, a BYE, and the connection closing after each
//! line. The result must be the clean one for the first kind, and an
//! error, never an empty result, for the others.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use super::connect::{establish, Transport};
use super::*;
use crate::net::IdleTimeout;

/// What real servers send unasked: extensions, progress lines, flag
/// changes after a STORE .SILENT, mailbox size changes, unknown codes.
const ODDITIES: &[&str] = &[
    "* XFOO 17 (something new) \"x\"\r\n",
    "* OK Searched 91% of the mailbox, ETA 0:01\r\n",
    "* 3 FETCH (FLAGS (\\Seen))\r\n",
    "* 9 EXISTS\r\n",
    "* 1 RECENT\r\n",
    "* 2 EXPUNGE\r\n",
    "* OK [MYRIGHTS \"acdilrsw\"] rights\r\n",
    "* OK [HIGHESTMODSEQ 123456] modseq\r\n",
    "* OK [X-SOMETHING (a b) \"c\"] who knows\r\n",
    "* NO [ALERT] the disk is nearly full\r\n",
    "* XLITERAL {5}\r\nab\r\nc\r\n",
];

fn account(extra: &str) -> Account {
    let text = format!(
        "[accounts.t]\nhost = \"127.0.0.1\"\ntls = \"none\"\nusername = \"u\"\npassword = \"p\\\"w\"\n\
         deliver = \"smtp://127.0.0.1:25\"\nrecipients = [\"me@example.org\"]\n{extra}"
    );
    crate::config::one_account(&text)
}

/// One exchange as the server plays it: for each command line it expects
/// (compared without the tag), the bytes it answers with (`$T` is the tag).
/// `close_after`: the server hangs up after that many answer lines.
#[derive(Clone)]
struct Exchange {
    expect: Vec<String>,
    answer: Vec<Vec<String>>,
}

/// Plays `ex` on its end of a duplex stream; returns the command lines seen.
async fn serve(
    io: tokio::io::DuplexStream,
    greeting: &'static str,
    ex: Exchange,
    close_after: Option<usize>,
) -> Vec<String> {
    let (r, mut w) = tokio::io::split(io);
    let mut r = BufReader::new(r);
    let mut seen = Vec::new();
    let mut sent = 0usize;
    if w.write_all(greeting.as_bytes()).await.is_err() {
        return seen;
    }
    for (expect, answer) in ex.expect.iter().zip(&ex.answer) {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return seen;
        }
        let line = line.trim_end().to_string();
        let (tag, rest) = line.split_once(' ').unwrap_or((&line, ""));
        assert_eq!(rest, expect, "the client sent {line:?}");
        seen.push(line.clone());
        for a in answer {
            if close_after == Some(sent) {
                return seen;
            }
            sent += 1;
            let _ = w.write_all(a.replace("$T", tag).as_bytes()).await;
            if a.starts_with("* BYE") || (a.starts_with('+') && close_after == Some(sent)) {
                return seen;
            }
            if a.starts_with('+') {
                // A continuation: the client's next line answers it.
                let mut more = String::new();
                if r.read_line(&mut more).await.unwrap_or(0) == 0 {
                    return seen;
                }
                seen.push(more.trim_end().to_string());
            }
        }
    }
    // Wait for the client to finish (or hang up).
    let mut rest = String::new();
    let _ = r.read_line(&mut rest).await;
    seen
}

/// A transport over an in-memory stream.
fn over(io: impl crate::net::Io + 'static) -> Transport {
    Transport {
        io: Box::new(io),
        peer: "test".into(),
        tunnel: None,
        wire: WireStats::default(),
        tls_done: None,
    }
}

/// A hand-scripted server's start of an IDLE: greet (PREAUTH), read the
/// IDLE, say "+". Returns the stream's halves and the IDLE's tag.
async fn idle_started(
    b: tokio::io::DuplexStream,
) -> (
    BufReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>,
    tokio::io::WriteHalf<tokio::io::DuplexStream>,
    String,
) {
    let (r, mut w) = tokio::io::split(b);
    let mut r = BufReader::new(r);
    w.write_all(PREAUTH.as_bytes()).await.unwrap();
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    let tag = line.split(' ').next().unwrap().to_string();
    w.write_all(b"+ idling\r\n").await.unwrap();
    (r, w, tag)
}

/// An `Imap` logged in over a duplex stream: the greeting is PREAUTH with
/// capabilities, so no command precedes the one under test.
async fn session(io: tokio::io::DuplexStream) -> Imap {
    let t = over(IdleTimeout::new(io, Duration::from_secs(5)));
    match establish(&account("compress = false"), t, true).await {
        Ok(i) => i,
        Err(e) => panic!("{e}"),
    }
}

const PREAUTH: &str = "* PREAUTH [CAPABILITY IMAP4rev1 UIDPLUS MOVE IDLE] ready\r\n";

/// A command under test, and what it returned, as text for comparison.
#[derive(Clone, Copy, Debug)]
enum Cmd {
    Select,
    SelectDiscovering,
    Search,
    Discover,
    FetchBodies,
    Sizes,
    Store,
    UidExpunge,
    Expunge,
    Move,
    List,
    ListAll,
    Examine,
    Noop,
}

impl Cmd {
    fn clean(self) -> (Exchange, &'static str) {
        let ex = |expect: &str, answer: &[&str]| Exchange {
            expect: vec![expect.to_string()],
            answer: vec![answer.iter().map(|s| s.to_string()).collect()],
        };
        match self {
            Cmd::Select => (
                ex(
                    "SELECT \"INBOX\"",
                    &[
                        "* 3 EXISTS\r\n",
                        "* OK [UIDVALIDITY 42] v\r\n",
                        "* OK [UIDNEXT 8] n\r\n",
                        "* FLAGS (\\Seen)\r\n",
                        "$T OK [READ-WRITE] done\r\n",
                    ],
                ),
                "Selected { uidvalidity: 42, uidnext: 8, exists: 3 }",
            ),
            Cmd::SelectDiscovering => {
                let (select, _) = Cmd::Select.clean();
                let (discover, _) = Cmd::Discover.clean();
                (
                    Exchange {
                        expect: [select.expect, discover.expect].concat(),
                        answer: [select.answer, discover.answer].concat(),
                    },
                    "Selected { uidvalidity: 42, uidnext: 8, exists: 3 } \
                     ({5, 6, 7}, [(5, 100), (6, 7)])",
                )
            }
            Cmd::Search => (
                ex(
                    "UID SEARCH UID 5:*",
                    &["* SEARCH 5 6 7\r\n", "$T OK done\r\n"],
                ),
                "{5, 6, 7}",
            ),
            Cmd::Discover => (
                ex(
                    "UID FETCH 5:* (UID RFC822.SIZE)",
                    &[
                        "* 1 FETCH (UID 5 RFC822.SIZE 100)\r\n",
                        "* 2 FETCH (RFC822.SIZE 7 UID 6)\r\n",
                        "* 3 FETCH (UID 7)\r\n",
                        "$T OK done\r\n",
                    ],
                ),
                "({5, 6, 7}, [(5, 100), (6, 7)])",
            ),
            Cmd::FetchBodies => (
                ex(
                    "UID FETCH 5:6 (UID RFC822.SIZE INTERNALDATE FLAGS BODY.PEEK[])",
                    &[
                        "* 1 FETCH (UID 5 RFC822.SIZE 4 FLAGS () BODY[] {4}\r\nab\r\n)\r\n",
                        "* 2 FETCH (UID 6 BODY[] {2}\r\nxy FLAGS (\\Seen))\r\n",
                        "$T OK done\r\n",
                    ],
                ),
                "[(5, \"ab\\r\\n\"), (6, \"xy\")]",
            ),
            Cmd::Sizes => (
                ex(
                    "UID FETCH 5:6 (UID RFC822.SIZE)",
                    &[
                        "* 1 FETCH (UID 5 RFC822.SIZE 100)\r\n",
                        "* 2 FETCH (RFC822.SIZE 7 UID 6)\r\n",
                        "$T OK done\r\n",
                    ],
                ),
                "[(5, 100), (6, 7)]",
            ),
            Cmd::Store => (
                ex(
                    "UID STORE 5:6 +FLAGS.SILENT (\\Seen)",
                    &["* 1 FETCH (UID 5 FLAGS (\\Seen))\r\n", "$T OK done\r\n"],
                ),
                "()",
            ),
            Cmd::UidExpunge => (
                ex("UID EXPUNGE 5", &["* 1 EXPUNGE\r\n", "$T OK done\r\n"]),
                "()",
            ),
            Cmd::Expunge => (ex("EXPUNGE", &["* 1 EXPUNGE\r\n", "$T OK done\r\n"]), "()"),
            Cmd::Move => (
                ex(
                    "UID MOVE 5 \"Trash\"",
                    &[
                        "* OK [COPYUID 9 5 1] moved\r\n",
                        "* 1 EXPUNGE\r\n",
                        "$T OK done\r\n",
                    ],
                ),
                "()",
            ),
            Cmd::List => (
                ex(
                    "LIST \"\" \"*\"",
                    &[
                        "* LIST (\\HasNoChildren) \"/\" INBOX\r\n",
                        "* LIST (\\HasNoChildren \\Trash) \"/\" \"Bin\"\r\n",
                        "$T OK done\r\n",
                    ],
                ),
                "Some(\"Bin\")",
            ),
            Cmd::ListAll => (
                ex(
                    "LIST \"\" \"*\"",
                    &[
                        "* LIST (\\HasNoChildren) \"/\" INBOX\r\n",
                        "* LIST (\\HasNoChildren) \"/\" \"Entw&APw-rfe\"\r\n",
                        "$T OK done\r\n",
                    ],
                ),
                "[\"INBOX\", \"Entwürfe\"]",
            ),
            Cmd::Examine => (
                ex(
                    "EXAMINE \"INBOX\"",
                    &[
                        "* 3 EXISTS\r\n",
                        "* OK [UIDVALIDITY 42] v\r\n",
                        "* OK [UIDNEXT 8] n\r\n",
                        "$T OK [READ-ONLY] done\r\n",
                    ],
                ),
                "Selected { uidvalidity: 42, uidnext: 8, exists: 3 }",
            ),
            Cmd::Noop => (ex("NOOP", &["$T OK done\r\n"]), "()"),
        }
    }

    async fn exec(self, imap: &mut Imap) -> Result<String> {
        Ok(match self {
            Cmd::Select => format!("{:?}", imap.select("INBOX").await?),
            Cmd::Search => format!("{:?}", imap.search("UID 5:*").await?),
            Cmd::SelectDiscovering => {
                let (sel, d) = imap.select_discovering("INBOX", Some(5)).await?;
                let d = d.expect("a first SELECT takes the discovery along")?;
                format!("{sel:?} {}", discovered(d))
            }
            Cmd::Discover => discovered(imap.discover(5).await?),
            Cmd::FetchBodies => {
                let mut got = Vec::new();
                let mut s = imap.fetch("5:6", FETCH_ITEMS).await?;
                while let Some(f) = s.next().await? {
                    if let (Some(u), Some(b)) = (f.uid, f.body()) {
                        got.push((u, String::from_utf8_lossy(b).into_owned()));
                    }
                }
                format!("{got:?}")
            }
            Cmd::Sizes => {
                let mut s: Vec<(u32, u64)> = imap.sizes(&[5, 6]).await?.into_iter().collect();
                s.sort_unstable();
                format!("{s:?}")
            }
            Cmd::Store => format!("{:?}", imap.add_seen(&[5, 6]).await?),
            Cmd::UidExpunge => format!("{:?}", imap.uid_expunge(&[5]).await?),
            Cmd::Expunge => format!("{:?}", imap.expunge_all_deleted().await?),
            Cmd::Move => format!("{:?}", imap.uid_move(&[5], "Trash").await?),
            Cmd::List => format!("{:?}", imap.trash_mailbox().await?),
            Cmd::ListAll => {
                let names: Vec<String> = imap.list().await?.into_iter().map(|m| m.name).collect();
                format!("{names:?}")
            }
            Cmd::Examine => format!("{:?}", imap.examine("INBOX").await?),
            Cmd::Noop => format!("{:?}", imap.noop().await?),
        })
    }
}

/// A discovery's result as text, its sizes sorted.
fn discovered((found, sizes): Discovery) -> String {
    let mut sizes: Vec<(u32, u64)> = sizes.into_iter().collect();
    sizes.sort_unstable();
    format!("({found:?}, {sizes:?})")
}

const ALL: &[Cmd] = &[
    Cmd::Select,
    Cmd::SelectDiscovering,
    Cmd::Search,
    Cmd::Discover,
    Cmd::FetchBodies,
    Cmd::Sizes,
    Cmd::Store,
    Cmd::UidExpunge,
    Cmd::Expunge,
    Cmd::Move,
    Cmd::List,
    Cmd::ListAll,
    Cmd::Examine,
    Cmd::Noop,
];

/// Runs `cmd` against `ex` on a fresh session; returns what it returned.
async fn run(cmd: Cmd, ex: Exchange, close_after: Option<usize>) -> Result<String> {
    let (a, b) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(serve(b, PREAUTH, ex, close_after));
    let mut imap = session(a).await;
    let r = tokio::time::timeout(Duration::from_secs(10), cmd.exec(&mut imap))
        .await
        .expect("the client hung");
    drop(imap);
    let _ = server.await;
    r
}

#[tokio::test]
async fn every_command_clean() {
    for &cmd in ALL {
        let (ex, want) = cmd.clean();
        assert_eq!(run(cmd, ex, None).await.unwrap(), want, "{cmd:?}");
    }
}

#[tokio::test]
async fn every_oddity_before_every_line_is_ignored() {
    for &cmd in ALL {
        let (ex, want) = cmd.clean();
        for odd in ODDITIES {
            if matches!(cmd, Cmd::Select | Cmd::SelectDiscovering | Cmd::Examine)
                && odd.contains("EXISTS")
            {
                // Data SELECT reads, not an oddity: the last one counts.
                continue;
            }
            for at in 0..ex.answer[0].len() {
                let mut ex = ex.clone();
                ex.answer[0].insert(at, odd.to_string());
                let got = run(cmd, ex, None).await;
                assert_eq!(
                    got.as_deref().map_err(|e| format!("{e:#}")),
                    Ok(want),
                    "{cmd:?} with {odd:?} at {at}"
                );
            }
        }
    }
}

fn with_completion(ex: &Exchange, completion: &str) -> Exchange {
    let mut ex = ex.clone();
    let last = ex.answer[0].last_mut().unwrap();
    *last = completion.to_string();
    ex
}

#[tokio::test]
async fn no_bad_and_garbage_completions_are_errors_never_empty_results() {
    for &cmd in ALL {
        let (ex, _) = cmd.clean();
        for completion in [
            "$T NO [UNAVAILABLE] try later\r\n",
            "$T BAD what?\r\n",
            "$T MAYBE\r\n",
        ] {
            let r = run(cmd, with_completion(&ex, completion), None).await;
            let e = r.expect_err(&format!("{cmd:?} {completion:?}"));
            let imap_e = e
                .chain()
                .find_map(|c| c.downcast_ref::<ImapError>())
                .unwrap_or_else(|| panic!("{cmd:?}: {e:#}"));
            assert!(imap_e.is_refusal(), "{cmd:?}: {e:#}");
        }
    }
}

#[tokio::test]
async fn bye_and_every_hang_up_are_errors() {
    for &cmd in ALL {
        let (ex, _) = cmd.clean();
        let bye = with_completion(&ex, "* BYE shutting down\r\n");
        let e = run(cmd, bye, None).await.expect_err(&format!("{cmd:?}"));
        assert!(
            format!("{e:#}").contains("BYE shutting down"),
            "{cmd:?}: {e:#}"
        );
        for after in 0..ex.answer[0].len() {
            let r = run(cmd, ex.clone(), Some(after)).await;
            assert!(r.is_err(), "{cmd:?} closed after {after} lines: {r:?}");
        }
    }
}

#[tokio::test]
async fn the_two_reported_defects() {
    // 1. A NO to UID SEARCH is not "nothing new".
    let (ex, _) = Cmd::Search.clean();
    let no = with_completion(&ex, "$T NO [UNAVAILABLE] Internal error occurred\r\n");
    let e = run(Cmd::Search, no, None).await.unwrap_err();
    assert!(format!("{e}").contains("NO [UNAVAILABLE]"), "{e}");
    // 2. An unknown response before CAPABILITY's OK is ignored.
    let (a, b) = tokio::io::duplex(1 << 16);
    let ex = Exchange {
        expect: vec!["CAPABILITY".into(), "LOGIN \"u\" \"p\\\"w\"".into()],
        answer: vec![
            vec![
                "* XFOO 17 (something new) \"x\"\r\n".into(),
                "* CAPABILITY IMAP4rev1 IDLE\r\n".into(),
                "$T OK done\r\n".into(),
            ],
            vec!["$T OK [CAPABILITY IMAP4rev1 IDLE UIDPLUS] in\r\n".into()],
        ],
    };
    let server = tokio::spawn(serve(b, "* OK hi\r\n", ex, None));
    let t = over(a);
    let imap = match establish(&account(""), t, false).await {
        Ok(i) => i,
        Err(e) => panic!("{e}"),
    };
    assert!(imap.has("UIDPLUS"), "capabilities from the login's OK");
    drop(imap);
    server.await.unwrap();
}

#[tokio::test]
async fn sasl_ir_sends_the_credentials_with_the_command() {
    let (a, b) = tokio::io::duplex(1 << 16);
    use base64::Engine as _;
    let ir = base64::engine::general_purpose::STANDARD.encode(b"\0u\0p\"w");
    let ex = Exchange {
        expect: vec![format!("AUTHENTICATE PLAIN {ir}"), "CAPABILITY".into()],
        answer: vec![
            vec!["$T OK logged in\r\n".into()],
            vec!["* CAPABILITY IMAP4rev1 IDLE\r\n".into(), "$T OK\r\n".into()],
        ],
    };
    let server = tokio::spawn(serve(
        b,
        "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\n",
        ex,
        None,
    ));
    let t = over(a);
    let imap = establish(&account(""), t, false)
        .await
        .map_err(|e| e.to_string());
    assert!(imap.unwrap().has("IDLE"));
    let seen = server.await.unwrap();
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[tokio::test]
async fn a_refused_login_is_an_auth_error_and_preauth_needs_a_tunnel() {
    for (greeting, expect, answer, auth) in [
        (
            "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n",
            "AUTHENTICATE PLAIN",
            vec![
                "+ \r\n".to_string(),
                "$T NO [AUTHENTICATIONFAILED] no\r\n".to_string(),
            ],
            true,
        ),
        (
            "* PREAUTH [CAPABILITY IMAP4rev1] hi\r\n",
            "never",
            vec![],
            false,
        ),
        ("* BYE too busy\r\n", "never", vec![], false),
    ] {
        let (a, b) = tokio::io::duplex(1 << 16);
        let ex = Exchange {
            expect: vec![expect.to_string()],
            answer: vec![answer],
        };
        let server = tokio::spawn(serve(b, greeting, ex, None));
        let t = over(a);
        match establish(&account(""), t, false).await {
            Err(ConnectError::Auth(e)) => assert!(auth, "{e:#}"),
            Err(ConnectError::Unavailable(e)) => assert!(!auth, "{e:#}"),
            Ok(_) => panic!("{greeting} logged in"),
        }
        let _ = server.await;
    }
}

#[tokio::test]
async fn a_password_that_cannot_be_quoted_goes_as_a_literal() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let ex = Exchange {
        expect: vec!["LOGIN \"u\" {6}".into()],
        answer: vec![vec!["+ go on\r\n".into(), "$T OK in\r\n".into()]],
    };
    let server = tokio::spawn(serve(b, "* OK [CAPABILITY IMAP4rev1] hi\r\n", ex, None));
    let t = over(a);
    let mut acct = account("");
    acct.password =
        crate::config::PasswordSource::Inline(crate::secret::Secret::new("pässw".into()));
    let r = establish(&acct, t, false).await;
    drop(r);
    let seen = server.await.unwrap();
    assert_eq!(seen[1], "pässw", "{seen:?}");
}

/// IDLE: an EXISTS ends it; oddities do not; a hang-up is an error, not a
/// wake-up; a timeout and a wake each send DONE and read the OK.
#[tokio::test]
async fn idle_transcripts() {
    let idle = |answer: &[&str]| Exchange {
        expect: vec!["IDLE".into()],
        answer: vec![answer.iter().map(|s| s.to_string()).collect()],
    };
    async fn go(
        ex: Exchange,
        close_after: Option<usize>,
        wait: Duration,
        wake: bool,
    ) -> Result<IdleEnd> {
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(serve(b, PREAUTH, ex, close_after));
        let imap = session(a).await;
        let notify = tokio::sync::Notify::new();
        if wake {
            notify.notify_one();
        }
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            imap.idle(wait, &notify, &std::sync::atomic::AtomicBool::new(false)),
        )
        .await
        .expect("hung");
        let r = r.map(|(_, end)| end);
        let _ = server.await;
        r
    }
    let long = Duration::from_secs(30);
    // In `serve`, "+ idling" is followed by the client's DONE.
    // New mail announced before the "+": still new data.
    let early = Exchange {
        expect: vec!["IDLE".into()],
        answer: vec![vec![
            "* 4 EXISTS\r\n".into(),
            "+ idling\r\n".into(),
            "$T OK done\r\n".into(),
        ]],
    };
    assert_eq!(
        go(early, None, long, false).await.unwrap(),
        IdleEnd::NewData
    );
    // Woken by us: DONE, OK.
    assert_eq!(
        go(idle(&["+ idling\r\n", "$T OK done\r\n"]), None, long, true)
            .await
            .unwrap(),
        IdleEnd::Woken
    );
    // Time runs out.
    assert_eq!(
        go(
            idle(&["+ idling\r\n", "$T OK done\r\n"]),
            None,
            Duration::from_millis(50),
            false
        )
        .await
        .unwrap(),
        IdleEnd::Timeout
    );
    // The server hangs up after "+": an error.
    let e = go(
        idle(&["+ idling\r\n", "$T OK done\r\n"]),
        Some(1),
        long,
        false,
    )
    .await;
    assert!(e.is_err(), "{e:?}");
    // BYE then close.
    let e = go(idle(&["* BYE going down\r\n"]), None, long, false).await;
    assert!(format!("{:#}", e.unwrap_err()).contains("going down"));
}

/// EXISTS during IDLE, with oddities first: the oddities are ignored and
/// the EXISTS ends the IDLE. The server sends them after the "+" without
/// waiting, so this exchange is scripted by hand.
#[tokio::test]
async fn idle_ends_on_exists_not_on_oddities() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        let (mut r, mut w, tag) = idle_started(b).await;
        for odd in ODDITIES
            .iter()
            .filter(|o| !o.contains("EXISTS") && !o.contains("EXPUNGE") && !o.contains("FETCH"))
        {
            w.write_all(odd.as_bytes()).await.unwrap();
        }
        w.write_all(b"* 12 EXISTS\r\n").await.unwrap();
        let mut done = String::new();
        r.read_line(&mut done).await.unwrap();
        assert_eq!(done, "DONE\r\n");
        w.write_all(format!("{tag} OK idle done\r\n").as_bytes())
            .await
            .unwrap();
    });
    let imap = session(a).await;
    let (_, end) = imap
        .idle(
            Duration::from_secs(30),
            &tokio::sync::Notify::new(),
            &std::sync::atomic::AtomicBool::new(false),
        )
        .await
        .unwrap();
    assert_eq!(end, IdleEnd::NewData);
    server.await.unwrap();
}

#[tokio::test]
async fn a_malformed_search_result_is_an_error() {
    let ex = Exchange {
        expect: vec!["UID SEARCH UID 5:*".into()],
        answer: vec![vec!["* SEARCH 5 six 7\r\n".into(), "$T OK done\r\n".into()]],
    };
    let e = run(Cmd::Search, ex, None).await.unwrap_err();
    assert!(format!("{e}").contains("unreadable"), "{e}");
}

/// A FETCH line it cannot read fails the discovery of new mail: the
/// message it stood for would otherwise look absent, and the watermark pass
/// over it.
#[tokio::test]
async fn an_unreadable_line_fails_the_discovery_of_new_mail() {
    let ex = Exchange {
        expect: vec!["UID FETCH 5:* (UID RFC822.SIZE)".into()],
        answer: vec![vec![
            "* 1 FETCH (UID 5 RFC822.SIZE 100)\r\n".into(),
            "* 2 FETCH (UID six RFC822.SIZE 7)\r\n".into(),
            "$T OK done\r\n".into(),
        ]],
    };
    let e = run(Cmd::Discover, ex, None).await.unwrap_err();
    assert!(format!("{e}").contains("unreadable"), "{e}");
}

#[tokio::test]
async fn a_message_over_the_limit_is_not_held() {
    let big = "x".repeat(5000);
    let ex = Exchange {
        expect: vec!["UID FETCH 5 (UID RFC822.SIZE INTERNALDATE FLAGS BODY.PEEK[])".into()],
        answer: vec![vec![
            format!("* 1 FETCH (UID 5 BODY[] {{{}}}\r\n{big})\r\n", big.len()),
            "$T OK done\r\n".into(),
        ]],
    };
    let (a, b) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(serve(b, PREAUTH, ex, None));
    let t = over(a);
    let mut imap = match establish(&account("max_message_size = 1024"), t, true).await {
        Ok(i) => i,
        Err(e) => panic!("{e}"),
    };
    let mut s = imap.fetch("5", FETCH_ITEMS).await.unwrap();
    let f = s.next().await.unwrap().unwrap();
    assert_eq!(
        (f.uid, f.body_too_large(), f.body()),
        (Some(5), Some(5000), None)
    );
    assert!(s.next().await.unwrap().is_none());
    drop(imap);
    server.await.unwrap();
}

/// A stop while idling: DONE and LOGOUT go out in one write, and a server
/// that does not answer (a hibernated session it must wake first) holds
/// the stop up for half a second at most.
#[tokio::test]
async fn a_stop_while_idling_sends_done_and_logout_and_does_not_wait_long() {
    for answers in [true, false] {
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let (mut r, mut w, tag) = idle_started(b).await;
            let (mut done, mut logout) = (String::new(), String::new());
            r.read_line(&mut done).await.unwrap();
            r.read_line(&mut logout).await.unwrap();
            if answers {
                let t2 = logout.split(' ').next().unwrap().to_string();
                let reply = format!("{tag} OK done\r\n* BYE bye\r\n{t2} OK bye\r\n");
                w.write_all(reply.as_bytes()).await.unwrap();
            } else {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            (done, logout)
        });
        let imap = session(a).await;
        let wake = tokio::sync::Notify::new();
        let stop = std::sync::atomic::AtomicBool::new(true);
        wake.notify_one();
        let started = std::time::Instant::now();
        let (_, end) = imap
            .idle(Duration::from_secs(30), &wake, &stop)
            .await
            .unwrap();
        assert_eq!(end, IdleEnd::Stopped);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        if answers {
            let (done, logout) = server.await.unwrap();
            assert_eq!(done, "DONE\r\n");
            assert!(logout.ends_with(" LOGOUT\r\n"), "{logout}");
        } else {
            server.abort();
        }
    }
}

/// An account that logs in with OAuth2, its token printed by a command
/// that counts its runs: "tok1", then "tok2".
fn oauth_account(mechanism: &str, dir: &std::path::Path) -> Account {
    let counter = dir.join("runs");
    let script = format!(
        "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; echo tok$n",
        c = counter.display()
    );
    let text = format!(
        "[accounts.t]\nhost = \"127.0.0.1\"\ntls = \"none\"\nusername = \"u\"\n\
         auth = \"{mechanism}\"\noauth2_token_command = [\"sh\", \"-c\", {script:?}]\n\
         deliver = \"smtp://127.0.0.1:25\"\nrecipients = [\"me@example.org\"]\n"
    );
    crate::config::one_account(&text)
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

const CAPABILITY_AFTER_LOGIN: &str = "* CAPABILITY IMAP4rev1 IDLE\r\n";

#[tokio::test]
async fn xoauth2_sends_the_token_with_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = tokio::io::duplex(1 << 16);
    let ex = Exchange {
        expect: vec![
            format!(
                "AUTHENTICATE XOAUTH2 {}",
                b64("user=u\x01auth=Bearer tok1\x01\x01")
            ),
            "CAPABILITY".into(),
        ],
        answer: vec![
            vec!["$T OK logged in\r\n".into()],
            vec![CAPABILITY_AFTER_LOGIN.into(), "$T OK\r\n".into()],
        ],
    };
    let greeting = "* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2 SASL-IR] hi\r\n";
    let server = tokio::spawn(serve(b, greeting, ex, None));
    let imap = establish(&oauth_account("xoauth2", dir.path()), over(a), false).await;
    assert!(imap.map_err(|e| e.to_string()).unwrap().has("IDLE"));
    assert_eq!(server.await.unwrap().len(), 2);
}

#[tokio::test]
async fn oauthbearer_answers_the_continuation() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = tokio::io::duplex(1 << 16);
    let ex = Exchange {
        expect: vec!["AUTHENTICATE OAUTHBEARER".into(), "CAPABILITY".into()],
        answer: vec![
            vec!["+ \r\n".into(), "$T OK logged in\r\n".into()],
            vec![CAPABILITY_AFTER_LOGIN.into(), "$T OK\r\n".into()],
        ],
    };
    // No SASL-IR: the response follows the server's "+".
    let greeting = "* OK [CAPABILITY IMAP4rev1 AUTH=OAUTHBEARER] hi\r\n";
    let server = tokio::spawn(serve(b, greeting, ex, None));
    let imap = establish(&oauth_account("oauthbearer", dir.path()), over(a), false).await;
    assert!(imap.is_ok(), "{:?}", imap.err().map(|e| e.to_string()));
    drop(imap);
    let seen = server.await.unwrap();
    let want = b64("n,a=u,\x01host=127.0.0.1\x01port=143\x01auth=Bearer tok1\x01\x01");
    assert_eq!(seen[1], want, "{seen:?}");
}

/// The failure report of a refused token (RFC 7628 section 3.2.2).
fn report() -> String {
    b64(r#"{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}"#)
}

#[tokio::test]
async fn a_refused_token_is_fetched_again_once_then_the_login_is_refused_with_the_reason() {
    for (mechanism, abort) in [("xoauth2", ""), ("oauthbearer", "AQ==")] {
        let name = mechanism.to_uppercase();
        let refusal = || {
            vec![
                format!("+ {}\r\n", report()),
                "$T NO [AUTHENTICATIONFAILED] Invalid credentials\r\n".to_string(),
            ]
        };
        let ir = |tok: &str| match mechanism {
            "xoauth2" => b64(&format!("user=u\x01auth=Bearer {tok}\x01\x01")),
            _ => b64(&format!(
                "n,a=u,\x01host=127.0.0.1\x01port=143\x01auth=Bearer {tok}\x01\x01"
            )),
        };
        // The fresh token works: logged in.
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = tokio::io::duplex(1 << 16);
        let ex = Exchange {
            expect: vec![
                format!("AUTHENTICATE {name} {}", ir("tok1")),
                format!("AUTHENTICATE {name} {}", ir("tok2")),
                "CAPABILITY".into(),
            ],
            answer: vec![
                refusal(),
                vec!["$T OK logged in\r\n".into()],
                vec![CAPABILITY_AFTER_LOGIN.into(), "$T OK\r\n".into()],
            ],
        };
        let greeting = format!("* OK [CAPABILITY IMAP4rev1 AUTH={name} SASL-IR] hi\r\n");
        let greeting: &'static str = Box::leak(greeting.into_boxed_str());
        let server = tokio::spawn(serve(b, greeting, ex.clone(), None));
        let imap = establish(&oauth_account(mechanism, dir.path()), over(a), false).await;
        assert!(
            imap.is_ok(),
            "{mechanism}: {:?}",
            imap.err().map(|e| e.to_string())
        );
        drop(imap);
        let seen = server.await.unwrap();
        // The failure report was answered as the mechanism wants.
        assert_eq!(seen[1], abort, "{mechanism}: {seen:?}");
        // Refused twice: an authentication error with the server's reasons,
        // and no token in it.
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut ex = ex;
        ex.answer[1] = refusal();
        let server = tokio::spawn(serve(b, greeting, ex, None));
        let e = establish(&oauth_account(mechanism, dir.path()), over(a), false)
            .await
            .err()
            .expect("refused");
        assert!(matches!(e, ConnectError::Auth(_)), "{mechanism}: {e}");
        let text = format!("{e:#}");
        assert!(
            text.contains("status 401") && text.contains("scope https://mail.google.com/"),
            "{text}"
        );
        assert!(
            !text.contains("tok1") && !text.contains("tok2"),
            "a token in {text}"
        );
        let _ = server.await;
    }
}

#[tokio::test]
async fn a_server_without_the_mechanism_is_refused_before_any_token_is_fetched() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = tokio::io::duplex(1 << 16);
    let ex = Exchange {
        expect: vec![],
        answer: vec![],
    };
    let server = tokio::spawn(serve(
        b,
        "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n",
        ex,
        None,
    ));
    let e = establish(&oauth_account("xoauth2", dir.path()), over(a), false)
        .await
        .err()
        .expect("refused");
    assert!(
        e.to_string()
            .contains("does not offer AUTH=XOAUTH2 (it offers PLAIN)"),
        "{e}"
    );
    assert!(!dir.path().join("runs").exists(), "the token command ran");
    let _ = server.await;
}

/// A hand-scripted server for two pipelined FETCHes: it reads both command
/// lines before it answers, then answers the first with `first` and the
/// second with two messages; then a third FETCH with one. `$1` and `$2`
/// are the tags.
async fn two_fetches(b: tokio::io::DuplexStream, first: &'static str) -> Vec<String> {
    let (r, mut w) = tokio::io::split(b);
    let mut r = BufReader::new(r);
    w.write_all(PREAUTH.as_bytes()).await.unwrap();
    let (mut l1, mut l2) = (String::new(), String::new());
    r.read_line(&mut l1).await.unwrap();
    r.read_line(&mut l2).await.unwrap();
    let (t1, t2) = (
        l1.split(' ').next().unwrap().to_string(),
        l2.split(' ').next().unwrap().to_string(),
    );
    let reply = format!(
        "* 1 FETCH (UID 5 BODY[] {{3}}\r\nfiv)\r\n{first}\
         * 2 FETCH (UID 6 BODY[] {{3}}\r\nsix)\r\n* 3 FETCH (UID 7 BODY[] {{3}}\r\nsev)\r\n\
         $2 OK done\r\n"
    )
    .replace("$1", &t1)
    .replace("$2", &t2);
    w.write_all(reply.as_bytes()).await.unwrap();
    let mut l3 = String::new();
    r.read_line(&mut l3).await.unwrap();
    let t3 = l3.split(' ').next().unwrap().to_string();
    let reply = format!("* 4 FETCH (UID 8 BODY[] {{3}}\r\neig)\r\n{t3} OK done\r\n");
    w.write_all(reply.as_bytes()).await.unwrap();
    vec![
        l1.trim_end().into(),
        l2.trim_end().into(),
        l3.trim_end().into(),
    ]
}

/// The UIDs a FETCH of `set` returns.
async fn fetched(imap: &mut Imap, set: &str) -> Vec<u32> {
    let mut s = imap.fetch(set, FETCH_ITEMS).await.unwrap();
    let mut uids = Vec::new();
    while let Some(f) = s.next().await.unwrap() {
        uids.extend(f.uid);
    }
    uids
}

/// A FETCH sent ahead goes out before the first one is answered, and the
/// stream goes on with its messages after the first one's OK.
#[tokio::test]
async fn a_fetch_sent_ahead_is_read_after_the_one_before() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(two_fetches(b, "$1 OK done\r\n"));
    let mut imap = session(a).await;
    let mut got = Vec::new();
    let mut s = imap.fetch("5", FETCH_ITEMS).await.unwrap();
    s.send_ahead("6:7", FETCH_ITEMS).await.unwrap();
    while let Some(f) = s.next().await.unwrap() {
        got.push((
            f.uid.unwrap(),
            String::from_utf8_lossy(f.body().unwrap()).into_owned(),
        ));
    }
    assert_eq!(
        got,
        [(5, "fiv".into()), (6, "six".into()), (7, "sev".into())]
    );
    assert_eq!(fetched(&mut imap, "8").await, [8]);
    let seen = server.await.unwrap();
    assert!(seen[1].ends_with("UID FETCH 6:7 (UID RFC822.SIZE INTERNALDATE FLAGS BODY.PEEK[])"));
}

/// A NO for the first FETCH is the stream's error, and the one sent ahead
/// is read to its end: the connection is usable after it, and none of its
/// messages is taken for a later command's.
#[tokio::test]
async fn a_no_with_a_fetch_sent_ahead_reads_that_one_to_its_end() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(two_fetches(b, "$1 NO [SERVERBUG] lost\r\n"));
    let mut imap = session(a).await;
    let mut s = imap.fetch("5", FETCH_ITEMS).await.unwrap();
    s.send_ahead("6:7", FETCH_ITEMS).await.unwrap();
    assert_eq!(s.next().await.unwrap().unwrap().uid, Some(5));
    let e = s.next().await.unwrap_err();
    assert!(e.is_refusal(), "{e}");
    assert!(s.next().await.unwrap().is_none());
    assert_eq!(
        fetched(&mut imap, "8").await,
        [8],
        "6 and 7 are not the next FETCH's"
    );
    server.await.unwrap();
}

/// The first SELECT of a connection takes the discovery along: the server
/// here reads both commands before it answers either (a client that
/// waited for the SELECT's answer would hang). A second SELECT goes
/// alone.
#[tokio::test]
async fn a_first_select_sends_the_discovery_behind_it_and_a_second_goes_alone() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        let (r, mut w) = tokio::io::split(b);
        let mut r = BufReader::new(r);
        w.write_all(PREAUTH.as_bytes()).await.unwrap();
        let mut lines = Vec::new();
        for _ in 0..2 {
            let mut l = String::new();
            r.read_line(&mut l).await.unwrap();
            lines.push(l.trim_end().to_string());
        }
        let tag = |l: &str| l.split(' ').next().unwrap().to_string();
        let (t1, t2) = (tag(&lines[0]), tag(&lines[1]));
        let answer = format!(
            "* 3 EXISTS\r\n* OK [UIDVALIDITY 42] v\r\n* OK [UIDNEXT 8] n\r\n{t1} OK done\r\n\
             * 2 FETCH (UID 6 RFC822.SIZE 60)\r\n* 3 FETCH (UID 7 RFC822.SIZE 70)\r\n{t2} OK done\r\n"
        );
        w.write_all(answer.as_bytes()).await.unwrap();
        let mut l = String::new();
        r.read_line(&mut l).await.unwrap();
        lines.push(l.trim_end().to_string());
        let t3 = tag(&lines[2]);
        let answer = format!(
            "* 3 EXISTS\r\n* OK [UIDVALIDITY 42] v\r\n* OK [UIDNEXT 8] n\r\n{t3} OK done\r\n"
        );
        w.write_all(answer.as_bytes()).await.unwrap();
        // Whatever the client sends next: nothing, if it went alone.
        let mut l = String::new();
        let _ = r.read_line(&mut l).await;
        if !l.is_empty() {
            lines.push(l.trim_end().to_string());
        }
        lines
    });
    let mut imap = session(a).await;
    let first = tokio::time::timeout(
        Duration::from_secs(5),
        imap.select_discovering("INBOX", Some(6)),
    )
    .await
    .expect("the client waited for the SELECT's answer")
    .unwrap();
    assert_eq!(first.0.uidnext, 8);
    let d = first.1.expect("sent with the first SELECT").unwrap();
    assert_eq!(discovered(d), "({6, 7}, [(6, 60), (7, 70)])");
    let second = imap.select_discovering("INBOX", Some(8)).await.unwrap();
    assert!(second.1.is_none(), "a second SELECT took a command along");
    drop(imap);
    let lines = server.await.unwrap();
    let cmds: Vec<&str> = lines
        .iter()
        .map(|l| l.split_once(' ').map_or(l.as_str(), |(_, c)| c))
        .collect();
    assert_eq!(
        cmds,
        [
            "SELECT \"INBOX\"",
            "UID FETCH 6:* (UID RFC822.SIZE)",
            "SELECT \"INBOX\""
        ]
    );
}

/// A discovery refused beside the SELECT (as a server may refuse `n:*` in
/// an empty mailbox) is its own error, never an empty result, and the
/// SELECT's answer stands; the connection stays in step for what follows.
#[tokio::test]
async fn a_discovery_refused_beside_the_select_is_its_own_error() {
    let (select, _) = Cmd::Select.clean();
    let (noop, _) = Cmd::Noop.clean();
    for refusal in ["$T NO nothing there\r\n", "$T BAD invalid set\r\n"] {
        let ex = Exchange {
            expect: [
                select.expect.clone(),
                vec!["UID FETCH 5:* (UID RFC822.SIZE)".into()],
                noop.expect.clone(),
            ]
            .concat(),
            answer: [
                select.answer.clone(),
                vec![vec![refusal.to_string()]],
                noop.answer.clone(),
            ]
            .concat(),
        };
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(serve(b, PREAUTH, ex, None));
        let mut imap = session(a).await;
        let (sel, d) = imap.select_discovering("INBOX", Some(5)).await.unwrap();
        assert_eq!(sel.uidnext, 8);
        let e = d.unwrap().expect_err(refusal);
        let imap_e = e
            .chain()
            .find_map(|c| c.downcast_ref::<ImapError>())
            .unwrap_or_else(|| panic!("{e:#}"));
        assert!(imap_e.is_refusal(), "{e:#}");
        imap.noop().await.expect("the connection stays in step");
        drop(imap);
        let _ = server.await;
    }
}
