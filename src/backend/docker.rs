//! Servers in Docker containers.
//!
//! The containers are created through bollard, the Docker client that testcontainers
//! is built on (re-exported as `testcontainers::bollard`), with API version
//! negotiation: testcontainers pins the newest Docker API, which the daemons of
//! Debian 12 (`docker.io` 20.10, API 1.41) reject, and its containers are removed when
//! the handle that started them drops, while pgfixture's must outlive the test process
//! that started them (nextest runs every test in its own process).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerStateStatusEnum, ContainerSummaryStateEnum, HostConfig,
    PortBinding,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, RemoveContainerOptionsBuilder,
};
use futures::StreamExt;

use super::{IDLE_LOOP, server_args, timeout_with};
use crate::config::{Config, DockerNetwork};
use crate::server::{SUPERUSER, Server, SlowNotice, derived_password, scram_verifier};
use crate::{Error, Result};

/// A Docker daemon that answers, and the image servers are made of.
#[derive(Debug)]
pub(crate) struct Docker {
    client: bollard::Docker,
    image: String,
    /// The image initialised from `image` (see [`initialized_tag`]).
    initialized: String,
    /// Whether `initialized` exists: containers start from it, skipping initdb.
    has_initialized: bool,
}

/// Where containers keep their data: outside the official image's volume (which
/// `docker commit` leaves out), so that an initialised data directory can be committed.
const DATA_DIR: &str = "/tmp/pgfixture-data";
/// A tmpfs of each container, where its server keeps its data ([`MEMORY_DATA_DIR`]):
/// creating a database (a template, a worker's clone, a spare) in memory takes a
/// fraction of the time it takes on the container's overlay file system.
const MEMORY_DIR: &str = "/run/pgfixture";
/// The data directory of a container's server, in [`MEMORY_DIR`]: an initialised
/// image's [`DATA_DIR`] is copied there as the container starts (`COPY_DATA`).
const MEMORY_DATA_DIR: &str = "/run/pgfixture/data";
/// Where a container's server makes a second Unix socket: a directory of the user's,
/// bind-mounted there ([`new_socket_dir`]), through which pgfixture's own connections
/// skip TCP and the password exchange, as with a local server. The socket trusts its
/// clients (the image's `local` rule); only the user (and root) can reach the host
/// directory.
const SOCKET_MOUNT: &str = "/run/pgfixture-socket";
/// initdb's arguments in containers: a throwaway server need not wait for its files
/// to reach the disk (0.2–0.4 s of a cold start here), and WAL segments of 1 MB
/// instead of 16 make a data directory a third smaller, to copy as a container starts.
const INITDB_ARGS: &str = "--no-sync --wal-segsize=1";
/// Changes when what an initialised image holds, or where, changes.
const INITIALIZED_LAYOUT: &str = "3";

/// Answering a ping takes milliseconds; a daemon that has not answered in this time is
/// treated as unreachable instead of hanging the first test.
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// Labels on every container: who made it, and for which run.
pub(crate) const LABEL: &str = "pgfixture";
pub(crate) const LABEL_RUN: &str = "pgfixture.run";
/// The label of a container on the host's network ([`host_network`]): the port of
/// 127.0.0.1 its server listens on.
pub(crate) const LABEL_PORT: &str = "pgfixture.port";
const PORT: &str = "5432/tcp";
const CONTAINER_PORT: u16 = 5432;
/// A container's own address answers a TCP connection in well under a millisecond
/// when it is routed here at all.
const DIRECT_PROBE: Duration = Duration::from_millis(300);
/// Made inside the container (by the server, through `COPY ... TO`) once its creator
/// has connected, for the watchdog.
const SEEN_MARKER: &str = "/tmp/pgfixture-seen";
/// A container the creating process has not started after this long never will be.
const STUCK_CREATE: Duration = Duration::from_secs(20);
/// A container that refuses both the user's first password and its own for this long
/// was given another by someone else: its creator gives it its own within
/// milliseconds of its start.
const REFUSED_FOR: Duration = Duration::from_secs(2);

