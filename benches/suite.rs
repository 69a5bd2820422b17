//! A whole suite at 1, 2, 4 and 8 workers, pgfixture side by side with the other ways
//! of isolating database tests, on the same server with the same settings, in one run.
//!
//! ```text
//! cargo bench --bench suite
//! BENCH_TESTS=200 BENCH_PLOT=suite.svg cargo bench --bench suite
//! ```
//!
//! A suite has `BENCH_TESTS` tests (default 384: about 2.4 s at 1 worker, long enough
//! that thread starts and the last test's tail weigh little in the speedup).
//! Tests run the way `cargo test` runs them: a thread per running test, a fresh tokio
//! runtime per test, `W` at a time. Every test inserts three rows and reads them back;
//! an I/O-bound test then waits 4 ms on the server (`pg_sleep`), a CPU-bound one
//! hashes on the client for about as long. Strategies:
//!
//! - `pgfixture`: the default, a database per worker cloned from a template, a rolled
//!   back transaction per test (`worker_db()`), its workers provisioned in the suite;
//!   `pgfixture-warm`: the same with the workers provisioned before the suite starts
//!   (a longer suite, later nextest processes, `PGFIXTURE_REUSE`);
//!   `pgfixture-schema`: a schema per worker.
//! - `db-per-test`: a fresh database per test with the fixtures applied each time, as
//!   `#[sqlx::test]` does with its migrations.
//! - `clone-per-test`: a database per test cloned from a template that holds the
//!   fixtures, as pgtestdb does (the server's default clone strategy, as pgtestdb uses).
//!   These two run `BENCH_SLOW_TESTS` tests (default 96) of a longer suite, scaled to
//!   its size.
//! - `server-per-test`: a new server (container, or local server without Docker) per
//!   test, the naive testcontainers pattern; run on a small sample (`2 W` tests) and
//!   scaled to the suite's size.
//! - `shared-unsafe`: one database, pooled connections, no isolation at all: the floor.
//!
//! Prints suite times (medians of `BENCH_REPEAT` runs, default 5, and of
//! `BENCH_REPEAT_SLOW`, default 1, for the slow alternatives; each run goes through
//! every worker count), the speedup of 4 workers over 1, and each strategy's time as a
//! multiple of the first strategy's (pgfixture's); `BENCH_STRATEGIES` (names, comma
//! separated) runs some of the strategies only. Writes the
//! numbers as CSV and a plot of suite time against workers as SVG (`BENCH_PLOT`,
//! default `target/pgfixture-bench/suite.svg`).

#[path = "common/run.rs"]
mod run;
use run::{median, run_suite};

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pgfixture::tokio_postgres::{self, NoTls};
use pgfixture::{Config, Fixture, Isolation};

const WORKERS: [usize; 4] = [1, 2, 4, 8];

#[derive(Clone, Copy, PartialEq)]
enum Load {
    Io,
    Cpu,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::Io => "I/O-bound",
            Load::Cpu => "CPU-bound",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Strategy {
    Pgfixture,
    PgfixtureWarm,
    PgfixtureSchema,
    DbPerTest,
    ClonePerTest,
    ServerPerTest,
    SharedUnsafe,
}

const STRATEGIES: [Strategy; 7] = [
    Strategy::Pgfixture,
    Strategy::PgfixtureWarm,
    Strategy::PgfixtureSchema,
    Strategy::DbPerTest,
    Strategy::ClonePerTest,
    Strategy::ServerPerTest,
    Strategy::SharedUnsafe,
];

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Strategy::Pgfixture => "pgfixture",
            Strategy::PgfixtureWarm => "pgfixture-warm",
            Strategy::PgfixtureSchema => "pgfixture-schema",
            Strategy::DbPerTest => "db-per-test",
            Strategy::ClonePerTest => "clone-per-test",
            Strategy::ServerPerTest => "server-per-test",
            Strategy::SharedUnsafe => "shared-unsafe",
        }
    }

    fn color(self) -> &'static str {
        match self {
            Strategy::Pgfixture => "#1f77b4",
            Strategy::PgfixtureWarm => "#2ca02c",
            Strategy::PgfixtureSchema => "#17becf",
            Strategy::DbPerTest => "#d62728",
            Strategy::ClonePerTest => "#ff7f0e",
            Strategy::ServerPerTest => "#9467bd",
            Strategy::SharedUnsafe => "#7f7f7f",
        }
    }
}

