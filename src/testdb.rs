//! The handle a test holds: a pooled connection inside a transaction.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use deadpool_postgres::{ClientWrapper, Object};

use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::error::SqlState;

use crate::fixture::Inner;
use crate::settings::Settings;
use crate::worker::{SlotLease, WorkerId};
use crate::{DatabaseUrl, Error, Result, runtime};

/// Starts a test's transaction and marks it, so that its end can tell whether the test
/// committed it: the mark (a transaction-local setting) is gone once the transaction is.
pub(crate) const BEGIN: &str = "BEGIN; SET LOCAL pgfixture.test = 'open'";
/// Ends a test's transaction: reads the mark, then rolls back, in one round trip.
const END: &str = "SELECT current_setting('pgfixture.test', true); ROLLBACK";

/// A connection to the current worker's database, inside a transaction that is rolled
/// back when the handle drops.
///
/// It derefs to the tokio-postgres [`Client`](tokio_postgres::Client) (through
/// deadpool's [`ClientWrapper`], which adds `prepare_cached`), so `execute`, `query`,
/// `query_one`, `batch_execute` and `prepare` work as usual. [`TestDb::transaction`]
/// gives a nested transaction, which is a SAVEPOINT: committing it never commits the
/// test's transaction.
///
/// Dropping the handle (or [`TestDb::release`], which can report an error) checks that
/// the test's transaction is still open and rolls it back, in one round trip, before
/// the worker goes to another test. A test that committed anyway (`COMMIT` or `END`
/// through `batch_execute`, a `BEGIN ... COMMIT` of its own, or `ROLLBACK` followed by
/// more statements) is reported once on stderr, with its name, and the worker's database
/// or schema is rebuilt from the fixtures before any other test gets it. Code that
/// must commit belongs on [`crate::worker_pool`].
pub struct TestDb {
    client: Option<Object>,
    worker: WorkerId,
    depth: u32,
    /// Keeps the in-process worker slot until the connection is back in its pool.
    lease: Option<Arc<SlotLease>>,
    owner: Arc<Inner>,
    /// The test's name (its thread's), for the commit report.
    test: Option<String>,
    settings: Arc<Settings>,
}

impl fmt::Debug for TestDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDb")
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl TestDb {
    pub(crate) fn new(
        client: Object,
        worker: WorkerId,
        lease: Option<Arc<SlotLease>>,
        owner: Arc<Inner>,
        test: Option<String>,
        settings: Arc<Settings>,
    ) -> Self {
        TestDb {
            client: Some(client),
            worker,
            depth: 0,
            lease,
            owner,
            test,
            settings,
        }
    }

    /// Ends the test's transaction on the background runtime: the work `release` and
    /// `drop` share.
    fn finish(&mut self) -> impl Future<Output = Result<()>> + Send + 'static {
        let client = self.client.take();
        let worker = self.worker.clone();
        let lease = self.lease.take();
        let owner = Arc::clone(&self.owner);
        let test = self.test.take();
        async move {
            let Some(client) = client else { return Ok(()) };
            let result = end(client, &worker, &owner, test.as_deref()).await;
            // The slot is free only once the worker is clean again.
            drop(lease);
            result
        }
    }

    pub(crate) fn lease(&self) -> Option<&Arc<SlotLease>> {
        self.lease.as_ref()
    }

    /// The worker this handle belongs to.
    pub fn worker_id(&self) -> &WorkerId {
        &self.worker
    }

    /// The worker's connection settings (host, port, user, password, database, and
    /// in schema mode the `search_path`), for code under test that opens connections
    /// of its own: `db.pg_config().connect(NoTls)` for LISTEN/NOTIFY, notices,
    /// cancellation or connection options. No reset is needed afterwards, as long
    /// as those connections commit nothing (see "Tests that commit"). Its `Debug`
    /// output hides the password.
    ///
    /// Those connections are not inside the test's transaction: they do not see what
    /// the handle has written and not committed, and what they commit stays.
    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.settings.pg_config
    }

    /// The same settings as a `postgres://` URL, for other drivers (sqlx, diesel,
    /// `psql`); in schema mode the `search_path` is its `options` parameter. Its
    /// `Debug` and `Display` hide the password; [`DatabaseUrl::as_str`] gives it all.
    pub fn url(&self) -> &DatabaseUrl {
        &self.settings.url
    }

    /// The settings through the port the server publishes on 127.0.0.1, for code that
    /// insists on a loopback address: in Docker mode pgfixture connects to a
    /// container at its own address on its Docker network (no proxy on the way), and
    /// this is the container's published port instead. Elsewhere the same as
    /// [`TestDb::pg_config`].
    pub fn published_pg_config(&self) -> &tokio_postgres::Config {
        &self.settings.published_pg_config
    }

    /// [`TestDb::published_pg_config`] as a URL.
    pub fn published_url(&self) -> &DatabaseUrl {
        &self.settings.published_url
    }

    /// Rolls the test's transaction back, returns the connection to the pool, and
    /// reports an error the rollback met (a dropped handle cannot). A test that
    /// committed is handled as on drop (reported, worker reset), not as an error.
    ///
    /// # Errors
    ///
    /// [`Error::Postgres`] when the `ROLLBACK` fails, for example because the server
    /// went away; the connection is then discarded instead of pooled. The reset's error
    /// after a commit.
    pub async fn release(mut self) -> Result<()> {
        runtime::run(self.finish()).await
    }

    /// A nested transaction: a SAVEPOINT inside the test's transaction. Committing it
    /// releases the savepoint; dropping it rolls back to it.
    ///
    /// # Errors
    ///
    /// The driver's error when `SAVEPOINT` fails.
    pub async fn transaction(&mut self) -> Result<Savepoint<'_>, tokio_postgres::Error> {
        self.depth += 1;
        let depth = self.depth;
        Savepoint::start(
            self.client
                .as_ref()
                .expect("the client is present until drop"),
            depth,
        )
        .await
    }
}

