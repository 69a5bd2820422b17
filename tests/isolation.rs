//! The isolation suite: many small tests that would fail if any data leaked between
//! tests or workers. It runs against whatever the environment selects
//! (`PGFIXTURE_ISOLATION`, `PGFIXTURE_BACKEND`), under `cargo test` (tests are threads)
//! and under `cargo nextest run` (tests are processes); `scripts/test.sh` runs every
//! combination.
//!
//! While a test holds its handle it claims its target (server, database, schema) in a
//! directory shared by all processes of the run, with an exclusive file create: a second
//! test using the same target at the same time fails. Each test also records the server
//! it used, so that the run can be checked to have used one shared server (database and
//! schema modes) or one server per worker (container mode).

use std::path::PathBuf;
use std::time::Duration;

use pgfixture::{Isolation, TestDb};

mod common;

/// Where the tests of one run meet: one directory per run id.
fn run_dir(kind: &str) -> PathBuf {
    let run = pgfixture::Fixture::from_env()
        .expect("valid environment")
        .config()
        .run_id
        .clone();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("isolation-{run}"))
        .join(kind);
    std::fs::create_dir_all(&dir).expect("creating the run directory");
    dir
}

struct Target {
    server: String,
    database: String,
    schema: String,
    pid: i32,
}

async fn target(db: &TestDb) -> Target {
    let row = db
        .query_one(
            &format!(
                "SELECT {}, current_database()::text, current_schema()::text, pg_backend_pid()",
                common::SERVER_IDENTITY
            ),
            &[],
        )
        .await
        .expect("reading the target");
    Target {
        server: row.get(0),
        database: row.get(1),
        schema: row.get(2),
        pid: row.get(3),
    }
}

/// Claims `target` for this test; fails if another running test holds it.
struct Claim(PathBuf);

