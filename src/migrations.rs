//! Migrations: the folder's layout, read and checked before anything is built, and
//! applied once into each template (or worker schema) before the fixtures, through the
//! migration tool's own migrator.
//!
//! - plain `*.sql` files: applied in file-name order, as fixtures are;
//! - sqlx's layout (`<version>_<description>.sql`, reversible `.up.sql` / `.down.sql`):
//!   run by sqlx's `Migrator` (feature `sqlx`), so `_sqlx_migrations` holds what sqlx
//!   writes;
//! - diesel's (`<version>_<name>/up.sql`) and refinery's (`V<n>__<name>.sql`) layouts
//!   are recognised and refused until their drivers exist, never misapplied.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::fixtures::{FixtureFile, SharedStatement};
use crate::sqlx_toml::SqlxToml;
use crate::{Error, Result};

/// How a migrations folder is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    Plain,
    Sqlx,
    Diesel,
    Refinery,
}

impl Layout {
    fn describe(self) -> &'static str {
        match self {
            Layout::Plain => "plain .sql files",
            Layout::Sqlx => "sqlx's layout (<version>_<description>.sql)",
            Layout::Diesel => "diesel's layout (<version>_<name>/up.sql)",
            Layout::Refinery => "refinery's layout (V<n>__<name>.sql)",
        }
    }
}

/// One entry of a migrations folder, as the layout check sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) name: String,
    /// A directory holding an `up.sql` (diesel's layout).
    pub(crate) diesel_dir: bool,
}

/// What one entry says about the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Plain,
    /// sqlx: the version and whether it is a down migration.
    Sqlx(i64, bool),
    /// A `<prefix>_<rest>.sql` whose prefix is digits too long for a version.
    BadVersion,
    Diesel,
    Refinery,
    /// Not a migration (another extension, a hidden file, a directory without `up.sql`).
    Other,
}

fn kind(entry: &Entry) -> Kind {
    if entry.diesel_dir {
        return Kind::Diesel;
    }
    let name = entry.name.as_str();
    if name.starts_with('.') || !name.ends_with(".sql") {
        return Kind::Other;
    }
    if let Some(rest) = name.strip_prefix(['V', 'U'])
        && let Some((version, _)) = rest.split_once("__")
        && !version.is_empty()
        && version.chars().all(|c| c.is_ascii_digit() || c == '.')
    {
        return Kind::Refinery;
    }
    if let Some((version, _)) = name.split_once('_')
        && !version.is_empty()
        && version.chars().all(|c| c.is_ascii_digit())
    {
        return match version.parse::<i64>() {
            Ok(v) => Kind::Sqlx(v, name.ends_with(".down.sql")),
            Err(_) => Kind::BadVersion,
        };
    }
    Kind::Plain
}

/// The layout of a folder with these entries, or what is wrong with it: the files that
/// mix layouts, share a version, or have a version that is not a number.
pub(crate) fn layout(entries: &[Entry]) -> std::result::Result<Option<Layout>, String> {
    let kinds: Vec<(&Entry, Kind)> = entries.iter().map(|e| (e, kind(e))).collect();
    let names = |wanted: &dyn Fn(&Kind) -> bool| -> Vec<&str> {
        let mut names: Vec<&str> = kinds
            .iter()
            .filter(|(_, k)| wanted(k))
            .map(|(e, _)| e.name.as_str())
            .collect();
        names.sort_unstable();
        names
    };
    let bad = names(&|k| *k == Kind::BadVersion);
    if !bad.is_empty() {
        return Err(format!(
            "{}: the version (before the first '_') must be a number that fits in 64 bits",
            bad.join(", ")
        ));
    }
    let found: Vec<(Layout, Vec<&str>)> = [
        (Layout::Plain, names(&|k| *k == Kind::Plain)),
        (Layout::Sqlx, names(&|k| matches!(k, Kind::Sqlx(..)))),
        (Layout::Diesel, names(&|k| *k == Kind::Diesel)),
        (Layout::Refinery, names(&|k| *k == Kind::Refinery)),
    ]
    .into_iter()
    .filter(|(_, names)| !names.is_empty())
    .collect();
    match found.as_slice() {
        [] => Ok(None),
        [(Layout::Sqlx, _)] => {
            // Two migrations of one version (and one direction): sqlx would record
            // the first and fail on the second.
            let mut versions: Vec<(i64, bool, &str)> = kinds
                .iter()
                .filter_map(|(e, k)| match k {
                    Kind::Sqlx(v, down) => Some((*v, *down, e.name.as_str())),
                    _ => None,
                })
                .collect();
            versions.sort_unstable();
            let duplicates: Vec<String> = versions
                .windows(2)
                .filter(|w| w[0].0 == w[1].0 && w[0].1 == w[1].1)
                .map(|w| format!("{} and {} (version {})", w[0].2, w[1].2, w[0].0))
                .collect();
            if duplicates.is_empty() {
                Ok(Some(Layout::Sqlx))
            } else {
                Err(format!(
                    "two migrations have one version: {}; give each its own",
                    duplicates.join(", ")
                ))
            }
        }
        [(layout, _)] => Ok(Some(*layout)),
        mixed => {
            let mut message = String::from("the folder mixes layouts:");
            for (layout, names) in mixed {
                let shown: Vec<&str> = names.iter().take(3).copied().collect();
                let more = names.len().saturating_sub(shown.len());
                let _ = write!(message, " {} ({}", layout.describe(), shown.join(", "));
                if more > 0 {
                    let _ = write!(message, " and {more} more");
                }
                message.push(')');
                message.push(';');
            }
            message.push_str(" keep one layout per folder");
            Err(message)
        }
    }
}

