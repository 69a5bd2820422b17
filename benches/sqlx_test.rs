//! The real `#[sqlx::test]` against `#[pgfixture::test]`, side by side in one run, on
//! the same migrations folder of a realistic size, and the build time of a file of
//! 100 tests under `#[tokio::test]`, `#[pgfixture::test]` and `#[sqlx::test]`.
//!
//! ```text
//! cargo bench --bench sqlx_test
//! ```
//!
//! It writes a small crate under `target/bench-sqlx-test/` (30 migrations with tables,
//! indexes, functions and seed data; the same tests three times over), builds it, and
//! runs each test binary as `cargo test` would, with 1, 2, 4 and 8 test threads:
//!
//! - `sqlx_test`: `#[sqlx::test] async fn t(pool: PgPool)`: a database per test, every
//!   migration run in it, on a server this bench starts (through pgfixture, with the
//!   same settings) and passes as `DATABASE_URL`: once with its data on disk, as users'
//!   servers keep it (`$TMPDIR/pgfixture-bench-disk`; the ratios are against this
//!   one), and once in memory, where pgfixture keeps its own local servers;
//! - `renamed`: the same file with the attribute renamed to `#[pgfixture::test]`;
//! - `test_db`: the same tests taking `pgfixture::sqlx::TestDb`, from cold (a server
//!   to start, the template to build) and reused (`PGFIXTURE_REUSE=1` after one run
//!   that is not measured: the edit-test loop, and the fair match for a
//!   `#[sqlx::test]` server that is already up).
//!
//! pgfixture's runs start their own server each time (a new run id per process):
//! their wall time includes the cold start and the template build, which a
//! `#[sqlx::test]` run does not pay here because its server is already up. Both use the
//! backend the environment selects (`PGFIXTURE_BACKEND=local` for the figures in
//! BENCHMARKS.md).
//!
//! Then a crate's layout: `BENCH_FILES` (default 8) test files of `BENCH_FILE_TESTS`
//! (default 5) tests each, every file a test binary, run one after another as `cargo
//! test` runs them, at 4 test threads: `#[sqlx::test]` (on disk), and the files renamed
//! to `#[pgfixture::test]` with a run per binary (each starts a server and builds the
//! template: what `cargo test` gave before its binaries shared a run, and still gives
//! where there is no `/proc`) and with one run for all (what `cargo test` gives: the
//! binaries after the first find everything ready).
//!
//! `BENCH_TESTS` (default 100) sets the tests per file, `BENCH_REPEAT` (default 3) the
//! runs per cell, `BENCH_THREADS` (default `1,2,4,8`) the thread counts, and
//! `BENCH_BUILD=0` skips the build-time part. Medians are printed.

#[path = "common/migration.rs"]
mod migration;
use migration::migration;
#[path = "common/run.rs"]
mod run;
use run::{env_or, median};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIGRATIONS: usize = 30;

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// One realistic small test body on `$conn` (an executor expression).
fn body(n: usize, conn: &str) -> String {
    format!(
        "    sqlx::query(\"INSERT INTO t1 (name, amount) VALUES ($1, 10)\").bind(\"test {n}\").execute({conn}).await.unwrap();\n    \
         let (count,): (i64,) = sqlx::query_as(\"SELECT count(*) FROM t1 WHERE name LIKE 'test %'\").fetch_one({conn}).await.unwrap();\n    \
         assert_eq!(count, 1, \"another test's row is visible\");\n"
    )
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // Unchanged files keep their times, so that cargo rebuilds nothing needlessly.
    if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
        std::fs::write(path, text).unwrap();
    }
}

