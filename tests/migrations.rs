//! Migrations: applied once into the template (each worker schema in schema mode)
//! before the fixtures; sqlx's layout through sqlx's own migrator, so that
//! `_sqlx_migrations` is what sqlx writes and the application's own migrator finds
//! nothing to do; plain files in name order; bad folders and failing migrations named.
//! Setup code (`FixtureBuilder::setup`): once per template, after the migrations and
//! before the fixtures, keyed by its version. Runs on the backend and isolation mode
//! the environment selects.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use pgfixture::sqlx::migrate::Migrator;
use pgfixture::sqlx::{Connection, PgConnection, TestDb};
use pgfixture::{Error, Fixture};

const SQLX_MIGRATIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/migrations/sqlx");

fn with_migrations(dir: impl Into<PathBuf>) -> Fixture {
    Fixture::builder()
        .workers(1)
        .migrations(dir)
        .build()
        .expect("fixture")
}

/// A folder of its own under the target directory, with `files` in it.
fn folder(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("migrations")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (file, sql) in files {
        std::fs::write(dir.join(file), sql).unwrap();
    }
    dir
}

/// `_sqlx_migrations` as sqlx compares it: version, description, success, checksum.
async fn recorded(conn: &mut PgConnection) -> Vec<(i64, String, bool, Vec<u8>)> {
    sqlx::query_as(
        "SELECT version, description, success, checksum FROM _sqlx_migrations ORDER BY version",
    )
    .fetch_all(conn)
    .await
    .unwrap()
}

#[tokio::test]
async fn sqlx_migrations_run_in_version_order_and_down_files_never() {
    let fixture = with_migrations(SQLX_MIGRATIONS);
    let mut db = TestDb::acquire(&fixture).await.unwrap();
    // Version 10 altered the table of version 2, and seeded a row.
    let seeded: String = sqlx::query_scalar("SELECT name FROM accounts")
        .fetch_one(&mut *db)
        .await
        .unwrap();
    assert_eq!(seeded, "seeded by a migration");
    sqlx::query("INSERT INTO orders (account_id, note) SELECT id, 'n' FROM accounts")
        .execute(&mut *db)
        .await
        .unwrap();
    let orders: i64 = sqlx::query_scalar("SELECT order_count(id) FROM accounts")
        .fetch_one(&mut *db)
        .await
        .unwrap();
    assert_eq!(orders, 1);
    let versions: Vec<i64> = recorded(&mut db).await.into_iter().map(|r| r.0).collect();
    assert_eq!(versions, [1, 2, 10]);
    // The fixtures came after the migrations.
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&mut *db)
        .await
        .unwrap();
    assert_eq!(users, 1);
}