/// The fixture files, as pgfixture applies them.
fn fixtures_sql() -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    files
        .iter()
        .filter(|p| !p.ends_with("002_applied_marker.sql"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

/// What every test does, whatever isolates it.
async fn body(client: &tokio_postgres::Client, test: usize, load: Load) {
    // Unique across suites: the unsafe floor keeps every suite's rows.
    let owner = format!("test-{test}-{}", UNIQUE.fetch_add(1, Ordering::Relaxed));
    for i in 0..3 {
        client
            .execute(
                "INSERT INTO notes (owner, body) VALUES ($1, $2)",
                &[&owner, &format!("note {i}")],
            )
            .await
            .unwrap();
    }
    let n: i64 = client
        .query_one("SELECT count(*) FROM notes WHERE owner = $1", &[&owner])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
    match load {
        Load::Io => {
            client.execute("SELECT pg_sleep(0.004)", &[]).await.unwrap();
        }
        Load::Cpu => {
            use sha2::Digest;
            let started = Instant::now();
            let mut digest = [0u8; 32];
            while started.elapsed() < Duration::from_millis(4) {
                for _ in 0..100 {
                    digest = sha2::Sha256::digest(digest).into();
                }
            }
            std::hint::black_box(digest);
        }
    }
}

/// A server that pgfixture started, for the strategies that manage databases
/// themselves: same image or binaries, same settings.
struct Raw {
    config: tokio_postgres::Config,
    fixtures: String,
    /// The guard's own worker database, which [`Raw::close_suite_connections`] spares.
    own_db: String,
    _guard: pgfixture::WorkerPool,
}

impl Raw {
    async fn connect(&self, dbname: &str) -> tokio_postgres::Client {
        let mut config = self.config.clone();
        config.dbname(dbname);
        let (client, connection) = config.connect(NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    }

    /// Empties the floor's shared table, untimed: each floor suite starts as every
    /// pgfixture test does, with no rows of earlier suites (whose rows the floor keeps,
    /// and whose growing table its unindexed reads would scan).
    fn empty_shared(&self) {
        block_on(async {
            self.connect("bench_shared")
                .await
                .batch_execute("TRUNCATE notes")
                .await
                .unwrap();
        });
    }

    /// Closes, from the server's side, the pooled connections of the pgfixture suites
    /// that have ended. Every suite is a configuration of its own, and a process keeps
    /// its fixtures (and their pools) for its whole life, as a test binary would: dozens
    /// of suites in one process would otherwise exhaust `max_connections`. Not timed.
    fn close_suite_connections(&self) {
        block_on(async {
            let admin = self.connect("postgres").await;
            admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE pid <> pg_backend_pid() AND datname <> $1 \
                     AND (datname LIKE 'pgfx\\_w\\_%' OR datname = 'pgfx_schemas')",
                    &[&self.own_db],
                )
                .await
                .unwrap();
        });
    }
}

/// Runs `work` to its end on a runtime of its own: the untimed steps between suites.
fn block_on<T>(work: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(work)
}

async fn raw_server(run: &str) -> Raw {
    let mut config = Config::from_env().unwrap();
    config.run_id = run.to_owned();
    config.worker = None;
    config.grace = Duration::from_secs(5);
    let fixture = Fixture::builder()
        .config(config)
        .workers(1)
        .build()
        .unwrap();
    let guard = fixture.worker_pool().await.unwrap();
    let mut pg = guard.pg_config().clone();
    let own_db = pg.get_dbname().unwrap().to_owned();
    pg.dbname("postgres");
    let raw = Raw {
        config: pg,
        fixtures: fixtures_sql(),
        own_db,
        _guard: guard,
    };
    let admin = raw.connect("postgres").await;
    for sql in [
        "DROP DATABASE IF EXISTS bench_template",
        "CREATE DATABASE bench_template",
        "DROP DATABASE IF EXISTS bench_shared",
        "CREATE DATABASE bench_shared",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    for db in ["bench_template", "bench_shared"] {
        raw.connect(db)
            .await
            .batch_execute(&raw.fixtures)
            .await
            .unwrap();
    }
    raw
}

fn fixture(run: &str, isolation: Isolation, workers: usize) -> Fixture {
    let mut config = Config::from_env().unwrap();
    config.run_id = run.to_owned();
    config.worker = None;
    config.isolation = isolation;
    config.grace = Duration::from_secs(5);
    Fixture::builder()
        .config(config)
        .workers(workers)
        .build()
        .unwrap()
}

/// Provisions all `workers` of `fixture`, untimed: each holds a handle while the
/// others take theirs.
fn provision_workers(fixture: &Fixture, workers: usize) {
    let warm = fixture.clone();
    run_suite(workers, workers, move |_| {
        let fixture = warm.clone();
        async move {
            let db = fixture.worker_db().await.unwrap();
            db.query_one("SELECT pg_sleep(0.05)", &[]).await.unwrap();
        }
    });
}

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

/// How many tests the database- and clone-per-test alternatives run of a longer suite
/// (`BENCH_SLOW_TESTS`, default 96), their time scaled to the suite's size: each of
/// their tests takes 50–150 ms, so 96 of them are a fair sample, and a whole suite of
/// them would take minutes per worker count.
fn slow_sample() -> usize {
    std::env::var("BENCH_SLOW_TESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96)
}

/// One suite of `strategy`; the server-per-test one is scaled from its sample.
fn suite(
    strategy: Strategy,
    load: Load,
    workers: usize,
    tests: usize,
    run: &str,
    raw: &Arc<Raw>,
) -> Duration {
    let raw = Arc::clone(raw);
    let run = run.to_owned();
    match strategy {
        Strategy::Pgfixture | Strategy::PgfixtureWarm | Strategy::PgfixtureSchema => {
            let isolation = if strategy == Strategy::PgfixtureSchema {
                Isolation::Schema
            } else {
                Isolation::Database
            };
            // New worker databases or schemas per suite (another configuration), so
            // provisioning is part of the suite, as in a real run.
            static ROUNDS: AtomicUsize = AtomicUsize::new(0);
            let round = ROUNDS.fetch_add(1, Ordering::Relaxed);
            let mut config = fixture(&run, isolation, workers).config().clone();
            config.acquire_timeout = Duration::from_secs(60 + round as u64);
            let fixture = Fixture::builder().config(config).build().unwrap();
            if strategy == Strategy::PgfixtureWarm {
                // Workers provisioned before the suite starts: what a long suite
                // amortises, and what nextest's later processes and PGFIXTURE_REUSE get.
                provision_workers(&fixture, workers);
            }
            let elapsed = run_suite(workers, tests, move |n| {
                let fixture = fixture.clone();
                async move {
                    let db = fixture.worker_db().await.unwrap();
                    body(&db, n, load).await;
                }
            });
            raw.close_suite_connections();
            elapsed
        }
        Strategy::DbPerTest | Strategy::ClonePerTest => {
            let sample = tests.min(slow_sample());
            let took = run_suite(workers, sample, move |n| {
                let raw = Arc::clone(&raw);
                async move {
                    let name = format!("bench_t{}", UNIQUE.fetch_add(1, Ordering::Relaxed));
                    let admin = raw.connect("postgres").await;
                    if strategy == Strategy::DbPerTest {
                        admin
                            .batch_execute(&format!("CREATE DATABASE {name}"))
                            .await
                            .unwrap();
                        let client = raw.connect(&name).await;
                        client.batch_execute(&raw.fixtures).await.unwrap();
                        body(&client, n, load).await;
                    } else {
                        admin
                            .batch_execute(&format!(
                                "CREATE DATABASE {name} TEMPLATE bench_template"
                            ))
                            .await
                            .unwrap();
                        let client = raw.connect(&name).await;
                        body(&client, n, load).await;
                    }
                    admin
                        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
                        .await
                        .unwrap();
                }
            });
            took.mul_f64(tests as f64 / sample as f64)
        }
        Strategy::ServerPerTest => {
            let sample = (2 * workers).min(tests);
            let took = run_suite(workers, sample, move |n| {
                let run = format!("{}s{}", &run[..4], UNIQUE.fetch_add(1, Ordering::Relaxed));
                async move {
                    let fixture = fixture(&run, Isolation::Container, 1);
                    let db = fixture.worker_db().await.unwrap();
                    body(&db, n, load).await;
                }
            });
            took.mul_f64(tests as f64 / sample as f64)
        }
        Strategy::SharedUnsafe => {
            raw.empty_shared();
            run_suite(workers, tests, move |n| {
                // One connection per worker thread, kept across tests: what a pool
                // gives a suite that isolates nothing.
                let client = SHARED.with(|cell| {
                    let mut cell = cell.borrow_mut();
                    cell.get_or_insert_with(|| SharedClient::open(&raw)).clone()
                });
                async move { body(&client.0.1, n, load).await }
            })
        }
    }
}

/// What a test of the mixed suite does: shaped like the real project's suite that
/// was ported (130 of 168 tests on `worker_db()`, 23 opening connections of their own,
/// 7 committing): of every 20 tests, 17 plain, 2 with a connection of their own, 1
/// that commits. Each runs the I/O-bound body.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Plain,
    OwnConnection,
    Commits,
}

fn kind(test: usize) -> Kind {
    match test % 20 {
        0 => Kind::Commits,
        7 | 14 => Kind::OwnConnection,
        _ => Kind::Plain,
    }
}

/// One mixed suite of `tests` tests, `workers` at a time, the pgfixture way
/// (`fixture`) or the naive way (`None`: one server already running, a new connection
/// per test, nothing isolated).
fn mixed_suite(workers: usize, tests: usize, fixture: Option<Fixture>, raw: &Arc<Raw>) -> Duration {
    let raw = Arc::clone(raw);
    run_suite(workers, tests, move |n| {
        let fixture = fixture.clone();
        let raw = Arc::clone(&raw);
        async move {
            match (fixture, kind(n)) {
                (None, kind) => {
                    let client = raw.connect("bench_shared").await;
                    body(&client, n, Load::Io).await;
                    if kind == Kind::OwnConnection {
                        let own = raw.connect("bench_shared").await;
                        own.batch_execute("LISTEN mixed; SELECT 1").await.unwrap();
                    }
                }
                (Some(fixture), Kind::Commits) => {
                    let pool = fixture.worker_pool().await.unwrap();
                    body(&pool.get().await.unwrap(), n, Load::Io).await;
                    pool.release().await.unwrap();
                }
                (Some(fixture), kind) => {
                    let db = fixture.worker_db().await.unwrap();
                    body(&db, n, Load::Io).await;
                    if kind == Kind::OwnConnection {
                        let (own, connection) = db.pg_config().connect(NoTls).await.unwrap();
                        tokio::spawn(connection);
                        own.batch_execute("LISTEN mixed; SELECT 1").await.unwrap();
                    }
                }
            }
        }
    })
}

/// The mixed suite at 1 and 4 workers: the naive way against pgfixture from cold (a
/// new run: server start, template, workers, all inside the suite's time) and
/// pgfixture reused (`PGFIXTURE_REUSE=1`'s case: server, template and workers there).
fn mixed_suites(tests: usize, repeat: usize, run: &str, raw: &Arc<Raw>) {
    println!();
    println!(
        "mixed suite ({tests} tests: of every 20, 17 worker_db(), 2 with a connection of their own, 1 worker_pool() that commits; I/O-bound), median of {repeat}: seconds; x naive"
    );
    println!(
        "{:<17} {:>8} {:>8} {:>10} {:>10}",
        "strategy", "1", "4", "x naive 1", "x naive 4"
    );
    static COLD: AtomicUsize = AtomicUsize::new(0);
    let cold = |workers: usize| {
        // A run of its own: nothing of it exists yet.
        let run = format!("{}m{}", &run[..6], COLD.fetch_add(1, Ordering::Relaxed));
        fixture(&run, Isolation::Database, workers)
    };
    // Reused: the workers of an earlier run found ready, provisioned (untimed) here.
    let reused: Vec<Fixture> = [1, 4]
        .into_iter()
        .map(|workers| {
            // A configuration of its own (the raw server's guard holds the slot of the
            // plain one-worker fixture of this run).
            let mut config = fixture(run, Isolation::Database, workers).config().clone();
            config.acquire_timeout = Duration::from_secs(45);
            let fixture = Fixture::builder().config(config).build().unwrap();
            provision_workers(&fixture, workers);
            fixture
        })
        .collect();
    let mut rows: Vec<(&str, Vec<Vec<Duration>>)> = vec![
        ("naive", vec![Vec::new(), Vec::new()]),
        ("pgfixture-cold", vec![Vec::new(), Vec::new()]),
        ("pgfixture-reuse", vec![Vec::new(), Vec::new()]),
    ];
    for _ in 0..repeat {
        for (i, workers) in [1, 4].into_iter().enumerate() {
            raw.empty_shared();
            rows[0].1[i].push(mixed_suite(workers, tests, None, raw));
            // Its own server, which stops after the grace period once the bench ends.
            rows[1].1[i].push(mixed_suite(workers, tests, Some(cold(workers)), raw));
            rows[2].1[i].push(mixed_suite(workers, tests, Some(reused[i].clone()), raw));
        }
    }
    let medians: Vec<(&str, Vec<Duration>)> = rows
        .into_iter()
        .map(|(name, samples)| (name, samples.into_iter().map(median).collect()))
        .collect();
    let naive = medians[0].1.clone();
    for (name, times) in &medians {
        println!(
            "{:<17} {:>8.2} {:>8.2} {:>9.2}x {:>9.2}x",
            name,
            times[0].as_secs_f64(),
            times[1].as_secs_f64(),
            times[0].as_secs_f64() / naive[0].as_secs_f64(),
            times[1].as_secs_f64() / naive[1].as_secs_f64(),
        );
    }
}

/// A connection of one worker thread for the unsafe floor, driven by a runtime of its
/// own (a test's runtime dies with the test).
#[derive(Clone)]
struct SharedClient(Arc<(tokio::runtime::Runtime, tokio_postgres::Client)>);

thread_local! {
    static SHARED: std::cell::RefCell<Option<SharedClient>> = const { std::cell::RefCell::new(None) };
}

impl SharedClient {
    fn open(raw: &Raw) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut config = raw.config.clone();
        config.dbname("bench_shared");
        let client = runtime.block_on(async {
            let (client, connection) = config.connect(NoTls).await.unwrap();
            tokio::spawn(connection);
            client
        });
        SharedClient(Arc::new((runtime, client)))
    }
}

fn plot(results: &[(Load, Strategy, Vec<Duration>)], tests: usize, path: &std::path::Path) {
    let (w, h, pad) = (460.0, 340.0, 55.0);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="12">"#,
        2.0 * w + 170.0,
        h + 20.0
    );
    let max = results
        .iter()
        .flat_map(|(_, _, t)| t.iter())
        .map(Duration::as_secs_f64)
        .fold(0.0_f64, f64::max);
    let min = results
        .iter()
        .flat_map(|(_, _, t)| t.iter())
        .map(Duration::as_secs_f64)
        .fold(f64::MAX, f64::min);
    let (lo, hi) = ((min * 0.8).log10().floor(), (max * 1.2).log10().ceil());
    for (panel, load) in [Load::Io, Load::Cpu].into_iter().enumerate() {
        let x0 = panel as f64 * w;
        let px = |i: usize| x0 + pad + (w - 1.5 * pad) * i as f64 / 3.0;
        let py = |s: f64| 20.0 + (h - pad - 20.0) * (1.0 - (s.log10() - lo) / (hi - lo));
        let _ = write!(
            svg,
            r#"<text x="{}" y="14" font-weight="bold">{} suite, {tests} tests: seconds (log) against workers</text>"#,
            x0 + pad,
            load.name()
        );
        for (i, workers) in WORKERS.iter().enumerate() {
            let _ = write!(
                svg,
                r##"<line x1="{0}" y1="20" x2="{0}" y2="{1}" stroke="#ddd"/><text x="{0}" y="{2}" text-anchor="middle">{workers}</text>"##,
                px(i),
                h - pad,
                h - pad + 16.0
            );
        }
        let mut decade = lo;
        while decade <= hi {
            for m in [1.0, 2.0, 5.0] {
                let s = m * 10f64.powf(decade);
                if s.log10() >= lo && s.log10() <= hi {
                    let _ = write!(
                        svg,
                        r##"<line x1="{a}" y1="{y}" x2="{b}" y2="{y}" stroke="#eee"/><text x="{t}" y="{ty}" text-anchor="end">{s}</text>"##,
                        a = px(0),
                        y = py(s),
                        b = px(3),
                        t = px(0) - 4.0,
                        ty = py(s) + 4.0
                    );
                }
            }
            decade += 1.0;
        }
        for (l, strategy, times) in results {
            if *l != load {
                continue;
            }
            let points: Vec<String> = times
                .iter()
                .enumerate()
                .map(|(i, t)| format!("{:.1},{:.1}", px(i), py(t.as_secs_f64())))
                .collect();
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
                strategy.color(),
                points.join(" ")
            );
        }
    }
    for (i, strategy) in STRATEGIES.iter().enumerate() {
        let y = 40.0 + 18.0 * i as f64;
        let x = 2.0 * w + 5.0;
        let _ = write!(
            svg,
            r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            x + 20.0,
            strategy.color(),
            x + 25.0,
            y + 4.0,
            strategy.name()
        );
    }
    svg.push_str("</svg>\n");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(path, svg).unwrap();
}

