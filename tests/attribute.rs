//! `#[pgfixture::test]`: each handle type it gives, per-test fixtures, runtime options,
//! tests that return `Result`, and isolation between its tests (each inserts the same
//! row and expects to be alone). Runs on the backend and isolation mode the environment
//! selects, under `cargo test` and `cargo nextest run`.

use std::process::Command;

use pgfixture::{TestDb, WorkerPool};

mod common;

async fn notes(db: &TestDb, owner: &str) -> i64 {
    db.query_one("SELECT count(*) FROM notes WHERE owner = $1", &[&owner])
        .await
        .unwrap()
        .get(0)
}

/// Each of these inserts one row and expects to be alone: a leak from any other test
/// of the file (which all use the owner `isolated`) fails it.
async fn alone(db: &TestDb) {
    assert_eq!(
        notes(db, "isolated").await,
        0,
        "another test's row leaked in"
    );
    db.execute(
        "INSERT INTO notes (owner, body) VALUES ('isolated', 'x')",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(notes(db, "isolated").await, 1);
}

#[pgfixture::test]
async fn takes_a_test_db(db: TestDb) {
    alone(&db).await;
}

#[pgfixture::test]
async fn takes_a_test_db_again(db: TestDb) {
    alone(&db).await;
}

#[pgfixture::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_on_a_multi_thread_runtime(db: TestDb) {
    assert_eq!(
        tokio::runtime::Handle::current().runtime_flavor(),
        tokio::runtime::RuntimeFlavor::MultiThread
    );
    alone(&db).await;
}

#[pgfixture::test(fixtures("seed_notes", "seed_more.sql"))]
async fn applies_fixtures_inside_the_transaction(db: TestDb) {
    assert_eq!(notes(&db, "attribute").await, 2);
    alone(&db).await;
}

#[pgfixture::test(fixtures(path = "fixtures", scripts("seed_notes")))]
async fn applies_fixtures_from_a_path(db: TestDb) {
    assert_eq!(notes(&db, "attribute").await, 1);
}

#[pgfixture::test(fixtures("fixtures/seed_notes.sql"))]
async fn applies_fixtures_by_explicit_path(db: TestDb) {
    assert_eq!(notes(&db, "attribute").await, 1);
}

#[pgfixture::test]
async fn sees_no_fixture_of_other_tests(db: TestDb) {
    assert_eq!(
        notes(&db, "attribute").await,
        0,
        "a per-test fixture leaked"
    );
}

#[pgfixture::test]
async fn returns_a_result(db: TestDb) -> Result<(), pgfixture::tokio_postgres::Error> {
    db.execute(
        "INSERT INTO notes (owner, body) VALUES ('result', 'x')",
        &[],
    )
    .await?;
    Ok(())
}

#[pgfixture::test]
#[should_panic(expected = "the test's own panic")]
async fn keeps_other_attributes(_db: TestDb) {
    panic!("the test's own panic");
}

#[pgfixture::test]
async fn takes_no_handle() {
    tokio::task::yield_now().await;
}

#[pgfixture::test]
async fn takes_a_worker_pool(pool: WorkerPool) {
    let client = pool.get().await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM notes WHERE owner = 'isolated'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "another test's row leaked in");
    client
        .execute(
            "INSERT INTO notes (owner, body) VALUES ('isolated', 'committed')",
            &[],
        )
        .await
        .unwrap();
}

/// A test that fails after its commit, with a connection of the pool still held: the
/// worker is put back all the same (`takes_a_worker_pool` would see the row).
#[pgfixture::test]
#[should_panic(expected = "fails after its commit")]
async fn a_worker_pool_test_that_fails_after_its_commit(pool: WorkerPool) {
    let client = pool.get().await.unwrap();
    client
        .execute(
            "INSERT INTO notes (owner, body) VALUES ('isolated', 'committed, then failed')",
            &[],
        )
        .await
        .unwrap();
    panic!("the test fails after its commit");
}

/// Code of the crate's that builds part of the template: here a table and a row, as an
/// application's own code would seed them.
async fn bootstrap(url: pgfixture::DatabaseUrl) -> Result<(), pgfixture::tokio_postgres::Error> {
    let (client, connection) =
        pgfixture::tokio_postgres::connect(url.as_str(), pgfixture::tokio_postgres::NoTls).await?;
    let task = tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE TABLE bootstrapped (what text); INSERT INTO bootstrapped VALUES ('by code')",
        )
        .await?;
    drop(client);
    let _ = task.await;
    Ok(())
}

