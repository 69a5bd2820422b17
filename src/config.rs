//! Configuration, and the only place where the environment is read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::sqlx_toml::SqlxToml;
use crate::worker::WorkerId;
use crate::{Error, Result};

/// The official image, current major, alpine flavour.
pub const DEFAULT_IMAGE: &str = "postgres:18-alpine";
/// In-process worker slots when neither `PGFIXTURE_WORKERS` nor `RUST_TEST_THREADS` says.
const FALLBACK_WORKERS: usize = 4;
/// More workers than this is a typo, not a test machine: each one is a database or a server.
const MAX_WORKERS: usize = 256;
/// Connections per worker pool above this would not fit any server's `max_connections`.
const MAX_POOL_SIZE: usize = 100;
/// An hour is longer than any sane server start; a bigger value is a typo.
const MAX_SECONDS: f64 = 3600.0;
/// Idle time after the last connection before a server is stopped (nextest has no
/// teardown hook, so a server cannot know the run is over).
const DEFAULT_GRACE: Duration = Duration::from_secs(10);
const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle time of servers kept for the next run (`PGFIXTURE_REUSE=1`).
const DEFAULT_REUSE_IDLE: Duration = Duration::from_secs(600);
/// A day: reused servers idle longer than this are forgotten ones.
const MAX_REUSE_IDLE: f64 = 86400.0;

/// How workers are kept apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Isolation {
    /// One server per worker. Strongest isolation (roles, extensions, settings and
    /// server crashes stay per worker); costs a server start per worker (about a second
    /// with initdb) and memory per server.
    Container,
    /// One shared server, one database per worker cloned from a template database that
    /// holds the fixtures. A clone costs tens of milliseconds; roles and server
    /// settings are shared between workers.
    #[default]
    Database,
    /// One shared server and database, one schema per worker, selected through the
    /// connections' `search_path`. Cheapest to provision; fixtures run once per schema,
    /// and anything that is not schema-scoped (extensions, roles, databases) is shared.
    Schema,
}

impl Isolation {
    fn parse(value: &str) -> Result<Self> {
        match value {
            "container" => Ok(Isolation::Container),
            "database" => Ok(Isolation::Database),
            "schema" => Ok(Isolation::Schema),
            _ => Err(Error::config(
                "PGFIXTURE_ISOLATION",
                value,
                "must be one of container, database, schema",
            )),
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Isolation::Container => "container",
            Isolation::Database => "database",
            Isolation::Schema => "schema",
        }
    }
}

/// Where servers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// Docker when a daemon answers, else local binaries, else an error listing the fixes.
    #[default]
    Auto,
    /// Containers of `image` on the Docker daemon (`DOCKER_HOST` or the default socket).
    Docker,
    /// Servers spawned from installed PostgreSQL binaries, each in its own temporary
    /// data directory on a free loopback port.
    Local,
    /// An existing server (`PGFIXTURE_URL`), shared by any number of runs: worker
    /// databases and schemas carry the run in their names and marks.
    Url,
}

impl Backend {
    fn parse(value: &str) -> Result<Self> {
        match value {
            "auto" => Ok(Backend::Auto),
            "docker" => Ok(Backend::Docker),
            "local" => Ok(Backend::Local),
            "url" => Ok(Backend::Url),
            _ => Err(Error::config(
                "PGFIXTURE_BACKEND",
                value,
                "must be one of auto, docker, local, url",
            )),
        }
    }
}

/// How the Docker backend's containers are networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DockerNetwork {
    /// [`DockerNetwork::Host`] where the daemon runs in this process's network
    /// namespace (Linux, the daemon at its default socket, and its `docker0` bridge
    /// here), else [`DockerNetwork::Bridge`].
    #[default]
    Auto,
    /// The host's network, the server on a free port of 127.0.0.1: a container starts
    /// about 0.1 s sooner, with no network of its own to set up and no port to publish.
    Host,
    /// Docker's default network, the server's port published on 127.0.0.1 (Docker
    /// Desktop, a remote daemon, tests that run in a container of their own).
    Bridge,
}

impl DockerNetwork {
    fn parse(value: &str) -> Result<Self> {
        match value {
            "auto" => Ok(DockerNetwork::Auto),
            "host" => Ok(DockerNetwork::Host),
            "bridge" => Ok(DockerNetwork::Bridge),
            _ => Err(Error::config(
                "PGFIXTURE_DOCKER_NETWORK",
                value,
                "must be one of auto, host, bridge",
            )),
        }
    }
}