#[tokio::test]
async fn sqlx_migrations_table_is_what_sqlx_writes_and_the_apps_migrator_finds_nothing_to_do() {
    let fixture = with_migrations(SQLX_MIGRATIONS);
    let mut db = TestDb::acquire(&fixture).await.unwrap();
    let ours = recorded(&mut db).await;

    // sqlx's own migrator on a fresh database of the same server.
    let mut admin = PgConnection::connect_with(&db.connect_options())
        .await
        .unwrap();
    let fresh = format!("pgfx_sqlxcheck_{}", std::process::id());
    for sql in [
        format!("DROP DATABASE IF EXISTS {fresh}"),
        format!("CREATE DATABASE {fresh}"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    // In schema mode the worker's settings name its schema: the fresh database's own.
    let options = db
        .connect_options()
        .database(&fresh)
        .options([("search_path", "public")]);
    let mut conn = PgConnection::connect_with(&options).await.unwrap();
    let migrator = Migrator::new(Path::new(SQLX_MIGRATIONS)).await.unwrap();
    migrator.run(&mut conn).await.unwrap();
    let theirs = recorded(&mut conn).await;
    conn.close().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {fresh} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    assert_eq!(
        ours, theirs,
        "_sqlx_migrations differs from what sqlx writes"
    );

    // The application's start-up migration, in the test: nothing to apply, no
    // checksum mismatch.
    migrator.run(&mut *db).await.unwrap();
    assert_eq!(recorded(&mut db).await, ours);
}

#[tokio::test]
async fn a_changed_migration_builds_another_template() {
    let a = folder(
        "changed-a",
        &[("1_t.sql", "CREATE TABLE changed_a (x int);")],
    );
    let b = folder(
        "changed-b",
        &[("1_t.sql", "CREATE TABLE changed_b (x int);")],
    );
    for (dir, table, other) in [(a, "changed_a", "changed_b"), (b, "changed_b", "changed_a")] {
        let fixture = with_migrations(dir);
        let mut db = TestDb::acquire(&fixture).await.unwrap();
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables WHERE table_name LIKE 'changed_%' AND table_schema = current_schema()",
        )
        .fetch_all(&mut *db)
        .await
        .unwrap();
        assert_eq!(
            tables,
            [table],
            "{other} came from another migrations folder"
        );
    }
}

#[tokio::test]
async fn plain_migration_files_apply_in_name_order_before_the_fixtures() {
    let dir = folder(
        "plain",
        &[
            ("b_second.sql", "INSERT INTO plain_steps VALUES ('b');"),
            ("a_first.sql", "CREATE TABLE plain_steps (step text);"),
        ],
    );
    let fixture = with_migrations(dir);
    let mut db = TestDb::acquire(&fixture).await.unwrap();
    let steps: Vec<String> = sqlx::query_scalar("SELECT step FROM plain_steps")
        .fetch_all(&mut *db)
        .await
        .unwrap();
    assert_eq!(steps, ["b"]);
}

/// The names of half-built templates or schemas left on the worker's server: those
/// still there after five seconds (other tests of the file may be building theirs).
async fn leftovers(db: &mut TestDb) -> Vec<String> {
    let mut left = Vec::new();
    for _ in 0..50 {
        left = sqlx::query_scalar(
            "SELECT datname::text FROM pg_database WHERE datname LIKE 'pgfx%\\_new' \
             UNION ALL SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'pgfx%\\_new'",
        )
        .fetch_all(&mut **db)
        .await
        .unwrap();
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    left
}

#[tokio::test]
async fn a_failing_migration_names_its_file_line_and_message_and_leaves_nothing() {
    let dir = folder(
        "failing",
        &[
            ("1_ok.sql", "CREATE TABLE failing_ok (x int);"),
            (
                "2_bad.sql",
                "-- fine so far\nCREATE TABLE failing_two (x int);\nINSERT INTO no_such_table VALUES (1);\n",
            ),
        ],
    );
    let fixture = with_migrations(&dir);
    let error = TestDb::acquire(&fixture).await.unwrap_err();
    let Error::Migration {
        path,
        line,
        message,
        ..
    } = &error
    else {
        panic!("not a migration error: {error}");
    };
    assert_eq!(path, &dir.join("2_bad.sql"), "{error}");
    assert_eq!(*line, Some(3), "{error}");
    assert!(message.contains("no_such_table"), "{error}");
    let shown = error.to_string();
    assert!(
        shown.contains("2_bad.sql") && shown.contains("line 3"),
        "{shown}"
    );

    let good = with_migrations(SQLX_MIGRATIONS);
    let mut db = TestDb::acquire(&good).await.unwrap();
    assert_eq!(leftovers(&mut db).await, Vec::<String>::new());
}

#[test]
fn bad_folders_are_refused_before_anything_is_built() {
    /// A case: its name, its files, and what the error must say.
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Case<'_>; 4] = [
        (
            "mixed",
            &[("1_a.sql", ""), ("schema.sql", "")],
            &["mixes layouts", "schema.sql"],
        ),
        (
            "twice",
            &[("1_a.sql", ""), ("1_b.sql", "")],
            &["1_a.sql and 1_b.sql"],
        ),
        (
            "nan",
            &[("1_a.sql", ""), ("123456789012345678901234_b.sql", "")],
            &["123456789012345678901234_b.sql", "number"],
        ),
        (
            "refinery",
            &[("V1__init.sql", "")],
            &["refinery", "cannot run yet"],
        ),
    ];
    for (name, files, wanted) in cases {
        let dir = folder(name, files);
        let error = Fixture::builder()
            .migrations(&dir)
            .build()
            .expect_err(name)
            .to_string();
        for w in wanted {
            assert!(error.contains(w), "{name}: {error:?} lacks {w:?}");
        }
    }
    let diesel = folder("diesel", &[]);
    std::fs::create_dir_all(diesel.join("2024-01-01-000000_init")).unwrap();
    std::fs::write(diesel.join("2024-01-01-000000_init/up.sql"), "").unwrap();
    let error = Fixture::builder()
        .migrations(&diesel)
        .build()
        .unwrap_err()
        .to_string();
    assert!(error.contains("diesel"), "{error}");
}

/// Migrations that create extensions run in every mode: in schema mode their
/// extensions are created once per database (in the schema every worker's
/// `search_path` holds), however many workers build their schemas at once, while
/// `_sqlx_migrations` keeps the files' checksums, so that the application's own
/// migrator finds nothing to do. A migration that creates a schema is refused in
/// schema mode, by file, line and statement.
#[tokio::test]
async fn migrations_with_extensions_run_in_every_mode_and_keep_their_checksums() {
    let dir = folder(
        "extensions",
        &[
            (
                "1_extensions.sql",
                "-- Both spellings: the shared one must tolerate the other.\n\
                 CREATE EXTENSION IF NOT EXISTS citext;\n\
                 CREATE EXTENSION hstore;\n",
            ),
            (
                "2_people.sql",
                "CREATE TABLE people (email citext PRIMARY KEY, attrs hstore NOT NULL);\n\
                 INSERT INTO people VALUES ('Ada@Example.org', 'lang=>en');\n",
            ),
        ],
    );
    let fixture = Fixture::builder()
        .workers(4)
        .migrations(&dir)
        .build()
        .expect("fixture");
    // Four workers at once: in schema mode, four schemas built concurrently.
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let fixture = fixture.clone();
            let dir = dir.clone();
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(async move {
                        let mut db = TestDb::acquire(&fixture).await.unwrap();
                        let found: i64 = sqlx::query_scalar(
                            "SELECT count(*) FROM people \
                             WHERE email = 'ada@example.org' AND attrs -> 'lang' = 'en'",
                        )
                        .fetch_one(&mut *db)
                        .await
                        .unwrap();
                        assert_eq!(found, 1, "the extensions' types and operators work");
                        let ours = recorded(&mut db).await;
                        let migrator = Migrator::new(dir.as_path()).await.unwrap();
                        let files: Vec<Vec<u8>> =
                            migrator.iter().map(|m| m.checksum.to_vec()).collect();
                        let checksums: Vec<Vec<u8>> = ours.iter().map(|r| r.3.clone()).collect();
                        assert_eq!(checksums, files, "_sqlx_migrations holds other checksums");
                        migrator.run(&mut *db).await.unwrap();
                        assert_eq!(recorded(&mut db).await, ours);
                        // Hold the worker until the four are out.
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    });
            })
        })
        .collect();
    for task in tasks {
        task.join().expect("a worker's test failed");
    }

    if fixture.config().isolation == pgfixture::Isolation::Schema {
        let refused = folder(
            "schema-refused",
            &[(
                "1_init.sql",
                "CREATE TABLE a (id int);\nCREATE SCHEMA reports;\n",
            )],
        );
        let error = Fixture::builder()
            .migrations(&refused)
            .build()
            .expect_err("a migration creating a schema in schema mode")
            .to_string();
        for wanted in [
            "1_init.sql",
            "line 2",
            "CREATE SCHEMA reports",
            "PGFIXTURE_ISOLATION=database",
        ] {
            assert!(error.contains(wanted), "{error:?} lacks {wanted:?}");
        }
    }
}

