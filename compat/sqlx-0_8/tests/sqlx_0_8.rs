//! `#[sqlx::test]`'s signatures of sqlx 0.8, renamed to `#[pgfixture::test]` (feature
//! `sqlx-0_8`): the handles are this crate's own sqlx 0.8 types, on a worker whose
//! template holds `migrations/`, applied once by pgfixture. Each test commits a row of
//! its own and first asserts that it sees no other test's: a leak between tests,
//! workers or runs fails it, under `cargo test` and `cargo nextest run` alike.

use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Postgres};

/// The application's own migrator over the same folder, as its start-up runs it.
static MIGRATOR: Migrator = sqlx::migrate!();

/// Asserts that the worker holds only what the migrations seeded, then commits a row
/// of the test's own, which no other test may see.
async fn alone(conn: &mut PgConnection, owner: &str) {
    let owners: Vec<String> = sqlx::query_scalar("SELECT owner FROM notes ORDER BY id")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert_eq!(owners, ["seed"], "rows another test left, seen by {owner}");
    sqlx::query("INSERT INTO notes (owner, body) VALUES ($1, 'committed')")
        .bind(owner)
        .execute(&mut *conn)
        .await
        .unwrap();
}

/// Whether `conn` is inside a transaction: `now()` is its start, the same for two
/// statements only when they run in one transaction.
async fn in_transaction(conn: &mut PgConnection) -> bool {
    let mut starts = Vec::new();
    for _ in 0..2 {
        let start: String = sqlx::query_scalar("SELECT now()::text")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        starts.push(start);
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    starts[0] == starts[1]
}

macro_rules! pool_tests {
    ($($name:ident),*) => {
        $(
            #[pgfixture::test]
            async fn $name(pool: PgPool) {
                // As many connections at once as #[sqlx::test]'s pools allow.
                assert_eq!(pool.options().get_max_connections(), 5);
                alone(&mut pool.acquire().await.unwrap(), stringify!($name)).await;
                // Also through the pool itself, and in a transaction of the code's own.
                let mut tx = pool.begin().await.unwrap();
                sqlx::query("INSERT INTO tags (note_id, tag) SELECT id, 'x' FROM notes")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            }
        )*
    };
}

pool_tests!(
    pool_a, pool_b, pool_c, pool_d, pool_e, pool_f, pool_g, pool_h, pool_i, pool_j, pool_k, pool_l
);

/// A test that fails after its commit, with a connection of its pool still held: the
/// worker is put back all the same (the other tests' `alone` would see its row).
#[pgfixture::test]
#[should_panic(expected = "fails after its commit")]
async fn fails_after_its_commit(pool: PgPool) {
    let mut conn = pool.acquire().await.unwrap();
    alone(&mut conn, "fails_after_its_commit").await;
    panic!("the test fails after its commit");
}

#[pgfixture::test]
async fn takes_a_pool_connection(mut conn: PoolConnection<Postgres>) {
    // Inside the test's transaction, as #[pgfixture::test] gives a connection.
    assert!(in_transaction(&mut conn).await);
    alone(&mut conn, "pool connection").await;
}

#[pgfixture::test]
async fn takes_a_pg_connection(mut conn: PgConnection) {
    alone(&mut conn, "connection").await;
    // The code under test's transaction is a savepoint in the test's: its commit
    // leaves the test's open.
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("DELETE FROM notes WHERE owner = 'seed'")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(in_transaction(&mut conn).await);
    // Left to drop: the release waits for it to close.
}

#[pgfixture::test]
async fn takes_the_two_options(opts: PgPoolOptions, connect: PgConnectOptions) {
    assert_eq!(opts.get_max_connections(), 5);
    let pool = opts.connect_with(connect).await.unwrap();
    assert!(!in_transaction(&mut pool.acquire().await.unwrap()).await);
    alone(&mut pool.acquire().await.unwrap(), "options").await;
    // Dropped without close(): the release waits for its connections to close.
}

#[pgfixture::test(fixtures("users"))]
async fn applies_fixtures(pool: PgPool) {
    let owners: Vec<String> = sqlx::query_scalar("SELECT owner FROM notes ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(owners, ["seed", "fixture"]);
}

/// A connection's fixtures apply inside the test's transaction, rolled back with it:
/// the other tests' `alone` would see the row otherwise.
#[pgfixture::test(fixtures("users"))]
async fn a_connection_sees_the_fixtures(mut conn: PoolConnection<Postgres>) {
    assert!(in_transaction(&mut conn).await);
    let owners: Vec<String> = sqlx::query_scalar("SELECT owner FROM notes ORDER BY id")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert_eq!(owners, ["seed", "fixture"]);
}

#[pgfixture::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_multi_thread_runtime(pool: PgPool) {
    let pool2 = pool.clone();
    tokio::spawn(async move { alone(&mut pool2.acquire().await.unwrap(), "multi").await })
        .await
        .unwrap();
}

#[pgfixture::test]
async fn returns_a_result(pool: PgPool) -> sqlx::Result<()> {
    alone(&mut *pool.acquire().await?, "result").await;
    Ok(())
}

/// Asserts that `_sqlx_migrations` holds what `migrator` (sqlx 0.8's) writes, so that
/// the application's own `run()` at start-up finds nothing to do, and runs it.
async fn finds_nothing_to_do(pool: &PgPool, migrator: &Migrator) {
    type Row = (i64, String, Vec<u8>, bool);
    let read = || {
        sqlx::query_as::<_, Row>(
            "SELECT version, description, checksum, success FROM _sqlx_migrations ORDER BY version",
        )
        .fetch_all(pool)
    };
    let written = read().await.unwrap();
    let expected: Vec<Row> = migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .map(|m| {
            (
                m.version,
                m.description.to_string(),
                m.checksum.to_vec(),
                true,
            )
        })
        .collect();
    assert_eq!(written, expected);
    migrator.run(pool).await.unwrap();
    assert_eq!(read().await.unwrap(), written);
}

/// What pgfixture's migrator (sqlx 0.9's) wrote is what sqlx 0.8 writes: the
/// application's own `migrate!().run()` at start-up finds nothing to do.
#[pgfixture::test]
async fn the_apps_migrator_finds_nothing_to_do(pool: PgPool) {
    finds_nothing_to_do(&pool, &MIGRATOR).await;
    let seeds: i64 = sqlx::query_scalar("SELECT count(*) FROM notes")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(seeds, 1, "the seed migration ran again");
}

/// `migrator = "..."` naming the application's own sqlx 0.8 migrator, as
/// `#[sqlx::test]` takes it: its migrations, as it writes them.
#[pgfixture::test(migrator = "MIGRATOR")]
async fn takes_the_apps_migrator(pool: PgPool) {
    finds_nothing_to_do(&pool, &MIGRATOR).await;
    alone(&mut pool.acquire().await.unwrap(), "migrator").await;
}

/// Another folder's migrator (versions 1, 2 and a reversible 10): its migrations, not
/// `migrations/`'s, in numeric order, and no down migration. Its first creates an
/// extension: in schema mode, sqlx 0.8's migrator runs it without that statement, which
/// runs once per database.
static OTHER: Migrator = sqlx::migrate!("tests/other_migrations");

#[pgfixture::test(migrator = "OTHER")]
async fn takes_another_migrator(mut conn: PgConnection) {
    // On the search path: the worker's schema in schema mode.
    let tables: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT to_regclass(t)::text FROM unnest(ARRAY['notes', 'widgets', 'widgets_owner', 'gadgets']) t",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let found = |t: &str| Some(t.to_owned());
    assert_eq!(
        tables,
        [
            None,
            found("widgets"),
            found("widgets_owner"),
            found("gadgets")
        ]
    );
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY installed_on, version")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(versions, [1, 2, 10]);
    let owners: Vec<String> = sqlx::query_scalar("SELECT owner FROM widgets")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(owners, ["seed"]);
    let tagged: i64 = sqlx::query_scalar("SELECT count(*) FROM widgets WHERE tag = 'SEED'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(tagged, 1, "citext compares without case");
    assert!(in_transaction(&mut conn).await);
}

#[pgfixture::test(migrator = "OTHER")]
async fn another_migrator_finds_nothing_to_do(pool: PgPool) {
    finds_nothing_to_do(&pool, &OTHER).await;
    let owners: Vec<String> = sqlx::query_scalar("SELECT owner FROM widgets")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(owners, ["seed"], "rows another test left");
    sqlx::query("INSERT INTO widgets (owner) VALUES ('committed')")
        .execute(&pool)
        .await
        .unwrap();
}

/// The builder takes sqlx 0.8's migrator too, for a plain `#[tokio::test]`: run by
/// sqlx 0.8, it leaves what the migrator itself writes.
#[tokio::test]
async fn the_builder_takes_a_migrator_of_sqlx_0_8() {
    let fixture = pgfixture::Fixture::builder()
        .sqlx_migrator(&OTHER)
        .build()
        .unwrap();
    let pool = fixture.worker_pool().await.unwrap();
    let client = pool.get().await.unwrap();
    let recorded: Vec<(i64, Vec<u8>)> = client
        .query(
            "SELECT version, checksum FROM _sqlx_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let expected: Vec<(i64, Vec<u8>)> = OTHER
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .map(|m| (m.version, m.checksum.to_vec()))
        .collect();
    assert_eq!(recorded, expected);
    drop(client);
    pool.release().await.unwrap();
}

/// A migration of a sqlx 0.8 migrator that fails: the error names its version,
/// description, line and statement, and the server's message.
#[tokio::test]
async fn a_failing_migration_of_sqlx_0_8_is_named() {
    let dir = std::env::temp_dir().join(format!("pgfx-compat-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("1_ok.sql"), "CREATE TABLE fine (id int);").unwrap();
    std::fs::write(
        dir.join("2_bad.sql"),
        "CREATE TABLE later (id int);\nSELECT no_such_column FROM later;",
    )
    .unwrap();
    let migrator: &'static Migrator =
        Box::leak(Box::new(Migrator::new(dir.as_path()).await.unwrap()));
    std::fs::remove_dir_all(&dir).unwrap();
    let fixture = pgfixture::Fixture::builder()
        .sqlx_migrator(migrator)
        .build()
        .unwrap();
    let error = fixture
        .worker_db()
        .await
        .expect_err("a failing migration")
        .to_string();
    for wanted in [
        "migration 2 (bad) of the sqlx migrator given in code, line 2",
        "in `SELECT no_such_column FROM later",
        "column \"no_such_column\" does not exist",
    ] {
        assert!(error.contains(wanted), "{wanted:?} not in: {error}");
    }
}

/// `migrations = false`, and the test runs the application's migrator itself (DDL
/// through the pool: the worker is rebuilt after it).
#[pgfixture::test(migrations = false)]
async fn runs_its_own_migrations(pool: PgPool) {
    let notes: Option<String> = sqlx::query_scalar("SELECT to_regclass('notes')::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(notes, None);
    MIGRATOR.run(&pool).await.unwrap();
    alone(&mut pool.acquire().await.unwrap(), "own migrations").await;
}

/// `conn` goes through the server's Unix socket, as pgfixture's own connections (a
/// local server always has one): no TCP, no password exchange. Its application_name,
/// by which the release finds it, is pgfixture's.
async fn through_the_socket(conn: &mut PgConnection) {
    let (port, name): (Option<i32>, String) =
        sqlx::query_as("SELECT inet_server_port(), current_setting('application_name')")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    if std::env::var("PGFIXTURE_BACKEND").as_deref() == Ok("local") {
        assert_eq!(port, None, "connected over TCP");
    }
    assert!(name.starts_with("pgfixture/"), "{name}");
}

#[pgfixture::test]
async fn connects_through_the_socket(pool: PgPool) {
    through_the_socket(&mut pool.acquire().await.unwrap()).await;
}

#[pgfixture::test]
async fn a_connection_of_its_own_connects_through_the_socket(mut conn: PgConnection) {
    through_the_socket(&mut conn).await;
}

/// pgfixture's own handles still work beside sqlx 0.8's.
#[pgfixture::test]
async fn a_pgfixture_handle_beside(db: pgfixture::TestDb) {
    let n: i64 = db
        .query_one("SELECT count(*) FROM notes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

/// sqlx 0.9's types, through pgfixture's re-export, still get pgfixture's sqlx handles
/// beside sqlx 0.8's, with both features on (this crate's feature `sqlx-0_9`).
#[cfg(feature = "sqlx-0_9")]
#[pgfixture::test]
async fn a_sqlx_0_9_pool_beside(pool: pgfixture::sqlx::PgPool) {
    let n: i64 = pgfixture::sqlx::query_scalar("SELECT count(*) FROM notes")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

/// The backends that [`one_of_twenty`] and [`one_of_twenty_by_connection`] ran on,
/// and which of the two ran.
static BACKENDS: std::sync::Mutex<Vec<(i32, Handle)>> = std::sync::Mutex::new(Vec::new());
/// Whether [`one_of_twenty`] ran before PostgreSQL 15, which lets pgfixture read no
/// worker: each worker pool is followed by a rebuild, and a new pool.
static BEFORE_15: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Handle {
    Pool,
    Connection,
}

/// The body of [`one_of_twenty`] and [`one_of_twenty_by_connection`]: it finds its
/// worker as the migrations left it, with a session nothing was left in, then writes
/// a row and leaves a setting and an advisory lock in its connection's session.
async fn one_of_twenty_on(conn: &mut PgConnection, handle: Handle) {
    let (pid, timeout, locks, before_15): (i32, String, i64, bool) = sqlx::query_as(
        "SELECT pg_backend_pid(), current_setting('statement_timeout'), \
         (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()), \
         current_setting('server_version_num')::int < 150000",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    BEFORE_15.store(before_15, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        (timeout.as_str(), locks),
        ("0", 0),
        "what an earlier test left"
    );
    alone(&mut *conn, "one_of_twenty").await;
    sqlx::raw_sql("SET statement_timeout = '7s'; SELECT pg_advisory_lock(4242)")
        .execute(&mut *conn)
        .await
        .unwrap();
    BACKENDS.lock().unwrap().push((pid, handle));
}

/// One `PgPool` test of [`the_pool_outlives_the_runtimes_of_tests`]: it commits.
#[pgfixture::test]
#[ignore = "run ten times by the_pool_outlives_the_runtimes_of_tests"]
async fn one_of_twenty(pool: PgPool) {
    one_of_twenty_on(&mut pool.acquire().await.unwrap(), Handle::Pool).await;
}

/// One `PoolConnection` test of [`the_pool_outlives_the_runtimes_of_tests`]: a
/// connection of the same kept pool, inside the test's transaction.
#[pgfixture::test]
#[ignore = "run ten times by the_pool_outlives_the_runtimes_of_tests"]
async fn one_of_twenty_by_connection(mut conn: PoolConnection<Postgres>) {
    assert!(in_transaction(&mut conn).await);
    one_of_twenty_on(&mut conn, Handle::Connection).await;
}

/// Twenty tests that take sqlx 0.8's `PgPool` or `PoolConnection<Postgres>`, in turns,
/// one after the other, each on a `#[tokio::test]` runtime of its own: the worker's
/// sqlx 0.8 pool is kept from test to test as sqlx 0.9's is, for both types, its
/// connections outlive the runtimes, and what each test left (a row, a setting, a
/// lock) is gone for the next. Under `cargo test` the thread's slot is free between
/// two of them, so they may take turns on two workers (two pools), and a test of sqlx
/// 0.9's pool on one of them closes its sqlx 0.8 pool: most, not all, reuse a backend
/// an earlier one used (at least half, of each type). A new pool per test would reuse
/// none.
#[test]
fn the_pool_outlives_the_runtimes_of_tests() {
    for i in 0..20 {
        if i % 2 == 0 {
            one_of_twenty();
        } else {
            one_of_twenty_by_connection();
        }
    }
    let ran = BACKENDS.lock().unwrap().clone();
    let reused = |handle| {
        ran.iter()
            .enumerate()
            .filter(|(i, (pid, by))| *by == handle && ran[..*i].iter().any(|(p, _)| p == pid))
            .count()
    };
    let reused = [reused(Handle::Pool), reused(Handle::Connection)];
    if BEFORE_15.load(std::sync::atomic::Ordering::SeqCst) {
        // Rebuilt after every test, with a new pool each time.
        assert_eq!(reused, [0, 0], "{ran:?}");
        return;
    }
    assert!(
        reused.iter().all(|&n| n >= 5),
        "new backends from test to test: {reused:?} reused, {ran:?}"
    );
}

#[cfg(feature = "sqlx-0_9")]
/// The connections of the worker's kept sqlx pool open on the server, seen from one
/// of them (they share its `application_name`), once they have settled: a pool closed
/// as the other major's was made ends its connections a moment later.
async fn kept_connections(conn: &mut PgConnection) -> i64 {
    let mut open = 0;
    for _ in 0..200 {
        open = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = current_setting('application_name')",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        if open <= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    open
}

/// One sqlx 0.8 test of [`pools_of_both_majors_take_turns`].
#[cfg(feature = "sqlx-0_9")]
#[pgfixture::test]
#[ignore = "run by pools_of_both_majors_take_turns"]
async fn a_turn_of_sqlx_0_8(pool: PgPool) {
    let mut conn = pool.acquire().await.unwrap();
    alone(&mut conn, "a_turn_of_sqlx_0_8").await;
    assert!(kept_connections(&mut conn).await <= 2);
}

/// One sqlx 0.9 test of [`pools_of_both_majors_take_turns`].
#[cfg(feature = "sqlx-0_9")]
#[pgfixture::test]
#[ignore = "run by pools_of_both_majors_take_turns"]
async fn a_turn_of_sqlx_0_9(pool: pgfixture::sqlx::PgPool) {
    let (seen, open): (i64, i64) = pgfixture::sqlx::query_as(
        "SELECT (SELECT count(*) FROM notes), (SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = current_setting('application_name'))",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(seen, 1, "rows another test left");
    pgfixture::sqlx::query("INSERT INTO notes (owner, body) VALUES ('sqlx 0.9', 'x')")
        .execute(&pool)
        .await
        .unwrap();
    // Settling is the sqlx 0.8 turn's to wait for.
    assert!(open <= 4, "{open} kept connections");
}

/// Tests of sqlx 0.8's `PgPool` and of sqlx 0.9's take turns on one worker (both
/// features on, this crate's feature `sqlx-0_9`): each finds
/// the worker as the migrations left it, and the worker keeps the pool of one major at
/// a time (two connections at most), within what its pool size leaves to the drivers.
#[cfg(feature = "sqlx-0_9")]
#[test]
fn pools_of_both_majors_take_turns() {
    for _ in 0..4 {
        a_turn_of_sqlx_0_8();
        a_turn_of_sqlx_0_9();
    }
}