/// Everything a [`Fixture`](crate::Fixture) needs to know.
///
/// [`Config::from_env`] reads it from the environment (the table in the README);
/// [`Config::default`] gives the defaults without reading anything.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// How workers are kept apart. `PGFIXTURE_ISOLATION`; default [`Isolation::Database`].
    pub isolation: Isolation,
    /// Where servers come from. `PGFIXTURE_BACKEND`; default [`Backend::Auto`].
    pub backend: Backend,
    /// Image for the Docker backend. `PGFIXTURE_IMAGE`; default [`DEFAULT_IMAGE`].
    pub image: String,
    /// How the Docker backend's containers are networked. `PGFIXTURE_DOCKER_NETWORK`;
    /// default [`DockerNetwork::Auto`].
    pub docker_network: DockerNetwork,
    /// Directory of `*.sql` fixtures, applied in file-name order. `PGFIXTURE_FIXTURES`;
    /// default `$CARGO_MANIFEST_DIR/fixtures` when it exists, else none.
    pub fixtures: Option<PathBuf>,
    /// Directory of migrations, applied into each template (each worker schema in
    /// schema mode) before the fixtures: plain `*.sql` files in file-name order, or
    /// sqlx's layout through sqlx's migrator (feature `sqlx`). `PGFIXTURE_MIGRATIONS`
    /// (`none`: no migrations); default `$CARGO_MANIFEST_DIR/migrations` when it
    /// exists, else none.
    pub migrations: Option<PathBuf>,
    /// A fixed worker id for this process. `PGFIXTURE_WORKER`, else
    /// `NEXTEST_TEST_GLOBAL_SLOT`; default none: in-process slots.
    pub worker: Option<WorkerId>,
    /// In-process worker slots. `PGFIXTURE_WORKERS`; default the test harness's
    /// `--test-threads` argument or `RUST_TEST_THREADS`, else
    /// the available parallelism (at least 2, so that a test that waits on another does
    /// not starve).
    pub workers: usize,
    /// Connections per worker pool. `PGFIXTURE_POOL_SIZE`; default 8, lowered so that
    /// every pool fits the server's `max_connections`.
    pub pool_size: Option<usize>,
    /// Limit on waiting for a free worker plus starting its server.
    /// `PGFIXTURE_ACQUIRE_TIMEOUT` (seconds); default 30 s.
    pub acquire_timeout: Duration,
    /// Fail instead of falling back to local binaries when Docker does not answer.
    /// `PGFIXTURE_REQUIRE_DOCKER=1`; default off.
    pub require_docker: bool,
    /// How long a server stays up after its last connection closed. `PGFIXTURE_GRACE`
    /// (seconds); default 10 s.
    pub grace: Duration,
    /// Directory of the PostgreSQL server binaries for the local backend.
    /// `PGFIXTURE_PG_BIN`; default: `PATH`, then `pg_config --bindir`, then
    /// `/usr/lib/postgresql/*/bin` (newest first).
    pub pg_bin: Option<PathBuf>,
    /// Where the local backend keeps its servers (data directories, logs, sockets) and
    /// its cache of initialised data directories. `PGFIXTURE_LOCAL_DIR` (an absolute
    /// path); default `/dev/shm/pgfixture-<uid>` when `/dev/shm` is a tmpfs of at
    /// least 1 GiB (memory, where creating a database takes a fifth of the time it
    /// takes on a disk), else `$TMPDIR/pgfixture-<uid>`.
    pub local_dir: Option<PathBuf>,
    /// The run that servers and databases belong to. `PGFIXTURE_RUN_ID`, else
    /// `NEXTEST_RUN_ID`; default: this process.
    pub run_id: String,
    /// The existing server of the `url` backend. `PGFIXTURE_URL`; its `Debug` output
    /// hides the password.
    pub url: Option<ServerUrl>,
    /// Keep servers, templates and worker databases after the run, for the next one.
    /// `PGFIXTURE_REUSE=1`; default off. The environment then also fixes the run id
    /// (per project directory) unless `PGFIXTURE_RUN_ID` sets one.
    pub reuse: bool,
    /// How long reused servers stay up without a connection. `PGFIXTURE_REUSE_IDLE`
    /// (seconds); default 10 minutes.
    pub reuse_idle: Duration,
    /// Allow `PGFIXTURE_URL` to name a host that is not loopback.
    /// `PGFIXTURE_ALLOW_REMOTE=1`; default off.
    pub allow_remote: bool,
    /// `-c` settings for the servers pgfixture starts (time zone,
    /// `shared_preload_libraries`, `max_connections`, `log_statement`, ...), after
    /// pgfixture's own, so they win. Servers with other settings are other servers.
    /// `PGFIXTURE_SERVER_SETTINGS` (`timezone=UTC,log_statement=all`; a value that holds
    /// a comma goes in single quotes); default none.
    pub server_settings: Vec<(String, String)>,
    /// Restart every sequence at the value the fixtures left when each test begins,
    /// inside its transaction, so that ids are those of a fresh database (what
    /// `#[sqlx::test]` users assume with `id == 1`). `PGFIXTURE_RESET_SEQUENCES=1`;
    /// default off. Not in schema mode on a server of your own (`PGFIXTURE_URL`).
    pub reset_sequences: bool,
    pub(crate) docker_host: Option<String>,
    pub(crate) path: Option<String>,
    /// No fixtures directory was looked for: neither `PGFIXTURE_FIXTURES` nor
    /// `CARGO_MANIFEST_DIR` is set (a test binary run outside cargo).
    pub(crate) fixtures_unknown: bool,
    /// The same for the migrations folder (`PGFIXTURE_MIGRATIONS`).
    pub(crate) migrations_unknown: bool,
    /// The `[migrate]` section of the crate's `sqlx.toml` (feature `sqlx`): the
    /// default migrations folder, and how sqlx's migrator records a folder in sqlx's
    /// layout.
    pub(crate) sqlx_toml: Option<SqlxToml>,
    /// `CARGO_MANIFEST_DIR` is not set: no `sqlx.toml` was looked for.
    pub(crate) sqlx_toml_unknown: bool,
    /// A sqlx migrator given in code, instead of `migrations`.
    #[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
    pub(crate) migrator: Option<MigratorRef>,
    /// Code of the user's that builds part of the template
    /// ([`crate::FixtureBuilder::setup`]).
    pub(crate) setup: Option<crate::setup::Setup>,
}

/// A static sqlx migrator (`sqlx::migrate!()`) of either major, compared by address.
/// Not nameable outside the crate: [`SqlxMigrator`] hands it over.
#[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
#[derive(Clone, Copy)]
pub enum MigratorRef {
    /// sqlx 0.9's, pgfixture's own sqlx.
    #[cfg(feature = "sqlx")]
    Sqlx(&'static ::sqlx::migrate::Migrator),
    /// sqlx 0.8's, the test crate's own (feature `sqlx-0_8`), run by sqlx 0.8 itself.
    #[cfg(feature = "sqlx-0_8")]
    Sqlx0_8(&'static ::sqlx08::migrate::Migrator),
}

/// One migration of a [`MigratorRef`], as either major holds it.
#[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
pub(crate) struct MigrationRef<'a> {
    pub(crate) version: i64,
    pub(crate) description: &'a str,
    pub(crate) down: bool,
    pub(crate) checksum: &'a [u8],
    pub(crate) sql: &'a str,
}

#[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
impl MigratorRef {
    /// Its migrations, in its order.
    pub(crate) fn migrations(&self) -> Vec<MigrationRef<'static>> {
        /// The fields both majors name alike; the SQL is the one that differs.
        macro_rules! each {
            ($m:expr, |$one:ident| $sql:expr) => {
                $m.iter()
                    .map(|$one| MigrationRef {
                        version: $one.version,
                        description: &$one.description,
                        down: $one.migration_type.is_down_migration(),
                        checksum: &$one.checksum,
                        sql: $sql,
                    })
                    .collect()
            };
        }
        match *self {
            #[cfg(feature = "sqlx")]
            MigratorRef::Sqlx(m) => each!(m, |one| one.sql.as_str()),
            #[cfg(feature = "sqlx-0_8")]
            MigratorRef::Sqlx0_8(m) => each!(m, |one| &one.sql),
        }
    }

    /// Where it records its migrations, as a line for keys: its table and the schemas
    /// it creates (sqlx 0.9), or the major that records them in sqlx's default table.
    pub(crate) fn record(&self) -> String {
        match self {
            #[cfg(feature = "sqlx")]
            MigratorRef::Sqlx(m) => format!("{:?} {:?}", m.table_name, m.create_schemas),
            #[cfg(feature = "sqlx-0_8")]
            MigratorRef::Sqlx0_8(_) => "sqlx 0.8".to_owned(),
        }
    }

    /// Its table (empty for sqlx's default) and the schemas it creates.
    pub(crate) fn table_and_schemas(&self) -> (&'static str, Vec<&'static str>) {
        match *self {
            #[cfg(feature = "sqlx")]
            MigratorRef::Sqlx(m) => (
                &m.table_name,
                m.create_schemas.iter().map(|s| &**s).collect(),
            ),
            #[cfg(feature = "sqlx-0_8")]
            MigratorRef::Sqlx0_8(_) => ("", Vec::new()),
        }
    }

    fn address(&self) -> *const () {
        match *self {
            #[cfg(feature = "sqlx")]
            MigratorRef::Sqlx(m) => std::ptr::from_ref(m).cast(),
            #[cfg(feature = "sqlx-0_8")]
            MigratorRef::Sqlx0_8(m) => std::ptr::from_ref(m).cast(),
        }
    }
}

#[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
impl PartialEq for MigratorRef {
    fn eq(&self, other: &Self) -> bool {
        self.address() == other.address()
    }
}

/// Without the address: the configuration's text names its workers and containers
/// (see `Inner::instance`), and every process loads the migrator at an address of its
/// own. What the migrations hold is in the fixtures' hash.
#[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
impl std::fmt::Debug for MigratorRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let versions: Vec<i64> = self.migrations().iter().map(|m| m.version).collect();
        match self {
            #[cfg(feature = "sqlx")]
            MigratorRef::Sqlx(_) => write!(f, "Migrator(versions {versions:?})"),
            #[cfg(feature = "sqlx-0_8")]
            MigratorRef::Sqlx0_8(_) => write!(f, "Migrator 0.8(versions {versions:?})"),
        }
    }
}

