//! The sqlx driver: rollback, savepoints through sqlx's own transaction manager,
//! commit leaks, the worker pool, and connections that outlive test runtimes. Runs on
//! the backend and isolation mode the environment selects.

mod common;

use common::unique_run;
use pgfixture::Fixture;
use pgfixture::sqlx::{Connection, PgConnection, TestDb, WorkerPool};

/// A fixture with one in-process worker: consecutive handles come from one worker.
fn single_worker() -> Fixture {
    Fixture::builder().workers(1).build().expect("fixture")
}

async fn count(conn: &mut PgConnection, owner: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM notes WHERE owner = $1")
        .bind(owner)
        .fetch_one(conn)
        .await
        .unwrap()
}

async fn insert(conn: &mut PgConnection, owner: &str) {
    sqlx::query("INSERT INTO notes (owner, body) VALUES ($1, 'x')")
        .bind(owner)
        .execute(conn)
        .await
        .unwrap();
}

async fn backend_pid(conn: &mut PgConnection) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn dropping_the_handle_rolls_back() {
    let fixture = single_worker();
    let mut db = TestDb::acquire(&fixture).await.unwrap();
    insert(&mut db, "sqlx-drop").await;
    assert_eq!(count(&mut db, "sqlx-drop").await, 1);
    drop(db);
    let mut db = TestDb::acquire(&fixture).await.unwrap();
    assert_eq!(
        count(&mut db, "sqlx-drop").await,
        0,
        "the dropped handle's insert survived"
    );
    db.release().await.unwrap();
}

#[tokio::test]
async fn begin_and_commit_of_the_code_under_test_are_savepoints() {
    let fixture = single_worker();
    let mut db = TestDb::acquire(&fixture).await.unwrap();
    {
        let mut tx = db.begin().await.unwrap();
        insert(&mut tx, "sqlx-savepoint").await;
        tx.commit().await.unwrap();
    }
    {
        let mut tx = db.begin().await.unwrap();
        insert(&mut tx, "sqlx-savepoint-undone").await;
        tx.rollback().await.unwrap();
    }
    {
        // Nested further, and dropped without a word: rolled back to its savepoint.
        let mut outer = db.begin().await.unwrap();
        let mut inner = outer.begin().await.unwrap();
        insert(&mut inner, "sqlx-savepoint-dropped").await;
        drop(inner);
        outer.commit().await.unwrap();
    }
    assert_eq!(count(&mut db, "sqlx-savepoint").await, 1);
    assert_eq!(count(&mut db, "sqlx-savepoint-undone").await, 0);
    assert_eq!(count(&mut db, "sqlx-savepoint-dropped").await, 0);
    let stats = fixture.stats();
    db.release().await.unwrap();
    // The committed savepoint went with the test's transaction.
    let mut db = TestDb::acquire(&fixture).await.unwrap();
    assert_eq!(
        count(&mut db, "sqlx-savepoint").await,
        0,
        "a savepoint's commit leaked"
    );
    assert_eq!(fixture.stats().commit_leaks, stats.commit_leaks);
}

/// Runs `statements`, one query each, which commit rows of `owner` for real, through
/// the handle, then checks that the release found the commit and that the next test
/// sees none of it.
async fn commit_is_found(owner: &str, statements: &[&str]) {
    let fixture = single_worker();
    let mut db = TestDb::acquire(&fixture).await.unwrap();
    let leaks = fixture.stats().commit_leaks;
    for statement in statements {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_string()))
            .execute(&mut *db)
            .await
            .unwrap();
    }
    db.release().await.unwrap();
    assert_eq!(
        fixture.stats().commit_leaks,
        leaks + 1,
        "the commit was not found"
    );
    let mut db = TestDb::acquire(&fixture).await.unwrap();
    assert_eq!(count(&mut db, owner).await, 0, "the committed row leaked");
}

#[tokio::test]
async fn a_raw_commit_is_found_and_the_worker_reset() {
    commit_is_found(
        "sqlx-raw-commit",
        &[
            "INSERT INTO notes (owner, body) VALUES ('sqlx-raw-commit', 'x')",
            "COMMIT",
        ],
    )
    .await;
}

#[tokio::test]
async fn a_begin_commit_of_its_own_is_found_and_the_worker_reset() {
    commit_is_found(
        "sqlx-own-commit",
        &["BEGIN; INSERT INTO notes (owner, body) VALUES ('sqlx-own-commit', 'x'); COMMIT"],
    )
    .await;
}

