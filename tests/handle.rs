//! The test handle: rollback on drop and on release, savepoints, several handles in
//! one test, and pooled connections that outlive the runtime of the test that opened
//! them. Runs on the backend and isolation mode the environment selects.

use std::time::Duration;

use pgfixture::Fixture;

mod common;

/// A fixture with one in-process worker: consecutive handles come from one pool, so a
/// returned connection is the next one handed out.
fn single_worker() -> Fixture {
    Fixture::builder().workers(1).build().expect("fixture")
}

async fn count_notes(db: &pgfixture::TestDb, owner: &str) -> i64 {
    db.query_one("SELECT count(*) FROM notes WHERE owner = $1", &[&owner])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn dropping_the_handle_rolls_back() {
    let fixture = single_worker();
    let db = fixture.worker_db().await.unwrap();
    db.execute("INSERT INTO notes (owner, body) VALUES ('drop', 'x')", &[])
        .await
        .unwrap();
    assert_eq!(count_notes(&db, "drop").await, 1);
    drop(db);
    let db = fixture.worker_db().await.unwrap();
    assert_eq!(
        count_notes(&db, "drop").await,
        0,
        "the dropped handle's insert survived"
    );
}

#[tokio::test]
async fn release_rolls_back_and_reports() {
    let fixture = single_worker();
    let db = fixture.worker_db().await.unwrap();
    db.execute(
        "INSERT INTO notes (owner, body) VALUES ('release', 'x')",
        &[],
    )
    .await
    .unwrap();
    db.release().await.expect("release reports no error");
    let db = fixture.worker_db().await.unwrap();
    assert_eq!(count_notes(&db, "release").await, 0);
}

#[tokio::test]
async fn a_failed_statement_does_not_poison_the_next_test() {
    let fixture = single_worker();
    let db = fixture.worker_db().await.unwrap();
    assert!(
        db.execute("SELECT * FROM no_such_table", &[])
            .await
            .is_err()
    );
    drop(db);
    let db = fixture.worker_db().await.unwrap();
    assert_eq!(count_notes(&db, "x").await, 0);
}

#[tokio::test]
async fn a_nested_transaction_is_a_savepoint() {
    let mut db = pgfixture::worker_db().await.unwrap();
    db.execute(
        "INSERT INTO notes (owner, body) VALUES ('sp', 'outer')",
        &[],
    )
    .await
    .unwrap();

    // Committing the nested transaction keeps its rows in the test's transaction only.
    let inner = db.transaction().await.unwrap();
    inner
        .execute(
            "INSERT INTO notes (owner, body) VALUES ('sp', 'committed')",
            &[],
        )
        .await
        .unwrap();
    inner.commit().await.unwrap();
    let status: String = db
        .query_one(
            "SELECT CASE WHEN txid_current_if_assigned() IS NULL THEN 'autocommit' ELSE 'in transaction' END",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        status, "in transaction",
        "committing the savepoint ended the test's transaction"
    );

    // Rolling back (or dropping) it discards only its own rows.
    let inner = db.transaction().await.unwrap();
    inner
        .execute(
            "INSERT INTO notes (owner, body) VALUES ('sp', 'rolled back')",
            &[],
        )
        .await
        .unwrap();
    inner.rollback().await.unwrap();
    {
        let mut inner = db.transaction().await.unwrap();
        inner
            .execute(
                "INSERT INTO notes (owner, body) VALUES ('sp', 'dropped')",
                &[],
            )
            .await
            .unwrap();
        let deeper = inner.transaction().await.unwrap();
        deeper
            .execute(
                "INSERT INTO notes (owner, body) VALUES ('sp', 'deeper')",
                &[],
            )
            .await
            .unwrap();
        deeper.commit().await.unwrap();
    }
    let bodies: Vec<String> = db
        .query("SELECT body FROM notes WHERE owner = 'sp' ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(bodies, ["outer", "committed"]);

    // And none of it outlives the test.
    let worker = db.worker_id().clone();
    drop(db);
    let fixture = Fixture::from_env().unwrap();
    if fixture.config().worker.is_none() {
        // In-process: the freed slot may be taken by another test; look through a
        // fresh handle on any worker: the rows were never committed anywhere.
        let db = pgfixture::worker_db().await.unwrap();
        assert_eq!(
            count_notes(&db, "sp").await,
            0,
            "savepoint rows of worker {worker} survived"
        );
    }
}

#[tokio::test]
async fn a_test_may_hold_two_handles() {
    let fixture = single_worker();
    let a = fixture.worker_db().await.unwrap();
    // With one slot, a second acquire that waited for a free slot would deadlock.
    let b = tokio::time::timeout(Duration::from_secs(20), fixture.worker_db())
        .await
        .expect("a second handle in the same test must not wait for the first")
        .unwrap();
    assert_eq!(a.worker_id(), b.worker_id());
    let pa: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let pb: i32 = b
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(pa, pb, "two handles, two connections, two transactions");
    a.execute("INSERT INTO notes (owner, body) VALUES ('two', 'a')", &[])
        .await
        .unwrap();
    assert_eq!(
        count_notes(&b, "two").await,
        0,
        "uncommitted rows are invisible to the other handle"
    );
}

/// With every slot taken by other tests, `worker_db` waits up to the acquire timeout
/// and then fails, saying what it waited for.
#[tokio::test]
async fn waiting_for_a_busy_slot_times_out_with_a_clear_error() {
    // In-process slots even under nextest, where the environment fixes the worker.
    let mut config = pgfixture::Config::from_env().unwrap();
    config.worker = None;
    let fixture = Fixture::builder()
        .config(config)
        .workers(1)
        .acquire_timeout(Duration::from_millis(1500))
        .build()
        .unwrap();
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn({
        let fixture = fixture.clone();
        move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // The first acquire also starts the worker's server, which may take longer
            // than this fixture's short timeout; the start goes on across attempts.
            let db = runtime.block_on(async {
                for _ in 0..60 {
                    match fixture.worker_db().await {
                        Ok(db) => return db,
                        Err(pgfixture::Error::AcquireTimeout { .. }) => continue,
                        Err(e) => panic!("{e}"),
                    }
                }
                panic!("the worker's server did not start in 60 attempts");
            });
            held_tx.send(()).unwrap();
            done_rx.recv().unwrap();
            drop(db);
        }
    });
    held_rx.recv().unwrap();
    match fixture.worker_db().await {
        Err(pgfixture::Error::AcquireTimeout { waiting_for, .. }) => {
            assert!(waiting_for.contains("free worker slot"), "{waiting_for}");
            // The one step it was on, and for how long.
            assert!(
                waiting_for.contains(", for the last ") && !waiting_for.contains("before it"),
                "{waiting_for}"
            );
        }
        other => panic!("expected an acquire timeout, got {other:?}"),
    }
    done_tx.send(()).unwrap();
    holder.join().unwrap();
    assert!(fixture.worker_db().await.is_ok(), "the slot is free again");
}

#[tokio::test]
async fn worker_id_follows_the_handle() {
    let db = pgfixture::worker_db().await.unwrap();
    assert_eq!(&pgfixture::worker_id(), db.worker_id());
}

/// Twenty consecutive tests, each in a runtime of its own as `#[tokio::test]` builds
/// them, alternating the two flavours: every one gets the same pooled connection
/// (same server pid) although the runtime that opened it is gone.
#[test]
fn pooled_connections_survive_test_runtimes() {
    let fixture = single_worker();
    let mut pids = Vec::new();
    for i in 0..20 {
        let runtime = if i % 2 == 0 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
        }
        .unwrap();
        let pid: i32 = runtime.block_on(async {
            let db = fixture.worker_db().await.unwrap();
            let pid = db
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get(0);
            db.execute("INSERT INTO notes (owner, body) VALUES ('rt', 'x')", &[])
                .await
                .unwrap();
            if i % 4 == 0 {
                db.release().await.unwrap()
            } else {
                drop(db)
            }
            pid
        });
        drop(runtime);
        pids.push(pid);
    }
    assert!(
        pids.iter().all(|p| *p == pids[0]),
        "pids changed across runtimes: {pids:?}"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let db = fixture.worker_db().await.unwrap();
        assert_eq!(count_notes(&db, "rt").await, 0);
    });
}

