//! A node child process whose admin API accepts changes: a `servers::ServerProcess` started
//! with an admin token, plus the operator's `AdminClient` for it, so a benchmark can drive
//! `POST /handoff` as a real resize does.

use std::net::SocketAddr;

use anyhow::Context as _;
use cachepool_operator::rebalance::AdminClient;

use super::servers::{CpuTime, ServerProcess, ServerSpec};

/// The bearer token of the benchmark's nodes: loopback only, alive for one run.
pub const TOKEN: &str = "cachepool-bench";

/// A running node with a writable admin API (killed when dropped, as every bench server).
#[derive(Debug)]
pub struct AdminNode {
    pub name: &'static str,
    /// The data port, as a ring names the node.
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub admin: AdminClient,
    process: ServerProcess,
}

impl AdminNode {
    /// Starts `cachepool node` on free loopback ports and waits until it answers.
    pub async fn start(
        name: &'static str,
        capacity_mib: u64,
        threads: usize,
    ) -> anyhow::Result<AdminNode> {
        Self::start_from(name, None, capacity_mib, threads).await
    }

    /// As `start`, from the cachepool binary `exe` (default: this one).
    pub async fn start_from(
        name: &'static str,
        exe: Option<&std::path::Path>,
        capacity_mib: u64,
        threads: usize,
    ) -> anyhow::Result<AdminNode> {
        let spec = ServerSpec {
            threads,
            memory_mib: capacity_mib,
            policy: None,
            admin_token: Some(TOKEN.to_string()),
        };
        let process = ServerProcess::node_with(name, exe, &spec, []).await?;
        let admin_addr = process.admin_addr.context("a node has an admin address")?;
        Ok(AdminNode {
            name,
            addr: process.addr,
            admin_addr,
            admin: AdminClient::new(&admin_addr.to_string(), Some(TOKEN)),
            process,
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Fails if the process has exited, with the end of its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.process.check_alive()
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
        self.process.cpu_time()
    }

    /// Resident memory (VmRSS) in bytes.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        self.process.rss_bytes()
    }
}
