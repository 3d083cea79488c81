//! The servers under test as child processes, each owned by a guard that kills and reaps it
//! when dropped (normal end, error, or Ctrl-C unwinding through `?`). As a second line of
//! defence each child asks the kernel to SIGKILL it if the bench process itself dies.

use std::collections::HashMap;
use std::io::Read as _;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use cache_node::client::codec as wire;

/// How the measured servers are configured; both get the same threads and memory.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    pub threads: usize,
    pub memory_mib: u64,
    /// The node's replacement policy; None leaves the node's default.
    pub policy: Option<String>,
    /// The node's admin token; None starts it without one (its admin API then refuses changes).
    pub admin_token: Option<String>,
}

/// A running server process.
#[derive(Debug)]
pub struct ServerProcess {
    pub name: &'static str,
    pub addr: SocketAddr,
    /// The node's admin HTTP address (None for memcached).
    pub admin_addr: Option<SocketAddr>,
    child: Child,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts Debian's memcached on a free loopback port and waits until it answers.
    pub async fn memcached(bin: &Path, spec: &ServerSpec) -> anyhow::Result<ServerProcess> {
        start_with_retries(|| {
            let port = free_port()?;
            let mut cmd = Command::new(bin);
            cmd.args(["-p", &port.to_string(), "-U", "0", "-l", "127.0.0.1"])
                .args([
                    "-t",
                    &spec.threads.to_string(),
                    "-m",
                    &spec.memory_mib.to_string(),
                ]);
            // SAFETY: geteuid has no preconditions and cannot fail.
            if unsafe { libc::geteuid() } == 0 {
                // memcached refuses to run as root unless told which user to be.
                cmd.args(["-u", "root"]);
            }
            spawn("memcached", cmd, port)
        })
        .await
    }

    /// Starts a node (this binary's `node` subcommand) on free loopback ports.
    pub async fn node(spec: &ServerSpec) -> anyhow::Result<ServerProcess> {
        Self::named_node("node", spec).await
    }

    /// As `node`, under `name` in logs and errors (when a bench runs several nodes).
    pub async fn named_node(
        name: &'static str,
        spec: &ServerSpec,
    ) -> anyhow::Result<ServerProcess> {
        Self::node_with(name, None, spec, []).await
    }

