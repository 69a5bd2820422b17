//! `Fixture`: the servers, workers and pools of one configuration.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio::sync::OnceCell;

use crate::backend::Source;
use crate::config::{Backend, Config, Isolation};
use crate::driver::Checkout;
use crate::driver::tokio_postgres::TestDb;
use crate::fixtures::{FixtureSet, SharedStatement};
use crate::pool::{DEFAULT_POOL_SIZE, RESERVED_CONNECTIONS};
use crate::restore::{Change, Reader, Reading};
use crate::server::Server;
use crate::settings::Settings;
use crate::worker::{SlotLease, Slots, WorkerId};
use crate::worker_pool::WorkerPool;
use crate::{Error, Result, provision, runtime};

mod handed;
pub(crate) use handed::Handed;

/// Per-worker isolated PostgreSQL for tests, as one configuration describes it.
///
/// [`crate::worker_db`] uses the one the environment describes; build your own with
/// [`Fixture::builder`] to set values in code. Fixtures with equal configurations share
/// their servers, workers and pools, so building one in every test costs nothing.
#[derive(Clone)]
pub struct Fixture {
    inner: Arc<Inner>,
}

impl fmt::Debug for Fixture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fixture")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Fixture`]; starts from the environment ([`Config::from_env`]).
#[derive(Debug)]
#[must_use]
pub struct FixtureBuilder {
    config: Result<Config>,
}

macro_rules! setter {
    ($(#[$doc:meta])* $name:ident: $ty:ty => |$c:ident, $v:ident| $body:expr) => {
        $(#[$doc])*
        pub fn $name(mut self, $v: $ty) -> Self {
            if let Ok($c) = &mut self.config {
                $body;
            }
            self
        }
    };
}

impl FixtureBuilder {
    setter!(
        /// How workers are kept apart (`PGFIXTURE_ISOLATION`).
        isolation: Isolation => |c, v| c.isolation = v);
    setter!(
        /// Where servers come from (`PGFIXTURE_BACKEND`).
        backend: Backend => |c, v| c.backend = v);
    setter!(
        /// The image of the Docker backend (`PGFIXTURE_IMAGE`).
        image: impl Into<String> => |c, v| c.image = v.into());
    setter!(
        /// How the Docker backend's containers are networked (`PGFIXTURE_DOCKER_NETWORK`).
        docker_network: crate::DockerNetwork => |c, v| c.docker_network = v);
    setter!(
    /// The directory of `*.sql` fixtures (`PGFIXTURE_FIXTURES`).
    fixtures: impl Into<std::path::PathBuf> => |c, v| {
        c.fixtures = Some(v.into());
        c.fixtures_unknown = false;
    });
    /// No fixtures at all.
    pub fn no_fixtures(mut self) -> Self {
        if let Ok(c) = &mut self.config {
            c.fixtures = None;
            c.fixtures_unknown = false;
        }
        self
    }
    setter!(
    /// The migrations folder (`PGFIXTURE_MIGRATIONS`).
    migrations: impl Into<std::path::PathBuf> => |c, v| {
        c.migrations = Some(v.into());
        c.migrations_unknown = false;
        #[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
        { c.migrator = None; }
    });
    /// No migrations at all (`#[pgfixture::test(migrations = false)]`).
    pub fn no_migrations(mut self) -> Self {
        if let Ok(c) = &mut self.config {
            c.migrations = None;
            c.migrations_unknown = false;
            #[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
            {
                c.migrator = None;
            }
        }
        self
    }
    /// A sqlx migrator given in code (`static MIGRATOR: Migrator = sqlx::migrate!()`),
    /// run instead of a migrations folder (`#[pgfixture::test(migrator = "...")]`), by
    /// its own sqlx: sqlx 0.9's, or sqlx 0.8's with the feature `sqlx-0_8`.
    #[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
    pub fn sqlx_migrator(self, migrator: &'static impl crate::SqlxMigrator) -> Self {
        self.migrator(migrator.__migrator())
    }
    /// [`FixtureBuilder::sqlx_migrator`], of either major.
    #[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
    pub(crate) fn migrator(mut self, migrator: crate::config::MigratorRef) -> Self {
        if let Ok(c) = &mut self.config {
            c.migrations = None;
            c.migrations_unknown = false;
            c.migrator = Some(migrator);
        }
        self
    }
    /// Code that builds part of the template, run once into each template (in schema
    /// mode once into each worker schema, in container mode once per server) after
    /// the migrations and before the fixtures: migrations written in Rust
    /// (sea-orm-migration's `Migrator::up`, refinery's embedded ones), or rows made by
    /// the application's own code. It gets the URL of the database being built (in
    /// schema mode with the worker schema first on its `search_path`) and connects
    /// with the driver it likes; connections it leaves open to a template are closed
    /// when it returns (in schema mode, whose database is shared, they stay open).
    ///
    /// Compiled code has no content pgfixture could hash: `version` keys the template
    /// in its place, with the files' content. Change it whenever the code would build
    /// something else (a new migration, new rows): a template built by the old code is
    /// never taken for the new one, also under `PGFIXTURE_REUSE=1`. Fixtures built
    /// again with the same version are the same fixture, whatever closure they got.
    ///
    /// An error it returns, or a panic, fails the test's acquire with
    /// [`Error::Setup`](crate::Error::Setup) naming the version; the half-built
    /// template or schema is dropped.
    ///
    /// ```no_run
    /// # async fn example() -> pgfixture::Result<()> {
    /// let fixture = pgfixture::Fixture::builder()
    ///     .setup("3", |url| async move {
    ///         let (client, connection) =
    ///             pgfixture::tokio_postgres::connect(url.as_str(), pgfixture::tokio_postgres::NoTls)
    ///                 .await?;
    ///         tokio::spawn(connection);
    ///         client.batch_execute("CREATE TABLE notes (body text)").await
    ///     })
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn setup<F, Fut, E>(mut self, version: &str, setup: F) -> Self
    where
        F: Fn(crate::DatabaseUrl) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if let Ok(c) = &mut self.config {
            c.setup = Some(crate::setup::Setup::new(version, setup));
        }
        self
    }
    /// The crate's directory, recorded when the test was compiled: where the default
    /// fixtures and migrations (and `sqlx.toml`) are looked for when the environment
    /// does not say (a test binary run outside cargo). `#[pgfixture::test]` sets it.
    pub fn manifest_dir(mut self, dir: &str) -> Self {
        let dir = std::path::Path::new(dir);
        if let Ok(c) = &mut self.config {
            if c.fixtures_unknown {
                c.fixtures = Some(dir.join("fixtures")).filter(|d| d.is_dir());
                c.fixtures_unknown = false;
            }
            if c.sqlx_toml_unknown {
                match crate::sqlx_toml::SqlxToml::read(dir) {
                    Ok(toml) => c.sqlx_toml = toml,
                    Err(e) => {
                        self.config = Err(e);
                        return self;
                    }
                }
                c.sqlx_toml_unknown = false;
            }
            if c.migrations_unknown {
                c.migrations = c.default_migrations(dir);
                c.migrations_unknown = false;
            }
        }
        self
    }
    setter!(
        /// Connections per worker pool (`PGFIXTURE_POOL_SIZE`).
        pool_size: usize => |c, v| c.pool_size = Some(v));
    setter!(
        /// In-process worker slots (`PGFIXTURE_WORKERS`).
        workers: usize => |c, v| c.workers = v);
    setter!(
        /// Limit on waiting for a worker and starting its server (`PGFIXTURE_ACQUIRE_TIMEOUT`).
        acquire_timeout: Duration => |c, v| c.acquire_timeout = v);
    setter!(
        /// How long servers stay up after their last connection (`PGFIXTURE_GRACE`).
        grace: Duration => |c, v| c.grace = v);
    setter!(
        /// Adds a `-c` setting for the servers pgfixture starts
        /// (`PGFIXTURE_SERVER_SETTINGS`), such as `("timezone", "UTC")`; it wins over
        /// pgfixture's own. Servers with other settings are other servers.
        server_setting: (&str, &str) => |c, v| c.server_settings.push((v.0.to_ascii_lowercase(), v.1.to_owned())));
    setter!(
        /// Restart the sequences at the fixtures' values when each test begins
        /// (`PGFIXTURE_RESET_SEQUENCES`).
        reset_sequences: bool => |c, v| c.reset_sequences = v);
    setter!(
        /// Fail instead of falling back when Docker does not answer (`PGFIXTURE_REQUIRE_DOCKER`).
        require_docker: bool => |c, v| c.require_docker = v);

    /// Replaces the whole configuration.
    pub fn config(mut self, config: Config) -> Self {
        self.config = Ok(config);
        self
    }

    /// The fixture; reads and checks the fixture files now.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid environment value or setting,
    /// [`Error::FixturesDir`] / [`Error::FixtureRead`] for unreadable fixtures.
    pub fn build(self) -> Result<Fixture> {
        let config = self.config?;
        config.validate()?;
        static REGISTRY: OnceLock<Mutex<Vec<Arc<Inner>>>> = OnceLock::new();
        let mut registry = REGISTRY
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(inner) = registry.iter().find(|i| i.config == config) {
            return Ok(Fixture {
                inner: Arc::clone(inner),
            });
        }
        if config.fixtures_unknown && config.fixtures.is_none() {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                eprintln!(
                    "pgfixture: applying no fixtures: CARGO_MANIFEST_DIR is not set (this test binary runs outside cargo), so $CARGO_MANIFEST_DIR/fixtures cannot be found; set PGFIXTURE_FIXTURES to your fixtures directory"
                );
            });
        }
        // The hash from the record of an earlier process when the files are as it
        // saw them; the files are then read only if something must be built from them.
        let read_at = std::time::SystemTime::now();
        let fingerprint = crate::fingerprint::Fingerprint::of(&config);
        let content = OnceLock::new();
        let fixtures_hash = match fingerprint.as_ref().and_then(|f| f.lookup()) {
            Some(hash) => hash,
            None => {
                let read = read_fixtures(&config)?;
                let hash = read.0.hash(64).to_owned();
                if let Some(fingerprint) = &fingerprint {
                    fingerprint.store(read_at, &hash);
                }
                let _ = content.set(read);
                hash
            }
        };
        let instance = {
            let mut key = config.clone();
            key.worker = None;
            crate::digest::sha256_hex(format!("{key:?}"), 3)
        };
        let inner = Arc::new(Inner {
            slots: config.worker.is_none().then(|| Slots::new(config.workers)),
            id: registry.len() + 1,
            instance,
            fixtures_hash,
            content,
            config,
            source: OnceCell::new(),
            shared: Mutex::new(Arc::new(OnceCell::new())),
            workers: Mutex::new(HashMap::new()),
            recorded: Mutex::new(HashMap::new()),
            backend: OnceLock::new(),
            trust_servers: std::sync::atomic::AtomicBool::new(true),
            stats: Counters::default(),
        });
        registry.push(Arc::clone(&inner));
        Ok(Fixture { inner })
    }
}

/// The fixtures and migrations as read, and in schema mode their statements on
/// extensions and roles, run once per database before any worker schema.
type Content = (FixtureSet, Vec<SharedStatement>);

/// Reads and checks the fixtures and migrations of `config`.
fn read_fixtures(config: &Config) -> Result<Content> {
    let migrations = match &config.migrations {
        Some(dir) => crate::migrations::Migrations::load(dir, config.sqlx_toml.as_ref())?,
        None => None,
    };
    #[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
    let migrations = match config.migrator {
        Some(m) => Some(crate::migrations::Migrations::from_migrator(m)),
        None => migrations,
    };
    let fixtures = FixtureSet::load_with(migrations, config.fixtures.as_deref())?
        .with_setup(config.setup.clone());
    // Schema mode runs extensions and roles once per database, and refuses
    // database-wide objects up front.
    match config.isolation {
        Isolation::Schema => fixtures.for_schemas(),
        _ => Ok((fixtures, Vec::new())),
    }
}