/// `setup` runs the crate's code once into the template of the test's handle, after
/// the migrations and before the fixtures (the crate's `fixtures/` here, whose notes
/// table the test also sees), keyed by `setup_version`.
#[pgfixture::test(migrations = false, setup = "bootstrap", setup_version = "attribute-1")]
async fn setup_code_builds_the_template_of_the_tests_handle(db: TestDb) {
    let what: String = db
        .query_one("SELECT what FROM bootstrapped", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(what, "by code");
    alone(&db).await;
}

#[cfg(feature = "sqlx")]
mod sqlx_handles {
    use pgfixture::sqlx::{self, Connection, PgConnection, PgPool, Postgres};
    use sqlx::pool::PoolConnection;

    async fn alone(conn: &mut PgConnection) {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notes WHERE owner = 'isolated'")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(n, 0, "another test's row leaked in");
        // Through the code under test's own transaction: a savepoint.
        let mut tx = conn.begin().await.unwrap();
        sqlx::query("INSERT INTO notes (owner, body) VALUES ('isolated', 'x')")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    #[pgfixture::test]
    async fn takes_a_sqlx_test_db(mut db: pgfixture::sqlx::TestDb) {
        alone(&mut db).await;
    }

    /// The same setup for a pool: the same fixture, with the same template.
    #[pgfixture::test(
        migrations = false,
        setup = "super::bootstrap",
        setup_version = "attribute-1"
    )]
    async fn setup_code_builds_the_template_of_a_pool(pool: PgPool) {
        let what: String = sqlx::query_scalar("SELECT what FROM bootstrapped")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(what, "by code");
    }

    #[pgfixture::test(fixtures("seed_notes"))]
    async fn takes_a_sqlx_test_db_with_fixtures(mut db: pgfixture::sqlx::TestDb) {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notes WHERE owner = 'attribute'")
            .fetch_one(&mut *db)
            .await
            .unwrap();
        assert_eq!(n, 1);
        alone(&mut db).await;
    }

    #[pgfixture::test]
    async fn takes_a_pg_pool(pool: PgPool) {
        // As many connections at once as #[sqlx::test]'s pools allow.
        assert_eq!(pool.options().get_max_connections(), 5);
        let mut conn = pool.acquire().await.unwrap();
        alone(&mut conn).await;
        // Commits are allowed on the pool: the worker is reset afterwards.
        sqlx::query("INSERT INTO notes (owner, body) VALUES ('isolated', 'committed')")
            .execute(&pool)
            .await
            .unwrap();
    }

    /// A test that fails after its commits, with a connection of the pool still
    /// held: the worker is put back all the same (`alone` would see the row).
    #[pgfixture::test]
    #[should_panic(expected = "fails after its commit")]
    async fn a_pg_pool_test_that_fails_after_its_commit(pool: PgPool) {
        let mut conn = pool.acquire().await.unwrap();
        alone(&mut conn).await;
        sqlx::query("INSERT INTO notes (owner, body) VALUES ('isolated', 'committed')")
            .execute(&mut *conn)
            .await
            .unwrap();
        panic!("the test fails after its commit");
    }

    #[pgfixture::test(fixtures("seed_notes"))]
    async fn takes_a_pg_pool_with_fixtures(pool: PgPool) {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notes WHERE owner = 'attribute'")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, 1);
    }

    #[pgfixture::test]
    async fn takes_a_pool_connection(mut conn: PoolConnection<Postgres>) {
        alone(&mut conn).await;
    }

    #[pgfixture::test]
    async fn takes_a_pg_connection(mut conn: PgConnection) {
        alone(&mut conn).await;
        // Through the server's Unix socket, as pgfixture's own connections (a local
        // server always has one): no TCP, no password exchange.
        if std::env::var("PGFIXTURE_BACKEND").as_deref() == Ok("local") {
            let port: Option<i32> = sqlx::query_scalar("SELECT inet_server_port()")
                .fetch_one(&mut conn)
                .await
                .unwrap();
            assert_eq!(port, None, "connected over TCP");
        }
        // A commit of its own through raw SQL: the worker is put back after the test.
        sqlx::raw_sql(
            "COMMIT; INSERT INTO notes (owner, body) VALUES ('isolated', 'raw commit'); BEGIN",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
    }

    /// `#[sqlx::test]`'s two parameters: a pool and a connection of the test's own,
    /// both committing. The pool is dropped without `close()`, and the connection
    /// left to drop: the release waits for both to close before it reads the worker.
    #[pgfixture::test]
    async fn takes_pool_and_connect_options(
        opts: sqlx::postgres::PgPoolOptions,
        connect: sqlx::postgres::PgConnectOptions,
    ) {
        assert_eq!(opts.get_max_connections(), 5);
        let pool = opts.connect_with(connect.clone()).await.unwrap();
        alone(&mut pool.acquire().await.unwrap()).await;
        sqlx::query("INSERT INTO notes (owner, body) VALUES ('isolated', 'committed')")
            .execute(&pool)
            .await
            .unwrap();
        let mut own = PgConnection::connect_with(&connect).await.unwrap();
        sqlx::query("INSERT INTO notes (owner, body) VALUES ('isolated', 'own connection')")
            .execute(&mut own)
            .await
            .unwrap();
    }

    /// The application's migrator, as `sqlx::migrate!` embeds it.
    static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("tests/migrations/sqlx");

    async fn accounts(conn: &mut PgConnection) -> Option<String> {
        sqlx::query_scalar("SELECT to_regclass('accounts')::text")
            .fetch_one(conn)
            .await
            .unwrap()
    }

    async fn recorded_versions(conn: &mut PgConnection) -> Vec<i64> {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(conn)
            .await
            .unwrap()
    }

    #[pgfixture::test(migrations = "tests/migrations/sqlx")]
    async fn takes_a_migrations_folder(mut db: pgfixture::sqlx::TestDb) {
        assert!(accounts(&mut db).await.is_some());
        assert_eq!(recorded_versions(&mut db).await, [1, 2, 10]);
        // The application's own start-up migration finds nothing to do.
        MIGRATOR.run(&mut *db).await.unwrap();
        alone(&mut db).await;
    }

    #[pgfixture::test(migrator = "MIGRATOR")]
    async fn takes_a_migrator(mut db: pgfixture::sqlx::TestDb) {
        assert!(accounts(&mut db).await.is_some());
        assert_eq!(recorded_versions(&mut db).await, [1, 2, 10]);
        alone(&mut db).await;
    }

    #[pgfixture::test(migrations = false, fixtures("seed_notes"))]
    async fn takes_no_migrations(mut db: pgfixture::sqlx::TestDb) {
        assert_eq!(accounts(&mut db).await, None);
        alone(&mut db).await;
    }

    #[pgfixture::test]
    async fn takes_a_sqlx_worker_pool(pool: pgfixture::sqlx::WorkerPool) {
        let mut conn = pool.acquire().await.unwrap();
        alone(&mut conn).await;
    }
}

/// Run by [`the_crate_directory_is_recorded_and_tests_are_named`] in a process of its
/// own, without `CARGO_MANIFEST_DIR`: the fixtures are found all the same.
#[pgfixture::test]
#[ignore = "run by the_crate_directory_is_recorded_and_tests_are_named"]
async fn child_outside_cargo(db: TestDb) {
    let seeded: i64 = db
        .query_one(
            "SELECT count(*) FROM users WHERE email = 'seed@example.com'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(seeded, 1, "the crate's fixtures were not applied");
}

/// The same, committing its transaction: the report names the test.
#[pgfixture::test]
#[ignore = "run by the_crate_directory_is_recorded_and_tests_are_named"]
async fn child_commits(db: TestDb) {
    db.batch_execute("COMMIT").await.unwrap();
}

/// Runs this binary's ignored test `name` with `CARGO_MANIFEST_DIR` removed, in a run
/// of its own (the runner's variables removed: its workers are not the parent run's).
fn run_outside_cargo(name: &str) -> std::process::Output {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ]);
    for var in [
        "CARGO_MANIFEST_DIR",
        "NEXTEST_TEST_GLOBAL_SLOT",
        "NEXTEST_RUN_ID",
        "PGFIXTURE_WORKER",
        "PGFIXTURE_RUN_ID",
    ] {
        command.env_remove(var);
    }
    command.output().expect("running the child test")
}