/// A test whose connection died after it committed ends without an error, and the
/// worker is rebuilt, since whether the test committed cannot be read any more.
#[tokio::test]
async fn a_test_whose_connection_died_after_a_commit_leaks_nothing() {
    let fixture = single_worker();
    let mut db = TestDb::acquire(&fixture).await.unwrap();
    let resets = fixture.stats().workers_reset;
    sqlx::raw_sql("COMMIT; INSERT INTO notes (owner, body) VALUES ('sqlx-killed', 'x')")
        .execute(&mut *db)
        .await
        .unwrap();
    let killed = sqlx::raw_sql("SELECT pg_terminate_backend(pg_backend_pid())")
        .execute(&mut *db)
        .await;
    assert!(killed.is_err(), "the backend outlived its termination");
    db.release()
        .await
        .expect("a connection that died is the test's own doing, not a failure");
    assert!(fixture.stats().workers_reset > resets);
    let mut db = TestDb::acquire(&fixture).await.unwrap();
    assert_eq!(count(&mut db, "sqlx-killed").await, 0, "the commit leaked");
}

#[tokio::test]
async fn a_failed_statement_does_not_poison_the_next_test() {
    let fixture = single_worker();
    let mut db = TestDb::acquire(&fixture).await.unwrap();
    assert!(
        sqlx::query("SELECT * FROM no_such_table")
            .execute(&mut *db)
            .await
            .is_err()
    );
    drop(db);
    let mut db = TestDb::acquire(&fixture).await.unwrap();
    assert_eq!(count(&mut db, "nobody").await, 0);
}

/// Twenty consecutive tests, each in a runtime of its own as `#[tokio::test]` builds
/// them, alternating the two flavours: every one gets the same connection (same
/// server pid) although the runtime that used it last is gone.
#[test]
fn connections_outlive_the_runtimes_of_tests() {
    // A configuration of its own, so that no other test of this file (some commit and
    // reset the worker) shares the worker.
    let fixture = Fixture::builder()
        .workers(1)
        .pool_size(3)
        .build()
        .expect("fixture");
    let mut pids = Vec::new();
    for round in 0..20 {
        let runtime = if round % 2 == 0 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            tokio::runtime::Builder::new_multi_thread()
        }
        .enable_all()
        .build()
        .unwrap();
        pids.push(runtime.block_on(async {
            let mut db = TestDb::acquire(&fixture).await.unwrap();
            insert(&mut db, "sqlx-runtime").await;
            assert_eq!(count(&mut db, "sqlx-runtime").await, 1);
            let pid = backend_pid(&mut db).await;
            if round % 4 == 0 {
                db.release().await.unwrap();
            }
            pid
        }));
        drop(runtime);
    }
    pids.dedup();
    assert_eq!(
        pids.len(),
        1,
        "a new backend after a runtime ended: {pids:?}"
    );
}

#[tokio::test]
async fn the_worker_pool_commits_and_the_next_test_does_not_see_it() {
    let fixture = single_worker();
    let pool = WorkerPool::acquire(&fixture).await.unwrap();
    sqlx::query("INSERT INTO notes (owner, body) VALUES ('sqlx-pool', 'x')")
        .execute(&*pool)
        .await
        .unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM notes WHERE owner = 'sqlx-pool'")
        .fetch_one(&*pool)
        .await
        .unwrap();
    assert_eq!(seen, 1);
    pool.release().await.unwrap();
    let mut db = TestDb::acquire(&fixture).await.unwrap();
    assert_eq!(
        count(&mut db, "sqlx-pool").await,
        0,
        "the pool's commit leaked"
    );
}

/// Whether the server of `fixture` lets pgfixture read a worker before and after a
/// worker pool (PostgreSQL 15 and later): before 15 every worker pool is followed by
/// a rebuild, which also replaces the pool and its connections.
async fn pools_read(fixture: &Fixture) -> bool {
    let mut db = TestDb::acquire(fixture).await.unwrap();
    let read = sqlx::query_scalar("SELECT current_setting('server_version_num')::int >= 150000")
        .fetch_one(&mut *db)
        .await
        .unwrap();
    db.release().await.unwrap();
    read
}

#[tokio::test]
async fn a_worker_pool_that_changes_nothing_needs_no_reset() {
    // A worker of its own: another test's rolled-back rows, whose statistics its
    // connection may hand over only later, would show as a change (a restore).
    let fixture = Fixture::builder()
        .workers(1)
        .pool_size(7)
        .build()
        .expect("fixture");
    // The worker exists before the reading.
    let read = pools_read(&fixture).await;
    let unchanged = fixture.stats().pools_unchanged;
    let pool = WorkerPool::acquire(&fixture).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&*pool)
        .await
        .unwrap();
    assert!(n >= 1);
    pool.release().await.unwrap();
    assert_eq!(fixture.stats().pools_unchanged, unchanged + u64::from(read));
}