fn status_of(error: &DockerError) -> Option<u16> {
    match error {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

impl Docker {
    /// Connects to the daemon and makes sure the image is there (pulling it if needed).
    pub(crate) async fn connect(config: &Config) -> Result<Self> {
        let host = config.docker_host.clone();
        let unreachable = |reason: String| Error::Docker {
            message: format!(
                "no Docker daemon answers at {}: {reason} (start dockerd, set DOCKER_HOST, or set PGFIXTURE_BACKEND=local)",
                host.as_deref().unwrap_or("the default socket")
            ),
        };
        let client = match &config.docker_host {
            Some(h) => bollard::Docker::connect_with_host(h),
            None => bollard::Docker::connect_with_local_defaults(),
        }
        .map_err(|e| unreachable(e.to_string()))?;
        let client = crate::runtime::timeout(PING_TIMEOUT, client.negotiate_version())
            .await
            .map_err(|_| unreachable(format!("no answer within {PING_TIMEOUT:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        let mut docker = Docker {
            client,
            image: config.image.clone(),
            initialized: String::new(),
            has_initialized: false,
        };
        let base_id = docker.ensure_image().await?;
        docker.initialized = initialized_tag(&base_id, &image_owner()?);
        docker.has_initialized = docker
            .client
            .inspect_image(&docker.initialized)
            .await
            .is_ok();
        Ok(docker)
    }

    pub(crate) fn image(&self) -> &str {
        &self.image
    }

    /// The image's id, once it is there.
    async fn ensure_image(&self) -> Result<String> {
        let image_error = |e: DockerError| Error::Image {
            image: self.image.clone(),
            message: e.to_string(),
        };
        match self.client.inspect_image(&self.image).await {
            Ok(info) => return Ok(info.id.unwrap_or_default()),
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) => return Err(image_error(e)),
        }
        let _notice = SlowNotice::new(format!("pulling image {}", self.image));
        tracing::info!(image = %self.image, "pulling image");
        let options = CreateImageOptionsBuilder::new()
            .from_image(&self.image)
            .build();
        let mut pull = self.client.create_image(Some(options), None, None);
        while let Some(step) = pull.next().await {
            if let Err(e) = step {
                return Err(Error::Image {
                    image: self.image.clone(),
                    message: e.to_string(),
                });
            }
        }
        let info = self
            .client
            .inspect_image(&self.image)
            .await
            .map_err(image_error)?;
        Ok(info.id.unwrap_or_default())
    }

    /// The container `name`, created and started unless it runs already.
    pub(crate) async fn server(
        &self,
        name: &str,
        config: &Config,
        deadline: Instant,
    ) -> Result<(Server, bool)> {
        // The created-but-not-started container in the way, and since when.
        let mut conflict: Option<(String, Instant)> = None;
        // Since when the running container refused both of the user's passwords.
        let mut refused_since: Option<Instant> = None;
        loop {
            if let Some((server, reach)) = self.running(name).await? {
                match server
                    .wait_ready(deadline, || self.still_running(name))
                    .await
                {
                    Ok(()) => {
                        tracing::debug!(container = name, "reusing server");
                        let server = direct(name, server, &reach, config).await;
                        remember(name, &server);
                        return Ok((server, false));
                    }
                    // Its creator has not given it its own password yet, or died
                    // first: the user's first password still opens it.
                    Err(e) if refused(&e) => {
                        let first = Server {
                            password: bootstrap_password()?,
                            ..server.clone()
                        };
                        match first
                            .wait_ready(deadline, || self.still_running(name))
                            .await
                        {
                            Ok(()) => {}
                            // Given its own password meanwhile: once more with that.
                            // Refused both ways for longer than a start takes, it has
                            // a password pgfixture did not give it.
                            Err(e) if refused(&e) => {
                                let since = *refused_since.get_or_insert_with(Instant::now);
                                if since.elapsed() > REFUSED_FOR || Instant::now() >= deadline {
                                    return Err(e);
                                }
                                crate::runtime::sleep(Duration::from_millis(5)).await;
                                continue;
                            }
                            Err(e) => return Err(timeout_with(e, config)),
                        }
                        own_password(&first, &server.password).await?;
                        tracing::debug!(container = name, "reusing server");
                        let server = direct(name, server, &reach, config).await;
                        remember(name, &server);
                        return Ok((server, false));
                    }
                    // Stopped by its watchdog as we came: wait for it to go, start anew.
                    Err(Error::Docker { .. }) => continue,
                    Err(e) => return Err(timeout_with(e, config)),
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::AcquireTimeout {
                    timeout: config.acquire_timeout,
                    waiting_for: format!("container {name} to be removed or to start"),
                });
            }
            match self.create(name, config).await {
                Ok((password, output, reservation)) => {
                    let _notice = SlowNotice::new(format!(
                        "starting PostgreSQL container {name} from {}",
                        self.image
                    ));
                    let (port, reach) = self.port(name).await?.ok_or_else(|| Error::Docker {
                        message: format!("container {name} exited right after its start; try `docker run --rm {}`", self.image),
                    })?;
                    // It opens with the user's first password until it has its own.
                    let mut server = Server::loopback(port, bootstrap_password()?, name.to_owned());
                    let started = Instant::now();
                    let mut ready = server
                        .wait_ready(deadline, || self.still_running(name))
                        .await;
                    if matches!(&ready, Err(e) if refused(e)) {
                        // A process that found it on its first password gave it its
                        // own already.
                        server.password = password.clone();
                        ready = server
                            .wait_ready(deadline, || self.still_running(name))
                            .await;
                    }
                    // Its server listens now, or never will.
                    drop(reservation);
                    if matches!(&ready, Err(Error::Docker { .. }))
                        && reach.host_network
                        && port_taken(port)
                    {
                        tracing::debug!(
                            container = name,
                            port,
                            "another process took the container's port as it started; making it again"
                        );
                        continue;
                    }
                    if let (Err(Error::Docker { .. }), Some(output)) = (&ready, &output) {
                        // Give the output a moment to arrive.
                        crate::runtime::sleep(Duration::from_millis(200)).await;
                        let text = output.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        if let Some(error) = super::settings_error(config, &text) {
                            return Err(error);
                        }
                    }
                    ready.map_err(|e| match timeout_with(e, config) {
                        Error::AcquireTimeout {
                            timeout,
                            waiting_for,
                        } if reach.host_network => Error::AcquireTimeout {
                            timeout,
                            waiting_for: format!(
                                "{waiting_for}; the container is on the host's network, at 127.0.0.1:{port}: if this process does not share the Docker daemon's network, set PGFIXTURE_DOCKER_NETWORK=bridge"
                            ),
                        },
                        other => other,
                    })?;
                    own_password(&server, &password).await?;
                    let server = Server { password, ..server };
                    tracing::info!(container = name, image = %self.image, elapsed = ?started.elapsed(), "server started");
                    let server = direct(name, server, &reach, config).await;
                    remember(name, &server);
                    return Ok((server, true));
                }
                // Another process created it first: use theirs.
                Err(e) if status_of(&e) == Some(409) => {
                    // A creator that died between create and start leaves a container
                    // that never starts: remove it once it has blocked us for long. The
                    // wait is timed per container (by id): one that replaced it since
                    // is another process's fresh start, and must not be removed.
                    if let Some(id) = self.created_id(name).await {
                        match &conflict {
                            Some((seen, since)) if *seen == id => {
                                if since.elapsed() > STUCK_CREATE {
                                    tracing::warn!(
                                        container = name,
                                        "removing a container that was created but never started"
                                    );
                                    let options =
                                        RemoveContainerOptionsBuilder::new().force(true).build();
                                    let _ = self.client.remove_container(&id, Some(options)).await;
                                    conflict = None;
                                }
                            }
                            _ => conflict = Some((id, Instant::now())),
                        }
                    }
                    crate::runtime::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    return Err(Error::Docker {
                        message: format!("cannot create container {name} from {}: {e}", self.image),
                    });
                }
            }
        }
    }

    /// The running container `name` and its own addresses; `None` when there is none
    /// (waiting for one that is stopping to be removed).
    async fn running(&self, name: &str) -> Result<Option<(Server, Reach)>> {
        let info = match self.client.inspect_container(name, None).await {
            Ok(info) => info,
            Err(e) if status_of(&e) == Some(404) => return Ok(None),
            Err(e) => {
                return Err(Error::Docker {
                    message: format!("cannot inspect container {name}: {e}"),
                });
            }
        };
        let status = info.state.as_ref().and_then(|s| s.status);
        match status {
            Some(ContainerStateStatusEnum::RUNNING) | Some(ContainerStateStatusEnum::CREATED) => {}
            _ => {
                // Exited or being removed (auto-remove): make sure it goes, then create anew.
                let options = RemoveContainerOptionsBuilder::new().force(true).build();
                let _ = self.client.remove_container(name, Some(options)).await;
                crate::runtime::sleep(Duration::from_millis(100)).await;
                return Ok(None);
            }
        }
        match port_of(&info) {
            Some(port) => Ok(Some((
                Server::loopback(port, derived_password(name)?, name.to_owned()),
                Reach::of(&info),
            ))),
            // Created but not started yet by the process that creates it: the caller
            // waits (its create fails with a conflict) until the deadline.
            None => Ok(None),
        }
    }

    /// The id of the container `name` while it is created but not started.
    async fn created_id(&self, name: &str) -> Option<String> {
        let info = self.client.inspect_container(name, None).await.ok()?;
        let created =
            info.state.as_ref().and_then(|s| s.status) == Some(ContainerStateStatusEnum::CREATED);
        created.then_some(info.id).flatten()
    }

    /// The published port of the started container `name`, and its own addresses.
    async fn port(&self, name: &str) -> Result<Option<(u16, Reach)>> {
        let info = self
            .client
            .inspect_container(name, None)
            .await
            .map_err(|e| Error::Docker {
                message: format!("cannot inspect container {name}: {e}"),
            })?;
        Ok(port_of(&info).map(|port| (port, Reach::of(&info))))
    }

    async fn still_running(&self, name: &str) -> Result<()> {
        match self.client.inspect_container(name, None).await {
            Ok(info) if info.state.as_ref().and_then(|s| s.running) == Some(true) => Ok(()),
            _ if self.has_initialized => Err(Error::Docker {
                message: format!(
                    "container {name} stopped while starting; it was made from {}, which pgfixture initialised from {}: remove it (`docker rmi {0}`) and pgfixture goes back to running initdb in each container",
                    self.initialized, self.image
                ),
            }),
            _ => Err(Error::Docker {
                message: format!(
                    "container {name} stopped while starting; run `docker run --rm -e POSTGRES_PASSWORD=x {}` to see why",
                    self.image
                ),
            }),
        }
    }

    /// Removes pgfixture's containers (of any run) that were created but never started
    /// because their creator died between the two calls: nothing else would.
    async fn sweep_stuck(&self) {
        let options = bollard::query_parameters::ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&HashMap::from([("label", vec![format!("{LABEL}=1")])]))
            .build();
        let Ok(containers) = self.client.list_containers(Some(options)).await else {
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        let mut names = std::collections::HashSet::new();
        for container in containers {
            names.extend(
                container
                    .names
                    .iter()
                    .flatten()
                    .map(|n| n.trim_start_matches('/').to_owned()),
            );
            let stuck = container.state == Some(ContainerSummaryStateEnum::CREATED)
                && container
                    .created
                    .is_some_and(|t| now - t > STUCK_CREATE.as_secs() as i64);
            if let (true, Some(id)) = (stuck, container.id) {
                tracing::warn!(container = %id, "removing a container that was created but never started");
                let options = RemoveContainerOptionsBuilder::new().force(true).build();
                let _ = self.client.remove_container(&id, Some(options)).await;
            }
        }
        forget_gone(&names);
    }

    /// Creates and starts the container; returns its password, what it prints (when
    /// the user's settings may be refused), and the port held for it on the host's
    /// network ([`reserve_port`]), to drop once its server answers.
    async fn create(
        &self,
        name: &str,
        config: &Config,
    ) -> Result<(String, Option<Output>, Option<socket2::Socket>), DockerError> {
        self.sweep_stuck().await;
        spawn_reaper(name, config);
        let io = |e: Error| DockerError::IOError {
            err: std::io::Error::other(e.to_string()),
        };
        let password = derived_password(name).map_err(io)?;
        // The data directory (initdb's, or the initialised image's) holds the user's
        // first password; the container gets its own once its server is up.
        let verifier = bootstrap_password()
            .and_then(|p| scram_verifier(&p))
            .map_err(io)?;
        let image = if self.has_initialized {
            self.initialized.clone()
        } else {
            spawn_initializer(&self.image, &self.initialized, config);
            self.image.clone()
        };
        // On the host's network, the server takes a free port of 127.0.0.1, held for it
        // until it answers.
        let (host_port, reservation) = match host_network(config).then(reserve_port).flatten() {
            Some((port, socket)) => (Some(port), Some(socket)),
            None => (None, None),
        };
        let port = host_port.unwrap_or(CONTAINER_PORT);
        let socket_dir = new_socket_dir(name, port, config);
        // The official image's entry point runs any command that is not `postgres`
        // as is; the watchdog starts the entry point with `postgres` in the background.
        // It counts the connections on the second socket too, by their backends'
        // titles (`[local]`): the server's end of a connection from the host is in the
        // host's network namespace, out of the container's `/proc/net/unix`.
        let local = if socket_dir.is_some() { "1" } else { "" };
        let mut script = format!(
            "initialized={DATA_DIR}\n{COPY_DATA}docker-entrypoint.sh postgres \"$@\" &\npg=$!\nport={port}\nsocket=\nlocal={local}\nmarker={SEEN_MARKER}\n"
        );
        script.push_str(IDLE_LOOP);
        let mut cmd = vec![
            "sh".to_owned(),
            "-c".to_owned(),
            script,
            "pgfixture-watchdog".to_owned(),
        ];
        // Before the user's settings, which win.
        if let Some(port) = host_port {
            // The image listens on every address; on the host's network, loopback only.
            for setting in [
                format!("port={port}"),
                "listen_addresses=127.0.0.1".to_owned(),
            ] {
                cmd.push("-c".to_owned());
                cmd.push(setting);
            }
        }
        if socket_dir.is_some() {
            cmd.push("-c".to_owned());
            cmd.push(format!(
                "unix_socket_directories=/var/run/postgresql,{SOCKET_MOUNT}"
            ));
        }
        cmd.extend(server_args(config));
        let mut labels = HashMap::from([
            (LABEL.to_owned(), "1".to_owned()),
            (LABEL_RUN.to_owned(), config.run_id.clone()),
        ]);
        if let Some(port) = host_port {
            labels.insert(LABEL_PORT.to_owned(), port.to_string());
        }
        let body = |image: &str| ContainerCreateBody {
            image: Some(image.to_owned()),
            cmd: Some(cmd.clone()),
            env: Some(vec![
                format!("POSTGRES_USER={SUPERUSER}"),
                // The verifier, not the password: the API's bodies are logged.
                format!("POSTGRES_PASSWORD={verifier}"),
                "POSTGRES_DB=postgres".to_owned(),
                format!("POSTGRES_INITDB_ARGS={INITDB_ARGS}"),
                format!("PGDATA={MEMORY_DATA_DIR}"),
                format!("grace={}", config.server_grace().as_secs()),
            ]),
            labels: Some(labels.clone()),
            exposed_ports: host_port.is_none().then(|| vec![PORT.to_owned()]),
            host_config: Some(HostConfig {
                network_mode: host_port.map(|_| "host".to_owned()),
                auto_remove: Some(true),
                tmpfs: Some(HashMap::from([(
                    MEMORY_DIR.to_owned(),
                    "mode=1777".to_owned(),
                )])),
                binds: socket_dir
                    .as_ref()
                    .map(|dir| vec![format!("{}:{SOCKET_MOUNT}", dir.display())]),
                port_bindings: host_port.is_none().then(|| {
                    HashMap::from([(
                        PORT.to_owned(),
                        Some(vec![PortBinding {
                            host_ip: Some("127.0.0.1".to_owned()),
                            host_port: Some(String::new()),
                        }]),
                    )])
                }),
                ..HostConfig::default()
            }),
            ..ContainerCreateBody::default()
        };
        let options = CreateContainerOptionsBuilder::new().name(name).build();
        let created = match self
            .client
            .create_container(Some(options.clone()), body(&image))
            .await
        {
            // The initialised image was removed since this process looked (replaced by
            // one of a newer base image): start from the base image.
            Err(e) if status_of(&e) == Some(404) && image != self.image => {
                tracing::debug!(image, "initialised image gone; using the base image");
                self.client
                    .create_container(Some(options), body(&self.image))
                    .await
            }
            created => created,
        };
        if let Err(e) = created {
            // Another process's container, or none: the directory is nobody's.
            if let Some(dir) = &socket_dir {
                let _ = std::fs::remove_dir_all(dir);
            }
            return Err(e);
        }
        // With settings of the user's, the server's own words are kept for the error
        // if it refuses one: the container is gone (auto-removed) once it exits.
        let output = if config.server_settings.is_empty() {
            None
        } else {
            self.output(name).await
        };
        if let Err(e) = self.client.start_container(name, None).await {
            let options = RemoveContainerOptionsBuilder::new().force(true).build();
            let _ = self.client.remove_container(name, Some(options)).await;
            if let Some(dir) = &socket_dir {
                let _ = std::fs::remove_dir_all(dir);
            }
            return Err(e);
        }
        Ok((password, output, reservation))
    }

    /// What the container `name` prints, collected from now on (attached before it
    /// starts); `None` when the daemon does not let us attach.
    async fn output(&self, name: &str) -> Option<Output> {
        use futures::StreamExt;
        let options = bollard::query_parameters::AttachContainerOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .stream(true)
            .logs(true)
            .build();
        let attached = self
            .client
            .attach_container(name, Some(options))
            .await
            .ok()?;
        let output = Output::default();
        let sink = output.clone();
        let mut stream = attached.output;
        tokio::spawn(async move {
            while let Some(Ok(chunk)) = stream.next().await {
                let mut text = sink.0.lock().unwrap_or_else(|e| e.into_inner());
                // Enough for the server's start; a long-lived server's log is not kept.
                if text.len() < 64 * 1024 {
                    text.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
                } else {
                    break;
                }
            }
        });
        Some(output)
    }
}

/// What a container printed, collected as it runs.
#[derive(Debug, Clone, Default)]
pub(crate) struct Output(std::sync::Arc<std::sync::Mutex<String>>);

/// Copies an initialised image's data directory into the container's memory
/// ([`MEMORY_DATA_DIR`]), where its server runs, unless it is there already; the
/// script sets `$initialized` to [`DATA_DIR`].
const COPY_DATA: &str = r#"if [ -s "$initialized/PG_VERSION" ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA" && cp -a "$initialized/." "$PGDATA/" || exit 1
fi
"#;

/// The password every container of this user opens with: the one initdb stored from
/// `POSTGRES_PASSWORD`, in the container or in the initialised image. Derived from the
/// user's secret, as each container's own password is; a container takes its own
/// ([`own_password`]) as soon as its server is up, a millisecond where a single-user
/// server run before the start took about 0.1 s.
fn bootstrap_password() -> Result<String> {
    derived_password("initialized")
}

/// Gives the container of `server` (reached with the user's first password) its own
/// `password` (its SCRAM verifier), and tells its watchdog that it is in use, however
/// short the connections to it are. Processes that found it on its first password at
/// once take turns (two updates of the role at once fail: "tuple concurrently
/// updated").
async fn own_password(server: &Server, password: &str) -> Result<()> {
    let marker = format!("COPY (SELECT 1) TO '{SEEN_MARKER}'");
    let (admin, sql) = match server.admin().await {
        Ok(admin) => {
            let verifier = scram_verifier(password)?;
            let sql = format!(
                "BEGIN; SELECT pg_advisory_xact_lock({OWN_PASSWORD_LOCK}); \
                 ALTER ROLE \"{SUPERUSER}\" PASSWORD '{verifier}'; COMMIT; {marker}"
            );
            (admin, sql)
        }
        // Another process that found it on its first password gave it its own since.
        Err(e) if refused(&e) => {
            let own = Server {
                password: password.to_owned(),
                ..server.clone()
            };
            (own.admin().await?, marker)
        }
        Err(e) => return Err(e),
    };
    admin.batch_execute(&sql).await.map_err(Error::pg(format!(
        "giving container {} its password",
        server.name
    )))
}

/// The advisory lock under which a container gets its own password.
const OWN_PASSWORD_LOCK: i64 = 0x7067_6678_7077;

/// Whether `error` is a server's refusal of pgfixture's password.
fn refused(error: &Error) -> bool {
    error
        .postgres()
        .and_then(|e| e.code())
        .is_some_and(|c| *c == tokio_postgres::error::SqlState::INVALID_PASSWORD)
}

/// The tag of the image initialised from the image with id `base_id` for the user
/// `owner` ([`image_owner`]): the base image with an initialised data directory in
/// [`DATA_DIR`], so that containers skip initdb (1.5 s of a 1.9 s cold start here). It
/// holds the user's first password ([`bootstrap_password`]), so each user of a
/// Docker daemon has an image of their own.
fn initialized_tag(base_id: &str, owner: &str) -> String {
    let key = crate::digest::sha256_hex(
        format!("{INITIALIZED_LAYOUT}:{SUPERUSER}:{base_id}:{owner}"),
        8,
    );
    format!("pgfixture-initialized:{key}")
}

/// Who an initialised image is for: a digest of the user's first password, which
/// names the user's images (their tag, and the label `pgfixture.owner`) without
/// telling anything of the password.
fn image_owner() -> Result<String> {
    let owner = format!("pgfixture image owner:{}", bootstrap_password()?);
    Ok(crate::digest::sha256_hex(owner, 6))
}

/// Builds the initialised image `tag` from `base` in a detached `sh` with the `docker`
/// command, once per process (and once at a time: the builder container's name is
/// fixed), while this run's containers initialise themselves. The builder initialises
/// a data directory, stops the server cleanly, commits the container, and removes the
/// user's initialised images of the same base that are out of date (and those of
/// older pgfixtures, which had no owner), and the untagged ones no container uses; it
/// does nothing if the image exists by then. Nothing happens without the `docker`
/// command; containers then keep running initdb.
fn spawn_initializer(base: &str, tag: &str, config: &Config) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let (Ok(verifier), Ok(owner)) = (
            bootstrap_password().and_then(|p| scram_verifier(&p)),
            image_owner(),
        ) else {
            return;
        };
        // Inside the builder: run the entry point's initialisation and the server,
        // then stop the final server (the one that replaced the entry point) cleanly.
        let inside = r#"docker-entrypoint.sh postgres -c listen_addresses= -c fsync=off >/dev/null 2>&1 &
pg=$!
n=0
while :; do
    first=
    { read -r first; } < "$PGDATA/postmaster.pid" 2>/dev/null || true
    [ "$first" = "$pg" ] && grep -q ready "$PGDATA/postmaster.pid" 2>/dev/null && break
    kill -0 "$pg" 2>/dev/null || exit 1
    n=$((n + 1))
    [ "$n" -lt 1200 ] || exit 1
    sleep 0.05
done
kill -INT "$pg"
wait "$pg"
"#;
        let outside = r#"base=$1 tag=$2 name=$3 data=$4 inside=$5 initdb_args=$6 owner=$7
# Untagged initialised images of this base that no container uses any more: removed
# however the builder ends, also when another process's builder built the image or
# holds the builder's name.
prune() { docker image prune --force --filter "label=pgfixture.base=$base" >/dev/null 2>&1; }
# Built meanwhile by another process's builder: committing again would leave that
# image behind untagged.
docker image inspect "$tag" >/dev/null 2>&1 && { prune; exit 0; }
docker rm "$name" >/dev/null 2>&1
docker run --name "$name" --label pgfixture.initializer=1 \
    -e POSTGRES_USER=postgres -e POSTGRES_PASSWORD -e POSTGRES_DB=postgres \
    -e POSTGRES_INITDB_ARGS="$initdb_args" -e "PGDATA=$data" \
    "$base" sh -c "$inside" >/dev/null 2>&1 || { prune; exit 0; }
docker commit --change "LABEL pgfixture.base=$base" --change "LABEL pgfixture.owner=$owner" \
    "$name" "$tag" >/dev/null 2>&1
docker rm "$name" >/dev/null 2>&1
docker images --filter "label=pgfixture.base=$base" --format '{{.Repository}}:{{.Tag}}' |
    while read -r old; do
        [ "$old" = "$tag" ] && continue
        of=$(docker image inspect -f '{{index .Config.Labels "pgfixture.owner"}}' "$old" 2>/dev/null)
        case "$of" in "$owner" | "" | "<no value>") docker rmi "$old" >/dev/null 2>&1 ;; esac
    done
prune
"#;
        let name = format!("pgfixture-initializer-{}", tag.rsplit(':').next().unwrap_or(""));
        detached(
            outside,
            &[base, tag, &name, DATA_DIR, inside, INITDB_ARGS, &owner],
            &[("POSTGRES_PASSWORD", &verifier)],
            config,
        );
    });
}

