//! The sqlx driver: a `PgConnection` inside the test's transaction, begun through
//! sqlx's own transaction manager, and a `PgPool` on the worker for code that commits.

use std::any::Any;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use futures::future::BoxFuture;

use ::sqlx::postgres::{
    PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow, PgSslMode, PgTransactionManager,
};
use ::sqlx::{AssertSqlSafe, Column, Connection, Row, SqlSafeStr};
use sqlx_core::transaction::TransactionManager;

use super::{
    CLEANUP, Checkout, END, END_LAST, MARK_COLUMN, PREPARED_COLUMN, SESSION_CLEANUP,
    one_test_per_process,
};
use crate::fixture::PrimeCheck;
use crate::restore::Change;
use crate::settings::Settings;
use crate::worker::WorkerId;
use crate::{DatabaseUrl, Error, Fixture, Result, runtime};

/// PostgreSQL's code for "current transaction is aborted".
const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
/// PostgreSQL's code for "canceling statement due to user request".
const QUERY_CANCELED: &str = "57014";

/// The calling test's connection, as sqlx's [`PgConnection`], inside a transaction that
/// is rolled back when the handle drops: [`crate::worker_db`] for sqlx.
///
/// # Errors
///
/// As [`crate::worker_db`], and [`Error::Sqlx`] when the connection cannot be opened.
pub async fn worker_db() -> Result<TestDb> {
    TestDb::acquire(crate::default_fixture()?).await
}

/// A sqlx [`PgPool`] on the calling test's worker, for code that commits:
/// [`crate::worker_pool`] for sqlx.
///
/// # Errors
///
/// As [`crate::worker_pool`].
pub async fn worker_pool() -> Result<WorkerPool> {
    WorkerPool::acquire(crate::default_fixture()?).await
}

/// A sqlx connection to the current worker's database, inside a transaction that is
/// rolled back when the handle drops.
///
/// It derefs, mutably too, to sqlx's [`PgConnection`], so `query(...).fetch_one(&mut
/// *db)`, `db.begin()` and code that takes `&mut PgConnection` or an
/// `impl Executor` (`&mut *db`) work as usual. The test's transaction was begun through
/// sqlx's own transaction manager, so a `begin()` of the code under test is a
/// SAVEPOINT, and its `commit()` releases the savepoint: it never commits the test's
/// transaction. A `COMMIT` the code sends itself (`raw_sql("COMMIT")`, or a `BEGIN ...
/// COMMIT` of its own) does; it is found when the test ends, reported once on stderr
/// with the test's name, and the worker is rebuilt before another test gets it.
///
/// The connection is opened on pgfixture's own runtime and kept for the worker's next
/// test, so it outlives the `#[tokio::test]` runtime that used it, of either flavour.
/// Under nextest, whose processes run one test each, a `#[pgfixture::test]` on a
/// `current_thread` runtime opens it on the test's own runtime instead, and ends it
/// there once the test is over.
pub struct TestDb {
    conn: Option<PgConnection>,
    checkout: Option<Checkout>,
    /// Opened in a test scope, on the test's own runtime ([`runtime::in_test_scope`]):
    /// ended there, and not kept for another test.
    scoped: bool,
}

impl fmt::Debug for TestDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDb")
            .field("worker", &self.checkout.as_ref().map(|c| &c.id))
            .finish_non_exhaustive()
    }
}

impl TestDb {
    /// [`worker_db`] on `fixture` instead of the environment's.
    ///
    /// # Errors
    ///
    /// As [`worker_db`].
    pub async fn acquire(fixture: &Fixture) -> Result<TestDb> {
        Self::acquire_named(fixture, None).await
    }

    pub(crate) async fn acquire_named(fixture: &Fixture, test: Option<String>) -> Result<TestDb> {
        // The common case, in the caller's own task: the worker is ready, and a
        // connection an earlier test left waits in its stash.
        if let Some((checkout, mut conn)) = fixture.checkout_now::<PgConnection>(test.clone())
            && send_begin(&mut conn, checkout.begin_sql()).is_ok()
        {
            return Ok(TestDb {
                conn: Some(conn),
                checkout: Some(checkout),
                scoped: false,
            });
        }
        // None, or closed since: the checked way, with a new connection if need be.
        fixture
            .checkout(test, Some(prime), |mut checkout| async move {
                let conn = match open(&checkout).await {
                    Err(e) if crate::fixture::server_gone(&e) => {
                        checkout.refresh(Some(prime)).await?;
                        open(&checkout).await?
                    }
                    other => other?,
                };
                Ok(TestDb {
                    conn: Some(conn),
                    checkout: Some(checkout),
                    scoped: runtime::in_scope(),
                })
            })
            .await
            .map_err(Error::with_connection_advice)
    }

