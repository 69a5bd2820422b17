//! Fixture files: loading, ordering, content hashing, and applying them.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio_postgres::Client;
use tokio_postgres::error::ErrorPosition;

use crate::{Error, Result};

/// One `*.sql` file.
#[derive(Debug, Clone)]
pub(crate) struct FixtureFile {
    pub(crate) path: PathBuf,
    pub(crate) sql: String,
}

/// The fixture files of a run, in the order they are applied, and a hash of their
/// content that names the templates and schemas built from them.
#[derive(Debug, Clone)]
pub(crate) struct FixtureSet {
    pub(crate) files: Vec<FixtureFile>,
    hash: String,
    /// Migrations run by a migrator, before the files (plain migration files are
    /// among `files`, first).
    pub(crate) migrations: Option<std::sync::Arc<crate::migrations::Migrations>>,
    /// How many of `files`, first, are plain migration files.
    migration_files: usize,
    /// Code of the user's, run after the migrations and before the fixtures.
    pub(crate) setup: Option<crate::setup::Setup>,
}

impl FixtureSet {
    /// Reads `dir`'s `*.sql` files in file-name order; no directory means no fixtures.
    #[cfg(test)]
    pub(crate) fn load(dir: Option<&Path>) -> Result<Self> {
        Self::load_with(None, dir)
    }

