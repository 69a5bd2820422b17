//! What every driver shares, and the drivers.
//!
//! The core ([`crate::fixture`]) owns servers, workers, templates, marks and resets. A
//! driver says how a connection is opened, pooled and handed out, and nothing more:
//! it takes the worker with [`Checkout`], begins the test's transaction with
//! [`Checkout::begin_sql`], ends it with the statements below, and hands the result to
//! [`Checkout::end`]. Connections a driver keeps between tests go in the worker's stash
//! ([`Checkout::take_idle`], [`Checkout::keep_idle`]), which goes with the worker when it
//! is reset. One file per driver, each but tokio-postgres behind a feature:
//!
//! - [`tokio_postgres`]: the core's own driver. Its connections come from the
//!   worker's deadpool-postgres pool, which the core also uses to check and reset
//!   workers, so it takes its handle from the core directly.
//! - `sqlx` (feature `sqlx`): a `PgConnection` kept in the worker's stash, begun
//!   through sqlx's transaction manager, and a `PgPool` over the core's worker pool.
//! - `sqlx_0_8` (feature `sqlx-0_8`): the same `PgPool` of sqlx 0.8, for the types of
//!   `#[sqlx::test]` of a crate on sqlx 0.8 (`crate::attribute`).

#[cfg(feature = "sqlx")]
pub(crate) mod sqlx;
#[cfg(feature = "sqlx-0_8")]
pub(crate) mod sqlx_0_8;
pub(crate) mod tokio_postgres;

use std::any::Any;
use std::sync::Arc;

use crate::Result;
use crate::fixture::{Handed, Inner, Worker};
use crate::restore::Change;
use crate::settings::Settings;
use crate::worker::{SlotLease, WorkerId};

/// Starts a test's transaction and marks it, so that its end can tell whether the test
/// committed it: the mark (a transaction-local setting) is gone once the transaction is.
pub(crate) const BEGIN: &str = "BEGIN; SET LOCAL pgfixture.test = 'open'";

/// Reads the mark [`BEGIN`] set.
macro_rules! mark {
    () => {
        "SELECT current_setting('pgfixture.test', true) AS pgfixture_mark"
    };
}

/// Lists the statements prepared with SQL `PREPARE`, to be deallocated
/// ([`deallocate_sql`]): another test's `PREPARE` of the same name would fail. The
/// driver's own statements, prepared through the protocol (`from_sql` false), stay
/// cached. The function rather than its view `pg_prepared_statements`: the same rows
/// without a view to rewrite and a relation to lock, about 6 µs less a test.
macro_rules! prepared {
    () => {
        "SELECT name AS pgfixture_prepared FROM pg_catalog.pg_prepared_statement() WHERE from_sql"
    };
}

/// What a test may leave on its connection that a rollback does not undo, cleared
/// before the connection goes to the next test: session advisory locks (job queues take
/// them), the sequences' `currval` and `lastval`, and the statements prepared with SQL
/// `PREPARE` ([`prepared`]). Each may run inside or outside a transaction.
macro_rules! session_cleanup {
    () => {
        concat!(
            "SELECT pg_advisory_unlock_all() AS pgfixture_unlocked; DISCARD SEQUENCES; ",
            prepared!()
        )
    };
}

/// Ends a test's transaction: reads the mark, rolls back and clears the session, in one
/// round trip. The advisory locks are released in the statement that reads the mark,
/// before the rollback (a session lock does not wait for the transaction's end): one
/// statement less to plan and answer, about 6 µs a test.
pub(crate) const END: &str = concat!(
    mark!(),
    ", pg_advisory_unlock_all() AS pgfixture_unlocked; ROLLBACK; DISCARD SEQUENCES; ",
    prepared!()
);
/// The same without the mark, for a transaction a failed statement aborted.
pub(crate) const CLEANUP: &str = concat!("ROLLBACK; ", session_cleanup!());
/// Ends a test's transaction in a process that runs one test ([`one_test_per_process`]):
/// reads the mark and rolls back. The session is cleared only if the connection is
/// taken again ([`SESSION_CLEANUP`]; each driver stashes such a connection in a
/// wrapper of its own), which in such a process is rare: on a new backend the
/// cleanup's catalog reads cost about 0.15 ms.
pub(crate) const END_LAST: &str = concat!(mark!(), "; ROLLBACK");
/// What [`END`] clears after the rollback, for a connection ended with [`END_LAST`].
pub(crate) const SESSION_CLEANUP: &str = session_cleanup!();

/// The most connections a sqlx pool on a worker opens at once: 5, as the pools of
/// `#[sqlx::test]` allow (a renamed test that leans on that limit behaves the same),
/// or the worker's pool size when it is smaller.
#[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
pub(crate) fn sqlx_pool_size(worker: &Worker) -> u32 {
    const SQLX_TEST: usize = 5;
    u32::try_from(worker.pool_size().clamp(1, SQLX_TEST)).unwrap_or(1)
}