#[tokio::test]
async fn connect_options_reach_the_workers_database() {
    let fixture = common::worker_of_its_own(8);
    let mut db = TestDb::acquire(&fixture).await.unwrap();
    let mut own = PgConnection::connect_with(&db.connect_options())
        .await
        .unwrap();
    let theirs: String =
        sqlx::query_scalar("SELECT current_database()::text || '/' || current_schema()::text")
            .fetch_one(&mut own)
            .await
            .unwrap();
    let ours: String =
        sqlx::query_scalar("SELECT current_database()::text || '/' || current_schema()::text")
            .fetch_one(&mut *db)
            .await
            .unwrap();
    assert_eq!(theirs, ours);
    // As a URL shows it (the password itself may be a word the output holds anyway,
    // such as the user's name on a server of one's own).
    let shown = format!("{:?}", db.url());
    assert!(!shown.contains(&format!(":{}@", password(db.url().as_str()))));
}

/// The password of a `postgres://user:password@...` URL.
fn password(url: &str) -> String {
    let rest = url.split_once("://").unwrap().1;
    let userinfo = rest.split_once('@').unwrap().0;
    userinfo.split_once(':').unwrap().1.to_owned()
}

/// Plain `#[tokio::test]`s on the sqlx handle, each inserting the same unique email
/// and expecting to be alone: a row that leaked from any other (test, worker, process
/// under nextest) fails the insert.
async fn alone(n: usize) {
    let mut db = pgfixture::sqlx::worker_db().await.unwrap();
    sqlx::query("INSERT INTO users (email) VALUES ('sqlx-isolated@example.com')")
        .execute(&mut *db)
        .await
        .unwrap_or_else(|e| panic!("isolated_{n}: another test's row leaked in: {e}"));
    let mut tx = db.begin().await.unwrap();
    insert(&mut tx, "sqlx-isolated").await;
    tx.commit().await.unwrap();
    assert_eq!(count(&mut db, "sqlx-isolated").await, 1, "isolated_{n}");
}

#[tokio::test]
async fn isolated_1() {
    alone(1).await;
}