    /// [`FixtureSet::load`] after `migrations`.
    pub(crate) fn load_with(
        migrations: Option<crate::migrations::Migrations>,
        dir: Option<&Path>,
    ) -> Result<Self> {
        let mut files = Vec::new();
        if let Some(dir) = dir {
            let entries = std::fs::read_dir(dir).map_err(|source| Error::FixturesDir {
                path: dir.to_owned(),
                source,
            })?;
            let mut paths = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|source| Error::FixturesDir {
                    path: dir.to_owned(),
                    source,
                })?;
                let path = entry.path();
                // Every `*.sql` entry but a directory is a fixture: one that cannot be
                // read (a dangling link, no permission) is an error, not skipped.
                if path.extension().is_some_and(|e| e == "sql") && !path.is_dir() {
                    paths.push(path);
                }
            }
            paths.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
            for path in paths {
                let bytes = std::fs::read(&path).map_err(|e| Error::FixtureRead {
                    path: path.clone(),
                    reason: format!("{e}; fix or remove the file"),
                })?;
                let sql = String::from_utf8(bytes).map_err(|e| Error::FixtureRead {
                    path: path.clone(),
                    reason: format!(
                        "not valid UTF-8 (first bad byte at offset {}); save it as UTF-8",
                        e.utf8_error().valid_up_to()
                    ),
                })?;
                files.push(FixtureFile { path, sql });
            }
        }
        Ok(Self::with_migrations(migrations, files))
    }

    #[cfg(test)]
    pub(crate) fn from_files(files: Vec<FixtureFile>) -> Self {
        Self::with_migrations(None, files)
    }

    /// The migrations, then the fixture `files`: plain migration files are applied as
    /// the first fixtures; others by their migrator. Either changes the key.
    pub(crate) fn with_migrations(
        migrations: Option<crate::migrations::Migrations>,
        mut files: Vec<FixtureFile>,
    ) -> Self {
        let mut digest = Sha256::new();
        // What pgfixture keeps with a template changed (its sequences' state): a
        // template built by an earlier version is not taken for one of this version.
        digest.update(b"pgfixture template 2");
        if let Some(m) = &migrations {
            m.hash_into(&mut digest);
        }
        let mut migration_files = 0;
        let migrations = match migrations {
            Some(m) if m.layout == crate::migrations::Layout::Plain => {
                migration_files = m.files.len();
                files.splice(0..0, m.files);
                None
            }
            other => other.map(std::sync::Arc::new),
        };
        hash_files(&mut digest, &files);
        let hash = crate::digest::hex(&digest.finalize());
        FixtureSet {
            files,
            hash,
            migrations,
            migration_files,
            setup: None,
        }
    }

    /// With the user's `setup` code, whose version keys the template too.
    pub(crate) fn with_setup(mut self, setup: Option<crate::setup::Setup>) -> Self {
        if let Some(setup) = &setup {
            let mut digest = Sha256::new();
            digest.update(self.hash.as_bytes());
            digest.update(b"\nsetup ");
            digest.update(setup.version().as_bytes());
            self.hash = crate::digest::hex(&digest.finalize());
        }
        self.setup = setup;
        self
    }

    /// The first `n` hex digits of the content hash.
    pub(crate) fn hash(&self, n: usize) -> &str {
        &self.hash[..n.min(self.hash.len())]
    }

    /// Runs everything into the database `dbname` on `server`, whose connection
    /// `client` is: [`FixtureSet::run_migrators`], then [`FixtureSet::apply`].
    pub(crate) async fn apply_all(
        &self,
        client: &Client,
        server: &crate::server::Server,
        dbname: &str,
    ) -> Result<()> {
        self.run_migrators(client, server, dbname, None).await?;
        self.apply(client).await
    }

    /// Runs what works on connections of its own into `dbname` on `server` (into
    /// `schema` in schema mode, which must be committed already): the migrations of a
    /// migrator; then, with setup code, the plain migration files on `client` (each
    /// committed, so that the setup's connections see them; `client` has the schema
    /// first on its `search_path` then) and the setup code.
    pub(crate) async fn run_migrators(
        &self,
        client: &Client,
        server: &crate::server::Server,
        dbname: &str,
        schema: Option<&str>,
    ) -> Result<()> {
        if let Some(m) = &self.migrations {
            m.apply(client, server, dbname, schema).await?;
        }
        if let Some(setup) = &self.setup {
            for file in &self.files[..self.migration_files] {
                apply_file(client, &file.path, &file.sql).await?;
            }
            let settings = crate::settings::Settings::new(server, dbname, schema, None);
            setup.run(settings.url.clone()).await?;
        }
        Ok(())
    }

    /// Whether a migrator or setup code runs on a connection of its own (see
    /// [`FixtureSet::apply_all`]).
    pub(crate) fn migrator(&self) -> bool {
        self.setup.is_some() || self.migrations.as_ref().is_some_and(|m| m.own_connection())
    }

    /// Runs every file on `client`, in order, each as one query (so a file is one
    /// implicit transaction unless it says otherwise); an error names the file, the
    /// line and the statement.
    pub(crate) async fn apply(&self, client: &Client) -> Result<()> {
        // With setup code, the plain migrations ran before it.
        let done = if self.setup.is_some() {
            self.migration_files
        } else {
            0
        };
        for file in &self.files[done..] {
            apply_file(client, &file.path, &file.sql).await?;
        }
        Ok(())
    }
}

/// Feeds each file's name and text into `digest`, length-prefixed so that no two
/// sets read alike.
pub(crate) fn hash_files(digest: &mut Sha256, files: &[FixtureFile]) {
    for file in files {
        let name = file
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        digest.update((name.len() as u64).to_le_bytes());
        digest.update(name.as_bytes());
        digest.update((file.sql.len() as u64).to_le_bytes());
        digest.update(file.sql.as_bytes());
    }
}

/// A statement of the fixtures that acts on the whole database or server (an
/// extension, a role): in schema mode it runs once per database, before any worker
/// schema is built, instead of once per schema.
#[derive(Debug, Clone)]
pub(crate) struct SharedStatement {
    pub(crate) path: PathBuf,
    pub(crate) line: usize,
    pub(crate) sql: String,
}

impl SharedStatement {
    /// The server's error for this statement, named by its file and line.
    pub(crate) fn error(&self, error: &tokio_postgres::Error) -> Error {
        match statement_error(&self.path, &self.sql, 0, error) {
            Error::Fixture {
                path,
                line,
                statement,
                message,
            } => Error::Fixture {
                path,
                line: Some(self.line + line.unwrap_or(1) - 1),
                statement,
                message,
            },
            other => other,
        }
    }
}