pub(crate) struct Inner {
    config: Config,
    /// The content hash of the fixtures and migrations (64 hex digits).
    fixtures_hash: String,
    /// The fixtures and migrations, read when something must be built from them
    /// ([`Inner::content`]).
    content: OnceLock<Content>,
    slots: Option<Arc<Slots>>,
    /// Identifies this fixture among the slots a thread holds.
    id: usize,
    /// Distinguishes the worker databases of different configurations in one run.
    instance: String,
    source: OnceCell<Source>,
    /// The shared server of database and schema modes.
    shared: Mutex<Arc<OnceCell<Server>>>,
    workers: Mutex<HashMap<WorkerId, Arc<OnceCell<Arc<Worker>>>>>,
    /// The rows recorded for in-place restores, per server and key
    /// ([`crate::restore`]), read once.
    recorded: Mutex<HashMap<String, Arc<crate::restore::Recorded>>>,
    /// The backend's kind and flavour, once a server was found or started.
    backend: OnceLock<(&'static str, String)>,
    /// Take servers another process has used as described (no checking connection);
    /// off once one was found gone.
    trust_servers: std::sync::atomic::AtomicBool,
    stats: Counters,
}

/// A worker to be provisioned again.
struct Reset {
    /// The worker as it was, whose pool may be kept ([`Inner::reset_keeping`]).
    keep: Option<Arc<Worker>>,
}

/// What an acquire is waiting for, reported when it times out: the step it is on, and
/// how long it and each step before it took, so that a timeout names where the time
/// went (a Docker daemon that stalls while the server is looked up, say, rather than
/// the connection the last second was spent on).
#[derive(Default)]
struct Phase(Mutex<Vec<(String, Instant)>>);

tokio::task_local! {
    /// The phase of the acquire whose task runs, for the steps of provisioning
    /// ([`step`]).
    static PHASE: Arc<Phase>;
}

/// Records a step of provisioning in the phase of the acquire that runs it, if any.
fn step(label: impl FnOnce() -> String) {
    let _ = PHASE.try_with(|phase| phase.set(label()));
}

impl Phase {
    fn set(&self, phase: String) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((phase, Instant::now()));
    }

    fn get(&self) -> String {
        describe_steps(
            &self.0.lock().unwrap_or_else(|e| e.into_inner()),
            Instant::now(),
        )
    }
}

/// `steps` (what was waited for, from when) as of `now`: the last, and how long each
/// took.
fn describe_steps(steps: &[(String, Instant)], now: Instant) -> String {
    let Some(((last, since), before)) = steps.split_last() else {
        return "a worker".to_owned();
    };
    let secs = |from: Instant, to: Instant| format!("{:.1} s", (to - from).as_secs_f64());
    let mut text = format!("{last}, for the last {}", secs(*since, now));
    if !before.is_empty() {
        let took: Vec<String> = steps
            .windows(2)
            .map(|w| format!("{}: {}", w[0].0, secs(w[0].1, w[1].1)))
            .collect();
        text.push_str(&format!(" (before it, {})", took.join("; ")));
    }
    text
}

/// A connection of the maintenance `pool` of `server`.
async fn admin_connection(pool: &Pool, server: &Server) -> Result<deadpool_postgres::Object> {
    pool.get().await.map_err(|source| match source {
        deadpool_postgres::PoolError::Backend(e) => {
            Error::pg(format!("connecting to server {}", server.name))(e)
        }
        source => Error::Pool {
            worker: "maintenance".to_owned(),
            source,
        },
    })
}

/// Every idle connection of the worker's pool (at least one, opened if need be).
async fn idle_connections(
    worker: &Worker,
    id: &WorkerId,
) -> Result<Vec<deadpool_postgres::Object>> {
    // Back to the pool first, cleared, so that they are among those whose statistics
    // are flushed before the reading.
    while let Some(cleared) = crate::driver::tokio_postgres::take_unclean(worker).await {
        drop(cleared.map_err(Error::pg(format!("clearing a connection of worker {id}")))?);
    }
    let idle = worker.pool.status().available.max(1);
    let mut clients = Vec::with_capacity(idle);
    for _ in 0..idle {
        clients.push(worker.pool.get().await.map_err(|source| Error::Pool {
            worker: id.to_string(),
            source,
        })?);
    }
    Ok(clients)
}

/// The `application_name` of a worker pool's connections: the run's, then a hash of
/// the worker's database or schema (`worker`, unique to the configuration and the
/// worker: workers of two configurations share ids), then its id as far as it fits in
/// PostgreSQL's 63 bytes. The release ends the connections of this name still open.
fn pool_application_name(run: &str, worker: &str, id: &WorkerId) -> String {
    worker_application_name(run, worker, id, POOL_ROLE)
}

/// The `application_name` of the connections of the worker's own pool, named as
/// [`pool_application_name`] with [`OWN_ROLE`]: the release of a worker pool one of
/// them is still held past ends them all (in schema mode the worker's successor takes
/// its name, and the held one would write into it).
fn own_application_name(run: &str, worker: &str, id: &WorkerId) -> String {
    worker_application_name(run, worker, id, OWN_ROLE)
}

/// The `application_name` of the connections code under test opens from a test
/// handle's settings ([`handed`]), named as [`pool_application_name`] with
/// [`HANDED_ROLE`]: the handle's release ends them by that name.
fn handed_application_name(run: &str, worker: &str, id: &WorkerId) -> String {
    worker_application_name(run, worker, id, HANDED_ROLE)
}

/// The worker's settings as a test handle gives them to code under test, and the name
/// their connections take ([`handed_application_name`]).
fn handed_settings(
    server: &Server,
    worker: &str,
    id: &WorkerId,
    dbname: &str,
    search_path: Option<&str>,
    restart_sequences: Option<String>,
) -> (String, Arc<Settings>) {
    let name = handed_application_name(&server.application_name, worker, id);
    let settings = Settings::handed_out_as(&name, server, dbname, search_path, restart_sequences);
    (name, settings)
}

fn worker_application_name(run: &str, worker: &str, id: &WorkerId, role: &str) -> String {
    let mut name = format!("{run}{role}{}-{id}", crate::digest::sha256_hex(worker, 6));
    name.truncate(provision::MAX_IDENT);
    name
}

/// What names the connections of the worker's own pool ([`own_application_name`]).
const OWN_ROLE: &str = "/worker-";

/// What names the connections opened from a test handle's settings
/// ([`handed_application_name`]).
const HANDED_ROLE: &str = "/test-";

/// What names a worker pool's connections in [`pool_application_name`].
const POOL_ROLE: &str = "/pool-";
/// What names, in its stead, the connections a driver keeps for the worker's pools
/// from test to test ([`kept_application_name`]).
const KEPT_ROLE: &str = "/kept-";

/// The `application_name` of the connections a driver keeps open for a worker's pools
/// between tests (the sqlx driver's pool), from the worker pool's (`pool_name`, of
/// [`pool_application_name`]): the same with [`KEPT_ROLE`], so that a release ends
/// them only when asked (`WorkerPool::end_kept_on_release`).
#[cfg_attr(not(any(feature = "sqlx", feature = "sqlx-0_8")), allow(dead_code))]
pub(crate) fn kept_application_name(pool_name: &str) -> String {
    match pool_name.rfind(POOL_ROLE) {
        Some(at) => format!(
            "{}{KEPT_ROLE}{}",
            &pool_name[..at],
            &pool_name[at + POOL_ROLE.len()..]
        ),
        None => format!("{pool_name}{KEPT_ROLE}"),
    }
}

/// The name of the running test: libtest runs each test on a thread named after it.
fn current_test() -> Option<String> {
    std::thread::current()
        .name()
        .filter(|name| *name != "main")
        .map(str::to_owned)
}

/// Whether `error` says the server went away (killed, stopped, unreachable) rather
/// than that a statement failed.
pub(crate) fn server_gone(error: &Error) -> bool {
    use tokio_postgres::error::SqlState;
    // A refused password: the port of a server that is gone now belongs to another
    // (the record of a stopped container is read without asking Docker).
    let gone_codes = [
        SqlState::ADMIN_SHUTDOWN,
        SqlState::CRASH_SHUTDOWN,
        SqlState::CANNOT_CONNECT_NOW,
        SqlState::INVALID_PASSWORD,
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
    ];
    #[cfg(feature = "sqlx")]
    if let Error::Sqlx { source, .. } = error {
        return match source {
            ::sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|code| gone_codes.iter().any(|c| c.code() == code)),
            // No server answer at all: refused, reset or closed connections.
            ::sqlx::Error::Io(_) => true,
            _ => false,
        };
    }
    let Some(pg) = error.postgres() else {
        return false;
    };
    match pg.code() {
        Some(code) => gone_codes.contains(code),
        // No server answer at all: refused, reset or closed connections.
        None => {
            pg.is_closed()
                || std::error::Error::source(pg).is_some_and(|s| s.is::<std::io::Error>())
        }
    }
}

/// A provisioned worker: where its database or schema is, and the pool of test
/// connections to it.
pub(crate) struct Worker {
    pool: Pool,
    /// The `application_name` of the pool's connections ([`own_application_name`]).
    application_name: String,
    /// The `application_name` of the connections code under test opens from a test
    /// handle's settings ([`handed_application_name`]).
    handed_name: String,
    served: AtomicU64,
    server: Server,
    dbname: String,
    search_path: Option<String>,
    /// The worker's database (database and container modes) or schema (schema mode).
    target: String,
    /// The connection that found the worker ready in a new process, already inside a
    /// test's transaction: the first test takes it (see [`Inner::attach_worker`]).
    /// Never pooled while it holds that transaction.
    primed: Mutex<Option<deadpool_postgres::Object>>,
    /// How code under test reaches the worker with connections of its own.
    settings: Arc<Settings>,
    /// What begins a test's transaction ([`Inner::begin_sql`]).
    begin: String,
    #[cfg_attr(not(any(feature = "sqlx", feature = "sqlx-0_8")), allow(dead_code))]
    /// Connections other drivers keep between tests ([`crate::driver`]); they go with
    /// the worker when it is reset.
    idle: Mutex<Vec<Box<dyn std::any::Any + Send>>>,
    /// The background opening of a rebuilt worker's first connection ([`Inner::warm_up`]),
    /// which a worker pool and the next reset wait for.
    warming: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// What [`crate::restore::describe`] found for each set of changed relations: a
    /// worker's tables change only through DDL, which rebuilds it (a new `Worker`).
    described: Mutex<HashMap<Vec<u32>, Arc<Described>>>,
    /// Schema mode: whether its readings take DDL from the log of the database of the
    /// schemas ([`provision::ddl_log`]), decided at its first reading.
    ddl_logged: tokio::sync::OnceCell<bool>,
    /// Whether its server flushes a connection's statistics on request
    /// ([`provision::flushes_statistics`]), read at its first worker pool.
    flushes: tokio::sync::OnceCell<bool>,
}

/// The tables a restore puts back, and the worker schema's oid; `None` when the
/// changed relations cannot be put back in place.
type Described = Option<(Vec<crate::restore::Table>, Option<u32>)>;

/// Connections a worker's stash keeps per driver: one test holds a worker at a time, so
/// more than two are rarely needed; more are closed. The sqlx driver also keeps as
/// many in its worker pool ([`DRIVER_CONNECTIONS`]).
#[cfg_attr(not(any(feature = "sqlx", feature = "sqlx-0_8")), allow(dead_code))]
pub(crate) const IDLE_PER_WORKER: usize = 2;

/// Connections the other drivers keep open per worker besides the worker's pool: the
/// sqlx driver's stash of test connections and its worker pool's.
#[cfg_attr(not(any(feature = "sqlx", feature = "sqlx-0_8")), allow(dead_code))]
const DRIVER_CONNECTIONS: usize = 2 * IDLE_PER_WORKER;

