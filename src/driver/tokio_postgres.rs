//! The handle a test holds: a pooled connection inside a transaction.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use deadpool_postgres::Object;

use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::error::SqlState;

use crate::fixture::{Handed, Inner, Worker};
use crate::restore::Change;
use crate::settings::Settings;
use crate::worker::{SlotLease, WorkerId};
use crate::{DatabaseUrl, Error, Result, runtime};

use crate::driver::{
    CLEANUP, END, END_LAST, MARK_COLUMN, PREPARED_COLUMN, SESSION_CLEANUP, one_test_per_process,
};

/// A connection to the current worker's database, inside a transaction that is rolled
/// back when the handle drops.
///
/// It derefs, mutably too, to deadpool-postgres's pooled client and through it to the
/// tokio-postgres [`Client`](tokio_postgres::Client), so `execute`, `query`,
/// `query_one`, `batch_execute`, `prepare` and `prepare_cached` work as usual, and the
/// handle goes where code under test takes `&Client`, `&mut Client` ([`TestDb::client`],
/// [`TestDb::client_mut`], or `&db` / `&mut *db`) or a `&deadpool_postgres::Client`.
/// [`TestDb::transaction`] gives a nested transaction, which is a SAVEPOINT:
/// committing it never commits the test's transaction; nor do the transactions that
/// code under test opens through `&mut Client`.
///
/// Dropping the handle (or [`TestDb::release`], which can report an error) checks that
/// the test's transaction is still open and rolls it back, in one round trip, before
/// the worker goes to another test. A test that committed anyway (`COMMIT` or `END`
/// through `batch_execute` at the top level, a `BEGIN ... COMMIT` of its own in one
/// batch, or `ROLLBACK` followed by more statements) is reported once on stderr, with
/// its name, and the worker's database or schema is rebuilt from the fixtures before
/// any other test gets it. What connections opened from the handle's settings
/// ([`TestDb::pg_config`]) commit is put back in place at the same moment. Code that
/// must commit belongs on [`crate::worker_pool`].
pub struct TestDb {
    client: Option<Object>,
    worker: WorkerId,
    /// Keeps the in-process worker slot until the connection is back in its pool.
    lease: Option<Arc<SlotLease>>,
    owner: Arc<Inner>,
    /// The test's name (its thread's), for the commit report.
    test: Option<String>,
    settings: Arc<Settings>,
    /// Whether the settings went to code under test ([`TestDb::pg_config`]).
    handed: Handed,
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
            lease,
            owner,
            test,
            settings,
            handed: Handed::default(),
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
        let mut handed = std::mem::take(&mut self.handed);
        async move {
            let Some(client) = client else { return Ok(()) };
            // The connections opened with the handle's settings are ended and the
            // worker read before the rollback, so that it does not show.
            let settled = handed.settle(&owner, &worker).await;
            let result = end(client, &worker, &owner, test.as_deref(), settled).await;
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
    /// cancellation or connection options. Its `Debug` output hides the password.
    ///
    /// Those connections are not inside the test's transaction: they do not see what
    /// the handle has written and not committed, and what they commit is real until
    /// the handle goes. The first call marks and reads the worker (a millisecond or
    /// two); when the handle is released or dropped, the connections opened with these
    /// settings (or [`TestDb::url`] and the published forms) that are still open are
    /// ended, and what they committed is put back in place, or the worker rebuilt (see
    /// "Tests that commit" in the README). Keep them within the test.
    pub fn pg_config(&self) -> &tokio_postgres::Config {
        self.hand_out();
        &self.settings.pg_config
    }

    /// The same settings as a `postgres://` URL, for other drivers (sqlx, diesel,
    /// `psql`); in schema mode the `search_path` is its `options` parameter. Its
    /// `Debug` and `Display` hide the password; [`DatabaseUrl::as_str`] gives it all.
    pub fn url(&self) -> &DatabaseUrl {
        self.hand_out();
        &self.settings.url
    }

    /// The settings through the port the server publishes on 127.0.0.1, for code that
    /// insists on a loopback address: on Docker's bridge pgfixture connects to a
    /// container at its own address on its Docker network (no proxy on the way), and
    /// this is the container's published port instead. Elsewhere (a local server, a
    /// container on the host's network, which listens on 127.0.0.1 itself) the same as
    /// [`TestDb::pg_config`].
    pub fn published_pg_config(&self) -> &tokio_postgres::Config {
        self.hand_out();
        &self.settings.published_pg_config
    }

    /// [`TestDb::published_pg_config`] as a URL.
    pub fn published_url(&self) -> &DatabaseUrl {
        self.hand_out();
        &self.settings.published_url
    }

    /// The settings go to code under test: the release will look for what the
    /// connections opened with them committed ([`Handed`]).
    fn hand_out(&self) {
        self.handed.note(&self.owner, &self.worker);
    }

    /// Rolls the test's transaction back, returns the connection to the pool, and
    /// reports an error the reset of the worker met (a dropped handle cannot). A test
    /// that committed is handled as on drop (reported, worker reset), not as an error;
    /// so is a connection that died (the test ended its backend, or the server did):
    /// whether the test committed is unknown then, and the worker is rebuilt.
    ///
    /// # Errors
    ///
    /// The reset's error, after a commit or a connection that died;
    /// [`Error::AcquireTimeout`] when the `ROLLBACK` got no answer in time (the worker
    /// is rebuilt as well).
    pub async fn release(mut self) -> Result<()> {
        runtime::run(self.finish()).await
    }

    /// A nested transaction: tokio-postgres's own [`Transaction`](tokio_postgres::Transaction),
    /// which here is a SAVEPOINT inside the test's transaction. Committing it releases
    /// the savepoint; rolling it back or dropping it rolls back to it; its
    /// `transaction()` and `savepoint()` nest further. It implements tokio-postgres's
    /// `GenericClient` and offers everything a `Transaction` does (`bind`,
    /// `query_portal`, `copy_in`, ...).
    ///
    /// The same holds for transactions that code under test opens itself through
    /// `&mut Client` (`client.transaction()`, `build_transaction()`, deadpool's
    /// wrappers) or with `batch_execute("BEGIN")` and `batch_execute("COMMIT")`:
    /// pgfixture's connections turn a `BEGIN`, `START TRANSACTION`, `COMMIT` or
    /// `ROLLBACK` sent alone as a simple query inside a test's transaction into
    /// savepoint commands. A `COMMIT` inside a batch of several statements, or one
    /// that matches no `BEGIN`, is a real commit, detected when the test ends.
    ///
    /// # Errors
    ///
    /// The driver's error when `SAVEPOINT` fails.
    pub async fn transaction(
        &mut self,
    ) -> Result<tokio_postgres::Transaction<'_>, tokio_postgres::Error> {
        self.client_mut().transaction().await
    }