/// A handle dropped outside of any runtime still rolls back.
#[test]
fn drop_outside_a_runtime() {
    let fixture = single_worker();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = runtime.block_on(fixture.worker_db()).unwrap();
    runtime
        .block_on(db.execute(
            "INSERT INTO notes (owner, body) VALUES ('outside', 'x')",
            &[],
        ))
        .unwrap();
    drop(runtime);
    drop(db);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = runtime.block_on(fixture.worker_db()).unwrap();
    let n: i64 = runtime
        .block_on(db.query_one("SELECT count(*) FROM notes WHERE owner = 'outside'", &[]))
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

/// Where a connection is: the server, database and schema it reaches.
async fn whereabouts(client: &pgfixture::tokio_postgres::Client) -> (String, String, String) {
    let row = client
        .query_one(
            &format!(
                "SELECT {}, current_database()::text, current_schema()::text",
                common::SERVER_IDENTITY
            ),
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// A connection of the test's own, its task on the test's runtime; notifications and
/// notices arrive on the returned channel.
async fn own_connection(
    config: &pgfixture::tokio_postgres::Config,
) -> (
    pgfixture::tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<pgfixture::tokio_postgres::AsyncMessage>,
) {
    use futures::StreamExt;
    let (client, mut connection) = config
        .connect(pgfixture::tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            let _ = tx.send(message);
        }
    });
    (client, rx)
}

/// The handle gives the worker's connection settings (a tokio-postgres `Config`, a URL,
/// and the published loopback address): a test that needs connections of its own
/// (LISTEN/NOTIFY here) takes `worker_db()`, not `worker_pool()`, and no reset follows.
#[tokio::test]
async fn a_test_opens_connections_of_its_own_from_the_handle_settings() {
    use pgfixture::tokio_postgres::AsyncMessage;
    let fixture = common::worker_of_its_own(9);
    let db = fixture.worker_db().await.unwrap();
    let read = common::worker_pools_are_read(&db).await;
    let resets = fixture.stats().workers_reset;
    let here = whereabouts(&db).await;
    let from_url: pgfixture::tokio_postgres::Config = db.url().as_str().parse().unwrap();
    for config in [db.pg_config(), &from_url, db.published_pg_config()] {
        let (client, _) = own_connection(config).await;
        assert_eq!(whereabouts(&client).await, here, "{config:?}");
        // The fixtures are there, and the handle's uncommitted rows are not.
        let seeded: i64 = client
            .query_one("SELECT count(*) FROM users", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(seeded, 1);
    }
    let published = db.published_pg_config();
    assert!(
        published.get_hosts()
            == [pgfixture::tokio_postgres::config::Host::Tcp(
                "127.0.0.1".into()
            )],
        "{published:?}"
    );
    // LISTEN on one connection, NOTIFY from another: nothing is committed.
    let (listener, mut messages) = own_connection(db.pg_config()).await;
    listener
        .batch_execute("LISTEN pgfixture_test")
        .await
        .unwrap();
    let (notifier, _) = own_connection(db.pg_config()).await;
    notifier
        .batch_execute("NOTIFY pgfixture_test, 'hello'")
        .await
        .unwrap();
    let message = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(AsyncMessage::Notification(n)) = messages.recv().await {
                return n;
            }
        }
    })
    .await
    .expect("no notification within 10 s");
    assert_eq!(
        (message.channel(), message.payload()),
        ("pgfixture_test", "hello")
    );
    // Neither the settings nor the URL show the password.
    let shown = format!(
        "{:?} {:?} {} {:?}",
        db.pg_config(),
        db.url(),
        db.url(),
        db.published_url()
    );
    assert!(
        shown.contains("***") || !shown.contains("password="),
        "{shown}"
    );
    if let Some(password) = db.pg_config().get_password() {
        // As a URL shows it, or a key=value string (the password itself may be a word
        // the output holds anyway, such as the user's name on a server of one's own).
        let password = String::from_utf8_lossy(password);
        assert!(
            !shown.contains(&format!(":{password}@"))
                && !shown.contains(&format!("password={password}")),
            "{shown}"
        );
    }
    drop((listener, notifier));
    db.release().await.unwrap();
    // Nothing was committed: no reset, where the server lets the worker be read
    // (PostgreSQL 15 and later); before, a handle whose settings went out is followed
    // by one, since what its connections committed cannot be told.
    if read {
        assert_eq!(fixture.stats().workers_reset, resets, "no reset was needed");
    }
}

