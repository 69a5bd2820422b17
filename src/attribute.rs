//! What `#[pgfixture::test]` expands to calls: the runtime, the handle chosen by the
//! parameter's type ([`TestHandle`]), the test's fixtures and migrations. Not a public
//! API: the attribute is.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;

use crate::{Error, Fixture, Result};

/// What the attribute knows about a test.
#[derive(Debug)]
pub struct TestArgs {
    /// The test's full path (`module::name`), for reports.
    pub name: &'static str,
    /// The test's source file (`file!()`), whose `fixtures/` the fixtures come from.
    pub file: &'static str,
    /// The crate's directory when the test was compiled.
    pub manifest_dir: &'static str,
    /// `fixtures(...)`, applied inside the test's transaction.
    pub fixtures: &'static [TestFixture],
    /// Where the migrations come from.
    pub migrations: Migrations,
    /// `setup = "..."` with its `setup_version`: what it does to the fixture's builder.
    pub setup: Option<fn(crate::FixtureBuilder) -> crate::FixtureBuilder>,
}

/// A fixture file of one test, read at compile time.
#[derive(Debug)]
pub struct TestFixture {
    /// As written, relative to the test's source file.
    pub path: &'static str,
    /// Its text.
    pub sql: &'static str,
}

/// `migrations = ...` / `migrator = ...`.
#[derive(Debug)]
pub enum Migrations {
    /// `PGFIXTURE_MIGRATIONS`, else `<crate>/migrations` when it exists.
    Inferred,
    /// A folder, relative to the crate's directory.
    Path(&'static str),
    /// `migrations = false`.
    Disabled,
    /// A static sqlx migrator (`sqlx::migrate!()`).
    #[cfg(feature = "sqlx")]
    Migrator(&'static ::sqlx::migrate::Migrator),
    /// A static migrator of the test crate's own sqlx, whichever its major (feature
    /// `sqlx-0_8`): sqlx 0.9's is taken as it is, another's is read through `parts`,
    /// code the attribute writes, which names the migrator's fields.
    #[cfg(feature = "sqlx")]
    OwnMigrator {
        /// The migrator itself.
        migrator: &'static (dyn std::any::Any + Send + Sync),
        /// Hands each of its migrations to the function it is given.
        parts: EachMigration,
        /// Its `ignore_missing`, `locking` and `no_tx`.
        flags: [bool; 3],
    },
}

/// Code the attribute writes that hands each migration of a migrator of the test
/// crate's own sqlx to the function it is given.
#[cfg(feature = "sqlx")]
pub type EachMigration = fn(&mut dyn FnMut(MigrationParts<'_>));

/// One migration of a migrator of the test crate's own sqlx ([`Migrations::OwnMigrator`]).
#[cfg(feature = "sqlx")]
#[derive(Debug)]
pub struct MigrationParts<'a> {
    /// Its version.
    pub version: i64,
    /// Its description.
    pub description: &'a str,
    /// Whether it is one of a reversible pair.
    pub reversible: bool,
    /// Whether it is the down migration of its pair.
    pub down: bool,
    /// Its SQL.
    pub sql: &'a str,
    /// Its checksum, as that sqlx computed it.
    pub checksum: &'a [u8],
    /// Whether it runs outside a transaction.
    pub no_tx: bool,
}

/// `migrator`, a static migrator of the test crate's own sqlx, as sqlx 0.9's: itself
/// when it is one, else a copy of its migrations, made once per migrator.
#[cfg(feature = "sqlx")]
fn own_migrator(
    migrator: &'static (dyn std::any::Any + Send + Sync),
    parts: EachMigration,
    [ignore_missing, locking, no_tx]: [bool; 3],
) -> &'static ::sqlx::migrate::Migrator {
    use ::sqlx::SqlSafeStr;
    use ::sqlx::migrate::{Migration, MigrationType, Migrator};
    use std::sync::Mutex;
    if let Some(migrator) = migrator.downcast_ref::<Migrator>() {
        return migrator;
    }
    // By the static's address: the same migrator for every test that names it.
    static MADE: Mutex<Vec<(usize, &'static Migrator)>> = Mutex::new(Vec::new());
    let address = migrator as *const (dyn std::any::Any + Send + Sync) as *const () as usize;
    let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, m)) = made.iter().find(|(a, _)| *a == address) {
        return m;
    }
    let mut migrations = Vec::new();
    parts(&mut |part| {
        let kind = match (part.reversible, part.down) {
            (false, _) => MigrationType::Simple,
            (true, false) => MigrationType::ReversibleUp,
            (true, true) => MigrationType::ReversibleDown,
        };
        // Built whole, not with `Migration::new`, which would hash the SQL again: the
        // checksum is that sqlx's own, which its `_sqlx_migrations` holds.
        migrations.push(Migration {
            version: part.version,
            description: part.description.to_owned().into(),
            migration_type: kind,
            sql: ::sqlx::AssertSqlSafe(part.sql.to_owned()).into_sql_str(),
            checksum: part.checksum.to_vec().into(),
            no_tx: part.no_tx,
        });
    });
    let mut m = Migrator::with_migrations(migrations);
    m.set_ignore_missing(ignore_missing);
    m.set_locking(locking);
    m.no_tx = no_tx;
    let m: &'static Migrator = Box::leak(Box::new(m));
    made.push((address, m));
    m
}

impl TestArgs {
    /// The fixture the environment describes, with this test's migrations, and the
    /// crate's directory for what the environment does not say.
    pub fn fixture(&self) -> Result<Fixture> {
        let builder = Fixture::builder().manifest_dir(self.manifest_dir);
        let builder = match self.migrations {
            Migrations::Inferred => builder,
            Migrations::Path(path) => builder.migrations(Path::new(self.manifest_dir).join(path)),
            Migrations::Disabled => builder.no_migrations(),
            #[cfg(feature = "sqlx")]
            Migrations::Migrator(migrator) => builder.sqlx_migrator(migrator),
            #[cfg(feature = "sqlx")]
            Migrations::OwnMigrator {
                migrator,
                parts,
                flags,
            } => builder.sqlx_migrator(own_migrator(migrator, parts, flags)),
        };
        let builder = match self.setup {
            Some(setup) => setup(builder),
            None => builder,
        };
        builder.build()
    }

