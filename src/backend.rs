//! Where servers come from: Docker containers or local PostgreSQL binaries.
//!
//! Both backends find servers by a deterministic name, so that every process of a run
//! (nextest runs each test in its own process) shares them, create each one exactly
//! once even when many processes ask at the same moment, and stop it by itself once no
//! connection has been open for the grace period. The stopping needs no code in the test
//! processes: a watchdog beside each server counts the server's connections (TCP ones
//! in `/proc/net/tcp`, and for a local server those on its Unix socket in
//! `/proc/net/unix`), so a process that is killed still lets its servers go.

#[cfg(feature = "docker")]
pub(crate) mod docker;
pub(crate) mod local;

use std::sync::Mutex;
use std::time::Instant;

use crate::config::{Backend, Config};
use crate::server::Server;
use crate::{Error, Result};

/// A resolved backend.
#[derive(Debug)]
pub(crate) enum Source {
    #[cfg(feature = "docker")]
    Docker(docker::Docker),
    Local(local::Local),
    /// An existing server (`PGFIXTURE_URL`).
    Url(Server),
}

/// The watchdog's idle loop, shared by both backends. `$pg` is the server's pid,
/// `$port` the port it listens on inside its network namespace, `$socket` the path of
/// its Unix socket when pgfixture connects through it (else empty), `$local` set in a
/// container whose socket the host's processes reach (their connections are counted
/// by the backends' titles, `[local]`), `$grace` seconds,
/// `$marker` a file the creator makes once it has connected. Once a connection has
/// been seen (or the marker exists: a process that connects only between two polls
/// is not seen), the server stops after `$grace` seconds (at least two polls, so that
/// the moment between two connections of one process never counts as idle) without
/// an open connection. A server nobody ever used (its creator died before connecting)
/// stops a minute after the grace period instead.
const IDLE_LOOP: &str = r#"
hex=$(printf '%04X' "$port")
trap 'kill -INT $pg 2>/dev/null' INT TERM HUP
limit=$grace
[ "$limit" -ge 2 ] || limit=2
seen=0
idle=0
while kill -0 "$pg" 2>/dev/null; do
    sleep 1
    if grep -qE "^ *[0-9]+: [0-9A-F]+:$hex [0-9A-F]+:[0-9A-F]+ 01 " /proc/net/tcp /proc/net/tcp6 2>/dev/null \
        || { [ -n "$socket" ] && awk -v s=" $socket" '$6 == "03" && substr($0, length($0) - length(s) + 1) == s { f = 1 } END { exit !f }' /proc/net/unix 2>/dev/null; } \
        || { [ -n "$local" ] && grep -qs '\[local\]' /proc/[0-9]*/cmdline; }; then
        seen=1
        idle=0
    else
        [ -e "$marker" ] && seen=1
        idle=$((idle + 1))
    fi
    if { [ "$seen" = 1 ] && [ "$idle" -ge "$limit" ]; } || [ "$idle" -ge $((limit + 60)) ]; then
        kill -INT "$pg" 2>/dev/null
        break
    fi
done
wait "$pg"
"#;

