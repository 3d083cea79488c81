//! wrk as the load generator of `cachepool bench web`: a Lua script that spreads the requests
//! over many URL paths and reports through wrk's `done()` hook as one JSON line, so the figures
//! are read from a structure rather than from wrk's human-readable summary (whose units change
//! with magnitude: `us`, `ms`, `s`, `k`).
//!
//! The requests are formatted once per wrk thread in `init()`, so the per-request Lua work is a
//! table lookup and both servers pay the same client cost. Script rendering and output parsing
//! are pure and unit-tested; [`run`] is the thin shell that runs wrk as a child.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Deserialize;

/// The prefix of the line the script's `done()` writes.
const MARKER: &str = "CACHEPOOL_WRK_JSON ";

/// What one wrk run measured (the `done()` hook's line).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct WrkResult {
    /// Completed requests.
    pub requests: u64,
    /// Wall time of the run, in microseconds.
    pub duration_us: u64,
    /// Bytes read (headers and bodies).
    pub bytes: u64,
    pub errors: WrkErrors,
    pub latency_us: WrkLatency,
}

/// wrk's error counts; `status` counts answers outside 2xx and 3xx.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct WrkErrors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub status: u64,
    pub timeout: u64,
}

impl WrkErrors {
    pub fn total(&self) -> u64 {
        self.connect + self.read + self.write + self.status + self.timeout
    }
}

/// Latency of the run's requests, in microseconds (wrk's HdrHistogram).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct WrkLatency {
    pub mean: f64,
    pub max: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl WrkResult {
    /// Requests per second over the run.
    pub fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / (self.duration_us.max(1) as f64 / 1e6)
    }
}

/// The Lua script that requests `paths` round-robin (each wrk thread from its own offset) and
/// prints the result as one JSON line.
pub fn render_script(paths: &[String]) -> anyhow::Result<String> {
    if paths.is_empty() {
        bail!("the wrk script needs at least one path");
    }
    let mut list = String::new();
    for path in paths {
        // Paths are the bench's own keys; refuse anything that would need Lua escaping
        // rather than escape it.
        if !path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_.:".contains(&b))
        {
            bail!("path {path:?} holds characters the wrk script does not quote");
        }
        list.push_str(&format!("  \"{path}\",\n"));
    }
    Ok(format!(
        r#"-- Written by `cachepool bench web`; removed at the end of the run.
local paths = {{
{list}}}
local prepared = {{}}
local n = 0
local threads = 0

function setup(thread)
  thread:set("offset", threads)
  threads = threads + 1
end

function init(args)
  for i, p in ipairs(paths) do
    prepared[i] = wrk.format("GET", p)
  end
  n = ((offset or 0) * 7919) % #prepared
end

function request()
  n = n % #prepared + 1
  return prepared[n]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{marker}{{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}},' ..
    '"latency_us":{{"mean":%.1f,"max":%.1f,"p50":%.1f,"p90":%.1f,"p99":%.1f}}}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"#,
        marker = MARKER,
    ))
}

/// The result in wrk's standard output, or an error quoting the output's end.
pub fn parse_output(stdout: &str) -> anyhow::Result<WrkResult> {
    let Some(line) = stdout
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(MARKER))
    else {
        let tail: Vec<&str> = stdout.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "wrk printed no result line (was the script's done() hook run?); its output ends \
             with:\n{}",
            tail.join("\n")
        );
    };
    let result: WrkResult = serde_json::from_str(line)
        .with_context(|| format!("wrk's result line is not the expected JSON: {line}"))?;
    if result.requests == 0 {
        bail!("wrk completed no request: {line}");
    }
    Ok(result)
}

/// What a run asks of wrk.
#[derive(Clone, Debug)]
pub struct WrkRun<'a> {
    pub binary: &'a Path,
    pub script: &'a Path,
    pub base_url: &'a str,
    pub threads: usize,
    pub connections: usize,
    pub duration: Duration,
}