    /// The fixture's file as the error of a test names it.
    fn fixture_path(&self, fixture: &TestFixture) -> std::path::PathBuf {
        let dir = Path::new(self.file).parent().unwrap_or(Path::new(""));
        dir.join(fixture.path)
    }

    /// Applies the test's fixtures on `client`; an error names the file, line and
    /// statement.
    async fn apply_files(&self, client: &tokio_postgres::Client) -> Result<()> {
        for fixture in self.fixtures {
            crate::fixtures::apply_file(client, &self.fixture_path(fixture), fixture.sql).await?;
        }
        Ok(())
    }
}

/// A type a `#[pgfixture::test]` can take as its one parameter (or, as a pair, its two:
/// `#[sqlx::test]`'s pool and connect options).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a handle #[pgfixture::test] can give",
    label = "the test's one parameter is its handle",
    note = "take pgfixture::TestDb or pgfixture::WorkerPool; with the `sqlx` feature also pgfixture::sqlx::TestDb, pgfixture::sqlx::WorkerPool, sqlx::PgPool, sqlx::pool::PoolConnection<sqlx::Postgres> or sqlx::PgConnection, or as #[sqlx::test]'s two parameters sqlx::postgres::PgPoolOptions and sqlx::postgres::PgConnectOptions (sqlx 0.9's types: for a crate's own sqlx 0.8, turn on pgfixture's `sqlx-0_8` feature instead)"
)]
pub trait TestHandle: Sized {
    /// What the attribute keeps while the test runs, and releases after it.
    type Guard: Send;

    /// The handle, with the test's fixtures applied through it.
    fn acquire(
        fixture: &Fixture,
        args: &TestArgs,
    ) -> impl Future<Output = Result<(Self, Self::Guard)>>;

    /// Releases what the test held, once it is over; by default the guard drops.
    fn release(guard: Self::Guard) -> impl Future<Output = Result<()>> {
        async move {
            drop(guard);
            Ok(())
        }
    }
}

/// A handle a plain (not `async`) test can take: none yet (the sync drivers come with
/// diesel).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is an async handle: make the test an `async fn`",
    label = "needs an `async fn` test"
)]
pub trait SyncTestHandle: Sized {
    /// The handle.
    fn acquire(fixture: &Fixture, args: &TestArgs) -> Result<Self>;
}

/// Fails to compile, with [`TestHandle`]'s message, unless `H` is a handle.
pub fn assert_handle<H: TestHandle>() {}

