//! The handle a test holds: a pooled connection inside a transaction.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use deadpool_postgres::{ClientWrapper, Object};

use crate::worker::{SlotLease, WorkerId};
use crate::{Error, Result};

/// A connection to the current worker's database, inside a transaction that is rolled
/// back when the handle drops.
///
/// It derefs to the tokio-postgres [`Client`](tokio_postgres::Client) (through
/// deadpool's [`ClientWrapper`], which adds `prepare_cached`), so `execute`, `query`,
/// `query_one`, `batch_execute` and `prepare` work as usual. [`TestDb::transaction`]
/// gives a nested transaction, which is a SAVEPOINT: committing it never commits the
/// test's transaction.
///
/// Dropping the handle queues a `ROLLBACK` on the connection (ordered before anything
/// the next user of the connection sends) and returns the connection to the worker's
/// pool at once; [`TestDb::release`] does the same and waits for the rollback, so it
/// can report an error. Code that commits through `batch_execute("COMMIT")` defeats the
/// rollback; do not.
pub struct TestDb {
    client: Option<Object>,
    worker: WorkerId,
    depth: u32,
    /// Keeps the in-process worker slot until the connection is back in its pool.
    lease: Option<Arc<SlotLease>>,
}

impl fmt::Debug for TestDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDb")
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl TestDb {
    pub(crate) fn new(client: Object, worker: WorkerId, lease: Option<Arc<SlotLease>>) -> Self {
        TestDb {
            client: Some(client),
            worker,
            depth: 0,
            lease,
        }
    }

    pub(crate) fn lease(&self) -> Option<&Arc<SlotLease>> {
        self.lease.as_ref()
    }

    /// The worker this handle belongs to.
    pub fn worker_id(&self) -> &WorkerId {
        &self.worker
    }

    /// Rolls the test's transaction back, returns the connection to the pool, and
    /// reports an error the rollback met (a dropped handle cannot).
    ///
    /// # Errors
    ///
    /// [`Error::Postgres`] when the `ROLLBACK` fails, for example because the server
    /// went away; the connection is then discarded instead of pooled.
    pub async fn release(mut self) -> Result<()> {
        let client = self
            .client
            .take()
            .expect("the client is present until drop");
        match client.batch_execute("ROLLBACK").await {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = Object::take(client);
                Err(Error::pg(format!(
                    "rolling back the test transaction of worker {}",
                    self.worker
                ))(e))
            }
        }
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
        if let Some(client) = self.client.take() {
            // Queued on the connection synchronously, so it is sent before anything
            // the connection's next user sends; works in any runtime, or none.
            client.__private_api_rollback(None);
            drop(client);
        }
    }
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