/// Where the processes of a run find a container's port without asking Docker: three
/// API calls (version, image, container) cost more than the rest of a nextest
/// process's start. The password is derived ([`derived_password`]), never stored.
fn endpoints() -> std::path::PathBuf {
    crate::server::user_dir().join("docker-endpoints")
}

/// Records where the container `name`, which has accepted a connection, is reached
/// (`host:port`); the records of containers gone for a day are removed.
fn remember(name: &str, server: &Server) {
    let dir = endpoints();
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let staging = dir.join(format!(".{name}.{}", std::process::id()));
    // The address to use, and the published port on 127.0.0.1 on a second line; the
    // directory of its socket, when pgfixture's connections use one, on a third.
    let mut endpoint = match server.published_port {
        Some(published) => format!("{}:{}\n127.0.0.1:{published}\n", server.host, server.port),
        None => format!("{}:{}\n", server.host, server.port),
    };
    if let Some(dir) = &server.socket_dir {
        endpoint.push_str(&format!("{SOCKET_LINE}{dir}\n"));
    }
    if std::fs::write(&staging, endpoint).is_ok() {
        let _ = std::fs::rename(&staging, dir.join(name));
    }
    const DAY: Duration = Duration::from_secs(86400);
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() > DAY);
        if old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Removes the records of containers that no longer exist (`names` holds those that
/// do): without this, the directory gained a file per container and never lost one.
/// A record younger than a minute is kept: its container may have been created after
/// `names` was listed.
fn forget_gone(names: &std::collections::HashSet<String>) {
    const YOUNG: Duration = Duration::from_secs(60);
    for entry in std::fs::read_dir(endpoints())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let young = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() < YOUNG);
        if !young && !name.starts_with('.') && !names.contains(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    // Socket directories are named `<container>.<unique>`.
    for entry in std::fs::read_dir(socket_dirs())
        .into_iter()
        .flatten()
        .flatten()
    {
        let dir = entry.file_name().to_string_lossy().into_owned();
        let Some((name, _)) = dir.rsplit_once('.') else {
            continue;
        };
        let young = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() < YOUNG);
        if !young && !names.contains(name) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The container `name` as a process of the run recorded it, without asking Docker. A
/// stale record (the container stopped) fails the first connection, and the caller
/// then asks Docker.
pub(crate) fn known(name: &str) -> Result<Option<Server>> {
    let Ok(endpoint) = std::fs::read_to_string(endpoints().join(name)) else {
        return Ok(None);
    };
    let mut lines = endpoint.lines();
    let Some((host, port)) = lines.next().and_then(parse_endpoint) else {
        return Ok(None);
    };
    let published_port = lines.next().and_then(parse_endpoint).map(|(_, port)| port);
    let socket_dir = endpoint
        .lines()
        .find_map(|line| line.strip_prefix(SOCKET_LINE))
        .map(str::to_owned);
    let server = Server::loopback(port, derived_password(name)?, name.to_owned());
    Ok(Some(Server {
        host,
        published_port,
        socket_dir,
        ..server
    }))
}

/// The prefix of a record's line that names the container's socket directory.
const SOCKET_LINE: &str = "socket:";

/// The directories of the containers' sockets ([`new_socket_dir`]): the user's alone.
fn socket_dirs() -> std::path::PathBuf {
    crate::server::user_dir().join("sockets")
}

/// A new directory for the socket of the container `name`, about to be created, to be
/// bind-mounted at [`SOCKET_MOUNT`]: `None` where that cannot work. Only on Linux with
/// the daemon at its default socket (no `DOCKER_HOST`): Docker Desktop runs its daemon
/// in a virtual machine whose file sharing may refuse the directory and passes no
/// sockets, and a remote daemon has none of this host's directories. And only for a
/// path short enough for a socket address. Each container gets a directory of
/// its own, so that no file of an earlier one is in the way; those of containers gone
/// are removed with their records ([`forget_gone`]).
fn new_socket_dir(name: &str, port: u16, config: &Config) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if !cfg!(target_os = "linux") || config.docker_host.is_some() {
        return None;
    }
    let parent = socket_dirs();
    std::fs::create_dir_all(&parent).ok()?;
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o700)).ok()?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let unique = format!(
        "{:08x}",
        (stamp as u32) ^ std::process::id().rotate_left(16)
    );
    let dir = parent.join(format!("{name}.{unique}"));
    // A socket's path fits in 107 bytes.
    if dir.join(format!(".s.PGSQL.{port}")).as_os_str().len() > 107 {
        return None;
    }
    std::fs::create_dir(&dir).ok()?;
    // The server runs as the image's user: it makes its socket here.
    if std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).is_err() {
        let _ = std::fs::remove_dir(&dir);
        return None;
    }
    Some(dir)
}

