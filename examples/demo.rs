//! The main example: a parallel demo suite on the best backend available.
//!
//! ```text
//! cargo run --release --example demo
//! ```
//!
//! Runs a few hundred small tests the way `cargo test` does (a thread per running
//! test, a fresh tokio runtime per test) over 4 workers, each test writing rows that
//! collide if isolation fails, then prints what it cost. It runs them twice, through
//! each driver: tokio-postgres (`pgfixture::worker_db`) and sqlx
//! (`pgfixture::sqlx::TestDb`), and prints them side by side. The backend and isolation mode
//! come from the environment (`PGFIXTURE_BACKEND`, `PGFIXTURE_ISOLATION`, ...).
//! `DEMO_TESTS` sets the number of tests (default 400); `RUST_LOG=pgfixture=info` shows
//! pgfixture's events (server start, template build, worker provisioning).

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pgfixture::Fixture;

const WORKERS: usize = 4;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// One small test: fails if any other test's rows are visible.
async fn demo_test(fixture: &Fixture, n: usize) -> Result<Duration, String> {
    let started = Instant::now();
    let db = fixture.worker_db().await.map_err(|e| e.to_string())?;
    let acquired = started.elapsed();
    let email = "demo@example.com"; // every test uses the same unique email
    db.execute("INSERT INTO users (email) VALUES ($1)", &[&email])
        .await
        .map_err(|e| format!("test {n}: a previous test's row leaked: {e:?}"))?;
    let owner = format!("test-{n}");
    for i in 0..3 {
        db.execute(
            "INSERT INTO notes (owner, body) VALUES ($1, $2)",
            &[&owner, &format!("note {i}")],
        )
        .await
        .map_err(|e| e.to_string())?;
    }
    let row = db
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE owner <> $1) FROM notes",
            &[&owner],
        )
        .await
        .map_err(|e| e.to_string())?;
    let (all, foreign): (i64, i64) = (row.get(0), row.get(1));
    if all != 3 || foreign != 0 {
        return Err(format!("test {n}: sees {foreign} rows of other tests"));
    }
    let release_started = Instant::now();
    db.release().await.map_err(|e| e.to_string())?;
    Ok(acquired + release_started.elapsed())
}

/// The same test through the sqlx driver.
async fn demo_test_sqlx(fixture: &Fixture, n: usize) -> Result<Duration, String> {
    use pgfixture::sqlx;
    let started = Instant::now();
    let mut db = pgfixture::sqlx::TestDb::acquire(fixture)
        .await
        .map_err(|e| e.to_string())?;
    let acquired = started.elapsed();
    sqlx::query("INSERT INTO users (email) VALUES ($1)")
        .bind("demo@example.com")
        .execute(&mut *db)
        .await
        .map_err(|e| format!("test {n}: a previous test's row leaked: {e:?}"))?;
    let owner = format!("test-{n}");
    for i in 0..3 {
        sqlx::query("INSERT INTO notes (owner, body) VALUES ($1, $2)")
            .bind(&owner)
            .bind(format!("note {i}"))
            .execute(&mut *db)
            .await
            .map_err(|e| e.to_string())?;
    }
    let (all, foreign): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE owner <> $1) FROM notes")
            .bind(&owner)
            .fetch_one(&mut *db)
            .await
            .map_err(|e| e.to_string())?;
    if all != 3 || foreign != 0 {
        return Err(format!("test {n}: sees {foreign} rows of other tests"));
    }
    let release_started = Instant::now();
    db.release().await.map_err(|e| e.to_string())?;
    Ok(acquired + release_started.elapsed())
}

#[derive(Clone, Copy)]
enum Driver {
    TokioPostgres,
    Sqlx,
}

/// What one pass of the suite cost.
struct Report {
    wall: Duration,
    overheads: Vec<Duration>,
    failures: Vec<String>,
}

/// Runs `tests` tests over the workers through `driver`.
fn run_suite(fixture: &Fixture, tests: usize, driver: Driver) -> Report {
    let next = AtomicUsize::new(0);
    let overheads = Mutex::new(Vec::with_capacity(tests));
    let failures = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            scope.spawn(|| {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= tests {
                        break;
                    }
                    // What #[tokio::test] does: a new current-thread runtime per test.
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    let result = match driver {
                        Driver::TokioPostgres => runtime.block_on(demo_test(fixture, n)),
                        Driver::Sqlx => runtime.block_on(demo_test_sqlx(fixture, n)),
                    };
                    match result {
                        Ok(d) => overheads.lock().unwrap().push(d),
                        Err(e) => failures.lock().unwrap().push(e),
                    }
                }
            });
        }
    });
    let wall = started.elapsed();
    let mut overheads = overheads.into_inner().unwrap();
    overheads.sort();
    Report {
        wall,
        overheads,
        failures: failures.into_inner().unwrap(),
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let tests: usize = std::env::var("DEMO_TESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    // The demo's own schema, unless PGFIXTURE_FIXTURES points elsewhere.
    let mut builder = Fixture::builder().workers(WORKERS);
    if std::env::var_os("PGFIXTURE_FIXTURES").is_none() {
        builder = builder.fixtures(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures"));
    }
    let fixture = match builder.build() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("demo: {e}");
            std::process::exit(2);
        }
    };
    let config = fixture.config().clone();
    let tokio_postgres = run_suite(&fixture, tests, Driver::TokioPostgres);
    let sqlx = run_suite(&fixture, tests, Driver::Sqlx);
    let stats = fixture.stats();

    println!();
    println!("pgfixture demo");
    let backend = format!(
        "{} ({})",
        stats.backend.unwrap_or("none"),
        stats.flavour.clone().unwrap_or_default()
    );
    println!("  {:<28} {backend}", "backend");
    println!("  {:<28} {:?}", "isolation mode", config.isolation);
    println!("  {:<28} {}", "workers", WORKERS);
    println!("  {:<28} {:<18} sqlx", "driver", "tokio-postgres");
    let row = |label: &str, f: &dyn Fn(&Report) -> String| {
        println!("  {label:<28} {:<18} {}", f(&tokio_postgres), f(&sqlx));
    };
    row("tests (passed/failed)", &|r| {
        format!("{}/{}", r.overheads.len(), r.failures.len())
    });
    row("wall time", &|r| ms(r.wall));
    row("per-test overhead p50", &|r| {
        ms(percentile(&r.overheads, 0.50))
    });
    row("per-test overhead p95", &|r| {
        ms(percentile(&r.overheads, 0.95))
    });
    // The first pass provisions the workers; its slowest test includes the start.
    row("slowest", &|r| {
        ms(r.overheads.last().copied().unwrap_or_default())
    });
    println!(
        "  {:<28} {} started, {} reused; {} template(s) built",
        "servers", stats.servers_started, stats.servers_reused, stats.templates_built
    );
    println!("  tests served per worker:");
    for (worker, served) in &stats.served {
        println!("    worker {worker:<22} {served}");
    }
    let failures: Vec<&String> = tokio_postgres
        .failures
        .iter()
        .chain(&sqlx.failures)
        .collect();
    if !failures.is_empty() {
        eprintln!();
        for f in failures.iter().take(10) {
            eprintln!("FAILED: {f}");
        }
        std::process::exit(1);
    }
}