impl Claim {
    /// The claim file holds the test's name and process; a claim of a process that was
    /// killed (the soak test kills some) is stale and taken over. It appears whole: it
    /// is written under a name of the process's own and linked into place, so that a
    /// process killed while claiming never leaves an empty claim that no one could
    /// tell from a claim being written.
    fn take(target: &Target, test: &str) -> Claim {
        let key = format!("{}-{}-{}", target.server, target.database, target.schema)
            .replace(|c: char| !c.is_ascii_alphanumeric(), "_");
        let dir = run_dir("claims");
        let path = dir.join(&key);
        let written = dir.join(format!(".{key}.{}", std::process::id()));
        std::fs::write(&written, format!("{test} {}", std::process::id())).unwrap();
        let _written = Claim(written.clone());
        for _ in 0..3 {
            match std::fs::hard_link(&written, &path) {
                Ok(()) => return Claim(path),
                Err(_) => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    let pid = holder.split_whitespace().nth(1).unwrap_or_default();
                    if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                    panic!(
                        "{test}: target {}/{}/{} is in use by another test at the same time ({holder})",
                        target.server, target.database, target.schema,
                    );
                }
            }
        }
        panic!("{test}: could not claim {}", path.display());
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Records which server this worker used; fails if the run used more servers than
/// its mode allows.
fn record_server(target: &Target, worker: &str) {
    let isolation = pgfixture::Fixture::from_env().unwrap().config().isolation;
    let key = match isolation {
        Isolation::Container => format!("worker-{worker}"),
        _ => "shared".to_owned(),
    };
    let dir = run_dir("servers");
    let path = dir.join(&key);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
    {
        Ok(_) => std::fs::write(&path, &target.server).unwrap(),
        Err(_) => {
            // Another test wrote it; it may still be writing.
            let mut seen = String::new();
            for _ in 0..50 {
                seen = std::fs::read_to_string(&path).unwrap();
                if !seen.is_empty() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(
                seen, target.server,
                "{key}: every test of the run must use the same server"
            );
        }
    }
    if isolation == Isolation::Container {
        // Different workers, different servers.
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            if entry.file_name() != key.as_str() {
                let other = std::fs::read_to_string(entry.path()).unwrap();
                assert!(
                    other.is_empty() || other != target.server,
                    "workers {key} and {:?} share a server",
                    entry.file_name()
                );
            }
        }
    }
}

async fn isolated_test(name: &str, spin: u64) {
    let db = pgfixture::worker_db().await.expect("worker_db");
    let target = target(&db).await;
    let _claim = Claim::take(&target, name);
    record_server(&target, db.worker_id().as_str());

    // The fixtures are there, and only the fixtures: nothing any other test wrote.
    let users: Vec<String> = db
        .query("SELECT email FROM users ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        users,
        ["seed@example.com"],
        "{name}: sees another test's users"
    );
    let notes: i64 = db
        .query_one("SELECT count(*) FROM notes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(notes, 0, "{name}: sees another test's notes");

    // Rows that collide if any of them survives this test: a fixed unique email.
    db.execute("INSERT INTO users (email) VALUES ('same@example.com')", &[])
        .await
        .unwrap_or_else(|e| panic!("{name}: a previous test's row leaked: {e}"));
    for i in 0..5 {
        db.execute(
            "INSERT INTO notes (owner, body) VALUES ($1, $2)",
            &[&name, &format!("note {i}")],
        )
        .await
        .unwrap();
    }
    // Overlap with the tests running beside this one.
    tokio::time::sleep(Duration::from_millis(spin)).await;
    let foreign: i64 = db
        .query_one("SELECT count(*) FROM notes WHERE owner <> $1", &[&name])
        .await
        .unwrap()
        .get(0);
    assert_eq!(foreign, 0, "{name}: sees another test's notes");

    // Fixtures were applied once per template (database, container) or per worker
    // schema (schema), never twice: count the marker roles the fixture makes, of the
    // databases and schemas that exist (applying the fixtures twice to one schema
    // fails in the fixture itself). A template build killed midway (the soak) leaves
    // the role of its dropped database, as it would leave any role a fixture file
    // committed. A server may hold templates and worker schemas without these
    // fixtures: the migrations suite's, made beside this suite under nextest, or left
    // by earlier runs on a server of the user's. One statement, one snapshot.
    let isolation = pgfixture::Fixture::from_env().unwrap().config().isolation;
    match isolation {
        Isolation::Database | Isolation::Container => {
            // The schemas of a clone have its template's oids, so a clone matches no
            // role: a role of a database that is not a template (`pgfx_t_...`, or
            // `pgfx_t_..._new` while it is built) means the fixtures were applied to a
            // worker. A template with more than one role got them in two schemas.
            let row = db
                .query_one(
                    "SELECT (SELECT count(*) FROM pg_roles r, pg_database d, pg_namespace n \
                              WHERE r.rolname = 'pgfx_applied_' || md5(d.oid::text || '/' || n.oid::text) \
                                AND d.datname NOT LIKE 'pgfx\\_t\\_%'), \
                            (SELECT count(*) FROM pg_database d \
                              WHERE d.datname LIKE 'pgfx\\_t\\_%' AND (SELECT count(*) \
                                FROM pg_roles r, pg_namespace n WHERE r.rolname = \
                                'pgfx_applied_' || md5(d.oid::text || '/' || n.oid::text)) > 1)",
                    &[],
                )
                .await
                .unwrap();
            let (strays, twice): (i64, i64) = (row.get(0), row.get(1));
            assert_eq!(
                (strays, twice),
                (0, 0),
                "{name}: fixtures applied to {strays} databases that are not templates, \
                 and more than once to {twice} templates"
            )
        }
        Isolation::Schema => {
            // Every worker schema with the fixtures' tables got them applied, not
            // copied. Schemas rebuilt by a reset (the commits suite) leave the roles of
            // their dropped predecessors: count the roles of the schemas that exist. A
            // reset may run beside this test. A schema still being built (`..._new`,
            // committed before a migrator runs in it) is not a worker yet.
            let row = db
                .query_one(
                    "WITH workers AS (SELECT n.oid FROM pg_namespace n \
                       WHERE n.nspname LIKE 'pgfx_w_%' AND n.nspname NOT LIKE '%\\_new' \
                         AND EXISTS (SELECT 1 FROM pg_class c \
                           WHERE c.relnamespace = n.oid AND c.relname = 'users')) \
                     SELECT (SELECT count(*) FROM pg_roles r JOIN workers n \
                       ON r.rolname = 'pgfx_applied_' || md5((SELECT oid::text FROM pg_database \
                         WHERE datname = current_database()) || '/' || n.oid::text)), \
                     (SELECT count(*) FROM workers)",
                    &[],
                )
                .await
                .unwrap();
            let (applied, schemas): (i64, i64) = (row.get(0), row.get(1));
            assert_eq!(
                applied, schemas,
                "{name}: fixtures applied {applied} times for {schemas} worker schemas with the fixtures' tables"
            );
        }
    }
    assert!(target.pid > 0);
    drop(_claim);
    db.release().await.expect("release");
}

macro_rules! isolated_tests {
    ($($name:ident: $spin:expr),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                isolated_test(stringify!($name), $spin).await;
            }
        )*
    };
}

isolated_tests! {
    isolated_01: 40, isolated_02: 10, isolated_03: 30, isolated_04: 5,
    isolated_05: 40, isolated_06: 10, isolated_07: 30, isolated_08: 5,
    isolated_09: 40, isolated_10: 10, isolated_11: 30, isolated_12: 5,
    isolated_13: 40, isolated_14: 10, isolated_15: 30, isolated_16: 5,
    isolated_17: 40, isolated_18: 10, isolated_19: 30, isolated_20: 5,
}

/// The same under a multi-threaded test runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_multi_thread_runtime() {
    isolated_test("isolated_multi_thread_runtime", 20).await;
}