#[cfg_attr(not(feature = "sqlx"), allow(dead_code))]
impl Worker {
    pub(crate) fn settings(&self) -> &Arc<Settings> {
        &self.settings
    }

    pub(crate) fn begin_sql(&self) -> &str {
        &self.begin
    }

    /// Whether the worker's server flushes a connection's statistics on request
    /// ([`provision::flushes_statistics`]), read through `client` the first time.
    async fn flushes(&self, client: &tokio_postgres::Client) -> Result<bool> {
        self.flushes
            .get_or_try_init(|| provision::flushes_statistics(client))
            .await
            .copied()
    }

    /// [`Worker::flushes`] as far as it is known: until it is read, no flush (a
    /// statistic that arrives late can only make a reading differ, and so reset).
    pub(crate) fn flushes_known(&self) -> bool {
        self.flushes.get().copied().unwrap_or(false)
    }

    /// The most connections the worker's pool opens: a driver's pool on the worker
    /// takes as many.
    pub(crate) fn pool_size(&self) -> usize {
        self.pool.status().max_size
    }

    /// A connection of type `T` from the stash.
    pub(crate) fn take_idle<T: std::any::Any>(&self) -> Option<T> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let at = idle.iter().position(|c| c.is::<T>())?;
        idle.swap_remove(at).downcast().ok().map(|c| *c)
    }

    /// Whether the stash holds a connection of type `T`.
    pub(crate) fn has_idle<T: std::any::Any>(&self) -> bool {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.iter().any(|c| c.is::<T>())
    }

    /// Puts a connection in the stash, unless it holds enough of its type.
    pub(crate) fn keep_idle<T: std::any::Any + Send>(&self, conn: T) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.iter().filter(|c| c.is::<T>()).count() < IDLE_PER_WORKER {
            idle.push(Box::new(conn));
        }
    }

    /// Returns once the background opening of its first connection, if any, is over.
    async fn warmed(&self) {
        let task = self
            .warming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// The primed connection, if the first test has not taken it.
    fn take_primed(&self) -> Option<deadpool_postgres::Object> {
        self.primed.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Opens a driver's connection with the settings given and begins the first test's
/// transaction on it with the check's statement ([`PrimeCheck`]), which fails unless
/// the worker is ready: `None` when it is not (or its database is missing), the
/// connection otherwise.
pub(crate) type Primer =
    fn(
        Arc<Settings>,
        PrimeCheck,
    ) -> futures::future::BoxFuture<'static, Result<Option<Box<dyn std::any::Any + Send>>>>;

/// Starts a driver's connections to the worker of a worker pool once the worker is
/// checked, given the worker and the pool's settings (those of connections the code
/// under test opens), on the background runtime: they open while the core marks and
/// reads the worker (a new backend's start beside the reading's, each a few
/// milliseconds). The sqlx driver's kept pool waits in the worker's stash; a
/// `#[pgfixture::test]` taking `sqlx::PgConnection` opens its own on the test's
/// runtime once it has the settings.
pub(crate) type PoolOpener = Box<dyn FnOnce(&Arc<Worker>, &Arc<Settings>, &Config) + Send>;

/// The check of a worker another process left, for a driver's [`Primer`]: the first
/// test's `BEGIN`, then a `SELECT` that fails unless the worker's mark (a setting the
/// server loaded at connection start) says clean and `max_connections` leaves room for
/// this process's pools, in one simple query, so that a driver with a transaction
/// manager of its own begins the test's transaction and checks the worker in one round
/// trip. A missing mark fails too (`42704`, unrecognized configuration parameter); a
/// mark that is not clean, or too few connections, fails to cast the mark to a number
/// (`22P02`): an expression of the row, which the planner cannot fold into an error
/// before the condition is known, as it would `1 / 0`. Either way the transaction is
/// left aborted, and the driver drops the connection.
#[cfg_attr(not(feature = "sqlx"), allow(dead_code))]
pub(crate) struct PrimeCheck {
    /// The first test's `BEGIN` and the check.
    pub(crate) begin: String,
}

#[cfg_attr(not(any(feature = "sqlx", feature = "sqlx-0_8")), allow(dead_code))]
impl PrimeCheck {
    /// `begin`, then the check of the mark (`marked`, a [`mark_source`]) and of
    /// `max_connections` against `needed`: [`provision::State::of`]'s clean, in SQL.
    fn new(begin: &str, marked: &str, needed: usize) -> PrimeCheck {
        let quote = |s: &str| s.replace('\'', "''");
        let (mark, dirty) = (provision::MARK, provision::DIRTY);
        PrimeCheck {
            begin: format!(
                "{begin}; SELECT CASE WHEN left(m, {}) = '{}' AND right(m, {}) <> '{}' \
                 AND current_setting('max_connections')::int >= {needed} THEN 1 \
                 ELSE ('pgfixture: worker not ready: ' || m)::int END \
                 FROM {marked}",
                mark.chars().count(),
                quote(mark),
                dirty.chars().count(),
                quote(dirty),
            ),
        }
    }
}

/// Where a new connection to a worker reads the worker's mark, as a `FROM` item of one
/// row whose column `m` holds it: on pgfixture's own servers its setting (loaded with
/// the connection, for nothing); on a server of the user's (`shared_server`) the
/// comment of the worker database or schema, which is the mark there (a setting may be
/// missing, or outlive the comment someone else removed), for 0.6–0.9 ms of catalog
/// lookups. There a worker database without the sequences' setting (its user may not
/// write pgfixture's settings) reads as not ready: the checked way knows what such a
/// worker lacks ([`provision::sequences_recorded`]). A worker schema there has no such
/// setting, and a schema that is missing reads as an empty mark.
fn mark_source(target: provision::Target<'_>, shared_server: bool) -> String {
    let quote = |s: &str| s.replace('\'', "''");
    if let (true, provision::Target::Schema(name, None)) = (shared_server, target) {
        format!(
            "(SELECT coalesce((SELECT obj_description(oid, 'pg_namespace') \
               FROM pg_namespace WHERE nspname = '{}'), '') AS m) mark",
            quote(name)
        )
    } else if let (true, Some(sequences)) = (shared_server, provision::sequences_setting(target)) {
        format!(
            "(SELECT CASE WHEN current_setting('{}', true) IS NULL THEN '' \
               ELSE coalesce(shobj_description(oid, 'pg_database'), '') END AS m \
             FROM pg_database WHERE datname = current_database()) mark",
            quote(&sequences)
        )
    } else {
        let setting = target
            .setting()
            .expect("pgfixture's own servers mark workers with settings");
        format!("current_setting('{}') m", quote(&setting))
    }
}

/// Ends the first test's transaction that the worker's check began, for a handle that
/// does not use it; the connection goes back to the pool.
async fn end_primed(worker: &Worker, id: &WorkerId) -> Result<()> {
    if let Some(primed) = worker.take_primed() {
        primed
            .batch_execute(crate::driver::END)
            .await
            .map_err(Error::pg(format!("ending the check of worker {id}")))?;
    }
    Ok(())
}

#[derive(Default)]
struct Counters {
    servers_started: AtomicU64,
    servers_reused: AtomicU64,
    templates_built: AtomicU64,
    workers_provisioned: AtomicU64,
    workers_reused: AtomicU64,
    workers_attached: AtomicU64,
    workers_reset: AtomicU64,
    commit_leaks: AtomicU64,
    pools_unchanged: AtomicU64,
    pools_restored: AtomicU64,
    handed_checked: AtomicU64,
    handed_restored: AtomicU64,
    spares_used: AtomicU64,
}

/// What a [`Fixture`] did in this process, for reports and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// `docker`, `local` or `url`, once a server was needed.
    pub backend: Option<&'static str>,
    /// The image or binaries' directory servers are made of.
    pub flavour: Option<String>,
    /// Servers this process started.
    pub servers_started: u64,
    /// Servers this process found already running (started by another process).
    pub servers_reused: u64,
    /// Template databases this process built (fixtures applied).
    pub templates_built: u64,
    /// Worker databases or schemas this process created.
    pub workers_provisioned: u64,
    /// Worker databases or schemas this process found already made.
    pub workers_reused: u64,
    /// Of those, the ones found ready by a check on the test's own first connection,
    /// without a maintenance connection (a nextest process after the first on its
    /// worker).
    pub workers_attached: u64,
    /// Worker databases or schemas this process rebuilt from the fixtures: after a test
    /// committed, after a [`crate::WorkerPool`], or when it found one marked dirty.
    pub workers_reset: u64,
    /// Test handles whose transaction had been committed by the test when released.
    pub commit_leaks: u64,
    /// Worker pools released with nothing changed through them, so that their worker
    /// needed no reset.
    pub pools_unchanged: u64,
    /// Worker pools released after a test that changed only rows of tables, which
    /// were put back in place from the rows the template held (no rebuild).
    pub pools_restored: u64,
    /// Test handles that gave their connection settings to code under test
    /// (`pg_config`, `url`, sqlx's `connect_options`), whose worker was read at their
    /// release for what the connections opened with them changed.
    pub handed_checked: u64,
    /// Of those, the ones after which rows those connections committed were put back
    /// in place from the rows the template held (no rebuild; a rebuild counts in
    /// [`Stats::workers_reset`]).
    pub handed_restored: u64,
    /// Resets done by putting a spare clone in the worker's place (database and
    /// container modes): one made in the background, or, when none was ready, one the
    /// reset waited for or made itself.
    pub spares_used: u64,
    /// Test handles given out, per worker.
    pub served: BTreeMap<WorkerId, u64>,
}

impl Fixture {
    /// A builder that starts from the environment.
    pub fn builder() -> FixtureBuilder {
        FixtureBuilder {
            config: Config::from_env(),
        }
    }

    /// The fixture the environment describes (what [`crate::worker_db`] uses).
    ///
    /// # Errors
    ///
    /// As [`FixtureBuilder::build`].
    pub fn from_env() -> Result<Fixture> {
        Self::builder().build()
    }

    /// This fixture's configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// A connection to this worker's database inside a fresh transaction, rolled back
    /// when the handle drops. In-process, it first takes a free worker slot (the one
    /// this thread already holds, if any), waiting up to the acquire timeout.
    ///
    /// # Errors
    ///
    /// [`Error::AcquireTimeout`] when no slot frees up or the server does not start in
    /// time; the backend's, fixture's or server's error when provisioning fails.
    pub async fn worker_db(&self) -> Result<TestDb> {
        self.worker_db_named(current_test()).await
    }

    /// [`Fixture::worker_db`] for the test `test` (its full name, for reports).
    pub(crate) async fn worker_db_named(&self, test: Option<String>) -> Result<TestDb> {
        let inner = Arc::clone(&self.inner);
        let held = inner.slots.as_ref().and_then(|_| Slots::held(inner.id));
        let reused_lease = held.is_some();
        let db = runtime::run(async move { inner.test_db(held, test).await }).await?;
        if !reused_lease && let Some(lease) = db.lease() {
            Slots::remember(self.inner.id, lease);
        }
        Ok(db)
    }

    /// A connection pool on this worker's database (or schema), for code under test
    /// that commits for real: it opens its own connections, commits, uses
    /// LISTEN/NOTIFY, or runs concurrent transactions. It is the worker's own pool of
    /// warm connections. When the guard drops, before any other test gets the worker,
    /// pgfixture reads whether anything was changed through it; if so, the worker is
    /// reset (a spare clone takes its place, or its database is cloned again from the
    /// template, or its schema rebuilt). In-process, the guard holds the worker's slot
    /// like a [`TestDb`] does.
    ///
    /// Do not hold a [`TestDb`] of the same fixture while the guard drops: the reset
    /// closes every connection to the worker's database.
    ///
    /// # Errors
    ///
    /// As [`Fixture::worker_db`].
    pub async fn worker_pool(&self) -> Result<WorkerPool> {
        self.worker_pool_opening(None).await
    }

    /// [`Fixture::worker_pool`] for a driver whose pool of its own `opener` starts
    /// opening as soon as the worker is checked ([`PoolOpener`]).
    pub(crate) async fn worker_pool_opening(
        &self,
        opener: Option<PoolOpener>,
    ) -> Result<WorkerPool> {
        let inner = Arc::clone(&self.inner);
        let held = inner.slots.as_ref().and_then(|_| Slots::held(inner.id));
        let reused_lease = held.is_some();
        let guard = runtime::run(async move { inner.worker_pool(held, opener).await }).await?;
        if !reused_lease && let Some(lease) = &guard.lease {
            Slots::remember(self.inner.id, lease);
        }
        Ok(guard)
    }

    #[cfg_attr(not(feature = "sqlx"), allow(dead_code))]
    /// The calling test's worker, for a driver to hand out a connection of its own
    /// ([`crate::driver`]): `then` runs on the background runtime with it, where new
    /// connections must be opened (in a test scope, [`runtime::in_test_scope`], on the
    /// test's own runtime). `test` names the test, else its thread's name does.
    pub(crate) async fn checkout<T, F, Fut>(
        &self,
        test: Option<String>,
        primer: Option<Primer>,
        then: F,
    ) -> Result<T>
    where
        F: FnOnce(Checkout) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + Send,
        T: Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let held = inner.slots.as_ref().and_then(|_| Slots::held(inner.id));
        let reused_lease = held.is_some();
        let test = test.or_else(current_test);
        // One trip to the background runtime for the worker and the driver's work on it
        // (none in a test scope: the test's own runtime, where its connections live).
        let (lease, handed) = runtime::run_for_test(async move {
            let checkout = inner.checkout(held, test, primer).await?;
            let lease = checkout.lease.clone();
            Ok::<_, Error>((lease, then(checkout).await?))
        })
        .await?;
        if !reused_lease && let Some(lease) = &lease {
            Slots::remember(self.inner.id, lease);
        }
        Ok(handed)
    }

    /// The calling test's worker, with a connection of type `T` that an earlier test
    /// left in its stash, when the worker is ready in this process and a slot is free
    /// now: taken without waiting and without a trip to the background runtime, so
    /// that a driver hands the connection out in the caller's own task. `None` when
    /// anything would have to wait or be done first (a slot, provisioning, the check's
    /// connection to end, a connection to open): take [`Fixture::checkout`] then.
    #[cfg_attr(not(feature = "sqlx"), allow(dead_code))]
    pub(crate) fn checkout_now<T: std::any::Any>(
        &self,
        test: Option<String>,
    ) -> Option<(Checkout, T)> {
        let inner = &self.inner;
        let held = inner.slots.as_ref().and_then(|_| Slots::held(inner.id));
        let fresh = held.is_none();
        let lease = match (&inner.slots, held) {
            (Some(_), Some(lease)) => Some(lease),
            (Some(slots), None) => Some(slots.try_acquire()?),
            (None, _) => None,
        };
        let id = match (&lease, &inner.config.worker) {
            (Some(lease), _) => lease.worker(),
            (None, Some(id)) => id.clone(),
            (None, None) => return None,
        };
        let worker = inner.ready_worker(&id)?;
        if worker
            .primed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return None;
        }
        let conn = worker.take_idle::<T>()?;
        if fresh && let Some(lease) = &lease {
            Slots::remember(inner.id, lease);
        }
        worker.served.fetch_add(1, Ordering::Relaxed);
        let checkout = Checkout {
            id,
            lease,
            worker,
            owner: Arc::clone(inner),
            test: test.or_else(current_test),
            handed: Handed::default(),
        };
        Some((checkout, conn))
    }

    /// The worker id of the calling test: the fixed id of this process, else the slot
    /// this thread holds, else `None` (no handle held yet).
    pub fn worker_id(&self) -> Option<WorkerId> {
        self.inner
            .config
            .worker
            .clone()
            .or_else(|| Slots::held(self.inner.id).map(|lease| lease.worker()))
    }

    /// What this fixture did so far in this process.
    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        let c = &inner.stats;
        let served = inner
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(id, cell)| Some((id.clone(), cell.get()?.served.load(Ordering::Relaxed))))
            .collect();
        Stats {
            backend: inner.backend.get().map(|(kind, _)| *kind),
            flavour: inner.backend.get().map(|(_, flavour)| flavour.clone()),
            servers_started: c.servers_started.load(Ordering::Relaxed),
            servers_reused: c.servers_reused.load(Ordering::Relaxed),
            templates_built: c.templates_built.load(Ordering::Relaxed),
            workers_provisioned: c.workers_provisioned.load(Ordering::Relaxed),
            workers_reused: c.workers_reused.load(Ordering::Relaxed),
            workers_attached: c.workers_attached.load(Ordering::Relaxed),
            workers_reset: c.workers_reset.load(Ordering::Relaxed),
            commit_leaks: c.commit_leaks.load(Ordering::Relaxed),
            pools_unchanged: c.pools_unchanged.load(Ordering::Relaxed),
            pools_restored: c.pools_restored.load(Ordering::Relaxed),
            handed_checked: c.handed_checked.load(Ordering::Relaxed),
            handed_restored: c.handed_restored.load(Ordering::Relaxed),
            spares_used: c.spares_used.load(Ordering::Relaxed),
            served,
        }
    }
}

