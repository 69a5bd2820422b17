//! The sqlx driver: a `PgConnection` inside the test's transaction, begun through
//! sqlx's own transaction manager, and a `PgPool` on the worker for code that commits.

use std::any::Any;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use futures::future::BoxFuture;

use ::sqlx::postgres::{PgConnectOptions, PgConnection, PgRow, PgTransactionManager};
use ::sqlx::{AssertSqlSafe, Connection, SqlSafeStr};
use sqlx_core::transaction::TransactionManager;

use super::{CLEANUP, Checkout, END, END_LAST, MARK_COLUMN, SESSION_CLEANUP, one_test_per_process};
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

/// A sqlx [`PgPool`](::sqlx::PgPool) on the calling test's worker, for code that commits:
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

fn code(error: &::sqlx::Error) -> Option<&str> {
    match error {
        ::sqlx::Error::Database(e) => e
            .try_downcast_ref::<::sqlx::postgres::PgDatabaseError>()
            .map(|e| e.code()),
        _ => None,
    }
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

/// The worker pool of sqlx 0.9, pgfixture's own sqlx ([`WorkerPool`]).
pub(crate) mod kept {
    use ::sqlx::postgres::{
        PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow, PgSslMode,
        PgTransactionManager,
    };
    use ::sqlx::{AssertSqlSafe, Column, Row};
    use sqlx_core::transaction::TransactionManager;

    type SqlxError = ::sqlx::Error;

    pub(crate) async fn raw_execute(conn: &mut PgConnection, sql: &str) -> Result<(), SqlxError> {
        ::sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
            .execute(conn)
            .await
            .map(drop)
    }

    async fn raw_rows(conn: &mut PgConnection, sql: &str) -> Result<Vec<PgRow>, SqlxError> {
        ::sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
            .fetch_all(conn)
            .await
    }

    /// A worker keeps one sqlx pool: sqlx 0.8's goes when sqlx 0.9's is made.
    fn close_other_kept(worker: &crate::fixture::Worker) {
        #[cfg(feature = "sqlx-0_8")]
        crate::driver::sqlx_0_8::close_kept(worker);
        #[cfg(not(feature = "sqlx-0_8"))]
        let _ = worker;
    }

    include!("sqlx_kept.rs");
}
pub use kept::WorkerPool;
use kept::{column, deallocate, text};
pub(crate) use kept::{connect_options, own_connect_options};