/// How the container is reached: its addresses on its networks, and the directory its
/// server's second socket is in, when it has one.
struct Reach {
    addresses: Vec<IpAddr>,
    socket_dir: Option<String>,
    /// On the host's network: its server listens on 127.0.0.1 ([`LABEL_PORT`]).
    host_network: bool,
}

impl Reach {
    fn of(info: &bollard::models::ContainerInspectResponse) -> Reach {
        let socket_dir = info
            .mounts
            .iter()
            .flatten()
            .find(|m| m.destination.as_deref() == Some(SOCKET_MOUNT))
            .and_then(|m| m.source.clone());
        Reach {
            addresses: addresses_of(info),
            socket_dir,
            host_network: host_port_of(info).is_some(),
        }
    }
}

/// A detached `sh` that removes the container `name` if, after a while, it is still
/// (and for a second longer, the same one) created but not started: its creator was
/// killed between creating and starting it, and no other process came for it. It uses
/// the `docker` command when there is one; otherwise the next creation of any
/// pgfixture container sweeps it ([`Docker::sweep_stuck`]).
fn spawn_reaper(name: &str, config: &Config) {
    let script = "name=$2\n\
        sleep \"$1\"\n\
        stuck() { docker ps -aq --no-trunc --filter \"name=^/$name\\$\" --filter status=created; }\n\
        id=$(stuck)\n\
        [ -n \"$id\" ] || exit 0\n\
        sleep 1\n\
        [ \"$(stuck)\" = \"$id\" ] && docker rm -f \"$id\" >/dev/null 2>&1\n";
    detached(
        script,
        &[&STUCK_CREATE.as_secs().to_string(), name],
        &[],
        config,
    );
}

