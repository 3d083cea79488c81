//! nginx as the peer of `cachepool bench web`: the same image files served from a directory on
//! disk, under the same URL paths as the site, so that one wrk script drives both.
//!
//! The configuration is rendered by a pure function ([`render_config`], unit-tested) into a
//! prefix directory of its own (pid file, error log and temporary paths included), so the run
//! touches nothing of the machine's nginx setup. nginx cannot listen on port 0, so the port is
//! found by binding and releasing one; a start that loses that race is retried. The master runs
//! in its own process group so that the guard can end it and its workers together.

use std::fmt::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// What the rendered configuration needs.
#[derive(Clone, Debug)]
pub struct NginxConfig {
    /// Worker processes (the site's runtime threads, so both get the same CPU budget).
    pub workers: usize,
    /// Loopback port to listen on.
    pub port: u16,
    /// Where the pid file, the error log and the temporary directories go.
    pub prefix: PathBuf,
    /// The directory holding the image files, one per key, named by the key.
    pub root: PathBuf,
    /// The URL path the files are served under (the site's, e.g. `/api/v1/images/`).
    pub location: String,
    /// The files' `Content-Type`.
    pub content_type: String,
}

/// The nginx.conf for `config`. `daemon off` is not in it: it comes from `-g`, and nginx
/// refuses a directive given twice.
pub fn render_config(config: &NginxConfig) -> String {
    let prefix = config.prefix.display();
    let mut conf = String::new();
    let _ = writeln!(
        conf,
        "# Written by `cachepool bench web`; removed at the end of the run."
    );
    let _ = writeln!(conf, "worker_processes {};", config.workers.max(1));
    let _ = writeln!(conf, "pid {prefix}/nginx.pid;");
    let _ = writeln!(conf, "error_log {prefix}/error.log warn;");
    conf.push_str("events {\n    worker_connections 4096;\n}\n");
    conf.push_str("http {\n");
    conf.push_str("    access_log off;\n");
    conf.push_str("    sendfile on;\n    tcp_nopush on;\n    tcp_nodelay on;\n");
    // The site keeps a keep-alive connection for as long as the client wants; so does nginx
    // here (its default closes one after 1000 requests, which wrk would pay for in reconnects).
    conf.push_str("    keepalive_requests 100000000;\n    keepalive_timeout 300s;\n");
    // Temporary paths inside the prefix: the compiled-in ones are under /var/lib/nginx, which
    // a user other than root cannot create.
    for kind in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        let _ = writeln!(conf, "    {kind}_temp_path {prefix}/tmp/{kind};");
    }
    let _ = writeln!(conf, "    default_type {};", config.content_type);
    conf.push_str("    types {}\n");
    conf.push_str("    server {\n");
    let _ = writeln!(conf, "        listen 127.0.0.1:{};", config.port);
    let _ = writeln!(
        conf,
        "        location {} {{\n            alias {}/;\n        }}",
        config.location,
        config.root.display()
    );
    conf.push_str("    }\n}\n");
    conf
}

/// A running nginx, stopped (with its workers) when dropped.
#[derive(Debug)]
pub struct Nginx {
    child: Child,
    port: u16,
    prefix: PathBuf,
}