/// Fails to compile, with [`SyncTestHandle`]'s message, unless `H` is a handle of a
/// plain test.
pub fn assert_sync_handle<H: SyncTestHandle>() {}

/// The test's runtime, as `#[tokio::test]` builds it.
pub fn runtime(multi_thread: bool, worker_threads: Option<usize>) -> tokio::runtime::Runtime {
    runtime_with(multi_thread, worker_threads, |_| {})
}

/// The test's runtime, its builder given to `configure` first: `start_paused`, which
/// exists with tokio's `test-util` feature only. The attribute's code names it, in the
/// test's crate, so that pgfixture does not turn that feature on for everyone.
pub fn runtime_with(
    multi_thread: bool,
    worker_threads: Option<usize>,
    configure: fn(&mut tokio::runtime::Builder),
) -> tokio::runtime::Runtime {
    let mut builder = if multi_thread {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = worker_threads {
            b.worker_threads(n);
        }
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    configure(builder.enable_all());
    builder
        .build()
        .expect("pgfixture: cannot build the test's runtime")
}

/// A test's body, given its handle: the test's future, boxed and type-erased, so that
/// [`run`] and the runtime's `block_on` are compiled once per handle and output type
/// rather than once per test (`#[tokio::test]` erases its body's type for the same
/// reason). One allocation per test.
pub type Body<H, T> = fn(H) -> Pin<Box<dyn Future<Output = T>>>;

/// Runs a test without a handle; its future is pinned and type-erased by the
/// attribute, as [`Body`] is.
pub fn run_plain<T>(
    _args: TestArgs,
    runtime: tokio::runtime::Runtime,
    test: Pin<&mut dyn Future<Output = T>>,
) -> T {
    crate::runtime::in_test_scope(runtime, |runtime| runtime.block_on(test))
}

/// Runs a test with its handle `H`. Nothing here is compiled per test: taking and
/// releasing the handle once per handle type, the test's future through [`Body`].
pub fn run<H: TestHandle, T>(
    args: TestArgs,
    runtime: tokio::runtime::Runtime,
    test: Body<H, T>,
) -> T {
    // Under nextest, the test's connections may live on its own runtime: the test
    // scope ends what its handles leave, before the runtime goes.
    crate::runtime::in_test_scope(runtime, |runtime| {
        let (handle, guard) = acquire::<H>(runtime, &args);
        let output = runtime.block_on(test(handle));
        release::<H>(runtime, guard, &args);
        output
    })
}

/// The test's handle, or a panic that names the test and the cause.
fn acquire<H: TestHandle>(runtime: &tokio::runtime::Runtime, args: &TestArgs) -> (H, H::Guard) {
    let fixture = args.fixture().unwrap_or_else(|e| panic!("pgfixture: {e}"));
    runtime
        .block_on(H::acquire(&fixture, args))
        .unwrap_or_else(|e| panic!("pgfixture: {} could not get its handle: {e}", args.name))
}

/// Releases what the test held; a failure is a panic that names the test.
fn release<H: TestHandle>(runtime: &tokio::runtime::Runtime, guard: H::Guard, args: &TestArgs) {
    release_with(runtime, H::release(guard), args);
}

/// Runs a release; a failure is a panic that names the test.
fn release_with(
    runtime: &tokio::runtime::Runtime,
    release: impl Future<Output = Result<()>>,
    args: &TestArgs,
) {
    if let Err(e) = runtime.block_on(release) {
        panic!(
            "pgfixture: releasing the handle of {} failed: {e}",
            args.name
        );
    }
}

/// The worker's settings, for a handle the test crate's own sqlx builds (feature
/// `sqlx-0_8`: `#[sqlx::test]`'s types of a sqlx whose major is not pgfixture's).
#[derive(Debug)]
pub struct OwnSqlx {
    url: String,
    max_connections: u32,
    acquire_timeout: std::time::Duration,
}

impl OwnSqlx {
    /// The worker's URL, with the `application_name` of its worker pool, by which the
    /// release finds the test's connections; through the server's Unix socket when it
    /// has one, as pgfixture's own connections (no TCP, no password exchange).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The most connections the test's pool may open: 5, as `#[sqlx::test]`'s, fewer
    /// when the worker's pool (which fits the server's `max_connections`) is smaller.
    pub fn max_connections(&self) -> u32 {
        self.max_connections
    }

    /// The fixture's acquire timeout.
    pub fn acquire_timeout(&self) -> std::time::Duration {
        self.acquire_timeout
    }
}

/// What closes a handle of the test's own sqlx once the test is over (its pool).
pub type Closer = Pin<Box<dyn Future<Output = ()>>>;

/// A handle the test's own sqlx built, and what closes it; the error as text.
pub type OwnSqlxMade<H> =
    Pin<Box<dyn Future<Output = std::result::Result<(H, Option<Closer>), String>>>>;

/// What builds a handle with the test's own sqlx: code the attribute writes, which
/// names the crate's `::sqlx`.
pub type MakeOwnSqlx<H> = fn(OwnSqlx) -> OwnSqlxMade<H>;

/// What closes `pool` once the test is over: `close` names the pool's method (the
/// attribute writes it, naming the crate's own sqlx). The future is the same for every
/// test of a type, compiled once.
pub fn closing<P: 'static>(
    pool: P,
    close: for<'a> fn(&'a P) -> Pin<Box<dyn Future<Output = ()> + 'a>>,
) -> Option<Closer> {
    Some(Box::pin(async move { close(&pool).await }))
}

