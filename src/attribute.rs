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
    /// A static sqlx migrator (`sqlx::migrate!()`) of either major, run by its own
    /// ([`Migrations::migrator`]).
    #[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
    Migrator(crate::config::MigratorRef),
}

#[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
impl Migrations {
    /// `migrator = "MIGRATOR"`: the test crate's static migrator, of sqlx 0.9 or (feature
    /// `sqlx-0_8`) of sqlx 0.8.
    pub fn migrator(migrator: &'static impl crate::SqlxMigrator) -> Self {
        Migrations::Migrator(migrator.__migrator())
    }
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
            #[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
            Migrations::Migrator(migrator) => builder.migrator(migrator),
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

/// The handles of sqlx 0.9, pgfixture's own sqlx: its driver's, and `#[sqlx::test]`'s
/// types.
#[cfg(feature = "sqlx")]
mod sqlx_handles {
    use std::sync::Arc;

    use ::sqlx::pool::PoolConnection;
    use ::sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgTransactionManager};
    use ::sqlx::{Connection, PgConnection, PgPool, Postgres};
    use sqlx_core::transaction::TransactionManager;

    use super::{TestArgs, TestHandle};
    use crate::driver::sqlx::kept::raw_execute;
    use crate::driver::sqlx::{TestDb, WorkerPool, own_connect_options};
    use crate::{Error, Fixture, Result};

    fn sqlx_error(context: &str) -> impl FnOnce(::sqlx::Error) -> Error {
        Error::sqlx(context)
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
            Ok((kept_pool(fixture, args).await?, ()))
        }
    }

    include!("attribute_sqlx.rs");
}

/// `#[sqlx::test]`'s types of sqlx 0.8 (feature `sqlx-0_8`), the test crate's own
/// (cargo builds one sqlx 0.8 for pgfixture and the crate): the same handles as sqlx
/// 0.9's, over sqlx 0.8's types and the driver's worker pool of sqlx 0.8.
#[cfg(feature = "sqlx-0_8")]
mod sqlx_0_8_handles {
    use std::sync::Arc;

    use ::sqlx08::pool::PoolConnection;
    use ::sqlx08::postgres::{PgConnectOptions, PgPoolOptions, PgTransactionManager};
    use ::sqlx08::{Connection, PgConnection, PgPool, Postgres, TransactionManager};

    use super::{TestArgs, TestHandle};
    use crate::driver::sqlx_0_8::{WorkerPool, own_connect_options, raw_execute};
    use crate::{Error, Fixture, Result};

    fn sqlx_error(context: &str) -> impl FnOnce(::sqlx08::Error) -> Error {
        Error::sqlx_0_8(context)
    }

    include!("attribute_sqlx.rs");
}
