//! Tests that commit anyway, and the worker pool for code that must commit: the next
//! test on the worker never sees what they wrote, in this process or the next one.
//! Runs on the backend and isolation mode the environment selects.

use std::time::Duration;

mod common;

use common::unique_run;
use pgfixture::tokio_postgres::NoTls;
use pgfixture::{Fixture, TestDb};

/// One in-process worker, so that the next handle is on the same worker, and the
/// [`SERIAL`] lock, so that the counts in [`Fixture::stats`] are the caller's own.
async fn single_worker() -> (tokio::sync::MutexGuard<'static, ()>, Fixture) {
    let serial = SERIAL.lock().await;
    (
        serial,
        Fixture::builder().workers(1).build().expect("fixture"),
    )
}

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn count(db: &TestDb, owner: &str) -> i64 {
    db.query_one("SELECT count(*) FROM notes WHERE owner = $1", &[&owner])
        .await
        .unwrap()
        .get(0)
}

/// Inserts a note of `owner`, lets `commit` end the test's transaction its way, drops
/// the handle, and checks that the next test sees neither the note nor a missing seed.
async fn leaks_nothing(owner: &str, commit: &str) {
    let (_serial, fixture) = single_worker().await;
    let before = fixture.stats();
    let db = fixture.worker_db().await.unwrap();
    let insert = format!("INSERT INTO notes (owner, body) VALUES ('{owner}', 'x')");
    db.batch_execute(&insert).await.unwrap();
    db.batch_execute(&commit.replace("$INSERT", &insert))
        .await
        .unwrap();
    drop(db);
    let after = fixture.stats();
    assert_eq!(
        after.commit_leaks,
        before.commit_leaks + 1,
        "the commit by {commit:?} was not detected"
    );
    assert!(after.workers_reset > before.workers_reset);

    let db = fixture.worker_db().await.unwrap();
    assert_eq!(
        count(&db, owner).await,
        0,
        "{commit:?} leaked into the next test"
    );
    let seeded: i64 = db
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seeded, 1, "the reset worker lost its fixtures");
}

#[tokio::test]
async fn commit_through_batch_execute_is_undone() {
    leaks_nothing("commit", "COMMIT").await;
}

#[tokio::test]
async fn end_is_undone() {
    leaks_nothing("end", "END").await;
}

#[tokio::test]
async fn a_begin_commit_pair_of_the_test_is_undone() {
    leaks_nothing("pair", "BEGIN; $INSERT; COMMIT").await;
}

#[tokio::test]
async fn rollback_then_autocommit_is_undone() {
    leaks_nothing("autocommit", "ROLLBACK; $INSERT").await;
}

#[tokio::test]
async fn commit_then_begin_is_undone() {
    leaks_nothing("reopened", "COMMIT; BEGIN").await;
}

#[tokio::test]
async fn release_after_a_commit_resets_too() {
    let (_serial, fixture) = single_worker().await;
    let db = fixture.worker_db().await.unwrap();
    db.batch_execute("INSERT INTO notes (owner, body) VALUES ('released', 'x'); COMMIT")
        .await
        .unwrap();
    db.release().await.expect("the reset succeeds");
    let db = fixture.worker_db().await.unwrap();
    assert_eq!(count(&db, "released").await, 0);
}

/// A test whose connection died after it committed (here it ends its own backend; a
/// server's `idle_in_transaction_session_timeout` would do the same) ends without an
/// error, and its commit does not reach the next test: whether the test committed
/// cannot be read any more, so the worker is rebuilt.
#[tokio::test]
async fn a_test_whose_connection_died_after_a_commit_leaks_nothing() {
    let (_serial, fixture) = single_worker().await;
    let before = fixture.stats();
    let db = fixture.worker_db().await.unwrap();
    db.batch_execute("COMMIT; INSERT INTO notes (owner, body) VALUES ('killed', 'x')")
        .await
        .unwrap();
    let killed = db
        .batch_execute("SELECT pg_terminate_backend(pg_backend_pid())")
        .await;
    assert!(killed.is_err(), "the backend outlived its termination");
    db.release()
        .await
        .expect("a connection that died is the test's own doing, not a failure");
    assert!(fixture.stats().workers_reset > before.workers_reset);
    let db = fixture.worker_db().await.unwrap();
    assert_eq!(count(&db, "killed").await, 0, "the commit leaked");
}

#[tokio::test]
async fn tests_that_do_not_commit_cost_no_reset() {
    let (_serial, fixture) = single_worker().await;
    let before = fixture.stats();
    let mut db = fixture.worker_db().await.unwrap();
    db.batch_execute("INSERT INTO notes (owner, body) VALUES ('plain', 'x')")
        .await
        .unwrap();
    let savepoint = db.transaction().await.unwrap();
    savepoint.commit().await.unwrap();
    drop(db);
    // A failed statement leaves the transaction aborted, which is still not a commit.
    let db = fixture.worker_db().await.unwrap();
    assert!(
        db.batch_execute("SELECT * FROM no_such_table")
            .await
            .is_err()
    );
    drop(db);
    let after = fixture.stats();
    assert_eq!(after.commit_leaks, before.commit_leaks);
    assert_eq!(after.workers_reset, before.workers_reset);
}

