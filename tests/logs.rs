//! The log as a log collector reads it: the `cachepool` binary run with its stderr on a pipe
//! (not a terminal), so no ANSI colour codes, and with `--log-format json`, one JSON object per
//! line with the level and the message at the top.
//!
//! The subcommand that logs and stops quickly is `cachepool node` on port 0: it logs when it
//! starts and when a SIGTERM stops it.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Longest a node may take to start and to stop (the margin is for a machine busy compiling).
const LIMIT: Duration = Duration::from_secs(30);

fn cachepool() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cachepool"));
    // What a developer's shell may set must not decide the outcome.
    command
        .env_remove("NO_COLOR")
        .env_remove("CACHEPOOL_LOG_FORMAT")
        .env("RUST_LOG", "info");
    command
}

/// A running process whose stderr lines arrive on a channel.
struct Logged {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Logged {
    fn start(mut command: Command) -> Logged {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting cachepool: {e}"));
        let stderr = child
            .stderr
            .take()
            .unwrap_or_else(|| panic!("stderr is piped"));
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Logged {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `needle`.
    fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + LIMIT;
        while !self.seen.iter().any(|l| l.contains(needle)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("no log line with {needle:?} in {LIMIT:?}: {:#?}", self.seen),
            }
        }
    }

    /// SIGTERM, then every line up to the exit (which must be a clean one).
    fn stop(mut self) -> Vec<String> {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap_or_else(|e| panic!("pid: {e}"));
        // SAFETY: kill(2) with a pid this test started and has not reaped.
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(sent, 0, "SIGTERM");
        // The reader thread ends at the pipe's end of file, when the process exits.
        let deadline = Instant::now() + LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("cachepool did not stop in {LIMIT:?}: {:#?}", self.seen);
                }
            }
        }
        let status = self.child.wait().unwrap_or_else(|e| panic!("wait: {e}"));
        assert!(status.success(), "{status}: {:#?}", self.seen);
        std::mem::take(&mut self.seen)
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        // A test that panicked leaves no node behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node(args: &[&str]) -> Command {
    let mut command = cachepool();
    command
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]);
    command
}

#[test]
fn text_log_on_a_pipe_has_no_colour_codes() {
    let mut node = Logged::start(node(&["node"]));
    node.wait_for("node starting");
    let lines = node.stop();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("INFO") && l.contains("node stopped")),
        "{lines:#?}"
    );
    for line in &lines {
        assert!(!line.contains("\x1b["), "a colour code on a pipe: {line:?}");
    }
}

#[test]
fn json_log_is_one_object_per_line_with_level_and_message() {
    // Before the subcommand and after it: the flag is global.
    for args in [
        &["--log-format", "json", "node"][..],
        &["node", "--log-format", "json"][..],
    ] {
        let mut node = Logged::start(node(args));
        node.wait_for("node starting");
        let lines = node.stop();
        let events: Vec<Value> = lines
            .iter()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {l}"))
            })
            .collect();
        for event in &events {
            assert!(event["level"].is_string(), "no level: {event}");
            assert!(event["message"].is_string(), "no message: {event}");
            assert!(event["timestamp"].is_string(), "no timestamp: {event}");
        }
        let started = events
            .iter()
            .find(|e| e["message"] == "node starting")
            .unwrap_or_else(|| panic!("{args:?}: no start event in {lines:#?}"));
        assert_eq!(started["level"], "INFO", "{started}");
        // The event's fields sit beside the message, for a shipper to index.
        assert!(started["capacity_mib"].is_number(), "{started}");
        assert!(events.iter().any(|e| e["message"] == "node stopped"));
    }
}

#[test]
fn every_subcommand_takes_the_log_format_and_refuses_an_unknown_one() {
    for sub in ["up", "operator", "web", "node", "crd", "bench"] {
        let out = cachepool()
            .args([sub, "--help"])
            .output()
            .expect("cachepool --help");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && help.contains("--log-format"),
            "cachepool {sub} --help: {help}"
        );
    }
    let out = cachepool()
        .args(["--log-format", "yaml", "crd"])
        .output()
        .expect("cachepool");
    assert!(!out.status.success());
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(
        error.contains("text") && error.contains("json"),
        "the refusal lists the formats: {error}"
    );
}