/// The generated crate.
fn generate(dir: &Path, tests: usize, files: usize, file_tests: usize) {
    let repo = env!("CARGO_MANIFEST_DIR");
    write(
        &dir.join("Cargo.toml"),
        &format!(
            r#"[package]
name = "bench-sqlx-test"
version = "0.0.0"
edition = "2024"
publish = false

[workspace]

[dev-dependencies]
pgfixture = {{ path = "{repo}", features = ["sqlx"] }}
sqlx = {{ version = "0.9.0", default-features = false, features = ["postgres", "runtime-tokio", "migrate", "macros"] }}
tokio = {{ version = "1", features = ["macros", "rt-multi-thread"] }}
"#
        ),
    );
    write(&dir.join("src/lib.rs"), "");
    for i in 1..=MIGRATIONS {
        write(
            &dir.join(format!("migrations/{:04}_step_{i}.sql", i)),
            &migration(i),
        );
    }
    let file = |attr: &str, param: &str, conn: &str| {
        let mut text = String::from("#![allow(unused)]\nuse sqlx::{PgPool, Connection};\n\n");
        for n in 0..tests {
            text.push_str(&format!(
                "#[{attr}]\nasync fn t{n}({param}) {{\n{}}}\n\n",
                body(n, conn)
            ));
        }
        text
    };
    write(
        &dir.join("tests/sqlx_test.rs"),
        &file("sqlx::test", "pool: PgPool", "&pool"),
    );
    write(
        &dir.join("tests/renamed.rs"),
        &file("pgfixture::test", "pool: PgPool", "&pool"),
    );
    write(
        &dir.join("tests/test_db.rs"),
        &file(
            "pgfixture::test",
            "mut db: pgfixture::sqlx::TestDb",
            "&mut *db",
        ),
    );
    // A crate's layout: several files of a few tests, in both attributes' spelling.
    for f in 1..=files {
        let several = |attr: &str| {
            let mut text = String::from("#![allow(unused)]\nuse sqlx::PgPool;\n\n");
            for n in 0..file_tests {
                text.push_str(&format!(
                    "#[{attr}]\nasync fn t{n}(pool: PgPool) {{\n{}}}\n\n",
                    body(n, "&pool")
                ));
            }
            text
        };
        write(
            &dir.join(format!("tests/multi_sqlx_{f}.rs")),
            &several("sqlx::test"),
        );
        write(
            &dir.join(format!("tests/multi_renamed_{f}.rs")),
            &several("pgfixture::test"),
        );
    }
    // Build time: 100 tests per file, each attribute, the same trivial body, so that
    // only what the attribute generates differs.
    let build = |attr: &str, param: &str| {
        let mut text = String::from("#![allow(unused)]\nuse sqlx::PgPool;\n\n");
        for n in 0..100 {
            text.push_str(&format!(
                "#[{attr}]\nasync fn t{n}({param}) {{\n    assert_eq!({n} + 1, {});\n}}\n\n",
                n + 1
            ));
        }
        text
    };
    // The #[tokio::test] file also uses pgfixture (as a suite on `worker_db()` does),
    // so that all three link the same libraries and only the attributes differ.
    write(
        &dir.join("tests/build_tokio.rs"),
        &format!(
            "{}#[tokio::test]\nasync fn links_pgfixture() {{\n    let _ = pgfixture::worker_id();\n}}\n",
            build("tokio::test", "")
        ),
    );
    write(
        &dir.join("tests/build_pgfixture.rs"),
        &build("pgfixture::test", "_pool: PgPool"),
    );
    write(
        &dir.join("tests/build_sqlx.rs"),
        &build("sqlx::test", "_pool: PgPool"),
    );
}

/// Builds the test binaries and returns their paths by target name.
fn build(dir: &Path) -> Vec<(String, PathBuf)> {
    let output = Command::new(env!("CARGO"))
        .args(["test", "--no-run", "--message-format=json"])
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .output()
        .expect("cargo test --no-run");
    assert!(
        output.status.success(),
        "building the generated crate failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(exe) = field(line, "\"executable\":\"") else {
            continue;
        };
        let Some(name) = field(line, "\"name\":\"") else {
            continue;
        };
        binaries.push((name, PathBuf::from(exe)));
    }
    binaries
}

/// The string value after `key` in a line of cargo's JSON.
fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(key)? + key.len();
    let end = line[start..].find('"')? + start;
    Some(line[start..end].to_owned())
}

