//! The url backend (`PGFIXTURE_BACKEND=url`): runs share one existing server without
//! colliding, the objects of runs that died are swept, nothing without pgfixture's mark
//! is used or dropped, and bad URLs are clear errors. The existing server is one that
//! pgfixture starts on the backend the environment selects; the runs are child
//! processes pointed at it.

use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{child_command, own_fixture, unique_run};
use pgfixture::Isolation;
use pgfixture::tokio_postgres::{Client, NoTls};

/// Run by the tests below in a child process, on the url backend: `note` inserts a
/// note of `PGFIXTURE_TEST_OWNER`, waits a little so that runs overlap, and reports the
/// notes of others it sees; `hold` takes a handle and waits to be killed; `eight` does
/// the first on eight threads at once, each its own in-process worker.
#[test]
#[ignore = "helper, run as a child process by the url tests"]
fn child() {
    if std::env::var("PGFIXTURE_TEST_CHILD").as_deref() == Ok("eight") {
        let threads: Vec<_> = (0..8)
            .map(|_| std::thread::spawn(|| note(Duration::from_millis(500))))
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        return;
    }
    note(Duration::from_millis(300));
}

/// [`child`]'s note, on a runtime of its own, waiting `overlap` before it looks.
fn note(overlap: Duration) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        if std::env::var("PGFIXTURE_TEST_CHILD").as_deref() == Ok("pool") {
            // A committed row through the worker pool: the worker is put back before
            // the handle below is given.
            let pool = pgfixture::worker_pool().await.unwrap();
            pool.get()
                .await
                .unwrap()
                .execute("INSERT INTO notes (owner, body) VALUES ('pool', 'x')", &[])
                .await
                .unwrap();
            drop(pool);
        }
        let db = match pgfixture::worker_db().await {
            Ok(db) => db,
            Err(e) => {
                eprintln!("CHILD-ERR {e}");
                std::process::exit(3);
            }
        };
        let owner = std::env::var("PGFIXTURE_TEST_OWNER").unwrap_or_default();
        db.execute(
            "INSERT INTO notes (owner, body) VALUES ($1, 'x')",
            &[&owner],
        )
        .await
        .unwrap();
        if std::env::var("PGFIXTURE_TEST_CHILD").as_deref() == Ok("hold") {
            println!("CHILD-HOLDING");
            tokio::time::sleep(Duration::from_secs(120)).await;
        }
        tokio::time::sleep(overlap).await;
        let foreign: i64 = db
            .query_one("SELECT count(*) FROM notes WHERE owner <> $1", &[&owner])
            .await
            .unwrap()
            .get(0);
        let attached = pgfixture::Fixture::from_env()
            .unwrap()
            .stats()
            .workers_attached;
        println!("CHILD-OK foreign={foreign} attached={attached}");
    });
}

/// A server for the runs under test, its URL, and a connection to inspect it with
/// (which also keeps the server up while the children come and go).
struct Existing {
    url: String,
    admin: Client,
    _pool: pgfixture::WorkerPool,
}

impl Existing {
    /// The URL of the database `database` of the server, as the superuser.
    fn url_of(&self, database: &str) -> String {
        format!("{}/{database}", self.url.rsplit_once('/').unwrap().0)
    }

    /// A connection to the database `database` of the server, as the superuser.
    async fn connect(&self, database: &str) -> Client {
        let (client, connection) =
            pgfixture::tokio_postgres::connect(&self.url_of(database), NoTls)
                .await
                .unwrap();
        tokio::spawn(connection);
        client
    }
}

