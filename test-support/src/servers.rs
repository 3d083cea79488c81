//! The real servers the store and API tests of cachepool-web run against, each started by the test that needs it and
//! stopped when its guard drops (also when the test panics): a throwaway PostgreSQL cluster
//! and a moto S3 server. Neither uses a fixed port: PostgreSQL listens on a Unix socket inside
//! its own directory (and, for the TLS test, on a port the kernel chose), moto on a port the
//! kernel chose.
//!
//! A missing server binary fails the test with a message naming `scripts/test`, which
//! installs them; nothing is skipped.

use std::fs;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a server may take to start answering.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval between readiness checks.
const POLL: Duration = Duration::from_millis(50);

/// A directory under the system temp dir, removed with everything in it on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "cachepool-{label}-{}-{}-{:08x}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `file` inside the directory whole: aside first, then renamed over it, so a
    /// process watching the directory never reads half a file.
    pub fn write(&self, file: &str, text: &str) {
        let tmp = self.0.join(format!(".{file}.tmp"));
        fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        fs::rename(&tmp, self.0.join(file)).unwrap_or_else(|e| panic!("rename to {file}: {e}"));
    }

    /// Removes `file` from the directory.
    pub fn remove(&self, file: &str) {
        fs::remove_file(self.0.join(file)).unwrap_or_else(|e| panic!("remove {file}: {e}"));
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Polls `ready` until it holds (true) or the process exits (false), panicking with `what`
/// and the server's log after [`START_TIMEOUT`].
fn poll_until(what: &str, child: &mut Child, log: &Path, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if ready() {
            return true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not ready after {START_TIMEOUT:?}; log:\n{}",
            tail(log)
        );
        std::thread::sleep(POLL);
    }
}