/// Why pgfixture cannot run a folder in `layout` (with the `sqlx` feature or not).
fn refusal(layout: Layout, sqlx: bool) -> Option<String> {
    match layout {
        Layout::Diesel | Layout::Refinery => Some(format!(
            "is in {}, which pgfixture cannot run yet (its driver comes in a later release); set PGFIXTURE_MIGRATIONS=none (or to another folder), and apply the schema from plain .sql files in PGFIXTURE_FIXTURES",
            layout.describe()
        )),
        Layout::Sqlx if !sqlx => Some(format!(
            "is in {}: enable pgfixture's `sqlx` feature (pgfixture = {{ version = \"...\", features = [\"sqlx\"] }}), or `sqlx-0_8` for a crate on sqlx 0.8, to run it through sqlx's migrator",
            layout.describe()
        )),
        _ => None,
    }
}

/// Where the migrations come from.
#[derive(Debug, Clone)]
#[cfg_attr(not(any(feature = "sqlx", feature = "sqlx-0_8")), allow(dead_code))]
pub(crate) enum Source {
    /// A folder, in the layout found.
    Dir(PathBuf),
    /// A migrator given in code (`#[pgfixture::test(migrator = "...")]`), of either
    /// sqlx major, run by its own.
    #[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
    Migrator(crate::config::MigratorRef),
}

/// The migrations of a run: applied before the fixtures, and part of the templates' key.
#[derive(Debug, Clone)]
#[cfg_attr(not(any(feature = "sqlx", feature = "sqlx-0_8")), allow(dead_code))]
pub(crate) struct Migrations {
    pub(crate) source: Source,
    pub(crate) layout: Layout,
    /// The files to apply, in order (plain layout), or every migration (sqlx's
    /// layout: for the key and for naming the file of an error).
    pub(crate) files: Vec<FixtureFile>,
    /// Schema mode, sqlx's layout: the migrations whose statements on extensions and
    /// roles run once per database instead ([`Migrations::for_schemas`]), by version,
    /// with the text the migrator runs in their place (those statements blanked).
    pub(crate) blanked: Vec<(i64, String)>,
    /// A folder in sqlx's layout: the crate's `sqlx.toml`, whose `[migrate]` settings
    /// sqlx's migrator runs it with, as `sqlx::migrate!()` would.
    pub(crate) sqlx_toml: Option<SqlxToml>,
}