/// Whether this process runs one test only: nextest's process-per-test mode, which it
/// announces in `NEXTEST_EXECUTION_MODE`. A connection's session is then cleared when
/// it is taken again rather than at release, since no other test will take it.
pub(crate) fn one_test_per_process() -> bool {
    static ONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONE.get_or_init(|| {
        std::env::var_os("NEXTEST_EXECUTION_MODE").is_some_and(|mode| mode == "process-per-test")
    })
}

/// The column of [`END`]'s row that holds the mark; `open` while the test's
/// transaction is.
pub(crate) const MARK_COLUMN: &str = "pgfixture_mark";
/// The column of the statements to deallocate.
pub(crate) const PREPARED_COLUMN: &str = "pgfixture_prepared";

/// `DEALLOCATE` for each statement a test prepared with SQL `PREPARE` (another test's
/// `PREPARE` of the same name would fail); empty when there is none.
pub(crate) fn deallocate_sql<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names
        .into_iter()
        .map(|name| format!("DEALLOCATE \"{}\";", name.replace('"', "\"\"")))
        .collect()
}

/// A worker taken for one test, for a driver to open (or reuse) a connection on: it
/// holds the in-process slot until [`Checkout::end`].
#[cfg_attr(not(feature = "sqlx"), allow(dead_code))]
pub(crate) struct Checkout {
    pub(crate) id: WorkerId,
    pub(crate) lease: Option<Arc<SlotLease>>,
    pub(crate) worker: Arc<Worker>,
    pub(crate) owner: Arc<Inner>,
    /// The test's name, for the commit report.
    pub(crate) test: Option<String>,
    /// Whether the worker's settings went to code under test ([`Handed`]).
    pub(crate) handed: Handed,
}

impl std::fmt::Debug for Checkout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkout")
            .field("worker", &self.id)
            .finish_non_exhaustive()
    }
}

#[cfg_attr(not(feature = "sqlx"), allow(dead_code))]
impl Checkout {
    /// How to reach the worker.
    pub(crate) fn settings(&self) -> &Arc<Settings> {
        self.worker.settings()
    }

    /// What begins a test's transaction on this worker ([`BEGIN`], and the restart of
    /// the sequences when configured).
    pub(crate) fn begin_sql(&self) -> &str {
        self.worker.begin_sql()
    }

    /// A connection of type `T` that an earlier test on this worker left.
    pub(crate) fn take_idle<T: Any>(&self) -> Option<T> {
        self.worker.take_idle()
    }

    /// Keeps `conn` for the next test on this worker.
    pub(crate) fn keep_idle<T: Any + Send>(&self, conn: T) {
        self.worker.keep_idle(conn);
    }

    /// The worker's server was found gone (killed, or stopped by its watchdog as this
    /// process came for it): forgets it and provisions the worker again, on a fresh
    /// server if need be, as the tokio-postgres path does.
    pub(crate) async fn refresh(&mut self, primer: Option<crate::fixture::Primer>) -> Result<()> {
        tracing::warn!(worker = %self.id, "worker's server is gone; provisioning it again");
        self.owner.forget(&self.id);
        let deadline = std::time::Instant::now() + self.owner.config().acquire_timeout;
        self.worker = self.owner.worker_primed(&self.id, deadline, primer).await?;
        Ok(())
    }

    /// The worker's settings go to code under test: the release will look for what
    /// the connections opened with them committed ([`Handed`]).
    pub(crate) fn hand_out(&self) -> &Arc<Settings> {
        self.handed.note(&self.owner, &self.id);
        self.settings()
    }

    /// Before the test's transaction ends: the connections opened with the worker's
    /// settings are ended and the worker read ([`Handed::settle`]).
    pub(crate) async fn settle(&mut self) -> Option<Change> {
        self.handed.settle(&self.owner, &self.id).await
    }

    /// The test's transaction is over: when the test committed it (`committed`), the
    /// commit is reported and the worker rebuilt before the slot frees up; otherwise
    /// what `settled` ([`Checkout::settle`]) asks for is done.
    pub(crate) async fn end(self, committed: bool, settled: Option<Change>) -> Result<()> {
        let result = match settled {
            _ if committed => {
                self.owner
                    .after_commit(&self.id, self.test.as_deref())
                    .await
            }
            Some(change) => {
                let (owner, id) = (Arc::clone(&self.owner), self.id.clone());
                crate::runtime::run(async move { owner.after_settle(&id, change, None).await })
                    .await
                    .map(|_| ())
            }
            None => Ok(()),
        };
        // The slot is free only once the worker is clean again.
        drop(self.lease);
        result
    }

    /// The test's transaction's end could not be read (`why`: its connection died, or
    /// went with its runtime first): whether the test committed is unknown, so the
    /// worker is rebuilt before the slot frees up.
    pub(crate) async fn end_unread(self, why: &str) -> Result<()> {
        let result = self
            .owner
            .after_unread_end(&self.id, self.test.as_deref(), why)
            .await;
        drop(self.lease);
        result
    }
}
