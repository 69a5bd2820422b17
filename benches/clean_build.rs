//! What a test crate pays to build with pgfixture, from clean, beside the crates users
//! would otherwise reach for: `#[sqlx::test]` and testcontainers-modules' Postgres.
//!
//! ```text
//! cargo bench --bench clean_build
//! ```
//!
//! It writes one small crate per way under `target/bench-clean-build/`, each with a
//! single integration test that gets a database and runs `SELECT 1`, fetches their
//! dependencies (not timed), then for each removes the crate's own target directory and
//! times `cargo build --tests` (a debug build, as `cargo test` makes it), one after the
//! other, `BENCH_REPEAT` times (default 1: each build takes minutes). It also counts
//! the crates each build compiles (`cargo tree -e normal,build,dev`, unique, the crate
//! itself not counted).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

struct Way {
    name: &'static str,
    dependencies: String,
    test: &'static str,
}

fn ways() -> Vec<Way> {
    let repo = env!("CARGO_MANIFEST_DIR");
    let tokio = r#"tokio = { version = "1", features = ["macros", "rt-multi-thread"] }"#;
    vec![
        Way {
            name: "pgfixture",
            dependencies: format!("pgfixture = {{ path = \"{repo}\" }}\n{tokio}"),
            test: "#[tokio::test]\nasync fn select_one() {\n    let db = pgfixture::worker_db().await.unwrap();\n    db.query_one(\"SELECT 1\", &[]).await.unwrap();\n}\n",
        },
        Way {
            name: "pgfixture-without-docker",
            dependencies: format!(
                "pgfixture = {{ path = \"{repo}\", default-features = false, features = [\"macros\"] }}\n{tokio}"
            ),
            test: "#[tokio::test]\nasync fn select_one() {\n    let db = pgfixture::worker_db().await.unwrap();\n    db.query_one(\"SELECT 1\", &[]).await.unwrap();\n}\n",
        },
        Way {
            name: "pgfixture-sqlx",
            dependencies: format!(
                "pgfixture = {{ path = \"{repo}\", features = [\"sqlx\"] }}\n{tokio}"
            ),
            test: "#[pgfixture::test]\nasync fn select_one(mut db: pgfixture::sqlx::TestDb) {\n    pgfixture::sqlx::query(\"SELECT 1\").execute(&mut *db).await.unwrap();\n}\n",
        },
        Way {
            name: "sqlx-test",
            dependencies: format!(
                "sqlx = {{ version = \"0.9.0\", default-features = false, features = [\"postgres\", \"runtime-tokio\", \"macros\", \"migrate\"] }}\n{tokio}"
            ),
            test: "#[sqlx::test]\nasync fn select_one(pool: sqlx::PgPool) {\n    sqlx::query(\"SELECT 1\").execute(&pool).await.unwrap();\n}\n",
        },
        Way {
            name: "testcontainers",
            dependencies: format!(
                "testcontainers-modules = {{ version = \"0.13\", features = [\"postgres\"] }}\ntokio-postgres = \"0.7\"\n{tokio}"
            ),
            test: "use testcontainers_modules::{postgres::Postgres, testcontainers::runners::AsyncRunner};\n\n#[tokio::test]\nasync fn select_one() {\n    let node = Postgres::default().start().await.unwrap();\n    let url = format!(\"host=127.0.0.1 port={} user=postgres password=postgres\", node.get_host_port_ipv4(5432).await.unwrap());\n    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();\n    tokio::spawn(connection);\n    client.query_one(\"SELECT 1\", &[]).await.unwrap();\n}\n",
        },
    ]
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn cargo(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO"))
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .output()
        .expect("cargo runs")
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-clean-build");
    let repeat: usize = std::env::var("BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    println!(
        "clean build of a test crate with one test (cargo build --tests, debug), and the crates it compiles"
    );
    println!("{:<26} {:>10} {:>8}", "way", "build", "crates");
    for way in ways() {
        let dir = root.join(way.name);
        write(
            &dir.join("Cargo.toml"),
            &format!(
                "[package]\nname = \"bench-{}\"\nversion = \"0.0.0\"\nedition = \"2024\"\npublish = false\n\n[workspace]\n\n[dev-dependencies]\n{}\n",
                way.name, way.dependencies
            ),
        );
        write(&dir.join("src/lib.rs"), "");
        write(&dir.join("tests/select_one.rs"), way.test);
        let fetched = cargo(&dir, &["fetch"]);
        assert!(
            fetched.status.success(),
            "cargo fetch for {}:\n{}",
            way.name,
            String::from_utf8_lossy(&fetched.stderr)
        );
        let tree = cargo(
            &dir,
            &[
                "tree",
                "-e",
                "normal,build,dev",
                "--prefix",
                "none",
                "--format",
                "{p}",
            ],
        );
        let mut crates: Vec<String> = String::from_utf8_lossy(&tree.stdout)
            .lines()
            .map(|l| l.trim_end_matches(" (*)").to_owned())
            .filter(|l| !l.is_empty() && !l.starts_with("bench-"))
            .collect();
        crates.sort();
        crates.dedup();
        let mut times = Vec::new();
        for _ in 0..repeat {
            let _ = std::fs::remove_dir_all(dir.join("target"));
            let started = Instant::now();
            let built = cargo(&dir, &["build", "--tests"]);
            assert!(
                built.status.success(),
                "building {}:\n{}",
                way.name,
                String::from_utf8_lossy(&built.stderr)
            );
            times.push(started.elapsed());
        }
        times.sort();
        let median: Duration = times[times.len() / 2];
        println!(
            "{:<26} {:>8.1} s {:>8}",
            way.name,
            median.as_secs_f64(),
            crates.len()
        );
    }
}