#[test]
fn the_crate_directory_is_recorded_and_tests_are_named() {
    let out = run_outside_cargo("child_outside_cargo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("applying no fixtures"),
        "the attribute did not record the crate's directory: {stderr}"
    );
    let out = run_outside_cargo("child_commits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("attribute::child_commits committed its transaction"),
        "the commit report does not name the test: {stderr}"
    );
}

/// `start_paused = true`, as `#[tokio::test]` takes it: the test's clock is paused. A
/// paused clock jumps to the next timer while the test waits on the server, yet the
/// handle's end (its rollback, on the test's runtime) still waits for the answer: the
/// test passes, which it cannot if the release fails.
#[pgfixture::test(start_paused = true)]
async fn start_paused_pauses_the_clock(mut db: pgfixture::sqlx::TestDb) {
    common::an_hour_passes_at_once().await;
    sqlx::query("SELECT pg_sleep(0.01)")
        .execute(&mut *db)
        .await
        .unwrap();
}

/// The same with the tokio-postgres handle.
#[pgfixture::test(start_paused = true)]
async fn start_paused_with_tokio_postgres(db: pgfixture::TestDb) {
    common::an_hour_passes_at_once().await;
    db.batch_execute("SELECT pg_sleep(0.01)").await.unwrap();
}

/// The same with `#[sqlx::test]`'s pool (the worker's, whose sessions are cleared after
/// the test).
#[pgfixture::test(start_paused = true)]
async fn start_paused_with_a_pool(pool: sqlx::PgPool) {
    sqlx::query("SELECT pg_sleep(0.01)")
        .execute(&pool)
        .await
        .unwrap();
    common::an_hour_passes_at_once().await;
}

/// A clock the test pauses itself, after its handle was made: it jumps to the next
/// timer while the test waits on the server, yet the handle's end (its rollback, on
/// the test's runtime under nextest) still waits for the answer. The test passes,
/// which it cannot if the release fails.
#[pgfixture::test]
async fn a_clock_paused_in_the_test(mut db: pgfixture::sqlx::TestDb) {
    tokio::time::pause();
    common::an_hour_passes_at_once().await;
    sqlx::query("SELECT pg_sleep(0.01)")
        .execute(&mut *db)
        .await
        .unwrap();
}