/// A static sqlx migrator pgfixture runs as it is, through its own sqlx:
/// `static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!()` of sqlx 0.9 (feature
/// `sqlx`) or of sqlx 0.8 (feature `sqlx-0_8`, without sqlx 0.9). Given to
/// [`FixtureBuilder::sqlx_migrator`](crate::FixtureBuilder::sqlx_migrator) and to
/// `#[pgfixture::test(migrator = "...")]`.
#[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a sqlx migrator pgfixture can run",
    label = "not a `static` of `sqlx::migrate!()`",
    note = "pgfixture runs a `sqlx::migrate::Migrator` of sqlx 0.9 (feature `sqlx`) or of sqlx 0.8 (feature `sqlx-0_8`)"
)]
pub trait SqlxMigrator: Sync + 'static {
    /// The migrator, as pgfixture holds it.
    #[doc(hidden)]
    fn __migrator(&'static self) -> MigratorRef;
}

#[cfg(feature = "sqlx")]
impl SqlxMigrator for ::sqlx::migrate::Migrator {
    fn __migrator(&'static self) -> MigratorRef {
        MigratorRef::Sqlx(self)
    }
}

#[cfg(feature = "sqlx-0_8")]
impl SqlxMigrator for ::sqlx08::migrate::Migrator {
    fn __migrator(&'static self) -> MigratorRef {
        MigratorRef::Sqlx0_8(self)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            isolation: Isolation::default(),
            backend: Backend::default(),
            image: DEFAULT_IMAGE.to_owned(),
            docker_network: DockerNetwork::default(),
            fixtures: None,
            migrations: None,
            worker: None,
            workers: default_workers(None),
            pool_size: None,
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
            require_docker: false,
            grace: DEFAULT_GRACE,
            pg_bin: None,
            local_dir: None,
            run_id: process_run_id(),
            url: None,
            reuse: false,
            reuse_idle: DEFAULT_REUSE_IDLE,
            allow_remote: false,
            server_settings: Vec::new(),
            reset_sequences: false,
            docker_host: None,
            path: None,
            fixtures_unknown: false,
            migrations_unknown: false,
            sqlx_toml: None,
            sqlx_toml_unknown: false,
            #[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
            migrator: None,
            setup: None,
        }
    }
}

/// A source of environment variables: the process environment, or a map in unit tests.
pub trait Env {
    /// The value of `name`, if set (an empty value counts as unset).
    fn var(&self, name: &str) -> Option<String>;

    /// The test harness's `--test-threads` argument (`cargo test -- --test-threads 8`),
    /// when the process was given one. None by default.
    fn test_threads_arg(&self) -> Option<String> {
        None
    }
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsEnv;

impl Env for OsEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }

    fn test_threads_arg(&self) -> Option<String> {
        test_threads_arg(std::env::args())
    }
}

/// The value of `--test-threads N` or `--test-threads=N` among a test binary's
/// arguments (the harness takes the last one given).
fn test_threads_arg(args: impl IntoIterator<Item = String>) -> Option<String> {
    let mut found = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--" {
            break;
        }
        if arg == "--test-threads" {
            found = args.next();
        } else if let Some(value) = arg.strip_prefix("--test-threads=") {
            found = Some(value.to_owned());
        }
    }
    found
}

impl Env for HashMap<&str, &str> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name)
            .filter(|v| !v.is_empty())
            .map(|v| (*v).to_owned())
    }
}

impl Config {
    /// The configuration the environment describes.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the variable when a value is invalid.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(&OsEnv)
    }

    /// The configuration `env` describes; [`Config::from_env`] with a fake environment.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the variable when a value is invalid.
    pub fn from_lookup(env: &impl Env) -> Result<Self> {
        let mut config = Config {
            docker_host: env.var("DOCKER_HOST"),
            path: env.var("PATH"),
            ..Config::default()
        };
        if let Some(v) = env.var("PGFIXTURE_ISOLATION") {
            config.isolation = Isolation::parse(v.trim())?;
        }
        if let Some(v) = env.var("PGFIXTURE_BACKEND") {
            config.backend = Backend::parse(v.trim())?;
        }
        if let Some(v) = env.var("PGFIXTURE_IMAGE") {
            config.image = parse_image(&v)?;
        }
        if let Some(v) = env.var("PGFIXTURE_DOCKER_NETWORK") {
            config.docker_network = DockerNetwork::parse(v.trim())?;
        }
        config.fixtures_unknown =
            env.var("PGFIXTURE_FIXTURES").is_none() && env.var("CARGO_MANIFEST_DIR").is_none();
        config.fixtures = match env.var("PGFIXTURE_FIXTURES") {
            Some(dir) => Some(PathBuf::from(dir)),
            None => env
                .var("CARGO_MANIFEST_DIR")
                .map(|dir| PathBuf::from(dir).join("fixtures"))
                .filter(|dir| dir.is_dir()),
        };
        config.migrations_unknown =
            env.var("PGFIXTURE_MIGRATIONS").is_none() && env.var("CARGO_MANIFEST_DIR").is_none();
        match env.var("CARGO_MANIFEST_DIR") {
            Some(dir) => config.sqlx_toml = SqlxToml::read(Path::new(&dir))?,
            None => config.sqlx_toml_unknown = true,
        }
        config.migrations = match env.var("PGFIXTURE_MIGRATIONS") {
            // No migrations, whatever `<crate>/migrations` holds.
            Some(v) if v.trim() == "none" => None,
            Some(dir) => Some(PathBuf::from(dir)),
            None => env
                .var("CARGO_MANIFEST_DIR")
                .and_then(|dir| config.default_migrations(Path::new(&dir))),
        };
        config.worker = match (
            env.var("PGFIXTURE_WORKER"),
            env.var("NEXTEST_TEST_GLOBAL_SLOT"),
        ) {
            (Some(id), _) => Some(
                WorkerId::parse(&id)
                    .map_err(|expected| Error::config("PGFIXTURE_WORKER", id.clone(), expected))?,
            ),
            (None, Some(slot)) => Some(slot.trim().parse::<u32>().map(WorkerId::slot).map_err(
                |_| {
                    Error::config(
                        "NEXTEST_TEST_GLOBAL_SLOT",
                        slot.clone(),
                        "must be a slot number",
                    )
                },
            )?),
            (None, None) => None,
        };
        // The harness takes its argument over the variable; so do the worker slots. An
        // invalid variable is an error either way.
        let from_var = match env.var("RUST_TEST_THREADS") {
            Some(v) => Some(parse_count("RUST_TEST_THREADS", &v, MAX_WORKERS)?),
            None => None,
        };
        let test_threads = match env.test_threads_arg() {
            Some(v) => Some(parse_count("--test-threads", &v, MAX_WORKERS)?),
            None => from_var,
        };
        config.workers = match env.var("PGFIXTURE_WORKERS") {
            Some(v) => parse_count("PGFIXTURE_WORKERS", &v, MAX_WORKERS)?,
            None => default_workers(test_threads),
        };
        if let Some(v) = env.var("PGFIXTURE_POOL_SIZE") {
            config.pool_size = Some(parse_count("PGFIXTURE_POOL_SIZE", &v, MAX_POOL_SIZE)?);
        }
        if let Some(v) = env.var("PGFIXTURE_ACQUIRE_TIMEOUT") {
            config.acquire_timeout = parse_seconds("PGFIXTURE_ACQUIRE_TIMEOUT", &v, false)?;
        }
        if let Some(v) = env.var("PGFIXTURE_GRACE") {
            config.grace = parse_seconds("PGFIXTURE_GRACE", &v, true)?;
        }
        if let Some(v) = env.var("PGFIXTURE_REQUIRE_DOCKER") {
            config.require_docker = parse_flag("PGFIXTURE_REQUIRE_DOCKER", &v)?;
        }
        if let Some(v) = env.var("PGFIXTURE_PG_BIN") {
            config.pg_bin = Some(PathBuf::from(v));
        }
        if let Some(v) = env.var("PGFIXTURE_LOCAL_DIR") {
            let dir = PathBuf::from(v.trim());
            if !dir.is_absolute() {
                return Err(Error::config(
                    "PGFIXTURE_LOCAL_DIR",
                    &v,
                    "must be an absolute path, such as /var/tmp/pgfixture",
                ));
            }
            config.local_dir = Some(dir);
        }
        if let Some(v) = env.var("PGFIXTURE_URL") {
            config.url = Some(ServerUrl::parse(&v)?);
        }
        if let Some(v) = env.var("PGFIXTURE_SERVER_SETTINGS") {
            config.server_settings = parse_server_settings(&v)?;
        }
        if let Some(v) = env.var("PGFIXTURE_RESET_SEQUENCES") {
            config.reset_sequences = parse_flag("PGFIXTURE_RESET_SEQUENCES", &v)?;
        }
        if let Some(v) = env.var("PGFIXTURE_ALLOW_REMOTE") {
            config.allow_remote = parse_flag("PGFIXTURE_ALLOW_REMOTE", &v)?;
        }
        if let Some(v) = env.var("PGFIXTURE_REUSE") {
            config.reuse = parse_flag("PGFIXTURE_REUSE", &v)?;
        }
        if let Some(v) = env.var("PGFIXTURE_REUSE_IDLE") {
            config.reuse_idle =
                parse_seconds_up_to("PGFIXTURE_REUSE_IDLE", &v, false, MAX_REUSE_IDLE)?;
        }
        if let Some(v) = env.var("PGFIXTURE_RUN_ID") {
            config.run_id = parse_run_id("PGFIXTURE_RUN_ID", &v)?;
        } else if config.reuse {
            // Every run of this project finds the last one's servers by this name.
            let project = env.var("CARGO_MANIFEST_DIR").unwrap_or_default();
            config.run_id = reuse_run_id(&project);
        } else if let Some(v) = env.var("NEXTEST_RUN_ID") {
            config.run_id = parse_run_id("NEXTEST_RUN_ID", &v)?;
        } else if let Some(id) = cargo_run_id() {
            config.run_id = id.to_owned();
        }
        Ok(config)
    }
}