/// Runs wrk to completion (killing it if the bench is interrupted) and parses its result.
pub async fn run(args: &WrkRun<'_>) -> anyhow::Result<WrkResult> {
    let secs = args.duration.as_secs().max(1);
    let mut cmd = tokio::process::Command::new(args.binary);
    cmd.arg("-t")
        .arg(args.threads.max(1).to_string())
        .arg("-c")
        .arg(args.connections.max(args.threads.max(1)).to_string())
        .arg("-d")
        .arg(format!("{secs}s"))
        .args(["--timeout", "10s"])
        .arg("-s")
        .arg(args.script)
        .arg(args.base_url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().with_context(|| {
        format!(
            "starting wrk ({}); install Debian's wrk or pass --wrk PATH",
            args.binary.display()
        )
    })?;
    let output = child.wait_with_output();
    tokio::pin!(output);
    let output = loop {
        tokio::select! {
            out = &mut output => break out.context("waiting for wrk")?,
            () = tokio::time::sleep(Duration::from_millis(100)) => super::check_interrupted()?,
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            stdout
        );
    }
    parse_output(&stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Running 10s test @ http://127.0.0.1:8080\n  \
        2 threads and 64 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    \
        Latency     1.21ms  400.00us  12.00ms   90.00%\n  200000 requests in 10.00s, 12.50GB read\n\
        Requests/sec:  20000.00\nTransfer/sec:      1.25GB\n\
        CACHEPOOL_WRK_JSON {\"requests\":200000,\"duration_us\":10000000,\"bytes\":13421772800,\
        \"errors\":{\"connect\":0,\"read\":0,\"write\":0,\"status\":3,\"timeout\":1},\
        \"latency_us\":{\"mean\":1210.5,\"max\":12000.0,\"p50\":1100.0,\"p90\":1500.0,\"p99\":2500.0}}\n";

    #[test]
    fn the_result_line_is_read_among_wrks_own_output() {
        let r = parse_output(SAMPLE).unwrap();
        assert_eq!(r.requests, 200_000);
        assert_eq!(r.duration_us, 10_000_000);
        assert_eq!(r.bytes, 13_421_772_800);
        assert_eq!(r.errors.status, 3);
        assert_eq!(r.errors.total(), 4);
        assert_eq!(r.latency_us.p50, 1100.0);
        assert_eq!(r.latency_us.p99, 2500.0);
        assert!((r.requests_per_sec() - 20_000.0).abs() < 1e-9);
    }

    #[test]
    fn output_without_a_result_line_is_an_error_quoting_it() {
        let err = parse_output("unable to connect to 127.0.0.1:1 Connection refused\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no result line"), "{err}");
        assert!(err.contains("Connection refused"), "{err}");
    }

    #[test]
    fn a_malformed_or_empty_result_is_an_error() {
        let err = parse_output("CACHEPOOL_WRK_JSON {\"requests\": 5}\n").unwrap_err();
        assert!(err.to_string().contains("not the expected JSON"), "{err}");
        let zero = SAMPLE.replace("\"requests\":200000", "\"requests\":0");
        let err = parse_output(&zero).unwrap_err();
        assert!(err.to_string().contains("no request"), "{err}");
    }

    #[test]
    fn the_script_lists_every_path_and_prints_the_marker() {
        let paths = vec![
            "/api/v1/images/a-0".to_owned(),
            "/api/v1/images/a-1".to_owned(),
        ];
        let script = render_script(&paths).unwrap();
        assert!(script.contains("  \"/api/v1/images/a-0\",\n  \"/api/v1/images/a-1\",\n"));
        assert!(
            script.contains("CACHEPOOL_WRK_JSON {\"requests\":%d"),
            "{script}"
        );
        assert!(script.contains("latency:percentile(99)"), "{script}");
        assert_eq!(
            script.matches('{').count(),
            script.matches('}').count(),
            "{script}"
        );
    }

    #[test]
    fn the_script_refuses_paths_it_would_have_to_escape() {
        assert!(render_script(&[]).is_err());
        let err = render_script(&["/a\"b".to_owned()]).unwrap_err();
        assert!(err.to_string().contains("does not quote"), "{err}");
    }
}