    /// As `named_node`, from the cachepool binary `exe` (default: this one), with `extra`
    /// flags after the ones `spec` sets.
    pub async fn node_with<'a>(
        name: &'static str,
        exe: Option<&Path>,
        spec: &ServerSpec,
        extra: impl IntoIterator<Item = &'a str>,
    ) -> anyhow::Result<ServerProcess> {
        let exe = match exe {
            Some(exe) => exe.to_path_buf(),
            None => std::env::current_exe().context("locating the cachepool binary")?,
        };
        let extra: Vec<&str> = extra.into_iter().collect();
        start_with_retries(|| {
            let (port, admin) = (free_port()?, free_port()?);
            let mut cmd = Command::new(&exe);
            cmd.arg("node")
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
                .args(["--capacity-mib", &spec.memory_mib.to_string()])
                .args(["--threads", &spec.threads.to_string()]);
            if let Some(policy) = &spec.policy {
                cmd.args(["--policy", policy]);
            }
            if let Some(token) = &spec.admin_token {
                cmd.args(["--admin-token", token]);
            }
            cmd.args(&extra);
            // Flags set everything measured; drop CACHEPOOL_* variables so the caller's
            // environment cannot change the node behind the flags' back.
            for (name, _) in std::env::vars_os() {
                if name.to_string_lossy().starts_with("CACHEPOOL_") {
                    cmd.env_remove(name);
                }
            }
            // memcached runs without verbose logging; so does the node.
            cmd.env("RUST_LOG", "warn");
            let mut node = spawn(name, cmd, port)?;
            node.admin_addr = Some(SocketAddr::from(([127, 0, 0, 1], admin)));
            Ok(node)
        })
        .await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory (VmRSS) in bytes.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        parse_vm_rss(&status).with_context(|| format!("no VmRSS line in {path}"))
    }

    /// CPU time the process has used so far.
    pub fn cpu_time(&self) -> anyhow::Result<CpuTime> {
        let path = format!("/proc/{}/stat", self.pid());
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // SAFETY: sysconf has no preconditions.
        let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        anyhow::ensure!(ticks_per_sec > 0, "sysconf(_SC_CLK_TCK) failed");
        let (user, sys) =
            parse_cpu_ticks(&stat).with_context(|| format!("no utime/stime in {path}"))?;
        let minor_faults =
            parse_minor_faults(&stat).with_context(|| format!("no minflt in {path}"))?;
        let secs = |ticks: u64| Duration::from_secs_f64(ticks as f64 / ticks_per_sec as f64);
        Ok(CpuTime {
            user: secs(user),
            sys: secs(sys),
            minor_faults,
        })
    }

    /// Fails if the process has exited, with the end of its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log ends with:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// `stats` as name/value pairs.
    pub async fn stats(&self) -> anyhow::Result<HashMap<String, String>> {
        let mut stream = TcpStream::connect(self.addr).await?;
        stream.write_all(b"stats\r\n").await?;
        let mut buf = Vec::with_capacity(8192);
        loop {
            if let Some((stats, _)) = wire::parse_stats(&buf)? {
                return Ok(stats);
            }
            if stream.read_buf(&mut buf).await? == 0 {
                bail!("{} closed the connection during stats", self.name);
            }
        }
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            super::check_interrupted()?;
            self.check_alive()?;
            if answers_version(self.addr).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not answer on {} within {timeout:?}; log:\n{}",
                    self.name,
                    self.addr,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        let start = text.len().saturating_sub(2000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].to_string()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // SIGKILL: nothing of a benchmark server's state is worth a graceful stop, and the
        // wait that follows must not hang.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A loopback port free at the time of asking. Another process may take it before the server
/// binds; `start_with_retries` covers that race.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

async fn start_with_retries(
    mut start: impl FnMut() -> anyhow::Result<ServerProcess>,
) -> anyhow::Result<ServerProcess> {
    let mut last = None;
    for _ in 0..3 {
        let mut server = start()?;
        match server.wait_ready(Duration::from_secs(15)).await {
            Ok(()) => return Ok(server),
            Err(err) => {
                super::check_interrupted()?;
                last = Some(err);
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("server did not start")))
}

fn spawn(name: &'static str, mut cmd: Command, port: u16) -> anyhow::Result<ServerProcess> {
    let log = std::env::temp_dir().join(format!(
        "cachepool-bench-{name}-{}-{port}.log",
        std::process::id()
    ));
    let file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    // SAFETY: the closure runs in the forked child before exec and only makes one
    // async-signal-safe system call.
    unsafe {
        cmd.pre_exec(|| {
            // Die with the bench even if it is SIGKILLed and no destructor runs.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| {
        let hint = if name == "memcached" {
            "install Debian's package or pass --memcached PATH"
        } else {
            "check the cachepool binary's path (--baseline-node or --node-binary names another build)"
        };
        format!("starting {name} ({:?}); {hint}", cmd.get_program())
    })?;
    Ok(ServerProcess {
        name,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        admin_addr: None,
        child,
        log,
    })
}

async fn answers_version(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"version\r\n").await?;
        let mut buf = [0u8; 128];
        let n = s.read(&mut buf).await?;
        std::io::Result::Ok(buf[..n].starts_with(b"VERSION "))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Ok(true))
    )
}

/// CPU time of a process, in user space and in the kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTime {
    pub user: Duration,
    pub sys: Duration,
    /// Minor page faults (first touches of memory, mostly), counted with the CPU time: where
    /// a node's kernel time goes when it grows.
    pub minor_faults: u64,
}

impl CpuTime {
    /// The time spent between `earlier` and this reading.
    pub fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user.saturating_sub(earlier.user),
            sys: self.sys.saturating_sub(earlier.sys),
            minor_faults: self.minor_faults.saturating_sub(earlier.minor_faults),
        }
    }

    /// `total (user U, sys S)` in seconds.
    pub fn render(self) -> String {
        let (u, s) = (self.user.as_secs_f64(), self.sys.as_secs_f64());
        format!("{:.2} (user {u:.2}, sys {s:.2})", u + s)
    }
}

/// utime and stime (fields 14 and 15) of a /proc/PID/stat text, in clock ticks. Fields are
/// counted after the command name's closing parenthesis, since the name may hold spaces.
fn parse_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// minflt (field 10) of a /proc/PID/stat text.
fn parse_minor_faults(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(7)?.parse().ok()
}

/// VmRSS from a /proc/PID/status text, in bytes.
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\tmemcached\nVmPeak:\t  99 kB\nVmRSS:\t    4321 kB\nThreads:\t6\n";
        assert_eq!(parse_vm_rss(status), Some(4321 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }

    #[test]
    fn cpu_ticks_are_read_even_with_spaces_in_the_name() {
        let stat =
            "4242 (cache pool) S 1 4242 4242 0 -1 4194560 500 0 0 0 170 30 0 0 20 0 7 0 1234 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some((170, 30)));
        assert_eq!(parse_minor_faults(stat), Some(500));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1"), None);
        assert_eq!(parse_minor_faults("4242 (x) S 1"), None);
    }
}
