//! Per-test cost of a fresh process, the way nextest runs every test: the process
//! starts, takes its worker's handle (the worker already provisioned by an earlier
//! process of the run), runs a first query, releases the handle and exits.
//!
//! ```text
//! cargo bench --bench process                 # release build
//! cargo bench --bench process --profile dev   # as an unoptimised test binary
//! BENCH_PROCESSES=100 cargo bench --bench process
//! ```
//!
//! Side by side, per isolation mode, medians of processes run one after the other, the
//! kinds taking turns (each round starting one kind later) so that the machine's drift,
//! and the end of the previous process's backend, reach every column alike. Every
//! process runs with `NEXTEST_EXECUTION_MODE=process-per-test` and one `NEXTEST_RUN_ID`
//! for the bench's run, as under nextest:
//! - `empty`: a process of this binary that exits at once (the floor of process start);
//! - `raw`: a process that opens one connection with tokio-postgres and runs the query
//!   (the floor of a process that talks to PostgreSQL at all);
//! - `pgfixture`: `worker_db()`, the query, `release()`. Its `inside` column is the part
//!   after `main` starts, as the process measures it;
//! - `sqlx raw`: a process that opens one sqlx `PgConnection` and runs the query;
//! - `sqlx`: `pgfixture::sqlx::worker_db()`, the query, `release()`, in a plain
//!   runtime (`#[tokio::test]`'s);
//! - `sqlx attr`: the same test as `#[pgfixture::test]` expands it, taking
//!   `pgfixture::sqlx::TestDb` and dropping it at its end (its connection on the
//!   test's own runtime: README, "Under nextest");
//! - `sqlx pool`: a `#[pgfixture::test]` taking `sqlx::PgPool`, as a renamed
//!   `#[sqlx::test]` usually does: the worker pool, its marks and readings (README,
//!   "Tests that commit"), the query through the pool.
//!
//! Each mode runs with pgfixture's own two fixture files, and database and schema modes
//! once more with a migrations folder of a real project's size (`+migrations`: 200
//! sqlx migrations, 70 KB, written once under `target/pgfixture-bench/`): every
//! process must know their content hash.
//!
//! With `PGFIXTURE_URL` set, every process uses that server (the url backend: a
//! team's CI service or shared server), and container mode, which starts servers, is
//! left out. `scripts/benchmarks.sh` runs it so on a plain cluster of its own
//! (`scripts/url-server.sh`).
//!
//! The process re-runs this binary with `PGFIXTURE_BENCH_CHILD` set.

#[path = "common/migration.rs"]
mod migration;
use migration::migration;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pgfixture::Isolation;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:>7.2} ms", d.as_secs_f64() * 1e3)
}

fn child(mode: &str) {
    let started = Instant::now();
    if mode == "empty" {
        return;
    }
    // What `#[pgfixture::test]` expands to: the attribute's runtime, and the handle
    // dropped at the test's end.
    let args = || pgfixture::__macro::TestArgs {
        name: "process::attribute",
        file: file!(),
        manifest_dir: env!("CARGO_MANIFEST_DIR"),
        fixtures: &[],
        migrations: pgfixture::__macro::Migrations::Inferred,
        setup: None,
    };
    if mode == "sqlx_attr" {
        // `async fn t(mut db: pgfixture::sqlx::TestDb)`
        pgfixture::__macro::run::<pgfixture::sqlx::TestDb, ()>(
            args(),
            pgfixture::__macro::runtime(false, None),
            |mut db| {
                Box::pin(async move {
                    pgfixture::sqlx::query("SELECT 1")
                        .execute(&mut *db)
                        .await
                        .unwrap();
                })
            },
        );
        println!("inside_us={}", started.elapsed().as_micros());
        return;
    }
    if mode == "sqlx_pool" {
        // `async fn t(pool: sqlx::PgPool)`, `#[sqlx::test]`'s usual signature.
        pgfixture::__macro::run::<pgfixture::sqlx::PgPool, ()>(
            args(),
            pgfixture::__macro::runtime(false, None),
            |pool| {
                Box::pin(async move {
                    pgfixture::sqlx::query("SELECT 1")
                        .execute(&pool)
                        .await
                        .unwrap();
                })
            },
        );
        println!("inside_us={}", started.elapsed().as_micros());
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        if mode == "sqlx_raw" {
            use pgfixture::sqlx::Connection;
            let url = std::env::var("PGFIXTURE_BENCH_URL").unwrap();
            let mut conn = pgfixture::sqlx::PgConnection::connect(&url).await.unwrap();
            pgfixture::sqlx::query("SELECT 1")
                .execute(&mut conn)
                .await
                .unwrap();
        } else if mode == "sqlx" {
            let mut db = pgfixture::sqlx::worker_db().await.unwrap();
            pgfixture::sqlx::query("SELECT 1")
                .execute(&mut *db)
                .await
                .unwrap();
            db.release().await.unwrap();
        } else if mode == "raw" {
            let url = std::env::var("PGFIXTURE_BENCH_URL").unwrap();
            let (client, connection) =
                pgfixture::tokio_postgres::connect(&url, pgfixture::tokio_postgres::NoTls)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            client.query_one("SELECT 1", &[]).await.unwrap();
        } else {
            let db = pgfixture::worker_db().await.unwrap();
            db.query_one("SELECT 1", &[]).await.unwrap();
            db.release().await.unwrap();
        }
    });
    println!("inside_us={}", started.elapsed().as_micros());
}

