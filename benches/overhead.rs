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
/// a `PgConnection` already held, on the same worker; once opened on the test's own
/// runtime, and once on `other`, a runtime of its own, as a connection that outlives
/// `#[tokio::test]` runtimes must be (pgfixture's are, on its background runtime): each
/// of its round trips is then handed between two threads.
async fn measure_sqlx(
    fixture: &Fixture,
    iterations: usize,
    other: &tokio::runtime::Handle,
) -> [Vec<Duration>; 3] {
    use pgfixture::sqlx::{self, Connection, PgConnection, TestDb};
    for _ in 0..20 {
        let mut db = TestDb::acquire(fixture).await.unwrap();
        sqlx::query("SELECT 1").execute(&mut *db).await.unwrap();
        db.release().await.unwrap();
    }
    let options = TestDb::acquire(fixture).await.unwrap().connect_options();
    let mut held = PgConnection::connect_with(&options).await.unwrap();
    let mut held_elsewhere = other
        .spawn(async move { PgConnection::connect_with(&options).await.unwrap() })
        .await
        .unwrap();
    let mut per_test = Vec::with_capacity(iterations);
    let mut floor = Vec::with_capacity(iterations);
    let mut floor_elsewhere = Vec::with_capacity(iterations);
    async fn held_test(conn: &mut PgConnection) -> Duration {
        let started = Instant::now();
        let mut tx = conn.begin().await.unwrap();
        sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
        tx.rollback().await.unwrap();
        started.elapsed()
    }
    for _ in 0..iterations {
        let started = Instant::now();
        let mut db = TestDb::acquire(fixture).await.unwrap();
        sqlx::query("SELECT 1").execute(&mut *db).await.unwrap();
        db.release().await.unwrap();
        per_test.push(started.elapsed());
        floor.push(held_test(&mut held).await);
        floor_elsewhere.push(held_test(&mut held_elsewhere).await);
    }
    for v in [&mut per_test, &mut floor, &mut floor_elsewhere] {
        v.sort();
    }
    [per_test, floor, floor_elsewhere]
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

/// `worker_db()` tests whose code under test takes the handle's settings, measured in
/// turns: the plain test (acquire, `SELECT 1`, release); the same with `pg_config()`
/// called and left unused (the release reads the worker); and with a connection of the
/// test's own opened from it that commits a row and closes (the release puts the row
/// back), whose own part (connect, insert, close) is timed apart as well.
async fn handed_test(fixture: &Fixture, iterations: usize) -> [Vec<Duration>; 4] {
    use pgfixture::tokio_postgres::NoTls;
    let [mut plain, mut unused, mut committed, mut own] =
        std::array::from_fn(|_| Vec::with_capacity(iterations));
    for i in 0..iterations + 3 {
        let started = Instant::now();
        let db = fixture.worker_db().await.unwrap();
        db.query_one("SELECT 1", &[]).await.unwrap();
        db.release().await.unwrap();
        let plain_time = started.elapsed();

        let started = Instant::now();
        let db = fixture.worker_db().await.unwrap();
        let _ = db.pg_config();
        db.query_one("SELECT 1", &[]).await.unwrap();
        db.release().await.unwrap();
        let unused_time = started.elapsed();

        let started = Instant::now();
        let db = fixture.worker_db().await.unwrap();
        let opened = Instant::now();
        let (client, connection) = db.pg_config().connect(NoTls).await.unwrap();
        let task = tokio::spawn(connection);
        client
            .batch_execute("INSERT INTO notes (owner, body) VALUES ('bench', 'x')")
            .await
            .unwrap();
        drop(client);
        task.await.unwrap().unwrap();
        let own_time = opened.elapsed();
        db.query_one("SELECT 1", &[]).await.unwrap();
        db.release().await.unwrap();
        // The first few warm the pools up.
        if i >= 3 {
            plain.push(plain_time);
            unused.push(unused_time);
            committed.push(started.elapsed());
            own.push(own_time);
        }
    }
    for v in [&mut plain, &mut unused, &mut committed, &mut own] {
        v.sort();
    }
    [plain, unused, committed, own]
}

/// Throughput of `threads` threads (each holding a worker of its own, as parallel
/// tests do) running `iterations` tests each: `worker_pool()` tests that commit rows
/// (put back in place after each) or plain `worker_db()` tests. Tests per second.
fn throughput(fixture: &Fixture, threads: usize, iterations: usize, commit: bool) -> f64 {
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    for _ in 0..iterations {
                        if commit {
                            let pool = fixture.worker_pool().await.unwrap();
                            pool.get()
                                .await
                                .unwrap()
                                .batch_execute(
                                    "INSERT INTO notes (owner, body) VALUES ('bench', 'x')",
                                )
                                .await
                                .unwrap();
                            pool.release().await.unwrap();
                        } else {
                            let db = fixture.worker_db().await.unwrap();
                            db.execute(
                                "INSERT INTO notes (owner, body) VALUES ('bench', 'x')",
                                &[],
                            )
                            .await
                            .unwrap();
                            db.release().await.unwrap();
                        }
                    }
                });
            });
        }
    });
    (threads * iterations) as f64 / started.elapsed().as_secs_f64()
}