impl Migrations {
    /// Reads and checks the folder `dir`; a folder in sqlx's layout is run with the
    /// settings of the crate's `sqlx.toml`.
    ///
    /// # Errors
    ///
    /// [`Error::Migration`] naming the folder or files: unreadable, a mix of layouts,
    /// a version twice or not a number, a layout pgfixture cannot run (yet, or without
    /// the `sqlx` feature).
    pub(crate) fn load(dir: &Path, sqlx_toml: Option<&SqlxToml>) -> Result<Option<Self>> {
        let folder_error = |message: String| Error::Migration {
            path: dir.to_owned(),
            line: None,
            statement: None,
            message,
        };
        let read = std::fs::read_dir(dir).map_err(|e| {
            folder_error(format!(
                "cannot read the migrations folder: {e}; set PGFIXTURE_MIGRATIONS to your migrations folder"
            ))
        })?;
        let mut entries = Vec::new();
        for entry in read {
            let entry = entry.map_err(|e| folder_error(format!("cannot list the folder: {e}")))?;
            let path = entry.path();
            entries.push(Entry {
                name: entry.file_name().to_string_lossy().into_owned(),
                diesel_dir: path.is_dir() && path.join("up.sql").is_file(),
            });
        }
        let Some(layout) = layout(&entries).map_err(folder_error)? else {
            return Ok(None);
        };
        if let Some(refusal) = refusal(layout, cfg!(any(feature = "sqlx", feature = "sqlx-0_8"))) {
            return Err(folder_error(refusal));
        }
        let mut files = Vec::new();
        let mut wanted: Vec<(Option<i64>, String)> = entries
            .iter()
            .filter_map(|e| match kind(e) {
                Kind::Plain => Some((None, e.name.clone())),
                Kind::Sqlx(v, _) => Some((Some(v), e.name.clone())),
                _ => None,
            })
            .collect();
        // sqlx's order is the versions' (1, 2, 10); plain files go by name.
        wanted.sort();
        for (_, name) in wanted {
            let path = dir.join(&name);
            let sql = std::fs::read_to_string(&path).map_err(|e| Error::Migration {
                path: path.clone(),
                line: None,
                statement: None,
                message: format!("cannot read it: {e}"),
            })?;
            files.push(FixtureFile { path, sql });
        }
        Ok(Some(Migrations {
            source: Source::Dir(dir.to_owned()),
            layout,
            files,
            blanked: Vec::new(),
            sqlx_toml: sqlx_toml.filter(|_| layout == Layout::Sqlx).cloned(),
        }))
    }

    /// A static sqlx migrator's migrations.
    #[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
    pub(crate) fn from_migrator(migrator: crate::config::MigratorRef) -> Self {
        Migrations {
            source: Source::Migrator(migrator),
            layout: Layout::Sqlx,
            files: Vec::new(),
            blanked: Vec::new(),
            sqlx_toml: None,
        }
    }

    /// Feeds what identifies these migrations into a template's key.
    pub(crate) fn hash_into(&self, digest: &mut Sha256) {
        digest.update(format!("migrations {:?}", self.layout).as_bytes());
        crate::fixtures::hash_files(digest, &self.files);
        if let Some(toml) = &self.sqlx_toml {
            digest.update(toml.key().as_bytes());
        }
        #[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
        if let Source::Migrator(migrator) = &self.source {
            for m in migrator.migrations() {
                digest.update(m.version.to_le_bytes());
                digest.update(m.description.as_bytes());
                digest.update([u8::from(m.down)]);
                digest.update(m.checksum);
            }
            digest.update(migrator.record().as_bytes());
        }
    }