/// Runs `script` with `args` ($1...) and `env` in a detached `sh` (its own process
/// group, which outlives this process and a Ctrl-C of its runner), when there is a
/// `docker` command to use.
fn detached(script: &str, args: &[&str], env: &[(&str, &str)], config: &Config) {
    use std::os::unix::process::CommandExt;
    if !std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("docker").is_file()))
    {
        return;
    }
    let mut command = std::process::Command::new("sh");
    command
        .arg("-c")
        .arg("sh -c \"$0\" pgfixture-helper \"$@\" </dev/null >/dev/null 2>&1 &")
        .arg(script)
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0);
    if let Some(host) = &config.docker_host {
        command.env("DOCKER_HOST", host);
    }
    if let Err(error) = command.status() {
        tracing::debug!(%error, "could not start a detached helper");
    }
}

/// `host:port` (an IPv6 host without brackets: the port follows the last colon).
fn parse_endpoint(endpoint: &str) -> Option<(String, u16)> {
    let (host, port) = endpoint.trim().rsplit_once(':')?;
    let host: std::net::IpAddr = host.parse().ok()?;
    Some((host.to_string(), port.parse().ok()?))
}

/// `server` reached at the container's own address on its network instead of the
/// published port, when that address answers from here. Every connection through a
/// published port passes Docker's userland proxy (`docker-proxy`), which adds 0.1–0.3 ms
/// to every round trip. The container's address answers when the daemon runs on this
/// host (Linux); on Docker Desktop, a remote `DOCKER_HOST` or a network that is not
/// routed here, the published port is kept.
///
/// Reached directly, its server's second socket, when it has one that answers from
/// here, is what pgfixture's own connections use ([`Server::own_pg_config`]).
async fn direct(name: &str, server: Server, reach: &Reach, config: &Config) -> Server {
    let local_daemon = config
        .docker_host
        .as_deref()
        .is_none_or(|host| host.starts_with("unix://"));
    if !local_daemon {
        return server;
    }
    if reach.host_network {
        // Listening on this host's loopback already: that is its published address.
        let server = Server {
            published_port: Some(server.port),
            ..server
        };
        return with_socket(server, reach).await;
    }
    for &address in &reach.addresses {
        let probe = tokio::net::TcpStream::connect((address, CONTAINER_PORT));
        if let Ok(Ok(_)) = crate::runtime::timeout(DIRECT_PROBE, probe).await {
            tracing::debug!(container = name, %address, "connecting to the container directly");
            let server = Server {
                host: address.to_string(),
                port: CONTAINER_PORT,
                published_port: Some(server.port),
                ..server
            };
            return with_socket(server, reach).await;
        }
    }
    server
}