/// The last lines of a log file.
fn tail(log: &Path) -> String {
    let mut text = String::new();
    let _ = fs::File::open(log).and_then(|mut f| f.read_to_string(&mut text));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Ends `child`: `signal` first so it can shut down cleanly, SIGKILL if it has not exited
/// within ten seconds.
fn stop(child: &mut Child, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: signalling a child this guard spawned and has not reaped yet, so the pid
        // still names it.
        unsafe { libc::kill(pid, signal) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(POLL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn install_hint(what: &str, looked: &str) -> String {
    format!("{what} not found (looked in {looked}): run scripts/test, which installs it")
}

/// A binary on `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// The PostgreSQL programs the fixture runs.
const POSTGRES_PROGRAMS: [&str; 3] = ["initdb", "postgres", "pg_isready"];

/// The directory with PostgreSQL's server programs: `$PG_BIN`, Debian's newest
/// `/usr/lib/postgresql/VERSION/bin`, or the real directory of `initdb` on `PATH` (following
/// symbolic links, which some images put in `/usr/local/bin` for only some programs).
fn postgres_bin() -> PathBuf {
    let complete = |dir: &Path| POSTGRES_PROGRAMS.iter().all(|p| dir.join(p).is_file());
    let from_env = std::env::var_os("PG_BIN").map(PathBuf::from);
    let mut debian: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            Some((
                entry.file_name().to_str()?.parse().ok()?,
                entry.path().join("bin"),
            ))
        })
        .collect();
    debian.sort();
    let from_path = on_path("initdb")
        .and_then(|initdb| fs::canonicalize(initdb).ok())
        .and_then(|initdb| initdb.parent().map(Path::to_path_buf));
    from_env
        .into_iter()
        .chain(debian.into_iter().rev().map(|(_, bin)| bin))
        .chain(from_path)
        .find(|dir| complete(dir))
        .unwrap_or_else(|| {
            panic!(
                "{}",
                install_hint(
                    "PostgreSQL (initdb, postgres and pg_isready together)",
                    "$PG_BIN, /usr/lib/postgresql/*/bin and PATH"
                )
            )
        })
}

/// The uid and gid to run PostgreSQL as: the `postgres` account when the tests run as root
/// (PostgreSQL refuses to run as root), otherwise the current user.
fn postgres_account() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let account = passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres") && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    });
    Some(account.unwrap_or_else(|| {
        panic!(
            "the tests run as root, so PostgreSQL must run as the `postgres` account, which \
             does not exist: run scripts/test, which installs the postgresql package"
        )
    }))
}

/// A throwaway PostgreSQL cluster on a Unix socket in its own directory.
#[derive(Debug)]
pub struct Postgres {
    child: Child,
    url: String,
    // Dropped after the server stops (fields drop in order, after `Drop::drop`).
    dir: TempDir,
}

impl Postgres {
    /// Initialises a cluster and starts its server on a Unix socket only; returns once it
    /// accepts connections.
    pub fn start() -> Self {
        Self::launch(false)
    }

    /// Like [`Postgres::start`], and also listening with TLS on a loopback TCP port
    /// (PostgreSQL does no TLS on Unix sockets), with a certificate for 127.0.0.1 signed by a
    /// throwaway CA ([`Postgres::ca_file`]). [`Postgres::url`] then names the TLS endpoint and
    /// requires a verified certificate.
    pub fn start_tls() -> Self {
        Self::launch(true)
    }

    fn launch(tls: bool) -> Self {
        let bin = postgres_bin();
        let dir = TempDir::new("pg");
        let data = dir.path().join("data");
        let log = dir.path().join("postgres.log");
        let account = postgres_account();
        let as_account = |command: &mut Command| {
            if let Some((uid, gid)) = account {
                command.uid(uid).gid(gid);
            }
        };
        let give = |path: &Path| {
            if let Some((uid, gid)) = account {
                chown(path, Some(uid), Some(gid))
                    .unwrap_or_else(|e| panic!("hand {} to postgres: {e}", path.display()));
            }
        };
        give(dir.path());

        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["--auth=trust", "--username=postgres", "--encoding=UTF8"])
            .args(["--locale=C", "--no-sync", "--no-instructions", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_account(&mut initdb);
        let out = initdb.output().unwrap_or_else(|e| {
            panic!(
                "{}: {e}",
                install_hint("initdb", &bin.display().to_string())
            )
        });
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if tls {
            make_certificates(dir.path());
            give(&dir.path().join("server.key"));
        }

        // With TLS the kernel picks a free TCP port, which another process could take before
        // PostgreSQL binds it: a server that exits at once is retried on a new port. The
        // socket-only server has no port to collide on (5432 only names the socket file).
        for _ in 0..3 {
            let port = if tls { free_port() } else { 5432 };
            let log_file =
                fs::File::create(&log).unwrap_or_else(|e| panic!("create the PostgreSQL log: {e}"));
            give(&log);
            let mut server = Command::new(bin.join("postgres"));
            server.arg("-D").arg(&data).arg("-k").arg(dir.path());
            server.args(["-p", &port.to_string()]);
            if tls {
                let file = |name: &str| dir.path().join(name).display().to_string();
                server.args(["-c", "listen_addresses=127.0.0.1", "-c", "ssl=on"]);
                server.args(["-c", &format!("ssl_cert_file={}", file("server.crt"))]);
                server.args(["-c", &format!("ssl_key_file={}", file("server.key"))]);
            } else {
                server.args(["-c", "listen_addresses="]);
            }
            // A test cluster needs no durability.
            server
                .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
                .stdin(Stdio::null())
                .stdout(
                    log_file
                        .try_clone()
                        .unwrap_or_else(|e| panic!("log handle: {e}")),
                )
                .stderr(log_file);
            as_account(&mut server);
            let mut child = server
                .spawn()
                .unwrap_or_else(|e| panic!("start postgres: {e}"));

            let ready = bin.join("pg_isready");
            let answered = poll_until("PostgreSQL", &mut child, &log, || {
                Command::new(&ready)
                    .arg("-q")
                    .arg("-h")
                    .arg(dir.path())
                    .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
                    .status()
                    .is_ok_and(|s| s.success())
            });
            if !answered {
                continue;
            }
            let url = if tls {
                format!(
                    "postgres://postgres@127.0.0.1:{port}/postgres?sslmode=verify-full&sslrootcert={}",
                    dir.path().join("ca.crt").display()
                )
            } else {
                format!(
                    "postgres://postgres@localhost/postgres?host={}",
                    dir.path().display()
                )
            };
            return Self { child, url, dir };
        }
        panic!(
            "PostgreSQL exited at start three times; log:\n{}",
            tail(&log)
        );
    }

    /// The `postgres://` URL of the cluster's `postgres` database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The CA certificate that signed a TLS server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("pick a free port: {e}"))
        .port()
}

/// A throwaway CA (`ca.crt`) and a server certificate for 127.0.0.1 signed by it
/// (`server.crt`, `server.key`) in `dir`, made with the openssl command.
fn make_certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", install_hint("openssl", "PATH")));
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let new_p256_key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &[
            "req",
            "-x509",
            "-days",
            "2",
            "-subj",
            "/CN=cachepool test CA",
        ][..],
        &new_p256_key,
        &["-keyout", "ca.key", "-out", "ca.crt"],
    ]
    .concat());
    run(&[
        &["req", "-subj", "/CN=127.0.0.1"][..],
        &new_p256_key,
        &["-keyout", "server.key", "-out", "server.csr"],
    ]
    .concat());
    fs::write(dir.join("san.cnf"), "subjectAltName=IP:127.0.0.1\n")
        .unwrap_or_else(|e| panic!("write san.cnf: {e}"));
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.cnf",
        "-out",
        "server.crt",
    ]);
    // PostgreSQL refuses a key that others can read.
    fs::set_permissions(dir.join("server.key"), fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("restrict server.key: {e}"));
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT is PostgreSQL's fast shutdown: disconnect clients, stop.
        stop(&mut self.child, libc::SIGINT);
    }
}

