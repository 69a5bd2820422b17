//! Servers spawned from locally installed PostgreSQL binaries.
//!
//! Each server lives in its own directory under `$TMPDIR/pgfixture-<uid>/` (data
//! directory, log, socket), listens on a free loopback port, and is started by a small
//! `sh` watchdog that runs detached from the test process: it stops the server once no
//! connection has been open for the grace period and then removes the directory. The
//! directory's creation is the cross-process claim to start the server; a `ready` file
//! written once the server accepts connections tells the other processes where it is.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{IDLE_LOOP, server_args, timeout_with};
use crate::config::Config;
use crate::server::{SUPERUSER, Server, SlowNotice};
use crate::{Error, Result};

/// The directory (under the per-user directory) of cached initialised data
/// directories. Not named `pgfixture-*`, which are servers.
const CACHE_DIR: &str = "initdb-cache";
/// Changes whenever the initdb arguments below change, so that an older cache is not used.
const INITDB_VERSION: &str = "initdb-2 scram-sha-256 trust UTF8 C wal-segsize=1";

/// The smallest `/dev/shm` that servers go to by default.
const MIN_SHM: u64 = 1 << 30;

/// Where local servers live unless `PGFIXTURE_LOCAL_DIR` says: in memory
/// (`/dev/shm/pgfixture-<uid>`) when `/dev/shm` is a tmpfs of at least 1 GiB, for
/// creating a database there takes a fifth of the time it takes on a disk, else
/// `$TMPDIR/pgfixture-<uid>`. Every process of a run decides alike: the rule reads the
/// mount's size, not its free space.
fn default_dir() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let meminfo = || std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    match shm_size(&mounts, meminfo) {
        Some(size) if size >= MIN_SHM => PathBuf::from("/dev/shm").join(format!(
            "pgfixture-{}",
            crate::server::current_uid().unwrap_or(0)
        )),
        _ => crate::server::user_dir(),
    }
}

/// The size of the tmpfs mounted on `/dev/shm` from `/proc/mounts`, in bytes (its
/// `size=` option, or half the memory `/proc/meminfo` gives, tmpfs's default, read only
/// then); `None` when `/dev/shm` is not a tmpfs.
fn shm_size(mounts: &str, meminfo: impl FnOnce() -> String) -> Option<u64> {
    let options = mounts.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&"/dev/shm"))
            .then(|| (fields.get(2).copied(), fields.get(3).copied()))
    })?;
    let (Some("tmpfs"), Some(options)) = options else {
        return None;
    };
    let kib = |v: &str| v.trim().parse::<u64>().ok();
    match options.split(',').find_map(|o| o.strip_prefix("size=")) {
        Some(size) => {
            let (digits, unit) = size.split_at(
                size.find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(size.len()),
            );
            let shift = match unit {
                "" => 0,
                "k" => 10,
                "m" => 20,
                "g" => 30,
                _ => return None,
            };
            kib(digits).map(|n| n << shift)
        }
        None => meminfo()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| kib(v.trim().trim_end_matches("kB")))
            .map(|k| (k << 10) / 2),
    }
}

/// Ports tried before giving up on finding one nobody else takes first.
const PORT_ATTEMPTS: usize = 5;

/// Installed PostgreSQL binaries.
#[derive(Debug)]
pub(crate) struct Local {
    bin: PathBuf,
    base: PathBuf,
    /// PostgreSQL refuses to run as root; as root, servers run as this (uid, gid).
    run_as: Option<(u32, u32)>,
    /// `setpriv` (util-linux) is there: servers and initdb get a parent-death signal.
    setpriv: bool,
}

fn has_server(dir: &Path) -> bool {
    dir.join("postgres").is_file() && dir.join("initdb").is_file()
}