#[tokio::test]
async fn isolated_2() {
    alone(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_3() {
    alone(3).await;
}

#[tokio::test]
async fn isolated_4() {
    alone(4).await;
}

/// A runtime of either flavour, as `#[tokio::test]` builds one.
fn test_runtime(multi_thread: bool) -> tokio::runtime::Runtime {
    if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    }
    .enable_all()
    .build()
    .unwrap()
}

/// Twenty consecutive tests on the worker pool, each in a runtime of its own, half of
/// them writing a row: the pool's connections (the same two backends throughout)
/// outlive the runtimes, and the rows are put back without a rebuild.
#[test]
fn worker_pool_connections_outlive_the_runtimes_of_tests() {
    let fixture = Fixture::builder()
        .workers(1)
        .pool_size(4)
        .build()
        .expect("fixture");
    let read = test_runtime(false).block_on(pools_read(&fixture));
    let mut pids = std::collections::BTreeSet::new();
    for round in 0..20 {
        let runtime = test_runtime(round % 2 == 1);
        pids.insert(runtime.block_on(async {
            let pool = WorkerPool::acquire(&fixture).await.unwrap();
            let sql = if round % 4 < 2 {
                "INSERT INTO notes (owner, body) VALUES ('sqlx-kept', 'x') RETURNING pg_backend_pid()"
            } else {
                "SELECT pg_backend_pid()"
            };
            let pid: i32 = sqlx::query_scalar(sql).fetch_one(&*pool).await.unwrap();
            let seen: i64 =
                sqlx::query_scalar("SELECT count(*) FROM notes WHERE owner = 'sqlx-kept'")
                    .fetch_one(&*pool)
                    .await
                    .unwrap();
            assert_eq!(seen, i64::from(round % 4 < 2), "round {round}");
            pool.release().await.unwrap();
            pid
        }));
        drop(runtime);
    }
    let stats = fixture.stats();
    if !read {
        // Rebuilt after every worker pool, with a new pool each time.
        assert_eq!(stats.workers_reset, 20, "{stats:?}");
        return;
    }
    assert!(
        pids.len() <= 2,
        "new backends after runtimes ended: {pids:?}"
    );
    assert_eq!(stats.pools_restored, 10, "{stats:?}");
    assert_eq!(stats.workers_reset, 0, "{stats:?}");
}

/// A worker pool dropped right after its last query, at the end of a multi-thread
/// `#[tokio::test]` (no `release()`): its runtime returns the connection while the drop
/// waits, so the pool is kept as after a release: the same backends from test to test,
/// and what half of the tests wrote is put back without a rebuild.
#[test]
fn a_worker_pool_dropped_in_a_multi_thread_test_is_kept() {
    let fixture = common::worker_of_its_own(13);
    let read = test_runtime(false).block_on(pools_read(&fixture));
    let mut pids = std::collections::BTreeSet::new();
    for round in 0..10 {
        let runtime = test_runtime(true);
        pids.insert(runtime.block_on(async {
            let pool = WorkerPool::acquire(&fixture).await.unwrap();
            let (seen, pid): (i64, i32) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM notes WHERE owner = 'sqlx-dropped'), pg_backend_pid()",
            )
            .fetch_one(&*pool)
            .await
            .unwrap();
            assert_eq!(seen, 0, "round {round} sees an earlier round's row");
            if round % 2 == 0 {
                // Under nextest the pool keeps one connection: this one, right after
                // the first query, is opened on the test's runtime, and closed.
                sqlx::query("INSERT INTO notes (owner, body) VALUES ('sqlx-dropped', 'x')")
                    .execute(&*pool)
                    .await
                    .unwrap();
            }
            drop(pool);
            pid
        }));
        drop(runtime);
    }
    let stats = fixture.stats();
    if !read {
        // Rebuilt after every worker pool, with a new pool each time.
        assert_eq!(stats.workers_reset, 10, "{stats:?}");
        return;
    }
    assert!(pids.len() <= 2, "new backends after drops: {pids:?}");
    assert_eq!(stats.pools_restored, 5, "{stats:?}");
    assert_eq!(stats.workers_reset, 0, "{stats:?}");
}

/// What a test leaves in the sessions of the worker pool's connections (an advisory
/// lock, a setting, a statement prepared with SQL, a LISTEN) is gone for the next test,
/// whose connections are the same.
#[test]
fn the_worker_pool_clears_the_sessions_a_test_leaves() {
    let fixture = Fixture::builder()
        .workers(1)
        .pool_size(6)
        .build()
        .expect("fixture");
    let read = test_runtime(false).block_on(pools_read(&fixture));
    let first = test_runtime(false).block_on(async {
        let pool = WorkerPool::acquire(&fixture).await.unwrap();
        let mut conn = pool.acquire().await.unwrap();
        sqlx::raw_sql(
            "SELECT pg_advisory_lock(4242); SET statement_timeout = '7s'; \
             PREPARE pgfx_left AS SELECT 1; LISTEN pgfx_left",
        )
        .execute(&mut *conn)
        .await
        .unwrap();
        let pid = backend_pid(&mut conn).await;
        drop(conn);
        pool.release().await.unwrap();
        pid
    });
    test_runtime(true).block_on(async {
        let pool = WorkerPool::acquire(&fixture).await.unwrap();
        // Both kept connections at once: one of them is the first test's.
        let (mut a, mut b) = (pool.acquire().await.unwrap(), pool.acquire().await.unwrap());
        let mut pids = Vec::new();
        for conn in [&mut *a, &mut *b] {
            pids.push(backend_pid(conn).await);
            let (locks, timeout, channels): (i64, String, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()), \
                 current_setting('statement_timeout'), (SELECT count(*) FROM pg_listening_channels())",
            )
            .fetch_one(&mut *conn)
            .await
            .unwrap();
            assert_eq!((locks, timeout.as_str(), channels), (0, "0", 0));
            sqlx::raw_sql("PREPARE pgfx_left AS SELECT 1; DEALLOCATE pgfx_left")
                .execute(&mut *conn)
                .await
                .expect("the name of the first test's PREPARE is free");
        }
        // Before PostgreSQL 15 a rebuilt worker's new ones.
        assert_eq!(pids.contains(&first), read, "{first} in {pids:?}");
        drop((a, b));
        pool.release().await.unwrap();
    });
}