impl Inner {
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// Runs `work` within the acquire timeout, with `phase` for the steps of provisioning
    /// ([`step`]); a timeout reports the steps and how long each took.
    async fn timed<T>(
        &self,
        phase: &Arc<Phase>,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let timeout = self.config.acquire_timeout;
        match runtime::timeout(timeout, PHASE.scope(Arc::clone(phase), work)).await {
            Ok(result) => result,
            Err(_) => Err(Error::AcquireTimeout {
                timeout,
                waiting_for: phase.get(),
            }),
        }
    }

    /// The calling test's worker: its in-process slot (the one the thread holds, else a
    /// free one), or the process's fixed worker.
    async fn take_worker(
        &self,
        held: Option<Arc<SlotLease>>,
        phase: &Phase,
    ) -> (Option<Arc<SlotLease>>, WorkerId) {
        let lease = match (&self.slots, held) {
            (Some(_), Some(lease)) => Some(lease),
            (Some(slots), None) => {
                phase.set(format!(
                    "a free worker slot (all {} in use; a test holding handles of two fixtures can wait on itself)",
                    self.config.workers
                ));
                Some(slots.acquire().await)
            }
            (None, _) => None,
        };
        let id = match (&lease, &self.config.worker) {
            (Some(lease), _) => lease.worker(),
            (None, Some(id)) => id.clone(),
            (None, None) => unreachable!("a fixture without a fixed worker has slots"),
        };
        phase.set(format!("worker {id} to be provisioned"));
        (lease, id)
    }

    async fn test_db(
        self: Arc<Self>,
        held: Option<Arc<SlotLease>>,
        test: Option<String>,
    ) -> Result<TestDb> {
        let phase = Arc::new(Phase::default());
        let deadline = Instant::now() + self.config.acquire_timeout;
        self.timed(&phase, async {
            let (lease, id) = self.take_worker(held, &phase).await;
            let ready = async {
                let worker = self.worker_primed(&id, deadline, None).await?;
                phase.set(format!("a pooled connection of worker {id}"));
                let client = self.begin(&worker, &id).await?;
                Ok::<_, Error>((worker, client))
            };
            let (worker, client) = match ready.await {
                Ok(ready) => ready,
                Err(error) if server_gone(&error) => {
                    // The server was killed, or stopped by its watchdog as this process
                    // came for it: forget it and provision the worker again, on a fresh
                    // server if need be.
                    tracing::warn!(worker = %id, %error, "worker's server is gone; provisioning it again");
                    self.forget(&id);
                    phase.set(format!(
                        "worker {id} to be provisioned again (its server was gone)"
                    ));
                    let fresh = self.worker_primed(&id, deadline, None).await?;
                    let client = self.begin(&fresh, &id).await?;
                    (fresh, client)
                }
                Err(error) => return Err(error),
            };
            worker.served.fetch_add(1, Ordering::Relaxed);
            let settings = Arc::clone(&worker.settings);
            Ok(TestDb::new(client, id, lease, Arc::clone(&self), test, settings))
        })
        .await
        .map_err(Error::with_connection_advice)
    }

    #[cfg_attr(not(feature = "sqlx"), allow(dead_code))]
    async fn checkout(
        self: Arc<Self>,
        held: Option<Arc<SlotLease>>,
        test: Option<String>,
        primer: Option<Primer>,
    ) -> Result<Checkout> {
        let phase = Arc::new(Phase::default());
        let deadline = Instant::now() + self.config.acquire_timeout;
        self.timed(&phase, async {
            let (lease, id) = self.take_worker(held, &phase).await;
            let worker = match self.worker_primed(&id, deadline, primer).await {
                // As in `test_db`: a server found gone is forgotten and replaced.
                Err(error) if server_gone(&error) => {
                    tracing::warn!(worker = %id, %error, "worker's server is gone; provisioning it again");
                    self.forget(&id);
                    self.worker_primed(&id, deadline, primer).await?
                }
                other => other?,
            };
            end_primed(&worker, &id).await?;
            worker.served.fetch_add(1, Ordering::Relaxed);
            Ok(Checkout {
                id,
                lease,
                worker,
                owner: Arc::clone(&self),
                test,
                handed: Handed::default(),
            })
        })
        .await
        .map_err(Error::with_connection_advice)
    }

    async fn worker_pool(
        self: Arc<Self>,
        held: Option<Arc<SlotLease>>,
        opener: Option<PoolOpener>,
    ) -> Result<WorkerPool> {
        let phase = Arc::new(Phase::default());
        let deadline = Instant::now() + self.config.acquire_timeout;
        self.timed(&phase, async {
            let (lease, id) = self.take_worker(held, &phase).await;
            let (worker, clients) = match self.pool_worker(&id, deadline).await {
                // As in `test_db`: a server found gone (a stale record of a container
                // its watchdog stopped) is forgotten and replaced.
                Err(error) if server_gone(&error) => {
                    tracing::warn!(worker = %id, %error, "worker's server is gone; provisioning it again");
                    self.forget(&id);
                    phase.set(format!(
                        "worker {id} to be provisioned again (its server was gone)"
                    ));
                    self.pool_worker(&id, deadline).await?
                }
                other => other?,
            };
            let target = self.target(&worker);
            // Code under test gets the worker's own pool, whose connections are warm;
            // the connections it opens itself from the pool's settings carry a name of
            // their own, so that the release can tell when they are all closed.
            let mut server = worker.server.clone();
            server.application_name =
                pool_application_name(&server.application_name, &self.worker_name(&id), &id);
            let settings = Settings::new(
                &server,
                &worker.dbname,
                worker.search_path.as_deref(),
                worker.settings.restart_sequences.clone(),
            );
            if let Some(open) = opener {
                open(&worker, &settings, &self.config);
            }
            let before = self
                .mark_and_read(&worker, target, &clients, &id, Some("a worker pool"))
                .await?;
            drop(clients);
            Ok(WorkerPool {
                settings,
                pool: Some(worker.pool.clone()),
                worker: id,
                lease,
                owner: Arc::clone(&self),
                application_name: server.application_name,
                end_kept: false,
                before,
                state: worker,
            })
        })
        .await
        .map_err(Error::with_connection_advice)
    }