    fn checkout(&self) -> &Checkout {
        self.checkout
            .as_ref()
            .expect("the worker is held until drop")
    }

    /// The worker this handle belongs to.
    pub fn worker_id(&self) -> &WorkerId {
        &self.checkout().id
    }

    /// The worker's connection settings as sqlx's [`PgConnectOptions`], for code under
    /// test that opens connections or pools of its own (LISTEN through
    /// `PgListener::connect_with`, a `PgPool` of its own). Those connections are not
    /// inside the test's transaction. The first call marks and reads the worker (a
    /// millisecond or two); when the handle goes, those connections still open are
    /// ended, and what they committed is put back in place, or the worker rebuilt (see
    /// "Tests that commit" in the README), as for [`TestDb::url`].
    pub fn connect_options(&self) -> PgConnectOptions {
        connect_options(self.checkout().hand_out())
    }

    /// The same settings as a `postgres://` URL; its `Debug` and `Display` hide the
    /// password.
    pub fn url(&self) -> &DatabaseUrl {
        &self.checkout().hand_out().url
    }

    /// The settings through the port the server publishes on 127.0.0.1 (Docker); see
    /// [`crate::TestDb::published_pg_config`].
    pub fn published_url(&self) -> &DatabaseUrl {
        &self.checkout().hand_out().published_url
    }

    /// Rolls the test's transaction back and keeps the connection for the worker's next
    /// test, reporting an error the reset of the worker met (a dropped handle cannot).
    /// A test that committed is handled as on drop (reported, worker reset), not as an
    /// error; so is a connection that died (the test ended its backend, or the server
    /// did): whether the test committed is unknown then, and the worker is rebuilt.
    ///
    /// # Errors
    ///
    /// The reset's error, after a commit or a connection that died;
    /// [`Error::AcquireTimeout`] when the rollback got no answer in time (the worker is
    /// rebuilt as well).
    pub async fn release(mut self) -> Result<()> {
        let (Some(conn), Some(checkout)) = (self.conn.take(), self.checkout.take()) else {
            return Ok(());
        };
        // The rollback in the caller's own task (the connection's socket works from
        // any runtime); only a reset, after a commit, goes to the background runtime.
        end_here(conn, checkout, !self.scoped).await
    }

    fn finish(&mut self) -> impl Future<Output = Result<()>> + Send + 'static {
        let conn = self.conn.take();
        let checkout = self.checkout.take();
        async move {
            let (Some(conn), Some(checkout)) = (conn, checkout) else {
                return Ok(());
            };
            end_here(conn, checkout, true).await
        }
    }
}

/// Ends a test's transaction in the caller's own task (the connection's socket works
/// from any runtime); only a reset, after a commit, goes to the background runtime
/// (where a dropped handle's end already runs). The connection is kept for the
/// worker's next test if `keep`.
async fn end_here(conn: PgConnection, mut checkout: Checkout, keep: bool) -> Result<()> {
    // The connections opened with the handle's settings are ended and the worker read
    // before the rollback, so that it does not show.
    let settled = checkout.settle().await;
    let limit = checkout.owner.config().acquire_timeout;
    let ended = runtime::timeout(limit, end_test(conn)).await;
    if matches!(ended, Ok(Ok((_, true)))) {
        runtime::run(after_end(checkout, ended, limit, keep, settled)).await
    } else {
        after_end(checkout, ended, limit, keep, settled).await
    }
}

/// The end of a [`TestDb`] dropped in a test scope, run there once the test is over.
struct ScopedEnd {
    conn: PgConnection,
    checkout: Checkout,
}

impl runtime::Deferred for ScopedEnd {
    fn end(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if let Err(error) = end_here(self.conn, self.checkout, false).await {
                tracing::warn!(%error, "ending a test's transaction failed");
            }
        })
    }

    fn lost(self: Box<Self>) {
        let ScopedEnd { conn, mut checkout } = *self;
        drop(conn);
        runtime::block_on(async move {
            // Those its settings opened go too: a rebuild in schema mode would not end
            // them.
            let _ = checkout.settle().await;
            if let Err(error) = checkout
                .end_unread("its connection closed with the test's runtime")
                .await
            {
                tracing::warn!(%error, "resetting a worker failed");
            }
        });
    }
}

/// How a test's transaction ended ([`end_test`], within a time limit).
type EndResult = Result<Result<(Ended, bool), ::sqlx::Error>, tokio::time::error::Elapsed>;