/// `server` through its second socket, when it has one that answers from here.
async fn with_socket(server: Server, reach: &Reach) -> Server {
    let Some(dir) = &reach.socket_dir else {
        return server;
    };
    let socket = std::path::Path::new(dir).join(format!(".s.PGSQL.{}", server.port));
    let probe = tokio::net::UnixStream::connect(socket);
    match crate::runtime::timeout(DIRECT_PROBE, probe).await {
        Ok(Ok(_)) => server.with_socket_dir(std::path::Path::new(dir)),
        _ => server,
    }
}

/// Whether a new container goes on the host's network ([`DockerNetwork`]). By default
/// only where that network is this process's: on Linux, with the daemon at its default
/// socket (a `DOCKER_HOST` may be a rootless daemon, whose host network is a namespace
/// of its own, or a remote one), and with the daemon's bridge `docker0` among this
/// process's interfaces. Tests that run in a container of their own, beside the host's
/// daemon, see no `docker0` and keep the bridge.
fn host_network(config: &Config) -> bool {
    match config.docker_network {
        DockerNetwork::Host => true,
        DockerNetwork::Bridge => false,
        DockerNetwork::Auto => {
            cfg!(target_os = "linux")
                && config.docker_host.is_none()
                && std::path::Path::new("/sys/class/net/docker0").exists()
        }
    }
}

