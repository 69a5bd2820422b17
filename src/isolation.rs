//! How each isolation mode prepares a worker: one implementation per mode, behind the
//! same few functions, called by [`crate::fixture`] for every mode alike.
//!
//! - [`database`]: a database per worker, cloned from a template that holds the
//!   fixtures; container mode is the same on a server of the worker's own.
//! - [`schema`]: a schema per worker in one shared database, the fixtures applied in
//!   each.

pub(crate) mod database;
pub(crate) mod schema;

use std::time::Duration;

use tokio_postgres::Client;

use crate::fixtures::{FixtureSet, SharedStatement};
use crate::provision::{State, Target};
use crate::server::Server;

/// What a mode needs to prepare (find, make or reset) one worker.
pub(crate) struct Prepare<'a> {
    pub(crate) server: &'a Server,
    /// A maintenance connection to `server`.
    pub(crate) admin: &'a Client,
    /// Schema mode: maintenance connections to the database of the worker schemas.
    pub(crate) schemas: Option<&'a deadpool_postgres::Pool>,
    /// The worker's database or schema.
    pub(crate) name: &'a str,
    /// The mark of this run's workers.
    pub(crate) mark: &'a str,
    /// Rebuild it from the fixtures whatever its state.
    pub(crate) reset: bool,
    /// An existing server of the user's (`PGFIXTURE_URL`), shared with other runs.
    pub(crate) shared_server: bool,
    pub(crate) run_id: &'a str,
    /// How long a run may be silent before its workers count as dead (sweeps).
    pub(crate) grace: Duration,
    pub(crate) fixtures: &'a FixtureSet,
    /// Schema mode: the fixtures' statements on extensions and roles.
    pub(crate) shared_statements: &'a [SharedStatement],
}

/// A worker a mode prepared.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// The database its connections go to.
    pub(crate) dbname: String,
    /// Schema mode: the worker's schema, first on the connections' `search_path`.
    pub(crate) search_path: Option<String>,
    /// What it was found as.
    pub(crate) state: State,
    /// This preparation built the template.
    pub(crate) template_built: bool,
    /// A spare clone took the worker's place.
    pub(crate) spare_used: bool,
    /// The template to make the worker's next spare from, after a reset.
    pub(crate) refill_from: Option<String>,
    /// Schema mode: the worker schema's next spare is to be made, after a reset.
    pub(crate) refill_schema: bool,
}

/// Where the marks of the worker `name` go, in `dbname`, in `isolation`'s mode.
pub(crate) fn target<'a>(
    isolation: crate::Isolation,
    name: &'a str,
    dbname: &'a str,
    shared_server: bool,
) -> Target<'a> {
    match isolation {
        crate::Isolation::Schema => schema::target(name, dbname, shared_server),
        _ => database::target(name, shared_server),
    }
}