/// A test that makes the worker pool open more connections than it keeps opens them on
/// its own runtime: they are closed at release, and the next test, on another
/// runtime, gets working connections.
#[test]
fn connections_opened_on_a_tests_runtime_are_closed_at_release() {
    let fixture = Fixture::builder()
        .workers(1)
        .pool_size(5)
        .build()
        .expect("fixture");
    let read = test_runtime(false).block_on(pools_read(&fixture));
    let busy = |pool: &WorkerPool| {
        let pool: sqlx::PgPool = (**pool).clone();
        async move {
            let held = futures::future::join_all((0..4).map(|_| pool.acquire())).await;
            let mut pids = Vec::new();
            for conn in held {
                pids.push(backend_pid(&mut conn.unwrap()).await);
            }
            pids
        }
    };
    let first = test_runtime(false).block_on(async {
        let pool = WorkerPool::acquire(&fixture).await.unwrap();
        let pids = busy(&pool).await;
        pool.release().await.unwrap();
        pids
    });
    assert_eq!(first.len(), 4);
    test_runtime(false).block_on(async {
        let pool = WorkerPool::acquire(&fixture).await.unwrap();
        // The two the pool keeps stay (one in a process of one test, under nextest);
        // the others are closed (their backends exit). Before PostgreSQL 15 the
        // worker is rebuilt, and none stays.
        let kept = match std::env::var("NEXTEST_EXECUTION_MODE").as_deref() {
            _ if !read => 0,
            Ok("process-per-test") => 1,
            _ => 2,
        };
        let mut alive = 0;
        for _ in 0..200 {
            alive = sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
            )
            .bind(&first)
            .fetch_one(&*pool)
            .await
            .unwrap();
            if alive == kept {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(alive, kept, "of {first:?}");
        assert_eq!(busy(&pool).await.len(), 4);
        pool.release().await.unwrap();
    });
}

/// A connection of the worker pool that a task of the test still holds when the test
/// ends (an application's background job, a `PgListener`), with a transaction open, is
/// ended at release, by its name: its open transaction is rolled back, what it
/// committed is put back in place without a rebuild, and it cannot write after the
/// test (into the worker's successor, in schema mode, where a rebuild keeps the name).
/// The next test's pool works.
#[tokio::test]
async fn a_connection_a_task_still_holds_is_ended_at_release() {
    let fixture = Fixture::builder()
        .workers(1)
        .pool_size(10)
        .build()
        .expect("fixture");
    let read = pools_read(&fixture).await;
    let before = fixture.stats();
    let pool = WorkerPool::acquire(&fixture).await.unwrap();
    let (go, later) = tokio::sync::oneshot::channel::<()>();
    let (held, ready) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn({
        let pool: sqlx::PgPool = (*pool).clone();
        async move {
            let mut conn = pool.acquire().await.unwrap();
            sqlx::raw_sql(
                "INSERT INTO notes (owner, body) VALUES ('sqlx-held', 'committed'); \
                 BEGIN; INSERT INTO notes (owner, body) VALUES ('sqlx-held', 'open')",
            )
            .execute(&mut *conn)
            .await
            .unwrap();
            held.send(()).unwrap();
            let _ = later.await;
            sqlx::raw_sql(
                "COMMIT; INSERT INTO notes (owner, body) VALUES ('sqlx-held', 'after the test')",
            )
            .execute(&mut *conn)
            .await
        }
    });
    ready.await.unwrap();
    pool.release().await.unwrap();
    go.send(()).unwrap();
    assert!(
        task.await.unwrap().is_err(),
        "the held connection still wrote after its test"
    );
    let after = fixture.stats();
    if read {
        assert_eq!(after.workers_reset, before.workers_reset, "{after:?}");
        assert_eq!(after.pools_restored, before.pools_restored + 1, "{after:?}");
    }
    let pool = WorkerPool::acquire(&fixture).await.unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM notes WHERE owner = 'sqlx-held'")
        .fetch_one(&*pool)
        .await
        .unwrap();
    assert_eq!(seen, 0, "the held connection's rows reached the next test");
    pool.release().await.unwrap();
}

/// Connections and pools the test opens itself from its handle's `connect_options()`
/// are not inside the test's transaction: what they commit is put back at the handle's
/// release (rows only: no rebuild, where the server lets the worker be read), and a
/// pool's connections still open are ended, its transaction rolled back. Also when
/// the handle drops rather than being released.
#[tokio::test]
async fn what_connections_of_the_tests_own_commit_is_put_back() {
    let fixture = Fixture::builder()
        .workers(1)
        .pool_size(12)
        .build()
        .expect("fixture");
    let read = pools_read(&fixture).await;
    for release in [true, false] {
        let before = fixture.stats();
        let mut db = TestDb::acquire(&fixture).await.unwrap();
        insert(&mut db, "sqlx-handle").await;
        let mut own = PgConnection::connect_with(&db.connect_options())
            .await
            .unwrap();
        insert(&mut own, "sqlx-own").await;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with(db.connect_options())
            .await
            .unwrap();
        let mut open = pool.begin().await.unwrap();
        insert(&mut open, "sqlx-own").await;
        sqlx::query("UPDATE users SET email = email || '.own'")
            .execute(&mut *open)
            .await
            .unwrap();
        if release {
            db.release().await.unwrap();
        } else {
            drop(db);
        }
        assert!(
            open.commit().await.is_err(),
            "the pool's connection still committed after its test"
        );
        assert!(own.ping().await.is_err(), "the connection still answers");
        let after = fixture.stats();
        assert_eq!(after.handed_checked, before.handed_checked + 1);
        assert_eq!(after.commit_leaks, before.commit_leaks);
        if read {
            assert_eq!(after.workers_reset, before.workers_reset, "{after:?}");
            assert_eq!(after.handed_restored, before.handed_restored + 1);
        }
        let mut db = TestDb::acquire(&fixture).await.unwrap();
        assert_eq!(
            count(&mut db, "sqlx-own").await,
            0,
            "its rows reached the next test"
        );
        assert_eq!(count(&mut db, "sqlx-handle").await, 0);
        let changed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM users WHERE email LIKE '%.own'")
                .fetch_one(&mut *db)
                .await
                .unwrap();
        assert_eq!(changed, 0, "its update reached the next test");
        db.release().await.unwrap();
    }
}

/// A `#[tokio::test]` that drops its worker pool right after its last query (the
/// query's connection still on its way back, on the test's runtime that the drop
/// blocks), or whose task still listens on one of its connections, leaves the worker
/// as it is: no rebuild, and the next tests' pools work.
#[test]
fn a_worker_pool_dropped_at_once_or_with_a_listener_needs_no_rebuild() {
    let fixture = Fixture::builder()
        .workers(1)
        .pool_size(11)
        .build()
        .expect("fixture");
    let read = test_runtime(false).block_on(pools_read(&fixture));
    let before = fixture.stats();
    for round in 0..3 {
        test_runtime(round % 2 == 1).block_on(async {
            let pool = WorkerPool::acquire(&fixture).await.unwrap();
            sqlx::query("SELECT 1").execute(&*pool).await.unwrap();
        });
        test_runtime(round % 2 == 0).block_on(async {
            let pool = WorkerPool::acquire(&fixture).await.unwrap();
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
                .await
                .unwrap();
            listener.listen("pgfx_jobs").await.unwrap();
            let task =
                tokio::spawn(async move { listener.recv().await.map(|n| n.payload().to_owned()) });
            sqlx::query("SELECT pg_notify('pgfx_jobs', 'one')")
                .execute(&*pool)
                .await
                .unwrap();
            assert_eq!(task.await.unwrap().unwrap(), "one");
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
                .await
                .unwrap();
            listener.listen("pgfx_jobs").await.unwrap();
            let _listening = tokio::spawn(async move { while listener.recv().await.is_ok() {} });
            pool.release().await.unwrap();
        });
    }
    let after = fixture.stats();
    if read {
        assert_eq!(after.workers_reset, before.workers_reset, "{after:?}");
        assert_eq!(
            after.pools_unchanged,
            before.pools_unchanged + 6,
            "{after:?}"
        );
    }
}

/// What a test leaves in the session of its `TestDb` connection that a rollback does
/// not undo (a session advisory lock, a statement prepared with SQL, the sequences'
/// `currval`) is gone for the next test, on the same connection. In-process the end of
/// the test clears it; under nextest (one test per process) the next handle of the
/// process does, before its test begins.
#[tokio::test]
async fn the_session_of_a_test_db_never_reaches_the_next_test() {
    let fixture = single_worker();
    let mut db = TestDb::acquire(&fixture).await.unwrap();
    let first = backend_pid(&mut db).await;
    sqlx::raw_sql(
        "PREPARE pgfx_mine AS SELECT 1; SELECT pg_advisory_lock(4343); \
         SELECT nextval('notes_id_seq')",
    )
    .execute(&mut *db)
    .await
    .unwrap();
    db.release().await.unwrap();

    let mut db = TestDb::acquire(&fixture).await.unwrap();
    assert_eq!(backend_pid(&mut db).await, first, "another connection");
    sqlx::raw_sql("PREPARE pgfx_mine AS SELECT 2")
        .execute(&mut *db)
        .await
        .expect("the last test's prepared statement is still there");
    let (locks,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
    )
    .fetch_one(&mut *db)
    .await
    .unwrap();
    assert_eq!(
        locks, 0,
        "the last test's session advisory lock is still held"
    );
    db.release().await.unwrap();
    let mut db = TestDb::acquire(&fixture).await.unwrap();
    let currval = sqlx::query("SELECT currval('notes_id_seq')")
        .execute(&mut *db)
        .await;
    assert!(currval.is_err(), "the last test's currval is still defined");
}

/// A test process run by the tests below, as nextest runs one
/// (`NEXTEST_EXECUTION_MODE=process-per-test`), on the worker `PGFIXTURE_WORKER` of
/// `PGFIXTURE_RUN_ID`: `pool` writes through a worker pool and waits to be killed;
/// `count` reports the rows such a process left and the resets it made.
#[test]
#[ignore = "helper, run as a child process by the tests below"]
fn child() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        match std::env::var("PGFIXTURE_TEST_CHILD").unwrap().as_str() {
            "pool" => {
                let pool = pgfixture::sqlx::worker_pool().await.unwrap();
                pgfixture::sqlx::query("INSERT INTO notes (owner, body) VALUES ('killed', 'x')")
                    .execute(&*pool)
                    .await
                    .unwrap();
                println!("CHILD-COMMITTED");
                tokio::time::sleep(std::time::Duration::from_secs(120)).await;
            }
            "count" => {
                let mut db = pgfixture::sqlx::worker_db().await.unwrap();
                let n = count(&mut db, "killed").await;
                db.release().await.unwrap();
                let stats = Fixture::from_env().unwrap().stats();
                println!(
                    "CHILD-COUNT notes={n} reset={} attached={}",
                    stats.workers_reset, stats.workers_attached
                );
            }
            other => panic!("unknown child mode {other}"),
        }
    });
}

