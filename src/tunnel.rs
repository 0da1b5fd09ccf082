//! IMAP over the standard input and output of a command, typically
//! `ssh mail.example.net /usr/lib/dovecot/imap` (InterIMAP's advice: SSH
//! authenticates, OpenSSH's ControlPersist and compression save a TLS
//! handshake per run, and the server greets with PREAUTH).
//!
//! The child is killed when the stream is dropped, on every path, and
//! tokio reaps it. Its standard error goes to the log at debug level, and
//! its last lines are kept, so that a command that dies says why.

use std::collections::VecDeque;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use anyhow::{Context as _, Result};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::config::TunnelStderr;

/// Lines of the command's stderr kept for error messages.
const TAIL_LINES: usize = 10;

/// What is known about a running tunnel command, shared with error paths.
#[derive(Debug, Clone)]
pub struct TunnelInfo {
    program: String,
    child: Arc<Mutex<Child>>,
    tail: Arc<Mutex<VecDeque<String>>>,
    /// Its stderr was read to the end (or is not read at all).
    stderr_done: Arc<std::sync::atomic::AtomicBool>,
}

/// How long an error path waits for a tunnel command that closed its
/// stdout to exit and for its stderr to be read: the two come a moment
/// after the EOF, and the report is what tells the operator why.
const EXIT_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

impl TunnelInfo {
    /// [`TunnelInfo::exit_report`], once the command has exited and its
    /// last words are read, waiting [`EXIT_WAIT`] at most.
    pub async fn settled_exit_report(&self) -> Option<String> {
        let deadline = tokio::time::Instant::now() + EXIT_WAIT;
        loop {
            let exited = self
                .child
                .lock()
                .ok()
                .and_then(|mut c| c.try_wait().ok().flatten())
                .is_some();
            let read = self.stderr_done.load(std::sync::atomic::Ordering::SeqCst);
            if (exited && read) || tokio::time::Instant::now() >= deadline {
                return self.exit_report();
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// "the tunnel command ssh exited with status 255; its last words: ..."
    /// or None while it still runs.
    pub fn exit_report(&self) -> Option<String> {
        let status = self.child.lock().ok()?.try_wait().ok()??;
        let tail: Vec<String> = self
            .tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default();
        let words = if tail.is_empty() {
            String::new()
        } else {
            format!("; its stderr ended with: {}", tail.join(" | "))
        };
        Some(format!(
            "the tunnel command {:?} exited ({status}){words}",
            self.program
        ))
    }
}

/// The child's stdout and stdin as one stream.
#[derive(Debug)]
pub struct TunnelIo {
    stdout: ChildStdout,
    stdin: ChildStdin,
    /// Keeps the child (and its kill_on_drop) alive as long as the stream.
    _info: TunnelInfo,
}

/// Starts `command` (no shell) and returns the stream and its info.
pub fn spawn(command: &[String], stderr: TunnelStderr) -> Result<(TunnelIo, TunnelInfo)> {
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(match stderr {
            TunnelStderr::Log => Stdio::piped(),
            TunnelStderr::Null => Stdio::null(),
        })
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting the tunnel command {:?}", command[0]))?;
    let stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let stderr_done = Arc::new(std::sync::atomic::AtomicBool::new(true));
    if let Some(err) = child.stderr.take() {
        stderr_done.store(false, std::sync::atomic::Ordering::SeqCst);
        let done = stderr_done.clone();
        let tail = tail.clone();
        let program = command[0].clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(tunnel = program, "stderr: {line}");
                if let Ok(mut t) = tail.lock() {
                    if t.len() == TAIL_LINES {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    }
    let info = TunnelInfo {
        program: command[0].clone(),
        child: Arc::new(Mutex::new(child)),
        tail,
        stderr_done,
    };
    Ok((
        TunnelIo {
            stdout,
            stdin,
            _info: info.clone(),
        },
        info,
    ))
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stdout).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stdin).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stdin).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stdin).poll_shutdown(cx)
    }
}