/// What follows the end of a test's transaction: the connection goes back to the
/// worker's stash, or after a commit the worker is reset (on the background runtime),
/// or a failed end is reported and its connection closed.
async fn after_end(
    checkout: Checkout,
    ended: EndResult,
    limit: std::time::Duration,
    keep: bool,
    settled: Option<Change>,
) -> Result<()> {
    match ended {
        Ok(Ok((conn, committed))) => {
            match conn {
                _ if committed || !keep => {}
                Ended::Cleared(conn) => checkout.keep_idle(conn),
                Ended::Unclean(conn) => checkout.keep_idle(Unclean(conn)),
            }
            checkout.end(committed, settled).await
        }
        // The connection died (the test ended its backend, or the server did): the
        // test's own doing, and no error once the worker is rebuilt.
        Ok(Err(e)) => {
            checkout
                .end_unread(&format!("rolling back failed: {e}"))
                .await
        }
        Err(_) => {
            let worker = checkout.id.clone();
            checkout
                .end_unread(&format!("no answer to the rollback within {limit:?}"))
                .await?;
            Err(Error::AcquireTimeout {
                timeout: limit,
                waiting_for: format!("the rollback of a test transaction on worker {worker}"),
            })
        }
    }
}

impl Deref for TestDb {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn
            .as_ref()
            .expect("the connection is present until drop")
    }
}

impl DerefMut for TestDb {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
            .as_mut()
            .expect("the connection is present until drop")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.scoped
            && let (Some(conn), Some(checkout)) = (self.conn.take(), self.checkout.take())
        {
            // Its socket is the test runtime's, which this thread runs: ended there,
            // once the test is over.
            if let Some(end) = runtime::defer(Box::new(ScopedEnd { conn, checkout })) {
                end.lost();
            }
            return;
        }
        if self.conn.is_some() {
            let finish = self.finish();
            runtime::block_on(async move {
                if let Err(error) = finish.await {
                    tracing::warn!(%error, "ending a test's transaction failed");
                }
            });
        }
    }
}

/// A connection of the worker inside a new test transaction: the one that checked the
/// worker, else one an earlier test left, else a new one.
async fn open(checkout: &Checkout) -> Result<PgConnection> {
    if let Some(Primed(conn)) = checkout.take_idle::<Primed>() {
        return Ok(conn);
    }
    let begin = checkout.begin_sql();
    if let Some(mut idle) = checkout.take_idle::<PgConnection>()
        && send_begin(&mut idle, begin).is_ok()
    {
        return Ok(idle);
    }
    if let Some(Unclean(mut unclean)) = checkout.take_idle::<Unclean>() {
        let cleared = async {
            let rows = ::sqlx::raw_sql(SESSION_CLEANUP)
                .fetch_all(&mut unclean)
                .await?;
            deallocate(&mut unclean, &rows).await
        };
        if cleared.await.is_ok() && send_begin(&mut unclean, begin).is_ok() {
            return Ok(unclean);
        }
    }
    // None, or closed since (a restarted server): a new one.
    let mut fresh = connect(checkout.settings(), &checkout.id).await?;
    begin_test(&mut fresh, begin)
        .await
        .map_err(Error::sqlx(format!(
            "starting the test transaction on worker {}",
            checkout.id
        )))?;
    Ok(fresh)
}

/// Sends the test's `BEGIN` on a connection an earlier test left, without waiting for
/// its answer. sqlx keeps a dropped query's answer and reads it before it sends the
/// next query, so the test's first statement still waits for the `BEGIN`'s answer: one
/// round trip, as sqlx's own `begin()` costs (the tokio-postgres path pipelines the two,
/// sqlx cannot). A `BEGIN` that fails (a connection closed since) fails the test's
/// first statement, and its end discards the connection.
fn send_begin(conn: &mut PgConnection, begin: &str) -> Result<(), ::sqlx::Error> {
    use futures::FutureExt;
    debug_assert!(PgTransactionManager::get_transaction_depth(conn) > 0);
    match ::sqlx::raw_sql(AssertSqlSafe(begin.to_owned()))
        .execute(conn)
        .now_or_never()
    {
        Some(Err(e)) => Err(e),
        // Answered already, or on its way.
        _ => Ok(()),
    }
}

/// A connection that checked a worker another process left ready, and began the first
/// test's transaction (the core's `attach_primed`).
struct Primed(PgConnection);

/// PostgreSQL's code for "database does not exist".
const INVALID_CATALOG_NAME: &str = "3D000";
/// PostgreSQL's code for "unrecognized configuration parameter": the worker's mark is
/// missing, so it is not ready.
const UNDEFINED_OBJECT: &str = "42704";
/// PostgreSQL's code for "invalid input syntax": the worker's check found it not
/// ready ([`crate::fixture::PrimeCheck`]).
const NOT_READY: &str = "22P02";

