// The sqlx driver's worker pool ([`WorkerPool`]), written once for each sqlx major
// pgfixture serves and included into a module per major (`kept` in `src/driver/sqlx.rs`,
// and `src/driver/sqlx_0_8.rs`), which
// brings that major's names into scope: `PgPool`, `PgPoolOptions`, `PgConnection`,
// `PgConnectOptions`, `PgRow`, `PgTransactionManager`, the traits `Row`, `Column` and
// `TransactionManager`, `PgSslMode`, `SqlxError`, and the shims `raw_execute`,
// `raw_rows` and `close_other_kept` (what differs between the majors).

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use crate::driver::one_test_per_process;
use crate::runtime;
use crate::settings::Settings;
use crate::worker::WorkerId;
use crate::{DatabaseUrl, Fixture, Result};

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
    /// [`worker_pool`](crate::sqlx::worker_pool) on `fixture` instead of the environment's.
    ///
    /// # Errors
    ///
    /// As [`worker_pool`](crate::sqlx::worker_pool).
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

    pub(crate) fn core(&self) -> &crate::WorkerPool {
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
                    raw_execute(conn, &mark).await?;
                }
                Ok(())
            })
        })
        .connect_lazy_with(options);
    KeptPool { pool, foreign }
}

/// A new kept pool on `worker`, of `#[sqlx::test]`'s size ([`crate::driver::sqlx_pool_size`]),
/// with pgfixture's own connection settings, named after the worker pool's (`pool`,
/// its settings) as connections a driver keeps
/// ([`kept_application_name`](crate::fixture::kept_application_name)): the release
/// ends them by that name when they are not all back.
fn new_kept(
    worker: &crate::fixture::Worker,
    pool: &Settings,
    timeout: std::time::Duration,
) -> KeptPool {
    close_other_kept(worker);
    let pool_name = pool.pg_config.get_application_name().unwrap_or_default();
    kept_pool(
        own_connect_options(worker.settings())
            .application_name(&crate::fixture::kept_application_name(pool_name)),
        crate::driver::sqlx_pool_size(worker),
        timeout,
    )
}

/// Closes the kept pool `worker` holds, and one opening, if any (on pgfixture's
/// runtime, where their connections live): a worker keeps the pool of one sqlx major
/// at a time, within the connections its pool size leaves to the drivers.
#[cfg_attr(not(all(feature = "sqlx", feature = "sqlx-0_8")), allow(dead_code))]
pub(crate) fn close_kept(worker: &crate::fixture::Worker) {
    let opening = worker.take_idle::<Opening>().map(|Opening { kept, opened }| {
        opened.abort();
        kept
    });
    for kept in opening.into_iter().chain(worker.take_idle::<KeptPool>()) {
        runtime::handle().spawn(async move { kept.pool.close().await });
    }
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
async fn clear(conn: &mut PgConnection, cleanup: &str) -> Result<bool, SqlxError> {
    while PgTransactionManager::get_transaction_depth(conn) > 0 {
        PgTransactionManager::rollback(conn).await?;
    }
    let rows = raw_rows(conn, cleanup).await?;
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

/// Deallocates the statements a test prepared with SQL `PREPARE`, which the cleanup's
/// `rows` list: another test's `PREPARE` of the same name would fail.
pub(super) async fn deallocate(conn: &mut PgConnection, rows: &[PgRow]) -> Result<(), SqlxError> {
    let deallocate = crate::driver::deallocate_sql(
        rows.iter()
            .filter(|row| column(row) == Some(crate::driver::PREPARED_COLUMN))
            .filter_map(|row| row.try_get::<&str, _>(0).ok()),
    );
    if !deallocate.is_empty() {
        raw_execute(conn, &deallocate).await?;
    }
    Ok(())
}

pub(super) fn column(row: &PgRow) -> Option<&str> {
    row.columns().first().map(|c| c.name())
}

pub(super) fn text(row: &PgRow) -> Option<String> {
    row.try_get::<Option<String>, _>(0).ok().flatten()
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