/// A crate's directory: `sqlx.toml` with `toml` in it, and `files` in its folder
/// `db/migrations`.
fn crate_with_sqlx_toml(name: &str, toml: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = folder(name, &[("sqlx.toml", toml)]);
    let migrations = dir.join("db/migrations");
    std::fs::create_dir_all(&migrations).unwrap();
    for (file, sql) in files {
        std::fs::write(migrations.join(file), sql).unwrap();
    }
    dir
}

/// The environment, as cargo would give it for a test of the crate in `dir`.
struct InCrate(PathBuf);

impl pgfixture::Env for InCrate {
    fn var(&self, name: &str) -> Option<String> {
        match name {
            "CARGO_MANIFEST_DIR" => Some(self.0.display().to_string()),
            "PGFIXTURE_MIGRATIONS" | "PGFIXTURE_FIXTURES" => None,
            _ => pgfixture::OsEnv.var(name),
        }
    }
}

/// Two migrations, one with Windows line endings (`ignored-chars = ["\r"]`).
const TOML_MIGRATIONS: &[(&str, &str)] = &[
    (
        "1_accounts.sql",
        "CREATE TABLE accounts (id bigserial PRIMARY KEY, name text NOT NULL);\r\n",
    ),
    (
        "2_seed.sql",
        "INSERT INTO accounts (name) VALUES ('seeded');\n",
    ),
];