/// The run of the `cargo test` (or `cargo run`) that runs this process: its parent when
/// that is `cargo`, by pid and start time (Linux's `/proc`, read once per process,
/// and only when no run is named otherwise). `cargo test` runs its test binaries one
/// after another, so with one run they share its servers, templates and workers, as a
/// nextest run's processes do: every binary after the first finds them ready instead
/// of starting its own. `None` elsewhere.
fn cargo_run_id() -> Option<&'static str> {
    use std::sync::OnceLock;
    static ID: OnceLock<Option<String>> = OnceLock::new();
    ID.get_or_init(|| {
        let parent = std::os::unix::process::parent_id();
        let stat = std::fs::read_to_string(format!("/proc/{parent}/stat")).ok()?;
        let started = cargo_started(&stat)?;
        Some(cargo_id(parent, started))
    })
    .as_deref()
}

/// `t`, the pid in hex, and as many of the start time's last hex digits as fit in 12
/// characters: never a user's id (at most 11 characters when plain, 12 hex digits when
/// hashed) nor a process's (`p`).
fn cargo_id(pid: u32, started: u64) -> String {
    let id = format!("t{pid:x}");
    let clock = format!("{started:016x}");
    let room = HASHED_RUN_ID.saturating_sub(id.len());
    format!("{id}{}", &clock[clock.len() - room.min(clock.len())..])
}

/// The start time (field 22, in clock ticks since boot) of the process whose
/// `/proc/<pid>/stat` is `stat`, when that process is `cargo`. The command name is in
/// parentheses and may itself hold spaces and parentheses: the fields after it follow
/// the last `)`.
fn cargo_started(stat: &str) -> Option<u64> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    if stat.get(open + 1..close)? != "cargo" {
        return None;
    }
    // Field 3 (the state) is the first after the name.
    stat[close + 1..]
        .split_whitespace()
        .nth(22 - 3)?
        .parse()
        .ok()
}

impl Config {
    /// The crate's migrations folder when it exists: `migrations/`, or the one its
    /// `sqlx.toml` names (`[migrate] migrations-dir`), as `#[sqlx::test]` finds it.
    pub(crate) fn default_migrations(&self, crate_dir: &Path) -> Option<PathBuf> {
        Some(crate_dir.join(SqlxToml::migrations_dir(self.sqlx_toml.as_ref())))
            .filter(|dir| dir.is_dir())
    }

    /// Checks values set in code with the rules the environment's values follow; the
    /// error names the variable that sets the value.
    pub(crate) fn validate(&self) -> Result<()> {
        parse_count("PGFIXTURE_WORKERS", &self.workers.to_string(), MAX_WORKERS)?;
        if let Some(size) = self.pool_size {
            parse_count("PGFIXTURE_POOL_SIZE", &size.to_string(), MAX_POOL_SIZE)?;
        }
        parse_seconds(
            "PGFIXTURE_ACQUIRE_TIMEOUT",
            &self.acquire_timeout.as_secs_f64().to_string(),
            false,
        )?;
        parse_seconds(
            "PGFIXTURE_GRACE",
            &self.grace.as_secs_f64().to_string(),
            true,
        )?;
        parse_seconds_up_to(
            "PGFIXTURE_REUSE_IDLE",
            &self.reuse_idle.as_secs_f64().to_string(),
            false,
            MAX_REUSE_IDLE,
        )?;
        parse_image(&self.image)?;
        match (self.backend, &self.url) {
            (Backend::Url, None) => {
                return Err(Error::config(
                    "PGFIXTURE_URL",
                    "",
                    "must name the server when PGFIXTURE_BACKEND=url (postgres://user:password@127.0.0.1:5432/postgres)",
                ));
            }
            (Backend::Docker | Backend::Local, Some(_)) => {
                return Err(Error::config(
                    "PGFIXTURE_BACKEND",
                    if self.backend == Backend::Docker {
                        "docker"
                    } else {
                        "local"
                    },
                    "must be url or auto when PGFIXTURE_URL is set (or unset PGFIXTURE_URL)",
                ));
            }
            _ => {}
        }
        for (name, value) in &self.server_settings {
            check_setting(name, value, &format!("{name}={value}"))?;
        }
        if let Some(url) = &self.url {
            if self.reset_sequences && self.isolation == Isolation::Schema {
                return Err(Error::config(
                    "PGFIXTURE_RESET_SEQUENCES",
                    "1",
                    "needs database mode with an existing server (PGFIXTURE_URL): pgfixture keeps a schema's sequence values in settings only on the servers it starts",
                ));
            }
            if !self.server_settings.is_empty() {
                return Err(Error::config(
                    "PGFIXTURE_SERVER_SETTINGS",
                    settings_text(&self.server_settings),
                    "applies to the servers pgfixture starts, not to an existing one (PGFIXTURE_URL): set them on that server, or unset PGFIXTURE_SERVER_SETTINGS",
                ));
            }
            if self.isolation == Isolation::Container {
                return Err(Error::config(
                    "PGFIXTURE_ISOLATION",
                    "container",
                    "must be database or schema with an existing server (PGFIXTURE_URL); container mode starts servers",
                ));
            }
            url.check_host(self.allow_remote)?;
        }
        Ok(())
    }