#[tokio::test]
async fn the_worker_pool_commits_for_real_and_is_reset_after() {
    let (_serial, fixture) = single_worker().await;
    let pool = fixture.worker_pool().await.unwrap();
    let writer = pool.get().await.unwrap();
    let reader = pool.get().await.unwrap();
    writer
        .batch_execute("INSERT INTO notes (owner, body) VALUES ('pool', 'x')")
        .await
        .unwrap();
    let seen: i64 = reader
        .query_one("SELECT count(*) FROM notes WHERE owner = 'pool'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        seen, 1,
        "a commit on one pooled connection is seen by another"
    );

    // Concurrent transactions: the reader's snapshot does not see an open write.
    writer
        .batch_execute("BEGIN; INSERT INTO notes (owner, body) VALUES ('pool', 'y')")
        .await
        .unwrap();
    let seen: i64 = reader
        .query_one("SELECT count(*) FROM notes WHERE owner = 'pool'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 1);
    writer.batch_execute("COMMIT").await.unwrap();
    drop((writer, reader));
    drop(pool);

    let db = fixture.worker_db().await.unwrap();
    assert_eq!(
        count(&db, "pool").await,
        0,
        "the worker pool's commits leaked"
    );
}

/// A worker pool whose release fails reports the error, and the next test on the
/// worker still finds it as the fixtures left it: rebuilt, not taken as it was. The
/// release is made to fail for real: the table of recorded rows it reads the fixtures'
/// rows back from is broken first (a column renamed) on a server of the test's own
/// (database and container modes).
#[tokio::test]
async fn a_worker_pool_whose_release_fails_leaks_nothing() {
    let mut config = common::own_config("relfail", Duration::from_secs(2));
    if config.url.take().is_some() {
        // A server of its own: the store of a server of the user's is every test's.
        config.backend = pgfixture::Backend::Local;
    }
    let fixture = Fixture::builder()
        .config(config)
        .workers(1)
        .build()
        .unwrap();
    let read = common::worker_pools_are_read(&fixture.worker_db().await.unwrap()).await;
    let pool = fixture.worker_pool().await.unwrap();
    pool.get()
        .await
        .unwrap()
        .batch_execute(
            "UPDATE users SET email = 'changed@example.com'; \
             INSERT INTO notes (owner, body) VALUES ('pool', 'x')",
        )
        .await
        .unwrap();
    // The store is in the maintenance database (templates) or in the database of the
    // worker schemas: broken in both.
    let mut pg = pool.pg_config().clone();
    for dbname in [pg.get_dbname().unwrap().to_owned(), "postgres".to_owned()] {
        let (admin, connection) = pg.dbname(&dbname).connect(NoTls).await.unwrap();
        tokio::spawn(connection);
        admin
            .batch_execute(
                "ALTER TABLE IF EXISTS public.pgfixture_pristine RENAME COLUMN rows TO broken",
            )
            .await
            .unwrap();
    }
    let released = pool.release().await;
    if fixture.config().isolation == pgfixture::Isolation::Schema || !read {
        // The break is DDL in the database of the worker schemas, which rebuilds the
        // worker schema at once, without reading the store; before PostgreSQL 15 every
        // worker pool is followed by a rebuild.
        released.unwrap();
    } else {
        let error = released.expect_err("the release reads the broken table");
        assert!(error.to_string().contains("pgfixture_pristine"), "{error}");
    }

    let db = fixture.worker_db().await.unwrap();
    assert_eq!(count(&db, "pool").await, 0, "the worker pool's row leaked");
    let email: String = db
        .query_one("SELECT email FROM users WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(email, "seed@example.com", "the worker pool's update leaked");
}

#[tokio::test]
async fn listen_notify_works_on_the_worker_pool() {
    use futures::StreamExt;
    let (_serial, fixture) = single_worker().await;
    let pool = fixture.worker_pool().await.unwrap();
    // A dedicated connection whose notifications we read, as code under test would.
    let (client, mut connection) = pool
        .pg_config()
        .connect(pgfixture::tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    tokio::spawn(stream.for_each(move |m| {
        let _ = tx.send(m);
        async {}
    }));
    client.batch_execute("LISTEN pgfixture_test").await.unwrap();
    pool.get()
        .await
        .unwrap()
        .batch_execute("NOTIFY pgfixture_test, 'hello'")
        .await
        .unwrap();
    let message = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a notification arrives")
        .unwrap()
        .unwrap();
    match message {
        pgfixture::tokio_postgres::AsyncMessage::Notification(n) => {
            assert_eq!(n.payload(), "hello");
        }
        other => panic!("expected a notification, got {other:?}"),
    }
    drop(client);
    pool.release().await.unwrap();
}

/// Run by the tests below in a child process: `commit` commits a note and exits
/// normally; `pool` commits a note through the worker pool, says so, and waits to be
/// killed; `unmark` leaves the worker as a pgfixture from before the database-level
/// mark did (its comment alone); `count` reports the notes of `commit` and `pool`, the
/// resets it made, and the mark its connection was started with.
#[test]
#[ignore = "helper, run as a child process by the commit tests"]
fn child() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        match std::env::var("PGFIXTURE_TEST_CHILD").unwrap().as_str() {
            "commit" => {
                let db = pgfixture::worker_db().await.unwrap();
                db.batch_execute("INSERT INTO notes (owner, body) VALUES ('child', 'x'); COMMIT")
                    .await
                    .unwrap();
            }
            "pool" => {
                let pool = pgfixture::worker_pool().await.unwrap();
                pool.get()
                    .await
                    .unwrap()
                    .batch_execute("INSERT INTO notes (owner, body) VALUES ('killed', 'x')")
                    .await
                    .unwrap();
                println!("CHILD-COMMITTED");
                tokio::time::sleep(Duration::from_secs(120)).await;
            }
            "unmark" => {
                let pool = pgfixture::worker_pool().await.unwrap();
                let (database, setting): (String, String) = pool
                    .get()
                    .await
                    .unwrap()
                    .query_one(&format!("SELECT current_database(), {MARK_SETTING}"), &[])
                    .await
                    .map(|row| (row.get(0), row.get(1)))
                    .unwrap();
                let mut admin = pool.pg_config().clone();
                admin.dbname("postgres");
                // The reset leaves a fresh worker, marked clean both ways.
                pool.release().await.unwrap();
                let (admin, connection) = admin.connect(NoTls).await.unwrap();
                tokio::spawn(connection);
                admin
                    .batch_execute(&format!(
                        "ALTER DATABASE \"{database}\" RESET \"{setting}\""
                    ))
                    .await
                    .unwrap();
            }
            "count" => {
                let db = pgfixture::worker_db().await.unwrap();
                let row = db
                    .query_one(
                        &format!(
                            "SELECT count(*), length(coalesce(current_setting({MARK_SETTING}, true), '')) \
                             FROM notes WHERE owner IN ('child', 'killed')"
                        ),
                        &[],
                    )
                    .await
                    .unwrap();
                let (n, mark): (i64, i32) = (row.get(0), row.get(1));
                let stats = pgfixture::Fixture::from_env().unwrap().stats();
                println!(
                    "CHILD-COUNT notes={n} reset={} mark={mark}",
                    stats.workers_reset
                );
            }
            other => panic!("unknown child mode {other}"),
        }
    });
}

/// The name of the setting that holds the worker's mark, as SQL: one per worker schema
/// in schema mode.
const MARK_SETTING: &str = "CASE WHEN current_schema() = 'public' \
     THEN 'pgfixture.mark' ELSE 'pgfixture.mark_' || current_schema() END";

