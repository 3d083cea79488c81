//! A node child process whose admin API accepts changes: started with an admin token, its
//! admin address kept, so a benchmark can drive `POST /handoff` through the operator's
//! `AdminClient` as a real resize does.
//!
//! Same lifetime rules as `servers::ServerProcess` (killed and reaped on drop, SIGKILLed by
//! the kernel if the bench dies first). Kept apart from it because `ServerProcess::node`
//! neither passes a token nor remembers the admin port, and strips `CACHEPOOL_*` variables so
//! the environment cannot supply them.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use cachepool_operator::rebalance::AdminClient;

/// The bearer token of the benchmark's nodes: loopback only, alive for one run.
pub const TOKEN: &str = "cachepool-bench";

/// CPU time of a process, in user space and in the kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTime {
    pub user: Duration,
    pub sys: Duration,
}

impl CpuTime {
    /// The time spent between `earlier` and this reading.
    pub fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user.saturating_sub(earlier.user),
            sys: self.sys.saturating_sub(earlier.sys),
        }
    }

    /// `total (user U, sys S)` in seconds.
    pub fn render(self) -> String {
        let (u, s) = (self.user.as_secs_f64(), self.sys.as_secs_f64());
        format!("{:.2} (user {u:.2}, sys {s:.2})", u + s)
    }
}

/// A running node with a writable admin API.
#[derive(Debug)]
pub struct AdminNode {
    pub name: &'static str,
    /// The data port, as a ring names the node.
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub admin: AdminClient,
    child: Child,
    log: PathBuf,
}

impl AdminNode {
    /// Starts `cachepool node` on free loopback ports and waits until `/readyz` answers.
    pub async fn start(
        name: &'static str,
        capacity_mib: u64,
        threads: usize,
    ) -> anyhow::Result<AdminNode> {
        let exe = std::env::current_exe().context("locating the cachepool binary")?;
        let mut last = None;
        // A free port may be taken by another process before the node binds it: retry.
        for _ in 0..3 {
            let (port, admin_port) = (free_port()?, free_port()?);
            let mut cmd = Command::new(&exe);
            cmd.arg("node")
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
                .args(["--capacity-mib", &capacity_mib.to_string()])
                .args(["--threads", &threads.to_string()])
                .args(["--admin-token", TOKEN]);
            // Flags set everything measured; the caller's CACHEPOOL_* variables must not.
            for (var, _) in std::env::vars_os() {
                if var.to_string_lossy().starts_with("CACHEPOOL_") {
                    cmd.env_remove(var);
                }
            }
            cmd.env("RUST_LOG", "warn");
            let mut node = spawn(name, cmd, port, admin_port)?;
            match node.wait_ready(Duration::from_secs(15)).await {
                Ok(()) => return Ok(node),
                Err(err) => {
                    super::check_interrupted()?;
                    last = Some(err);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("{name} did not start")))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
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

    /// A number from the node's `GET /stats` (memcached's names: `curr_items`, `bytes`, ...).
    pub async fn stat(&self, name: &str) -> anyhow::Result<u64> {
        let stats = self.admin.stats().await?;
        stats
            .get(name)
            .and_then(serde_json::Value::as_u64)
            .with_context(|| format!("{}: no numeric {name} in /stats", self.name))
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
        let secs = |ticks: u64| Duration::from_secs_f64(ticks as f64 / ticks_per_sec as f64);
        Ok(CpuTime {
            user: secs(user),
            sys: secs(sys),
        })
    }

    /// Resident memory (VmRSS) in bytes.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .with_context(|| format!("no VmRSS line in {path}"))?;
        Ok(kib * 1024)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            super::check_interrupted()?;
            self.check_alive()?;
            if self.admin.ready().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} was not ready within {timeout:?}; log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(&text[text.len().saturating_sub(2000)..]).into_owned()
    }
}

impl Drop for AdminNode {
    fn drop(&mut self) {
        // SIGKILL: nothing of a benchmark node's state is worth a graceful stop.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn spawn(
    name: &'static str,
    mut cmd: Command,
    port: u16,
    admin_port: u16,
) -> anyhow::Result<AdminNode> {
    let log = std::env::temp_dir().join(format!(
        "cachepool-bench-{name}-{}-{port}.log",
        std::process::id()
    ));
    let file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    // SAFETY: the closure runs in the forked child before exec and makes one
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
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
    Ok(AdminNode {
        name,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        admin_addr: SocketAddr::from(([127, 0, 0, 1], admin_port)),
        admin: AdminClient::new(&format!("127.0.0.1:{admin_port}"), Some(TOKEN)),
        child,
        log,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_even_with_spaces_in_the_name() {
        let stat =
            "4242 (cache pool) S 1 4242 4242 0 -1 4194560 500 0 0 0 170 30 0 0 20 0 7 0 1234 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some((170, 30)));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1"), None);
    }
}