fn major_of(dir: &Path) -> u32 {
    dir.parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

impl Local {
    /// Finds the binaries: `PGFIXTURE_PG_BIN`, `PATH`, `pg_config --bindir`, then
    /// `/usr/lib/postgresql/*/bin` (newest major first). The error says what was tried.
    pub(crate) fn find(config: &Config) -> std::result::Result<Self, String> {
        let bin = if let Some(dir) = &config.pg_bin {
            if !has_server(dir) {
                return Err(format!(
                    "PGFIXTURE_PG_BIN={} holds no postgres and initdb",
                    dir.display()
                ));
            }
            dir.clone()
        } else {
            let on_path = config
                .path
                .as_deref()
                .unwrap_or_default()
                .split(':')
                .filter(|d| !d.is_empty())
                // One `lstat` per entry; only a `postgres` found is resolved (resolving
                // walks every component of the path: 0.15 ms for a PATH of 15 entries,
                // in every process).
                .filter(|d| Path::new(d).join("postgres").symlink_metadata().is_ok())
                .map(|d| {
                    // Follow symlinks (Debian links /usr/local/bin/postgres into the real bindir).
                    std::fs::canonicalize(Path::new(d).join("postgres"))
                        .ok()
                        .and_then(|p| p.parent().map(Path::to_path_buf))
                        .unwrap_or_else(|| PathBuf::from(d))
                })
                .find(|d| has_server(d));
            let from_pg_config = || {
                Command::new("pg_config")
                    .arg("--bindir")
                    .stderr(Stdio::null())
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
                    .filter(|d| has_server(d))
            };
            let from_debian = || {
                let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path().join("bin"))
                    .filter(|d| has_server(d))
                    .collect();
                dirs.sort_by_key(|d| std::cmp::Reverse(major_of(d)));
                dirs.into_iter().next()
            };
            on_path.or_else(from_pg_config).or_else(from_debian).ok_or_else(|| {
                "no PostgreSQL server binaries (postgres, initdb) on PATH, from pg_config --bindir, or under /usr/lib/postgresql/*/bin"
                    .to_owned()
            })?
        };
        let uid = crate::server::current_uid();
        let run_as = if uid == Some(0) {
            Some(unprivileged_user())
        } else {
            None
        };
        if run_as.is_some() && which("setpriv").is_none() {
            return Err("running as root, PostgreSQL must run as another user, which needs setpriv (Debian package util-linux)".to_owned());
        }
        let base = config.local_dir.clone().unwrap_or_else(default_dir);
        let setpriv = which("setpriv").is_some();
        Ok(Local {
            bin,
            base,
            run_as,
            setpriv,
        })
    }

    pub(crate) fn bin(&self) -> &Path {
        &self.bin
    }

    /// The command line that runs `program` as the server's user, with `signal` as
    /// its parent-death signal: the watchdog is its parent, so if the watchdog is
    /// killed (say a CI system kills every process of the job's session), `program`
    /// is stopped by the kernel instead of living on, re-parented to init.
    fn command(&self, program: &str, signal: &str) -> Vec<String> {
        let mut cmd = Vec::new();
        if self.setpriv {
            cmd.push("setpriv".to_owned());
            if let Some((uid, gid)) = self.run_as {
                cmd.extend([
                    format!("--reuid={uid}"),
                    format!("--regid={gid}"),
                    "--clear-groups".to_owned(),
                ]);
            }
            // Set after the user change, which would clear it.
            cmd.extend([format!("--pdeathsig={signal}"), "--".to_owned()]);
        }
        cmd.push(self.bin.join(program).display().to_string());
        cmd
    }

    /// Where the initialised data directory for servers of these binaries is kept:
    /// keyed by the binaries (path, size and time of `postgres`), initdb's arguments,
    /// the user the servers run as and the servers' password.
    fn cache_dir(&self, password: &str) -> PathBuf {
        let postgres = std::fs::metadata(self.bin.join("postgres"))
            .map(|m| format!("{}:{:?}", m.len(), m.modified().ok()))
            .unwrap_or_default();
        let key = crate::digest::sha256_hex(
            format!(
                "{INITDB_VERSION}:{}:{postgres}:{:?}:{password}",
                self.bin.display(),
                self.run_as
            ),
            8,
        );
        self.base.join(CACHE_DIR).join(key)
    }

    /// Removes the server directories whose watchdog is dead (killed), and stops
    /// what runs in them: once per process, before it starts or waits for a server.
    fn sweep_orphans(&self) {
        remove_orphans(orphans(&self.base));
    }

    /// The server `name`, started unless a process of this run started it already.
    pub(crate) async fn server(
        &self,
        name: &str,
        config: &Config,
        deadline: Instant,
        trust: bool,
    ) -> Result<(Server, bool)> {
        let dir = self.base.join(name);
        // The common case under nextest: another process of the run started the server.
        // The sweep of what dead runs left then keeps no test waiting (0.1 ms in every
        // process, unoptimised): it reads the directory while the test's connection
        // waits for the server, and removes what it finds on a thread of its own.
        if trust && let Some(server) = ready_server(&dir) {
            sweep_beside(self.base.clone());
            return Ok((server, false));
        }
        std::fs::create_dir_all(&self.base)
            .map_err(Error::io(format!("creating {}", self.base.display())))?;
        self.sweep_orphans();
        loop {
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    // Removes the directory if the start fails or is cancelled (acquire
                    // timeout) before the watchdog, which cleans up after itself, runs.
                    let mut claim = Claim(Some(dir.clone()));
                    let result = self.start(&dir, config, deadline, &mut claim).await;
                    if result.is_err() {
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                    claim.0 = None;
                    return result.map(|server| (server, true));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if trust && let Some(server) = ready_server(&dir) {
                        return Ok((server, false));
                    }
                    if let Some(server) = self.attach(&dir, deadline).await? {
                        tracing::debug!(dir = %dir.display(), "reusing server");
                        return Ok((server, false));
                    }
                }
                Err(e) => return Err(Error::io(format!("creating {}", dir.display()))(e)),
            }
            if Instant::now() >= deadline {
                return Err(Error::AcquireTimeout {
                    timeout: config.acquire_timeout,
                    waiting_for: format!("local server in {}", dir.display()),
                });
            }
            crate::runtime::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Uses the server another process started (or is starting) in `dir`. `None` means
    /// `dir` is gone or going, and the caller should try to create it again.
    async fn attach(&self, dir: &Path, deadline: Instant) -> Result<Option<Server>> {
        loop {
            if dir.join("exited").exists() || !dir.exists() {
                return Ok(None);
            }
            // `ready` once the server accepted a connection; `pending` while its creator
            // waits for that, which any process may finish (the creator's wait can be
            // cancelled by its acquire timeout).
            let ready = std::fs::read_to_string(dir.join("ready"))
                .or_else(|_| std::fs::read_to_string(dir.join("pending")));
            if let Ok(ready) = ready {
                let mut lines = ready.lines();
                if let (Some(port), Some(password)) =
                    (lines.next().and_then(|p| p.parse().ok()), lines.next())
                {
                    let server =
                        Server::loopback(port, password.to_owned(), dir.display().to_string())
                            .with_socket_dir(dir);
                    let alive = || async { still_running(dir) };
                    return match server.wait_ready(deadline, alive).await {
                        Ok(()) => {
                            let _ = std::fs::rename(dir.join("pending"), dir.join("ready"));
                            Ok(Some(server))
                        }
                        Err(Error::Local { .. }) => Ok(None),
                        Err(e) => Err(e),
                    };
                }
            } else if abandoned(dir) {
                tracing::warn!(dir = %dir.display(), "removing a server directory whose creator died before starting its watchdog");
                let _ = std::fs::remove_dir_all(dir);
                return Ok(None);
            }
            if Instant::now() >= deadline {
                return Err(Error::AcquireTimeout {
                    timeout: Duration::ZERO,
                    waiting_for: format!(
                        "the local server in {} to be started by another process",
                        dir.display()
                    ),
                });
            }
            crate::runtime::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a server in `dir`; a port taken by someone else between our check and
    /// the server's bind makes the server exit (and its watchdog remove `dir`), and the
    /// start is tried again on another port.
    async fn start(
        &self,
        dir: &Path,
        config: &Config,
        deadline: Instant,
        claim: &mut Claim,
    ) -> Result<Server> {
        let _notice = SlowNotice::new(format!(
            "initializing a PostgreSQL server in {}",
            dir.display()
        ));
        for _ in 0..PORT_ATTEMPTS {
            if let Some(server) = self.start_once(dir, config, deadline, claim).await? {
                return Ok(server);
            }
            wait_gone(dir).await;
            std::fs::create_dir(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
            claim.0 = Some(dir.to_owned());
        }
        Err(Error::Local {
            message: format!("no free loopback port could be bound in {PORT_ATTEMPTS} attempts"),
        })
    }

    /// One start; `None` when the port was taken.
    async fn start_once(
        &self,
        dir: &Path,
        config: &Config,
        deadline: Instant,
        claim: &mut Claim,
    ) -> Result<Option<Server>> {
        let started = Instant::now();
        std::fs::write(dir.join("creator"), std::process::id().to_string()).map_err(Error::io(
            format!("writing {}", dir.join("creator").display()),
        ))?;
        set_private(dir)?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                .map_err(Error::io(format!("chown {}", dir.display())))?;
        }
        // One password for the servers of these binaries, derived from this user's
        // secret: the cached data directory holds its verifier.
        let password = crate::server::derived_password(&format!("local {}", self.bin.display()))?;
        let cache = self.cache_dir(&password);
        // Checked here, copied by the watchdog: a test process killed during the copy
        // then leaves no half-made directory without a watchdog.
        let cached = {
            let cache = cache.clone();
            tokio::task::spawn_blocking(move || cache_valid(&cache))
                .await
                .unwrap_or(false)
        };
        let pwfile = dir.join("pwfile");
        if !cached {
            // initdb stores a SCRAM verifier given as the password as is.
            write_private(
                &pwfile,
                &crate::server::scram_verifier(&password)?,
                self.run_as,
            )?;
        }
        // The detached watchdog runs initdb too, so that a test process killed during
        // the second initdb takes leaves no orphan half-way and no directory behind:
        // the watchdog finishes the start, or records the failure and removes `dir`.
        let data = dir.join("data");
        let mut initdb = self.command("initdb", "KILL");
        initdb.extend([
            "-D".to_owned(),
            dir.join("init").display().to_string(),
            format!("--username={SUPERUSER}"),
            format!("--pwfile={}", pwfile.display()),
            "--auth-host=scram-sha-256".to_owned(),
            "--auth-local=trust".to_owned(),
            "--encoding=UTF8".to_owned(),
            "--locale=C".to_owned(),
            "--no-sync".to_owned(),
            // WAL segments of 1 MB: a third of the data directory to copy per server.
            "--wal-segsize=1".to_owned(),
        ]);
        let port = free_port()?;
        let mut postgres = self.command("postgres", "INT");
        postgres.extend([
            "-D".to_owned(),
            data.display().to_string(),
            "-p".to_owned(),
            port.to_string(),
            "-c".to_owned(),
            "listen_addresses=127.0.0.1".to_owned(),
            "-c".to_owned(),
            format!("unix_socket_directories={}", dir.display()),
            // Dynamic shared memory as files in the data directory, which goes with
            // the server's directory, instead of POSIX segments in /dev/shm, which a
            // killed server leaves behind (a megabyte each) until the machine restarts.
            "-c".to_owned(),
            "dynamic_shared_memory_type=mmap".to_owned(),
        ]);
        postgres.extend(server_args(config));
        // Published by the watchdog (renamed to `pending`) once postgres runs.
        write_private(
            &dir.join("starting"),
            &format!("{port}\n{password}\n"),
            None,
        )?;
        std::fs::write(dir.join("spawned"), "").map_err(Error::io(format!(
            "writing {}",
            dir.join("spawned").display()
        )))?;
        self.spawn_watchdog(
            dir,
            port,
            config.server_grace().as_secs(),
            (&cache, cached),
            &initdb,
            &postgres,
        )?;
        // From here on the watchdog removes the directory when the server stops.
        claim.0 = None;
        loop {
            if dir.join("pending").exists() || dir.join("ready").exists() {
                break;
            }
            if dir.join("exited").exists() || !dir.exists() {
                let log = std::fs::read_to_string(dir.join("initdb.log")).unwrap_or_default();
                return Err(Error::Local {
                    message: format!("initdb failed: {}", log.trim()),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::AcquireTimeout {
                    timeout: config.acquire_timeout,
                    waiting_for: format!("initdb in {}", dir.display()),
                });
            }
            crate::runtime::sleep(Duration::from_millis(10)).await;
        }
        let server = Server::loopback(port, password.clone(), dir.display().to_string())
            .with_socket_dir(dir);
        let alive = || async { still_running(dir) };
        match server.wait_ready(deadline, alive).await {
            Ok(()) => {
                // An attacher may have promoted it already.
                let _ = std::fs::rename(dir.join("pending"), dir.join("ready"));
                tracing::info!(dir = %dir.display(), port, elapsed = ?started.elapsed(), "server started");
                Ok(Some(server))
            }
            Err(Error::Local { .. }) => {
                let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
                if log.contains("could not bind") || log.contains("Address already in use") {
                    Ok(None)
                } else if let Some(error) = super::settings_error(config, &log) {
                    Err(error)
                } else {
                    Err(Error::Local {
                        message: format!("postgres exited during start: {}", log.trim()),
                    })
                }
            }
            Err(e) => Err(timeout_with(e, config)),
        }
    }

    /// Starts the detached watchdog: it runs `initdb` (its output in `initdb.log`; on
    /// failure it records `exited` and removes the directory a little later), then
    /// `postgres`, publishes `starting` as `pending`, and stops the server when idle.
    fn spawn_watchdog(
        &self,
        dir: &Path,
        port: u16,
        grace: u64,
        (cache, cached): (&Path, bool),
        initdb: &[String],
        postgres: &[String],
    ) -> Result<()> {
        let initdb: Vec<String> = initdb.iter().map(|a| shell_quote(a)).collect();
        let initdb = initdb.join(" ");
        // A data directory copied from the cache (checked by the creator) needs no
        // initdb; a fresh one is copied into the cache, with a manifest of its files'
        // sizes, before the server first writes to it.
        let script = format!(
            "dir=$1; port=$2; grace=$3; cache=$4; cached=$5; shift 5\necho $$ > \"$dir/watchdog\"\nmarker=\"$dir/ready\"\n\
             if [ \"$cached\" = 1 ] && ! cp -a --reflink=auto \"$cache/data\" \"$dir/init\" 2>/dev/null; then\n\
                 rm -rf \"$dir/init\"; echo 'the cached data directory could not be copied' > \"$dir/initdb.log\"\n\
                 echo initdb > \"$dir/exited\"; sleep 5; rm -rf \"$dir\"; exit 1\n\
             fi\n\
             if [ ! -d \"$dir/init\" ]; then\n\
                 if ! {initdb} >\"$dir/initdb.log\" 2>&1; then\n\
                     rm -f \"$dir/pwfile\"; echo initdb > \"$dir/exited\"; sleep 5; rm -rf \"$dir\"; exit 1\n\
                 fi\n\
                 if [ ! -e \"$cache\" ]; then\n\
                     tmp=\"$cache.tmp.$$\"\n\
                     mkdir -p \"$tmp\" && cp -a \"$dir/init\" \"$tmp/data\" &&\n\
                     (cd \"$tmp/data\" && find . -type f -printf '%P %s\\n') > \"$tmp/manifest\" &&\n\
                     mv -T \"$tmp\" \"$cache\" 2>/dev/null || rm -rf \"$tmp\"\n\
                 fi\n\
             fi\n\
             if ! mv \"$dir/init\" \"$dir/data\"; then\n\
                 rm -f \"$dir/pwfile\"; echo initdb > \"$dir/exited\"; sleep 5; rm -rf \"$dir\"; exit 1\n\
             fi\n\
             rm -f \"$dir/pwfile\"\n\
             \"$@\" >\"$dir/server.log\" 2>&1 &\npg=$!\nsocket=\"$dir/.s.PGSQL.$port\"\nmv \"$dir/starting\" \"$dir/pending\"\n{IDLE_LOOP}\
             rc=$?\nrm -f \"$dir/ready\" \"$dir/pending\"\necho $rc > \"$dir/exited\"\n[ \"$seen\" = 1 ] || sleep 5\nrm -rf \"$dir\"\n"
        );
        // The outer shell puts the watchdog in the background and exits at once, so the
        // watchdog belongs to no test process: not to its process group (Ctrl-C, nextest
        // timeouts), not to its pipes (nextest waits for those), not to its zombies.
        let status = Command::new("sh")
            .arg("-c")
            .arg("sh -c \"$0\" pgfixture-watchdog \"$@\" </dev/null >/dev/null 2>&1 &")
            .arg(&script)
            .arg(dir)
            .arg(port.to_string())
            .arg(grace.to_string())
            .arg(cache)
            .arg(if cached { "1" } else { "0" })
            .args(postgres)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .status()
            .map_err(Error::io("spawning the local server's watchdog with sh"))?;
        if !status.success() {
            return Err(Error::Local {
                message: format!("sh failed to start the watchdog: {status}"),
            });
        }
        Ok(())
    }
}

/// The server directories under `base` whose watchdog was killed or whose start was
/// abandoned; empty after the first call of a process (one sweep per process).
fn orphans(base: &Path) -> Vec<PathBuf> {
    static SWEPT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if SWEPT.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return Vec::new();
    }
    std::fs::read_dir(base)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("pgfixture-")
        })
        .map(|entry| entry.path())
        .filter(|dir| dir.is_dir() && (orphaned(dir) || abandoned(dir)))
        .collect()
}

/// Sweeps what dead runs left in `base` beside the caller's test: it reads the
/// directory in a task of the current runtime, and removes what it finds on a thread of
/// its own.
fn sweep_beside(base: PathBuf) {
    tokio::spawn(async move {
        let found = orphans(&base);
        if !found.is_empty() {
            tokio::task::spawn_blocking(move || remove_orphans(found));
        }
    });
}

/// Where the processes of a run find its local servers without looking for the
/// binaries first (the `PATH`, the base directory's mount, the unprivileged user: about
/// 0.4 ms of an unoptimised nextest process): a record per server, named by what
/// decides which binaries a process finds and where its servers live
/// ([`record_key`]), holding the server's directory and binaries.
fn records() -> PathBuf {
    crate::server::user_dir().join("local-servers")
}

/// The name of the record of the server `name_key` (what names the server besides its
/// binaries: the run, its role, its settings) for a process configured as `config`:
/// the same binaries and base directory are found by every process with the same
/// `PGFIXTURE_PG_BIN`, `PATH` and `PGFIXTURE_LOCAL_DIR`.
pub(crate) fn record_key(config: &Config, name_key: &str) -> String {
    let key = format!(
        "{name_key}\n{:?}\n{:?}\n{:?}",
        config.pg_bin, config.path, config.local_dir
    );
    crate::digest::sha256_hex(key, 12)
}

/// The ready server a process of the run recorded under `key`, and its binaries'
/// directory, without looking for the binaries; dead runs are swept beside the test,
/// as [`Local::server`] does. A record whose server's directory is gone is removed.
pub(crate) fn known(key: &str) -> Option<(Server, String)> {
    let record = records().join(key);
    let text = std::fs::read_to_string(&record).ok()?;
    let mut lines = text.lines();
    let dir = PathBuf::from(lines.next()?);
    let bin = lines.next()?.to_owned();
    let Some(server) = ready_server(&dir) else {
        if !dir.exists() {
            let _ = std::fs::remove_file(&record);
        }
        return None;
    };
    sweep_beside(dir.parent()?.to_path_buf());
    Some((server, bin))
}

/// Records `server`, found or started with the binaries in `bin`, under `key`
/// ([`known`]); removes the records of servers whose directories are gone (older than a
/// minute: a server may be starting).
pub(crate) fn remember(key: &str, server: &Server, bin: &str) {
    let Some(dir) = &server.socket_dir else {
        return;
    };
    let records = records();
    if std::fs::create_dir_all(&records).is_err() {
        return;
    }
    const YOUNG: Duration = Duration::from_secs(60);
    for entry in std::fs::read_dir(&records).into_iter().flatten().flatten() {
        let young = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() < YOUNG);
        let gone = || {
            std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|text| text.lines().next().map(|d| !Path::new(d).exists()))
                .unwrap_or(true)
        };
        if !young && !entry.file_name().to_string_lossy().starts_with('.') && gone() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let staging = records.join(format!(".{key}.{}", std::process::id()));
    if std::fs::write(&staging, format!("{dir}\n{bin}\n")).is_ok() {
        let _ = std::fs::rename(&staging, records.join(key));
    }
}