async fn existing_server(tag: &str) -> Existing {
    let host = own_fixture(tag, Isolation::Database);
    let pool = host.worker_pool().await.unwrap();
    let pg = pool.pg_config();
    let host_name = match &pg.get_hosts()[0] {
        pgfixture::tokio_postgres::config::Host::Tcp(h) => h.clone(),
        other => panic!("expected a TCP host, got {other:?}"),
    };
    let password = String::from_utf8(pg.get_password().unwrap().to_vec()).unwrap();
    let url = format!(
        "postgres://{}:{password}@{host_name}:{}/postgres",
        pg.get_user().unwrap(),
        pg.get_ports()[0]
    );
    let (admin, connection) = pgfixture::tokio_postgres::connect(&url, NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    Existing {
        url,
        admin,
        _pool: pool,
    }
}

/// A new role of `server` that may log in, with `CREATEDB` and `CREATEROLE` (this
/// crate's fixtures create a role), and `grants` run after it as the superuser
/// (`{role}` in them, and in `database`, names it). Returns its name and the URL of
/// the database `database` as that role.
async fn new_role(
    server: &Existing,
    tag: &str,
    grants: &[&str],
    database: &str,
) -> (String, String) {
    let role = unique_run(tag);
    let create = format!("CREATE ROLE {role} LOGIN PASSWORD 'pw' CREATEDB CREATEROLE");
    // One at a time: `CREATE DATABASE` may not run in a transaction block.
    for sql in std::iter::once(create.as_str()).chain(grants.iter().copied()) {
        server
            .admin
            .batch_execute(&sql.replace("{role}", &role))
            .await
            .unwrap();
    }
    let (_, at) = server.url.split_once('@').unwrap();
    let (host, _) = at.rsplit_once('/').unwrap();
    let url = format!(
        "postgres://{role}:pw@{host}/{}",
        database.replace("{role}", &role)
    );
    (role, url)
}

/// `PGFIXTURE_ALLOW_REMOTE` for a URL: a container pgfixture started is reached at its
/// own address on the Docker bridge, which is not loopback, and is allowed. A URL
/// naming a host (not an address) stays refused, as the bad-URL test wants.
fn allow_remote(url: &str) -> (&'static str, &'static str) {
    let host = url
        .rsplit_once('@')
        .and_then(|(_, rest)| rest.rsplit_once(':'))
        .map(|(host, _)| host);
    let bridge = host
        .and_then(|h| h.parse::<std::net::IpAddr>().ok())
        .is_some_and(|ip| !ip.is_loopback());
    ("PGFIXTURE_ALLOW_REMOTE", if bridge { "1" } else { "0" })
}

/// The command that runs [`child`] on the url backend against `url`, as worker `worker`
/// (in-process workers when empty) of the run `run`, in `isolation`, with the
/// variables `more`.
fn url_command(
    url: &str,
    run: &str,
    worker: &str,
    isolation: &str,
    more: &[(&str, &str)],
) -> std::process::Command {
    let mut env = vec![
        ("PGFIXTURE_BACKEND", "url"),
        ("PGFIXTURE_URL", url),
        allow_remote(url),
        ("PGFIXTURE_RUN_ID", run),
        ("PGFIXTURE_ISOLATION", isolation),
    ];
    if !worker.is_empty() {
        env.push(("PGFIXTURE_WORKER", worker));
    }
    env.extend_from_slice(more);
    child_command(&env)
}

fn url_child(url: &str, run: &str, worker: &str, isolation: &str, owner: &str) -> Child {
    url_command(
        url,
        run,
        worker,
        isolation,
        &[("PGFIXTURE_GRACE", "1"), ("PGFIXTURE_TEST_OWNER", owner)],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

fn ok(output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && stdout.contains("CHILD-OK"),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The worker databases (or schemas) on the server whose mark names `run`.
async fn marked(admin: &Client, isolation: &str, run: &str) -> Vec<String> {
    let sql = if isolation == "schema" {
        "SELECT nspname::text FROM pg_namespace WHERE obj_description(oid, 'pg_namespace') = $1 ORDER BY 1"
    } else {
        "SELECT datname::text FROM pg_database WHERE shobj_description(oid, 'pg_database') = $1 ORDER BY 1"
    };
    admin
        .query(sql, &[&format!("pgfixture worker run={run}")])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn two_concurrent_runs_share_one_server_without_collisions() {
    let server = existing_server("urlshare").await;
    for isolation in ["database", "schema"] {
        let runs = [unique_run("runa"), unique_run("runb")];
        let children: Vec<Child> = runs
            .iter()
            .flat_map(|run| {
                let url = server.url.clone();
                (0..3).map(move |w| {
                    let worker = w.to_string();
                    url_child(&url, run, &worker, isolation, &format!("{run}-{w}"))
                })
            })
            .collect();
        for child in children {
            let stdout = ok(child.wait_with_output().unwrap());
            assert!(
                stdout.contains("foreign=0"),
                "{isolation}: a test saw another's notes: {stdout}"
            );
        }
        for run in &runs {
            let names = marked(&server.admin, isolation, run).await;
            assert_eq!(names.len(), 3, "{isolation}: run {run} owns {names:?}");
        }
        let (a, b) = (
            marked(&server.admin, isolation, &runs[0]).await,
            marked(&server.admin, isolation, &runs[1]).await,
        );
        assert!(a.iter().all(|n| !b.contains(n)), "{a:?} and {b:?} collide");
    }
}

/// A user with `CREATEDB` (and `CREATEROLE`, for this crate's fixtures) but not a
/// superuser, as the README says is enough: PostgreSQL lets only a superuser set a
/// parameter it does not know, so pgfixture's settings are left out on such a server
/// (its marks stay comments), and `PGFIXTURE_RESET_SEQUENCES`, which needs them, is
/// refused by name. Such a user's processes take a ready worker schema on its first
/// connection, as a superuser's do, but not a worker database.
#[tokio::test]
async fn a_user_who_is_not_a_superuser_runs_tests_in_both_modes() {
    let server = existing_server("urlplain").await;
    let (role, url) = new_role(
        &server,
        "plain",
        &["CREATE DATABASE {role} OWNER {role}"],
        "{role}",
    )
    .await;
    for isolation in ["database", "schema"] {
        let run = unique_run("plain");
        for (worker, mode) in [("0", ""), ("0", "pool"), ("1", "pool")] {
            let mut command = url_command(
                &url,
                &run,
                worker,
                isolation,
                &[
                    ("PGFIXTURE_TEST_OWNER", "plain"),
                    ("PGFIXTURE_TEST_CHILD", mode),
                ],
            );
            let stdout = ok(command.output().unwrap());
            // The pool's committed row was taken out before the handle was given.
            assert!(stdout.contains("foreign=0"), "{isolation}: {stdout}");
            // Its worker databases lack the sequences' setting, which one found ready
            // on its first connection would need for `db.reset_sequences()` to be
            // refused: they go the checked way. Worker schemas never have it there,
            // for any user: the second process of worker 0 takes its schema as it is.
            let attached = u64::from(isolation == "schema" && (worker, mode) == ("0", "pool"));
            assert_eq!(
                common::reported(&stdout, "attached"),
                attached,
                "{isolation}: {stdout}"
            );
        }
        // Schema mode puts the worker schemas in the URL's database.
        let inspect = server.connect(&role).await;
        assert_eq!(
            marked(&inspect, isolation, &run).await.len(),
            2,
            "{isolation}"
        );
    }
    let mut command = url_command(
        &url,
        &unique_run("plain"),
        "0",
        "database",
        &[("PGFIXTURE_RESET_SEQUENCES", "1")],
    );
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success()
            && stderr.contains("CHILD-ERR")
            && stderr.contains("PGFIXTURE_RESET_SEQUENCES")
            && stderr.contains("superuser"),
        "{stderr}"
    );
}

/// Two roles of one server with the same fixtures, the superuser first, then a user
/// who is not one, both through the database the URL names: each gets a template of
/// its own (a clone of the other's would be refused, and its tables would not be the
/// user's), and the second finds the first's table of recorded rows unreadable.
#[tokio::test]
async fn two_roles_with_the_same_fixtures_share_one_server() {
    let server = existing_server("urlroles").await;
    let (_, second) = new_role(
        &server,
        "second",
        &["GRANT CREATE ON DATABASE postgres TO {role}"],
        "postgres",
    )
    .await;
    for isolation in ["database", "schema"] {
        let run = unique_run("roles");
        for (url, owner) in [(&server.url, "first"), (&second, "second")] {
            for _ in 0..2 {
                let mut command = url_command(
                    url,
                    &format!("{run}{owner}"),
                    "0",
                    isolation,
                    &[
                        ("PGFIXTURE_TEST_OWNER", owner),
                        ("PGFIXTURE_TEST_CHILD", "pool"),
                    ],
                );
                let output = command.output().unwrap();
                let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
                let stdout = ok(output);
                assert!(
                    stdout.contains("foreign=0") && !stderr.contains("pgfixture:"),
                    "{isolation} {owner}: {stdout}\n{stderr}"
                );
            }
        }
    }
}

/// A user with `CREATEDB` alone, through a database whose `public` schema it may not
/// create tables in (`postgres` since PostgreSQL 15), is told what to grant, and runs
/// once it has been granted.
#[tokio::test]
async fn a_user_who_may_not_create_the_table_of_runs_is_told_what_to_grant() {
    let server = existing_server("urlgrant").await;
    let (role, url) = new_role(
        &server,
        "grant",
        &["REVOKE CREATE ON SCHEMA public FROM PUBLIC"],
        "postgres",
    )
    .await;
    let run = unique_run("grant");
    let command = || {
        url_command(
            &url,
            &run,
            "0",
            "database",
            &[("PGFIXTURE_TEST_OWNER", "grant")],
        )
        .output()
        .unwrap()
    };
    let output = command();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success()
            && stderr.contains("pgfixture_runs")
            && stderr.contains(&format!("GRANT CREATE ON SCHEMA public TO \"{role}\"")),
        "{stderr}"
    );
    server
        .admin
        .batch_execute(&format!("GRANT CREATE ON SCHEMA public TO {role}"))
        .await
        .unwrap();
    assert!(ok(command()).contains("foreign=0"));
}

/// The templates on the server, by the last use their marks record.
async fn templates(admin: &Client) -> std::collections::BTreeMap<String, u64> {
    admin
        .query(
            "SELECT datname::text, substring(shobj_description(oid, 'pg_database') \
                 FROM 'used=([0-9]+)')::bigint FROM pg_database \
             WHERE shobj_description(oid, 'pg_database') LIKE 'pgfixture template%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get::<_, Option<i64>>(1).unwrap_or(0) as u64))
        .collect()
}

/// Sets the last use the mark of the template `name` records to `used`.
async fn set_used(admin: &Client, name: &str, used: u64) {
    let comment: String = admin
        .query_one(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    let (head, rest) = comment.split_once(" used=").unwrap();
    let (_, tail) = rest.split_once(' ').unwrap();
    admin
        .batch_execute(&format!(
            "COMMENT ON DATABASE \"{name}\" IS '{head} used={used} {tail}'"
        ))
        .await
        .unwrap();
}

/// Templates on a server of the user's record their last use (rewritten once a day at
/// most), and the sweep of a later run drops those unused for a week: the server does
/// not keep a template for every change to the fixtures that ever ran on it.
#[tokio::test]
async fn templates_unused_for_a_week_are_swept() {
    let server = existing_server("urlidle").await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let other = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique_run("idle"));
    std::fs::create_dir_all(&other).unwrap();
    for file in ["001_schema.sql", "002_applied_marker.sql"] {
        std::fs::copy(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures")
                .join(file),
            other.join(file),
        )
        .unwrap();
    }
    std::fs::write(
        other.join("003_other.sql"),
        "COMMENT ON TABLE notes IS 'other';\n",
    )
    .unwrap();
    let other = other.display().to_string();
    let run_with = |fixtures: Option<&str>| {
        let mut more = vec![("PGFIXTURE_TEST_OWNER", "idle")];
        more.extend(fixtures.map(|f| ("PGFIXTURE_FIXTURES", f)));
        let mut command = url_command(&server.url, &unique_run("idle"), "0", "database", &more);
        ok(command.output().unwrap());
    };

    run_with(None);
    let first = templates(&server.admin).await;
    assert_eq!(first.len(), 1, "{first:?}");
    let (default, used) = first.into_iter().next().unwrap();
    assert!(
        used + 3600 > now,
        "a template built now records its use: {used}"
    );

    // Unused for eight days: the next run's sweep drops it.
    set_used(&server.admin, &default, now - 8 * 24 * 3600).await;
    run_with(Some(&other));
    let second = templates(&server.admin).await;
    assert!(!second.contains_key(&default), "{second:?}");
    assert_eq!(second.len(), 1, "{second:?}");
    let (other_template, _) = second.into_iter().next().unwrap();

    // Used two days ago: the next use records it again, and no sweep drops it.
    set_used(&server.admin, &other_template, now - 2 * 24 * 3600).await;
    run_with(Some(&other));
    let third = templates(&server.admin).await;
    assert!(third[&other_template] + 3600 > now, "{third:?}");
    run_with(None);
    let fourth = templates(&server.admin).await;
    assert!(
        fourth.contains_key(&other_template) && fourth.contains_key(&default),
        "the template of the default fixtures is built again, the other one stays: {fourth:?}"
    );
}

/// Makes every note of when a process on this machine last recorded its run alive
/// on a server of the user's a minute older (`$TMPDIR/pgfixture-<uid>/url-runs`):
/// the next process of each run records it again.
fn age_the_notes_of_runs() {
    let notes = common::user_dir().join("url-runs");
    for note in std::fs::read_dir(&notes).unwrap().flatten() {
        let modified = note.metadata().unwrap().modified().unwrap();
        if let Ok(file) = std::fs::File::options().write(true).open(note.path()) {
            let _ = file.set_modified(modified - Duration::from_secs(60));
        }
    }
}

/// Under nextest, a process whose worker another process of its run left ready takes
/// it on the worker's own connection, as on pgfixture's own servers, checked by the
/// worker's comment (the mark on a server of the user's), in both modes; the run is
/// still recorded alive for other runs' sweeps. A worker whose comment says a worker
/// pool left it is rebuilt, with what that pool committed.
#[tokio::test]
async fn a_nextest_process_takes_a_ready_worker_on_its_first_connection() {
    let server = existing_server("urlattach").await;
    for isolation in ["database", "schema"] {
        let run = unique_run("attach");
        let process = |owner: &str| {
            let mut command = url_command(
                &server.url,
                &run,
                "0",
                isolation,
                &[
                    ("NEXTEST_EXECUTION_MODE", "process-per-test"),
                    ("PGFIXTURE_TEST_OWNER", owner),
                    // Its processes record the run once every 10 s per machine.
                    ("PGFIXTURE_GRACE", "40"),
                ],
            );
            let stdout = ok(command.output().unwrap());
            assert!(
                stdout.contains("foreign=0"),
                "{isolation} {owner}: {stdout}"
            );
            common::reported(&stdout, "attached")
        };
        assert_eq!(process("first"), 0, "{isolation}: provisioned");
        let seen = || async {
            server
                .admin
                .query_one(
                    "SELECT count(*) FROM pgfixture_runs WHERE run = $1 \
                     AND seen > now() - interval '1 minute'",
                    &[&run],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        };
        assert_eq!(seen().await, 1);
        server
            .admin
            .execute("DELETE FROM pgfixture_runs WHERE run = $1", &[&run])
            .await
            .unwrap();
        // Past the quarter of the grace within which the run's processes on a machine
        // record it once, as far as they know: the notes of when they did are older.
        age_the_notes_of_runs();
        assert_eq!(
            process("second"),
            1,
            "{isolation}: taken on its first connection"
        );
        assert_eq!(
            seen().await,
            1,
            "{isolation}: the run was not recorded alive"
        );
        // Within that quarter, a process that finds its worker ready opens no
        // maintenance connection to record the run again.
        server
            .admin
            .execute("DELETE FROM pgfixture_runs WHERE run = $1", &[&run])
            .await
            .unwrap();
        assert_eq!(process("soon"), 1, "{isolation}: soon after");
        assert_eq!(
            seen().await,
            0,
            "{isolation}: recorded again within a quarter of the grace"
        );

        // As a process killed with its worker pool out leaves it.
        let worker = marked(&server.admin, isolation, &run).await.remove(0);
        let dirty = format!("pgfixture worker run={run} dirty");
        let sql = if isolation == "schema" {
            format!(
                "INSERT INTO \"{worker}\".notes (owner, body) VALUES ('pool', 'x'); \
                 COMMENT ON SCHEMA \"{worker}\" IS '{dirty}'"
            )
        } else {
            format!(
                "INSERT INTO notes (owner, body) VALUES ('pool', 'x'); \
                 COMMENT ON DATABASE \"{worker}\" IS '{dirty}'"
            )
        };
        let database = if isolation == "schema" {
            "postgres"
        } else {
            &worker
        };
        server
            .connect(database)
            .await
            .batch_execute(&sql)
            .await
            .unwrap();
        assert_eq!(
            process("third"),
            0,
            "{isolation}: a worker marked dirty was taken as it is"
        );
        // `ok` checked that the rebuilt worker holds no note of the pool's (foreign=0).
        assert_eq!(process("fourth"), 1, "{isolation}: and then taken again");
    }
}

/// Eight in-process workers provisioned at once, in both modes, with migrations in
/// sqlx's layout (an extension among them). In schema mode the schemas go into the
/// database the URL names, the maintenance database: a provisioning holds a
/// maintenance connection while it takes one to the database of the schemas. Both
/// came from one pool of four, and provisionings at once could wait for each other
/// until the acquire timeout (seen in `tests/migrations.rs` run against a `PGFIXTURE_URL`
/// server; this test does not make that interleaving certain).
#[tokio::test]
async fn eight_workers_provisioned_at_once_in_one_process() {
    let server = existing_server("urleight").await;
    let migrations = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique_run("eight"));
    std::fs::create_dir_all(&migrations).unwrap();
    std::fs::write(
        migrations.join("1_first.sql"),
        "CREATE EXTENSION IF NOT EXISTS citext;\nCREATE TABLE first (id citext);\n",
    )
    .unwrap();
    let migrations = migrations.display().to_string();
    for isolation in ["database", "schema"] {
        let run = unique_run("eight");
        let mut command = url_command(
            &server.url,
            &run,
            "",
            isolation,
            &[
                ("PGFIXTURE_WORKERS", "8"),
                ("PGFIXTURE_MIGRATIONS", &migrations),
                ("PGFIXTURE_ACQUIRE_TIMEOUT", "10"),
                ("PGFIXTURE_TEST_CHILD", "eight"),
                ("PGFIXTURE_TEST_OWNER", "eight"),
            ],
        );
        let stdout = ok(command.output().unwrap());
        assert_eq!(
            stdout.matches("foreign=0").count(),
            8,
            "{isolation}: {stdout}"
        );
        assert_eq!(
            marked(&server.admin, isolation, &run).await.len(),
            8,
            "{isolation}"
        );
    }
}

#[tokio::test]
async fn objects_of_dead_runs_are_swept_and_nothing_else() {
    let server = existing_server("urlsweep").await;
    let admin = &server.admin;
    for sql in [
        "CREATE DATABASE pgfx_w_notours_0",
        "CREATE DATABASE mydata",
        "COMMENT ON DATABASE mydata IS 'the team''s own'",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    for isolation in ["database", "schema"] {
        let (dead, live, next) = (unique_run("dead"), unique_run("live"), unique_run("next"));
        ok(url_child(&server.url, &dead, "0", isolation, "dead")
            .wait_with_output()
            .unwrap());
        let mut holder = url_command(
            &server.url,
            &live,
            "0",
            isolation,
            &[("PGFIXTURE_TEST_CHILD", "hold")],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        {
            use std::io::BufRead;
            let holding = std::io::BufReader::new(holder.stdout.take().unwrap())
                .lines()
                .any(|l| l.unwrap().contains("CHILD-HOLDING"));
            assert!(holding, "the live run's child did not start");
        }
        assert_eq!(marked(admin, isolation, &dead).await.len(), 1);
        // Past the dead run's grace (1 s, as its children had), a new run sweeps.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        ok(url_child(&server.url, &next, "0", isolation, "next")
            .wait_with_output()
            .unwrap());
        assert!(
            marked(admin, isolation, &dead).await.is_empty(),
            "{isolation}: the dead run's worker was not swept"
        );
        assert_eq!(
            marked(admin, isolation, &live).await.len(),
            1,
            "{isolation}: the live run's worker was swept"
        );
        holder.kill().unwrap();
        holder.wait().unwrap();
    }
    let kept: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname IN ('pgfx_w_notours_0', 'mydata')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        kept, 2,
        "the sweep dropped databases pgfixture did not create"
    );
}

/// Runs whose URLs name different databases of one server record themselves in each
/// database's own table of runs. A sweep drops only the worker databases of runs
/// recorded where it records: a run of the other database, between two of its
/// processes, is not taken for dead, and its own database's next run sweeps it once
/// it is.
#[tokio::test]
async fn a_sweep_leaves_the_worker_databases_of_another_databases_runs() {
    let server = existing_server("urlotherdb").await;
    let admin = &server.admin;
    admin
        .batch_execute("CREATE DATABASE otherdb")
        .await
        .unwrap();
    let other_url = server.url_of("otherdb");
    let (theirs, ours) = (unique_run("thrs"), unique_run("ours"));
    ok(url_child(&other_url, &theirs, "0", "database", "theirs")
        .wait_with_output()
        .unwrap());
    assert_eq!(marked(admin, "database", &theirs).await.len(), 1);
    // A run of `postgres` provisions a worker, which sweeps, while `theirs` has no
    // connection open and no record in `postgres`.
    ok(url_child(&server.url, &ours, "0", "database", "ours")
        .wait_with_output()
        .unwrap());
    assert_eq!(
        marked(admin, "database", &theirs).await.len(),
        1,
        "a run of another database was swept"
    );
    // Past its grace (1 s, as its child had), the next run of its own database sweeps.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    ok(
        url_child(&other_url, &unique_run("next"), "0", "database", "next")
            .wait_with_output()
            .unwrap(),
    );
    assert!(
        marked(admin, "database", &theirs).await.is_empty(),
        "the dead run was not swept by its own database's next run"
    );
    // Its record went with its last object.
    let recorded: i64 = server
        .connect("otherdb")
        .await
        .query_one(
            "SELECT count(*) FROM pgfixture_runs WHERE run = $1",
            &[&theirs],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 0);
}

#[tokio::test]
async fn a_worker_without_the_mark_is_neither_used_nor_dropped() {
    let server = existing_server("urlmark").await;
    let run = unique_run("mark");
    ok(url_child(&server.url, &run, "0", "database", "first")
        .wait_with_output()
        .unwrap());
    let names = marked(&server.admin, "database", &run).await;
    assert_eq!(names.len(), 1);
    // Someone else's database now bears the worker's name.
    server
        .admin
        .batch_execute(&format!("COMMENT ON DATABASE \"{}\" IS NULL", names[0]))
        .await
        .unwrap();
    let out = url_child(&server.url, &run, "0", "database", "second")
        .wait_with_output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("refusing to use or drop") && stderr.contains(&names[0]),
        "{stderr}"
    );
    let still: i64 = server
        .admin
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&names[0]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(still, 1);
}

#[tokio::test]
async fn bad_urls_are_clear_errors_without_the_password() {
    let server = existing_server("urlbad").await;
    // postgres://postgres:<password>@... with the wrong password.
    let at = server.url.find('@').unwrap();
    let colon = server.url[..at].rfind(':').unwrap();
    let wrong_password = format!(
        "{}hunter2secret{}",
        &server.url[..=colon],
        &server.url[at..]
    );
    let cases = [
        ("postgres://u:hunter2secret@127.0.0.1:1/db", "PGFIXTURE_URL"),
        (wrong_password.as_str(), "PGFIXTURE_URL"),
        (
            "postgres://u:hunter2secret@127.0.0.1:notaport/db",
            "PGFIXTURE_URL",
        ),
        (
            "postgres://u:hunter2secret@db.example.com/db",
            "PGFIXTURE_ALLOW_REMOTE=1",
        ),
    ];
    for (url, names) in cases {
        let started = Instant::now();
        let out = url_child(url, &unique_run("bad"), "0", "database", "x")
            .wait_with_output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{url}: {stderr}");
        assert!(
            stderr.contains(names),
            "{url}: the error should name {names}: {stderr}"
        );
        assert!(
            !stderr.contains("hunter2secret"),
            "{url}: the password leaked: {stderr}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{url}: took {:?}",
            started.elapsed()
        );
    }
}