    /// The migrations as schema mode runs them (sqlx's layout): their statements on
    /// extensions and roles, which act on the whole database or server, are taken out
    /// to run once per database before any worker schema, as the fixtures' are, and
    /// the migrator runs the rest. The checksums stay those of the files, so that
    /// `_sqlx_migrations` is what the application's own migrator expects. `None` when
    /// there is nothing to take out (or another layout, whose files are fixtures).
    ///
    /// # Errors
    ///
    /// [`Error::Fixture`] naming the file, line and statement of one that creates a
    /// database-wide object schema mode cannot isolate (a schema, a database, ...).
    pub(crate) fn for_schemas(&self) -> Result<Option<(Migrations, Vec<SharedStatement>)>> {
        if self.layout != Layout::Sqlx {
            return Ok(None);
        }
        // The bookkeeping table must be each worker schema's own.
        let (table, schemas, path): (&str, Vec<&str>, PathBuf) = match &self.source {
            Source::Dir(dir) => match &self.sqlx_toml {
                Some(toml) => (
                    toml.table_name.as_deref().unwrap_or(""),
                    toml.create_schemas.iter().map(String::as_str).collect(),
                    toml.path.clone(),
                ),
                None => ("", Vec::new(), dir.clone()),
            },
            #[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
            Source::Migrator(m) => {
                let (table, schemas) = m.table_and_schemas();
                (table, schemas, self.folder())
            }
        };
        if let Some(shared) = SqlxToml::shared_schemas(table, &schemas) {
            return Err(Error::Migration {
                path,
                line: None,
                statement: None,
                message: format!(
                    "sqlx's migrator is set to record migrations outside the worker's schema ({shared}), which schema mode cannot give each worker: use PGFIXTURE_ISOLATION=database or container, or record them in the default table"
                ),
            });
        }
        let mut ups: Vec<(i64, PathBuf, String)> = Vec::new();
        match &self.source {
            Source::Dir(_) => {
                for file in &self.files {
                    let name = file.path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    let version = name.split_once('_').and_then(|(v, _)| v.parse().ok());
                    if let (Some(version), false) = (version, name.ends_with(".down.sql")) {
                        ups.push((version, file.path.clone(), file.sql.clone()));
                    }
                }
            }
            #[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
            Source::Migrator(migrator) => {
                for m in migrator.migrations().into_iter().filter(|m| !m.down) {
                    let path =
                        PathBuf::from(format!("migration {} ({})", m.version, m.description));
                    ups.push((m.version, path, m.sql.to_owned()));
                }
            }
        }
        let mut shared = Vec::new();
        let mut blanked = Vec::new();
        for (version, path, sql) in ups {
            let (sql, taken) = crate::fixtures::take_shared(&path, &sql)?;
            if !taken.is_empty() {
                shared.extend(taken);
                blanked.push((version, sql));
            }
        }
        if shared.is_empty() {
            return Ok(None);
        }
        Ok(Some((
            Migrations {
                blanked,
                ..self.clone()
            },
            shared,
        )))
    }

    /// Whether the migrations need a connection of their own (a migrator), so that the
    /// schema they go into must be committed first.
    pub(crate) fn own_connection(&self) -> bool {
        self.layout == Layout::Sqlx
    }

    /// Applies the migrations to the database `dbname` on `server` (into `schema`
    /// first on the `search_path` in schema mode): plain files on `client`, a migrator
    /// on a connection of its own.
    pub(crate) async fn apply(
        &self,
        client: &tokio_postgres::Client,
        server: &crate::server::Server,
        dbname: &str,
        schema: Option<&str>,
    ) -> Result<()> {
        match self.layout {
            Layout::Plain => {
                for file in &self.files {
                    crate::fixtures::apply_file(client, &file.path, &file.sql)
                        .await
                        .map_err(as_migration_error)?;
                }
                Ok(())
            }
            #[cfg(feature = "sqlx")]
            Layout::Sqlx => self.run_sqlx(server, dbname, schema).await,
            // Without sqlx 0.9, a crate on sqlx 0.8 has its folder run by sqlx 0.8.
            #[cfg(all(feature = "sqlx-0_8", not(feature = "sqlx")))]
            Layout::Sqlx => self.run_sqlx_0_8(server, dbname, schema).await,
            _ => {
                let _ = (server, dbname, schema);
                unreachable!("refused when loaded")
            }
        }
    }