mod code_under_test {
    //! Functions written against tokio-postgres's and deadpool's types, as a project's
    //! repository layer would be.
    use pgfixture::deadpool_postgres;
    use pgfixture::tokio_postgres::{Client, Error, GenericClient, Transaction};

    pub async fn count(client: &Client, owner: &str) -> Result<i64, Error> {
        Ok(client
            .query_one("SELECT count(*) FROM notes WHERE owner = $1", &[&owner])
            .await?
            .get(0))
    }

    pub async fn insert(client: &impl GenericClient, owner: &str) -> Result<u64, Error> {
        client
            .execute(
                "INSERT INTO notes (owner, body) VALUES ($1, 'x')",
                &[&owner],
            )
            .await
    }

    pub async fn insert_in_tx(tx: &Transaction<'_>, owner: &str) -> Result<u64, Error> {
        insert(tx, owner).await
    }

    /// Opens and commits a transaction of its own.
    pub async fn transfer(client: &mut Client, owner: &str) -> Result<(), Error> {
        let tx = client.transaction().await?;
        insert(&tx, owner).await?;
        insert_in_tx(&tx, owner).await?;
        tx.commit().await
    }

    /// Opens a transaction and fails halfway: rolled back when dropped.
    pub async fn half_done(client: &mut Client, owner: &str) -> Result<(), Error> {
        let tx = client.transaction().await?;
        insert(&tx, owner).await?;
        tx.execute("SELECT 1/0", &[]).await.map(|_| ())
    }