    /// A nested transaction with settings, tokio-postgres's own builder: a SAVEPOINT
    /// as [`TestDb::transaction`] gives. A savepoint has no isolation level of its own:
    /// an isolation level, `read_only` or `deferrable` applies to the test's whole
    /// transaction, which PostgreSQL allows only before the test's first query ("SET
    /// TRANSACTION ISOLATION LEVEL must be called before any query" otherwise), and
    /// read-only stays for the rest of the test.
    pub fn build_transaction(&mut self) -> tokio_postgres::TransactionBuilder<'_> {
        self.client_mut().build_transaction()
    }

    /// Runs the checks of the deferred constraints now, as the `COMMIT` that a test's
    /// transaction never reaches would, and returns the error that `COMMIT` would give.
    /// The constraints stay deferred afterwards (the check runs in a savepoint that is
    /// rolled back), so the test's transaction goes on as before, also after a
    /// violation.
    ///
    /// # Errors
    ///
    /// The server's error for the first violated constraint (`foreign_key_violation`,
    /// `unique_violation`, ...).
    pub async fn check_deferred_constraints(&self) -> Result<(), tokio_postgres::Error> {
        let check = self.client().batch_execute("SET CONSTRAINTS ALL IMMEDIATE");
        self.in_savepoint(check, false).await
    }

    /// Restarts every sequence of the worker at the value the fixtures left, inside the
    /// test's transaction (so the restart is rolled back with it): the next `nextval`
    /// gives what it would in a fresh database, as `#[sqlx::test]` users assume when
    /// they assert `id == 1`. [`Config::reset_sequences`](crate::Config::reset_sequences)
    /// (`PGFIXTURE_RESET_SEQUENCES=1`) does it as every test begins. Each sequence
    /// restarts on a new file, so it costs about as much as a small insert.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] on a server of your own (`PGFIXTURE_URL`) where pgfixture keeps
    /// no record of the sequences: in schema mode, and in database mode for a user who
    /// may not set pgfixture's settings (not a superuser); the server's error otherwise.
    pub async fn reset_sequences(&self) -> Result<()> {
        let Some(restart) = &self.settings.restart_sequences else {
            return Err(Error::config(
                "PGFIXTURE_URL",
                "",
                "is set, and pgfixture keeps no record of the sequences there (schema mode, or a user who may not set pgfixture's settings): reset_sequences needs the servers pgfixture starts, or a superuser in database mode",
            ));
        };
        self.client()
            .batch_execute(restart)
            .await
            .map_err(Error::pg("restarting the worker's sequences"))
    }

    /// [`execute`](tokio_postgres::Client::execute) inside a savepoint: when the
    /// statement fails (a test that expects an error), only the statement is rolled
    /// back and the test's transaction stays usable. Without it, the first error
    /// aborts the test's transaction, and every later statement fails with "current
    /// transaction is aborted".
    ///
    /// # Errors
    ///
    /// The statement's error.
    pub async fn try_execute<T>(
        &self,
        statement: &T,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error>
    where
        T: ?Sized + tokio_postgres::ToStatement,
    {
        self.in_savepoint(self.client().execute(statement, params), true)
            .await
    }

    /// [`query`](tokio_postgres::Client::query) inside a savepoint; see
    /// [`TestDb::try_execute`].
    ///
    /// # Errors
    ///
    /// The statement's error.
    pub async fn try_query<T>(
        &self,
        statement: &T,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>
    where
        T: ?Sized + tokio_postgres::ToStatement,
    {
        self.in_savepoint(self.client().query(statement, params), true)
            .await
    }

    /// [`batch_execute`](tokio_postgres::Client::batch_execute) inside a savepoint;
    /// see [`TestDb::try_execute`].
    ///
    /// # Errors
    ///
    /// The statements' error.
    pub async fn try_batch_execute(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        self.in_savepoint(self.client().batch_execute(sql), true)
            .await
    }

    /// Runs `work` after a savepoint; rolls back to the savepoint when `work` fails,
    /// or always unless `keep`. The savepoint is sent ahead of `work` without waiting
    /// (tokio-postgres keeps requests in order), so it costs no round trip of its own.
    async fn in_savepoint<T>(
        &self,
        work: impl Future<Output = Result<T, tokio_postgres::Error>>,
        keep: bool,
    ) -> Result<T, tokio_postgres::Error> {
        const BEGIN: &str = "SAVEPOINT pgfixture_try";
        const KEEP: &str = "RELEASE SAVEPOINT pgfixture_try";
        const UNDO: &str = "ROLLBACK TO SAVEPOINT pgfixture_try; RELEASE SAVEPOINT pgfixture_try";
        let client = self.client();
        let (savepoint, result) = futures::join!(client.batch_execute(BEGIN), work);
        savepoint?;
        let end = if keep && result.is_ok() { KEEP } else { UNDO };
        client.batch_execute(end).await?;
        result
    }

    /// The tokio-postgres client, for code written against `&Client` or
    /// `impl GenericClient` (tokio-postgres seals that trait, so the handle itself
    /// cannot implement it; `Client` and `Transaction` do).
    pub fn client(&self) -> &tokio_postgres::Client {
        self.object()
    }

    /// The tokio-postgres client, mutably, for code written against `&mut Client`: its
    /// `transaction()` is a SAVEPOINT inside the test's transaction (see
    /// [`TestDb::transaction`]).
    pub fn client_mut(&mut self) -> &mut tokio_postgres::Client {
        self.client
            .as_mut()
            .expect("the client is present until drop")
    }

    fn object(&self) -> &Object {
        self.client
            .as_ref()
            .expect("the client is present until drop")
    }

    /// A token that cancels the query this handle runs, from another task. Use it
    /// instead of the client's own `cancel_token()`, which cannot reach the server:
    /// pgfixture opens pooled connections itself (see [`TestDb::transaction`]), so
    /// the driver does not know their address.
    pub fn cancel_token(&self) -> CancelToken {
        CancelToken {
            token: self.object().cancel_token(),
            settings: Arc::clone(&self.settings),
        }
    }
}

/// Cancels the query a [`TestDb`] runs; see [`TestDb::cancel_token`].
#[derive(Clone)]
pub struct CancelToken {
    token: tokio_postgres::CancelToken,
    settings: Arc<Settings>,
}

impl fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelToken").finish_non_exhaustive()
    }
}