    #[cfg(feature = "sqlx")]
    async fn run_sqlx(
        &self,
        server: &crate::server::Server,
        dbname: &str,
        schema: Option<&str>,
    ) -> Result<()> {
        use ::sqlx::Connection;
        use ::sqlx::migrate::{MigrateError, Migrator};
        let owned;
        let migrator: &Migrator = match &self.source {
            Source::Dir(dir) => {
                // With the crate's `sqlx.toml`, as `sqlx::migrate!()` builds it.
                let mut resolve = ::sqlx::migrate::ResolveConfig::new();
                let toml = self.sqlx_toml.clone().unwrap_or_default();
                resolve.ignore_chars(toml.ignored_chars);
                let mut m = Migrator::new(::sqlx::migrate::ResolveWith(dir.clone(), resolve))
                    .await
                    .map_err(|e| unreadable(dir, &e))?;
                // pgfixture holds its own lock on what it builds.
                m.set_locking(false);
                if let Some(table) = toml.table_name {
                    m.dangerous_set_table_name(table);
                }
                for schema in toml.create_schemas {
                    m.create_schema(schema);
                }
                owned = m;
                &owned
            }
            Source::Migrator(crate::config::MigratorRef::Sqlx(m)) => m,
            #[cfg(feature = "sqlx-0_8")]
            Source::Migrator(crate::config::MigratorRef::Sqlx0_8(_)) => {
                return self.run_sqlx_0_8(server, dbname, schema).await;
            }
        };
        // Schema mode: the migrations whose shared statements ran once per database
        // run without them, under their files' checksums.
        let schema_owned;
        let migrator = if self.blanked.is_empty() {
            migrator
        } else {
            use ::sqlx::AssertSqlSafe;
            use ::sqlx::SqlSafeStr;
            use ::sqlx::migrate::Migration;
            let migrations = migrator
                .iter()
                .map(|m| {
                    match self.blanked_sql(m.version, m.migration_type.is_down_migration()) {
                        // The file's checksum, not a hash of the blanked text.
                        Some(sql) => Migration {
                            sql: AssertSqlSafe(sql.to_owned()).into_sql_str(),
                            ..m.clone()
                        },
                        None => m.clone(),
                    }
                })
                .collect();
            let mut m = Migrator::with_migrations(migrations);
            m.set_locking(false);
            m.set_ignore_missing(migrator.ignore_missing);
            m.dangerous_set_table_name(migrator.table_name.clone());
            for schema in migrator.create_schemas.iter() {
                m.create_schema(schema.clone());
            }
            schema_owned = m;
            &schema_owned
        };
        let settings = crate::settings::Settings::new(server, dbname, schema, None);
        let options = crate::driver::sqlx::own_connect_options(&settings);
        let mut conn = ::sqlx::PgConnection::connect_with(&options)
            .await
            .map_err(Error::sqlx(format!(
                "connecting to {dbname} to run the migrations"
            )))?;
        // `run_direct`: `run` takes an `Acquire`, whose future rustc cannot prove `Send`
        // for every lifetime inside pgfixture's own futures.
        let result = migrator.run_direct(None, &mut conn, false).await;
        let _ = conn.close().await;
        result.map_err(|e| match e {
            MigrateError::ExecuteMigration(source, version) => {
                self.located(version, error_parts(&source))
            }
            other => self.failed(&other),
        })
    }

    /// Runs a migrator of sqlx 0.8 (the test crate's own, feature `sqlx-0_8`) through
    /// sqlx 0.8 itself, as `run_sqlx` runs sqlx 0.9's; without sqlx 0.9 (no `sqlx`
    /// feature), a folder in sqlx's layout too.
    #[cfg(feature = "sqlx-0_8")]
    async fn run_sqlx_0_8(
        &self,
        server: &crate::server::Server,
        dbname: &str,
        schema: Option<&str>,
    ) -> Result<()> {
        use ::sqlx08::Connection;
        use ::sqlx08::migrate::{MigrateError, Migration, Migrator};
        let read;
        let given: &Migrator = match &self.source {
            Source::Migrator(crate::config::MigratorRef::Sqlx0_8(m)) => m,
            Source::Dir(dir) => {
                let mut m = Migrator::new(dir.as_path())
                    .await
                    .map_err(|e| unreadable(dir, &e))?;
                // pgfixture holds its own lock on what it builds.
                m.set_locking(false);
                read = m;
                &read
            }
            #[cfg(feature = "sqlx")]
            Source::Migrator(crate::config::MigratorRef::Sqlx(_)) => {
                unreachable!("sqlx 0.9's migrator runs through sqlx 0.9")
            }
        };
        // Schema mode: as for sqlx 0.9, under the files' checksums.
        let schema_owned;
        let migrator = if self.blanked.is_empty() {
            given
        } else {
            let migrations = given
                .iter()
                .map(
                    |m| match self.blanked_sql(m.version, m.migration_type.is_down_migration()) {
                        Some(sql) => Migration {
                            sql: sql.to_owned().into(),
                            ..m.clone()
                        },
                        None => m.clone(),
                    },
                )
                .collect();
            schema_owned = Migrator {
                migrations,
                ignore_missing: given.ignore_missing,
                locking: false,
                no_tx: given.no_tx,
            };
            &schema_owned
        };
        let settings = crate::settings::Settings::new(server, dbname, schema, None);
        let options = crate::driver::sqlx_0_8::own_connect_options(&settings);
        let mut conn = ::sqlx08::PgConnection::connect_with(&options)
            .await
            .map_err(Error::sqlx_0_8(format!(
                "connecting to {dbname} to run the migrations"
            )))?;
        let result = migrator.run_direct(&mut conn).await;
        let _ = conn.close().await;
        result.map_err(|e| match e {
            MigrateError::ExecuteMigration(source, version) => {
                self.located(version, error_parts_0_8(&source))
            }
            other => self.failed(&other),
        })
    }

