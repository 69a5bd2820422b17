//! Database mode (and container mode, the same on a server of the worker's own): a
//! database per worker, cloned from a template database that holds the fixtures, and
//! replaced by a fresh clone (a spare made beforehand, where there is one) on reset.

use super::{Prepare, Prepared};
use crate::provision::{self, State, Target};
use crate::{Error, Result};

/// Where the worker database `name`'s marks go; `shared_server`: on a server of the
/// user's (`PGFIXTURE_URL`).
pub(crate) fn target(name: &str, shared_server: bool) -> Target<'_> {
    Target::Database(name, shared_server)
}

/// Finds, clones or resets the worker database.
pub(crate) async fn prepare(p: &Prepare<'_>) -> Result<Prepared> {
    let (admin, name) = (p.admin, p.name);
    let state = provision::database_state(admin, name).await?;
    if state == State::Foreign {
        return Err(Error::NotOurs {
            object: format!("database {name} on {}", p.server.name),
        });
    }
    if p.shared_server && state == State::Missing {
        provision::sweep(admin, p.run_id, p.grace).await?;
    }
    let mut prepared = Prepared {
        dbname: name.to_owned(),
        search_path: None,
        state,
        template_built: false,
        spare_used: false,
        refill_from: None,
        refill_schema: false,
    };
    if p.reset || state != State::Clean {
        let (template, built) =
            provision::template(p.server, admin, p.fixtures, p.shared_server).await?;
        prepared.template_built = built;
        // Spares only on pgfixture's own servers: on a shared one an unmarked database
        // could outlive a killed run.
        let spares = !p.shared_server;
        let made = if state == State::Missing {
            provision::clone_database(p.server, admin, &template, name, p.mark, p.shared_server)
                .await
                .map(|_| false)
        } else {
            provision::reset_database(p.server, admin, &template, name, p.mark, p.reset, spares)
                .await
        };
        prepared.spare_used = match made {
            // On a server of the user's, a sweep of another run dropped the template,
            // unused for long, as it was about to be cloned: built again, and the
            // worker (missing, or dropped by the reset) cloned from it.
            Err(e) if p.shared_server && provision::template_gone(&e) => {
                let (template, built) =
                    provision::template(p.server, admin, p.fixtures, true).await?;
                prepared.template_built |= built;
                provision::clone_database(p.server, admin, &template, name, p.mark, true).await?;
                false
            }
            made => made?,
        };
        if spares && p.reset && state != State::Missing {
            prepared.refill_from = Some(template);
        }
    } else if !p.shared_server {
        // Clean by its comment, yet the setting the next process checks did not say
        // so: a worker marked by a pgfixture from before the setting, on a reused
        // server. Marked again, so that the next process finds it ready on its first
        // connection. (A worker is used by one process at a time, so the mark read is
        // current.)
        provision::mark_clean(admin, target(name, false), p.mark).await?;
    }
    Ok(prepared)
}