fn child_env<'a>(run: &'a str, mode: &'a str) -> [(&'a str, &'a str); 5] {
    // On a server of the user's, a process that finds its worker ready records the run
    // alive (on a maintenance connection, on pgfixture's runtime) once a quarter of the
    // grace has passed since the run's last process did: a grace long enough that the
    // next child never comes that late, however loaded the machine.
    let grace = if std::env::var("PGFIXTURE_BACKEND").as_deref() == Ok("url") {
        "120"
    } else {
        "5"
    };
    [
        ("PGFIXTURE_RUN_ID", run),
        ("PGFIXTURE_WORKER", "prime"),
        ("PGFIXTURE_GRACE", grace),
        ("NEXTEST_EXECUTION_MODE", "process-per-test"),
        ("PGFIXTURE_TEST_CHILD", mode),
    ]
}

/// The rows of killed processes the `count` child saw, the resets it made, and whether
/// it found its worker ready on its first connection.
fn counted(run: &str) -> (u64, u64, u64) {
    let (stdout, _) = common::run_child_ok(&child_env(run, "count"));
    (
        common::reported(&stdout, "notes"),
        common::reported(&stdout, "reset"),
        common::reported(&stdout, "attached"),
    )
}

/// A process of one test checks its worker with the test's `BEGIN`, in one round trip:
/// a worker that another process left ready is taken as it is, and one left marked by a
/// process killed with its worker pool out fails the check and is reset before the
/// test runs.
#[test]
fn a_process_checks_its_worker_with_the_begin_and_resets_a_marked_one() {
    let run = unique_run("sqlxprime");
    assert_eq!(counted(&run), (0, 0, 0), "provisioned");
    assert_eq!(counted(&run), (0, 0, 1), "found ready by the check");
    common::kill_child_after(&child_env(&run, "pool"), "CHILD-COMMITTED");
    assert_eq!(counted(&run), (0, 1, 0), "the marked worker is reset");
    assert_eq!(counted(&run), (0, 0, 1), "and then found ready");
}