    /// In schema mode, the text migration `version` runs in place of its own, its
    /// shared statements blanked ([`Migrations::for_schemas`]); never for a down one.
    #[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
    fn blanked_sql(&self, version: i64, down: bool) -> Option<&str> {
        self.blanked
            .iter()
            .find(|(v, _)| *v == version && !down)
            .map(|(_, sql)| sql.as_str())
    }

    /// sqlx's migrator failed outside a migration's own SQL.
    #[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
    fn failed(&self, error: &dyn std::fmt::Display) -> Error {
        Error::Migration {
            path: self.folder(),
            line: None,
            statement: None,
            message: format!("sqlx's migrator failed: {error}"),
        }
    }

    /// The error of migration `version`: its file, line, statement and the server's
    /// message (with the position in its SQL, when the server gave one).
    #[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
    fn located(&self, version: i64, (message, position): (String, Option<usize>)) -> Error {
        let file = self.files.iter().find(|f| {
            f.path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.split_once('_'))
                .is_some_and(|(v, _)| v.parse() == Ok(version))
                && !f.path.to_string_lossy().ends_with(".down.sql")
        });
        // A migrator given in code has no files, but holds each migration's SQL.
        let given = match &self.source {
            Source::Migrator(m) if file.is_none() => m
                .migrations()
                .into_iter()
                .find(|m| m.version == version && !m.down)
                .map(|m| FixtureFile {
                    path: PathBuf::from(format!(
                        "{} ({}) of the sqlx migrator given in code",
                        m.version, m.description
                    )),
                    sql: m.sql.to_owned(),
                }),
            _ => None,
        };
        match file.or(given.as_ref()) {
            Some(file) => {
                let (line, statement) = match position {
                    Some(_) => crate::fixtures::locate(&file.sql, position, 0),
                    None => (None, None),
                };
                Error::Migration {
                    path: file.path.clone(),
                    line,
                    statement,
                    message,
                }
            }
            None => Error::Migration {
                path: self.folder().join(format!("{version}_*")),
                line: None,
                statement: None,
                message,
            },
        }
    }

    /// The folder, or what stands for a migrator given in code.
    #[cfg_attr(not(any(feature = "sqlx", feature = "sqlx-0_8")), allow(dead_code))]
    pub(crate) fn folder(&self) -> PathBuf {
        match &self.source {
            Source::Dir(dir) => dir.clone(),
            #[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
            Source::Migrator(_) => PathBuf::from("<the sqlx migrator given in code>"),
        }
    }
}

/// sqlx's migrator could not read the folder `dir`.
#[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
fn unreadable(dir: &Path, error: &dyn std::fmt::Display) -> Error {
    Error::Migration {
        path: dir.to_owned(),
        line: None,
        statement: None,
        message: format!("sqlx's migrator cannot read the folder: {error}"),
    }
}

/// The server's message of a sqlx error (with its detail and hint) and the position
/// in the statement it gave; of sqlx 0.9 and, with `sqlx-0_8`, of sqlx 0.8.
#[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
macro_rules! error_parts {
    ($name:ident, $sqlx:ident) => {
        fn $name(error: &::$sqlx::Error) -> (String, Option<usize>) {
            use ::$sqlx::postgres::{PgDatabaseError, PgErrorPosition};
            let ::$sqlx::Error::Database(db) = error else {
                return (error.to_string(), None);
            };
            let Some(pg) = db.try_downcast_ref::<PgDatabaseError>() else {
                return (db.message().to_owned(), None);
            };
            let mut message = pg.message().to_owned();
            if let Some(detail) = pg.detail() {
                message.push_str(&format!(" (detail: {detail})"));
            }
            if let Some(hint) = pg.hint() {
                message.push_str(&format!(" (hint: {hint})"));
            }
            let position = match pg.position() {
                Some(PgErrorPosition::Original(p)) => Some(p),
                _ => None,
            };
            (message, position)
        }
    };
}
#[cfg(feature = "sqlx")]
error_parts!(error_parts, sqlx);
#[cfg(feature = "sqlx-0_8")]
error_parts!(error_parts_0_8, sqlx08);