/// `built`, a value of the crate's own sqlx, as the test's handle type `H`: the same
/// type when the attribute's code for it runs at all ([`PickOwnSqlx`]); otherwise an
/// error that names both.
pub fn own_sqlx_cast<A: 'static, H: 'static>(built: A) -> std::result::Result<H, String> {
    let built: Box<dyn std::any::Any> = Box::new(built);
    built.downcast::<H>().map(|handle| *handle).map_err(|_| {
        format!(
            "the test takes {}, and its crate's sqlx gives {}",
            std::any::type_name::<H>(),
            std::any::type_name::<A>()
        )
    })
}

/// A handle the test's own sqlx built without waiting, as [`OwnSqlxMade`].
pub fn own_sqlx_ready<A: 'static, H: 'static>(built: A, closer: Option<Closer>) -> OwnSqlxMade<H> {
    Box::pin(std::future::ready(
        own_sqlx_cast(built).map(|handle| (handle, closer)),
    ))
}

/// The test's own sqlx could not build its handle: `error` as [`OwnSqlxMade`].
pub fn own_sqlx_failed<H: 'static>(error: &dyn std::fmt::Display) -> OwnSqlxMade<H> {
    Box::pin(std::future::ready(Err(error.to_string())))
}

/// Picks how a test's handle is made, when its type may be pgfixture's handle or one
/// of `#[sqlx::test]`'s types of the test crate's own sqlx: [`PickHandle`] when `H` is
/// a [`TestHandle`], else [`PickOwnSqlx`] (method resolution tries `Pick<H>` before
/// `&Pick<H>`).
#[derive(Debug)]
pub struct Pick<H>(std::marker::PhantomData<fn() -> H>);

impl<H> Pick<H> {
    /// The picker for `H`.
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Pick(std::marker::PhantomData)
    }
}

/// `H` is pgfixture's handle: [`run`].
pub trait PickHandle<H, T> {
    /// Runs the test.
    fn run(
        &self,
        args: TestArgs,
        runtime: tokio::runtime::Runtime,
        make: MakeOwnSqlx<H>,
        test: Body<H, T>,
    ) -> T;
}

impl<H: TestHandle, T> PickHandle<H, T> for Pick<H> {
    fn run(
        &self,
        args: TestArgs,
        runtime: tokio::runtime::Runtime,
        _: MakeOwnSqlx<H>,
        test: Body<H, T>,
    ) -> T {
        run(args, runtime, test)
    }
}

/// `H` is a type of the test's own sqlx: [`run_own_sqlx`].
pub trait PickOwnSqlx<H, T> {
    /// Runs the test.
    fn run(
        &self,
        args: TestArgs,
        runtime: tokio::runtime::Runtime,
        make: MakeOwnSqlx<H>,
        test: Body<H, T>,
    ) -> T;
}

impl<H, T> PickOwnSqlx<H, T> for &Pick<H> {
    fn run(
        &self,
        args: TestArgs,
        runtime: tokio::runtime::Runtime,
        make: MakeOwnSqlx<H>,
        test: Body<H, T>,
    ) -> T {
        run_own_sqlx(args, runtime, make, test)
    }
}