fn child_env<'a>(run: &'a str, mode: &'a str) -> [(&'a str, &'a str); 4] {
    [
        ("PGFIXTURE_RUN_ID", run),
        ("PGFIXTURE_WORKER", "leak"),
        ("PGFIXTURE_GRACE", "5"),
        ("PGFIXTURE_TEST_CHILD", mode),
    ]
}

/// Runs the child in `mode` on `run`'s worker; fails the test, with the child's output,
/// unless it succeeded. Returns its stdout and stderr.
fn child_ok(run: &str, mode: &str) -> (String, String) {
    common::run_child_ok(&child_env(run, mode))
}

/// The notes the `count` child saw and the resets it made.
fn counted(run: &str) -> (u64, u64) {
    let (notes, reset, _) = counted_with_mark(run);
    (notes, reset)
}

/// [`counted`], and the length of the mark its connection was started with.
fn counted_with_mark(run: &str) -> (u64, u64, u64) {
    let (stdout, _) = child_ok(run, "count");
    (
        common::reported(&stdout, "notes"),
        common::reported(&stdout, "reset"),
        common::reported(&stdout, "mark"),
    )
}

/// The nextest case: the process that committed exits right after its test, and the
/// next test on its worker is another process.
#[test]
fn a_commit_does_not_reach_the_next_process_on_the_worker() {
    let run = unique_run("commit");
    let (_, stderr) = child_ok(&run, "commit");
    assert!(
        stderr.contains("committed its transaction") && stderr.contains("child"),
        "the commit is reported once, with the test: {stderr}"
    );
    assert_eq!(counted(&run), (0, 0));
}

/// A process killed while its worker pool is out leaves the worker marked; the next
/// process on the worker resets it before its test runs. The killed process found the
/// worker ready, as nextest's processes do, on a connection it had to set aside.
#[test]
fn a_process_killed_with_its_worker_pool_out_leaves_a_clean_worker() {
    let run = unique_run("poolkill");
    assert_eq!(counted(&run), (0, 0));
    common::kill_child_after(&child_env(&run, "pool"), "CHILD-COMMITTED");
    assert_eq!(
        counted(&run),
        (0, 1),
        "the next process resets the marked worker"
    );
}

/// A worker marked by its comment alone (as a pgfixture from before the database-level
/// mark left it on a reused server) is clean, not dirty: the next process uses it without
/// a reset and marks it again, so that the processes after it find it ready on their
/// first connection.
#[test]
fn a_worker_marked_by_its_comment_alone_is_used_and_marked_again() {
    let run = unique_run("unmark");
    child_ok(&run, "unmark");
    let (notes, reset, mark) = counted_with_mark(&run);
    assert_eq!((notes, reset), (0, 0));
    if std::env::var_os("PGFIXTURE_URL").is_some() {
        // A server of the user's gets no settings (README, "An existing server").
        assert_eq!(mark, 0, "a server of the user's got the mark's setting");
    } else {
        assert!(mark > 0, "the worker carries its mark's setting again");
    }
}