/// The core's primer for sqlx: one connection, and the test's `BEGIN` with the
/// worker's check in one round trip before the test's first statement, in a nextest
/// process that finds its worker ready. The test's transaction begins through sqlx's
/// transaction manager, as [`begin_test`] does.
fn prime(
    settings: Arc<Settings>,
    check: PrimeCheck,
) -> BoxFuture<'static, Result<Option<Box<dyn Any + Send>>>> {
    Box::pin(async move {
        let mut conn = match connect_within(&settings).await {
            Ok(conn) => conn,
            Err(e) if code(&e) == Some(INVALID_CATALOG_NAME) => return Ok(None),
            Err(e) => return Err(Error::sqlx("connecting to a worker")(e)),
        };
        match begin_test(&mut conn, &check.begin).await {
            Ok(()) => {}
            // Not ready: the check failed, leaving the transaction aborted; the
            // connection goes.
            Err(e) if matches!(code(&e), Some(UNDEFINED_OBJECT | NOT_READY)) => {
                return Ok(None);
            }
            Err(e) => return Err(Error::sqlx("checking a worker")(e)),
        }
        Ok(Some(Box::new(Primed(conn)) as Box<dyn Any + Send>))
    })
}

/// Begins a new connection's first test transaction through sqlx's transaction
/// manager, which from then on counts one transaction open: the code under test's
/// `begin()` is a savepoint. The connection keeps that count between tests (it is
/// never handed to anything but a [`TestDb`]), so later tests begin and end their
/// transactions with one simple query each ([`send_begin`], [`end_test`]), as the
/// tokio-postgres path does.
async fn begin_test(conn: &mut PgConnection, begin: &str) -> Result<(), ::sqlx::Error> {
    debug_assert_eq!(PgTransactionManager::get_transaction_depth(conn), 0);
    let statement = AssertSqlSafe(begin.to_owned()).into_sql_str();
    PgTransactionManager::begin(conn, Some(statement)).await
}

/// Rolls back what the code under test left open (savepoints it leaked), reads the
/// test transaction's mark, rolls back and clears the session, in one round trip.
/// Returns the connection and whether the test had committed its transaction. sqlx
/// still counts one transaction open, for the next test ([`begin_test`]).
async fn end_test(mut conn: PgConnection) -> Result<(Ended, bool), ::sqlx::Error> {
    // In a process that runs one test, and with no savepoint of the code under test
    // left open, the session is cleared only if a test takes the connection again.
    let last = one_test_per_process() && PgTransactionManager::get_transaction_depth(&conn) == 1;
    while PgTransactionManager::get_transaction_depth(&conn) > 1 {
        PgTransactionManager::rollback(&mut conn).await?;
    }
    let (rows, committed, cleared) =
        match uncancelled(&mut conn, if last { END_LAST } else { END }).await {
            Ok(rows) => {
                let open = rows.iter().any(|row| {
                    column(row) == Some(MARK_COLUMN) && text(row).as_deref() == Some("open")
                });
                (rows, !open, !last)
            }
            // A failed statement left the transaction aborted, and so still open; the
            // error skipped the rollback after the check.
            Err(e) if code(&e) == Some(IN_FAILED_SQL_TRANSACTION) => {
                (uncancelled(&mut conn, CLEANUP).await?, false, true)
            }
            Err(e) => return Err(e),
        };
    deallocate(&mut conn, &rows).await?;
    let conn = if cleared {
        Ended::Cleared(conn)
    } else {
        Ended::Unclean(conn)
    };
    Ok((conn, committed))
}

/// Runs `sql` (the end of a test's transaction), once more if it was cancelled: a
/// cancel request is asynchronous, and one sent for the test's last query can arrive
/// once that query is over, and cancel this one instead.
async fn uncancelled(
    conn: &mut PgConnection,
    sql: &'static str,
) -> Result<Vec<PgRow>, ::sqlx::Error> {
    match ::sqlx::raw_sql(sql).fetch_all(&mut *conn).await {
        Err(e) if code(&e) == Some(QUERY_CANCELED) => ::sqlx::raw_sql(sql).fetch_all(conn).await,
        other => other,
    }
}

/// A connection whose test transaction has ended.
enum Ended {
    /// Its session cleared: ready for the next test.
    Cleared(PgConnection),
    /// Ended with [`END_LAST`]: cleared when a test takes it again ([`Unclean`]).
    Unclean(PgConnection),
}

/// A connection kept with its session as its test left it ([`END_LAST`]).
struct Unclean(PgConnection);