impl CancelToken {
    /// Asks the server to cancel the query in progress, if any, as tokio-postgres's
    /// `CancelToken::cancel_query` does (the query then fails with `query_canceled`).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the server cannot be reached, [`Error::Postgres`] when the
    /// request fails.
    pub async fn cancel_query(&self, _tls: tokio_postgres::NoTls) -> Result<()> {
        use tokio_postgres::config::Host;
        let config = &self.settings.pg_config;
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let token = self.token.clone();
        let host = config.get_hosts().first().cloned();
        runtime::run(async move {
            let io = Error::io("connecting to the server to cancel a query");
            let pg = Error::pg("cancelling a query");
            match host {
                Some(Host::Unix(dir)) => {
                    let path = dir.join(format!(".s.PGSQL.{port}"));
                    let socket = tokio::net::UnixStream::connect(path).await.map_err(io)?;
                    token
                        .cancel_query_raw(socket, tokio_postgres::NoTls)
                        .await
                        .map_err(pg)
                }
                Some(Host::Tcp(host)) => {
                    let socket = tokio::net::TcpStream::connect((host.as_str(), port))
                        .await
                        .map_err(io)?;
                    token
                        .cancel_query_raw(socket, tokio_postgres::NoTls)
                        .await
                        .map_err(pg)
                }
                None => Err(io(std::io::ErrorKind::NotFound.into())),
            }
        })
        .await
    }
}

