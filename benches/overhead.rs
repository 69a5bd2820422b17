//! Per-test overhead, in-process and warm: acquire a handle, run a first query,
//! release it, per isolation mode, side by side in one run, against the floor: the same
//! statements (a transaction start, the query, a rollback) on a connection already held.
//!
//! ```text
//! cargo bench --bench overhead            # the backend and image the environment selects
//! BENCH_ITERATIONS=2000 cargo bench --bench overhead
//! ```
//!
//! Prints medians and p95 and the ratio of each median to the floor's. The fuller
//! benchmarks (fresh processes as under nextest, provisioning, suite scaling, the
//! alternatives) are the performance issue's work.

use std::time::{Duration, Instant};

use pgfixture::{Fixture, Isolation};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn us(d: Duration) -> String {
    format!("{:>8.1} us", d.as_secs_f64() * 1e6)
}

async fn measure(fixture: &Fixture, iterations: usize) -> (Vec<Duration>, Vec<Duration>) {
    // Warm up: provisioning and the pool's first connections are not per-test costs.
    for _ in 0..20 {
        let db = fixture.worker_db().await.unwrap();
        db.query_one("SELECT 1", &[]).await.unwrap();
        db.release().await.unwrap();
    }
    let mut per_test = Vec::with_capacity(iterations);
    let mut floor = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = Instant::now();
        let db = fixture.worker_db().await.unwrap();
        db.query_one("SELECT 1", &[]).await.unwrap();
        db.release().await.unwrap();
        per_test.push(started.elapsed());

        let db = fixture.worker_db().await.unwrap();
        let started = Instant::now();
        db.batch_execute("SAVEPOINT floor").await.unwrap();
        db.query_one("SELECT 1", &[]).await.unwrap();
        db.batch_execute("ROLLBACK TO SAVEPOINT floor")
            .await
            .unwrap();
        floor.push(started.elapsed());
        db.release().await.unwrap();
    }
    per_test.sort();
    floor.sort();
    (per_test, floor)
}

/// The same for the sqlx driver: `pgfixture::sqlx::TestDb`, acquire → `SELECT 1` →
/// release, against the floor of sqlx itself: `begin()`, the query and `rollback()` on
/// a `PgConnection` already held, on the same worker.
async fn measure_sqlx(fixture: &Fixture, iterations: usize) -> (Vec<Duration>, Vec<Duration>) {
    use pgfixture::sqlx::{self, Connection, TestDb};
    for _ in 0..20 {
        let mut db = TestDb::acquire(fixture).await.unwrap();
        sqlx::query("SELECT 1").execute(&mut *db).await.unwrap();
        db.release().await.unwrap();
    }
    let options = TestDb::acquire(fixture).await.unwrap().connect_options();
    let mut held = sqlx::PgConnection::connect_with(&options).await.unwrap();
    let mut per_test = Vec::with_capacity(iterations);
    let mut floor = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = Instant::now();
        let mut db = TestDb::acquire(fixture).await.unwrap();
        sqlx::query("SELECT 1").execute(&mut *db).await.unwrap();
        db.release().await.unwrap();
        per_test.push(started.elapsed());

        let started = Instant::now();
        let mut tx = held.begin().await.unwrap();
        sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
        tx.rollback().await.unwrap();
        floor.push(started.elapsed());
    }
    per_test.sort();
    floor.sort();
    (per_test, floor)
}

/// A `worker_pool()` test, from taking the pool to the moment the next test may start
/// (the release, with its reset when one is needed): `statement` on one of its
/// connections, committed.
/// `pause` (untimed) between tests stands for the other tests of a suite, during which
/// a spare clone is made in the background.
async fn pool_test(
    fixture: &Fixture,
    statement: &str,
    iterations: usize,
    pause: Duration,
) -> Vec<Duration> {
    let mut times = Vec::with_capacity(iterations);
    for i in 0..iterations + 3 {
        tokio::time::sleep(pause).await;
        let started = Instant::now();
        let pool = fixture.worker_pool().await.unwrap();
        pool.get()
            .await
            .unwrap()
            .batch_execute(statement)
            .await
            .unwrap();
        pool.release().await.unwrap();
        // The first few warm the pools up.
        if i >= 3 {
            times.push(started.elapsed());
        }
    }
    times.sort();
    times
}