    /// Marks the worker as in use `by` (a worker pool, or a test handle whose settings
    /// went to code under test; no mark when `None`) and reads it ([`Reader`]), on
    /// `clients`, every idle connection of its pool ([`idle_connections`]). Marked
    /// first: if this process dies meanwhile, whoever takes the worker next finds the
    /// mark and resets it. The other connections' statistics reach the server first;
    /// then the mark, the first one's statistics and the reading go in one round trip
    /// (a connection runs what it is sent in order, each statement's statistics flushed
    /// as it ends).
    async fn mark_and_read(
        &self,
        worker: &Worker,
        target: provision::Target<'_>,
        clients: &[deadpool_postgres::Object],
        id: &WorkerId,
        by: Option<&str>,
    ) -> Result<Option<Reading>> {
        let (first, others) = clients.split_first().expect("at least one connection");
        let others: Vec<&tokio_postgres::Client> = others.iter().map(|c| &***c).collect();
        let (flushes, reader) = futures::future::join(
            worker.flushes(first),
            Reader::prepare(first, target, &worker.ddl_logged),
        )
        .await;
        let (flush, reader) = (provision::flush_statistics_sql(flushes?), reader?);
        provision::flush_statistics(&others, flush).await;
        let Some(by) = by else {
            if !flush.is_empty() {
                let (_, reading) =
                    futures::future::join(first.batch_execute(flush), reader.read(first)).await;
                return reading;
            }
            return reader.read(first).await;
        };
        let mark = provision::then(
            provision::mark_sql(target, &self.worker_mark(), true),
            flush,
        );
        let (marked, reading) =
            futures::future::join(first.batch_execute(&mark), reader.read(first)).await;
        marked.map_err(Error::pg(format!("marking worker {id} as in use by {by}")))?;
        reading
    }

    /// The worker of a worker pool, and every idle connection of its pool, so that
    /// each hands its pending statistics to the server before the first reading.
    async fn pool_worker(
        &self,
        id: &WorkerId,
        deadline: Instant,
    ) -> Result<(Arc<Worker>, Vec<deadpool_postgres::Object>)> {
        let worker = self.worker_primed(id, deadline, None).await?;
        end_primed(&worker, id).await?;
        worker.warmed().await;
        let clients = idle_connections(&worker, id).await?;
        Ok((worker, clients))
    }

    /// A maintenance connection to `server`, from a small pool kept per server: a new
    /// connection costs a few milliseconds, which every reset paid.
    async fn admin(&self, server: &Server) -> Result<deadpool_postgres::Object> {
        let connected = admin_connection(&self.admin_pool(server), server).await;
        match connected {
            Err(Error::Postgres { source, .. })
                if self.config.effective_backend() == Backend::Url =>
            {
                Err(Error::pg(format!(
                    "cannot connect to {}:{} as {} (fix PGFIXTURE_URL, or start that server)",
                    server.host, server.port, server.user
                ))(source))
            }
            connected => connected,
        }
    }

    fn admin_pool(&self, server: &Server) -> Pool {
        self.maintenance_pool(server, None)
    }

    /// The small pool of maintenance connections to `dbname` (the server's maintenance
    /// database when `None`) on `server`.
    fn maintenance_pool(&self, server: &Server, dbname: Option<&str>) -> Pool {
        // Where the connections go: a replaced container may have the same address,
        // and a socket elsewhere. The admin pool is a pool of its own even where the
        // database of the schemas is the maintenance database (`PGFIXTURE_URL`): a
        // provisioning holds an admin connection while it takes one of the schemas',
        // and workers provisioned at once would otherwise wait for each other forever.
        let key = format!(
            "{}:{}:{}:{}:{}",
            if dbname.is_none() {
                "admin"
            } else {
                "maintenance"
            },
            server.host,
            server.port,
            server.socket_dir.as_deref().unwrap_or_default(),
            dbname.unwrap_or(&server.admin_db)
        );
        // One set per process, whatever the configurations: each keeps its workers for
        // the process's life, and pools of their own would hold ADMIN_POOL_SIZE
        // connections each (a process of dozens of configurations, a bench's, ran the
        // server out of connections). The first configuration's acquire timeout applies.
        static POOLS: std::sync::OnceLock<Mutex<HashMap<String, Pool>>> =
            std::sync::OnceLock::new();
        let mut pools = POOLS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        pools
            .entry(key)
            .or_insert_with(|| match dbname {
                None => crate::pool::admin(server, self.config.acquire_timeout),
                Some(dbname) => {
                    crate::pool::maintenance(server, dbname, self.config.acquire_timeout)
                }
            })
            .clone()
    }

    /// Makes the worker's next spare database in the background ([`provision::refill_spare`]).
    fn refill_spare(&self, server: &Server, template: &str, worker: &str) {
        let (server, template, worker) = (server.clone(), template.to_owned(), worker.to_owned());
        let pool = self.admin_pool(&server);
        runtime::handle().spawn(async move {
            let result = async {
                let admin = admin_connection(&pool, &server).await?;
                provision::refill_spare(&admin, &template, &worker).await
            }
            .await;
            if let Err(error) = result {
                tracing::debug!(%error, worker, "making a spare worker database failed");
            }
        });
    }

    /// Makes the worker schema's next spare in the background
    /// ([`provision::refill_spare_schema`]), on a connection of `pool` (to `dbname`).
    fn refill_spare_schema(&self, server: &Server, pool: &Pool, dbname: &str, worker: &str) {
        let (server, pool, dbname, worker) = (
            server.clone(),
            pool.clone(),
            dbname.to_owned(),
            worker.to_owned(),
        );
        let Ok((fixtures, _)) = self.content() else {
            return;
        };
        let (fixtures, mark) = (fixtures.clone(), self.worker_mark());
        runtime::handle().spawn(async move {
            let result = async {
                let client = admin_connection(&pool, &server).await?;
                provision::refill_spare_schema(
                    &client,
                    (&server, &dbname),
                    &worker,
                    &fixtures,
                    &mark,
                )
                .await
            }
            .await;
            if let Err(error) = result {
                tracing::debug!(%error, worker, "making a spare worker schema failed");
            }
        });
    }