/// Runs a test whose handle the test crate's own sqlx builds with `make`, on the
/// worker's pool ([`crate::WorkerPool`], commits allowed): the fixtures are applied
/// through it, the handle's pool is closed after the test, and the release puts back
/// what the test changed, as for `#[sqlx::test]`'s types of pgfixture's sqlx.
pub fn run_own_sqlx<H, T>(
    args: TestArgs,
    runtime: tokio::runtime::Runtime,
    make: MakeOwnSqlx<H>,
    test: Body<H, T>,
) -> T {
    crate::runtime::in_test_scope(runtime, |runtime| {
        let (pool, ()) = acquire::<crate::WorkerPool>(runtime, &args);
        let own = OwnSqlx {
            url: pool.settings.own_url.as_str().to_owned(),
            max_connections: crate::driver::sqlx_pool_size(&pool.state),
            acquire_timeout: pool.owner.config().acquire_timeout,
        };
        // Made inside the runtime: sqlx's pools need its context even to be built.
        let (handle, closing) = runtime
            .block_on(async move { make(own).await })
            .unwrap_or_else(|e| {
                panic!(
                    "pgfixture: {} could not get its handle: its own sqlx failed on worker {}: {e}",
                    args.name,
                    pool.worker_id()
                )
            });
        let output = runtime.block_on(test(handle));
        if let Some(closing) = closing {
            runtime.block_on(closing);
        }
        release_with(runtime, pool.release(), &args);
        output
    })
}

/// Runs a plain test with its handle `H`.
pub fn run_sync<H: SyncTestHandle, T>(args: TestArgs, test: fn(H) -> T) -> T {
    let fixture = args.fixture().unwrap_or_else(|e| panic!("pgfixture: {e}"));
    let handle = H::acquire(&fixture, &args)
        .unwrap_or_else(|e| panic!("pgfixture: {} could not get its handle: {e}", args.name));
    test(handle)
}

#[diagnostic::do_not_recommend]
impl TestHandle for crate::TestDb {
    type Guard = ();

    async fn acquire(fixture: &Fixture, args: &TestArgs) -> Result<(Self, ())> {
        let db = fixture.worker_db_named(Some(args.name.to_owned())).await?;
        args.apply_files(db.client()).await?;
        Ok((db, ()))
    }
}

#[diagnostic::do_not_recommend]
impl TestHandle for crate::WorkerPool {
    type Guard = ();

    async fn acquire(fixture: &Fixture, args: &TestArgs) -> Result<(Self, ())> {
        let pool = fixture.worker_pool().await?;
        if !args.fixtures.is_empty() {
            let client = pool.get().await.map_err(|source| Error::Pool {
                worker: pool.worker_id().to_string(),
                source,
            })?;
            args.apply_files(&client).await?;
        }
        Ok((pool, ()))
    }
}

#[cfg(feature = "sqlx")]
mod sqlx_handles {
    use std::sync::Arc;

    use ::sqlx::pool::PoolConnection;
    use ::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    use ::sqlx::{Connection, PgConnection, PgPool, Postgres};
    use sqlx_core::transaction::TransactionManager;

    use super::{TestArgs, TestHandle};
    use crate::driver::sqlx::{TestDb, WorkerPool};
    use crate::{Error, Fixture, Result};

    /// Applies the test's fixtures on `conn`; an error names the file.
    async fn apply(args: &TestArgs, conn: &mut PgConnection) -> Result<()> {
        for fixture in args.fixtures {
            if let Err(e) = ::sqlx::raw_sql(fixture.sql).execute(&mut *conn).await {
                return Err(Error::Fixture {
                    path: args.fixture_path(fixture),
                    line: None,
                    statement: None,
                    message: e.to_string(),
                });
            }
        }
        Ok(())
    }

    #[diagnostic::do_not_recommend]
    impl TestHandle for TestDb {
        type Guard = ();

        async fn acquire(fixture: &Fixture, args: &TestArgs) -> Result<(Self, ())> {
            let mut db = TestDb::acquire_named(fixture, Some(args.name.to_owned())).await?;
            apply(args, &mut db).await?;
            Ok((db, ()))
        }
    }

    #[diagnostic::do_not_recommend]
    impl TestHandle for WorkerPool {
        type Guard = ();