/// Stops what runs in the orphaned server directories `dirs` and removes them.
fn remove_orphans(dirs: Vec<PathBuf>) {
    for dir in dirs {
        tracing::warn!(dir = %dir.display(), "removing a server directory whose watchdog was killed");
        stop_postmaster(&dir);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The server `dir`'s `ready` file describes, without a connection to check it: a
/// process of the run connected to it, and its watchdog removes the file before it
/// stops the server. A stale one fails the first connection, and the caller then asks
/// again without trusting it.
fn ready_server(dir: &Path) -> Option<Server> {
    let ready = std::fs::read_to_string(dir.join("ready")).ok()?;
    let mut lines = ready.lines();
    let port = lines.next()?.parse().ok()?;
    let password = lines.next()?;
    Some(
        Server::loopback(port, password.to_owned(), dir.display().to_string()).with_socket_dir(dir),
    )
}

/// Whether the start in `dir` was abandoned: its creator died (or went silent for
/// seconds) before the watchdog, which finishes or cleans up every start, was running.
fn abandoned(dir: &Path) -> bool {
    const SILENT: Duration = Duration::from_secs(3);
    let older_than = |path: &Path| {
        std::fs::metadata(path)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() > SILENT)
    };
    if dir.join("watchdog").exists() || dir.join("pending").exists() || dir.join("ready").exists() {
        return false;
    }
    match std::fs::read_to_string(dir.join("creator")) {
        // Spawned, but the watchdog never said it runs.
        Ok(_) if dir.join("spawned").exists() => older_than(&dir.join("spawned")),
        Ok(pid) => !Path::new("/proc").join(pid.trim()).exists(),
        // Killed between making the directory and naming itself.
        Err(_) => older_than(dir),
    }
}

/// Whether the watchdog that started the server in `dir` is dead: its pid is gone, or
/// belongs to another program now. A directory without a watchdog yet is left to
/// [`abandoned`].
fn orphaned(dir: &Path) -> bool {
    let path = dir.join("watchdog");
    // Being written (the shell truncates it first), or written a moment ago: not
    // judged yet.
    let settled = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(2));
    let Ok(pid) = std::fs::read_to_string(&path) else {
        return false;
    };
    let Ok(pid) = pid.trim().parse::<u32>() else {
        return false;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"));
    settled && !cmdline.is_ok_and(|c| c.windows(18).any(|w| w == b"pgfixture-watchdog"))
}

/// Stops the postmaster of `dir`'s data directory, if one still runs there (one that
/// started before parent-death signals, or without `setpriv`).
fn stop_postmaster(dir: &Path) {
    let Ok(pidfile) = std::fs::read_to_string(dir.join("data").join("postmaster.pid")) else {
        return;
    };
    let Some(pid) = pidfile.lines().next().map(str::trim) else {
        return;
    };
    let is_postgres = std::fs::read(Path::new("/proc").join(pid).join("cmdline"))
        .is_ok_and(|c| c.windows(8).any(|w| w == b"postgres"));
    if is_postgres {
        let _ = Command::new("kill").args(["-QUIT", pid]).status();
    }
}

/// Whether the cached data directory `cache` is complete: every file its manifest
/// names is there with its size. One that is not (a file removed or cut short since)
/// is removed, and the next start runs initdb and caches its result again. A cache
/// is published by a rename once whole, so a half-written one is never seen.
fn cache_valid(cache: &Path) -> bool {
    let Ok(manifest) = std::fs::read_to_string(cache.join("manifest")) else {
        return false;
    };
    let data = cache.join("data");
    let whole = manifest.contains("PG_VERSION ")
        && manifest.lines().all(|line| {
            line.rsplit_once(' ').is_some_and(|(path, size)| {
                std::fs::metadata(data.join(path)).is_ok_and(|m| size.parse() == Ok(m.len()))
            })
        });
    if !whole {
        tracing::warn!(cache = %cache.display(), "the cached data directory is damaged; removing it");
        let bad = cache.with_extension(format!("bad{}", std::process::id()));
        if std::fs::rename(cache, &bad).is_ok() {
            let _ = std::fs::remove_dir_all(bad);
        }
    }
    whole
}

/// `arg` quoted for `sh`.
fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', "'\\''"))
}