impl Deref for TestDb {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        self.client
            .as_ref()
            .expect("the client is present until drop")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.client.is_some() {
            let finish = self.finish();
            runtime::block_on(async move {
                if let Err(error) = finish.await {
                    tracing::warn!(%error, "ending a test's transaction failed");
                }
            });
        }
    }
}

/// Checks that the test's transaction is still open and rolls it back (one round trip,
/// two for a transaction a failed statement aborted); after a commit, resets the
/// worker. A connection that fails is discarded.
async fn end(client: Object, worker: &WorkerId, owner: &Inner, test: Option<&str>) -> Result<()> {
    let limit = owner.config().acquire_timeout;
    let ended = async {
        match client.simple_query(END).await {
            Ok(messages) => Ok(!messages
                .iter()
                .any(|m| matches!(m, SimpleQueryMessage::Row(row) if row.get(0) == Some("open")))),
            // A failed statement left the transaction aborted, and so still open; the
            // error skipped the ROLLBACK after the check.
            Err(e) if e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION) => {
                client.batch_execute("ROLLBACK").await.map(|()| false)
            }
            Err(e) => Err(e),
        }
    };
    let committed = match tokio::time::timeout(limit, ended).await {
        Ok(Ok(committed)) => committed,
        Ok(Err(e)) => {
            let _ = Object::take(client);
            return Err(Error::pg(format!(
                "rolling back the test transaction of worker {worker}"
            ))(e));
        }
        Err(_) => {
            let _ = Object::take(client);
            return Err(Error::AcquireTimeout {
                timeout: limit,
                waiting_for: format!("the rollback of a test transaction on worker {worker}"),
            });
        }
    };
    if committed {
        // Its connection goes with the old database or schema.
        let _ = Object::take(client);
        return owner.after_commit(worker, test).await;
    }
    Ok(())
}

/// A nested transaction of a [`TestDb`]: a SAVEPOINT. Derefs to the client.
pub struct Savepoint<'a> {
    client: &'a ClientWrapper,
    name: String,
    depth: u32,
    done: bool,
}

impl fmt::Debug for Savepoint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Savepoint")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<'a> Savepoint<'a> {
    async fn start(client: &'a ClientWrapper, depth: u32) -> Result<Self, tokio_postgres::Error> {
        let name = format!("pgfixture_sp_{depth}");
        client.batch_execute(&format!("SAVEPOINT {name}")).await?;
        Ok(Savepoint {
            client,
            name,
            depth,
            done: false,
        })
    }

    /// A savepoint nested in this one.
    ///
    /// # Errors
    ///
    /// The driver's error when `SAVEPOINT` fails.
    pub async fn transaction(&mut self) -> Result<Savepoint<'_>, tokio_postgres::Error> {
        Savepoint::start(self.client, self.depth + 1).await
    }

    /// Keeps the savepoint's changes in the enclosing transaction (`RELEASE SAVEPOINT`).
    ///
    /// # Errors
    ///
    /// The driver's error.
    pub async fn commit(mut self) -> Result<(), tokio_postgres::Error> {
        self.done = true;
        self.client
            .batch_execute(&format!("RELEASE SAVEPOINT {}", self.name))
            .await
    }

    /// Discards the savepoint's changes (`ROLLBACK TO SAVEPOINT`).
    ///
    /// # Errors
    ///
    /// The driver's error.
    pub async fn rollback(mut self) -> Result<(), tokio_postgres::Error> {
        self.done = true;
        self.client
            .batch_execute(&format!(
                "ROLLBACK TO SAVEPOINT {0}; RELEASE SAVEPOINT {0}",
                self.name
            ))
            .await
    }
}

impl Deref for Savepoint<'_> {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        self.client
    }
}

impl Drop for Savepoint<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.client.__private_api_rollback(Some(&self.name));
        }
    }
}
