//! A pool on the worker's database for code that commits for real.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use deadpool_postgres::Pool;

use crate::DatabaseUrl;
use crate::fixture::Inner;
use crate::settings::Settings;
use crate::worker::{SlotLease, WorkerId};
use crate::{Result, runtime};

/// A deadpool-postgres [`Pool`] on the current worker's database (or schema), for code
/// under test that opens its own connections and commits: it derefs to the pool.
///
/// Nothing here is rolled back. Instead, when the guard drops (or on
/// [`WorkerPool::release`]), before any other test gets the worker, pgfixture reads
/// whether anything was changed through the pool or through connections opened from
/// its settings (the README's "Tests that commit"): if nothing was, the pool's sessions
/// are cleared and the worker goes on as it is; else the worker is reset (a spare clone
/// takes its place, or its database is cloned again from the template, or its schema
/// rebuilt). The worker is marked while the guard is out, so if the process dies
/// first, the next process to take the worker resets it.
pub struct WorkerPool {
    pub(crate) pool: Option<Pool>,
    pub(crate) settings: Arc<Settings>,
    pub(crate) worker: WorkerId,
    pub(crate) lease: Option<Arc<SlotLease>>,
    pub(crate) owner: Arc<Inner>,
    /// The `application_name` of the pool's connections.
    pub(crate) application_name: String,
    /// Whether the release ends the connections a driver keeps for the worker's pools
    /// ([`crate::fixture::kept_application_name`]) before it reads the worker.
    pub(crate) end_kept: bool,
    /// What the worker looked like when the pool was handed out ([`crate::restore`]).
    pub(crate) before: Option<crate::restore::Reading>,
    /// The worker as it was when the pool was handed out, whose stash keeps what other
    /// drivers keep between tests (the sqlx driver's pool).
    #[cfg_attr(not(any(feature = "sqlx", feature = "sqlx-0_8")), allow(dead_code))]
    pub(crate) state: Arc<crate::fixture::Worker>,
}

impl fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerPool")
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl WorkerPool {
    /// The worker the pool belongs to.
    pub fn worker_id(&self) -> &WorkerId {
        &self.worker
    }

    /// The settings of the pool's connections (host, port, user, password, database,
    /// and the `search_path` in schema mode), for code that opens connections of its
    /// own: `pg_config().connect(NoTls)` gives a connection whose notifications
    /// (LISTEN/NOTIFY) you can read. Its `Debug` output hides the password.
    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.settings.pg_config
    }

    /// The same settings as a `postgres://` URL, for other drivers; see
    /// [`TestDb::url`](crate::TestDb::url).
    pub fn url(&self) -> &DatabaseUrl {
        &self.settings.url
    }

    /// The settings through the port the server publishes on 127.0.0.1; see
    /// [`TestDb::published_pg_config`](crate::TestDb::published_pg_config).
    pub fn published_pg_config(&self) -> &tokio_postgres::Config {
        &self.settings.published_pg_config
    }

    /// [`WorkerPool::published_pg_config`] as a URL.
    pub fn published_url(&self) -> &DatabaseUrl {
        &self.settings.published_url
    }

    /// Closes the pool and resets the worker, reporting an error the reset met (a
    /// dropped guard can only log it).
    ///
    /// # Errors
    ///
    /// The server's error when the worker cannot be rebuilt.
    pub async fn release(mut self) -> Result<()> {
        runtime::run(self.finish()).await
    }

    /// Makes the release end the connections the driver keeps for the worker's pools
    /// before it reads the worker ([`crate::fixture::kept_application_name`]): for a
    /// driver whose kept connections were not all back, or not all cleared, when the
    /// test ended. A connection it cannot end makes the release rebuild the worker.
    #[cfg_attr(not(any(feature = "sqlx", feature = "sqlx-0_8")), allow(dead_code))]
    pub(crate) fn end_kept_on_release(&mut self) {
        self.end_kept = true;
    }

    fn finish(&mut self) -> impl Future<Output = Result<()>> + Send + 'static {
        let pool = self.pool.take();
        let worker = self.worker.clone();
        let lease = self.lease.take();
        let owner = Arc::clone(&self.owner);
        let application_name = std::mem::take(&mut self.application_name);
        let before = self.before.take();
        let kept = std::mem::take(&mut self.end_kept)
            .then(|| crate::fixture::kept_application_name(&application_name));
        async move {
            // The worker's own pool: its connections stay open and warm.
            let Some(pool) = pool else { return Ok(()) };
            drop(pool);
            let result = owner
                .release_pool(&worker, &application_name, kept.as_deref(), before)
                .await;
            if result.is_err() {
                // Marked as in use by a worker pool still: the next test provisions it
                // again, finds the mark and rebuilds it, rather than taking it as it is.
                owner.forget_worker(&worker);
            }
            drop(lease);
            result
        }
    }
}

impl Deref for WorkerPool {
    type Target = Pool;

    fn deref(&self) -> &Pool {
        self.pool.as_ref().expect("the pool is present until drop")
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        if self.pool.is_some() {
            let finish = self.finish();
            runtime::block_on(async move {
                if let Err(error) = finish.await {
                    tracing::warn!(%error, "resetting a worker after its worker pool failed");
                    eprintln!(
                        "pgfixture: resetting a worker after its worker pool failed: {error}"
                    );
                }
            });
        }
    }
}