    /// How long a server stays up without a connection: the reuse idle time when
    /// servers are kept for the next run, else the grace period.
    pub(crate) fn server_grace(&self) -> Duration {
        if self.reuse {
            self.reuse_idle
        } else {
            self.grace
        }
    }

    /// The backend to use: `auto` with `PGFIXTURE_URL` set means the url backend.
    pub(crate) fn effective_backend(&self) -> Backend {
        match (self.backend, &self.url) {
            (Backend::Auto, Some(_)) => Backend::Url,
            (backend, _) => backend,
        }
    }
}

/// The existing server of the `url` backend: a `postgres://` URL or a `key=value`
/// connection string. `Debug` shows it with the password hidden.
#[derive(Clone, PartialEq)]
pub struct ServerUrl {
    text: String,
    parsed: tokio_postgres::Config,
}

impl std::fmt::Debug for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerUrl({:?})", redact(&self.text))
    }
}

impl ServerUrl {
    /// Parses `text`; the error names `PGFIXTURE_URL` and never shows the password.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when it does not parse or names no host.
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        let bad = |why: String| Error::config("PGFIXTURE_URL", redact(text), why);
        let parsed: tokio_postgres::Config = text.parse().map_err(|e| {
            bad(format!(
                "must be a postgres:// URL or a key=value connection string ({e})"
            ))
        })?;
        if parsed.get_hosts().is_empty() {
            return Err(bad(
                "must name a host (postgres://user:password@127.0.0.1:5432/postgres)".into(),
            ));
        }
        Ok(ServerUrl {
            text: text.to_owned(),
            parsed,
        })
    }

    /// The parsed settings.
    pub(crate) fn pg_config(&self) -> &tokio_postgres::Config {
        &self.parsed
    }

    /// The host, without credentials, for messages.
    pub(crate) fn host(&self) -> String {
        use tokio_postgres::config::Host;
        match self.parsed.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => String::new(),
        }
    }

    /// Refuses a host that is not loopback (or a Unix socket) unless `allow_remote`.
    fn check_host(&self, allow_remote: bool) -> Result<()> {
        use tokio_postgres::config::Host;
        if allow_remote {
            return Ok(());
        }
        for host in self.parsed.get_hosts() {
            let local = match host {
                Host::Unix(_) => true,
                Host::Tcp(name) => {
                    name == "localhost"
                        || name
                            .trim_matches(['[', ']'])
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|ip| ip.is_loopback())
                }
            };
            if !local {
                return Err(Error::config(
                    "PGFIXTURE_URL",
                    redact(&self.text),
                    format!(
                        "names host {} which is not loopback; set PGFIXTURE_ALLOW_REMOTE=1 to run tests against it",
                        self.host()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `text` with any password replaced: in a URL's user info, or a `password=` pair.
pub(crate) fn redact(text: &str) -> String {
    let mut out = text.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest = &out[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@')
            && let Some(colon) = rest[..at].find(':')
        {
            let start = scheme_end + 3 + colon + 1;
            out.replace_range(start..scheme_end + 3 + at, "***");
        }
    }
    // key=value strings and URL query parameters.
    let mut redacted = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = rest.find("password=") {
        redacted.push_str(&rest[..i + "password=".len()]);
        rest = &rest[i + "password=".len()..];
        let end = rest.find([' ', '&']).unwrap_or(rest.len());
        redacted.push_str("***");
        rest = &rest[end..];
    }
    redacted.push_str(rest);
    redacted
}

fn default_workers(test_threads: Option<usize>) -> usize {
    test_threads.unwrap_or_else(cpus).max(2)
}

/// The number of CPUs this process may use, read once: the standard library reads the
/// cgroup's quota files on every call.
fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(FALLBACK_WORKERS)
    })
}

fn parse_count(var: &'static str, value: &str, max: usize) -> Result<usize> {
    let expected = || format!("must be a whole number from 1 to {max}");
    match value.trim().parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(Error::config(var, value, expected())),
    }
}

fn parse_seconds(var: &'static str, value: &str, zero_ok: bool) -> Result<Duration> {
    parse_seconds_up_to(var, value, zero_ok, MAX_SECONDS)
}

fn parse_seconds_up_to(
    var: &'static str,
    value: &str,
    zero_ok: bool,
    max: f64,
) -> Result<Duration> {
    let low = if zero_ok { "0" } else { "more than 0" };
    let expected = format!("must be a number of seconds, {low} and at most {max}");
    match value.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && s <= max && (s > 0.0 || (zero_ok && s == 0.0)) => {
            Ok(Duration::from_secs_f64(s))
        }
        _ => Err(Error::config(var, value, expected)),
    }
}

fn parse_flag(var: &'static str, value: &str) -> Result<bool> {
    match value.trim() {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" => Ok(false),
        _ => Err(Error::config(var, value, "must be 1 or 0")),
    }
}

/// Image references are `[registry/]name[:tag][@digest]`, lowercase names, no spaces.
fn parse_image(value: &str) -> Result<String> {
    let v = value.trim();
    let (name_tag, digest) = match v.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (v, None),
    };
    let (name, tag) = match name_tag.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, Some(t)),
        _ => (name_tag, None),
    };
    let parts: Vec<&str> = name.split('/').collect();
    // A first component with a dot, a port or `localhost` names a registry host.
    let host = parts.len() > 1 && (parts[0].contains(['.', ':']) || parts[0] == "localhost");
    let name_ok = parts.iter().enumerate().all(|(i, part)| {
        !part.is_empty()
            && part.chars().all(|c| {
                c.is_ascii_lowercase()
                    || c.is_ascii_digit()
                    || "._-".contains(c)
                    || (i == 0 && host && (c == ':' || c.is_ascii_uppercase()))
            })
    });
    let tag_ok = tag.is_none_or(|t| {
        !t.is_empty()
            && t.len() <= 128
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    });
    let digest_ok = digest.is_none_or(|d| {
        d.split_once(':').is_some_and(|(alg, hex)| {
            !alg.is_empty() && !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit())
        })
    });
    if name_ok && tag_ok && digest_ok {
        Ok(v.to_owned())
    } else {
        Err(Error::config(
            "PGFIXTURE_IMAGE",
            value,
            "must be an image reference such as postgres:18-alpine or registry.example/team/postgres:15",
        ))
    }
}