/// Deallocates the statements a test prepared with SQL `PREPARE`, which the cleanup's
/// `rows` list: another test's `PREPARE` of the same name would fail.
async fn deallocate(conn: &mut PgConnection, rows: &[PgRow]) -> Result<(), ::sqlx::Error> {
    let deallocate = super::deallocate_sql(
        rows.iter()
            .filter(|row| column(row) == Some(PREPARED_COLUMN))
            .filter_map(|row| row.try_get::<&str, _>(0).ok()),
    );
    if !deallocate.is_empty() {
        ::sqlx::raw_sql(AssertSqlSafe(deallocate))
            .execute(conn)
            .await?;
    }
    Ok(())
}

fn column(row: &PgRow) -> Option<&str> {
    row.columns().first().map(|c| c.name())
}

fn text(row: &PgRow) -> Option<String> {
    row.try_get::<Option<String>, _>(0).ok().flatten()
}

fn code(error: &::sqlx::Error) -> Option<&str> {
    match error {
        ::sqlx::Error::Database(e) => e
            .try_downcast_ref::<::sqlx::postgres::PgDatabaseError>()
            .map(|e| e.code()),
        _ => None,
    }
}

/// sqlx's options for the worker `settings` describe, as code under test gets them.
pub(crate) fn connect_options(settings: &Settings) -> PgConnectOptions {
    options_for(&settings.pg_config, settings)
}

/// sqlx's options for pgfixture's own connections to the worker (its Unix socket, when
/// the server has one).
pub(crate) fn own_connect_options(settings: &Settings) -> PgConnectOptions {
    options_for(&settings.own_pg_config, settings)
}

fn options_for(config: &tokio_postgres::Config, settings: &Settings) -> PgConnectOptions {
    use tokio_postgres::config::Host;
    let mut options = PgConnectOptions::new_without_pgpass()
        // pgfixture's servers are local and speak no TLS; so is its tokio-postgres path.
        .ssl_mode(PgSslMode::Disable)
        .port(config.get_ports().first().copied().unwrap_or(5432));
    options = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => options.host(host),
        Some(Host::Unix(dir)) => options.socket(dir),
        None => options,
    };
    if let Some(user) = config.get_user() {
        options = options.username(user);
    }
    if let Some(password) = config.get_password() {
        options = options.password(&String::from_utf8_lossy(password));
    }
    if let Some(dbname) = config.get_dbname() {
        options = options.database(dbname);
    }
    if let Some(name) = config.get_application_name() {
        options = options.application_name(name);
    }
    if let Some(search_path) = &settings.search_path {
        options = options.options([("search_path", search_path.as_str())]);
    }
    options
}

/// A new connection to the worker, opened on the calling runtime (the background one).
async fn connect(settings: &Settings, worker: &WorkerId) -> Result<PgConnection> {
    connect_within(settings)
        .await
        .map_err(Error::sqlx(format!("connecting to worker {worker}")))
}

/// sqlx's connect, within the connect timeout of the worker's settings (sqlx has none
/// of its own): the address of a server that is gone can stay silent. A timeout is an
/// I/O error, which counts as the server being gone.
async fn connect_within(settings: &Settings) -> Result<PgConnection, ::sqlx::Error> {
    let limit = settings
        .pg_config
        .get_connect_timeout()
        .copied()
        .unwrap_or(std::time::Duration::from_secs(5));
    match runtime::timeout(
        limit,
        PgConnection::connect_with(&own_connect_options(settings)),
    )
    .await
    {
        Ok(connected) => connected,
        Err(_) => Err(::sqlx::Error::Io(std::io::ErrorKind::TimedOut.into())),
    }
}

/// A sqlx [`PgPool`] on the current worker's database (or schema), for code under
/// test that commits for real; it derefs to the pool. Nothing here is rolled back: as
/// for [`crate::WorkerPool`], when the guard goes (on [`WorkerPool::release`], or on
/// drop) pgfixture reads, before any other test gets the worker, whether anything was
/// changed; if so, the rows are put back or the worker is reset.
///
/// The pool is the worker's own, kept from test to test as the tokio-postgres worker
/// pool is: its connections are opened on pgfixture's runtime, so they outlive the
/// `#[tokio::test]` runtime that used them, and stay open and warm for the worker's
/// next test. At release, every connection's session is cleared (what a rollback
/// leaves: open transactions, advisory locks, `SET`s, `LISTEN`s, temporary tables,
/// statements prepared with SQL `PREPARE`); sqlx's own statement cache stays. A
/// connection the test made the pool open beyond the two it keeps (many at once) is
/// opened on the test's runtime and closed at release. A connection still out when
/// the test ends is waited for briefly (20 ms), on a release or on a drop in a
/// multi-thread runtime. One still out then (a task of the test's holds it), or on its
/// way back to a guard dropped on a current-thread runtime, whose one thread the drop
/// blocks, is not waited for: the pool is closed and its connections ended, their
/// backends terminated, before the worker is read. Prefer [`WorkerPool::release`] in a
/// current-thread test. Copies of the pool that a test keeps past its end still reach
/// the worker: do not.
pub struct WorkerPool {
    pool: Option<KeptPool>,
    core: Option<crate::WorkerPool>,
}