/// A fixture error of a plain migration file, as the migration error it is.
fn as_migration_error(error: Error) -> Error {
    match error {
        Error::Fixture {
            path,
            line,
            statement,
            message,
        } => Error::Migration {
            path,
            line,
            statement,
            message,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(names: &[&str]) -> Vec<Entry> {
        names
            .iter()
            .map(|n| Entry {
                name: n.trim_end_matches('/').to_owned(),
                diesel_dir: n.ends_with('/'),
            })
            .collect()
    }

    #[test]
    fn the_sqlx_toml_settings_are_part_of_the_key() {
        let key = |toml: Option<SqlxToml>| {
            let mut digest = Sha256::new();
            Migrations {
                source: Source::Dir(PathBuf::from("migrations")),
                layout: Layout::Sqlx,
                files: Vec::new(),
                blanked: Vec::new(),
                sqlx_toml: toml,
            }
            .hash_into(&mut digest);
            digest.finalize()
        };
        let table = SqlxToml {
            table_name: Some("meta.migrations".into()),
            ..SqlxToml::default()
        };
        let ignored = SqlxToml {
            ignored_chars: vec!['\r'],
            ..SqlxToml::default()
        };
        assert_ne!(key(None), key(Some(table.clone())));
        assert_ne!(key(Some(table)), key(Some(ignored.clone())));
        assert_eq!(key(Some(ignored.clone())), key(Some(ignored)));
    }

    /// The content hash (the templates' key) of fixed migrations of every kind, pinned.
    /// Processes record the key under the files' metadata (`crate::fingerprint`); if
    /// the key of unchanged files changes, a later build takes the old key from the
    /// record, and stops with "the fixtures or migrations changed while the tests ran"
    /// when it must build from the files. So a change of what the key covers, or how,
    /// comes with a new record format (`FORMAT` in fingerprint.rs), and new values here.
    #[test]
    fn the_key_is_pinned() {
        let file = |name: &str, sql: &str| FixtureFile {
            path: PathBuf::from(name),
            sql: sql.to_owned(),
        };
        let key = |migrations: Option<Migrations>| {
            crate::fixtures::FixtureSet::with_migrations(
                migrations,
                vec![file("fixtures/users.sql", "INSERT INTO users VALUES (1)")],
            )
            .hash(16)
            .to_owned()
        };
        let folder = |layout: Layout, sqlx_toml: Option<SqlxToml>| Migrations {
            source: Source::Dir(PathBuf::from("migrations")),
            layout,
            files: vec![file(
                "migrations/1_users.sql",
                "CREATE TABLE users (id int)",
            )],
            blanked: Vec::new(),
            sqlx_toml,
        };
        let toml = SqlxToml {
            table_name: Some("meta.migrations".into()),
            ignored_chars: vec!['\r'],
            ..SqlxToml::default()
        };
        let mut keys = vec![
            key(None),
            key(Some(folder(Layout::Plain, None))),
            key(Some(folder(Layout::Sqlx, None))),
            key(Some(folder(Layout::Sqlx, Some(toml)))),
        ];
        let mut pinned = vec![
            "edeec3a25c60efe7",
            "9b58ec21b6c210d8",
            "db524b0687ab39c5",
            "e0aadb80986391eb",
        ];
        #[cfg(feature = "sqlx")]
        {
            use ::sqlx::migrate::{Migration, MigrationType, Migrator};
            let migrator: &'static Migrator = Box::leak(Box::new(Migrator {
                migrations: vec![Migration::new(
                    1,
                    "users".into(),
                    MigrationType::Simple,
                    ::sqlx::SqlSafeStr::into_sql_str("CREATE TABLE users (id int)"),
                    false,
                )]
                .into(),
                ..Migrator::DEFAULT
            }));
            keys.push(key(Some(Migrations::from_migrator(
                crate::config::MigratorRef::Sqlx(migrator),
            ))));
            pinned.push("24b4b8c32362de03");
        }
        assert_eq!(keys, pinned);
    }

    #[test]
    fn layouts_are_recognised() {
        let l = |names: &[&str]| layout(&entries(names));
        assert_eq!(l(&[]), Ok(None));
        assert_eq!(l(&["README.md", ".keep"]), Ok(None));
        assert_eq!(l(&["schema.sql", "seed_data.sql"]), Ok(Some(Layout::Plain)));
        assert_eq!(
            l(&[
                "1_init.sql",
                "2_users.up.sql",
                "2_users.down.sql",
                "README.md"
            ]),
            Ok(Some(Layout::Sqlx))
        );
        assert_eq!(
            l(&["20240101000000_init.sql", "20240102000000_more.sql"]),
            Ok(Some(Layout::Sqlx))
        );
        assert_eq!(
            l(&["2024-01-01-000000_init/", "2024-01-02-000000_more/"]),
            Ok(Some(Layout::Diesel))
        );
        assert_eq!(
            l(&["V1__init.sql", "V2__more.sql"]),
            Ok(Some(Layout::Refinery))
        );
    }

    #[test]
    fn bad_folders_name_their_files() {
        let l = |names: &[&str]| layout(&entries(names)).unwrap_err();
        let mixed = l(&["1_init.sql", "schema.sql"]);
        assert!(
            mixed.contains("mixes layouts")
                && mixed.contains("schema.sql")
                && mixed.contains("1_init.sql"),
            "{mixed}"
        );
        let mixed = l(&["1_init.sql", "V2__more.sql"]);
        assert!(
            mixed.contains("refinery") && mixed.contains("V2__more.sql"),
            "{mixed}"
        );
        let twice = l(&["1_a.sql", "1_b.sql", "2_c.sql"]);
        assert!(twice.contains("1_a.sql and 1_b.sql (version 1)"), "{twice}");
        let twice = l(&["1_a.sql", "1_a.up.sql"]);
        assert!(twice.contains("1_a.sql and 1_a.up.sql"), "{twice}");
        let big = l(&["99999999999999999999_init.sql", "1_a.sql"]);
        assert!(
            big.contains("99999999999999999999_init.sql") && big.contains("number"),
            "{big}"
        );
        // A version that is not a number is a file of another layout here.
        let word = l(&["1_init.sql", "v2_more.sql"]);
        assert!(word.contains("v2_more.sql"), "{word}");
    }

    #[test]
    fn up_and_down_of_one_version_are_one_migration() {
        assert_eq!(
            layout(&entries(&[
                "1_a.up.sql",
                "1_a.down.sql",
                "10_b.sql",
                "2_c.sql"
            ])),
            Ok(Some(Layout::Sqlx))
        );
    }

    #[test]
    fn layouts_pgfixture_cannot_run_say_what_to_do() {
        let sqlx = refusal(Layout::Sqlx, false).unwrap();
        assert!(sqlx.contains("`sqlx` feature"), "{sqlx}");
        assert!(
            sqlx.contains("`sqlx-0_8` for a crate on sqlx 0.8"),
            "{sqlx}"
        );
        assert_eq!(refusal(Layout::Sqlx, true), None);
        assert_eq!(refusal(Layout::Plain, false), None);
        for layout in [Layout::Diesel, Layout::Refinery] {
            let refused = refusal(layout, true).unwrap();
            assert!(refused.contains("cannot run yet"), "{refused}");
        }
    }

    #[test]
    fn sqlx_folders_load_in_version_order() {
        let dir = std::env::temp_dir().join(format!("pgfx-migrations-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, sql) in [
            ("10_c.sql", "SELECT 10"),
            ("2_b.sql", "SELECT 2"),
            ("1_a.sql", "SELECT 1"),
        ] {
            std::fs::write(dir.join(name), sql).unwrap();
        }
        let loaded = Migrations::load(&dir, None);
        std::fs::remove_dir_all(&dir).unwrap();
        if cfg!(any(feature = "sqlx", feature = "sqlx-0_8")) {
            let m = loaded.unwrap().unwrap();
            let names: Vec<_> = m
                .files
                .iter()
                .map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names, ["1_a.sql", "2_b.sql", "10_c.sql"]);
        } else {
            assert!(loaded.is_err());
        }
    }
}