/// The worker as the fixtures made it, in one row: seed rows, and no trace of the
/// changes [`a_worker_pool_that_changes_nothing_needs_no_reset`] makes.
async fn pristine(db: &TestDb) -> String {
    db.query_one(
        "SELECT concat_ws(' ', \
           (SELECT count(*) FROM users), (SELECT count(*) FROM notes), \
           to_regclass('pooled_table') IS NULL, to_regproc('pooled_f') IS NULL, \
           (SELECT count(*) FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = 'notes'), \
           (SELECT count(*) FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'notes'), \
           coalesce(obj_description('notes'::regclass, 'pg_class'), '-'), current_setting('work_mem'), \
           (SELECT md5(string_agg((u.id, u.email)::text, ',' ORDER BY u.id)) FROM users u), \
           (SELECT md5(coalesce(string_agg(n::text, ',' ORDER BY n.id), '')) FROM notes n))",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// A connection of the test's own still open when its worker pool is released (a
/// task of the test's holds it, or a pool closed but not all its connections, as sqlx
/// 0.8's `close()` can leave) is ended then: its backend is terminated, what it left
/// open is rolled back, and what it committed is put back in place as any row, without
/// waiting for it or rebuilding the worker (before PostgreSQL 15, whose worker pools
/// are always followed by a rebuild, it is ended all the same: in schema mode the
/// rebuild would leave it open on the next test's schema).
#[tokio::test]
async fn a_connection_of_its_own_left_open_is_ended_at_release() {
    let (_serial, fixture) = single_worker().await;
    let db = fixture.worker_db().await.unwrap();
    let read = common::worker_pools_are_read(&db).await;
    drop(db);

    let before = fixture.stats();
    let pool = fixture.worker_pool().await.unwrap();
    let (own, connection) = pool.pg_config().connect(NoTls).await.unwrap();
    let task = tokio::spawn(connection);
    own.batch_execute(
        "INSERT INTO notes (owner, body) VALUES ('left open', 'committed'); \
         BEGIN; INSERT INTO notes (owner, body) VALUES ('left open', 'open')",
    )
    .await
    .unwrap();
    // The connection is still open, and its transaction too.
    pool.release().await.unwrap();
    assert!(
        own.simple_query("SELECT 1").await.is_err(),
        "the connection left open still answers"
    );
    let _ = task.await.unwrap();
    let after = fixture.stats();
    if read {
        assert_eq!(
            after.workers_reset, before.workers_reset,
            "the worker was rebuilt: the connection was waited for, not ended"
        );
        assert_eq!(after.pools_restored, before.pools_restored + 1);
    }
    let db = fixture.worker_db().await.unwrap();
    assert_eq!(
        count(&db, "left open").await,
        0,
        "its rows reached the next test"
    );
}

/// [`single_worker`], whether its worker can be read ([`common::worker_pools_are_read`]),
/// and the worker as the fixtures made it ([`pristine`]).
async fn single_worker_as_built() -> (tokio::sync::MutexGuard<'static, ()>, Fixture, bool, String) {
    let (serial, fixture) = single_worker().await;
    let db = fixture.worker_db().await.unwrap();
    let read = common::worker_pools_are_read(&db).await;
    let clean = pristine(&db).await;
    drop(db);
    (serial, fixture, read, clean)
}

/// A connection the test opens itself from its handle's settings is not inside the
/// test's transaction: what it commits is put back at the handle's release (rows only:
/// no rebuild, where the server lets the worker be read), and one it leaves open is
/// ended, its open transaction rolled back, before the worker goes to the next test.
#[tokio::test]
async fn what_a_connection_of_the_tests_own_commits_is_put_back() {
    let (_serial, fixture, read, clean) = single_worker_as_built().await;

    let before = fixture.stats();
    let db = fixture.worker_db().await.unwrap();
    db.batch_execute("INSERT INTO notes (owner, body) VALUES ('handle', 'rolled back')")
        .await
        .unwrap();
    let (own, connection) = db.pg_config().connect(NoTls).await.unwrap();
    let task = tokio::spawn(connection);
    own.batch_execute(
        "INSERT INTO notes (owner, body) VALUES ('own', 'committed'); \
         UPDATE users SET email = email || '.own'; \
         BEGIN; INSERT INTO notes (owner, body) VALUES ('own', 'open')",
    )
    .await
    .unwrap();
    drop(db);
    assert!(
        own.simple_query("SELECT 1").await.is_err(),
        "the connection left open still answers"
    );
    let _ = task.await.unwrap();
    let after = fixture.stats();
    assert_eq!(after.handed_checked, before.handed_checked + 1);
    assert_eq!(after.commit_leaks, before.commit_leaks);
    if read {
        assert_eq!(
            after.workers_reset, before.workers_reset,
            "rows alone rebuilt the worker"
        );
        assert_eq!(after.handed_restored, before.handed_restored + 1);
    }
    let db = fixture.worker_db().await.unwrap();
    assert_eq!(
        pristine(&db).await,
        clean,
        "its changes reached the next test"
    );
    assert_eq!(count(&db, "handle").await, 0);
}

/// DDL through a connection of the test's own (here opened from the URL) rebuilds the
/// worker; settings handed out and never used cost a reading, not a reset or a
/// restore, whatever the handle itself wrote (its counts reach the server only as it
/// rolls back, after the reading).
#[tokio::test]
async fn ddl_of_a_connection_of_the_tests_own_rebuilds_and_an_unused_one_costs_nothing() {
    let (_serial, fixture, read, clean) = single_worker_as_built().await;

    let before = fixture.stats();
    let db = fixture.worker_db().await.unwrap();
    let (own, connection) = pgfixture::tokio_postgres::connect(db.url().as_str(), NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(connection);
    own.batch_execute("ALTER TABLE notes ADD COLUMN own_column int")
        .await
        .unwrap();
    drop(own);
    let _ = task.await.unwrap();
    drop(db);
    let after = fixture.stats();
    assert_eq!(after.handed_checked, before.handed_checked + 1);
    assert_eq!(after.workers_reset, before.workers_reset + 1);

    let db = fixture.worker_db().await.unwrap();
    assert_eq!(
        pristine(&db).await,
        clean,
        "its column reached the next test"
    );
    db.batch_execute("INSERT INTO notes (owner, body) VALUES ('handle', 'rolled back')")
        .await
        .unwrap();
    let before = fixture.stats();
    let _ = (db.url(), db.pg_config(), db.published_url());
    db.release().await.unwrap();
    let after = fixture.stats();
    assert_eq!(after.handed_checked, before.handed_checked + 1);
    if read {
        assert_eq!(after.workers_reset, before.workers_reset);
        assert_eq!(after.handed_restored, before.handed_restored);
    }
    let db = fixture.worker_db().await.unwrap();
    assert_eq!(count(&db, "handle").await, 0);
}

/// A client of the worker pool that a task of the test still holds when the test ends
/// (an application's background job) means a reset, and is ended first: its open
/// transaction is rolled back, and it cannot write after its test, into the worker's
/// successor (in schema mode the successor takes the worker's name, and the held
/// connection's `search_path` would reach it).
#[tokio::test]
async fn a_pooled_client_a_task_still_holds_is_ended_at_release() {
    let (_serial, fixture) = single_worker().await;
    let pool = fixture.worker_pool().await.unwrap();
    let (go, later) = tokio::sync::oneshot::channel::<()>();
    let (held, ready) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn({
        let pool = (*pool).clone();
        async move {
            let client = pool.get().await.unwrap();
            client
                .batch_execute(
                    "INSERT INTO notes (owner, body) VALUES ('held client', 'committed'); \
                     BEGIN; INSERT INTO notes (owner, body) VALUES ('held client', 'open')",
                )
                .await
                .unwrap();
            held.send(()).unwrap();
            let _ = later.await;
            client
                .batch_execute(
                    "COMMIT; INSERT INTO notes (owner, body) VALUES ('held client', 'after the test')",
                )
                .await
        }
    });
    ready.await.unwrap();
    let resets = fixture.stats().workers_reset;
    pool.release().await.unwrap();
    assert_eq!(fixture.stats().workers_reset, resets + 1);
    go.send(()).unwrap();
    assert!(
        task.await.unwrap().is_err(),
        "the held client still wrote after its test"
    );
    let db = fixture.worker_db().await.unwrap();
    assert_eq!(
        count(&db, "held client").await,
        0,
        "the held client's rows reached the next test"
    );
}

/// A worker schema built from the fixtures has its rows' statistics in place as soon
/// as it is ready. Arriving later (a backend sends them at most once a second, or ten
/// seconds later when it stays idle), they would show in the first worker pool's
/// reading as a change the test never made, which costs a restore.
#[tokio::test]
async fn a_worker_schema_just_built_has_its_statistics_in_place() {
    let fixture = Fixture::builder()
        .workers(1)
        .pool_size(13)
        .build()
        .expect("fixture");
    let db = fixture.worker_db().await.unwrap();
    let (schema_mode, flushes): (bool, bool) = {
        let row = db
            .query_one(
                "SELECT current_schema() <> 'public', \
                        current_setting('server_version_num')::int >= 150000",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    if !(schema_mode && flushes) {
        // A database clone's tables start with no statistics of their own; before
        // PostgreSQL 15 a worker pool is never read.
        return;
    }
    let (rows, inserted): (i64, i64) = {
        let row = db
            .query_one(
                "SELECT (SELECT count(*) FROM users), \
                        pg_stat_get_tuples_inserted('users'::regclass)",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(rows > 0, "the fixtures seed users");
    assert!(
        inserted >= rows,
        "{inserted} of the {rows} rows the build inserted reached the statistics"
    );
}

/// Whether the worker's next spare (`<worker>_spare`, a schema or a database) is ready
/// and the one it replaced (`<worker>_old`) gone: the work a reset leaves to the
/// background.
async fn spare_made(client: &pgfixture::tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT (EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = current_schema() || '_spare') \
                     OR EXISTS (SELECT 1 FROM pg_database WHERE datname = current_database() || '_spare')) \
                AND NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = current_schema() || '_old') \
                AND NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = current_database() || '_old')",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// A worker pool taken right after a reset, while the next spare is made in the
/// background, is read as any other: the spare's making does not touch what the
/// reading of the worker compares (in schema mode it once forgot the worker's rows of
/// the DDL log, and the worker was rebuilt), so its rows are put back in place.
#[tokio::test]
async fn a_spare_made_while_a_worker_pool_is_out_leaves_its_reading_alone() {
    let (_serial, fixture) = single_worker().await;
    let db = fixture.worker_db().await.unwrap();
    let read = common::worker_pools_are_read(&db).await;
    drop(db);
    // A server of the user's gets no spares: nothing to wait for.
    let spares = fixture.config().url.is_none();
    // Two resets by DDL: the second puts the spare the first made in the worker's
    // place, and starts making the next one.
    for round in 0..2 {
        let pool = fixture.worker_pool().await.unwrap();
        let client = pool.get().await.unwrap();
        client
            .batch_execute("CREATE TABLE spare_race (x int)")
            .await
            .unwrap();
        drop(client);
        pool.release().await.unwrap();
        if round == 0 && spares {
            let db = fixture.worker_db().await.unwrap();
            for _ in 0..500 {
                if spare_made(&db).await {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    let before = fixture.stats();
    let pool = fixture.worker_pool().await.unwrap();
    let client = pool.get().await.unwrap();
    // Held until the spare is made.
    for _ in 0..500 {
        if !spares || spare_made(&client).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client
        .batch_execute("INSERT INTO notes (owner, body) VALUES ('spare race', 'x')")
        .await
        .unwrap();
    drop(client);
    pool.release().await.unwrap();
    let after = fixture.stats();
    if read {
        assert_eq!(
            after.workers_reset, before.workers_reset,
            "the worker was rebuilt after rows only"
        );
        assert_eq!(after.pools_restored, before.pools_restored + 1);
    }
    let db = fixture.worker_db().await.unwrap();
    assert_eq!(count(&db, "spare race").await, 0);
}

/// Worker pools of two configurations whose workers share an id (worker 0 of each)
/// tell their connections apart: the release of one neither ends the connections the
/// other's test opened (still in use) nor waits for them.
#[tokio::test]
async fn worker_pools_of_two_configurations_leave_each_other_alone() {
    let (_serial, one) = single_worker().await;
    let two = Fixture::builder()
        .workers(1)
        .pool_size(5)
        .build()
        .expect("fixture");
    let first = one.worker_pool().await.unwrap();
    let (own, connection) = first.pg_config().connect(NoTls).await.unwrap();
    let task = tokio::spawn(connection);
    own.batch_execute("SELECT 1").await.unwrap();

    let db = two.worker_db().await.unwrap();
    let read = common::worker_pools_are_read(&db).await;
    drop(db);
    let before = two.stats();
    let second = two.worker_pool().await.unwrap();
    assert_eq!(
        second.worker_id(),
        first.worker_id(),
        "one worker id in both"
    );
    second.release().await.unwrap();
    assert!(
        own.batch_execute("SELECT 1").await.is_ok(),
        "the other configuration's release ended this test's connection"
    );
    if read {
        assert_eq!(
            two.stats().workers_reset,
            before.workers_reset,
            "the release waited for the other configuration's connection and rebuilt"
        );
    }
    drop(own);
    task.await.unwrap().unwrap();
    first.release().await.unwrap();
}

/// A worker pool through which nothing changed (reads, connections of its own,
/// LISTEN) costs no reset; any change is seen, so nothing ever reaches the next test:
/// rows written to tables are put back in place, and anything else (DDL of every kind,
/// a database setting) has the worker rebuilt.
#[tokio::test]
async fn a_worker_pool_that_changes_nothing_needs_no_reset() {
    let (_serial, fixture) = single_worker().await;
    let db = fixture.worker_db().await.unwrap();
    let fresh = pristine(&db).await;
    let read = common::worker_pools_are_read(&db).await;
    // A test's rolled-back writes just before must not count against the pool.
    db.batch_execute("INSERT INTO notes (owner, body) VALUES ('before', 'x')")
        .await
        .unwrap();
    drop(db);

    let before = fixture.stats();
    let pool = fixture.worker_pool().await.unwrap();
    let client = pool.get().await.unwrap();
    client
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap();
    // Session state that commits nothing, left for the next test to trip on.
    client
        .batch_execute(
            "SET statement_timeout = '1234s'; PREPARE pooled_statement AS SELECT 1; \
             SELECT pg_advisory_lock(77); BEGIN",
        )
        .await
        .unwrap();
    let (own, connection) = pool.pg_config().connect(NoTls).await.unwrap();
    let task = tokio::spawn(connection);
    own.batch_execute("LISTEN pooled; SELECT * FROM notes")
        .await
        .unwrap();
    drop((client, own));
    task.await.unwrap().unwrap();
    pool.release().await.unwrap();
    let after = fixture.stats();
    assert_eq!(
        after.workers_reset,
        before.workers_reset + u64::from(!read),
        "a read-only pool was reset, or one that could not be read was not"
    );
    assert_eq!(
        after.pools_unchanged,
        before.pools_unchanged + u64::from(read)
    );
    let db = fixture.worker_db().await.unwrap();
    db.batch_execute("PREPARE pooled_statement AS SELECT 2")
        .await
        .expect("the pool's prepared statement reached the next test");
    let (timeout, locked): (String, i64) = {
        let row = db
            .query_one(
                "SELECT current_setting('statement_timeout'), \
                        (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 77)",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_ne!(
        timeout, "1234s",
        "the pool's session setting reached the next test"
    );
    assert_eq!(locked, 0, "the pool's advisory lock is still held");
    drop(db);

    // Whether each change is put back in place (rows only) or rebuilds the worker.
    let (restored, rebuilt) = (true, false);
    let mut changes = vec![
        (
            "INSERT INTO notes (owner, body) VALUES ('pooled', 'x')",
            restored,
        ),
        ("DELETE FROM users", restored),
        ("UPDATE users SET email = 'changed@example.com'", restored),
        // Rolled back: counted all the same, so a restore that was not needed.
        (
            "BEGIN; INSERT INTO notes (owner, body) VALUES ('pooled', 'x'); ROLLBACK",
            restored,
        ),
        ("TRUNCATE notes", rebuilt),
        ("CREATE TABLE pooled_table (id int)", rebuilt),
        ("ALTER TABLE notes ADD COLUMN pooled int", rebuilt),
        ("CREATE INDEX pooled_idx ON notes (body)", rebuilt),
        ("COMMENT ON TABLE notes IS 'pooled'", rebuilt),
        (
            "CREATE FUNCTION pooled_f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            rebuilt,
        ),
        (
            "INSERT INTO notes (owner, body) VALUES ('pooled', 'x'); CREATE TABLE pooled_table (id int)",
            rebuilt,
        ),
        // DDL from a function, in replica mode, dropping, granting, and commands that
        // give a table new files without DDL.
        (
            "DO $$ BEGIN EXECUTE 'CREATE TABLE pooled_do (id int)'; END $$",
            rebuilt,
        ),
        (
            "SET session_replication_role = replica; CREATE TABLE pooled_replica (id int)",
            rebuilt,
        ),
        ("ALTER TABLE notes DROP COLUMN body", rebuilt),
        ("DROP TABLE notes", rebuilt),
        ("GRANT SELECT ON notes TO PUBLIC", rebuilt),
        ("ALTER SEQUENCE notes_id_seq RESTART WITH 100", rebuilt),
        ("VACUUM FULL notes", rebuilt),
        ("CLUSTER users USING users_pkey", rebuilt),
    ];
    if fixture.config().isolation != pgfixture::Isolation::Schema {
        changes.push((
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET work_mem = ''7MB''', current_database()); END $$",
            rebuilt,
        ));
    }
    for (change, restore) in changes {
        assert_eq!(
            through_pool(&fixture, change).await,
            put_back(restore && read),
            "{change}: not seen, or not handled as expected"
        );
        let db = fixture.worker_db().await.unwrap();
        assert_eq!(pristine(&db).await, fresh, "{change} reached the next test");
    }

    // The planner's statistics, which an `ANALYZE` writes (the autovacuum's too, at any
    // moment on a server that runs it): no change, with or without rows written.
    for (change, table, expected) in [
        ("ANALYZE users", "users", (0, u64::from(!read))),
        (
            "INSERT INTO notes (owner, body) SELECT 'analyzed', 'x' FROM generate_series(1, 20); \
             ANALYZE notes",
            "notes",
            put_back(read),
        ),
    ] {
        assert_eq!(
            through_pool(&fixture, change).await,
            expected,
            "{change}: statistics taken for a change"
        );
        let db = fixture.worker_db().await.unwrap();
        assert_eq!(pristine(&db).await, fresh, "{change} reached the next test");
        if read {
            // Kept: else the case tested nothing.
            let kept: i64 = db
                .query_one(
                    "SELECT count(*) FROM pg_stats WHERE schemaname = current_schema() AND tablename = $1",
                    &[&table],
                )
                .await
                .unwrap()
                .get(0);
            assert!(kept > 0, "{change} left no statistics");
        }
    }
}

/// A connection that code under test opened from the pool's settings, still closing as
/// the pool is released, with a write whose statistics its backend hands over only as
/// it exits (it flushed a moment before): the release waits for it, sees the write, and
/// the next test does not.
#[tokio::test]
async fn a_write_of_a_connection_still_closing_at_release_is_seen() {
    let (_serial, fixture) = single_worker().await;
    for round in 0..40 {
        let before = fixture.stats();
        let pool = fixture.worker_pool().await.unwrap();
        let (own, connection) = pool.pg_config().connect(NoTls).await.unwrap();
        let task = tokio::spawn(connection);
        own.batch_execute("SELECT 1").await.unwrap();
        own.batch_execute("INSERT INTO notes (owner, body) VALUES ('closing', 'x')")
            .await
            .unwrap();
        // Closing: the backend exits as the release begins.
        drop(own);
        pool.release().await.unwrap();
        let _ = task.await;
        let after = fixture.stats();
        assert_eq!(
            after.pools_unchanged, before.pools_unchanged,
            "round {round}: the write of a closing connection was not seen"
        );
        let db = fixture.worker_db().await.unwrap();
        assert_eq!(
            count(&db, "closing").await,
            0,
            "round {round}: the write of a closing connection reached the next test"
        );
    }
}

/// Resets after DDL take a spare made in the background (a clone of the template, or a
/// schema built from the fixtures), and each one still leaves the worker as the
/// fixtures made it, its rows put back in place after the next write.
#[tokio::test]
async fn resets_after_commits_use_a_spare_and_leak_nothing() {
    let (_serial, fixture) = single_worker().await;
    let db = fixture.worker_db().await.unwrap();
    let fresh = pristine(&db).await;
    let read = common::worker_pools_are_read(&db).await;
    drop(db);
    let before = fixture.stats();
    for round in 0..4 {
        let pool = fixture.worker_pool().await.unwrap();
        pool.get()
            .await
            .unwrap()
            .batch_execute(
                "INSERT INTO notes (owner, body) VALUES ('spare', 'x'); DELETE FROM users; \
                 COMMENT ON TABLE notes IS 'spare'",
            )
            .await
            .unwrap();
        pool.release().await.unwrap();
        let db = fixture.worker_db().await.unwrap();
        assert_eq!(
            pristine(&db).await,
            fresh,
            "round {round}: the commit reached the next test"
        );
        drop(db);
        // Time for the spare to be made, as a test's own work would give it.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let after = fixture.stats();
    assert_eq!(after.workers_reset, before.workers_reset + 4);
    if fixture.config().url.is_none() {
        assert!(after.spares_used >= before.spares_used + 2, "{after:?}");
    }
    // A worker that took a spare's place has its rows recorded: a write is put back
    // (rebuilt before PostgreSQL 15).
    assert_eq!(
        through_pool(
            &fixture,
            "INSERT INTO notes (owner, body) VALUES ('spare', 'x')"
        )
        .await,
        put_back(read)
    );
    let db = fixture.worker_db().await.unwrap();
    assert_eq!(pristine(&db).await, fresh, "the restore left a row");
}

/// A rebuild after DDL through a worker pool leaves nothing of the old schema to the
/// next test, also on the pool's connections: in schema mode the rebuilt worker keeps
/// the pool (its connections reach the new schema by its name), whose statements
/// prepared on the old tables are prepared again; in the other modes the pool is new.
#[tokio::test]
async fn the_pool_after_a_rebuild_sees_only_the_new_schema() {
    let _serial = SERIAL.lock().await;
    // Tests restart the sequences, from the worker's setting, which a rebuild writes
    // anew; but in schema mode on a server of the user's, which keeps no such setting
    // and refuses the restart by name.
    let restarts = !common::schema_mode_on_a_url_server();
    let fixture = Fixture::builder()
        .workers(1)
        .reset_sequences(restarts)
        .build()
        .unwrap();
    if !restarts {
        common::assert_sequence_restarts_refused();
    }
    let insert = "INSERT INTO notes (owner, body) VALUES ('ids', 'x') RETURNING id";
    let db = fixture.worker_db().await.unwrap();
    let first_id: i64 = db.query_one(insert, &[]).await.unwrap().get(0);
    drop(db);
    let schema_mode = fixture.config().isolation == pgfixture::Isolation::Schema;
    let columns = "SELECT string_agg(column_name, ',' ORDER BY ordinal_position) \
                   FROM information_schema.columns \
                   WHERE table_name = 'notes' AND table_schema = current_schema()";
    let pool = fixture.worker_pool().await.unwrap();
    let conn = pool.get().await.unwrap();
    conn.batch_execute("ALTER TABLE notes ADD COLUMN extra int; INSERT INTO notes (owner, body, extra) VALUES ('rebuilt', 'x', 1)")
        .await
        .unwrap();
    // Cached by the pool's connection with the altered table's four columns.
    let all = conn.prepare_cached("SELECT * FROM notes").await.unwrap();
    assert_eq!(all.columns().len(), 4);
    let before: String = conn.query_one(columns, &[]).await.unwrap().get(0);
    assert_eq!(before, "id,owner,body,extra");
    // Every connection the next test can get started before this.
    let released: String = conn
        .query_one("SELECT clock_timestamp()::text", &[])
        .await
        .unwrap()
        .get(0);
    drop((all, conn));
    pool.release().await.unwrap();

    let pool = fixture.worker_pool().await.unwrap();
    let conn = pool.get().await.unwrap();
    let after: String = conn.query_one(columns, &[]).await.unwrap().get(0);
    assert_eq!(
        after, "id,owner,body",
        "the old schema reached the next test"
    );
    let all = conn.prepare_cached("SELECT * FROM notes").await.unwrap();
    assert_eq!(all.columns().len(), 3);
    let rebuilt: i64 = conn
        .query_one("SELECT count(*) FROM notes WHERE owner = 'rebuilt'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rebuilt, 0);
    conn.query(&all, &[]).await.unwrap();
    let kept: bool = conn
        .query_one(
            "SELECT backend_start < $1::text::timestamptz FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            &[&released],
        )
        .await
        .unwrap()
        .get(0);
    if fixture.config().url.is_none() {
        // Schema mode keeps its warm connections; a new database needs new ones. So
        // does a schema whose pool could not be read (before PostgreSQL 15).
        assert_eq!(
            kept,
            schema_mode && common::worker_pools_are_read(&conn).await
        );
    }
    drop((all, conn));
    pool.release().await.unwrap();
    let db = fixture.worker_db().await.unwrap();
    let id: i64 = db.query_one(insert, &[]).await.unwrap().get(0);
    if restarts {
        assert_eq!(id, first_id, "the sequences did not start again");
    }
}

/// Runs `sql` through a worker pool of `fixture` and releases it: the restores and
/// the rebuilds its release made.
async fn through_pool(fixture: &Fixture, sql: &str) -> (u64, u64) {
    let before = fixture.stats();
    let pool = fixture.worker_pool().await.unwrap();
    pool.get().await.unwrap().batch_execute(sql).await.unwrap();
    pool.release().await.unwrap();
    let after = fixture.stats();
    (
        after.pools_restored - before.pools_restored,
        after.workers_reset - before.workers_reset,
    )
}

/// Every table of `tests/fixtures/restore`, in one row, byte for byte (but the times
/// of `child`, which a rebuilt worker schema gets anew).
async fn shapes(db: &TestDb) -> String {
    db.query_one(
        "SELECT concat_ws(' | ', \
           (SELECT string_agg(t::text, ',' ORDER BY t.id) FROM parent t), \
           (SELECT string_agg(md5((t.id, t.parent_id, t.body)::text), ',' ORDER BY t.id) FROM child t), \
           (SELECT string_agg(t::text, ',' ORDER BY t.n) FROM audit t), \
           (SELECT string_agg(t::text, ',' ORDER BY t::text) FROM \"Odd \"\"Name\"\", too\" t), \
           (SELECT string_agg(t::text, ',' ORDER BY t.at) FROM measures t), \
           (SELECT count(*) FROM always_audited))",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// What [`through_pool`] gives for rows written through a worker pool: put back in
/// place, or, where worker pools are not `read` (before PostgreSQL 15), a rebuild.
fn put_back(read: bool) -> (u64, u64) {
    if read { (1, 0) } else { (0, 1) }
}

/// Where worker pools are not read (before PostgreSQL 15), rows written through one are
/// not put back: the worker is rebuilt, and the next test sees the fixtures' rows
/// (`fresh`, [`shapes`]) all the same. Whether that was the case (the caller's test,
/// which is about putting rows back, is then over).
async fn rebuilt_instead(fixture: &Fixture, db: TestDb, fresh: &str) -> bool {
    if common::worker_pools_are_read(&db).await {
        return false;
    }
    drop(db);
    let made = through_pool(fixture, "INSERT INTO measures VALUES ('2026-08-01', 2)").await;
    assert_eq!(made, put_back(false), "not rebuilt");
    let db = fixture.worker_db().await.unwrap();
    assert_eq!(
        shapes(&db).await,
        fresh,
        "a written row reached the next test"
    );
    true
}

/// [`single_worker`] on the fixtures of `tests/fixtures/restore`.
async fn restore_worker() -> (tokio::sync::MutexGuard<'static, ()>, Fixture) {
    let serial = SERIAL.lock().await;
    let fixture = Fixture::builder()
        .workers(1)
        .fixtures(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/restore"
        ))
        .build()
        .expect("fixture");
    (serial, fixture)
}

/// Rows written through a worker pool, to tables of every shape, are put back exactly
/// as the fixtures left them, without a rebuild and without firing the tables'
/// triggers; the sequences start again where the fixtures left them. A table whose
/// trigger would fire in replica mode is rebuilt instead.
#[tokio::test]
async fn rows_written_through_a_worker_pool_are_put_back_exactly() {
    let (_serial, fixture) = restore_worker().await;
    let db = fixture.worker_db().await.unwrap();
    let fresh = shapes(&db).await;
    if rebuilt_instead(&fixture, db, &fresh).await {
        return;
    }

    let made = through_pool(
        &fixture,
        "INSERT INTO parent (name) VALUES ('c'); \
             UPDATE parent SET name = 'A' WHERE id = 1; \
             DELETE FROM parent WHERE id = 2; \
             INSERT INTO child (parent_id, body) VALUES (1, 'new'); \
             UPDATE child SET body = 'shrunk' WHERE id = 1; \
             INSERT INTO \"Odd \"\"Name\"\", too\" VALUES ('more', NULL, NULL, NULL, 1); \
             DELETE FROM measures WHERE v = 0.1; \
             INSERT INTO measures VALUES ('2026-08-01', 2)",
    )
    .await;
    assert_eq!(made, (1, 0), "the rows were not put back in place");
    let db = fixture.worker_db().await.unwrap();
    assert_eq!(
        shapes(&db).await,
        fresh,
        "a written row reached the next test"
    );
    let schema_on_url = fixture.config().isolation == pgfixture::Isolation::Schema
        && fixture.config().url.is_some();
    if !schema_on_url {
        let ids: (i32, i64) = db
            .query_one(
                "WITH p AS (INSERT INTO parent (name) VALUES ('z') RETURNING id) \
                 SELECT (SELECT id FROM p), nextval(pg_get_serial_sequence('child', 'id'))",
                &[],
            )
            .await
            .map(|row| (row.get(0), row.get(1)))
            .unwrap();
        assert_eq!(
            ids,
            (3, 3),
            "the sequences did not start again where the fixtures left them"
        );
    }
    drop(db);

    assert_eq!(
        through_pool(&fixture, "INSERT INTO always_audited VALUES (1)").await,
        (0, 1),
        "a table whose trigger fires in replica mode was not rebuilt"
    );
    let db = fixture.worker_db().await.unwrap();
    assert_eq!(
        shapes(&db).await,
        fresh,
        "a written row reached the next test"
    );
}

/// Tables a worker pool's test only inserted into lose just the rows it inserted
/// (through the pool, through a connection of its own, in several transactions and in
/// a savepoint): the rows the fixtures left stay where they are, untouched (the same
/// row versions), and need no record. A table that also had a row updated is
/// refilled as before.
#[tokio::test]
async fn rows_only_inserted_are_removed_and_the_fixtures_rows_stay() {
    let (_serial, fixture) = restore_worker().await;
    // The row versions of the fixtures' rows, which a refill would replace.
    let versions = async |db: &TestDb| -> String {
        db.query_one(
            "SELECT concat_ws(' | ', \
               (SELECT string_agg(t.id || ':' || t.xmin, ',' ORDER BY t.id) FROM child t), \
               (SELECT string_agg(t.amount || ':' || t.xmin, ',' ORDER BY t::text) FROM \"Odd \"\"Name\"\", too\" t), \
               (SELECT string_agg(t.at || ':' || t.xmin, ',' ORDER BY t.at) FROM measures t), \
               (SELECT string_agg(t.id || ':' || t.xmin, ',' ORDER BY t.id) FROM parent t))",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    };
    let db = fixture.worker_db().await.unwrap();
    let (fresh, kept) = (shapes(&db).await, versions(&db).await);
    if rebuilt_instead(&fixture, db, &fresh).await {
        return;
    }

    let before = fixture.stats();
    let pool = fixture.worker_pool().await.unwrap();
    pool.get()
        .await
        .unwrap()
        .batch_execute(
            "INSERT INTO child (parent_id, body) \
               VALUES (2, (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 4000) g)); \
             BEGIN; SAVEPOINT s; \
             INSERT INTO \"Odd \"\"Name\"\", too\" VALUES ('saved', '{}', NULL, NULL, 2); \
             RELEASE s; COMMIT; \
             INSERT INTO measures VALUES ('2026-08-01', 2)",
        )
        .await
        .unwrap();
    let (own, connection) = pool
        .pg_config()
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(connection);
    own.batch_execute("INSERT INTO measures VALUES ('2026-09-01', 3)")
        .await
        .unwrap();
    drop(own);
    task.await.unwrap().unwrap();
    pool.release().await.unwrap();
    let after = fixture.stats();
    assert_eq!(
        (
            after.pools_restored - before.pools_restored,
            after.workers_reset - before.workers_reset
        ),
        (1, 0),
        "the inserted rows were not removed in place"
    );
    let db = fixture.worker_db().await.unwrap();
    assert_eq!(
        shapes(&db).await,
        fresh,
        "an inserted row reached the next test"
    );
    assert_eq!(
        versions(&db).await,
        kept,
        "the fixtures' rows were rewritten, not left in place"
    );
    drop(db);

    // A row updated as well: that table is refilled (new row versions), the others
    // only lose their inserted rows.
    assert_eq!(
        through_pool(
            &fixture,
            "INSERT INTO child (parent_id, body) VALUES (1, 'x'); \
             UPDATE parent SET name = 'A' WHERE id = 1"
        )
        .await,
        (1, 0)
    );
    let db = fixture.worker_db().await.unwrap();
    assert_eq!(
        shapes(&db).await,
        fresh,
        "a written row reached the next test"
    );
    let now = versions(&db).await;
    let (kept_rest, kept_parent) = kept.rsplit_once(" | ").unwrap();
    let (now_rest, now_parent) = now.rsplit_once(" | ").unwrap();
    assert_eq!(
        now_rest, kept_rest,
        "tables only inserted into were refilled"
    );
    assert_ne!(
        now_parent, kept_parent,
        "the updated table was not refilled"
    );
}
