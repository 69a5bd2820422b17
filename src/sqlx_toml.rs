//! The `[migrate]` section of a crate's `sqlx.toml` (sqlx 0.9), read through sqlx's own
//! loader: where `#[sqlx::test]` and `sqlx::migrate!()` find the migrations
//! (`migrations-dir`), and how sqlx's migrator records them (`table-name`,
//! `create-schemas`, `ignored-chars`), so that a template's bookkeeping table is what
//! the application's own `sqlx::migrate!()` expects.
//!
//! sqlx parses the file only with its `sqlx-toml` feature, which sqlx's macros need as
//! soon as the file exists; pgfixture does not turn it on (it would add a TOML parser to
//! every build), and says so when the file is there and cannot be read.

use std::path::{Path, PathBuf};

#[cfg_attr(not(feature = "sqlx"), allow(unused_imports))]
use crate::{Error, Result};

/// What pgfixture takes from a crate's `sqlx.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct SqlxToml {
    /// The file, for errors.
    pub(crate) path: PathBuf,
    /// `migrations-dir`, relative to the crate's directory.
    pub(crate) migrations_dir: Option<String>,
    /// `table-name`: sqlx's bookkeeping table, perhaps schema-qualified.
    pub(crate) table_name: Option<String>,
    /// `create-schemas`, made before the bookkeeping table.
    pub(crate) create_schemas: Vec<String>,
    /// `ignored-chars`, left out of the migrations' checksums.
    pub(crate) ignored_chars: Vec<char>,
}

impl SqlxToml {
    /// `<crate_dir>/sqlx.toml`, read once per process; `None` without the file (or
    /// without pgfixture's `sqlx` feature, whose migrator alone uses it).
    ///
    /// # Errors
    ///
    /// [`Error::Migration`] naming the file when it cannot be read or parsed, or when
    /// sqlx's `sqlx-toml` feature is off.
    pub(crate) fn read(crate_dir: &Path) -> Result<Option<SqlxToml>> {
        #[cfg(feature = "sqlx")]
        {
            use std::collections::HashMap;
            use std::sync::{Mutex, OnceLock};
            type Read = std::result::Result<Option<SqlxToml>, String>;
            // Every fixture of a test reads the environment, and the attribute builds
            // one per test: the file is parsed once.
            static READ: OnceLock<Mutex<HashMap<PathBuf, Read>>> = OnceLock::new();
            let path = crate_dir.join("sqlx.toml");
            let mut read = READ
                .get_or_init(Default::default)
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let found = read
                .entry(path.clone())
                .or_insert_with(|| parse(&path))
                .clone();
            found.map_err(|message| Error::Migration {
                path,
                line: None,
                statement: None,
                message,
            })
        }
        #[cfg(not(feature = "sqlx"))]
        {
            let _ = crate_dir;
            Ok(None)
        }
    }

    /// What of these settings changes what sqlx's migrator records, as one line: part
    /// of a template's key and of a nextest run's fingerprint record.
    pub(crate) fn key(&self) -> String {
        format!(
            "sqlx.toml {:?} {:?} {:?}",
            self.table_name, self.create_schemas, self.ignored_chars
        )
    }

    /// The migrations folder the crate's `sqlx.toml` names, or sqlx's default.
    pub(crate) fn migrations_dir(this: Option<&SqlxToml>) -> &str {
        this.and_then(|t| t.migrations_dir.as_deref())
            .unwrap_or("migrations")
    }

    /// What schema mode cannot give each worker: a bookkeeping table in a schema of
    /// its own (`table-name = "schema.table"`), or schemas to create. `None` when
    /// every worker schema can hold its own.
    pub(crate) fn shared_schemas(
        table_name: &str,
        create_schemas: &[impl AsRef<str>],
    ) -> Option<String> {
        if table_name.contains('.') {
            return Some(format!(
                "table-name = {table_name:?} (a schema every worker shares)"
            ));
        }
        create_schemas
            .first()
            .map(|schema| format!("create-schemas = [{:?}, ...]", schema.as_ref()))
    }
}