        async fn acquire(fixture: &Fixture, args: &TestArgs) -> Result<(Self, ())> {
            let pool = WorkerPool::acquire(fixture).await?;
            if !args.fixtures.is_empty() {
                let mut conn = pool
                    .acquire()
                    .await
                    .map_err(Error::sqlx("taking a connection of the worker pool"))?;
                apply(args, &mut conn).await?;
            }
            Ok((pool, ()))
        }
    }

    /// `#[sqlx::test]`'s `PgPool`: the worker's pool, commits allowed.
    #[diagnostic::do_not_recommend]
    impl TestHandle for PgPool {
        type Guard = WorkerPool;

        async fn acquire(fixture: &Fixture, args: &TestArgs) -> Result<(Self, WorkerPool)> {
            let (guard, ()) = <WorkerPool as TestHandle>::acquire(fixture, args).await?;
            Ok(((*guard).clone(), guard))
        }

        async fn release(guard: WorkerPool) -> Result<()> {
            guard.release().await
        }
    }

    /// `#[sqlx::test]`'s `PgPool` of sqlx 0.8 (feature `sqlx-0_8`), the test crate's
    /// own: the worker's pool of sqlx 0.8, kept from test to test as sqlx 0.9's is,
    /// commits allowed. The fixtures are applied through the worker's pool before the
    /// test, committed, as `#[sqlx::test]` applies them.
    #[cfg(feature = "sqlx-0_8")]
    #[diagnostic::do_not_recommend]
    impl TestHandle for ::sqlx08::PgPool {
        type Guard = crate::driver::sqlx::kept_0_8::WorkerPool;

        async fn acquire(fixture: &Fixture, args: &TestArgs) -> Result<(Self, Self::Guard)> {
            let pool = Self::Guard::acquire(fixture).await?;
            if !args.fixtures.is_empty() {
                let client = pool.core().get().await.map_err(|source| Error::Pool {
                    worker: pool.worker_id().to_string(),
                    source,
                })?;
                args.apply_files(&client).await?;
            }
            Ok(((*pool).clone(), pool))
        }

        async fn release(guard: Self::Guard) -> Result<()> {
            guard.release().await
        }
    }

    /// `#[sqlx::test]`'s two parameters, `(opts: PgPoolOptions, connect:
    /// PgConnectOptions)`: options for pools and connections of the test's own on the
    /// worker, commits allowed. Its guard is the core's worker pool, as for
    /// [`PgConnection`]: the connect options carry its `application_name`, so its
    /// release ends the test's connections still open (their backends terminated),
    /// then puts back the rows they wrote.
    #[diagnostic::do_not_recommend]
    impl TestHandle for (PgPoolOptions, PgConnectOptions) {
        type Guard = crate::WorkerPool;

        async fn acquire(fixture: &Fixture, args: &TestArgs) -> Result<(Self, crate::WorkerPool)> {
            let (pool, ()) = <crate::WorkerPool as TestHandle>::acquire(fixture, args).await?;
            // As `#[sqlx::test]`'s: 5 connections at most, fewer when the worker's
            // pool (which fits the server's `max_connections`) is smaller.
            let options = PgPoolOptions::new()
                .max_connections(crate::driver::sqlx_pool_size(&pool.state))
                .acquire_timeout(fixture.config().acquire_timeout);
            // Through the server's Unix socket when it has one, as pgfixture's own.
            let connect = crate::driver::sqlx::own_connect_options(&pool.settings);
            Ok(((options, connect), pool))
        }

        async fn release(guard: crate::WorkerPool) -> Result<()> {
            guard.release().await
        }
    }

    /// Begins the test's transaction on a connection of the worker pool through
    /// sqlx's transaction manager: the code under test's `begin()` is a savepoint.
    async fn begin(conn: &mut PgConnection, args: &TestArgs) -> Result<()> {
        <::sqlx::postgres::PgTransactionManager as TransactionManager>::begin(conn, None)
            .await
            .map_err(Error::sqlx("starting the test's transaction"))?;
        apply(args, conn).await
    }

    /// `#[sqlx::test]`'s `PoolConnection<Postgres>`: a connection of the worker pool,
    /// inside a transaction that is never committed; the worker is reset after the
    /// test if anything changed.
    #[diagnostic::do_not_recommend]
    impl TestHandle for PoolConnection<Postgres> {
        type Guard = WorkerPool;