/// `-c name=value` arguments for `postgres`: pgfixture's throwaway-data settings,
/// then the user's (`PGFIXTURE_SERVER_SETTINGS`), which win.
fn server_args(config: &Config) -> Vec<String> {
    crate::server::THROWAWAY_SETTINGS
        .iter()
        .map(|(k, v)| (*k, *v))
        .chain(
            config
                .server_settings
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .flat_map(|(k, v)| ["-c".to_owned(), format!("{k}={v}")])
        .collect()
}

/// The error for a server that would not start because it rejected one of the
/// user's settings: `PGFIXTURE_SERVER_SETTINGS`, the setting, and the server's words.
/// `None` when its output (`log`) names none of them.
pub(crate) fn settings_error(config: &Config, log: &str) -> Option<Error> {
    config.server_settings.iter().find_map(|(name, value)| {
        let quoted = format!("\"{name}\"");
        let line = log
            .lines()
            .find(|line| line.to_ascii_lowercase().contains(&quoted))?;
        Some(Error::config(
            "PGFIXTURE_SERVER_SETTINGS",
            format!("{name}={value}"),
            format!(
                "is refused by the server, which did not start: {}",
                line.trim()
            ),
        ))
    })
}

/// Writes `line` to stderr unless this process wrote it already: each configuration
/// of a process (a test binary whose tests use several migrations sets) resolves its
/// backend, and the fallback to local binaries would be told as often. Written to the
/// stream itself, past libtest's capture of `eprintln!`, so that it shows once
/// whichever test (or background thread) happens to resolve first.
fn say_once(line: String) {
    use std::io::Write;
    static SAID: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if !said.contains(&line) {
        let _ = writeln!(std::io::stderr(), "{line}");
        said.push(line);
    }
}

impl Source {
    /// Docker when it answers (and has the image, or can pull it), else local binaries.
    pub(crate) async fn resolve(config: &Config) -> Result<Source> {
        match config.effective_backend() {
            Backend::Url => {
                let url = config.url.as_ref().expect("validated: the url backend has a URL");
                // Not connected to here: a nextest process whose worker is ready needs
                // one connection only, the worker's. The first maintenance connection
                // that fails names the variable to fix.
                Ok(Source::Url(Server::from_url(url).for_run(&config.run_id)))
            }
            #[cfg(feature = "docker")]
            Backend::Docker => Ok(Source::Docker(docker::Docker::connect(config).await?)),
            #[cfg(not(feature = "docker"))]
            Backend::Docker => Err(Error::config(
                "PGFIXTURE_BACKEND",
                "docker",
                "needs pgfixture's `docker` feature (a default feature): enable it, or choose local or url",
            )),
            Backend::Local => Ok(Source::Local(local::Local::find(config).map_err(|message| Error::Local {
                message: format!("{message} (install the Debian package 'postgresql' or set PGFIXTURE_PG_BIN)"),
            })?)),
            Backend::Auto => {
                #[cfg(feature = "docker")]
                let docker_error = match docker::Docker::connect(config).await {
                    Ok(docker) => return Ok(Source::Docker(docker)),
                    Err(e) if config.require_docker => return Err(e),
                    Err(e) => e.to_string(),
                };
                #[cfg(not(feature = "docker"))]
                let docker_error = if config.require_docker {
                    return Err(Error::Docker {
                        message: "PGFIXTURE_REQUIRE_DOCKER=1, but pgfixture was built without its `docker` feature".to_owned(),
                    });
                } else {
                    "pgfixture was built without its `docker` feature".to_owned()
                };
                match local::Local::find(config) {
                    Ok(local) => {
                        tracing::info!(reason = %docker_error, "Docker is not usable; using local PostgreSQL binaries");
                        say_once(format!(
                            "pgfixture: using local PostgreSQL binaries in {} because {docker_error}",
                            local.bin().display()
                        ));
                        Ok(Source::Local(local))
                    }
                    Err(local_error) => Err(Error::NoBackend {
                        docker: docker_error,
                        local: local_error,
                    }),
                }
            }
        }
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            #[cfg(feature = "docker")]
            Source::Docker(_) => "docker",
            Source::Local(_) => "local",
            Source::Url(_) => "url",
        }
    }

    /// What servers are made of: the image or the binaries' directory.
    pub(crate) fn flavour(&self) -> String {
        match self {
            #[cfg(feature = "docker")]
            Source::Docker(d) => d.image().to_owned(),
            Source::Local(l) => l.bin().display().to_string(),
            Source::Url(server) => format!("{}:{}", server.host, server.port),
        }
    }

    /// The server called `name`, started if no process of this run has started it yet.
    /// Returns whether this call started it.
    /// With `trust`, a server another process of the run has used is taken as
    /// described, without a connection to check it first.
    pub(crate) async fn server(
        &self,
        name: &str,
        config: &Config,
        deadline: Instant,
        trust: bool,
    ) -> Result<(Server, bool)> {
        let (server, started) = match self {
            #[cfg(feature = "docker")]
            Source::Docker(d) => d.server(name, config, deadline).await?,
            Source::Local(l) => l.server(name, config, deadline, trust).await?,
            Source::Url(server) => (server.clone(), false),
        };
        Ok((server.for_run(&config.run_id), started))
    }
}

/// A readiness timeout reports the configured limit the user can raise.
pub(crate) fn timeout_with(error: Error, config: &Config) -> Error {
    match error {
        Error::AcquireTimeout { waiting_for, .. } => Error::AcquireTimeout {
            timeout: config.acquire_timeout,
            waiting_for,
        },
        other => other,
    }
}
