//! The one error type of the crate.

use std::path::PathBuf;
use std::time::Duration;

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while providing a test database.
///
/// Every message says what to change: the environment variable, the fixture file, or
/// the command to run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An environment variable (or the matching builder value) holds an invalid value.
    #[error("{var} {expected}, got {value:?}")]
    Config {
        /// The variable to change, e.g. `PGFIXTURE_POOL_SIZE`.
        var: &'static str,
        /// The rejected value.
        value: String,
        /// What a valid value looks like.
        expected: String,
    },

    /// The fixtures directory cannot be read.
    #[error(
        "cannot read fixtures directory {}: {source} (set PGFIXTURE_FIXTURES to a readable directory of *.sql files)",
        path.display()
    )]
    FixturesDir {
        /// The directory.
        path: PathBuf,
        /// Why it cannot be read.
        source: std::io::Error,
    },

    /// A fixture file cannot be read or is not UTF-8.
    #[error("cannot read fixture {}: {reason}", path.display())]
    FixtureRead {
        /// The file to fix.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },

    /// The server rejected a statement of a fixture file, or pgfixture refused one.
    #[error(
        "fixture {}{} failed: {message}{}",
        path.display(),
        line.map(|l| format!(" (line {l})")).unwrap_or_default(),
        statement.as_ref().map(|s| format!("; the statement: {s}")).unwrap_or_default()
    )]
    Fixture {
        /// The file to fix.
        path: PathBuf,
        /// The line the server pointed at, else the line where the failing statement
        /// starts.
        line: Option<usize>,
        /// The failing statement, shortened to one line.
        statement: Option<String>,
        /// The server's message.
        message: String,
    },

    /// Neither Docker nor local PostgreSQL binaries can be used.
    #[error(
        "no PostgreSQL backend is available:\n  docker: {docker}\n  local: {local}\nfix one of: start a Docker daemon (or point DOCKER_HOST at one); \
         install PostgreSQL server binaries (Debian: apt-get install postgresql) or set PGFIXTURE_PG_BIN to their directory; \
         or set PGFIXTURE_BACKEND to the backend you have (a server of yours: PGFIXTURE_BACKEND=url and PGFIXTURE_URL, \
         for example the DATABASE_URL that #[sqlx::test] used)"
    )]
    NoBackend {
        /// Why Docker cannot be used.
        docker: String,
        /// Why local binaries cannot be used.
        local: String,
    },

    /// Docker was required (`PGFIXTURE_REQUIRE_DOCKER=1` or `PGFIXTURE_BACKEND=docker`) but fails.
    #[error("docker: {message}")]
    Docker {
        /// What failed and what to do about it.
        message: String,
    },

    /// The container image is missing and cannot be pulled.
    #[error(
        "image {image:?} is not available: {message} (build it with docker/build-offline-image.sh, pull it, or set PGFIXTURE_IMAGE to an image you have)"
    )]
    Image {
        /// The image reference.
        image: String,
        /// The daemon's message.
        message: String,
    },

    /// Starting a server from local PostgreSQL binaries failed.
    #[error("local PostgreSQL: {message}")]
    Local {
        /// What failed, with the server's output when there is some.
        message: String,
    },

    /// Waiting for a free worker or for a server to start took longer than allowed.
    #[error(
        "timed out after {timeout:?} waiting for {waiting_for} (raise PGFIXTURE_ACQUIRE_TIMEOUT, or lower PGFIXTURE_WORKERS)"
    )]
    AcquireTimeout {
        /// The limit that was reached.
        timeout: Duration,
        /// What was being waited for.
        waiting_for: String,
    },

    /// A statement pgfixture runs failed.
    #[error("{context}: {}", pg_message(source))]
    Postgres {
        /// What pgfixture was doing.
        context: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// A statement or connection of the sqlx driver failed.
    #[cfg(feature = "sqlx")]
    #[error("{context}: {source}")]
    Sqlx {
        /// What pgfixture was doing.
        context: String,
        /// sqlx's error.
        #[source]
        source: ::sqlx::Error,
    },

    /// A statement or connection of sqlx 0.8 failed, for `#[sqlx::test]`'s types of a
    /// crate on sqlx 0.8 (feature `sqlx-0_8`).
    #[cfg(feature = "sqlx-0_8")]
    #[error("{context}: {source}")]
    Sqlx0_8 {
        /// What pgfixture was doing.
        context: String,
        /// sqlx 0.8's error.
        #[source]
        source: ::sqlx08::Error,
    },

    /// A migration failed, or the migrations folder cannot be used as it is.
    #[error("migration {}{}{}: {message}", path.display(), line.map(|l| format!(", line {l}")).unwrap_or_default(), statement.as_ref().map(|s| format!(", in `{s}`")).unwrap_or_default())]
    Migration {
        /// The migration file (or folder) to fix.
        path: PathBuf,
        /// The line of the failing statement, when the server said where.
        line: Option<usize>,
        /// The failing statement's beginning.
        statement: Option<String>,
        /// What is wrong: the server's message, or the rule the folder breaks.
        message: String,
    },

    /// The setup code given to [`crate::FixtureBuilder::setup`] failed (or panicked)
    /// while building a template or worker schema, which was dropped again.
    #[error("the fixture's setup code (version {version:?}) failed: {message}")]
    Setup {
        /// The version it was given.
        version: String,
        /// Its error, with the errors that caused it, or what it panicked with.
        message: String,
    },

    /// The worker's connection pool could not give a connection.
    #[error(
        "worker {worker}: no pooled connection: {source} (raise PGFIXTURE_POOL_SIZE or PGFIXTURE_ACQUIRE_TIMEOUT)"
    )]
    Pool {
        /// The worker whose pool failed.
        worker: String,
        /// The pool's error.
        #[source]
        source: deadpool_postgres::PoolError,
    },

    /// pgfixture was about to use or drop an object it did not create.
    #[error(
        "refusing to use or drop {object}: it does not carry pgfixture's mark, so pgfixture did not create it (rename or drop it yourself, or point PGFIXTURE_URL at another server)"
    )]
    NotOurs {
        /// The database or schema, by name.
        object: String,
    },

    /// The server refused a connection because it has no free connection slot.
    #[error(
        "the server is out of connections: {message} (lower PGFIXTURE_POOL_SIZE, or PGFIXTURE_WORKERS / nextest's -j, or raise the server's max_connections)"
    )]
    OutOfConnections {
        /// What pgfixture was doing and the server's message.
        message: String,
    },

    /// A file-system operation of pgfixture's own failed.
    #[error("{context}: {source}")]
    Io {
        /// What pgfixture was doing.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The server's own message for database errors (the driver's `Display` says only
/// "db error"), the driver's otherwise.
fn pg_message(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        // "error connecting to server" alone hides the reason (refused, timed out).
        None => with_causes(error),
    }
}