/// The worker's own sqlx pool, in the worker's stash between tests.
#[derive(Clone)]
struct KeptPool {
    pool: PgPool,
    /// Whether the pool opened a connection on a test's runtime since it was last
    /// cleared ([`FOREIGN`]).
    foreign: Arc<std::sync::atomic::AtomicBool>,
}

/// The connections a kept pool holds open between tests.
const KEPT: u32 = crate::fixture::IDLE_PER_WORKER as u32;

/// The setting that marks a kept pool's connection opened on a test's runtime, whose
/// socket dies with that runtime: it is closed at release.
const FOREIGN: &str = "pgfixture.foreign_runtime";
/// The column of [`KEPT_CLEANUP`] that reads [`FOREIGN`].
const FOREIGN_COLUMN: &str = "pgfixture_foreign";

/// What clears a kept pool's connection after a test: it reads [`FOREIGN`] and clears
/// the session as the worker's own pool does (its statistics reach the server).
fn kept_cleanup(flushes: bool) -> String {
    format!(
        "SELECT current_setting('{FOREIGN}', true) AS {FOREIGN_COLUMN}; {}",
        crate::provision::pool_cleanup(flushes)
    )
}

impl fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerPool")
            .field("worker", &self.core.as_ref().map(|c| c.worker_id()))
            .finish_non_exhaustive()
    }
}

impl WorkerPool {
    /// [`worker_pool`] on `fixture` instead of the environment's.
    ///
    /// # Errors
    ///
    /// As [`worker_pool`].
    pub async fn acquire(fixture: &Fixture) -> Result<WorkerPool> {
        let core = fixture
            .worker_pool_opening(Some(Box::new(open_kept)))
            .await?;
        let kept = match core.state.take_idle::<Opening>() {
            Some(Opening { kept, opened }) => {
                let _ = opened.await;
                kept
            }
            None => match core.state.take_idle::<KeptPool>() {
                // Back from the last test's clearing, as a rule, by now.
                Some(kept) if !kept.pool.is_closed() && all_idle(&kept.pool, SECOND).await => kept,
                _ => {
                    let (worker, settings, timeout) = (
                        Arc::clone(&core.state),
                        Arc::clone(&core.settings),
                        fixture.config().acquire_timeout,
                    );
                    runtime::run(async move { new_kept(&worker, &settings, timeout) }).await
                }
            },
        };
        if kept.pool.size() < kept_now() {
            runtime::run(fill(kept.pool.clone())).await;
        }
        Ok(WorkerPool {
            pool: Some(kept),
            core: Some(core),
        })
    }

    fn core(&self) -> &crate::WorkerPool {
        self.core.as_ref().expect("the worker is held until drop")
    }

    /// The worker the pool belongs to.
    pub fn worker_id(&self) -> &WorkerId {
        self.core().worker_id()
    }

    /// The pool's connection settings, for connections of the test's own.
    pub fn connect_options(&self) -> PgConnectOptions {
        connect_options(&self.core().settings)
    }

    /// The same settings as a `postgres://` URL.
    pub fn url(&self) -> &DatabaseUrl {
        self.core().url()
    }

    /// Clears the pool's sessions and resets the worker if anything was changed,
    /// reporting an error the reset met (a dropped guard can only log it).
    ///
    /// # Errors
    ///
    /// The server's error when the worker cannot be rebuilt.
    pub async fn release(mut self) -> Result<()> {
        let (Some(pool), Some(core)) = (self.pool.take(), self.core.take()) else {
            return Ok(());
        };
        // Here, on the test's runtime, where the pool's connections come back.
        let core = keep_or_close(pool, core).await;
        core.release().await
    }
}