/// The file's `[migrate]` section; the message of what is wrong with it.
#[cfg(feature = "sqlx")]
fn parse(path: &Path) -> std::result::Result<Option<SqlxToml>, String> {
    use sqlx_core::config::{Config, ConfigError};
    match Config::try_from_path(path.to_owned()) {
        Ok(config) => {
            let migrate = config.migrate;
            Ok(Some(SqlxToml {
                path: path.to_owned(),
                migrations_dir: migrate.migrations_dir.map(String::from),
                table_name: migrate.table_name.map(String::from),
                create_schemas: migrate
                    .create_schemas
                    .into_iter()
                    .map(String::from)
                    .collect(),
                ignored_chars: migrate.ignored_chars.into_iter().collect(),
            }))
        }
        Err(ConfigError::NotFound { .. }) => Ok(None),
        Err(error) => Err(message(&error)),
    }
}

/// What to do about a `sqlx.toml` sqlx could not read.
#[cfg(feature = "sqlx")]
fn message(error: &sqlx_core::config::ConfigError) -> String {
    use sqlx_core::config::ConfigError;
    match error {
        ConfigError::ParseDisabled { .. } => "sqlx reads this file only with its `sqlx-toml` feature, which its macros need too: enable it (sqlx = { version = \"0.9\", features = [\"sqlx-toml\", ...] }), or remove the file".to_owned(),
        other => crate::error::with_causes(other),
    }
}

#[cfg(all(test, feature = "sqlx"))]
mod tests {
    use super::*;

    fn dir_with(name: &str, toml: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("pgfixture-sqlx-toml-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("sqlx.toml"), toml).unwrap();
        dir
    }

    #[test]
    fn the_migrate_section_is_read_through_sqlx() {
        let dir = dir_with(
            "read",
            "[migrate]\nmigrations-dir = \"db/migrations\"\ntable-name = \"meta.migrations\"\ncreate-schemas = [\"meta\"]\nignored-chars = [\"\\r\"]\n",
        );
        let read = SqlxToml::read(&dir).unwrap().unwrap();
        assert_eq!(read.migrations_dir.as_deref(), Some("db/migrations"));
        assert_eq!(read.table_name.as_deref(), Some("meta.migrations"));
        assert_eq!(read.create_schemas, ["meta"]);
        assert_eq!(read.ignored_chars, ['\r']);
        assert_eq!(SqlxToml::migrations_dir(Some(&read)), "db/migrations");
        assert_eq!(SqlxToml::migrations_dir(None), "migrations");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn no_file_is_no_settings_and_a_bad_one_names_the_file() {
        let none =
            std::env::temp_dir().join(format!("pgfixture-sqlx-toml-none-{}", std::process::id()));
        std::fs::create_dir_all(&none).unwrap();
        assert_eq!(SqlxToml::read(&none).unwrap(), None);
        let dir = dir_with("bad", "[migrate]\ntable-nam = \"x\"\n");
        let error = SqlxToml::read(&dir).unwrap_err().to_string();
        assert!(error.contains("sqlx.toml"), "{error}");
        assert!(error.contains("table-nam"), "{error}");
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(none);
    }

    #[test]
    fn without_sqlx_toml_feature_the_message_says_which_feature() {
        let error = sqlx_core::config::ConfigError::ParseDisabled {
            path: PathBuf::from("/x/sqlx.toml"),
        };
        assert!(message(&error).contains("`sqlx-toml` feature"));
    }

    #[test]
    fn schema_mode_refuses_shared_bookkeeping() {
        let none: [&str; 0] = [];
        assert_eq!(SqlxToml::shared_schemas("_sqlx_migrations", &none), None);
        assert!(SqlxToml::shared_schemas("meta.migrations", &none).is_some());
        assert!(SqlxToml::shared_schemas("_sqlx_migrations", &["meta"]).is_some());
    }
}