/// Runs `binary` with `threads` test threads; its wall time.
fn run(
    binary: &Path,
    dir: &Path,
    threads: usize,
    database_url: &str,
    extra: &[(&str, &str)],
) -> Duration {
    let started = Instant::now();
    // RUST_TEST_THREADS rather than --test-threads: pgfixture sizes its in-process
    // worker slots from the variable (the flag alone leaves them at the core count).
    let output = Command::new(binary)
        .arg("-q")
        .env("RUST_TEST_THREADS", threads.to_string())
        .current_dir(dir)
        .env("CARGO_MANIFEST_DIR", dir)
        .env("DATABASE_URL", database_url)
        // Servers of finished runs go soon, so that they do not pile up between runs.
        .env("PGFIXTURE_GRACE", "2")
        .env_remove("PGFIXTURE_RUN_ID")
        .env_remove("NEXTEST_RUN_ID")
        .envs(extra.iter().copied())
        .output()
        .expect("running a test binary");
    let wall = started.elapsed();
    assert!(
        output.status.success(),
        "{} failed:\n{}\n{}",
        binary.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    wall
}

/// Touches `file` and rebuilds its test target: the incremental build a change to that
/// file costs, dependencies already built.
fn rebuild(dir: &Path, target: &str) -> Duration {
    let file = dir.join(format!("tests/{target}.rs"));
    let text = std::fs::read_to_string(&file).unwrap();
    // A change that alters the file's content, as an edit does.
    let edited = match text.strip_suffix("// edit\n") {
        Some(original) => original.to_owned(),
        None => format!("{text}// edit\n"),
    };
    std::fs::write(&file, edited).unwrap();
    let started = Instant::now();
    let status = Command::new(env!("CARGO"))
        .args(["test", "--no-run", "-q", "--test", target])
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .status()
        .expect("cargo test --no-run");
    assert!(status.success());
    started.elapsed()
}

fn main() {
    let tests = env_or("BENCH_TESTS", 100);
    let repeat = env_or("BENCH_REPEAT", 3);
    let threads: Vec<usize> = std::env::var("BENCH_THREADS")
        .unwrap_or_else(|_| "1,2,4,8".into())
        .split(',')
        .filter_map(|t| t.trim().parse().ok())
        .collect();
    let files = env_or("BENCH_FILES", 8);
    let file_tests = env_or("BENCH_FILE_TESTS", 5);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-sqlx-test");
    generate(&dir, tests, files, file_tests);
    eprintln!(
        "building {} (the first build compiles sqlx)...",
        dir.display()
    );
    let binaries = build(&dir);
    let binary = |name: &str| {
        binaries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| panic!("no test binary {name}"))
    };

    // The servers #[sqlx::test] gets, started by pgfixture and held up by a handle:
    // one with its data on disk, as users' servers have it (a service, or a container's
    // overlay file system), and one in memory, as pgfixture keeps its own local servers
    // (the same for both with the Docker backend, whose containers keep data in memory).
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let disk = std::env::temp_dir().join("pgfixture-bench-disk");
    let server = |local_dir: Option<PathBuf>| {
        let mut config = pgfixture::Config::from_env().expect("configuration");
        if local_dir.is_some() {
            config.local_dir = local_dir;
        }
        let fixture = pgfixture::Fixture::builder()
            .config(config)
            .no_fixtures()
            .no_migrations()
            .build()
            .expect("fixture");
        let db = runtime.block_on(fixture.worker_db()).expect("a server");
        let url = db.url().as_str().to_owned();
        let database_url = match url.rsplit_once('/') {
            Some((server, rest)) => {
                let query = rest
                    .split_once('?')
                    .map(|(_, q)| format!("?{q}"))
                    .unwrap_or_default();
                format!("{server}/postgres{query}")
            }
            None => url,
        };
        (db, database_url)
    };
    let (disk_db, disk_url) = server(Some(disk));
    let (db, database_url) = server(None);

    println!();
    println!(
        "#[sqlx::test] against #[pgfixture::test]: {tests} tests, {MIGRATIONS} migrations, median of {repeat} runs (wall time of the test binary)"
    );
    println!(
        "{:<8} {:>11} {:>11} {:>17} {:>14} {:>16} {:>8} {:>8} {:>8}",
        "threads",
        "sqlx, disk",
        "sqlx, mem",
        "renamed (PgPool)",
        "TestDb, cold",
        "TestDb, reused",
        "ratio",
        "ratio",
        "ratio"
    );
    let reuse = [("PGFIXTURE_REUSE", "1"), ("PGFIXTURE_REUSE_IDLE", "60")];
    for &t in &threads {
        let mut cells = Vec::new();
        cells.push(median(
            (0..repeat)
                .map(|_| run(&binary("sqlx_test"), &dir, t, &disk_url, &[]))
                .collect(),
        ));
        for (name, extra) in [
            ("sqlx_test", &[][..]),
            ("renamed", &[][..]),
            ("test_db", &[][..]),
            ("test_db", &reuse[..]),
        ] {
            let path = binary(name);
            if !extra.is_empty() {
                // The run that leaves servers, templates and workers for the next.
                run(&path, &dir, t, &database_url, extra);
            }
            let runs: Vec<Duration> = (0..repeat)
                .map(|_| run(&path, &dir, t, &database_url, extra))
                .collect();
            cells.push(median(runs));
        }
        // Against #[sqlx::test] on a server on disk, as users run it.
        let ratio = |i: usize| cells[0].as_secs_f64() / cells[i].as_secs_f64();
        println!(
            "{:<8} {:>11} {:>11} {:>17} {:>14} {:>16} {:>7.1}x {:>7.1}x {:>7.1}x",
            t,
            secs(cells[0]),
            secs(cells[1]),
            secs(cells[2]),
            secs(cells[3]),
            secs(cells[4]),
            ratio(2),
            ratio(3),
            ratio(4),
        );
    }

    // A crate's layout, its binaries one after another as `cargo test` runs them.
    println!();
    println!(
        "a crate of {files} test files of {file_tests} tests, each file a binary, run one after another at 4 test threads, median of {repeat} (sum of the binaries' wall times)"
    );
    let mut runs = 0;
    let mut new_run = || {
        runs += 1;
        format!("bm{:x}r{runs}", std::process::id() % 0xfffff)
    };
    let suite = |kind: &str, url: &str, run_of: &mut dyn FnMut(usize) -> Option<String>| {
        (1..=files)
            .map(|f| {
                let run_id = run_of(f);
                let extra: Vec<(&str, &str)> = run_id
                    .iter()
                    .map(|id| ("PGFIXTURE_RUN_ID", id.as_str()))
                    .collect();
                run(&binary(&format!("multi_{kind}_{f}")), &dir, 4, url, &extra)
            })
            .sum::<Duration>()
    };
    let mut sqlx_disk = Vec::new();
    let mut per_binary = Vec::new();
    let mut one_run = Vec::new();
    for _ in 0..repeat {
        sqlx_disk.push(suite("sqlx", &disk_url, &mut |_| None));
        per_binary.push(suite("renamed", &database_url, &mut |_| Some(new_run())));
        let run = new_run();
        one_run.push(suite("renamed", &database_url, &mut |_| Some(run.clone())));
    }
    let (sqlx_disk, per_binary, one_run) = (median(sqlx_disk), median(per_binary), median(one_run));
    let ratio = |d: Duration| sqlx_disk.as_secs_f64() / d.as_secs_f64();
    println!(
        "  #[sqlx::test], disk {}; renamed, a run per binary {} ({:.1}x); renamed, one run {} ({:.1}x)",
        secs(sqlx_disk),
        secs(per_binary),
        ratio(per_binary),
        secs(one_run),
        ratio(one_run)
    );
    drop((db, disk_db));

    if std::env::var("BENCH_BUILD").as_deref() != Ok("0") {
        println!();
        println!("incremental build of a file of 100 tests after an edit, median of {repeat}");
        for target in ["build_tokio", "build_pgfixture", "build_sqlx"] {
            // Once to settle what the first build left.
            rebuild(&dir, target);
            let runs: Vec<Duration> = (0..repeat).map(|_| rebuild(&dir, target)).collect();
            println!("  {target:<18} {}", secs(median(runs)));
        }
    }
}
