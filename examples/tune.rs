//! Pool tuning: sweeps the pool size against the number of workers on a workload whose
//! tests run concurrent queries through the pool, and recommends settings.
//!
//! ```text
//! cargo run --release --example tune
//! PGFIXTURE_FIXTURES=tests/sql TUNE_QUERY="SELECT count(*) FROM orders" cargo run --release --example tune
//! ```
//!
//! Every test takes a handle and runs `TUNE_QUERY` on it (default: 2 ms on the server,
//! `SELECT pg_sleep(0.002)`), then, `TUNE_ROUNDS` times (default 3), takes
//! `TUNE_CONCURRENCY` more handles at once (default 4), each in a task of its own, and
//! runs the query on each; a suite is `TUNE_TESTS` tests
//! (default 64) run the way `cargo test` runs them, `W` threads at a time. Workers are
//! provisioned before the clock starts. Everything else (backend, isolation, fixtures)
//! comes from the environment, as for your tests.
//!
//! The recommendation for each worker count is the smallest pool size whose suite
//! time is within 5% of the best, bounded so that all pools fit the server's
//! `max_connections`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pgfixture::Fixture;

fn var(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn one_test(
    fixture: &Fixture,
    concurrency: usize,
    rounds: usize,
    query: &str,
) -> pgfixture::Result<()> {
    // The test's own handle: it holds the worker, so the concurrent handles below
    // are more connections of the same worker's pool.
    let own = fixture.worker_db().await?;
    own.batch_execute(query).await?;
    for _ in 0..rounds {
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let fixture = fixture.clone();
                let query = query.to_owned();
                // `worker_db` on another task of the thread that holds the worker.
                async move {
                    let db = fixture.worker_db().await?;
                    db.batch_execute(&query).await?;
                    Ok::<_, pgfixture::Error>(())
                }
            })
            .collect();
        for result in futures::future::join_all(tasks).await {
            result?;
        }
    }
    Ok(())
}

/// The suite's time, or `None` when a test could not get a connection in time.
fn suite(
    fixture: &Fixture,
    workers: usize,
    tests: usize,
    concurrency: usize,
    rounds: usize,
    query: &str,
) -> Option<Duration> {
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let (next, failed) = (Arc::clone(&next), Arc::clone(&failed));
            scope.spawn(move || {
                while next.fetch_add(1, Ordering::Relaxed) < tests
                    && failed.load(Ordering::Relaxed) == 0
                {
                    let result = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                        .block_on(one_test(fixture, concurrency, rounds, query));
                    if let Err(e) = result {
                        eprintln!("tune: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    (failed.load(Ordering::Relaxed) == 0).then(|| started.elapsed())
}

fn main() {
    let tests = var("TUNE_TESTS", 64);
    let concurrency = var("TUNE_CONCURRENCY", 4);
    let rounds = var("TUNE_ROUNDS", 3);
    let query = std::env::var("TUNE_QUERY").unwrap_or_else(|_| "SELECT pg_sleep(0.002)".to_owned());
    let workers_list = [1, 2, 4, 8];
    let pools = [1, 2, 4, 8];
    println!(
        "pool tuning: {tests} tests, each {rounds} x {concurrency} concurrent `{query}`; suite seconds"
    );
    print!("{:>8}", "workers");
    for p in pools {
        print!(" {:>9}", format!("pool {p}"));
    }
    println!("   recommended");
    let mut max_connections = 0;
    let mut recommendations = Vec::new();
    for workers in workers_list {
        let mut times = Vec::new();
        for pool in pools {
            let fixture = Fixture::builder()
                .workers(workers)
                .pool_size(pool)
                .acquire_timeout(Duration::from_secs(3))
                .build()
                .expect("a valid environment");
            // Provision every worker before the clock starts.
            suite(&fixture, workers, workers, 0, 0, "SELECT 1");
            let took = suite(&fixture, workers, tests, concurrency, rounds, &query);
            times.push(took);
            if max_connections == 0 {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                max_connections = rt.block_on(async {
                    let db = fixture.worker_db().await.unwrap();
                    db.query_one("SELECT current_setting('max_connections')::int", &[])
                        .await
                        .unwrap()
                        .get::<_, i32>(0)
                });
            }
        }
        let best = times.iter().flatten().min().copied().unwrap_or_default();
        let fits = |p: usize| workers * p + 10 <= max_connections as usize;
        let pick = pools
            .iter()
            .zip(&times)
            .find(|(p, t)| {
                fits(**p) && t.is_some_and(|t| t.as_secs_f64() <= best.as_secs_f64() * 1.05)
            })
            .map(|(p, _)| *p)
            .unwrap_or(1);
        print!("{workers:>8}");
        for t in &times {
            match t {
                Some(t) => print!(" {:>9.3}", t.as_secs_f64()),
                None => print!(" {:>9}", "timeout"),
            }
        }
        println!("   PGFIXTURE_POOL_SIZE={pick}");
        recommendations.push((workers, pick));
    }
    println!(
        "max_connections = {max_connections}: pgfixture lowers the pool size so that workers x pool + 10 fit."
    );
    let largest = recommendations.iter().map(|(_, p)| *p).max().unwrap_or(1);
    println!(
        "recommended: PGFIXTURE_POOL_SIZE={largest} (the smallest size within 5% of the best at every worker count; \
         a test holding more handles at once than the pool has waits for one)"
    );
}