/// A worker's sqlx pool of up to `max` connections, made on pgfixture's runtime.
/// Connections come from the pool as they are, without sqlx's ping before each
/// acquire (they go to a local server that pgfixture watches; the ping on their
/// return stays, sqlx's own).
fn kept_pool(options: PgConnectOptions, max: u32, timeout: std::time::Duration) -> KeptPool {
    let foreign = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let marks = Arc::clone(&foreign);
    let pool = PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(timeout)
        .idle_timeout(None)
        .max_lifetime(None)
        .test_before_acquire(false)
        .after_connect(move |conn, _| {
            let foreign = !runtime::on_background();
            if foreign {
                marks.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            Box::pin(async move {
                if foreign {
                    let mark = format!("SET {FOREIGN} = 'on'");
                    ::sqlx::raw_sql(AssertSqlSafe(mark)).execute(conn).await?;
                }
                Ok(())
            })
        })
        .connect_lazy_with(options);
    KeptPool { pool, foreign }
}

/// A new kept pool on `worker`, of `#[sqlx::test]`'s size ([`super::sqlx_pool_size`]),
/// with pgfixture's own connection settings, named after the worker pool's (`pool`,
/// its settings) as connections a driver keeps
/// ([`kept_application_name`](crate::fixture::kept_application_name)): the release
/// ends them by that name when they are not all back.
fn new_kept(
    worker: &crate::fixture::Worker,
    pool: &Settings,
    timeout: std::time::Duration,
) -> KeptPool {
    let pool_name = pool.pg_config.get_application_name().unwrap_or_default();
    kept_pool(
        own_connect_options(worker.settings())
            .application_name(&crate::fixture::kept_application_name(pool_name)),
        super::sqlx_pool_size(worker),
        timeout,
    )
}

/// The connections a kept pool opens before a test: in a process that runs one test,
/// one; a test that holds more at once opens them as it needs them (on its own
/// runtime), and no other test will use them.
fn kept_now() -> u32 {
    if one_test_per_process() { 1 } else { KEPT }
}

/// Opens [`kept_now`] connections of `pool` and waits until they are back in it. On
/// pgfixture's runtime, not the test's: connections that outlive it. An error is left
/// for the test's first query to meet.
async fn fill(pool: PgPool) {
    let opened = futures::future::join_all((0..kept_now()).map(|_| pool.acquire())).await;
    drop(opened);
    all_idle(&pool, SECOND).await;
}

/// A kept pool opening its connections ([`open_kept`]).
struct Opening {
    kept: KeptPool,
    opened: tokio::task::JoinHandle<()>,
}

/// The sqlx driver's [`PoolOpener`](crate::fixture::PoolOpener): on a worker whose
/// stash holds no kept pool (the first worker pool of a process, as in every nextest
/// process, or after a reset), a new one starts opening its connections while the core
/// marks and reads the worker. One left opening by an acquire that failed since is
/// taken by the next.
fn open_kept(worker: &Arc<crate::fixture::Worker>, pool: &Arc<Settings>, config: &crate::Config) {
    if worker.has_idle::<KeptPool>() || worker.has_idle::<Opening>() {
        return;
    }
    let kept = new_kept(worker, pool, config.acquire_timeout);
    let opened = tokio::spawn(fill(kept.pool.clone()));
    worker.keep_idle(Opening { kept, opened });
}

/// How long [`all_idle`] waits for connections pgfixture returned itself.
const SECOND: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a release waits for the test's connections to come back before it ends
/// those still out ([`keep_or_close`]): a return is a round trip; one still out after
/// this is held (by a task of the test's, a `PgListener`) or stuck in a query.
const BACK_AFTER_TEST: std::time::Duration = std::time::Duration::from_millis(20);

/// Waits (up to `patience`) until every connection of `pool` is back in it: sqlx
/// returns each in a task of its own, on the runtime that dropped it. Whether they all
/// are.
///
/// The patience is counted in 1 ms sleeps as well as in time: on a machine too busy to
/// wake a sleeper in a millisecond (more test processes than cores), the tasks that
/// return the connections and the server's processes that answer them are as slow,
/// and the wait stretches with them rather than giving up on connections still on
/// their way back.
async fn all_idle(pool: &PgPool, patience: std::time::Duration) -> bool {
    let started = std::time::Instant::now();
    let mut slept = std::time::Duration::ZERO;
    while pool.num_idle() < pool.size() as usize {
        let waited = started.elapsed();
        if waited >= patience && slept >= patience {
            return false;
        }
        // A return is a round trip (sqlx pings the connection), a fraction of the
        // millisecond a timer waits at least: yield at first.
        if waited < std::time::Duration::from_millis(2) {
            // The thread too, or a spinning test thread can keep the server's process
            // that answers from the core for milliseconds.
            std::thread::yield_now();
            tokio::task::yield_now().await;
        } else {
            runtime::sleep(TICK).await;
            slept += TICK;
        }
    }
    true
}

/// One sleep of [`all_idle`].
const TICK: std::time::Duration = std::time::Duration::from_millis(1);

/// After a test: when every connection of the worker's `pool` came back and its session
/// was cleared, the pool goes to the worker's stash for the next test. Else it is
/// closed ([`discard`]). Either way the worker's reading then decides between nothing,
/// a restore and a reset.
async fn keep_or_close(kept: KeptPool, mut core: crate::WorkerPool) -> crate::WorkerPool {
    let cleared = all_idle(&kept.pool, BACK_AFTER_TEST).await && {
        // Cleared on pgfixture's runtime, where the connections then go back to the
        // pool (sqlx returns each in a task of the runtime that dropped it): the
        // test's runtime may end as soon as this returns.
        let (pool, flushes) = (kept.pool.clone(), core.state.flushes_known());
        runtime::run(async move { clear_sessions(&pool, flushes).await }).await
    };
    if cleared {
        kept.foreign
            .store(false, std::sync::atomic::Ordering::SeqCst);
        core.state.keep_idle(kept);
    } else {
        discard(&kept, &mut core);
    }
    core
}

/// Closes the worker's `kept` pool, some of whose connections are still out (held by a
/// task of the test's, or on their way back on a runtime that cannot run) or were not
/// cleared, and makes the release end them all, by their name, before it reads the
/// worker: a connection still out could change the worker later, or leave its session
/// to the next test. The next worker pool opens new ones.
fn discard(kept: &KeptPool, core: &mut crate::WorkerPool) {
    // Closed at once; the wait for the connections out would never end.
    drop(kept.pool.close());
    core.end_kept_on_release();
}

/// Clears the session of every (idle) connection of `pool` and closes those opened on
/// a test's runtime; the others go back to the pool; their statistics reach the server
/// where it `flushes` them on request. Whether all went well.
async fn clear_sessions(pool: &PgPool, flushes: bool) -> bool {
    let mut conns = Vec::new();
    while let Some(conn) = pool.try_acquire() {
        conns.push(conn);
    }
    let cleanup = kept_cleanup(flushes);
    let cleared =
        futures::future::join_all(conns.iter_mut().map(|conn| clear(&mut *conn, &cleanup))).await;
    let mut ok = true;
    for (conn, cleared) in conns.into_iter().zip(cleared) {
        match cleared {
            Ok(true) => drop(conn),
            // Its socket belongs to the test's runtime: closed with it.
            Ok(false) => drop(conn.detach()),
            Err(error) => {
                tracing::debug!(%error, "clearing a worker pool's connection failed");
                ok = false;
                drop(conn.detach());
            }
        }
    }
    ok
}

/// Rolls back what a test left open on `conn`, clears its session and deallocates the
/// statements it prepared with SQL `PREPARE`. Whether the connection may be kept (it
/// was opened on pgfixture's runtime).
async fn clear(conn: &mut PgConnection, cleanup: &str) -> Result<bool, ::sqlx::Error> {
    while PgTransactionManager::get_transaction_depth(conn) > 0 {
        PgTransactionManager::rollback(conn).await?;
    }
    let rows = ::sqlx::raw_sql(AssertSqlSafe(cleanup.to_owned()))
        .fetch_all(&mut *conn)
        .await?;
    let foreign = rows
        .iter()
        .any(|row| column(row) == Some(FOREIGN_COLUMN) && text(row).as_deref() == Some("on"));
    deallocate(conn, &rows).await?;
    Ok(!foreign)
}

impl Deref for WorkerPool {
    type Target = PgPool;

    fn deref(&self) -> &PgPool {
        &self
            .pool
            .as_ref()
            .expect("the pool is present until drop")
            .pool
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        let (Some(kept), Some(core)) = (self.pool.take(), self.core.take()) else {
            return;
        };
        // sqlx returns the connections the test dropped last in tasks of the test's
        // runtime, and that runtime serves the connections opened on it. A
        // multi-thread runtime goes on running while this blocks, so the drop is a
        // release.
        if runtime::tasks_run_while_blocked() {
            tokio::task::block_in_place(|| {
                runtime::block_on(async move {
                    reset_reported(keep_or_close(kept, core).await).await;
                });
            });
            return;
        }
        // A current-thread one cannot, since this blocks its only thread: with a
        // connection still on its way back, or one of those, the pool cannot be kept.
        let back = kept.pool.num_idle() == kept.pool.size() as usize
            && !kept.foreign.load(std::sync::atomic::Ordering::SeqCst);
        runtime::block_on(async move {
            let core = if back {
                keep_or_close(kept, core).await
            } else {
                let mut core = core;
                discard(&kept, &mut core);
                core
            };
            reset_reported(core).await;
        });
    }
}

/// Releases the worker of a dropped [`WorkerPool`]: the error of its reset, which a
/// drop cannot return, is logged and printed.
async fn reset_reported(core: crate::WorkerPool) {
    if let Err(error) = core.release().await {
        tracing::warn!(%error, "resetting a worker after its worker pool failed");
        eprintln!("pgfixture: resetting a worker after its worker pool failed: {error}");
    }
}