/// Where a statement of the fixtures belongs in schema mode.
#[derive(Debug, PartialEq, Eq)]
enum Scope {
    /// In the worker's schema: applied once per schema.
    Schema,
    /// Once per database (extensions) or server (roles), tolerating "already exists".
    Shared,
    /// Names a database-wide object that every worker schema would create again.
    Refused(&'static str),
}

fn scope(words: &[String]) -> Scope {
    let w = |i: usize| words.get(i).map_or("", String::as_str);
    let ddl = matches!(w(0), "CREATE" | "ALTER" | "DROP");
    // CREATE OR REPLACE <kind>
    let kind = if w(1) == "OR" && w(2) == "REPLACE" {
        3
    } else {
        1
    };
    match (ddl, w(kind), w(kind + 1)) {
        (true, "EXTENSION" | "ROLE" | "GROUP", _) => Scope::Shared,
        (true, "USER", "MAPPING") => Scope::Refused("a user mapping"),
        (true, "USER", _) => Scope::Shared,
        (true, "SCHEMA", _) => Scope::Refused("a schema"),
        (true, "DATABASE", _) => Scope::Refused("a database"),
        (true, "TABLESPACE", _) => Scope::Refused("a tablespace"),
        (true, "PUBLICATION" | "SUBSCRIPTION", _) => {
            Scope::Refused("a publication or subscription")
        }
        (true, "SERVER" | "FOREIGN", _) => Scope::Refused("a foreign server or data wrapper"),
        (true, "EVENT", "TRIGGER") => Scope::Refused("an event trigger"),
        (true, "LANGUAGE" | "TRUSTED" | "PROCEDURAL", _) => Scope::Refused("a language"),
        (true, "SYSTEM", _) => Scope::Refused("a server setting"),
        _ if w(0) == "COMMENT" && w(1) == "ON" && matches!(w(2), "EXTENSION" | "ROLE") => {
            Scope::Shared
        }
        _ => Scope::Schema,
    }
}

/// The statements of `sql` (the text of the file `path`) that schema mode runs once
/// per database (extensions, roles), and `sql` with them blanked, byte for byte, so
/// that the later statements keep their offsets and lines.
///
/// # Errors
///
/// [`Error::Fixture`] naming the file, line and statement of one that creates a
/// database-wide object (a schema, a database, a tablespace, ...), which every worker
/// schema would create again.
pub(crate) fn take_shared(path: &Path, sql: &str) -> Result<(String, Vec<SharedStatement>)> {
    let mut shared = Vec::new();
    let mut blanked = sql.to_owned();
    for statement in crate::sql::split(sql) {
        match scope(&statement.words(5)) {
            Scope::Schema => {}
            Scope::Shared => {
                shared.push(SharedStatement {
                    path: path.to_owned(),
                    line: statement.line,
                    sql: statement.text.to_owned(),
                });
                let blank: String = statement
                    .text
                    .bytes()
                    .map(|b| if b == b'\n' { '\n' } else { ' ' })
                    .collect();
                let range = statement.offset..statement.offset + statement.text.len();
                blanked.replace_range(range, &blank);
            }
            Scope::Refused(what) => {
                return Err(Error::Fixture {
                    path: path.to_owned(),
                    line: Some(statement.line),
                    statement: Some(statement.excerpt()),
                    message: format!(
                        "creates {what}, which is shared by every worker schema of the \
                         database, so schema mode cannot isolate it; use \
                         PGFIXTURE_ISOLATION=database (a database per worker)"
                    ),
                });
            }
        }
    }
    Ok((blanked, shared))
}

impl FixtureSet {
    /// The fixtures as schema mode applies them: the statements on extensions and
    /// roles taken out (blanked, so that lines stay where they were) to run once per
    /// database, the rest applied in each worker schema. The hash stays the whole
    /// set's.
    ///
    /// # Errors
    ///
    /// [`Error::Fixture`] naming the file, line and statement of one that creates a
    /// database-wide object (a schema, a database, a tablespace, ...), which every
    /// worker schema would create again.
    pub(crate) fn for_schemas(&self) -> Result<(FixtureSet, Vec<SharedStatement>)> {
        let mut shared = Vec::new();
        let mut migrations = self.migrations.clone();
        // The migrations run first: so do their shared statements.
        if let Some(m) = &self.migrations
            && let Some((schema_migrations, taken)) = m.for_schemas()?
        {
            shared.extend(taken);
            migrations = Some(std::sync::Arc::new(schema_migrations));
        }
        let mut files = Vec::new();
        for file in &self.files {
            let (sql, taken) = take_shared(&file.path, &file.sql)?;
            shared.extend(taken);
            files.push(FixtureFile {
                path: file.path.clone(),
                sql,
            });
        }
        Ok((
            FixtureSet {
                files,
                hash: self.hash.clone(),
                migrations,
                migration_files: self.migration_files,
                setup: self.setup.clone(),
            },
            shared,
        ))
    }
}

/// Runs `sql`, the text of the file `path`, as one query. The statements that
/// completed are counted, so that an error the server gives without a position
/// (most errors of execution) still names its statement.
pub(crate) async fn apply_file(client: &Client, path: &Path, sql: &str) -> Result<()> {
    use futures::StreamExt;
    use tokio_postgres::SimpleQueryMessage;
    let mut completed = 0;
    let failed = match client.simple_query_raw(sql).await {
        Ok(stream) => {
            let mut stream = std::pin::pin!(stream);
            loop {
                match stream.next().await {
                    None => return Ok(()),
                    Some(Ok(SimpleQueryMessage::CommandComplete(_))) => completed += 1,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break e,
                }
            }
        }
        Err(e) => e,
    };
    Err(statement_error(path, sql, completed, &failed))
}

/// The error of the statement after the `completed` first ones of `sql`: the file,
/// the line (where the server pointed, else where the statement starts), the
/// statement, and the server's message.
pub(crate) fn statement_error(
    path: &Path,
    sql: &str,
    completed: usize,
    error: &tokio_postgres::Error,
) -> Error {
    let (message, position) = match error.as_db_error() {
        Some(db) => {
            let mut message = db.message().to_owned();
            if let Some(detail) = db.detail() {
                message.push_str(&format!(" (detail: {detail})"));
            }
            if let Some(hint) = db.hint() {
                message.push_str(&format!(" (hint: {hint})"));
            }
            if let Some(context) = db.where_() {
                message.push_str(&format!(" (where: {context})"));
            }
            let position = match db.position() {
                Some(ErrorPosition::Original(pos)) => Some(*pos as usize),
                _ => None,
            };
            (message, position)
        }
        None => (error.to_string(), None),
    };
    let (line, statement) = locate(sql, position, completed);
    Error::Fixture {
        path: path.to_owned(),
        line,
        statement,
        message,
    }
}

/// Where in `sql` an error is: the line and an excerpt of the statement that holds
/// the 1-based character `position` the server gave, else of the statement after the
/// `completed` first ones.
pub(crate) fn locate(
    sql: &str,
    position: Option<usize>,
    completed: usize,
) -> (Option<usize>, Option<String>) {
    let statements = crate::sql::split(sql);
    let statement = match position {
        // A character position in the whole text: the statement that holds it.
        Some(pos) => {
            let at = sql
                .char_indices()
                .nth(pos.saturating_sub(1))
                .map_or(sql.len(), |(i, _)| i);
            statements.iter().rev().find(|s| s.offset <= at)
        }
        None => statements.get(completed),
    };
    let line = match (position, statement) {
        (Some(pos), _) => Some(line_of(sql, pos)),
        (None, Some(s)) => Some(s.line),
        (None, None) => None,
    };
    (line, statement.map(|s| s.excerpt()))
}

/// The 1-based line of the 1-based character position `pos` in `sql`.
pub(crate) fn line_of(sql: &str, pos: usize) -> usize {
    1 + sql
        .chars()
        .take(pos.saturating_sub(1))
        .filter(|&c| c == '\n')
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pgfixture-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn files_apply_in_name_order_and_other_files_are_ignored() {
        let d = dir("order");
        std::fs::write(d.join("10_b.sql"), "b").unwrap();
        std::fs::write(d.join("02_a.sql"), "a").unwrap();
        std::fs::write(d.join("README.md"), "x").unwrap();
        std::fs::create_dir(d.join("sub.sql")).unwrap();
        let set = FixtureSet::load(Some(&d)).unwrap();
        let names: Vec<_> = set
            .files
            .iter()
            .map(|f| f.path.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["02_a.sql", "10_b.sql"]);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn hash_follows_content_and_names() {
        let f = |name: &str, sql: &str| FixtureFile {
            path: PathBuf::from(name),
            sql: sql.into(),
        };
        let a = FixtureSet::from_files(vec![f("a.sql", "x"), f("b.sql", "y")]);
        let same = FixtureSet::from_files(vec![f("/other/a.sql", "x"), f("/other/b.sql", "y")]);
        let changed = FixtureSet::from_files(vec![f("a.sql", "x"), f("b.sql", "y ")]);
        let shifted = FixtureSet::from_files(vec![f("a.sql", "xy"), f("b.sql", "")]);
        assert_eq!(a.hash(16), same.hash(16));
        assert_ne!(a.hash(16), changed.hash(16));
        assert_ne!(a.hash(16), shifted.hash(16));
        assert_eq!(a.hash(12).len(), 12);
    }

    #[test]
    fn a_setups_version_is_part_of_the_key() {
        let files = || {
            FixtureSet::from_files(vec![FixtureFile {
                path: PathBuf::from("a.sql"),
                sql: "x".into(),
            }])
        };
        let setup = |version: &str| {
            Some(crate::setup::Setup::new(version, |_| async {
                Ok::<(), std::io::Error>(())
            }))
        };
        let plain = files().with_setup(None);
        let one = files().with_setup(setup("1"));
        assert_eq!(plain.hash(64), files().hash(64));
        assert_ne!(one.hash(64), plain.hash(64));
        assert_eq!(one.hash(64), files().with_setup(setup("1")).hash(64));
        assert_ne!(one.hash(64), files().with_setup(setup("2")).hash(64));
        assert!(one.migrator(), "setup code runs on a connection of its own");
    }

    #[test]
    fn migrations_are_part_of_the_key() {
        use crate::migrations::{Layout, Migrations, Source};
        let f = |name: &str, sql: &str| FixtureFile {
            path: PathBuf::from(name),
            sql: sql.into(),
        };
        let set = |layout, sql: &str| {
            let migrations = Migrations {
                source: Source::Dir(PathBuf::from("migrations")),
                layout,
                files: vec![f("1_init.sql", sql)],
                blanked: Vec::new(),
                sqlx_toml: None,
            };
            FixtureSet::with_migrations(Some(migrations), vec![f("seed.sql", "x")])
        };
        // Schema mode takes the statements on extensions out of sqlx migrations too,
        // keeping the set's key.
        let with_extension = set(Layout::Sqlx, "CREATE EXTENSION citext;\nCREATE TABLE a ()");
        let (per_schema, shared) = with_extension.for_schemas().unwrap();
        assert_eq!(shared.len(), 1);
        assert_eq!(
            (shared[0].line, shared[0].sql.as_str()),
            (1, "CREATE EXTENSION citext;")
        );
        let blanked = &per_schema.migrations.as_ref().unwrap().blanked;
        assert_eq!(blanked.len(), 1);
        assert_eq!(blanked[0].0, 1);
        assert!(!blanked[0].1.contains("EXTENSION") && blanked[0].1.contains("CREATE TABLE a ()"));
        assert_eq!(per_schema.hash(64), with_extension.hash(64));
        let none = FixtureSet::from_files(vec![f("seed.sql", "x")]);
        let one = set(Layout::Sqlx, "CREATE TABLE a ()");
        let edited = set(Layout::Sqlx, "CREATE TABLE a (x int)");
        assert_ne!(none.hash(16), one.hash(16));
        assert_ne!(
            one.hash(16),
            edited.hash(16),
            "an edited migration must build a new template"
        );
        assert_eq!(
            one.hash(16),
            set(Layout::Sqlx, "CREATE TABLE a ()").hash(16)
        );
        // Plain migration files are the first fixtures; a migrator's stay apart.
        let plain = set(Layout::Plain, "CREATE TABLE a ()");
        assert_eq!(plain.files.len(), 2);
        assert!(plain.migrations.is_none());
        assert_eq!(one.files.len(), 1);
        assert!(one.migrator());
    }

    #[test]
    fn missing_dir_and_bad_utf8_are_named() {
        let err = FixtureSet::load(Some(Path::new("/nonexistent/pgfixture"))).unwrap_err();
        assert!(err.to_string().contains("PGFIXTURE_FIXTURES"), "{err}");
        let d = dir("utf8");
        std::fs::write(d.join("bad.sql"), b"select '\xff';").unwrap();
        let err = FixtureSet::load(Some(&d)).unwrap_err().to_string();
        assert!(err.contains("bad.sql") && err.contains("UTF-8"), "{err}");
        std::fs::remove_dir_all(d).unwrap();
        assert!(FixtureSet::load(None).unwrap().files.is_empty());
    }

    #[test]
    fn schema_mode_takes_extensions_and_roles_out_and_refuses_database_wide_objects() {
        let f = |sql: &str| {
            FixtureSet::from_files(vec![FixtureFile {
                path: PathBuf::from("001.sql"),
                sql: sql.into(),
            }])
        };
        let set = f(
            "CREATE EXTENSION IF NOT EXISTS hstore;\nCREATE TABLE é (a hstore);\n\
                     create role app_reader;\nCOMMENT ON EXTENSION hstore IS 'x';\n\
                     CREATE USER app;\nGRANT SELECT ON é TO app_reader;\n",
        );
        let (per_schema, shared) = set.for_schemas().unwrap();
        assert_eq!(per_schema.hash(16), set.hash(16));
        let lines: Vec<_> = shared.iter().map(|s| (s.line, s.sql.as_str())).collect();
        assert_eq!(
            lines,
            [
                (1, "CREATE EXTENSION IF NOT EXISTS hstore;"),
                (3, "create role app_reader;"),
                (4, "COMMENT ON EXTENSION hstore IS 'x';"),
                (5, "CREATE USER app;"),
            ]
        );
        let left = crate::sql::split(&per_schema.files[0].sql);
        let kept: Vec<_> = left.iter().map(|s| (s.line, s.text)).collect();
        assert_eq!(
            kept,
            [
                (2, "CREATE TABLE é (a hstore);"),
                (6, "GRANT SELECT ON é TO app_reader;")
            ]
        );
        for refused in [
            "CREATE SCHEMA audit;",
            "create database other;",
            "ALTER SYSTEM SET work_mem = '1MB';",
            "CREATE USER MAPPING FOR app SERVER s;",
            "CREATE OR REPLACE LANGUAGE plx;",
        ] {
            let err = f(&format!("CREATE TABLE t ();\n{refused}\n"))
                .for_schemas()
                .unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("001.sql (line 2)")
                    && text.contains(refused)
                    && text.contains("PGFIXTURE_ISOLATION=database"),
                "{text}"
            );
        }
    }

    #[test]
    fn positions_map_to_lines() {
        let sql = "create table a();\ncreate tabel b();\n";
        assert_eq!(line_of(sql, 1), 1);
        assert_eq!(line_of(sql, 19), 2);
        assert_eq!(line_of("é\nx", 3), 2);
    }
}