#[tokio::test]
async fn sqlx_toml_names_the_folder_and_how_sqlx_records_it() {
    let isolation = pgfixture::Config::from_env().unwrap().isolation;
    let toml = "[migrate]\n\
                migrations-dir = \"db/migrations\"\n\
                table-name = \"meta.migrations\"\n\
                create-schemas = [\"meta\"]\n\
                ignored-chars = [\"\\r\"]\n";
    let dir = crate_with_sqlx_toml("sqlx-toml", toml, TOML_MIGRATIONS);
    let built = pgfixture::Config::from_lookup(&InCrate(dir.clone()))
        .and_then(|config| Fixture::builder().config(config).workers(1).build());
    if isolation == pgfixture::Isolation::Schema {
        // Every worker schema would record its migrations in one table.
        let error = built.expect_err("a shared bookkeeping table in schema mode");
        let error = error.to_string();
        for wanted in [
            "sqlx.toml",
            "meta.migrations",
            "PGFIXTURE_ISOLATION=database",
        ] {
            assert!(error.contains(wanted), "{error:?} lacks {wanted:?}");
        }
        return;
    }
    let fixture = built.expect("fixture");
    let mut db = TestDb::acquire(&fixture).await.unwrap();
    let seeded: String = sqlx::query_scalar("SELECT name FROM accounts")
        .fetch_one(&mut *db)
        .await
        .unwrap();
    assert_eq!(seeded, "seeded", "the folder sqlx.toml names was applied");
    let ours: Vec<(i64, String, Vec<u8>)> = sqlx::query_as(
        "SELECT version, description, checksum FROM meta.migrations ORDER BY version",
    )
    .fetch_all(&mut *db)
    .await
    .unwrap();
    let default_table: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
            .fetch_one(&mut *db)
            .await
            .unwrap();
    assert_eq!(default_table, None, "recorded in sqlx.toml's table only");

    // The migrator `sqlx::migrate!()` builds from that sqlx.toml finds nothing to do.
    let mut resolve = sqlx::migrate::ResolveConfig::new();
    resolve.ignore_char('\r');
    let mut app = Migrator::new(sqlx::migrate::ResolveWith(
        dir.join("db/migrations"),
        resolve,
    ))
    .await
    .unwrap();
    app.dangerous_set_table_name("meta.migrations");
    app.create_schema("meta");
    let expected: Vec<(i64, String, Vec<u8>)> = app
        .iter()
        .map(|m| (m.version, m.description.to_string(), m.checksum.to_vec()))
        .collect();
    assert_eq!(
        ours, expected,
        "meta.migrations differs from what sqlx writes"
    );
    app.run(&mut *db).await.unwrap();
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM meta.migrations")
        .fetch_one(&mut *db)
        .await
        .unwrap();
    assert_eq!(after, 2);
}