impl Nginx {
    /// Starts nginx from `binary` with `config` (its port replaced by a free one) and waits
    /// until `probe_path` answers 200.
    pub async fn start(
        binary: &Path,
        mut config: NginxConfig,
        probe_path: &str,
    ) -> anyhow::Result<Nginx> {
        std::fs::create_dir_all(config.prefix.join("tmp"))
            .with_context(|| format!("creating {}", config.prefix.display()))?;
        let mut last = None;
        for _ in 0..3 {
            config.port = free_port()?;
            let mut nginx = Self::spawn(binary, &config)?;
            match nginx.wait_ready(probe_path, Duration::from_secs(10)).await {
                Ok(()) => return Ok(nginx),
                Err(e) => {
                    super::check_interrupted()?;
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("nginx did not start")))
    }

    fn spawn(binary: &Path, config: &NginxConfig) -> anyhow::Result<Nginx> {
        let conf_path = config.prefix.join("nginx.conf");
        std::fs::write(&conf_path, render_config(config))
            .with_context(|| format!("writing {}", conf_path.display()))?;
        let log = std::fs::File::create(config.prefix.join("stderr.log"))?;
        let mut cmd = Command::new(binary);
        cmd.arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(&config.prefix)
            // Errors before the configuration is read go here rather than to the compiled-in
            // /var/log/nginx/error.log.
            .arg("-e")
            .arg(config.prefix.join("error.log"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own group: the guard signals the master and the workers at once, and a
            // terminal's Ctrl-C reaches the bench, which then stops it in order.
            .process_group(0);
        let child = cmd.spawn().with_context(|| {
            format!(
                "starting nginx ({}); install Debian's nginx-light or pass --nginx PATH",
                binary.display()
            )
        })?;
        Ok(Nginx {
            child,
            port: config.port,
            prefix: config.prefix.clone(),
        })
    }

    /// The master's pid, which is also the process group of its workers.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn wait_ready(&mut self, probe_path: &str, limit: Duration) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let url = format!("{}{probe_path}", self.url());
        let deadline = Instant::now() + limit;
        loop {
            super::check_interrupted()?;
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "nginx exited ({status}); its error log ends with:\n{}",
                    self.error_log_tail()
                );
            }
            if let Ok(r) = http.get(&url).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
                bail!(
                    "nginx answered {} for {url}; its error log ends with:\n{}",
                    r.status(),
                    self.error_log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "nginx did not answer on {url} within {limit:?}; its error log ends with:\n{}",
                    self.error_log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn error_log_tail(&self) -> String {
        let mut text = String::new();
        for name in ["stderr.log", "error.log"] {
            if let Ok(t) = std::fs::read_to_string(self.prefix.join(name)) {
                text.push_str(&t);
            }
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // SIGTERM is nginx's fast shutdown: the master stops its workers and exits. SIGKILL
        // to the whole group if that takes too long (a SIGKILLed master would leave its
        // workers holding the port).
        // SAFETY: kill has no memory preconditions; `pid` is our child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                // The workers exit with the master on a fast shutdown; make sure of it.
                // SAFETY: as above; the group is the one the master led.
                unsafe { libc::killpg(pid, libc::SIGKILL) };
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe { libc::killpg(pid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A loopback port free when asked (nginx cannot bind port 0 and report the port).
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// `name` found on PATH, or the path given.
pub fn find_binary(
    name: &str,
    given: Option<&Path>,
    install_hint: &str,
) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        if path.is_file() {
            return Ok(path.to_owned());
        }
        bail!("{}: no such file ({install_hint})", path.display());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        // Debian puts nginx in /usr/sbin, which a user's PATH may lack.
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("{name} is not installed or not on PATH ({install_hint})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NginxConfig {
        NginxConfig {
            workers: 2,
            port: 40123,
            prefix: PathBuf::from("/tmp/pfx"),
            root: PathBuf::from("/tmp/pfx/images"),
            location: "/api/v1/images/".into(),
            content_type: "image/png".into(),
        }
    }

    #[test]
    fn the_config_listens_on_loopback_with_the_given_workers_and_files() {
        let conf = render_config(&config());
        assert!(conf.contains("worker_processes 2;\n"), "{conf}");
        assert!(conf.contains("listen 127.0.0.1:40123;\n"), "{conf}");
        assert!(
            conf.contains("location /api/v1/images/ {\n            alias /tmp/pfx/images/;\n"),
            "{conf}"
        );
        assert!(conf.contains("access_log off;"), "{conf}");
        assert!(conf.contains("sendfile on;"), "{conf}");
        assert!(conf.contains("pid /tmp/pfx/nginx.pid;"), "{conf}");
        assert!(
            conf.contains("client_body_temp_path /tmp/pfx/tmp/client_body;"),
            "{conf}"
        );
        assert!(conf.contains("default_type image/png;"), "{conf}");
        // `-g 'daemon off;'` sets it; nginx refuses a duplicate.
        assert!(!conf.contains("daemon"), "{conf}");
    }

    #[test]
    fn the_config_has_at_least_one_worker_and_balanced_braces() {
        let conf = render_config(&NginxConfig {
            workers: 0,
            ..config()
        });
        assert!(conf.contains("worker_processes 1;\n"), "{conf}");
        assert_eq!(
            conf.matches('{').count(),
            conf.matches('}').count(),
            "{conf}"
        );
    }

    /// The rendered configuration works with the real nginx (`scripts/test` installs it), and
    /// the wrk script's `done()` hook reports through real wrk: a second's run against it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nginx_serves_the_files_and_wrk_reports_through_the_script() {
        let dir =
            std::env::temp_dir().join(format!("cachepool-bench-nginx-test-{}", std::process::id()));
        let _cleanup = RemoveOnDrop(dir.clone());
        let files = dir.join("files");
        std::fs::create_dir_all(&files).unwrap();
        std::fs::write(files.join("a"), vec![7u8; 3000]).unwrap();
        std::fs::write(files.join("b"), vec![8u8; 5000]).unwrap();
        let nginx_bin = find_binary("nginx", None, "install Debian's nginx-light").unwrap();
        let wrk_bin = find_binary("wrk", None, "install Debian's wrk").unwrap();
        let nginx = Nginx::start(
            &nginx_bin,
            NginxConfig {
                workers: 1,
                port: 0,
                prefix: dir.join("nginx"),
                root: files,
                location: "/api/v1/images/".into(),
                content_type: "image/png".into(),
            },
            "/api/v1/images/a",
        )
        .await
        .unwrap();
        let answer = reqwest::get(format!("{}/api/v1/images/b", nginx.url()))
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.headers()["content-type"], "image/png");
        assert_eq!(answer.bytes().await.unwrap().len(), 5000);
        let missing = reqwest::get(format!("{}/api/v1/images/c", nginx.url()))
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);

        let script = dir.join("t.lua");
        let paths = ["/api/v1/images/a".to_owned(), "/api/v1/images/b".to_owned()];
        std::fs::write(&script, super::super::wrk::render_script(&paths).unwrap()).unwrap();
        let url = nginx.url();
        let result = super::super::wrk::run(&super::super::wrk::WrkRun {
            binary: &wrk_bin,
            script: &script,
            base_url: &url,
            threads: 1,
            connections: 4,
            duration: Duration::from_secs(1),
        })
        .await
        .unwrap();
        assert!(result.requests > 100, "{result:?}");
        assert_eq!(result.errors.total(), 0, "{result:?}");
        // Both paths requested in turn: the bytes read average the two bodies (plus headers).
        let per_request = result.bytes / result.requests;
        assert!((4000..4500).contains(&per_request), "{result:?}");
        assert!(result.latency_us.p50 > 0.0 && result.latency_us.p99 >= result.latency_us.p50);

        let pid = nginx.pid();
        drop(nginx);
        // The master and its workers are gone (zombies aside: the workers' reaper is not
        // ours). Killed workers may take a moment to exit.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left: Vec<_> = super::super::procs::all()
                .into_iter()
                .filter(|s| s.pgrp == pid as i32 && s.state != 'Z')
                .collect();
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "{left:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    struct RemoveOnDrop(PathBuf);

    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_missing_binary_is_named_with_the_hint() {
        let err = find_binary(
            "cachepool-no-such-binary",
            Some(Path::new("/nonexistent/nginx")),
            "install nginx-light",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "/nonexistent/nginx: no such file (install nginx-light)"
        );
        let err = find_binary("cachepool-no-such-binary", None, "install it").unwrap_err();
        assert!(err.to_string().contains("not installed"), "{err}");
    }
}