/// A free port of 127.0.0.1 for a server on the host's network, held by a socket bound
/// to it with `SO_REUSEADDR` and not listening: no other process's pick of a free port
/// (a `bind` to port 0) lands on it while the socket lives, and the server, which sets
/// `SO_REUSEADDR` too, can bind and listen on it meanwhile.
fn reserve_port() -> Option<(u16, socket2::Socket)> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).ok()?;
    socket.set_reuse_address(true).ok()?;
    let loopback = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
    socket.bind(&loopback.into()).ok()?;
    let port = socket.local_addr().ok()?.as_socket()?.port();
    Some((port, socket))
}

/// Whether a server on the host's network that stopped as it started found its port
/// taken: a program that binds that port itself (no pick of a free port can take it,
/// [`reserve_port`]) listened on it first.
fn port_taken(port: u16) -> bool {
    std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port))
        .is_err_and(|e| e.kind() == std::io::ErrorKind::AddrInUse)
}

/// The port of a container on the host's network ([`LABEL_PORT`]).
fn host_port_of(info: &bollard::models::ContainerInspectResponse) -> Option<u16> {
    info.config
        .as_ref()?
        .labels
        .as_ref()?
        .get(LABEL_PORT)?
        .parse()
        .ok()
}

/// The container's addresses on its networks.
fn addresses_of(info: &bollard::models::ContainerInspectResponse) -> Vec<IpAddr> {
    info.network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .into_iter()
        .flat_map(|networks| networks.values())
        .filter_map(|endpoint| endpoint.ip_address.as_deref()?.parse().ok())
        .collect()
}