/// An error's message followed by its causes', each after a colon.
pub(crate) fn with_causes(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    message
}

/// Lets tests that return `pgfixture::Result` use `?` on the client's calls.
impl From<tokio_postgres::Error> for Error {
    fn from(source: tokio_postgres::Error) -> Self {
        Error::Postgres {
            context: "statement failed".to_owned(),
            source,
        }
    }
}

impl Error {
    pub(crate) fn config(
        var: &'static str,
        value: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        Error::Config {
            var,
            value: value.into(),
            expected: expected.into(),
        }
    }

    pub(crate) fn pg(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Self {
        let context = context.into();
        move |source| Error::Postgres { context, source }
    }

    #[cfg(feature = "sqlx")]
    pub(crate) fn sqlx(context: impl Into<String>) -> impl FnOnce(::sqlx::Error) -> Self {
        let context = context.into();
        move |source| Error::Sqlx { context, source }
    }

    #[cfg(feature = "sqlx-0_8")]
    pub(crate) fn sqlx_0_8(context: impl Into<String>) -> impl FnOnce(::sqlx08::Error) -> Self {
        let context = context.into();
        move |source| Error::Sqlx0_8 { context, source }
    }

    /// The driver's error inside, if any.
    pub(crate) fn postgres(&self) -> Option<&tokio_postgres::Error> {
        match self {
            Error::Pool {
                source: deadpool_postgres::PoolError::Backend(pg),
                ..
            } => Some(pg),
            Error::Postgres { source, .. } => Some(source),
            _ => None,
        }
    }

    /// "Too many connections" from the server becomes [`Error::OutOfConnections`],
    /// which says what to lower.
    pub(crate) fn with_connection_advice(self) -> Self {
        use tokio_postgres::error::SqlState;
        let full = self
            .postgres()
            .is_some_and(|pg| pg.code() == Some(&SqlState::TOO_MANY_CONNECTIONS));
        #[cfg(feature = "sqlx")]
        let full = full
            || matches!(&self, Error::Sqlx { source: ::sqlx::Error::Database(db), .. }
                if db.code().as_deref() == Some(SqlState::TOO_MANY_CONNECTIONS.code()));
        #[cfg(feature = "sqlx-0_8")]
        let full = full
            || matches!(&self, Error::Sqlx0_8 { source: ::sqlx08::Error::Database(db), .. }
                if db.code().as_deref() == Some(SqlState::TOO_MANY_CONNECTIONS.code()));
        if full {
            let message = match &self {
                Error::Postgres { context, source } => format!("{context}: {}", pg_message(source)),
                Error::Pool { worker, source } => format!("worker {worker}: {source}"),
                other => other.to_string(),
            };
            Error::OutOfConnections { message }
        } else {
            self
        }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