#[tokio::test]
async fn sqlx_toml_folder_and_ignored_chars_work_in_every_mode() {
    let toml = "[migrate]\nmigrations-dir = \"db/migrations\"\nignored-chars = [\"\\r\"]\n";
    let dir = crate_with_sqlx_toml("sqlx-toml-plain", toml, TOML_MIGRATIONS);
    let config = pgfixture::Config::from_lookup(&InCrate(dir.clone())).unwrap();
    assert_eq!(config.migrations, Some(dir.join("db/migrations")));
    let fixture = Fixture::builder()
        .config(config)
        .workers(1)
        .build()
        .unwrap();
    let mut db = TestDb::acquire(&fixture).await.unwrap();
    let ours = recorded(&mut db).await;
    let mut resolve = sqlx::migrate::ResolveConfig::new();
    resolve.ignore_char('\r');
    let app = Migrator::new(sqlx::migrate::ResolveWith(
        dir.join("db/migrations"),
        resolve,
    ))
    .await
    .unwrap();
    let checksums: Vec<Vec<u8>> = ours.iter().map(|r| r.3.clone()).collect();
    let expected: Vec<Vec<u8>> = app.iter().map(|m| m.checksum.to_vec()).collect();
    assert_eq!(
        checksums, expected,
        "the checksums leave out the ignored characters"
    );
    let plain = Migrator::new(dir.join("db/migrations")).await.unwrap();
    assert_ne!(
        plain.iter().next().unwrap().checksum,
        app.iter().next().unwrap().checksum
    );
    app.run(&mut *db).await.unwrap();
}

#[test]
fn an_unreadable_sqlx_toml_is_named() {
    let dir = crate_with_sqlx_toml(
        "sqlx-toml-bad",
        "[migrate]\nmigrations-folder = \"x\"\n",
        &[],
    );
    let error = pgfixture::Config::from_lookup(&InCrate(dir.clone()))
        .expect_err("an unknown key in sqlx.toml")
        .to_string();
    assert!(
        error.contains(&dir.join("sqlx.toml").display().to_string()),
        "{error}"
    );
    assert!(error.contains("migrations-folder"), "{error}");
}

/// The environment of a test binary run outside cargo (a debugger, an IDE): no
/// `CARGO_MANIFEST_DIR`.
struct OutsideCargo;

impl pgfixture::Env for OutsideCargo {
    fn var(&self, name: &str) -> Option<String> {
        match name {
            "CARGO_MANIFEST_DIR" | "PGFIXTURE_MIGRATIONS" | "PGFIXTURE_FIXTURES" => None,
            _ => pgfixture::OsEnv.var(name),
        }
    }
}

#[test]
fn outside_cargo_the_recorded_crate_directory_gives_sqlx_toml() {
    let toml = "[migrate]\nmigrations-dir = \"db/migrations\"\n";
    let dir = crate_with_sqlx_toml("sqlx-toml-outside", toml, TOML_MIGRATIONS);
    let config = pgfixture::Config::from_lookup(&OutsideCargo).unwrap();
    assert_eq!(config.migrations, None, "nothing says where the crate is");
    // What `#[pgfixture::test]` does with the directory it recorded when compiled.
    let fixture = Fixture::builder()
        .config(config)
        .manifest_dir(dir.to_str().unwrap())
        .build()
        .unwrap();
    assert_eq!(fixture.config().migrations, Some(dir.join("db/migrations")));
}

/// Setup code runs once into the template (in schema mode into the worker schema),
/// after the migrations (plain files here) and before the fixtures, on the database
/// being built: every test sees what it made, in that order, and the workers built
/// from the template do not run it again. A connection it leaves open does not stop
/// the template from being renamed and cloned.
#[tokio::test]
async fn setup_code_runs_once_between_the_migrations_and_the_fixtures() {
    static RAN: AtomicUsize = AtomicUsize::new(0);
    let migrations = folder(
        "setup-order",
        &[("a.sql", "CREATE TABLE setup_steps (n serial, step text);")],
    );
    let fixtures = folder(
        "setup-order-fixtures",
        &[(
            "f.sql",
            "INSERT INTO setup_steps (step) VALUES ('fixture');",
        )],
    );
    // A version of its own: a template of an earlier run is not taken.
    let version = common::unique_run("setup");
    let build = || {
        Fixture::builder()
            .workers(1)
            .migrations(&migrations)
            .fixtures(&fixtures)
            .setup(&version, |url| async move {
                RAN.fetch_add(1, Ordering::SeqCst);
                let mut conn = PgConnection::connect(url.as_str()).await?;
                sqlx::query("INSERT INTO setup_steps (step) VALUES ('setup')")
                    .execute(&mut conn)
                    .await?;
                // Left open, in a task that outlives the setup.
                let (held, connection) = pgfixture::tokio_postgres::connect(
                    url.as_str(),
                    pgfixture::tokio_postgres::NoTls,
                )
                .await?;
                tokio::spawn(async move {
                    let _held = held;
                    let _ = connection.await;
                });
                Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
            })
            .build()
            .expect("fixture")
    };
    for round in 0..3 {
        // Built again with a new closure of the same version: the same fixture.
        let fixture = build();
        let mut db = TestDb::acquire(&fixture).await.unwrap();
        let steps: Vec<String> = sqlx::query_scalar("SELECT step FROM setup_steps ORDER BY n")
            .fetch_all(&mut *db)
            .await
            .unwrap();
        assert_eq!(steps, ["setup", "fixture"], "round {round}");
        sqlx::query("INSERT INTO setup_steps (step) VALUES ('test')")
            .execute(&mut *db)
            .await
            .unwrap();
    }
    assert_eq!(RAN.load(Ordering::SeqCst), 1, "the setup ran once");
}

