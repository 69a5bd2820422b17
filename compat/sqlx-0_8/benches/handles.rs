//! Per test, in-process, `#[sqlx::test]`'s types of sqlx 0.8 (the feature `sqlx-0_8`)
//! as `#[pgfixture::test]` runs a test: a runtime of the test's own (current-thread,
//! `#[tokio::test]`'s), the handle, `SELECT 1` through it, the handle's release, the
//! runtime's end. Beside them, sqlx 0.9's `PgPool` and `PoolConnection` through
//! `pgfixture::sqlx`, and what the attribute did for sqlx 0.8's `PgPool` and
//! `PoolConnection` before they were handles: a new sqlx 0.8 pool per test on the
//! worker, with the options `#[sqlx::test]`'s pair gives, closed after the test.
//!
//! ```text
//! cargo bench -p pgfixture-sqlx-0_8 --bench handles
//! BENCH_TESTS=500 cargo bench -p pgfixture-sqlx-0_8 --bench handles
//! ```
//!
//! One thread, on one worker, in the mode `PGFIXTURE_ISOLATION` gives (database by
//! default). The kinds take turns in runs of 10 tests, each run after one test of its
//! kind not counted (a worker keeps the sqlx pool of one major at a time, so the first
//! test after another major's pays for the switch, which a suite on one major never
//! does), so that the machine's drift reaches every column alike. Medians and 90th
//! percentiles of `BENCH_TESTS` tests per kind (default 200), and the median against
//! sqlx 0.9's `PgPool`. `scripts/benchmarks.sh` runs it unoptimised (`--profile dev`), as test
//! binaries are built, on every backend and on url (a password server of the user's,
//! where every new connection pays SCRAM's key derivation).

use std::time::{Duration, Instant};

use pgfixture::__macro::{Migrations, TestArgs, run, runtime};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Postgres};

/// Tests of one kind in a row, after one not counted.
const RUN: usize = 10;

#[derive(Clone, Copy)]
enum Kind {
    Pool,
    PoolConnection,
    Connection,
    NewPool,
    Pool09,
    PoolConnection09,
}

const KINDS: [(Kind, &str); 6] = [
    (Kind::Pool, "0.8 PgPool"),
    (Kind::PoolConnection, "0.8 PoolConnection"),
    (Kind::Connection, "0.8 PgConnection"),
    (Kind::NewPool, "0.8 new pool per test"),
    (Kind::Pool09, "0.9 PgPool"),
    (Kind::PoolConnection09, "0.9 PoolConnection"),
];

/// What the attribute passes for a test of this file with no argument.
fn args() -> TestArgs {
    TestArgs {
        name: "handles::one",
        file: file!(),
        manifest_dir: env!("CARGO_MANIFEST_DIR"),
        fixtures: &[],
        migrations: Migrations::Inferred,
        setup: None,
    }
}

/// One test of `kind`, timed from its runtime's start to its end.
fn one(kind: Kind) -> Duration {
    let started = Instant::now();
    let rt = runtime(false, None);
    match kind {
        Kind::Pool => run::<PgPool, ()>(args(), rt, |pool| {
            Box::pin(async move {
                sqlx::query("SELECT 1").execute(&pool).await.unwrap();
            })
        }),
        Kind::PoolConnection => run::<PoolConnection<Postgres>, ()>(args(), rt, |mut conn| {
            Box::pin(async move {
                sqlx::query("SELECT 1").execute(&mut *conn).await.unwrap();
            })
        }),
        Kind::Connection => run::<PgConnection, ()>(args(), rt, |mut conn| {
            Box::pin(async move {
                sqlx::query("SELECT 1").execute(&mut conn).await.unwrap();
            })
        }),
        Kind::NewPool => {
            run::<(PgPoolOptions, PgConnectOptions), ()>(args(), rt, |(options, connect)| {
                Box::pin(async move {
                    let pool = options.connect_lazy_with(connect);
                    sqlx::query("SELECT 1").execute(&pool).await.unwrap();
                    pool.close().await;
                })
            })
        }
        Kind::Pool09 => run::<pgfixture::sqlx::PgPool, ()>(args(), rt, |pool| {
            Box::pin(async move {
                pgfixture::sqlx::query("SELECT 1")
                    .execute(&pool)
                    .await
                    .unwrap();
            })
        }),
        Kind::PoolConnection09 => run::<
            pgfixture::sqlx::pool::PoolConnection<pgfixture::sqlx::Postgres>,
            (),
        >(args(), rt, |mut conn| {
            Box::pin(async move {
                pgfixture::sqlx::query("SELECT 1")
                    .execute(&mut *conn)
                    .await
                    .unwrap();
            })
        }),
    }
    started.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:>7.2} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let tests: usize = std::env::var("BENCH_TESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(tests); KINDS.len()];
    for round in 0..tests.div_ceil(RUN) {
        // Each round starts one kind later, so that no kind always follows another.
        for k in 0..KINDS.len() {
            let i = (round + k) % KINDS.len();
            // The first test of a run pays for the kind before it (a worker keeps the
            // sqlx pool of one major at a time): not counted.
            one(KINDS[i].0);
            for _ in 0..RUN {
                times[i].push(one(KINDS[i].0));
            }
        }
    }
    let backend = std::env::var("PGFIXTURE_BACKEND").unwrap_or_else(|_| "auto".into());
    let mode = std::env::var("PGFIXTURE_ISOLATION").unwrap_or_else(|_| "database".into());
    println!("backend: {backend}, {mode} mode, {tests} tests per kind, one thread");
    println!(
        "{:<24} {:>10} {:>10} {:>14}",
        "kind", "p50", "p90", "p50 x 0.9 pool"
    );
    let medians: Vec<Duration> = times
        .iter_mut()
        .map(|t| {
            t.sort();
            percentile(t, 0.5)
        })
        .collect();
    let pool09 = medians[KINDS
        .iter()
        .position(|(kind, _)| matches!(kind, Kind::Pool09))
        .expect("a kind of its own")];
    for (i, (_, name)) in KINDS.iter().enumerate() {
        println!(
            "{:<24} {} {} {:>13.2}x",
            name,
            ms(medians[i]),
            ms(percentile(&times[i], 0.9)),
            medians[i].as_secs_f64() / pool09.as_secs_f64()
        );
    }
}