fn main() {
    let tests: usize = std::env::var("BENCH_TESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(384);
    // Suites of under a second are noisy on a shared machine: medians of 5. The
    // alternatives take seconds to minutes per suite and run once.
    let repeat: usize = std::env::var("BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let repeat_slow: usize = std::env::var("BENCH_REPEAT_SLOW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let selected: Vec<String> = match std::env::var("BENCH_STRATEGIES") {
        Ok(list) => list.split(',').map(|s| s.trim().to_owned()).collect(),
        Err(_) => STRATEGIES.iter().map(|s| s.name().to_owned()).collect(),
    };
    for name in &selected {
        assert!(
            STRATEGIES.iter().any(|s| s.name() == name),
            "BENCH_STRATEGIES: unknown strategy {name:?}; the strategies are {:?}",
            STRATEGIES.map(Strategy::name)
        );
    }
    let plot_path = std::env::var("BENCH_PLOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("target/pgfixture-bench/suite.svg")
        });
    let run = format!("bs{:07x}", std::process::id() & 0xfff_ffff);
    let setup = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let raw = Arc::new(setup.block_on(raw_server(&run)));
    // Warm: the shared server, the template, the first schema.
    for isolation in [Isolation::Database, Isolation::Schema] {
        let f = fixture(&run, isolation, 1);
        drop(setup.block_on(f.worker_db()).unwrap());
    }
    let backend = fixture(&run, Isolation::Database, 1).stats();
    let mut results = Vec::new();
    let mut csv = String::from("load,strategy,workers,seconds\n");
    for load in [Load::Io, Load::Cpu] {
        println!();
        println!(
            "{} suite, {tests} tests, median of {repeat} (of {repeat_slow} for the alternatives to pgfixture but the floor): seconds; speedup 4 workers over 1; x pgfixture at 4 workers",
            load.name()
        );
        println!(
            "{:<17} {:>8} {:>8} {:>8} {:>8} {:>9} {:>12}",
            "strategy", "1", "2", "4", "8", "4 vs 1", "x pgfixture"
        );
        let mut reference = None;
        for strategy in STRATEGIES {
            let repeat = match strategy {
                Strategy::DbPerTest | Strategy::ClonePerTest | Strategy::ServerPerTest => {
                    repeat_slow
                }
                _ => repeat,
            };
            if !selected.iter().any(|s| s == strategy.name()) {
                continue;
            }
            // Each repeat runs every worker count, so that the machine's drift
            // reaches the speedup's numerator and denominator alike.
            let mut samples = vec![Vec::with_capacity(repeat); WORKERS.len()];
            for _ in 0..repeat {
                for (i, &w) in WORKERS.iter().enumerate() {
                    samples[i].push(suite(strategy, load, w, tests, &run, &raw));
                }
            }
            let times: Vec<Duration> = samples.into_iter().map(median).collect();
            for (w, t) in WORKERS.iter().zip(&times) {
                let _ = writeln!(
                    csv,
                    "{},{},{w},{:.4}",
                    load.name(),
                    strategy.name(),
                    t.as_secs_f64()
                );
            }
            let at4 = times[2].as_secs_f64();
            let reference = *reference.get_or_insert(at4);
            println!(
                "{:<17} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}x {:>11.2}x{}",
                strategy.name(),
                times[0].as_secs_f64(),
                times[1].as_secs_f64(),
                times[2].as_secs_f64(),
                times[3].as_secs_f64(),
                times[0].as_secs_f64() / at4,
                at4 / reference,
                match strategy {
                    Strategy::ServerPerTest => "  (scaled from 2 W tests)".to_owned(),
                    Strategy::DbPerTest | Strategy::ClonePerTest if slow_sample() < tests =>
                        format!("  (scaled from {} tests)", slow_sample()),
                    _ => String::new(),
                }
            );
            results.push((load, strategy, times));
        }
    }
    if std::env::var("BENCH_MIXED").as_deref() != Ok("0") {
        mixed_suites(tests, repeat, &run, &raw);
    }
    plot(&results, tests, &plot_path);
    let csv_path = plot_path.with_extension("csv");
    std::fs::write(&csv_path, csv).unwrap();
    println!();
    println!(
        "backend: {} ({}); plot: {}; numbers: {}",
        backend.backend.unwrap_or("?"),
        backend.flavour.unwrap_or_default(),
        plot_path.display(),
        csv_path.display()
    );
}