/// A nextest process's `#[pgfixture::test]` (run by the test below, with
/// `NEXTEST_EXECUTION_MODE=process-per-test`): its connection lives on the test's own
/// runtime, and its end runs there once the test is over. `count` reports the rows such
/// tests left and pgfixture's background threads; the others commit, then end: by
/// dropping the handle, by panicking, or with the handle in a task the test left
/// running, which drops with the runtime.
#[pgfixture::test]
#[ignore = "helper, run as a child process by the test below"]
async fn scoped_child(mut db: TestDb) {
    let commit = async |db: &mut TestDb| {
        insert(db, "scoped").await;
        pgfixture::sqlx::raw_sql("COMMIT")
            .execute(&mut **db)
            .await
            .unwrap();
    };
    match std::env::var("PGFIXTURE_TEST_CHILD").unwrap().as_str() {
        "count" => {
            let n = count(&mut db, "scoped").await;
            let threads = std::fs::read_dir("/proc/self/task")
                .unwrap()
                .flatten()
                .filter(|task| {
                    std::fs::read_to_string(task.path().join("comm"))
                        .is_ok_and(|name| name.trim() == "pgfixture")
                })
                .count();
            println!("CHILD-COUNT notes={n} threads={threads}");
        }
        "commit" => commit(&mut db).await,
        "panic" => {
            commit(&mut db).await;
            panic!("the test fails after its commit");
        }
        "task" => {
            commit(&mut db).await;
            tokio::spawn(async move {
                let _held = db;
                std::future::pending::<()>().await;
            });
        }
        other => panic!("unknown child mode {other}"),
    }
}