/// The moto binary: `$MOTO_SERVER`, the virtualenv scripts/test makes under `target/`, or
/// `moto_server` on `PATH`.
fn moto_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MOTO_SERVER") {
        return PathBuf::from(path);
    }
    let venv =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-tools/moto/bin/moto_server");
    if venv.is_file() {
        return venv;
    }
    on_path("moto_server").unwrap_or_else(|| {
        panic!(
            "{}",
            install_hint(
                "moto_server",
                "$MOTO_SERVER, target/test-tools/moto and PATH"
            )
        )
    })
}

/// A moto server (S3 and the other AWS APIs) on a loopback port.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    endpoint: String,
    _dir: TempDir,
}

impl Moto {
    /// Starts moto on a free port; returns once it answers HTTP.
    pub fn start() -> Self {
        let binary = moto_binary();
        let dir = TempDir::new("moto");
        let log = dir.path().join("moto.log");
        // The kernel picks a free port; another process could take it before moto binds, so a
        // moto that exits at once is retried on a new port.
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap_or_else(|e| panic!("pick a free port: {e}"))
                .port();
            let log_file =
                fs::File::create(&log).unwrap_or_else(|e| panic!("create the moto log: {e}"));
            let mut child = Command::new(&binary)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(
                    log_file
                        .try_clone()
                        .unwrap_or_else(|e| panic!("log handle: {e}")),
                )
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "{}: {e}",
                        install_hint("moto_server", &binary.display().to_string())
                    )
                });
            let address = format!("127.0.0.1:{port}");
            let deadline = Instant::now() + START_TIMEOUT;
            let exited = loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break true;
                }
                if http_answers(&address) {
                    break false;
                }
                assert!(
                    Instant::now() < deadline,
                    "moto not ready after {START_TIMEOUT:?}; log:\n{}",
                    tail(&log)
                );
                std::thread::sleep(POLL);
            };
            if !exited {
                return Self {
                    child,
                    endpoint: format!("http://{address}"),
                    _dir: dir,
                };
            }
        }
        panic!(
            "moto_server exited at start three times; log:\n{}",
            tail(&log)
        );
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        stop(&mut self.child, libc::SIGTERM);
    }
}

/// Whether an HTTP server at `address` answers a request (any status).
fn http_answers(address: &str) -> bool {
    use std::io::Write;
    let Ok(mut stream) = TcpStream::connect(address) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /moto-api/ HTTP/1.0\r\nHost: {address}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/")
}