    pub async fn pooled(client: &impl deadpool_postgres::GenericClient) -> Result<i64, Error> {
        Ok(client.query_one("SELECT 1::bigint", &[]).await?.get(0))
    }
}

/// Whether the test's transaction is still open: its transaction-local mark is there.
async fn in_test_transaction(db: &pgfixture::TestDb) -> bool {
    db.query_one(
        "SELECT coalesce(current_setting('pgfixture.test', true), '') = 'open'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Code written against `&Client`, `&mut Client`, `&Transaction<'_>` and
/// `impl GenericClient` takes the handle; the transactions it opens and commits are
/// savepoints, so the test's transaction (and the next test) are kept.
#[tokio::test]
async fn code_written_against_tokio_postgres_takes_the_handle() {
    use code_under_test::*;
    let fixture = single_worker();
    let leaks = fixture.stats().commit_leaks;
    let mut db = fixture.worker_db().await.unwrap();
    insert(db.client(), "generic").await.unwrap();
    assert_eq!(count(&db, "generic").await.unwrap(), 1);
    assert_eq!(pooled(&*db).await.unwrap(), 1);

    transfer(&mut db, "transfer").await.unwrap();
    transfer(db.client_mut(), "transfer").await.unwrap();
    assert_eq!(count(&db, "transfer").await.unwrap(), 4);
    assert!(
        in_test_transaction(&db).await,
        "the code's COMMIT ended the test's transaction"
    );

    assert!(half_done(&mut db, "half").await.is_err());
    assert_eq!(
        count(&db, "half").await.unwrap(),
        0,
        "the failed transaction was rolled back"
    );
    assert!(in_test_transaction(&db).await);

    // BEGIN and COMMIT sent alone are savepoints too.
    db.batch_execute("BEGIN").await.unwrap();
    insert(db.client(), "raw").await.unwrap();
    db.batch_execute("COMMIT").await.unwrap();
    db.batch_execute("START TRANSACTION").await.unwrap();
    insert(db.client(), "raw").await.unwrap();
    db.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(count(&db, "raw").await.unwrap(), 1);
    assert!(in_test_transaction(&db).await);

    // The nested transaction is tokio-postgres's own type, with all it offers.
    let mut tx = db.transaction().await.unwrap();
    insert_in_tx(&tx, "nested").await.unwrap();
    let statement = tx
        .prepare("SELECT owner FROM notes WHERE owner = $1")
        .await
        .unwrap();
    let portal = tx.bind(&statement, &[&"nested"]).await.unwrap();
    assert_eq!(tx.query_portal(&portal, 10).await.unwrap().len(), 1);
    {
        let inner = tx.savepoint("named").await.unwrap();
        insert(&inner, "nested").await.unwrap();
        inner.rollback().await.unwrap();
    }
    tx.commit().await.unwrap();
    assert_eq!(count(&db, "nested").await.unwrap(), 1);
    {
        let tx = db.transaction().await.unwrap();
        insert(&tx, "dropped").await.unwrap();
    }
    assert_eq!(count(&db, "dropped").await.unwrap(), 0);
    drop(db);

    // Nothing of it reached the next test, and nothing was taken for a commit.
    let db = fixture.worker_db().await.unwrap();
    for owner in ["generic", "transfer", "raw", "nested"] {
        assert_eq!(count(&db, owner).await.unwrap(), 0, "{owner} leaked");
    }
    drop(db);
    assert_eq!(
        fixture.stats().commit_leaks,
        leaks,
        "a savepoint was taken for a commit"
    );
}

/// A nested transaction's isolation level applies to the test's transaction, which
/// PostgreSQL allows as the test's first statement (also for the first test of a
/// nextest process, whose worker check runs on the same connection).
#[tokio::test]
async fn a_nested_transaction_sets_the_isolation_level_first() {
    use pgfixture::tokio_postgres::IsolationLevel;
    let mut db = pgfixture::worker_db().await.unwrap();
    let tx = db
        .build_transaction()
        .isolation_level(IsolationLevel::Serializable)
        .start()
        .await
        .unwrap();
    let level: String = tx
        .query_one("SHOW transaction_isolation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(level, "serializable");
    tx.commit().await.unwrap();
    assert!(in_test_transaction(&db).await);
}

/// The handle's cancel token reaches the server (the driver's own does not know the
/// address of a connection pgfixture opened).
#[tokio::test]
async fn a_running_query_is_cancelled_through_the_handle() {
    let db = pgfixture::worker_db().await.unwrap();
    let token = db.cancel_token();
    let cancel = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token
            .cancel_query(pgfixture::tokio_postgres::NoTls)
            .await
            .unwrap();
    });
    let error = db.execute("SELECT pg_sleep(30)", &[]).await.unwrap_err();
    assert_eq!(
        error.code(),
        Some(&pgfixture::tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{error}"
    );
    cancel.await.unwrap();
    db.release().await.unwrap();
}

async fn backend_pid(db: &pgfixture::TestDb) -> i32 {
    db.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// What survives a rollback on a pooled connection never reaches the next test: a
/// statement prepared with SQL `PREPARE`, a session advisory lock, the sequences'
/// `currval`. The driver's own cached statements stay usable.
#[tokio::test]
async fn session_state_never_crosses_tests() {
    let fixture = common::worker_of_its_own(10);
    let db = fixture.worker_db().await.unwrap();
    let first = backend_pid(&db).await;
    db.batch_execute(
        "PREPARE mine AS SELECT 1; SELECT pg_advisory_lock(4242); SELECT nextval('notes_id_seq')",
    )
    .await
    .unwrap();
    let cached = db.prepare_cached("SELECT 2::int").await.unwrap();
    db.query_one(&cached, &[]).await.unwrap();
    drop(db);

    let db = fixture.worker_db().await.unwrap();
    assert_eq!(
        backend_pid(&db).await,
        first,
        "the next test got another connection"
    );
    db.batch_execute("PREPARE mine AS SELECT 2")
        .await
        .expect("the last test's prepared statement is still there");
    let (other, _) = own_connection(db.pg_config()).await;
    let free: bool = other
        .query_one("SELECT pg_try_advisory_lock(4242)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(free, "the last test's session advisory lock is still held");
    other
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .await
        .unwrap();
    let currval = db.try_query("SELECT currval('notes_id_seq')", &[]).await;
    assert!(currval.is_err(), "the last test's currval is still defined");
    let cached = db.prepare_cached("SELECT 2::int").await.unwrap();
    let two: i32 = db.query_one(&cached, &[]).await.unwrap().get(0);
    assert_eq!(two, 2, "the driver's cached statement was lost");
}

/// A transaction per test changes two things that have one-call remedies: deferred
/// constraints are checked on demand, and an expected error runs in a savepoint.
#[tokio::test]
async fn deferred_constraints_and_expected_errors_have_one_call_remedies() {
    use pgfixture::tokio_postgres::error::SqlState;
    let db = pgfixture::worker_db().await.unwrap();
    db.batch_execute(
        "CREATE TEMP TABLE parent (id int PRIMARY KEY); \
         CREATE TEMP TABLE child (p int REFERENCES parent DEFERRABLE INITIALLY DEFERRED)",
    )
    .await
    .unwrap();
    db.execute("INSERT INTO child VALUES (1)", &[])
        .await
        .unwrap();
    let error = db.check_deferred_constraints().await.unwrap_err();
    assert_eq!(
        error.code(),
        Some(&SqlState::FOREIGN_KEY_VIOLATION),
        "{error}"
    );
    // The transaction goes on, the constraint still deferred.
    db.execute("INSERT INTO child VALUES (2)", &[])
        .await
        .unwrap();
    db.execute("INSERT INTO parent VALUES (1), (2)", &[])
        .await
        .unwrap();
    db.check_deferred_constraints().await.unwrap();
    db.execute("INSERT INTO child VALUES (3)", &[])
        .await
        .unwrap();

    let error = db
        .try_execute("INSERT INTO users (email) VALUES ('seed@example.com')", &[])
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::UNIQUE_VIOLATION), "{error}");
    assert!(db.try_batch_execute("SELECT 1/0").await.is_err());
    let users: i64 = db
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("the expected error aborted the test's transaction")
        .get(0);
    assert_eq!(users, 1);
    assert_eq!(db.try_query("SELECT 1", &[]).await.unwrap().len(), 1);
    db.release().await.unwrap();
}

/// Sequences restart at the values the fixtures left: on demand, or as every test
/// begins with `reset_sequences` (`PGFIXTURE_RESET_SEQUENCES=1`); without it, ids go
/// on from test to test. In schema mode on a server of the user's, which keeps no
/// record of the values, both ways are refused by the variable to change.
#[tokio::test]
async fn sequences_restart_at_the_fixtures_values() {
    async fn ids(db: &pgfixture::TestDb) -> (i64, i64) {
        let user: i64 = db
            .query_one(
                "INSERT INTO users (email) VALUES ('seq@example.com') RETURNING id",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let note: i64 = db
            .query_one(
                "INSERT INTO notes (owner, body) VALUES ('seq', 'x') RETURNING id",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (user, note)
    }
    let fixture = single_worker();
    let mut without = Vec::new();
    for _ in 0..2 {
        let db = fixture.worker_db().await.unwrap();
        without.push(ids(&db).await);
    }
    assert!(
        without[1] > without[0],
        "sequences are not rolled back: {without:?}"
    );
    if common::schema_mode_on_a_url_server() {
        let db = fixture.worker_db().await.unwrap();
        let refused = db.reset_sequences().await;
        assert!(
            matches!(
                &refused,
                Err(pgfixture::Error::Config {
                    var: "PGFIXTURE_URL",
                    ..
                })
            ),
            "{refused:?}"
        );
        common::assert_sequence_restarts_refused();
        return;
    }
    for _ in 0..3 {
        let db = fixture.worker_db().await.unwrap();
        db.reset_sequences().await.unwrap();
        // The fixtures' one user took id 1; no note was seeded.
        assert_eq!(ids(&db).await, (2, 1));
    }
    let every = Fixture::builder()
        .workers(1)
        .reset_sequences(true)
        .build()
        .unwrap();
    for _ in 0..3 {
        let db = every.worker_db().await.unwrap();
        assert_eq!(ids(&db).await, (2, 1));
    }
}

/// Tests whose clock is paused (`start_paused`, `tokio::time::pause()`): the clock
/// jumps to the next timer while the test waits on the server, yet the handles'
/// rollbacks and the worker pool's clearing do not time out (pgfixture's timers run on
/// a clock of its own then). The same backend serves every test, and no worker is
/// rebuilt.
#[test]
fn a_paused_clock_times_out_nothing() {
    // A configuration of its own: no other test's reset counts.
    let fixture = Fixture::builder()
        .workers(1)
        .pool_size(8)
        .build()
        .expect("fixture");
    let read = common::paused_runtime().block_on(async {
        common::worker_pools_are_read(&fixture.worker_db().await.unwrap()).await
    });
    let mut pids = std::collections::BTreeSet::new();
    for round in 0..10 {
        common::paused_runtime().block_on(async {
            let db = fixture.worker_db().await.unwrap();
            common::an_hour_passes_at_once().await;
            let row = db
                .query_one("SELECT pg_backend_pid(), pg_sleep(0.01)::text", &[])
                .await
                .unwrap();
            pids.insert(row.get::<_, i32>(0));
            if round % 2 == 0 {
                db.release().await.unwrap();
            }
        });
    }
    assert_eq!(pids.len(), 1, "new backends: {pids:?}");
    for _ in 0..5 {
        common::paused_runtime().block_on(async {
            let pool = fixture.worker_pool().await.unwrap();
            let client = pool.get().await.unwrap();
            client.batch_execute("SELECT pg_sleep(0.01)").await.unwrap();
            drop(client);
            common::an_hour_passes_at_once().await;
            pool.release().await.unwrap();
        });
    }
    // Before PostgreSQL 15 a worker pool cannot be read: a rebuild after each.
    let stats = fixture.stats();
    assert_eq!(stats.workers_reset, if read { 0 } else { 5 }, "{stats:?}");
}
