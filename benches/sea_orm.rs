//! A sea-orm suite whose schema is sea-orm-migration's `Migrator` (30 migrations with
//! tables, indexes, functions and seed rows), side by side in one run:
//!
//! - `database per test`: what a sea-orm project's harness does: each test creates a
//!   database on a server that is already up (its data on disk, as users' servers keep
//!   it), runs `Migrator::up` in it, and drops it at the end;
//! - `pgfixture`: the same tests on `FixtureBuilder::setup` running the same
//!   `Migrator::up` once into the template, each test on the worker pool (sea-orm's
//!   way on pgfixture), from cold: a server of its own to start and the template to
//!   build, in every measured run.
//!
//! ```text
//! cargo bench --bench sea_orm
//! ```
//!
//! Tests run as `cargo test` runs them: on `threads` threads, each test on a runtime of
//! its own. `BENCH_TESTS` (default 40) sets the tests per run, `BENCH_REPEAT` (default
//! 3) the runs per cell, `BENCH_THREADS` (default `1,4`) the thread counts. Medians of
//! the wall time are printed.

#[path = "common/migration.rs"]
mod migration;
#[path = "common/run.rs"]
mod run;
use run::{env_or, median, run_suite};

use std::sync::Arc;

use sea_orm::{ConnectionTrait, Database, DatabaseConnection, SqlxPostgresConnector};
use sea_orm_migration::prelude::*;

const MIGRATIONS: usize = 30;

/// Migration `i` of the common set, as a project's `migration` crate holds it.
struct Step {
    name: String,
    sql: String,
}

impl MigrationName for Step {
    fn name(&self) -> &str {
        &self.name
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Step {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(&self.sql)
            .await
            .map(drop)
    }
}

struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        (1..=MIGRATIONS)
            .map(|i| {
                Box::new(Step {
                    name: format!("m20260101_{i:06}_t{i}"),
                    sql: migration::migration(i),
                }) as Box<dyn MigrationTrait>
            })
            .collect()
    }
}

/// One realistic small test body: a row written and counted.
async fn body(db: &DatabaseConnection, n: usize) {
    db.execute_unprepared(&format!(
        "INSERT INTO t1 (name, amount) VALUES ('test {n}', 10)"
    ))
    .await
    .unwrap();
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT count(*) AS n FROM t1 WHERE name LIKE 'test %'",
        ))
        .await
        .unwrap()
        .unwrap();
    let count: i64 = row.try_get("", "n").unwrap();
    assert_eq!(count, 1, "another test's row is visible");
}

/// A database per test on the server at `server_url` (`.../postgres`), migrated.
async fn database_per_test(server_url: Arc<str>, n: usize) {
    let name = format!("seabench_{}_{n}", std::process::id());
    let admin = Database::connect(&*server_url).await.unwrap();
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let url = match server_url.rsplit_once("/postgres") {
        Some((server, query)) => format!("{server}/{name}{query}"),
        None => unreachable!("a URL of the database postgres"),
    };
    let db = Database::connect(url).await.unwrap();
    Migrator::up(&db, None).await.unwrap();
    body(&db, n).await;
    db.close().await.unwrap();
    admin
        .execute_unprepared(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .unwrap();
    admin.close().await.unwrap();
}

/// The fixture of one cold run: a run id of its own (a server to start) and a version
/// of its own (a template to build).
fn fixture(run: &str, threads: usize) -> pgfixture::Fixture {
    let mut config = pgfixture::Config::from_env().expect("configuration");
    config.run_id = run.to_owned();
    pgfixture::Fixture::builder()
        .config(config)
        .workers(threads)
        .no_fixtures()
        .no_migrations()
        .setup(run, |url| async move {
            let db = Database::connect(url.as_str()).await?;
            Migrator::up(&db, None).await?;
            db.close().await
        })
        .build()
        .expect("fixture")
}

async fn on_pgfixture(fixture: pgfixture::Fixture, n: usize) {
    let pool = pgfixture::sqlx::WorkerPool::acquire(&fixture)
        .await
        .unwrap();
    let db = SqlxPostgresConnector::from_sqlx_postgres_pool((*pool).clone());
    body(&db, n).await;
    drop(db);
    pool.release().await.unwrap();
}

fn main() {
    let tests = env_or("BENCH_TESTS", 40);
    let repeat = env_or("BENCH_REPEAT", 3);
    let threads: Vec<usize> = std::env::var("BENCH_THREADS")
        .unwrap_or_else(|_| "1,4".into())
        .split(',')
        .filter_map(|t| t.trim().parse().ok())
        .collect();

    // The users' server: started by pgfixture, its data on disk, held up by a handle.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut config = pgfixture::Config::from_env().expect("configuration");
    config.local_dir = Some(std::env::temp_dir().join("pgfixture-bench-disk"));
    let server = pgfixture::Fixture::builder()
        .config(config)
        .no_fixtures()
        .no_migrations()
        .build()
        .expect("fixture");
    let held = runtime.block_on(server.worker_db()).expect("a server");
    let url = held.url().as_str().to_owned();
    let server_url: Arc<str> = match url.rsplit_once('/') {
        Some((server, rest)) => {
            let query = rest
                .split_once('?')
                .map(|(_, q)| format!("?{q}"))
                .unwrap_or_default();
            format!("{server}/postgres{query}").into()
        }
        None => url.into(),
    };

    println!();
    println!(
        "sea-orm, {MIGRATIONS} migrations of sea-orm-migration: {tests} tests, median of {repeat} runs (wall time)"
    );
    println!(
        "{:<8} {:>18} {:>18} {:>8}",
        "threads", "database per test", "pgfixture (cold)", "ratio"
    );
    let mut cell = 0;
    for &t in &threads {
        let mut naive = Vec::new();
        let mut ours = Vec::new();
        for _ in 0..repeat {
            let server_url = Arc::clone(&server_url);
            naive.push(run_suite(t, tests, move |n| {
                database_per_test(Arc::clone(&server_url), n)
            }));
            cell += 1;
            let run = format!("seab{}{cell}", std::process::id() % 10_000);
            let fixture = fixture(&run, t);
            ours.push(run_suite(t, tests, move |n| {
                on_pgfixture(fixture.clone(), n)
            }));
        }
        let (naive, ours) = (median(naive), median(ours));
        println!(
            "{:<8} {:>16.2} s {:>16.2} s {:>7.1}x",
            t,
            naive.as_secs_f64(),
            ours.as_secs_f64(),
            naive.as_secs_f64() / ours.as_secs_f64()
        );
    }
    drop(held);
}