/// A fixture of one worker in `isolation`.
fn one_worker(isolation: Isolation) -> Fixture {
    Fixture::builder()
        .isolation(isolation)
        .workers(1)
        .build()
        .unwrap()
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
        "sqlx driver: pgfixture::sqlx::TestDb, acquire -> SELECT 1 -> release; floor: begin() -> SELECT 1 -> rollback() on a held PgConnection, opened on the test's runtime (floor) or on another (floor, other rt: as a connection that outlives #[tokio::test] runtimes must be)"
    );
    println!(
        "{:<10} {:>11} {:>11} {:>11} {:>9} {:>15} {:>9}",
        "mode", "p50", "p95", "floor p50", "x floor", "other rt p50", "x other"
    );
    // A runtime of its own for the second floor's connection, as pgfixture's
    // background runtime is (one thread per process under nextest, two in-process).
    let other = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for isolation in [Isolation::Database, Isolation::Schema, Isolation::Container] {
        let fixture = one_worker(isolation);
        let [per_test, floor, elsewhere] =
            runtime.block_on(measure_sqlx(&fixture, iterations, other.handle()));
        let p50 = percentile(&per_test, 0.5);
        let floor50 = percentile(&floor, 0.5);
        let elsewhere50 = percentile(&elsewhere, 0.5);
        println!(
            "{:<10} {} {} {} {:>8.2}x     {} {:>8.2}x",
            format!("{isolation:?}").to_lowercase(),
            us(p50),
            us(percentile(&per_test, 0.95)),
            us(floor50),
            p50.as_secs_f64() / floor50.as_secs_f64(),
            us(elsewhere50),
            p50.as_secs_f64() / elsewhere50.as_secs_f64()
        );
    }
    let pool_iterations = (iterations / 10).max(20);
    println!();
    println!(
        "worker_pool() tests, in-process, warm ({pool_iterations} iterations per mode): take the pool, one statement, release (and reset, if needed)"
    );
    println!(
        "{:<10} {:>10} {:>10} {:>12} {:>12} {:>12} {:>14}",
        "mode", "reads p50", "reads p95", "rows p50", "rows p95", "DDL p50", "DDL b2b p50"
    );
    for isolation in [Isolation::Database, Isolation::Schema, Isolation::Container] {
        let fixture = one_worker(isolation);
        let reads = runtime.block_on(pool_test(
            &fixture,
            "SELECT count(*) FROM users",
            pool_iterations,
            Duration::ZERO,
        ));
        // Rows written: put back in place, back to back.
        let rows = runtime.block_on(pool_test(
            &fixture,
            "INSERT INTO notes (owner, body) VALUES ('bench', 'x'); DELETE FROM users",
            pool_iterations,
            Duration::ZERO,
        ));
        // DDL: the worker is rebuilt. Other tests between: 200 ms, time for a spare to
        // be made; then back to back.
        let ddl = "COMMENT ON TABLE notes IS 'bench'";
        let rebuilt = runtime.block_on(pool_test(
            &fixture,
            ddl,
            pool_iterations,
            Duration::from_millis(200),
        ));
        let back_to_back =
            runtime.block_on(pool_test(&fixture, ddl, pool_iterations, Duration::ZERO));
        println!(
            "{:<10} {} {} {}   {}   {}     {}",
            format!("{isolation:?}").to_lowercase(),
            us(percentile(&reads, 0.5)),
            us(percentile(&reads, 0.95)),
            us(percentile(&rows, 0.5)),
            us(percentile(&rows, 0.95)),
            us(percentile(&rebuilt, 0.5)),
            us(percentile(&back_to_back, 0.5)),
        );
    }
    let handed_iterations = (iterations / 5).max(20);
    println!();
    println!(
        "worker_db() tests whose settings go to code under test ({handed_iterations} iterations per mode, in turns): plain; pg_config() unused; an own connection from it that commits a row (put back at release), and that connection's own part"
    );
    println!(
        "{:<10} {:>11} {:>11} {:>11} {:>11} {:>11} {:>12}",
        "mode", "plain p50", "unused p50", "commit p50", "commit p95", "own p50", "added p50"
    );
    for isolation in [Isolation::Database, Isolation::Schema, Isolation::Container] {
        let fixture = one_worker(isolation);
        let [plain, unused, committed, own] =
            runtime.block_on(handed_test(&fixture, handed_iterations));
        let p50 = |v: &[Duration]| percentile(v, 0.5);
        // What pgfixture adds to a test that commits through its own connection.
        let added = p50(&committed).saturating_sub(p50(&plain) + p50(&own));
        println!(
            "{:<10} {} {} {} {} {} {}",
            format!("{isolation:?}").to_lowercase(),
            us(p50(&plain)),
            us(p50(&unused)),
            us(p50(&committed)),
            us(percentile(&committed, 0.95)),
            us(p50(&own)),
            us(added),
        );
    }
    // Whether 4 workers resetting at once scale like 4 workers testing: the speedup
    // of 4 threads over 1, for tests that commit (a reset each) and for tests that do
    // not. Each thread holds its own worker (4 slots).
    let scale_iterations = (iterations / 25).max(10);
    println!();
    println!(
        "4 workers against 1 ({scale_iterations} tests per thread, after a warm-up): tests per second, and the speedup"
    );
    println!(
        "{:<10} {:>12} {:>12} {:>9} {:>12} {:>12} {:>9}",
        "mode", "resets x1", "resets x4", "speedup", "tests x1", "tests x4", "speedup"
    );
    for isolation in [Isolation::Database, Isolation::Schema, Isolation::Container] {
        let fixture = Fixture::builder()
            .isolation(isolation)
            .workers(4)
            .build()
            .unwrap();
        // Warm-up: every worker provisioned, pools and spares made.
        throughput(&fixture, 4, 3, true);
        throughput(&fixture, 4, 3, false);
        let (r1, r4) = (
            throughput(&fixture, 1, scale_iterations, true),
            throughput(&fixture, 4, scale_iterations, true),
        );
        let (t1, t4) = (
            throughput(&fixture, 1, scale_iterations * 10, false),
            throughput(&fixture, 4, scale_iterations * 10, false),
        );
        println!(
            "{:<10} {:>10.1}/s {:>10.1}/s {:>8.2}x {:>10.1}/s {:>10.1}/s {:>8.2}x",
            format!("{isolation:?}").to_lowercase(),
            r1,
            r4,
            r4 / r1,
            t1,
            t4,
            t4 / t1
        );
    }
    let stats = Fixture::builder().workers(1).build().unwrap().stats();
    println!(
        "backend: {} ({})",
        stats.backend.unwrap_or("?"),
        stats.flavour.unwrap_or_default()
    );
}