/// A server directory this process created and must remove unless it hands it over.
struct Claim(Option<PathBuf>);

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Whether the server in `dir` may still come up or serve: not once its watchdog
/// recorded its exit, nor once the watchdog is removing the directory (which may
/// already have taken the `exited` file).
fn still_running(dir: &Path) -> Result<()> {
    if dir.join("exited").exists() || !dir.join("data").exists() {
        Err(Error::Local {
            message: "server exited".to_owned(),
        })
    } else {
        Ok(())
    }
}

async fn wait_gone(dir: &Path) {
    for _ in 0..200 {
        if !dir.exists() {
            return;
        }
        crate::runtime::sleep(Duration::from_millis(50)).await;
    }
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(Error::io("finding a free loopback port"))?;
    Ok(listener
        .local_addr()
        .map_err(Error::io("finding a free loopback port"))?
        .port())
}

fn set_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .map_err(Error::io(format!("chmod {}", path.display())))
}

fn write_private(path: &Path, content: &str, owner: Option<(u32, u32)>) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io(format!("writing {}", path.display())))?;
    file.write_all(content.as_bytes())
        .map_err(Error::io(format!("writing {}", path.display())))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(Error::io(format!("chown {}", path.display())))?;
    }
    Ok(())
}

/// `nobody` from /etc/passwd, else 65534.
fn unprivileged_user() -> (u32, u32) {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| {
            passwd.lines().find_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                if fields.first() == Some(&"nobody") && fields.len() > 3 {
                    Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
                } else {
                    None
                }
            })
        })
        .unwrap_or((65534, 65534))
}