/// Runs [`scoped_child`] in `mode`, as nextest runs a test: a process of its own.
fn scoped(run: &str, mode: &str) -> std::process::Output {
    common::named_child_command("scoped_child", &child_env(run, mode))
        .output()
        .expect("running the child test")
}

/// Under nextest, a `#[pgfixture::test]` on a current-thread runtime opens its
/// connection on that runtime (a warm process starts no background thread), and a
/// commit is found and the worker reset however the test ends: its handle dropped,
/// a panic, or the handle dropped with the runtime by a task the test left running
/// (whose commit cannot be read: the worker is reset all the same).
#[test]
fn a_nextest_attribute_test_ends_on_its_own_runtime_however_it_ends() {
    let run = unique_run("sqlxscope");
    let counted = |what: &str| {
        let out = scoped(&run, "count");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{what}: {stdout}\n{stderr}");
        (
            common::reported(&stdout, "notes"),
            common::reported(&stdout, "threads"),
        )
    };
    assert_eq!(counted("provisioned").0, 0);
    assert_eq!(counted("warm"), (0, 0), "a warm process's threads");
    for (mode, succeeds, said) in [
        ("commit", true, "committed its transaction"),
        ("panic", false, "committed its transaction"),
        ("task", true, "closed with the test's runtime"),
    ] {
        let out = scoped(&run, mode);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.success(), succeeds, "{mode}: {stderr}");
        assert!(stderr.contains(said), "{mode}: {stderr}");
        assert_eq!(counted(mode), (0, 0), "after {mode}: the worker was reset");
    }
}

/// Tests whose clock is paused (`start_paused`, `tokio::time::pause()`): the clock
/// jumps to the next timer while the test waits on the server, yet the rollback at
/// release (in the test's own task) and the worker pool's clearing do not time out:
/// pgfixture's timers run on a clock of its own then. The same backend serves every
/// test, and no worker is rebuilt.
#[test]
fn a_paused_clock_times_out_nothing() {
    // A configuration of its own: no other test's reset counts.
    let fixture = Fixture::builder()
        .workers(1)
        .pool_size(9)
        .build()
        .expect("fixture");
    let read = common::paused_runtime().block_on(pools_read(&fixture));
    let mut pids = std::collections::BTreeSet::new();
    for round in 0..10 {
        common::paused_runtime().block_on(async {
            let mut db = TestDb::acquire(&fixture).await.unwrap();
            common::an_hour_passes_at_once().await;
            sqlx::query("SELECT pg_sleep(0.01)")
                .execute(&mut *db)
                .await
                .unwrap();
            pids.insert(backend_pid(&mut db).await);
            if round % 2 == 0 {
                db.release().await.unwrap();
            }
        });
    }
    assert_eq!(pids.len(), 1, "new backends: {pids:?}");
    for _ in 0..5 {
        common::paused_runtime().block_on(async {
            let pool = WorkerPool::acquire(&fixture).await.unwrap();
            sqlx::query("SELECT pg_sleep(0.01)")
                .execute(&*pool)
                .await
                .unwrap();
            common::an_hour_passes_at_once().await;
            pool.release().await.unwrap();
        });
    }
    // Before PostgreSQL 15 a worker pool cannot be read: a rebuild after each.
    let stats = fixture.stats();
    assert_eq!(stats.workers_reset, if read { 0 } else { 5 }, "{stats:?}");
}