fn main() {
    let iterations: usize = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("per-test overhead, in-process, warm ({iterations} iterations per mode)");
    println!(
        "{:<10} {:>11} {:>11} {:>11} {:>9}",
        "mode", "p50", "p95", "floor p50", "x floor"
    );
    for (isolation, reset_sequences) in [
        (Isolation::Database, false),
        (Isolation::Schema, false),
        (Isolation::Container, false),
        // Every test restarts the fixtures' two sequences first.
        (Isolation::Database, true),
    ] {
        let fixture = Fixture::builder()
            .isolation(isolation)
            .workers(1)
            .reset_sequences(reset_sequences)
            .build()
            .unwrap();
        let (per_test, floor) = runtime.block_on(measure(&fixture, iterations));
        let p50 = percentile(&per_test, 0.5);
        let floor50 = percentile(&floor, 0.5);
        let name = format!("{isolation:?}").to_lowercase();
        println!(
            "{:<10} {} {} {} {:>8.2}x",
            if reset_sequences {
                format!("{name}+seq")
            } else {
                name
            },
            us(p50),
            us(percentile(&per_test, 0.95)),
            us(floor50),
            p50.as_secs_f64() / floor50.as_secs_f64()
        );
    }
    println!();
    println!(
        "sqlx driver: pgfixture::sqlx::TestDb, acquire -> SELECT 1 -> release; floor: begin() -> SELECT 1 -> rollback() on a held PgConnection"
    );
    println!(
        "{:<10} {:>11} {:>11} {:>11} {:>9}",
        "mode", "p50", "p95", "floor p50", "x floor"
    );
    for isolation in [Isolation::Database, Isolation::Schema, Isolation::Container] {
        let fixture = Fixture::builder()
            .isolation(isolation)
            .workers(1)
            .build()
            .unwrap();
        let (per_test, floor) = runtime.block_on(measure_sqlx(&fixture, iterations));
        let p50 = percentile(&per_test, 0.5);
        let floor50 = percentile(&floor, 0.5);
        println!(
            "{:<10} {} {} {} {:>8.2}x",
            format!("{isolation:?}").to_lowercase(),
            us(p50),
            us(percentile(&per_test, 0.95)),
            us(floor50),
            p50.as_secs_f64() / floor50.as_secs_f64()
        );
    }
    let pool_iterations = (iterations / 10).max(20);
    println!();
    println!(
        "worker_pool() tests, in-process, warm ({pool_iterations} iterations per mode): take the pool, one statement, release (and reset, if needed)"
    );
    println!(
        "{:<10} {:>12} {:>12} {:>16} {:>16} {:>20}",
        "mode", "reads p50", "reads p95", "commits p50", "commits p95", "back to back p50"
    );
    for isolation in [Isolation::Database, Isolation::Schema, Isolation::Container] {
        let fixture = Fixture::builder()
            .isolation(isolation)
            .workers(1)
            .build()
            .unwrap();
        let insert = "INSERT INTO notes (owner, body) VALUES ('bench', 'x')";
        let reads = runtime.block_on(pool_test(
            &fixture,
            "SELECT count(*) FROM users",
            pool_iterations,
            Duration::ZERO,
        ));
        // Other tests between commits: 200 ms, time for a spare to be made.
        let commits = runtime.block_on(pool_test(
            &fixture,
            insert,
            pool_iterations,
            Duration::from_millis(200),
        ));
        let back_to_back =
            runtime.block_on(pool_test(&fixture, insert, pool_iterations, Duration::ZERO));
        println!(
            "{:<10} {}  {}      {}      {}          {}",
            format!("{isolation:?}").to_lowercase(),
            us(percentile(&reads, 0.5)),
            us(percentile(&reads, 0.95)),
            us(percentile(&commits, 0.5)),
            us(percentile(&commits, 0.95)),
            us(percentile(&back_to_back, 0.5)),
        );
    }
    let stats = Fixture::builder().workers(1).build().unwrap().stats();
    println!(
        "backend: {} ({})",
        stats.backend.unwrap_or("?"),
        stats.flavour.unwrap_or_default()
    );
}