fn which(program: &str) -> Option<PathBuf> {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_named_by_what_finds_the_binaries_and_the_server() {
        let config = |pg_bin: Option<&str>, path: &str, local_dir: Option<&str>| Config {
            pg_bin: pg_bin.map(PathBuf::from),
            path: Some(path.to_owned()),
            local_dir: local_dir.map(PathBuf::from),
            ..Config::default()
        };
        let base = config(None, "/usr/bin:/bin", None);
        let key = record_key(&base, "run\nshared\n");
        assert_eq!(key.len(), 24);
        assert_eq!(key, record_key(&base, "run\nshared\n"));
        for other in [
            record_key(&base, "run2\nshared\n"),
            record_key(&base, "run\nw0\n"),
            record_key(&base, "run\nshared\ntimezone=UTC"),
            record_key(
                &config(Some("/opt/pg/bin"), "/usr/bin:/bin", None),
                "run\nshared\n",
            ),
            record_key(
                &config(None, "/usr/local/bin:/usr/bin:/bin", None),
                "run\nshared\n",
            ),
            record_key(
                &config(None, "/usr/bin:/bin", Some("/var/tmp/x")),
                "run\nshared\n",
            ),
        ] {
            assert_ne!(key, other);
        }
    }

    #[test]
    fn dev_shm_is_used_when_it_is_a_large_tmpfs() {
        let meminfo = || "MemTotal:       24684096 kB\nMemFree: 1 kB\n".to_owned();
        let mounts =
            |options: &str| format!("proc /proc proc rw 0 0\ntmpfs /dev/shm tmpfs {options} 0 0\n");
        assert_eq!(
            shm_size(&mounts("rw,relatime,size=24684096k"), meminfo),
            Some(24684096 << 10)
        );
        // Docker's default.
        assert_eq!(
            shm_size(&mounts("rw,nosuid,nodev,size=65536k"), meminfo),
            Some(64 << 20)
        );
        assert_eq!(shm_size(&mounts("rw,size=2g"), meminfo), Some(2 << 30));
        // The memory is read only when the mount gives no size.
        assert_eq!(
            shm_size(&mounts("rw,size=2g"), || unreachable!("/proc/meminfo read")),
            Some(2 << 30)
        );
        // No size: half the memory.
        assert_eq!(
            shm_size(&mounts("rw,nosuid,nodev"), meminfo),
            Some((24684096 << 10) / 2)
        );
        assert_eq!(shm_size("/dev/sda1 /dev/shm ext4 rw 0 0\n", meminfo), None);
        assert_eq!(shm_size("proc /proc proc rw 0 0\n", meminfo), None);
        assert_eq!(shm_size(&mounts("rw,size=50%"), meminfo), None);
    }
}