        async fn acquire(fixture: &Fixture, args: &TestArgs) -> Result<(Self, WorkerPool)> {
            let pool = WorkerPool::acquire(fixture).await?;
            let mut conn = pool
                .acquire()
                .await
                .map_err(Error::sqlx("taking a connection of the worker pool"))?;
            begin(&mut conn, args).await?;
            Ok((conn, pool))
        }

        async fn release(guard: WorkerPool) -> Result<()> {
            guard.release().await
        }
    }

    /// A `PgConnection` of the test's own, on the worker, inside a transaction that is
    /// never committed; the worker is reset after the test if anything changed. Its
    /// guard is the core's worker pool, which marks and reads the worker: the sqlx
    /// driver's kept pool would open a connection the test never uses.
    #[diagnostic::do_not_recommend]
    impl TestHandle for PgConnection {
        type Guard = crate::WorkerPool;

        async fn acquire(fixture: &Fixture, args: &TestArgs) -> Result<(Self, crate::WorkerPool)> {
            use crate::driver::sqlx::own_connect_options as connect_options;
            // The connection opens here, on the test's runtime, as soon as the worker
            // is checked, while the core marks and reads it; through the server's Unix
            // socket when it has one, as pgfixture's own connections.
            let (checked, settings) = tokio::sync::oneshot::channel();
            let opener: crate::fixture::PoolOpener = Box::new(move |_, settings, _| {
                let _ = checked.send(Arc::clone(settings));
            });
            let connect = async {
                let settings = settings.await.ok()?;
                Some(PgConnection::connect_with(&connect_options(&settings)).await)
            };
            let (pool, conn) =
                futures::future::join(fixture.worker_pool_opening(Some(opener)), connect).await;
            let pool = pool?;
            let conn = match conn {
                Some(conn) => conn,
                None => PgConnection::connect_with(&connect_options(&pool.settings)).await,
            };
            let mut conn = conn.map_err(Error::sqlx("connecting to the worker"))?;
            begin(&mut conn, args).await?;
            Ok((conn, pool))
        }

        async fn release(guard: crate::WorkerPool) -> Result<()> {
            guard.release().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::own_sqlx_cast;

    #[test]
    fn a_value_of_the_crates_own_sqlx_is_handed_over_only_as_its_own_type() {
        assert_eq!(own_sqlx_cast::<u32, u32>(7), Ok(7));
        let error = own_sqlx_cast::<u32, String>(7).unwrap_err();
        assert!(error.contains("String") && error.contains("u32"), "{error}");
    }

    /// A migrator of another sqlx major is copied, once, with its checksums, kinds and
    /// flags; sqlx 0.9's is taken as it is.
    #[cfg(feature = "sqlx")]
    #[test]
    fn a_migrator_of_the_crates_own_sqlx_is_copied_once() {
        use super::{MigrationParts, own_migrator};
        use ::sqlx::migrate::{MigrationType, Migrator};
        /// Stands for a migrator of another sqlx: (version, reversible, down).
        static OTHER: [(i64, bool, bool); 3] =
            [(1, false, false), (2, true, false), (2, true, true)];
        fn parts(part: &mut dyn FnMut(MigrationParts<'_>)) {
            for (version, reversible, down) in OTHER {
                part(MigrationParts {
                    version,
                    description: "things",
                    reversible,
                    down,
                    sql: "CREATE TABLE things ()",
                    checksum: &[version as u8; 4],
                    no_tx: down,
                });
            }
        }
        let copy = own_migrator(&OTHER, parts, [true, false, true]);
        assert!(std::ptr::eq(
            copy,
            own_migrator(&OTHER, parts, [true, false, true])
        ));
        let read: Vec<_> = copy
            .iter()
            .map(|m| (m.version, m.migration_type, m.checksum.to_vec(), m.no_tx))
            .collect();
        assert_eq!(
            read,
            [
                (1, MigrationType::Simple, vec![1; 4], false),
                (2, MigrationType::ReversibleUp, vec![2; 4], false),
                (2, MigrationType::ReversibleDown, vec![2; 4], true),
            ]
        );
        assert_eq!(
            copy.iter().next().unwrap().sql.as_str(),
            "CREATE TABLE things ()"
        );
        assert!(copy.ignore_missing && !copy.locking && copy.no_tx);
        static OWN: Migrator = Migrator::DEFAULT;
        assert!(std::ptr::eq(own_migrator(&OWN, parts, [false; 3]), &OWN));
    }
}