    /// Where the marks of `worker` go.
    fn target<'w>(&self, worker: &'w Worker) -> provision::Target<'w> {
        crate::isolation::target(
            self.config.isolation,
            &worker.target,
            &worker.dbname,
            self.config.effective_backend() == Backend::Url,
        )
    }

    /// After a worker pool whose connections are named `application_name`: when they
    /// are all closed and nothing they did shows in the worker (its reading equals
    /// `before`), the worker is marked clean again, a millisecond or two; else it is
    /// rebuilt from the fixtures ([`Inner::reset`]).
    pub(crate) async fn release_pool(
        &self,
        id: &WorkerId,
        application_name: &str,
        kept: Option<&str>,
        before: Option<Reading>,
    ) -> Result<()> {
        // A driver's kept connections that were still out when the test ended (a task
        // of the test's holding one): ended first, which rolls back what they left
        // open, so that the reading sees all they did and none writes after it (into
        // the worker's successor, in schema mode). Where they cannot be, a rebuild.
        let before = match kept {
            Some(name) if !self.end_test_connections(id, name).await => None,
            _ => before,
        };
        let deadline = Instant::now() + self.config.acquire_timeout;
        // Whether every pooled connection is idle with its session cleared.
        let mut keep_pool = false;
        // Whether the connections the code under test opened are known to be gone.
        let mut ended = false;
        if let Some(before) = before {
            let worker = self.worker_primed(id, deadline, None).await?;
            let target = self.target(&worker);
            let status = worker.pool.status();
            // A connection still out (held past the guard) could change it later.
            if status.size == status.available {
                let clients = idle_connections(&worker, id).await?;
                let (first, others) = clients.split_first().expect("at least one connection");
                // Whatever the code under test left in the connections' sessions goes,
                // and their statistics reach the server: the other connections' first.
                // Then, on the first one, in one round trip: its cleanup, whether the
                // connections the code under test opened itself are all closed (their
                // backends hand over their statistics as they exit), and the reading.
                let cleanup = provision::pool_cleanup(worker.flushes(first).await?);
                let cleaned =
                    futures::future::join_all(others.iter().map(|c| c.simple_query(cleanup))).await;
                // Prepared first (cached), so that each sends one message, in order.
                let open = provision::open_connections(first).await?;
                let reader = Reader::prepare(first, target, &worker.ddl_logged).await?;
                let (cleaned_first, closed, after) = futures::future::join3(
                    first.simple_query(cleanup),
                    provision::none_open(first, &open, application_name),
                    reader.read(first),
                )
                .await;
                let mut clean = true;
                let cleaned = std::iter::once(cleaned_first).chain(cleaned);
                for (client, messages) in clients.iter().zip(cleaned) {
                    match messages {
                        Ok(messages) => {
                            crate::driver::tokio_postgres::deallocate(client, &messages)
                                .await
                                .map_err(Error::pg(format!("cleaning the pool of worker {id}")))?
                        }
                        Err(_) => clean = false,
                    }
                }
                let after = if !clean {
                    None
                } else if closed? {
                    ended = true;
                    Some(after?)
                } else if provision::end_open(first, application_name).await? {
                    // Some were open or closing still: read again now that they are
                    // gone.
                    ended = true;
                    Some(reader.read(first).await?)
                } else {
                    None
                };
                keep_pool = after.is_some();
                if let Some(after) = after {
                    let change = after.map(|after| before.change_to(&after));
                    match change {
                        Some(Change::None) => {
                            first
                                .batch_execute(&provision::mark_sql(
                                    target,
                                    &self.worker_mark(),
                                    false,
                                ))
                                .await
                                .map_err(Error::pg(format!("marking worker {id} clean")))?;
                            self.stats.pools_unchanged.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(worker = %id, "nothing changed through the worker pool; no reset");
                            return Ok(());
                        }
                        Some(Change::Rows {
                            oids,
                            inserted_only,
                            horizon,
                        }) => {
                            // On another connection than the readings' when there is
                            // one: the restore's `session_replication_role` empties its
                            // connection's plan cache, and the reading's plan would be
                            // made again for the next test (0.2 ms of the server's).
                            let on = clients.last().expect("at least one connection");
                            let appended = horizon.map(|h| (&inserted_only[..], h));
                            if self.restore(&worker, target, on, &oids, appended).await? {
                                self.stats.pools_restored.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(worker = %id, tables = oids.len(), "rows written through the worker pool put back in place");
                                return Ok(());
                            }
                        }
                        Some(Change::Other) | None => {}
                    }
                }
            }
        }
        if !ended {
            let _ = self.end_test_connections(id, application_name).await;
        }
        // A connection of the worker's own pool still held (by a task of the test's)
        // is ended with the others of that pool, which the reset replaces, rolling
        // back what it left open: else it could write after its test, in schema mode
        // into the worker's successor, which takes the worker's name.
        if let Some(worker) = self.ready_worker(id) {
            let status = worker.pool.status();
            if status.size != status.available {
                worker.pool.close();
                keep_pool = false;
                let _ = self
                    .end_test_connections(id, &worker.application_name)
                    .await;
            }
        }
        self.reset_keeping(id, keep_pool).await
    }

    /// Ends the connections named `application_name` that the code under test opened
    /// from worker `id`'s pool settings and left open ([`provision::end_open`]),
    /// before the worker is rebuilt without a reading (before PostgreSQL 15, a pooled
    /// connection still held): a rebuild in schema mode would not end them, and one
    /// could hold locks of the schema it drops, or write into its successor; or those
    /// a driver kept that were still out at the test's end, before the reading.
    /// Whether they are gone; errors are only logged.
    async fn end_test_connections(&self, id: &WorkerId, application_name: &str) -> bool {
        let Some(worker) = self.ready_worker(id) else {
            return false;
        };
        let ended = async {
            let admin = self.admin(&worker.server).await?;
            provision::end_open(&admin, application_name).await
        };
        ended.await.unwrap_or_else(|error| {
            tracing::debug!(%error, worker = %id, "ending a worker pool's connections failed");
            false
        })
    }

    /// Puts back in place the rows of the relations `oids` of `worker`, which are all
    /// that changed, from the rows its template (or schema) held, or where `appended`
    /// says rows were only inserted, by removing those ([`crate::restore::restore_sql`]),
    /// and marks it clean ([`crate::restore`]), on `client`, a connection of its pool.
    /// Returns `false` when they cannot be put back that way (the caller rebuilds the
    /// worker).
    async fn restore(
        &self,
        worker: &Worker,
        target: provision::Target<'_>,
        client: &tokio_postgres::Client,
        oids: &[u32],
        appended: Option<(&[u32], u32)>,
    ) -> Result<bool> {
        let schema = worker
            .search_path
            .as_deref()
            .map(|_| worker.target.as_str());
        let cached = worker
            .described
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(oids)
            .cloned();
        let described = match cached {
            Some(described) => described,
            None => {
                let described = Arc::new(crate::restore::describe(client, oids, schema).await?);
                worker
                    .described
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(oids.to_vec(), Arc::clone(&described));
                described
            }
        };
        let Some((tables, schema_oid)) = described.as_ref() else {
            return Ok(false);
        };
        let schema_oid = *schema_oid;
        let server = &worker.server;
        let key = match schema_oid {
            Some(oid) => crate::restore::schema_key(&worker.target, oid),
            None => provision::template_name(&self.fixtures_hash, &server.user),
        };
        let cache_key = format!("{}:{}:{key}", server.host, server.port);
        let cached = self
            .recorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&cache_key)
            .cloned();
        let recorded = match cached {
            Some(recorded) => recorded,
            None => {
                // The store is in the database of the schemas (on `client`), or in the
                // maintenance database for templates.
                let recorded = if schema_oid.is_some() {
                    crate::restore::recorded(client, &key).await?
                } else {
                    crate::restore::recorded(&**self.admin(server).await?, &key).await?
                };
                let recorded = Arc::new(recorded);
                if !recorded.is_empty() {
                    self.recorded
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(cache_key, Arc::clone(&recorded));
                }
                recorded
            }
        };
        // The restore's statistics reach the server as it ends, for the next reading.
        let mut then = provision::then(
            provision::mark_sql(target, &self.worker_mark(), false),
            provision::flush_statistics_sql(worker.flushes(client).await?),
        );
        if let Some(setting) = provision::sequences_setting(target) {
            then = format!("{}; {then}", crate::restore::set_sequences_sql(&setting));
        }
        let Some(sql) = crate::restore::restore_sql(tables, &recorded, appended, &then) else {
            return Ok(false);
        };
        match client.batch_execute(&sql).await {
            Ok(()) => Ok(true),
            Err(error) => {
                tracing::debug!(?error, worker = %worker.target, "putting rows back in place failed; rebuilding the worker");
                let _ = client.batch_execute("ROLLBACK").await;
                Ok(false)
            }
        }
    }

    /// Rebuilds the worker from the fixtures after the end of a test's transaction
    /// could not be read (`why`: its connection died or closed first), since whether
    /// the test committed is unknown, and says so.
    pub(crate) async fn after_unread_end(
        &self,
        id: &WorkerId,
        test: Option<&str>,
        why: &str,
    ) -> Result<()> {
        let test = test.unwrap_or("a test");
        tracing::warn!(worker = %id, test, why, "the end of the test's transaction could not be read; resetting the worker");
        eprintln!(
            "pgfixture: the end of the transaction of {test} on worker {id} could not be read ({why}); resetting the worker, since whether it committed is unknown"
        );
        self.reset(id).await
    }

    /// Rebuilds the worker from the fixtures after a test committed its transaction
    /// (`test` names it) and says so once.
    pub(crate) async fn after_commit(&self, id: &WorkerId, test: Option<&str>) -> Result<()> {
        self.stats.commit_leaks.fetch_add(1, Ordering::Relaxed);
        let test = test.unwrap_or("a test");
        tracing::warn!(worker = %id, test, "the test committed its transaction; resetting the worker");
        eprintln!(
            "pgfixture: {test} committed its transaction on worker {id} (COMMIT, END or ROLLBACK through the client); resetting the worker so that the next test does not see its changes; use pgfixture::worker_pool() for code that must commit"
        );
        self.reset(id).await
    }

    /// Rebuilds the worker's database or schema from the fixtures and gives it a new
    /// pool; connections to the old one are closed. (A worker pool's release may keep
    /// the pool in schema mode: [`Inner::reset_keeping`].)
    pub(crate) async fn reset(&self, id: &WorkerId) -> Result<()> {
        self.reset_keeping(id, false).await
    }

    /// [`Inner::reset`]; `keep_pool` when the worker's pooled connections are all idle
    /// and their sessions cleared, so that in schema mode the pool may serve the
    /// rebuilt schema.
    async fn reset_keeping(&self, id: &WorkerId, keep_pool: bool) -> Result<()> {
        // A connection still opening would hold the rename of its database up.
        let previous = self.ready_worker(id);
        if let Some(worker) = &previous {
            worker.warmed().await;
        }
        let reset = Reset {
            keep: previous.filter(|_| keep_pool),
        };
        let deadline = Instant::now() + self.config.acquire_timeout;
        let cell = Arc::new(OnceCell::new());
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), Arc::clone(&cell));
        cell.get_or_try_init(|| self.provision_boxed(id, deadline, Some(reset), None))
            .await
            .map(|_| ())
    }

    /// A pooled connection of `worker` inside a fresh transaction.
    async fn begin(&self, worker: &Worker, id: &WorkerId) -> Result<deadpool_postgres::Object> {
        if let Some(client) = worker.take_primed() {
            return Ok(client);
        }
        let client = match crate::driver::tokio_postgres::take_unclean(worker).await {
            Some(cleared) => cleared.map_err(Error::pg(format!(
                "clearing a connection of worker {id} for the next test"
            )))?,
            None => worker.pool.get().await.map_err(|source| Error::Pool {
                worker: id.to_string(),
                source,
            })?,
        };
        // Sent, not waited for: tokio-postgres sends a request when its future is
        // first polled, and the connection keeps requests in order and reads the
        // answers of dropped futures, so the test's first statement follows the BEGIN
        // on the wire and runs inside the transaction, one round trip sooner. A BEGIN
        // that failed shows when the test ends: the transaction's mark is missing,
        // which is handled like a commit (reported, worker reset). A connection found
        // closed fails here, as before.
        use futures::FutureExt;
        if let Some(Err(e)) = client.batch_execute(&worker.begin).now_or_never() {
            return Err(Error::pg(format!(
                "starting the test transaction on worker {id}"
            ))(e));
        }
        Ok(client)
    }

    /// What begins a test's transaction on a worker: [`crate::driver::BEGIN`], then,
    /// with [`Config::reset_sequences`], the restart of its sequences.
    fn begin_sql(&self, target: provision::Target<'_>) -> String {
        match provision::sequences_setting(target) {
            Some(setting) if self.config.reset_sequences => format!(
                "{}; {}",
                crate::driver::BEGIN,
                provision::restart_sequences(&setting)
            ),
            _ => crate::driver::BEGIN.to_owned(),
        }
    }

    /// The mark (comment) of this configuration's worker databases and schemas.
    fn worker_mark(&self) -> String {
        provision::worker_mark(&self.config.run_id)
    }

    /// The worker's database or schema: the fixtures' and the configuration's (with
    /// the run) hash, so that runs and configurations sharing a server never collide.
    fn worker_name(&self, id: &WorkerId) -> String {
        let key = crate::digest::sha256_hex(
            format!("{}:{}", &self.fixtures_hash[..16], self.instance),
            8,
        );
        let name = format!("pgfx_w_{key}_{id}");
        debug_assert!(name.len() + 4 <= provision::MAX_IDENT);
        name
    }

    /// Drops what this process knows of the worker and of the shared server; the next
    /// use finds (or starts) them again.
    /// The fixtures and migrations, read on first need: a process that found the
    /// hash recorded ([`crate::fingerprint`]) reads them only to build something.
    fn content(&self) -> Result<&Content> {
        if let Some(content) = self.content.get() {
            return Ok(content);
        }
        let read = read_fixtures(&self.config)?;
        if read.0.hash(64) != self.fixtures_hash {
            let path = self
                .config
                .fixtures
                .clone()
                .or_else(|| self.config.migrations.clone())
                .unwrap_or_default();
            return Err(Error::FixtureRead {
                path,
                reason:
                    "the fixtures or migrations changed while the tests ran; run the tests again"
                        .to_owned(),
            });
        }
        Ok(self.content.get_or_init(|| read))
    }

    pub(crate) fn forget(&self, id: &WorkerId) {
        self.forget_worker(id);
        *self.shared.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(OnceCell::new());
        // A server found gone once is checked with a connection from now on.
        self.trust_servers.store(false, Ordering::Relaxed);
    }

    /// Drops what this process knows of the worker alone: its next use provisions it
    /// again from what its mark says.
    pub(crate) fn forget_worker(&self, id: &WorkerId) {
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    async fn source(&self) -> Result<&Source> {
        self.source
            .get_or_try_init(|| Source::resolve(&self.config))
            .await
    }

    /// The name of a server: run, backend and flavour, and what it is for.
    fn server_name(&self, kind: &str, flavour: &str, role: &str) -> String {
        // Servers with other settings are other servers.
        let settings = &self.config.server_settings;
        let key = if settings.is_empty() {
            format!("{kind}:{flavour}")
        } else {
            let settings = crate::config::settings_text(settings);
            format!("{kind}:{flavour}:{settings}")
        };
        let flavour = crate::digest::sha256_hex(key, 3);
        format!("pgfixture-{}-{flavour}-{role}", self.config.run_id)
    }

    async fn server(&self, role: &str, deadline: Instant) -> Result<Server> {
        // A container another process of the run recorded: no Docker API call at all.
        #[cfg(feature = "docker")]
        {
            let may_be_docker = matches!(
                self.config.effective_backend(),
                Backend::Docker | Backend::Auto
            );
            if may_be_docker && self.trust_servers.load(Ordering::Relaxed) {
                let name = self.server_name("docker", &self.config.image, role);
                if let Some(server) = crate::backend::docker::known(&name)? {
                    let _ = self.backend.set(("docker", self.config.image.clone()));
                    self.stats.servers_reused.fetch_add(1, Ordering::Relaxed);
                    return Ok(server.for_run(&self.config.run_id));
                }
            }
        }
        // A local server another process of the run recorded: the binaries are not
        // looked for.
        let local_key = matches!(
            self.config.effective_backend(),
            Backend::Local | Backend::Auto
        )
        .then(|| {
            let settings = crate::config::settings_text(&self.config.server_settings);
            let name = format!("{}\n{role}\n{settings}", self.config.run_id);
            crate::backend::local::record_key(&self.config, &name)
        });
        if let Some(key) = &local_key
            && self.trust_servers.load(Ordering::Relaxed)
            && let Some((server, bin)) = crate::backend::local::known(key)
        {
            let _ = self.backend.set(("local", bin));
            self.stats.servers_reused.fetch_add(1, Ordering::Relaxed);
            return Ok(server.for_run(&self.config.run_id));
        }
        let source = self.source().await?;
        let _ = self.backend.set((source.kind(), source.flavour()));
        let name = self.server_name(source.kind(), &source.flavour(), role);
        let trust = self.trust_servers.load(Ordering::Relaxed);
        let (server, started) = source.server(&name, &self.config, deadline, trust).await?;
        if let (Some(key), "local") = (&local_key, source.kind()) {
            crate::backend::local::remember(key, &server, &source.flavour());
        }
        let counter = if started {
            &self.stats.servers_started
        } else {
            &self.stats.servers_reused
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(server)
    }

    /// The worker `id` of this process, when it is ready.
    pub(crate) fn ready_worker(&self, id: &WorkerId) -> Option<Arc<Worker>> {
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .and_then(|cell| cell.get().cloned())
    }

    async fn shared_server(&self, deadline: Instant) -> Result<Server> {
        let cell = Arc::clone(&self.shared.lock().unwrap_or_else(|e| e.into_inner()));
        cell.get_or_try_init(|| self.server("shared", deadline))
            .await
            .cloned()
    }

    /// [`Inner::worker`]; a worker another process left ready is checked on a
    /// connection `primer` opens (a driver's own), which the first test then uses.
    pub(crate) async fn worker_primed(
        &self,
        id: &WorkerId,
        deadline: Instant,
        primer: Option<Primer>,
    ) -> Result<Arc<Worker>> {
        let cell = Arc::clone(
            self.workers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(id.clone())
                .or_default(),
        );
        cell.get_or_try_init(|| self.provision_boxed(id, deadline, None, primer))
            .await
            .cloned()
    }

    /// [`Inner::provision`], boxed: the futures of provisioning nest deep (backends,
    /// modes, templates), and a caller's future that held them inline made rustc's
    /// layout queries overflow their depth limit in crates that await a handle.
    /// Provisioning costs milliseconds; the allocation costs nothing next to it.
    fn provision_boxed<'a>(
        &'a self,
        id: &'a WorkerId,
        deadline: Instant,
        reset: Option<Reset>,
        primer: Option<Primer>,
    ) -> futures::future::BoxFuture<'a, Result<Arc<Worker>>> {
        Box::pin(self.provision(id, deadline, reset, primer))
    }

    /// Makes (or finds) the worker's database or schema and its pool; rebuilds it from
    /// the fixtures when `reset` is set or it is marked dirty.
    async fn provision(
        &self,
        id: &WorkerId,
        deadline: Instant,
        reset: Option<Reset>,
        primer: Option<Primer>,
    ) -> Result<Arc<Worker>> {
        use provision::State;
        let started = Instant::now();
        let (reset, keep) = match reset {
            Some(Reset { keep }) => (true, keep),
            None => (false, None),
        };
        let worker_name = self.worker_name(id);
        step(|| format!("the server of worker {id} to be found or started"));
        let server = match self.config.isolation {
            Isolation::Container => {
                self.server(&format!("{}-w{id}", self.instance), deadline)
                    .await?
            }
            _ => self.shared_server(deadline).await?,
        };
        // From the configuration: resolving the source would ask Docker for the image,
        // three API calls that a worker on a known container does not need.
        let shared_server = self.config.effective_backend() == Backend::Url;
        // On a server of the user's, workers are checked by their comment, and not
        // where every test restarts the sequences, whose setting only the long way
        // makes sure of; the check's failure there, even to connect, sends the worker
        // the long way, whose error names the fix.
        step(|| format!("worker {id} to be found on {}", server.name));
        if !reset
            && (!shared_server || !self.config.reset_sequences)
            && let Some(worker) = match primer {
                Some(primer) => self.attach_primed(id, &server, &worker_name, primer).await,
                None => self.attach_worker(id, &server, &worker_name).await,
            }
            .or_else(|e| if shared_server { Ok(None) } else { Err(e) })?
        {
            if shared_server
                && !crate::runs::touched_recently(
                    &server,
                    &self.config.run_id,
                    self.config.server_grace(),
                )
            {
                let admin = self.admin(&server).await?;
                provision::touch_run(&admin, &server, &self.config.run_id).await?;
            }
            self.stats.workers_reused.fetch_add(1, Ordering::Relaxed);
            self.stats.workers_attached.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(worker = %id, target = %worker_name, elapsed = ?started.elapsed(), "worker found ready");
            return Ok(worker);
        }
        step(|| format!("worker {id} to be made on {}", server.name));
        let mark = self.worker_mark();
        let (fixtures, shared_statements) = self.content()?;
        // One maintenance connection for every step; a worker found complete (the
        // common case in a nextest process) costs one query on it.
        let admin = self.admin(&server).await?;
        if shared_server {
            provision::touch_run(&admin, &server, &self.config.run_id).await?;
        }
        let schemas = (self.config.isolation == Isolation::Schema).then(|| {
            let dbname = crate::isolation::schema::database(&server, shared_server);
            self.maintenance_pool(&server, Some(dbname))
        });
        let prepare = crate::isolation::Prepare {
            server: &server,
            admin: &admin,
            schemas: schemas.as_ref(),
            name: &worker_name,
            mark: &mark,
            reset,
            shared_server,
            run_id: &self.config.run_id,
            grace: self.config.server_grace(),
            fixtures,
            shared_statements,
        };
        let prepared = match self.config.isolation {
            Isolation::Schema => crate::isolation::schema::prepare(&prepare).await?,
            Isolation::Database | Isolation::Container => {
                crate::isolation::database::prepare(&prepare).await?
            }
        };
        if prepared.template_built {
            self.stats.templates_built.fetch_add(1, Ordering::Relaxed);
        }
        // A user of a server of their own who may not write pgfixture's settings has
        // no record of the sequences' values to restart them at.
        let sequences_recorded = !shared_server
            || self.config.isolation == Isolation::Schema
            || provision::sequences_recorded(&admin, &prepared.dbname).await?;
        if self.config.reset_sequences && !sequences_recorded {
            return Err(Error::config(
                "PGFIXTURE_RESET_SEQUENCES",
                "1",
                "a user of PGFIXTURE_URL who may set pgfixture's settings (a superuser, or a role granted SET on the parameter pgfixture.sequences), for pgfixture records the sequences' values in a setting of each worker database; or leave it unset",
            ));
        }
        if prepared.spare_used {
            self.stats.spares_used.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(template) = &prepared.refill_from {
            self.refill_spare(&server, template, &worker_name);
        }
        if let (true, Some(pool)) = (prepared.refill_schema, &schemas) {
            self.refill_spare_schema(&server, pool, &prepared.dbname, &worker_name);
        }
        let crate::isolation::Prepared {
            dbname,
            search_path,
            state,
            ..
        } = prepared;
        let counter = match (state, reset) {
            (State::Missing, _) => &self.stats.workers_provisioned,
            (State::Dirty | State::Foreign, _) | (_, true) => &self.stats.workers_reset,
            (State::Clean, false) => &self.stats.workers_reused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        // Schema mode: the pool of the worker just reset, when its connections are
        // clean and to the same database with the same `search_path` (the schema's
        // name), serves the new schema as it is: no new connections to wait for.
        let kept = keep.filter(|old| {
            self.config.isolation == Isolation::Schema
                && (old.server.host.as_str(), old.server.port)
                    == (server.host.as_str(), server.port)
                && old.dbname == dbname
                && old.search_path == search_path
        });
        let application_name = own_application_name(&server.application_name, &worker_name, id);
        let pool = match &kept {
            Some(old) => {
                // Statements prepared on the old schema's objects are described by
                // them (a `SELECT *` after the test's `ALTER TABLE`, a type's oid):
                // prepared again, as on a new pool.
                old.pool.manager().statement_caches.clear();
                old.pool.clone()
            }
            None => {
                let size = self.pool_size(&admin).await?;
                crate::pool::build(
                    &server,
                    &dbname,
                    search_path.as_deref(),
                    &application_name,
                    size,
                    self.config.acquire_timeout,
                )
            }
        };
        let size = pool.status().max_size;
        tracing::info!(
            worker = %id,
            mode = self.config.isolation.as_str(),
            target = %worker_name,
            ?state,
            reset,
            pool_size = size,
            elapsed = ?started.elapsed(),
            "worker ready"
        );
        let target =
            crate::isolation::target(self.config.isolation, &worker_name, &dbname, shared_server);
        let restart = provision::sequences_setting(target)
            .filter(|_| sequences_recorded)
            .map(|s| provision::restart_sequences(&s));
        let (handed_name, settings) = handed_settings(
            &server,
            &worker_name,
            id,
            &dbname,
            search_path.as_deref(),
            restart,
        );
        let begin = self.begin_sql(target);
        let worker = Arc::new(Worker {
            pool,
            application_name,
            handed_name,
            served: AtomicU64::new(0),
            server,
            dbname,
            search_path,
            target: worker_name,
            primed: Mutex::new(None),
            described: Mutex::default(),
            ddl_logged: tokio::sync::OnceCell::new(),
            flushes: tokio::sync::OnceCell::new(),
            settings,
            begin,
            idle: Mutex::default(),
            warming: Mutex::default(),
        });
        if reset && kept.is_none() {
            self.warm_up(&worker, shared_server);
        }
        Ok(worker)
    }

    /// Opens the first connection of a worker just rebuilt, in the background, and
    /// makes on it the reading a worker pool starts with: the next test would
    /// otherwise wait for both (a new backend, and its first reading of a database it
    /// has never seen, about 3 ms each). The pool hands the most recently returned
    /// connection out first, so the next test gets this one.
    fn warm_up(&self, worker: &Arc<Worker>, shared_server: bool) {
        let isolation = self.config.isolation;
        let warming = Arc::clone(worker);
        let task = runtime::handle().spawn(async move {
            let Ok(client) = warming.pool.get().await else {
                return;
            };
            let target = crate::isolation::target(
                isolation,
                &warming.target,
                &warming.dbname,
                shared_server,
            );
            let reading = crate::restore::fingerprint(&client, target, &warming.ddl_logged);
            if let Err(error) = reading.await {
                tracing::debug!(%error, worker = %warming.target, "warming a rebuilt worker up failed");
            }
        });
        *worker.warming.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
    }

    /// The pool size asked for, lowered so that every worker's pool fits the server's
    /// `max_connections`.
    async fn pool_size(&self, admin: &tokio_postgres::Client) -> Result<usize> {
        let max: i32 = admin
            .query_one("SELECT current_setting('max_connections')::int", &[])
            .await
            .map_err(Error::pg("reading max_connections"))?
            .get(0);
        Ok(self.fit_pool_size(max))
    }

    /// The pool size asked for, lowered so that every worker's pool fits a server with
    /// `max` connections.
    fn fit_pool_size(&self, max: i32) -> usize {
        let wanted = self.config.pool_size.unwrap_or(DEFAULT_POOL_SIZE);
        let pools_per_server = self.pools_per_server();
        let budget =
            (max.max(0) as usize).saturating_sub(RESERVED_CONNECTIONS) / pools_per_server.max(1);
        // Other drivers keep a few connections per worker besides the pool.
        let others = if cfg!(any(feature = "sqlx", feature = "sqlx-0_8")) {
            DRIVER_CONNECTIONS
        } else {
            0
        };
        let size = wanted.min(budget.saturating_sub(others).max(1));
        if size < wanted {
            tracing::warn!(
                wanted,
                size,
                max_connections = max,
                "pool size lowered to fit max_connections"
            );
        }
        size
    }

    /// [`Inner::attach_worker`] for a driver of its own: the check goes on a connection
    /// `primer` opens, with the first test's `BEGIN` ([`PrimeCheck`]), and fails unless the worker is clean and the server's `max_connections` leaves room for
    /// the pool size asked for (else the worker is provisioned the usual way, which
    /// lowers the pool size to fit). The connection goes to the worker's stash, its
    /// test's transaction open, for the first test.
    #[cfg_attr(not(any(feature = "sqlx", feature = "sqlx-0_8")), allow(dead_code))]
    async fn attach_primed(
        &self,
        id: &WorkerId,
        server: &Server,
        name: &str,
        primer: Primer,
    ) -> Result<Option<Arc<Worker>>> {
        let shared_server = self.config.effective_backend() == Backend::Url;
        let (dbname, search_path) = self.worker_location(server, name, shared_server);
        let target = crate::isolation::target(self.config.isolation, name, dbname, shared_server);
        let wanted = self.config.pool_size.unwrap_or(DEFAULT_POOL_SIZE);
        let restart =
            provision::sequences_setting(target).map(|s| provision::restart_sequences(&s));
        let (handed_name, settings) =
            handed_settings(server, name, id, dbname, search_path.as_deref(), restart);
        let begin = self.begin_sql(target);
        let check = PrimeCheck::new(
            &begin,
            &mark_source(target, shared_server),
            self.max_connections_for(wanted),
        );
        let Some(conn) = primer(Arc::clone(&settings), check).await? else {
            return Ok(None);
        };
        let application_name = own_application_name(&server.application_name, name, id);
        let pool = crate::pool::build(
            server,
            dbname,
            search_path.as_deref(),
            &application_name,
            wanted,
            self.config.acquire_timeout,
        );
        let worker = Worker {
            pool,
            application_name,
            handed_name,
            served: AtomicU64::new(0),
            server: server.clone(),
            dbname: dbname.to_owned(),
            search_path,
            target: name.to_owned(),
            primed: Mutex::new(None),
            described: Mutex::default(),
            ddl_logged: tokio::sync::OnceCell::new(),
            flushes: tokio::sync::OnceCell::new(),
            settings,
            begin,
            idle: Mutex::new(vec![conn]),
            warming: Mutex::default(),
        };
        Ok(Some(Arc::new(worker)))
    }

    /// The database the connections of the worker `name` open, and their `search_path`:
    /// a worker schema's lives in the database of the schemas
    /// ([`crate::isolation::schema::database`]).
    fn worker_location<'a>(
        &self,
        server: &'a Server,
        name: &'a str,
        shared_server: bool,
    ) -> (&'a str, Option<String>) {
        match self.config.isolation {
            Isolation::Schema => (
                crate::isolation::schema::database(server, shared_server),
                Some(name.to_owned()),
            ),
            _ => (name, None),
        }
    }

    /// The `max_connections` a server needs for every worker's pool of `wanted`
    /// connections and what other drivers keep ([`Inner::fit_pool_size`] in reverse).
    #[cfg_attr(not(any(feature = "sqlx", feature = "sqlx-0_8")), allow(dead_code))]
    fn max_connections_for(&self, wanted: usize) -> usize {
        (wanted + DRIVER_CONNECTIONS) * self.pools_per_server().max(1) + RESERVED_CONNECTIONS
    }

    /// How many workers' pools share a server. Under nextest the slots are the
    /// workers, and `-j` may exceed the threads this process would run: count up to
    /// this process's slot at least.
    fn pools_per_server(&self) -> usize {
        let slot = self
            .config
            .worker
            .as_ref()
            .and_then(|w| w.as_str().parse::<usize>().ok())
            .map_or(0, |n| n + 1);
        match self.config.isolation {
            Isolation::Container => 1,
            _ => self.config.workers.max(slot),
        }
    }

    /// The worker as another process left it, checked on the first pooled connection,
    /// which the test then uses: one connection and one round trip in all before the
    /// test's first query, the common case of a nextest process. `None` when it is not
    /// there or not clean: provision it.
    async fn attach_worker(
        &self,
        id: &WorkerId,
        server: &Server,
        name: &str,
    ) -> Result<Option<Arc<Worker>>> {
        use deadpool_postgres::PoolError;
        use tokio_postgres::SimpleQueryMessage;
        // `name` is pgfixture's own: lowercase letters, digits and '_'.
        let shared_server = self.config.effective_backend() == Backend::Url;
        let (dbname, search_path) = self.worker_location(server, name, shared_server);
        let target = crate::isolation::target(self.config.isolation, name, dbname, shared_server);
        let dbname = dbname.to_owned();
        // The mark as a setting, loaded when the connection started. SHOW takes no
        // snapshot, so the test may still choose its transaction's isolation level.
        // On a server of the user's, the comment is read instead ([`mark_source`]):
        // a snapshot of its own, before the test's `BEGIN`.
        let sql = if shared_server {
            format!(
                "SELECT m FROM {}; SHOW max_connections",
                mark_source(target, true)
            )
        } else {
            format!(
                "SHOW {}; SHOW max_connections",
                target
                    .setting()
                    .expect("pgfixture's own servers mark workers with settings")
            )
        };
        let wanted = self.config.pool_size.unwrap_or(DEFAULT_POOL_SIZE);
        let application_name = own_application_name(&server.application_name, name, id);
        let pool = crate::pool::build(
            server,
            &dbname,
            search_path.as_deref(),
            &application_name,
            wanted,
            self.config.acquire_timeout,
        );
        let client = match pool.get().await {
            Ok(client) => client,
            Err(PoolError::Backend(e))
                if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME) =>
            {
                return Ok(None);
            }
            Err(source) => {
                return Err(Error::Pool {
                    worker: id.to_string(),
                    source,
                });
            }
        };
        // The first test's transaction begins in the same round trip; if the worker is
        // not ready, the connection goes with this pool. The comment's query is a
        // message of its own, sent with the `BEGIN` but not in its transaction (a
        // statement before a `BEGIN` in one message joins its transaction, and its
        // snapshot would keep the test from choosing its isolation level).
        let begin = self.begin_sql(target);
        let checked = if shared_server {
            let (check, begun) =
                futures::future::join(client.simple_query(&sql), client.simple_query(&begin)).await;
            begun.and(check)
        } else {
            client.simple_query(&format!("{sql}; {begin}")).await
        };
        let messages = match checked {
            Ok(messages) => messages,
            // No mark at all: a worker that is not ready.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) => {
                return Ok(None);
            }
            Err(e) => return Err(Error::pg(format!("looking up worker {id}"))(e)),
        };
        let mut rows = messages.iter().filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0),
            _ => None,
        });
        let (Some(mark), Some(max)) = (rows.next(), rows.next()) else {
            return Ok(None);
        };
        let (mark, max) = (mark.to_owned(), max.parse().unwrap_or(0));
        if provision::State::of(Some(mark)) != provision::State::Clean {
            return Ok(None);
        }
        let size = self.fit_pool_size(max);
        if size < wanted {
            pool.resize(size);
        }
        let restart =
            provision::sequences_setting(target).map(|s| provision::restart_sequences(&s));
        let (handed_name, settings) =
            handed_settings(server, name, id, &dbname, search_path.as_deref(), restart);
        Ok(Some(Arc::new(Worker {
            pool,
            application_name,
            handed_name,
            served: AtomicU64::new(0),
            server: server.clone(),
            dbname,
            search_path,
            target: name.to_owned(),
            primed: Mutex::new(Some(client)),
            described: Mutex::default(),
            ddl_logged: tokio::sync::OnceCell::new(),
            flushes: tokio::sync::OnceCell::new(),
            settings,
            begin,
            idle: Mutex::default(),
            warming: Mutex::default(),
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A timeout names the step it came in and how long every step took, so that the
    /// time is put where it went.
    #[test]
    fn a_timeout_says_how_long_each_step_took() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        assert_eq!(describe_steps(&[], start), "a worker");
        let steps = vec![
            ("worker 3 to be provisioned".to_owned(), at(0)),
            (
                "the server of worker 3 to be found or started".to_owned(),
                at(100),
            ),
            ("worker 3 to be made on pgfx".to_owned(), at(29_300)),
            ("a pooled connection of worker 3".to_owned(), at(29_800)),
        ];
        assert_eq!(
            describe_steps(&steps[..1], at(30_000)),
            "worker 3 to be provisioned, for the last 30.0 s"
        );
        assert_eq!(
            describe_steps(&steps, at(30_000)),
            "a pooled connection of worker 3, for the last 0.2 s (before it, worker 3 to be \
             provisioned: 0.1 s; the server of worker 3 to be found or started: 29.2 s; \
             worker 3 to be made on pgfx: 0.5 s)"
        );
    }

    /// The release ends the connections of its worker pool's name still open: two
    /// workers of one id in two configurations (or runs) never share it, even with
    /// the longest run and worker ids; the run's prefix stays (sweeps read it).
    #[test]
    fn worker_pools_of_one_id_in_two_configurations_have_names_of_their_own() {
        let run = "pgfixture/0123456789ab";
        let long = WorkerId::parse(&"w".repeat(32)).unwrap();
        let mut names = std::collections::BTreeSet::new();
        for id in [WorkerId::slot(0), WorkerId::slot(1), long] {
            for worker in [format!("pgfx_w_aaaa_{id}"), format!("pgfx_w_bbbb_{id}")] {
                let name = pool_application_name(run, &worker, &id);
                assert!(name.len() <= provision::MAX_IDENT, "{name}");
                assert!(name.starts_with(&format!("{run}/pool-")), "{name}");
                assert!(names.insert(name.clone()), "{name} twice");
                // The connections a driver keeps: a name of their own, which a
                // release ends only when asked, and a sweep still counts as the run's.
                let kept = kept_application_name(&name);
                assert!(kept.len() <= provision::MAX_IDENT, "{kept}");
                assert!(kept.starts_with(&format!("{run}/kept-")), "{kept}");
                assert!(names.insert(kept.clone()), "{kept} twice");
                // The worker's own pool: ended by name when a client of it is still
                // held at a release.
                let own = own_application_name(run, &worker, &id);
                assert!(own.len() <= provision::MAX_IDENT, "{own}");
                assert!(own.starts_with(&format!("{run}/worker-")), "{own}");
                assert!(names.insert(own.clone()), "{own} twice");
                // Those code under test opens from a test handle's settings: ended
                // by name at the handle's release, if its settings went out.
                let handed = handed_application_name(run, &worker, &id);
                assert!(handed.len() <= provision::MAX_IDENT, "{handed}");
                assert!(handed.starts_with(&format!("{run}/test-")), "{handed}");
                assert!(names.insert(handed.clone()), "{handed} twice");
            }
        }
    }

    #[test]
    fn a_recorded_hash_is_taken_and_the_files_are_read_only_when_needed() {
        let dir = std::env::temp_dir().join(format!("pgfixture-recorded-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.sql"), "CREATE TABLE a ();").unwrap();
        // Files are recorded only once they are older than their timestamps' tick.
        std::thread::sleep(crate::fingerprint::SETTLED + Duration::from_millis(200));
        // Configurations that differ where the fixtures do not: each is built anew.
        let build = |seconds: u64| {
            let config = Config {
                fixtures: Some(dir.clone()),
                acquire_timeout: Duration::from_secs(seconds),
                ..Config::default()
            };
            Fixture::builder().config(config).build().unwrap().inner
        };
        let first = build(101);
        assert!(first.content.get().is_some(), "nothing was recorded: read");
        let second = build(102);
        assert!(second.content.get().is_none(), "recorded: not read");
        assert_eq!(second.fixtures_hash, first.fixtures_hash);
        let (read, _) = second.content().unwrap();
        assert_eq!(read.hash(64), first.fixtures_hash);
        assert_eq!(read.files.len(), 1);

        let third = build(103);
        assert!(third.content.get().is_none());
        std::fs::write(dir.join("a.sql"), "CREATE TABLE b ();").unwrap();
        // It must not build from files whose hash is not the one its names carry.
        let error = third.content().unwrap_err().to_string();
        assert!(error.contains("changed while the tests ran"), "{error}");
        // A changed file is another fingerprint: read, another hash.
        let fourth = build(104);
        assert!(fourth.content.get().is_some());
        assert_ne!(fourth.fixtures_hash, first.fixtures_hash);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A process puts a static migrator at an address of its own (the binary is
    /// loaded at a random address): two migrators of the same migrations stand for two
    /// processes, which must name the same workers and containers.
    #[cfg(feature = "sqlx")]
    #[test]
    fn a_migrator_names_the_same_workers_in_every_process() {
        use ::sqlx::migrate::{Migration, MigrationType, Migrator};
        use ::sqlx::{AssertSqlSafe, SqlSafeStr};
        let migrator = || -> &'static Migrator {
            let one = Migration::new(
                1,
                "one".into(),
                MigrationType::Simple,
                AssertSqlSafe("CREATE TABLE one ();").into_sql_str(),
                false,
            );
            Box::leak(Box::new(Migrator::with_migrations(vec![one])))
        };
        let build = |m| {
            let config = Config {
                acquire_timeout: Duration::from_secs(105),
                ..Config::default()
            };
            let builder = Fixture::builder().config(config).sqlx_migrator(m);
            builder.build().unwrap().inner
        };
        let (a, b) = (build(migrator()), build(migrator()));
        assert!(!Arc::ptr_eq(&a, &b), "two migrators are two configurations");
        let id = WorkerId::parse("3").unwrap();
        assert_eq!(a.instance, b.instance);
        assert_eq!(a.worker_name(&id), b.worker_name(&id));
    }
}