/// The port of 127.0.0.1 the container's server is reached on: its own, on the host's
/// network, else the one published for it.
fn port_of(info: &bollard::models::ContainerInspectResponse) -> Option<u16> {
    if let Some(port) = host_port_of(info) {
        return Some(port);
    }
    info.network_settings
        .as_ref()?
        .ports
        .as_ref()?
        .get(PORT)?
        .as_ref()?
        .iter()
        .find_map(|b| b.host_port.as_deref()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::{initialized_tag, parse_endpoint, port_taken, reserve_port};

    /// The server, like `std`'s listeners, binds with `SO_REUSEADDR`: it can listen on
    /// the reserved port, which no pick of a free port gets while it is held.
    #[test]
    fn a_reserved_port_is_nobody_elses_but_its_server_can_listen_on_it() {
        use std::net::{Ipv4Addr, TcpListener};
        let (port, reservation) = reserve_port().expect("a free port");
        assert!(!port_taken(port));
        let picks: Vec<TcpListener> = (0..200)
            .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap())
            .collect();
        assert!(
            picks.iter().all(|l| l.local_addr().unwrap().port() != port),
            "a pick of a free port got the reserved one"
        );
        let server = TcpListener::bind((Ipv4Addr::LOCALHOST, port));
        assert!(server.is_ok(), "{server:?}");
        assert!(port_taken(port));
        drop(reservation);
        assert!(port_taken(port), "the server keeps its port");
    }

    #[test]
    fn each_owner_and_base_image_has_an_initialised_image_of_its_own() {
        let tag = initialized_tag("sha256:aa", "0123456789ab");
        assert!(tag.starts_with("pgfixture-initialized:"), "{tag}");
        assert_eq!(tag, initialized_tag("sha256:aa", "0123456789ab"));
        assert_ne!(tag, initialized_tag("sha256:aa", "ba9876543210"));
        assert_ne!(tag, initialized_tag("sha256:ab", "0123456789ab"));
    }

    #[test]
    fn endpoints_parse_back() {
        assert_eq!(
            parse_endpoint("172.17.0.2:5432\n"),
            Some(("172.17.0.2".to_owned(), 5432))
        );
        assert_eq!(
            parse_endpoint("fd00::2:5432"),
            Some(("fd00::2".to_owned(), 5432))
        );
        // A record of an older version (a bare port), or garbage: ask Docker instead.
        assert_eq!(parse_endpoint("32781"), None);
        assert_eq!(parse_endpoint("host:5432"), None);
        assert_eq!(parse_endpoint("127.0.0.1:port"), None);
    }
}