/// The handle derefs to deadpool-postgres's pooled client, which implements
/// deadpool's `GenericClient` and derefs on to tokio-postgres's `Client`, so `&*db`
/// goes where a `&deadpool_postgres::Client` goes and `&db` where a `&Client` goes.
impl Deref for TestDb {
    type Target = Object;

    fn deref(&self) -> &Object {
        self.object()
    }
}

/// `&mut *db` goes where a `&mut tokio_postgres::Client` goes: the transactions it
/// opens are savepoints inside the test's transaction.
impl DerefMut for TestDb {
    fn deref_mut(&mut self) -> &mut Object {
        self.client
            .as_mut()
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

/// Deallocates the statements the test prepared with SQL `PREPARE`, which the cleanup
/// listed: another test's `PREPARE` of the same name would fail.
pub(crate) async fn deallocate(
    client: &Object,
    messages: &[SimpleQueryMessage],
) -> Result<(), tokio_postgres::Error> {
    let statements = crate::driver::deallocate_sql(messages.iter().filter_map(|m| match m {
        SimpleQueryMessage::Row(row)
            if row.columns().first().map(|c| c.name()) == Some(PREPARED_COLUMN) =>
        {
            row.get(0)
        }
        _ => None,
    }));
    if statements.is_empty() {
        Ok(())
    } else {
        client.batch_execute(&statements).await
    }
}

/// Runs `sql` (the end of a test's transaction) as a simple query, once more if it
/// was cancelled: a cancel request is asynchronous, and one sent for the test's last
/// query can arrive once that query is over, and cancel this one instead.
async fn uncancelled(
    client: &Object,
    sql: &str,
) -> Result<Vec<SimpleQueryMessage>, tokio_postgres::Error> {
    match client.simple_query(sql).await {
        Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED) => client.simple_query(sql).await,
        other => other,
    }
}

/// Checks that the test's transaction is still open and rolls it back (one round trip,
/// two for a transaction a failed statement aborted); after a commit, resets the
/// worker. A connection that fails is discarded and the worker reset, since whether
/// the test committed is unknown.
async fn end(
    client: Object,
    worker: &WorkerId,
    owner: &Inner,
    test: Option<&str>,
    settled: Option<Change>,
) -> Result<()> {
    let limit = owner.config().acquire_timeout;
    let last = one_test_per_process();
    let ended = async {
        let messages = match uncancelled(&client, if last { END_LAST } else { END }).await {
            Ok(messages) => messages,
            // A failed statement left the transaction aborted, and so still open; the
            // error skipped the ROLLBACK after the check.
            Err(e) if e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION) => {
                let messages = uncancelled(&client, CLEANUP).await?;
                return deallocate(&client, &messages)
                    .await
                    .map(|()| (false, false));
            }
            Err(e) => return Err(e),
        };
        let open = messages.iter().any(|m| {
            matches!(m, SimpleQueryMessage::Row(row)
                if row.columns().first().map(|c| c.name()) == Some(MARK_COLUMN)
                    && row.get(0) == Some("open"))
        });
        deallocate(&client, &messages).await?;
        Ok((!open, last))
    };
    let (committed, unclean) = match runtime::timeout(limit, ended).await {
        Ok(Ok(ended)) => ended,
        // The connection died (the test ended its backend, or the server did): the
        // test's own doing, and no error once the worker is rebuilt.
        Ok(Err(e)) => {
            let _ = Object::take(client);
            let why = format!("rolling back failed: {e}");
            return owner.after_unread_end(worker, test, &why).await;
        }
        Err(_) => {
            let _ = Object::take(client);
            let why = format!("no answer to the rollback within {limit:?}");
            owner.after_unread_end(worker, test, &why).await?;
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
    // What connections opened with the handle's settings changed is put back in place
    // on this one, or the worker rebuilt, which its connections go with.
    if let Some(change) = settled
        && owner.after_settle(worker, change, Some(&client)).await?
    {
        let _ = Object::take(client);
        return Ok(());
    }
    if unclean {
        // Out of the pool until a test takes it again, which clears it first.
        match owner.ready_worker(worker) {
            Some(state) => state.keep_idle(UncleanClient(Some(client))),
            None => drop(Object::take(client)),
        }
    }
    Ok(())
}

/// A pooled connection whose test ended with [`END_LAST`], kept in the worker's stash
/// out of the pool: [`take_unclean`] clears its session before a test has it again.
/// Dropped instead (a full stash, a worker reset), it is closed, never pooled.
struct UncleanClient(Option<Object>);

impl Drop for UncleanClient {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(Object::take(client));
        }
    }
}

/// A connection of the worker that a test of this process left without clearing its
/// session ([`END_LAST`]), cleared now; `None` when there is none.
pub(crate) async fn take_unclean(state: &Worker) -> Option<Result<Object, tokio_postgres::Error>> {
    let client = state.take_idle::<UncleanClient>()?.0.take()?;
    let cleared = async {
        let messages = uncancelled(&client, SESSION_CLEANUP).await?;
        deallocate(&client, &messages).await
    };
    Some(match cleared.await {
        Ok(()) => Ok(client),
        Err(e) => {
            drop(Object::take(client));
            Err(e)
        }
    })
}