/// Fixtures that differ only by their setup's version have templates of their own,
/// and the setup runs after a migrator's migrations (sqlx's layout here).
#[tokio::test]
async fn a_new_setup_version_builds_another_template() {
    let run = common::unique_run("setupv");
    for version in ["a", "b"] {
        let fixture = Fixture::builder()
            .workers(1)
            .migrations(SQLX_MIGRATIONS)
            .no_fixtures()
            .setup(&format!("{run}-{version}"), move |url| async move {
                let mut conn = PgConnection::connect(url.as_str()).await?;
                let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
                    .fetch_one(&mut conn)
                    .await?;
                let sql = format!(
                    "CREATE TABLE setup_version (version text, migrations bigint); \
                     INSERT INTO setup_version VALUES ('{version}', {applied})"
                );
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await?;
                conn.close().await
            })
            .build()
            .expect("fixture");
        let mut db = TestDb::acquire(&fixture).await.unwrap();
        let (seen, migrations): (String, i64) =
            sqlx::query_as("SELECT version, migrations FROM setup_version")
                .fetch_one(&mut *db)
                .await
                .unwrap();
        assert_eq!(seen, version);
        assert!(migrations > 0, "the migrator ran first");
    }
}

/// Setup code that fails, or panics, fails the acquire with an error naming its
/// version and what went wrong, and leaves no half-built template or schema.
#[tokio::test]
async fn failing_setup_code_is_named_and_leaves_nothing() {
    let run = common::unique_run("setupx");
    let failing = Fixture::builder()
        .workers(1)
        .no_migrations()
        .no_fixtures()
        .setup(&format!("{run}-fails"), |url| async move {
            let mut conn = PgConnection::connect(url.as_str()).await?;
            sqlx::raw_sql("CREATE TABLE setup_half (x int); SELECT * FROM no_such_setup_table")
                .execute(&mut conn)
                .await?;
            Ok::<(), sqlx::Error>(())
        })
        .build()
        .expect("fixture");
    let error = TestDb::acquire(&failing).await.unwrap_err();
    let Error::Setup { version, message } = &error else {
        panic!("not a setup error: {error}");
    };
    assert_eq!(version, &format!("{run}-fails"));
    assert!(message.contains("no_such_setup_table"), "{error}");

    let panicking = Fixture::builder()
        .workers(1)
        .no_migrations()
        .no_fixtures()
        .setup(&format!("{run}-panics"), |_| async move {
            if true {
                panic!("the setup cannot go on");
            }
            Ok::<(), sqlx::Error>(())
        })
        .build()
        .expect("fixture");
    let error = TestDb::acquire(&panicking).await.unwrap_err();
    assert!(
        matches!(&error, Error::Setup { message, .. } if message.contains("panicked: the setup cannot go on")),
        "{error}"
    );

    let good = with_migrations(SQLX_MIGRATIONS);
    let mut db = TestDb::acquire(&good).await.unwrap();
    assert_eq!(leftovers(&mut db).await, Vec::<String>::new());
}