/// The settings as `PGFIXTURE_SERVER_SETTINGS` writes them.
pub(crate) fn settings_text(settings: &[(String, String)]) -> String {
    settings
        .iter()
        .map(|(name, value)| {
            if value.contains(',') || value.contains('\'') {
                format!("{name}='{}'", value.replace('\'', "''"))
            } else {
                format!("{name}={value}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `name=value` pairs separated by commas; a value in single quotes may hold commas
/// (and a doubled quote for a quote).
fn parse_server_settings(text: &str) -> Result<Vec<(String, String)>> {
    let mut items = Vec::new();
    let mut item = String::new();
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                item.push(c);
            }
            ',' if !quoted => items.push(std::mem::take(&mut item)),
            _ => item.push(c),
        }
    }
    if quoted {
        return Err(Error::config(
            "PGFIXTURE_SERVER_SETTINGS",
            text,
            "has a quote that is never closed",
        ));
    }
    items.push(item);
    let mut settings = Vec::new();
    for item in items.iter().map(|i| i.trim()).filter(|i| !i.is_empty()) {
        let Some((name, value)) = item.split_once('=') else {
            return Err(Error::config(
                "PGFIXTURE_SERVER_SETTINGS",
                item,
                "must be name=value pairs separated by commas, such as timezone=UTC,log_statement=all",
            ));
        };
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim();
        let value = match value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
            Some(inner) => inner.replace("''", "'"),
            None => value.to_owned(),
        };
        check_setting(&name, &value, item)?;
        settings.push((name, value));
    }
    Ok(settings)
}

/// A setting's name is a PostgreSQL parameter name; its value is one line.
fn check_setting(name: &str, value: &str, item: &str) -> Result<()> {
    let name_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
    if !name_ok {
        return Err(Error::config(
            "PGFIXTURE_SERVER_SETTINGS",
            item,
            "names a parameter that is not a PostgreSQL setting name (letters, digits, '_' and '.')",
        ));
    }
    if value.contains(['\n', '\r', '\0']) {
        return Err(Error::config(
            "PGFIXTURE_SERVER_SETTINGS",
            item,
            "has a value that is not one line",
        ));
    }
    Ok(())
}

/// Longest run id kept as it is; longer or other ids are hashed to exactly
/// [`HASHED_RUN_ID`] hex digits, so that the two kinds never meet.
const MAX_PLAIN_RUN_ID: usize = 11;
/// Hex digits of a hashed run id (48 bits).
const HASHED_RUN_ID: usize = 12;

/// The run id that names servers, containers and marks: the value itself when it is
/// already short and plain (1 to 11 lowercase letters or digits), else 12 hex digits
/// of a hash of the whole value. Ids that differ anywhere, in their tail, in case or
/// in punctuation, never share a name (`pipeline123456job1` and `...job2` once did,
/// when ids were cut to 12 characters).
fn parse_run_id(var: &'static str, value: &str) -> Result<String> {
    let value = value.trim();
    if value.is_empty() {
        return Err(Error::config(var, value, "must not be blank"));
    }
    let plain = value.len() <= MAX_PLAIN_RUN_ID
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if plain {
        return Ok(value.to_owned());
    }
    Ok(crate::digest::sha256_hex(value, 32)[..HASHED_RUN_ID].to_owned())
}

/// The run id of reused servers: `reuse` and a hash of the project directory.
fn reuse_run_id(project: &str) -> String {
    format!("reuse{}", &crate::digest::sha256_hex(project, 4)[..7])
}

/// A run id for a process that is not part of a nextest run (nor, read from the
/// environment, of a `cargo test`: [`cargo_run_id`]): its pid and start time.
fn process_run_id() -> String {
    use std::sync::OnceLock;
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        // A shared server (the url backend) sees runs of many machines: as much of the
        // clock as fits next to the pid.
        let id: String = format!("p{:x}{:08x}", std::process::id(), nanos as u32)
            .chars()
            .take(12)
            .collect();
        id
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&'static str, &'static str)]) -> HashMap<&'static str, &'static str> {
        pairs.iter().copied().collect()
    }

    fn err_var(pairs: &[(&'static str, &'static str)]) -> &'static str {
        match Config::from_lookup(&env(pairs)) {
            Err(Error::Config { var, .. }) => var,
            other => panic!("expected a config error for {pairs:?}, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let c = Config::from_lookup(&env(&[])).unwrap();
        assert_eq!(c.isolation, Isolation::Database);
        assert_eq!(c.backend, Backend::Auto);
        assert_eq!(c.image, DEFAULT_IMAGE);
        assert_eq!(c.worker, None);
        assert!(c.workers >= 2);
        assert_eq!(c.acquire_timeout, Duration::from_secs(30));
        assert!(c.grace <= Duration::from_secs(15));
        assert!(!c.require_docker);
        assert!(
            c.fixtures_unknown,
            "no CARGO_MANIFEST_DIR: said once when built"
        );
        let c = Config::from_lookup(&env(&[("CARGO_MANIFEST_DIR", "/nonexistent")])).unwrap();
        assert!(
            !c.fixtures_unknown && c.fixtures.is_none(),
            "looked for, and none there"
        );
    }

    #[test]
    fn reads_every_variable() {
        let c = Config::from_lookup(&env(&[
            ("PGFIXTURE_ISOLATION", "schema"),
            ("PGFIXTURE_BACKEND", "local"),
            ("PGFIXTURE_IMAGE", "pgfixture/postgres-offline:15"),
            ("PGFIXTURE_DOCKER_NETWORK", "bridge"),
            ("PGFIXTURE_FIXTURES", "/x/fixtures"),
            ("PGFIXTURE_WORKER", "w7"),
            ("PGFIXTURE_WORKERS", "3"),
            ("PGFIXTURE_POOL_SIZE", "2"),
            ("PGFIXTURE_ACQUIRE_TIMEOUT", "1.5"),
            ("PGFIXTURE_GRACE", "0"),
            ("PGFIXTURE_REQUIRE_DOCKER", "1"),
            ("PGFIXTURE_PG_BIN", "/opt/pg/bin"),
            ("PGFIXTURE_LOCAL_DIR", "/var/tmp/pgfx"),
            ("NEXTEST_RUN_ID", "0a1b2c3d-4e5f-6789-abcd-ef0123456789"),
        ]))
        .unwrap();
        assert_eq!(c.isolation, Isolation::Schema);
        assert_eq!(c.backend, Backend::Local);
        assert_eq!(c.docker_network, DockerNetwork::Bridge);
        assert_eq!(c.fixtures, Some(PathBuf::from("/x/fixtures")));
        assert_eq!(c.worker.as_ref().map(|w| w.as_str()), Some("w7"));
        assert_eq!(c.workers, 3);
        assert_eq!(c.pool_size, Some(2));
        assert_eq!(c.acquire_timeout, Duration::from_millis(1500));
        assert_eq!(c.grace, Duration::ZERO);
        assert!(c.require_docker);
        assert_eq!(c.pg_bin, Some(PathBuf::from("/opt/pg/bin")));
        assert_eq!(c.local_dir, Some(PathBuf::from("/var/tmp/pgfx")));
        // A uuid is hashed, never cut.
        assert_eq!(c.run_id.len(), 12);
        assert!(
            c.run_id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{}",
            c.run_id
        );
        assert_ne!(c.run_id, "0a1b2c3d4e5f");
    }

    #[test]
    fn a_cargo_parent_names_the_run() {
        let stat = |name: &str| {
            format!(
                "4242 ({name}) S 1 4242 4242 0 -1 4194560 1 0 0 0 2 3 0 0 20 0 9 0 123456789 1 2 3"
            )
        };
        assert_eq!(cargo_started(&stat("cargo")), Some(123_456_789));
        for other in ["bash", "cargo-nextest", "rustdoc", "(cargo)", "cargo x"] {
            assert_eq!(cargo_started(&stat(other)), None, "{other}");
        }
        assert_eq!(cargo_started("4242 (cargo"), None);
        // Twelve characters, never a process's id (`p`) nor a hashed one (all hex).
        let id = cargo_id(4242, 123_456_789);
        assert_eq!(id, "t109275bcd15");
        assert_eq!(cargo_id(0x3f_ffff, u64::MAX).len(), 12);
        assert_ne!(cargo_id(4242, 1), cargo_id(4242, 2));
        assert_ne!(cargo_id(4242, 1), cargo_id(4243, 1));
    }

    #[test]
    fn server_settings_parse_with_quoted_commas() {
        let c = checked(&[(
            "PGFIXTURE_SERVER_SETTINGS",
            " TimeZone=UTC, shared_preload_libraries='pg_stat_statements,auto_explain' ,log_statement=all,,x.y='it''s'",
        )])
        .unwrap();
        let pairs: Vec<(&str, &str)> = c
            .server_settings
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("timezone", "UTC"),
                (
                    "shared_preload_libraries",
                    "pg_stat_statements,auto_explain"
                ),
                ("log_statement", "all"),
                ("x.y", "it's"),
            ]
        );
        assert_eq!(
            settings_text(&c.server_settings),
            "timezone=UTC,shared_preload_libraries='pg_stat_statements,auto_explain',log_statement=all,x.y='it''s'"
        );
        for bad in ["timezone", "a b=1", "x='unclosed", "-c=1", "=1"] {
            let err = checked(&[("PGFIXTURE_SERVER_SETTINGS", bad)]).unwrap_err();
            assert!(
                err.to_string().starts_with("PGFIXTURE_SERVER_SETTINGS"),
                "{bad}: {err}"
            );
        }
        let err = checked(&[
            ("PGFIXTURE_SERVER_SETTINGS", "timezone=UTC"),
            ("PGFIXTURE_URL", "postgres://u:p@127.0.0.1/db"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("PGFIXTURE_URL"), "{err}");
        let err = checked(&[
            ("PGFIXTURE_RESET_SEQUENCES", "1"),
            ("PGFIXTURE_ISOLATION", "schema"),
            ("PGFIXTURE_URL", "postgres://u:p@127.0.0.1/db"),
        ])
        .unwrap_err();
        assert!(
            err.to_string().starts_with("PGFIXTURE_RESET_SEQUENCES"),
            "{err}"
        );
        assert!(
            checked(&[("PGFIXTURE_RESET_SEQUENCES", "1")])
                .unwrap()
                .reset_sequences
        );
    }

    #[test]
    fn run_ids_that_differ_anywhere_never_share_a_name() {
        let id = |value: &str| parse_run_id("PGFIXTURE_RUN_ID", value).unwrap();
        // Short plain ids are kept, so that names stay readable.
        assert_eq!(id("mine1"), "mine1");
        assert_eq!(id(" ci42 "), "ci42");
        let groups: &[&[&str]] = &[
            // Only the tail differs (the first 12 letters and digits agree).
            &[
                "pipeline123456job1",
                "pipeline123456job2",
                "pipeline123456job10",
            ],
            // Only case or punctuation differs.
            &["Job-1", "job-1", "job1", "JOB1", "job_1", "job.1", "job 1"],
            &[
                "0a1b2c3d-4e5f-6789-abcd-ef0123456789",
                "0a1b2c3d4e5f6789abcdef0123456789",
            ],
            // A plain id of 12 hex digits is hashed too: it cannot equal a hash.
            &["0a1b2c3d4e5f", "0a1b2c3d4e5"],
        ];
        for group in groups {
            let ids: std::collections::HashSet<String> = group.iter().map(|v| id(v)).collect();
            assert_eq!(ids.len(), group.len(), "{group:?} share a run id: {ids:?}");
        }
        for value in [
            "pipeline123456job1",
            "Job-1",
            "0a1b2c3d4e5f",
            "x".repeat(300).as_str(),
        ] {
            let hashed = id(value);
            assert_eq!(hashed.len(), 12, "{value}");
            assert!(hashed.bytes().all(|b| b.is_ascii_hexdigit()));
            assert_eq!(hashed, id(value), "stable");
        }
    }

    /// Reads and validates, as building a fixture does.
    fn checked(pairs: &[(&'static str, &'static str)]) -> Result<Config> {
        let config = Config::from_lookup(&env(pairs))?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn url_backend_settings() {
        let c = checked(&[("PGFIXTURE_URL", "postgres://u:secret@127.0.0.1:5433/ci")]).unwrap();
        assert_eq!(
            c.effective_backend(),
            Backend::Url,
            "auto with a URL is the url backend"
        );
        assert!(!format!("{c:?}").contains("secret"), "{c:?}");
        for local in [
            "postgres://u:p@localhost/db",
            "postgres://u:p@[::1]:5432/db",
            "host=/var/run/postgresql user=u",
        ] {
            checked(&[("PGFIXTURE_BACKEND", "url"), ("PGFIXTURE_URL", local)]).unwrap();
        }
        let remote = [("PGFIXTURE_URL", "postgres://u:secret@db.example.com/ci")];
        match checked(&remote) {
            Err(
                e @ Error::Config {
                    var: "PGFIXTURE_URL",
                    ..
                },
            ) => {
                let message = e.to_string();
                assert!(message.contains("PGFIXTURE_ALLOW_REMOTE=1"), "{message}");
                assert!(!message.contains("secret"), "{message}");
            }
            other => panic!("a remote host needs PGFIXTURE_ALLOW_REMOTE: {other:?}"),
        }
        checked(&[remote[0], ("PGFIXTURE_ALLOW_REMOTE", "1")]).unwrap();
    }

    #[test]
    fn bad_url_settings_name_the_variable_and_hide_the_password() {
        for (pairs, var) in [
            (
                vec![("PGFIXTURE_URL", "postgres://u:secret@127.0.0.1:notaport/db")],
                "PGFIXTURE_URL",
            ),
            (
                vec![("PGFIXTURE_URL", "password=secret user=u")],
                "PGFIXTURE_URL",
            ),
            (vec![("PGFIXTURE_BACKEND", "url")], "PGFIXTURE_URL"),
            (
                vec![
                    ("PGFIXTURE_BACKEND", "docker"),
                    ("PGFIXTURE_URL", "postgres://127.0.0.1/x"),
                ],
                "PGFIXTURE_BACKEND",
            ),
            (
                vec![
                    ("PGFIXTURE_ISOLATION", "container"),
                    ("PGFIXTURE_URL", "postgres://127.0.0.1/x"),
                ],
                "PGFIXTURE_ISOLATION",
            ),
            (
                vec![("PGFIXTURE_ALLOW_REMOTE", "maybe")],
                "PGFIXTURE_ALLOW_REMOTE",
            ),
        ] {
            match checked(&pairs) {
                Err(e @ Error::Config { .. }) => {
                    let message = e.to_string();
                    assert!(message.starts_with(var), "{pairs:?}: {message}");
                    assert!(!message.contains("secret"), "{message}");
                }
                other => panic!("{pairs:?}: expected an error naming {var}, got {other:?}"),
            }
        }
    }

    #[test]
    fn reuse_fixes_the_run_per_project_and_keeps_servers_for_the_idle_time() {
        let project = ("CARGO_MANIFEST_DIR", "/src/app");
        let a = checked(&[
            ("PGFIXTURE_REUSE", "1"),
            project,
            ("NEXTEST_RUN_ID", "1111-2222"),
        ])
        .unwrap();
        let b = checked(&[
            ("PGFIXTURE_REUSE", "1"),
            project,
            ("NEXTEST_RUN_ID", "3333-4444"),
        ])
        .unwrap();
        assert_eq!(a.run_id, b.run_id, "runs of one project share servers");
        assert!(
            a.run_id.starts_with("reuse") && a.run_id.len() <= 12,
            "{}",
            a.run_id
        );
        let other = checked(&[
            ("PGFIXTURE_REUSE", "1"),
            ("CARGO_MANIFEST_DIR", "/src/other"),
        ])
        .unwrap();
        assert_ne!(a.run_id, other.run_id);
        assert_eq!(a.server_grace(), Duration::from_secs(600));
        let c = checked(&[("PGFIXTURE_REUSE", "1"), ("PGFIXTURE_REUSE_IDLE", "30")]).unwrap();
        assert_eq!(c.server_grace(), Duration::from_secs(30));
        let off = checked(&[("PGFIXTURE_REUSE_IDLE", "30")]).unwrap();
        assert_eq!(
            off.server_grace(),
            off.grace,
            "the idle time applies to reuse only"
        );
        let explicit = checked(&[("PGFIXTURE_REUSE", "1"), ("PGFIXTURE_RUN_ID", "mine1")]).unwrap();
        assert_eq!(explicit.run_id, "mine1");
    }

    #[test]
    fn redaction() {
        assert_eq!(redact("postgres://u:pw@h:1/d"), "postgres://u:***@h:1/d");
        assert_eq!(redact("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(
            redact("host=h password=pw user=u"),
            "host=h password=*** user=u"
        );
        assert_eq!(
            redact("postgres://h/d?password=pw&x=1"),
            "postgres://h/d?password=***&x=1"
        );
    }

    #[test]
    fn nextest_slot_is_the_worker_and_explicit_worker_wins() {
        let c = Config::from_lookup(&env(&[("NEXTEST_TEST_GLOBAL_SLOT", "5")])).unwrap();
        assert_eq!(c.worker, Some(WorkerId::slot(5)));
        let c = Config::from_lookup(&env(&[
            ("NEXTEST_TEST_GLOBAL_SLOT", "5"),
            ("PGFIXTURE_WORKER", "a"),
        ]))
        .unwrap();
        assert_eq!(c.worker.unwrap().as_str(), "a");
    }

    #[test]
    fn the_test_threads_argument_is_read_like_the_harness_does() {
        let args = |a: &[&str]| test_threads_arg(a.iter().map(|s| (*s).to_owned()));
        assert_eq!(args(&["bin", "--test-threads", "8"]), Some("8".into()));
        assert_eq!(args(&["bin", "--test-threads=3", "-q"]), Some("3".into()));
        assert_eq!(
            args(&["bin", "--test-threads=3", "--test-threads", "5"]),
            Some("5".into())
        );
        assert_eq!(args(&["bin", "--exact", "name"]), None);
        assert_eq!(args(&["bin", "--", "--test-threads", "8"]), None);

        struct Args(&'static str, Option<&'static str>);
        impl Env for Args {
            fn var(&self, name: &str) -> Option<String> {
                (name == "RUST_TEST_THREADS")
                    .then(|| self.1.map(str::to_owned))
                    .flatten()
            }
            fn test_threads_arg(&self) -> Option<String> {
                Some(self.0.to_owned())
            }
        }
        assert_eq!(
            Config::from_lookup(&Args("7", Some("3"))).unwrap().workers,
            7
        );
        let e = Config::from_lookup(&Args("0", None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--test-threads"), "{e}");
    }

    #[test]
    fn migrations_come_from_the_variable_the_crate_or_nowhere() {
        let c = Config::from_lookup(&env(&[("PGFIXTURE_MIGRATIONS", "/x/migrations")])).unwrap();
        assert_eq!(c.migrations, Some(PathBuf::from("/x/migrations")));
        let c = Config::from_lookup(&env(&[
            ("PGFIXTURE_MIGRATIONS", "none"),
            ("CARGO_MANIFEST_DIR", env!("CARGO_MANIFEST_DIR")),
        ]))
        .unwrap();
        assert_eq!(c.migrations, None);
        assert!(!c.migrations_unknown);
        let c = Config::from_lookup(&env(&[])).unwrap();
        assert!(c.migrations_unknown, "nothing says where they are");
    }

    #[test]
    fn workers_default_to_test_threads() {
        let c = Config::from_lookup(&env(&[("RUST_TEST_THREADS", "6")])).unwrap();
        assert_eq!(c.workers, 6);
        let c = Config::from_lookup(&env(&[
            ("RUST_TEST_THREADS", "6"),
            ("PGFIXTURE_WORKERS", "2"),
        ]))
        .unwrap();
        assert_eq!(c.workers, 2);
    }

    #[test]
    fn every_invalid_value_names_its_variable() {
        let cases: &[(&str, &[&str])] = &[
            ("PGFIXTURE_ISOLATION", &["containers", "DATABASE", "none"]),
            (
                "PGFIXTURE_BACKEND",
                &["podman", "Docker", "URL", "postgres"],
            ),
            (
                "PGFIXTURE_IMAGE",
                &[
                    "Postgres:15",
                    "postgres:",
                    "post gres",
                    "postgres@sha256:xyz",
                    ":15",
                ],
            ),
            (
                "PGFIXTURE_WORKER",
                &["a-b", "Worker", "x".repeat(40).leak(), "é", "a b"],
            ),
            ("PGFIXTURE_DOCKER_NETWORK", &["none", "Host", "overlay"]),
            ("NEXTEST_TEST_GLOBAL_SLOT", &["x", "-1"]),
            ("PGFIXTURE_WORKERS", &["0", "four", "-2", "100000", "1.5"]),
            ("PGFIXTURE_POOL_SIZE", &["0", "zero", "1000000", "-1"]),
            ("RUST_TEST_THREADS", &["0", "many"]),
            ("PGFIXTURE_LOCAL_DIR", &["tmp/pgfx", "./x"]),
            (
                "PGFIXTURE_ACQUIRE_TIMEOUT",
                &["0", "soon", "-3", "1e9", "NaN", "inf"],
            ),
            ("PGFIXTURE_GRACE", &["-1", "later", "99999"]),
            ("PGFIXTURE_REUSE", &["2", "sometimes"]),
            ("PGFIXTURE_REUSE_IDLE", &["0", "-5", "forever", "1e9"]),
            ("PGFIXTURE_REQUIRE_DOCKER", &["maybe", "2"]),
            ("PGFIXTURE_RUN_ID", &["  "]),
            ("NEXTEST_RUN_ID", &[" "]),
        ];
        for (var, values) in cases {
            for value in *values {
                let pairs: Vec<(&'static str, &'static str)> =
                    vec![(*var, value.to_string().leak() as &'static str)];
                assert_eq!(err_var(&pairs), *var, "{var}={value:?}");
                let message = Config::from_lookup(&env(&pairs)).unwrap_err().to_string();
                assert!(
                    message.starts_with(var),
                    "message names the variable: {message}"
                );
            }
        }
    }

    #[test]
    fn values_set_in_code_follow_the_same_rules() {
        assert!(Config::default().validate().is_ok());
        let bad = [
            Config {
                workers: 0,
                ..Config::default()
            },
            Config {
                pool_size: Some(0),
                ..Config::default()
            },
            Config {
                pool_size: Some(1000),
                ..Config::default()
            },
            Config {
                acquire_timeout: Duration::ZERO,
                ..Config::default()
            },
            Config {
                grace: Duration::from_secs(100_000),
                ..Config::default()
            },
            Config {
                image: "Bad Image".into(),
                ..Config::default()
            },
        ];
        let vars: Vec<_> = bad
            .iter()
            .map(|c| match c.validate() {
                Err(Error::Config { var, .. }) => var,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            vars,
            [
                "PGFIXTURE_WORKERS",
                "PGFIXTURE_POOL_SIZE",
                "PGFIXTURE_POOL_SIZE",
                "PGFIXTURE_ACQUIRE_TIMEOUT",
                "PGFIXTURE_GRACE",
                "PGFIXTURE_IMAGE"
            ]
        );
    }

    #[test]
    fn image_references() {
        for ok in [
            "postgres",
            "postgres:18-alpine",
            "pgfixture/postgres-offline:15",
            "localhost:5000/team/pg:15.4",
            "postgres@sha256:abcdef0123",
            "ghcr.io/org/pg:latest@sha256:00ff",
        ] {
            assert_eq!(parse_image(ok).unwrap(), ok);
        }
    }
}
