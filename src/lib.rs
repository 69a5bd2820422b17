#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

mod attribute;
mod backend;
mod config;
mod digest;
mod driver;
mod error;
mod fingerprint;
mod fixture;
mod fixtures;
mod isolation;
mod migrations;
mod pool;
mod provision;
mod restore;
mod runs;
mod runtime;
mod server;
mod settings;
mod setup;
mod sql;
mod sqlx_toml;
mod stream;
mod worker;
mod worker_pool;

#[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
pub use config::SqlxMigrator;
pub use config::{Backend, Config, DEFAULT_IMAGE, DockerNetwork, Env, Isolation, OsEnv, ServerUrl};
pub use driver::tokio_postgres::{CancelToken, TestDb};
pub use error::{Error, Result};
pub use fixture::{Fixture, FixtureBuilder, Stats};
pub use settings::DatabaseUrl;
pub use worker::WorkerId;
pub use worker_pool::WorkerPool;

/// An async test on its worker's PostgreSQL; its one parameter, chosen by its type,
/// is its handle (or `#[sqlx::test]`'s two, pool and connect options). See the
/// README's "The attribute".
#[cfg(feature = "macros")]
pub use pgfixture_macros::test;

/// What `#[pgfixture::test]` expands to calls; not a public API.
#[doc(hidden)]
pub mod __macro {
    pub use crate::attribute::*;
}

#[cfg(feature = "docker")]
pub use bollard;
pub use deadpool_postgres;
pub use tokio_postgres;

/// The sqlx driver (feature `sqlx`): sqlx's own types for the test's connection and the
/// worker's pool. The module re-exports the sqlx crate pgfixture is built with, so that
/// `pgfixture::sqlx::PgPool` and the rest never mismatch your own.
#[cfg(feature = "sqlx")]
pub mod sqlx {
    pub use crate::driver::sqlx::{TestDb, WorkerPool, worker_db, worker_pool};
    #[doc(no_inline)]
    pub use ::sqlx::*;
}

use std::sync::OnceLock;

/// The fixture the environment describes, built on first use.
fn default_fixture() -> Result<&'static Fixture> {
    static DEFAULT: OnceLock<Fixture> = OnceLock::new();
    if let Some(f) = DEFAULT.get() {
        return Ok(f);
    }
    let fixture = Fixture::from_env()?;
    Ok(DEFAULT.get_or_init(|| fixture))
}

/// The calling test's connection: from the current worker's pool, inside an open
/// transaction that is rolled back when the handle drops.
///
/// Configured by the environment (see the README's table); [`Fixture::builder`] does
/// the same in code.
///
/// # Errors
///
/// [`Error::Config`] for an invalid environment value, and everything
/// [`Fixture::worker_db`] can return.
pub async fn worker_db() -> Result<TestDb> {
    default_fixture()?.worker_db().await
}

/// A connection pool on the calling test's worker database, for code that commits for
/// real; when the guard drops, the worker is reset if anything was changed through it.
/// See [`Fixture::worker_pool`].
///
/// # Errors
///
/// As [`worker_db`].
pub async fn worker_pool() -> Result<WorkerPool> {
    default_fixture()?.worker_pool().await
}

/// This process's or test's worker id: `PGFIXTURE_WORKER`, else nextest's slot, else the
/// in-process slot the calling thread holds. A thread that holds no slot yet (or an
/// invalid environment) gets the id `unassigned`.
pub fn worker_id() -> WorkerId {
    default_fixture()
        .ok()
        .and_then(Fixture::worker_id)
        .unwrap_or_else(WorkerId::unassigned)
}
