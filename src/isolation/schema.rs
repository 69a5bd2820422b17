//! Schema mode: a schema per worker in one shared database, the fixtures applied in
//! each (their statements on extensions and roles once per database), rebuilt on
//! reset.

use super::{Prepare, Prepared};
use crate::provision::{self, State, Target};
use crate::{Error, Result};

/// The database of the worker schemas on servers pgfixture starts.
pub(crate) const SCHEMA_DATABASE: &str = "pgfx_schemas";

/// The database that holds the worker schemas on `server`: [`SCHEMA_DATABASE`] on a
/// server pgfixture starts; on a server of the user's (`shared_server`), the database
/// `PGFIXTURE_URL` names.
pub(crate) fn database(server: &crate::server::Server, shared_server: bool) -> &str {
    if shared_server {
        server.admin_db.as_str()
    } else {
        SCHEMA_DATABASE
    }
}

/// Where the worker schema `name`'s marks go: its comment, and on pgfixture's own
/// servers a setting of `dbname`, the database that holds it.
pub(crate) fn target<'a>(name: &'a str, dbname: &'a str, shared_server: bool) -> Target<'a> {
    Target::Schema(name, (!shared_server).then_some(dbname))
}

/// Finds, builds or rebuilds the worker schema.
pub(crate) async fn prepare(p: &Prepare<'_>) -> Result<Prepared> {
    let name = p.name;
    // A server of pgfixture's own gets a database for the schemas; on an existing
    // server they go into the database PGFIXTURE_URL names.
    let dbname = database(p.server, p.shared_server);
    if !p.shared_server {
        provision::schema_database(p.admin, dbname).await?;
    }
    let client = p
        .schemas
        .expect("schema mode has a pool for the schemas' database")
        .get()
        .await
        .map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => {
                Error::pg(format!("connecting to {dbname}"))(e)
            }
            e => Error::Pool {
                worker: "maintenance".to_owned(),
                source: e,
            },
        })?;
    let state = provision::schema_state(&client, name).await?;
    if state == State::Foreign {
        return Err(Error::NotOurs {
            object: format!("schema {name} in {dbname} on {}", p.server.name),
        });
    }
    if p.shared_server && state == State::Missing {
        provision::sweep(&client, p.run_id, p.grace).await?;
    }
    // The schemas' settings live on pgfixture's own database only.
    let settings_on = (!p.shared_server).then_some(dbname);
    if state == State::Missing || p.reset || state == State::Dirty {
        provision::shared_statements(&client, p.shared_statements, p.fixtures.hash(16)).await?;
        if !p.shared_server {
            provision::ddl_log(&client).await?;
        }
    }
    let mut spare_used = false;
    // Spares only on pgfixture's own servers, as in database mode.
    let spares = !p.shared_server;
    if state == State::Missing {
        provision::schema(
            &client,
            (p.server, dbname),
            name,
            settings_on,
            p.fixtures,
            p.mark,
        )
        .await?;
    } else if p.reset || state == State::Dirty {
        spare_used = provision::reset_schema(
            &client,
            (p.server, dbname),
            name,
            settings_on,
            p.fixtures,
            p.mark,
            p.reset,
            spares,
        )
        .await?;
    } else if !p.shared_server {
        // Clean by its comment: marked again, as a database is.
        provision::mark_clean(&client, target(name, dbname, p.shared_server), p.mark).await?;
    }
    Ok(Prepared {
        dbname: dbname.to_owned(),
        search_path: Some(name.to_owned()),
        state,
        template_built: false,
        spare_used,
        refill_from: None,
        refill_schema: spares && p.reset,
    })
}