/// The folder of `MIGRATIONS` migrations, written once: a project's migrations are
/// older than its test run, as pgfixture's record of their hash needs.
fn migrations_dir() -> PathBuf {
    const MIGRATIONS: usize = 200;
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pgfixture-bench/process-migrations");
    let last = dir.join(format!("{MIGRATIONS:04}_step_{MIGRATIONS}.sql"));
    if !last.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        for i in 1..=MIGRATIONS {
            let path = dir.join(format!("{i:04}_step_{i}.sql"));
            std::fs::write(path, migration(i)).unwrap();
        }
        // Files written within pgfixture's margin of its reading are read by every
        // process, as they might have changed unseen in the same clock tick.
        std::thread::sleep(Duration::from_secs(4));
    }
    dir
}

/// Wall times of child processes of one kind, and the times they measured inside.
#[derive(Default)]
struct Runs {
    wall: Vec<Duration>,
    inside: Vec<Duration>,
}

impl Runs {
    /// Runs one child process of `mode` and records its times.
    fn run(&mut self, mode: &str, env: &[(&str, String)]) {
        let started = Instant::now();
        let out = Command::new(std::env::current_exe().unwrap())
            .env("PGFIXTURE_BENCH_CHILD", mode)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        self.wall.push(started.elapsed());
        assert!(
            out.status.success(),
            "{mode} child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        if let Some(us) = stdout
            .split_whitespace()
            .find_map(|w| w.strip_prefix("inside_us="))
        {
            self.inside.push(Duration::from_micros(us.parse().unwrap()));
        }
    }

    fn median(&mut self) -> Duration {
        self.wall.sort();
        percentile(&self.wall, 0.5)
    }

    fn median_inside(&mut self) -> Duration {
        self.inside.sort();
        percentile(&self.inside, 0.5)
    }
}

fn main() {
    if let Ok(mode) = std::env::var("PGFIXTURE_BENCH_CHILD") {
        child(&mode);
        return;
    }
    let n: usize = std::env::var("BENCH_PROCESSES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let profile = if cfg!(debug_assertions) {
        "dev (unoptimised)"
    } else {
        "release"
    };
    println!(
        "per-test cost of a fresh process, warm worker ({n} processes per column, {profile} build)"
    );
    println!(
        "{:<14} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>10} {:>10} {:>9} {:>10} {:>9} {:>10} {:>9}",
        "mode",
        "empty",
        "raw",
        "pgfixture",
        "inside",
        "overhead",
        "x raw",
        "sqlx raw",
        "sqlx",
        "x raw",
        "sqlx attr",
        "x raw",
        "sqlx pool",
        "x raw"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // At most 11 characters: used as it is, in this process and its children alike.
    let run_id = format!("bn{:07x}", std::process::id() & 0xfff_ffff);
    // nextest's own run id, a new UUID for every run, that every test process sees.
    let nextest_run_id = format!(
        "{:08x}-0000-4000-8000-{:012x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros()
            & 0xffff_ffff_ffff
    );
    let mut backend = String::new();
    let migrations = migrations_dir();
    let on_url = pgfixture::Config::from_env().unwrap().url.is_some();
    let runs = [
        (Isolation::Database, None),
        (Isolation::Schema, None),
        (Isolation::Container, None),
        (Isolation::Database, Some(&migrations)),
        (Isolation::Schema, Some(&migrations)),
    ];
    // A server of the user's refuses container mode: it starts servers.
    let runs = runs
        .into_iter()
        .filter(|(isolation, _)| !(on_url && *isolation == Isolation::Container));
    for (isolation, migrations) in runs {
        let mut mode = format!("{isolation:?}").to_lowercase();
        let mut env = vec![
            // As nextest announces it to every test process.
            ("NEXTEST_EXECUTION_MODE", "process-per-test".to_owned()),
            ("NEXTEST_RUN_ID", nextest_run_id.clone()),
            ("PGFIXTURE_RUN_ID", run_id.clone()),
            ("PGFIXTURE_ISOLATION", mode.clone()),
            ("PGFIXTURE_WORKER", "0".to_owned()),
            ("PGFIXTURE_GRACE", "5".to_owned()),
        ];
        if let Some(dir) = migrations {
            mode.push_str("+migr");
            env.push(("PGFIXTURE_MIGRATIONS", dir.display().to_string()));
        }
        // The first process provisions the worker (and starts servers); not measured.
        Runs::default().run("pgfixture", &env);
        // The raw floor connects to the same kind of server, through another worker's
        // pool guard of this process (same run, so the same shared server).
        let mut config = pgfixture::Config::from_env().unwrap();
        config.run_id = run_id.clone();
        config.isolation = isolation;
        config.grace = Duration::from_secs(5);
        config.worker = None;
        config.workers = 2;
        config.migrations = migrations.cloned();
        let fixture = pgfixture::Fixture::builder()
            .config(config)
            .build()
            .unwrap();
        let pool = runtime.block_on(fixture.worker_pool()).unwrap();
        let pg = pool.pg_config();
        let host = match &pg.get_hosts()[0] {
            pgfixture::tokio_postgres::config::Host::Tcp(h) => h.clone(),
            other => panic!("{other:?}"),
        };
        let url = format!(
            "postgres://{}:{}@{host}:{}/{}",
            pg.get_user().unwrap(),
            String::from_utf8_lossy(pg.get_password().unwrap()),
            pg.get_ports()[0],
            pg.get_dbname().unwrap()
        );
        let mut raw_env = env.clone();
        raw_env.push(("PGFIXTURE_BENCH_URL", url));

        let (mut empty, mut raw, mut pgf) = (Runs::default(), Runs::default(), Runs::default());
        let (mut sqlx_raw, mut sqlx, mut attr, mut pooled) = (
            Runs::default(),
            Runs::default(),
            Runs::default(),
            Runs::default(),
        );
        for i in 0..n {
            // Each round starts one kind later, so that every kind follows every other
            // equally often: a process starts while the server still ends the backend
            // of the one before, which costs the machine's two cores something.
            for k in 0..7 {
                match (i + k) % 7 {
                    0 => empty.run("empty", &env),
                    1 => raw.run("raw", &raw_env),
                    2 => pgf.run("pgfixture", &env),
                    3 => sqlx_raw.run("sqlx_raw", &raw_env),
                    4 => sqlx.run("sqlx", &env),
                    5 => attr.run("sqlx_attr", &env),
                    _ => pooled.run("sqlx_pool", &env),
                }
            }
        }
        let (e, r, p) = (empty.median(), raw.median(), pgf.median());
        let (sr, sp, sa, so) = (
            sqlx_raw.median(),
            sqlx.median(),
            attr.median(),
            pooled.median(),
        );
        println!(
            "{mode:<14} {} {} {} {} {} {:>8.2}x {} {} {:>8.2}x {} {:>8.2}x {} {:>8.2}x",
            ms(e),
            ms(r),
            ms(p),
            ms(pgf.median_inside()),
            ms(p.saturating_sub(e)),
            p.as_secs_f64() / r.as_secs_f64(),
            ms(sr),
            ms(sp),
            sp.as_secs_f64() / sr.as_secs_f64(),
            ms(sa),
            sa.as_secs_f64() / sr.as_secs_f64(),
            ms(so),
            so.as_secs_f64() / sr.as_secs_f64()
        );
        backend = fixture.stats().backend.unwrap_or("?").to_owned();
        runtime.block_on(pool.release()).unwrap();
    }
    println!("backend: {backend}; overhead = pgfixture - empty (medians); x raw = pgfixture / raw");
}
