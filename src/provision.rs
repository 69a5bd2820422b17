//! Templates, worker databases and worker schemas on a server, built exactly once.
//!
//! Every step runs under a PostgreSQL advisory lock named after the object it builds,
//! so processes that start at the same moment wait for one builder instead of racing;
//! a lock of a process that dies is released by the server. Objects are built under a
//! temporary name and renamed when complete, so a half-applied template or schema is
//! never found under its real name.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::fixtures::FixtureSet;
use crate::restore;
use crate::server::Server;
use crate::{Error, Result};

/// PostgreSQL's identifier limit, in bytes.
pub(crate) const MAX_IDENT: usize = 63;

/// Quotes an identifier pgfixture built itself (checked to be short and plain).
pub(crate) fn ident(name: &str) -> String {
    debug_assert!(
        name.len() <= MAX_IDENT
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    );
    format!("\"{name}\"")
}

fn lock_key(name: &str) -> i64 {
    let digest = Sha256::digest(format!("pgfixture:{name}").as_bytes());
    i64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

pub(crate) async fn with_lock<T>(
    client: &Client,
    name: &str,
    work: impl AsyncFnOnce() -> Result<T>,
) -> Result<T> {
    let key = lock_key(name);
    let waiting = format!(
        "waiting for the lock on {name} (another test or process holds it while it builds or resets it)"
    );
    crate::runtime::noticed(
        &waiting,
        client.execute("SELECT pg_advisory_lock($1)", &[&key]),
    )
    .await
    .map_err(Error::pg(format!("locking {name}")))?;
    let result = work().await;
    // Closing the connection would release the lock too; unlock now to let waiters in.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&key])
        .await;
    result
}

pub(crate) async fn database_exists(client: &Client, name: &str) -> Result<bool> {
    Ok(database_state(client, name).await? != State::Missing)
}

/// Every object pgfixture creates carries a comment starting with this mark, and
/// pgfixture drops nothing that does not.
pub(crate) const MARK: &str = "pgfixture";
/// Appended to a worker's mark while code that commits for real uses it
/// (`worker_pool`): whoever finds the mark resets the worker before using it.
pub(crate) const DIRTY: &str = " dirty";

/// Whether a worker database or schema exists, and whether it needs a reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Missing,
    Clean,
    Dirty,
    /// It exists without pgfixture's mark: someone else's, never used or dropped.
    Foreign,
}

impl State {
    pub(crate) fn of(comment: Option<String>) -> State {
        match comment {
            None => State::Missing,
            Some(c) if !c.starts_with(MARK) => State::Foreign,
            Some(c) if c.ends_with(DIRTY) => State::Dirty,
            Some(_) => State::Clean,
        }
    }
}

/// The mark (comment) of the database `name`: `None` when it does not exist.
async fn database_comment(client: &Client, name: &str) -> Result<Option<String>> {
    let row = client
        .query_opt(
            "SELECT coalesce(shobj_description(oid, 'pg_database'), '') FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await
        .map_err(Error::pg(format!("looking up database {name}")))?;
    Ok(row.map(|r| r.get(0)))
}

/// The mark (comment) of the schema `name` in the database `client` is connected to.
async fn schema_comment(client: &Client, name: &str) -> Result<Option<String>> {
    let row = client
        .query_opt(
            "SELECT coalesce(obj_description(oid, 'pg_namespace'), '') FROM pg_namespace WHERE nspname = $1",
            &[&name],
        )
        .await
        .map_err(Error::pg(format!("looking up schema {name}")))?;
    Ok(row.map(|r| r.get(0)))
}

/// The states of the databases `names`, in one round trip.
async fn database_states<const N: usize>(client: &Client, names: [&str; N]) -> Result<[State; N]> {
    let rows = client
        .query(
            "SELECT (SELECT coalesce(shobj_description(d.oid, 'pg_database'), '') \
                     FROM pg_database d WHERE d.datname = u.name) \
             FROM unnest($1::text[]) WITH ORDINALITY AS u(name, i) ORDER BY u.i",
            &[&names.as_slice()],
        )
        .await
        .map_err(Error::pg(format!(
            "looking up databases {}",
            names.join(", ")
        )))?;
    let mut states = [State::Missing; N];
    for (state, row) in states.iter_mut().zip(&rows) {
        *state = State::of(row.get(0));
    }
    Ok(states)
}

/// The state of the database `name`, from its mark.
pub(crate) async fn database_state(client: &Client, name: &str) -> Result<State> {
    Ok(State::of(database_comment(client, name).await?))
}

/// The state of the schema `name`, from its mark.
pub(crate) async fn schema_state(client: &Client, name: &str) -> Result<State> {
    Ok(State::of(schema_comment(client, name).await?))
}

/// The worker a mark goes on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target<'a> {
    /// A worker database, and whether it is on a server of the user's
    /// (`PGFIXTURE_URL`), where a user who is not a superuser may not write pgfixture's
    /// settings ([`settable`]).
    Database(&'a str, bool),
    /// A worker schema, and the database that holds it when pgfixture owns the server
    /// (`None` on a server of the user's, `PGFIXTURE_URL`, whose databases get no
    /// settings of pgfixture's).
    Schema(&'a str, Option<&'a str>),
}

impl Target<'_> {
    /// The setting that holds the worker's mark beside its comment: a new connection
    /// has it loaded when it starts, so the check on a nextest process's first
    /// connection reads it for nothing, where reading the comment costs a new backend
    /// 0.6–0.9 ms of catalog lookups. The comment stays the mark that decides what
    /// pgfixture may drop.
    pub(crate) fn setting(self) -> Option<String> {
        match self {
            Target::Database(..) => Some("pgfixture.mark".to_owned()),
            Target::Schema(name, Some(_)) => Some(format!("pgfixture.mark_{name}")),
            Target::Schema(_, None) => None,
        }
    }

    /// The statement that puts `value` in the setting, if the target has one.
    fn setting_sql(self, value: &str) -> Option<String> {
        let setting = self.setting()?;
        Some(match self {
            Target::Database(name, shared) => {
                let sql = format!("ALTER DATABASE {} SET {setting} = '{value}'", ident(name));
                settable(sql, shared)
            }
            // Every schema's setting is in the one row of the database's settings,
            // whose concurrent updates fail ("tuple concurrently updated"): one at a
            // time, under a lock held to the end of the transaction.
            Target::Schema(_, db) => format!(
                "SELECT pg_advisory_xact_lock({}); ALTER DATABASE {} SET {setting} = '{value}'",
                lock_key("schema marks"),
                ident(db.expect("a schema with a setting has its database"))
            ),
        })
    }
}

/// `statement`, an `ALTER DATABASE ... SET` of one of pgfixture's settings, as it runs
/// on a server of the user's (`shared`: `PGFIXTURE_URL`; as it is elsewhere):
/// PostgreSQL lets only a superuser (or a role granted `SET` on it) set a parameter it
/// does not know, and a user with `CREATEDB` alone goes without the setting. The comment stays the mark; a worker
/// whose sequences' state is not recorded keeps its sequences where a worker pool's
/// test left them, and `PGFIXTURE_RESET_SEQUENCES` is refused ([`sequences_recorded`]).
fn settable(statement: String, shared: bool) -> String {
    if !shared {
        return statement;
    }
    format!(
        "DO $pgfx$ BEGIN EXECUTE $s${statement}$s$; \
         EXCEPTION WHEN insufficient_privilege THEN NULL; END $pgfx$"
    )
}

/// The statements that mark a worker dirty, or clean again: its comment, and its
/// setting ([`Target::setting`]) in the same transaction.
pub(crate) fn mark_sql(target: Target<'_>, mark: &str, dirty: bool) -> String {
    let value = format!("{mark}{}", if dirty { DIRTY } else { "" });
    let comment = match target {
        Target::Database(name, _) => {
            format!("COMMENT ON DATABASE {} IS '{value}'", ident(name))
        }
        Target::Schema(name, _) => format!("COMMENT ON SCHEMA {} IS '{value}'", ident(name)),
    };
    match target.setting_sql(&value) {
        Some(setting) => format!("{comment}; {setting}"),
        None => comment,
    }
}

/// Marks the worker `target` clean, comment and setting.
pub(crate) async fn mark_clean(client: &Client, target: Target<'_>, mark: &str) -> Result<()> {
    ddl(client, &mark_sql(target, mark, false)).await
}

/// Refuses to go on unless `comment` (of the object `what`) carries pgfixture's mark.
fn check_mark(what: &str, comment: &str) -> Result<()> {
    if comment.starts_with(MARK) {
        Ok(())
    } else {
        Err(Error::NotOurs {
            object: what.to_owned(),
        })
    }
}

/// Drops the database `name` (closing its connections) if it exists and carries
/// pgfixture's mark; refuses to drop one that does not.
pub(crate) async fn drop_database(admin: &Client, name: &str) -> Result<()> {
    let Some(comment) = database_comment(admin, name).await? else {
        return Ok(());
    };
    check_mark(&format!("database {name}"), &comment)?;
    drop_derived(admin, name).await
}

/// Drops the database `name`, if it exists, without reading its mark: for names derived
/// from a worker's or a template's under its lock (`_new`, `_old`), which only
/// pgfixture makes, and for [`drop_database`] once it has read the mark.
async fn drop_derived(admin: &Client, name: &str) -> Result<()> {
    ddl(
        admin,
        &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", ident(name)),
    )
    .await
}

/// Drops the schema `name` and everything in it if it exists and carries pgfixture's
/// mark; refuses to drop one that does not.
pub(crate) async fn drop_schema(client: &Client, name: &str) -> Result<()> {
    let Some(comment) = schema_comment(client, name).await? else {
        return Ok(());
    };
    check_mark(&format!("schema {name}"), &comment)?;
    ddl(
        client,
        &format!("DROP SCHEMA IF EXISTS {} CASCADE", ident(name)),
    )
    .await
}

/// Runs DDL that fails while a just-closed connection's backend is still exiting
/// ("being accessed by other users"): retried for a moment.
async fn ddl(client: &Client, sql: &str) -> Result<()> {
    let mut tries = 0;
    loop {
        match client.batch_execute(sql).await {
            Ok(()) => return Ok(()),
            // A backend that was just closed or terminated exits within a
            // millisecond or two: tried again soon, then less often.
            Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) && tries < 200 => {
                tries += 1;
                let wait = if tries < 50 { 1 } else { 20 };
                crate::runtime::sleep(Duration::from_millis(wait)).await;
            }
            Err(e) => return Err(Error::pg(format!("running {sql}"))(e)),
        }
    }
}

/// The name of the template database of the fixtures whose content hash is `hash`, as
/// the role `user` builds it. Roles sharing a server (the url backend) build their own:
/// a role may not copy another's database, and the tables in it would not be its own.
pub(crate) fn template_name(hash: &str, user: &str) -> String {
    let key = crate::digest::sha256_hex(format!("{}:{user}", &hash[..16.min(hash.len())]), 8);
    format!("pgfx_t_{key}")
}

/// Builds the template database holding the fixtures, unless it exists. Returns its
/// name and whether this call built it. On a server of the user's (`shared`), a
/// template found records its use in its mark ([`note_use`]).
pub(crate) async fn template(
    server: &Server,
    admin: &Client,
    fixtures: &FixtureSet,
    shared: bool,
) -> Result<(String, bool)> {
    let name = template_name(fixtures.hash(16), &server.user);
    if let Some(comment) = database_comment(admin, &name).await? {
        if shared {
            note_use(admin, &name, &comment).await;
        }
        return Ok((name, false));
    }
    with_lock(admin, &name, async || {
        if database_exists(admin, &name).await? {
            return Ok((name.clone(), false));
        }
        let building = format!("{name}_new");
        drop_derived(admin, &building).await?;
        ddl(admin, &format!("CREATE DATABASE {}", ident(&building))).await?;
        let applied = async {
            let client = server
                .connect(&building)
                .await
                .map_err(Error::pg(format!("connecting to {building}")))?;
            let doing = format!(
                "building the template {name} (its migrations, fixtures and setup code)"
            );
            crate::runtime::noticed(&doing, fixtures.apply_all(&client, server, &building))
                .await?;
            let sequences = sequences(&client, "").await?;
            // Recorded for in-place restores; without a record, a worker is rebuilt.
            let recorded = async {
                restore::ensure_store(admin).await?;
                restore::record(&client, admin, &name, None).await
            };
            if let Err(error) = recorded.await {
                tracing::debug!(%error, template = %name, "recording the template's rows failed");
            }
            Ok(sequences)
        }
        .await;
        // The user's setup code may leave connections open (a pool dropped, not
        // closed, closes them later): a database in use can be neither renamed nor
        // cloned.
        let applied = match applied {
            Ok(sequences) if fixtures.setup.is_some() => {
                let ended = async {
                    terminate_connections(admin, &building).await?;
                    wait_disconnected(admin, &building).await
                };
                ended.await.map(|()| sequences)
            }
            other => other,
        };
        let sequences = match applied {
            Ok(sequences) => sequences,
            Err(e) => {
                let _ = drop_derived(admin, &building).await;
                return Err(e);
            }
        };
        // The sequences' state goes with the template's mark, for its clones.
        ddl(
            admin,
            &format!(
                "COMMENT ON DATABASE {} IS '{}'",
                ident(&building),
                template_mark(now_secs(), &sequences)
            ),
        )
        .await?;
        ddl(admin, &format!("ALTER DATABASE {} RENAME TO {}", ident(&building), ident(&name))).await?;
        tracing::info!(template = %name, files = fixtures.files.len(), server = %server.name, "template built");
        Ok((name.clone(), true))
    })
    .await
}

/// Where a template's mark holds its sequences' state ([`sequences`]).
const SEQUENCES: &str = " sequences=";

/// Where a template's mark holds its last use on a server of the user's, in seconds
/// since the epoch ([`note_use`]); templates pgfixture's own servers hold stay with
/// the server.
const USED: &str = " used=";

/// How long a template on a server of the user's may go unused before a sweep drops it:
/// the server would otherwise keep a template for every change to the fixtures or
/// migrations that ever ran on it.
pub(crate) const TEMPLATE_IDLE: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// How old a template's recorded last use may grow before a use records it again: a
/// write of the catalog, so not at every use.
const USE_NOTED_EVERY: Duration = Duration::from_secs(24 * 60 * 60);

/// A template's mark: its last use (`used`, seconds since the epoch) and the state of
/// its sequences.
fn template_mark(used: u64, sequences: &str) -> String {
    format!("{MARK} template{USED}{used}{SEQUENCES}{sequences}")
}

/// The last use that a template's mark `comment` records, if it records one.
fn template_used(comment: &str) -> Option<u64> {
    let (_, rest) = comment.split_once(USED)?;
    rest.split(' ').next()?.parse().ok()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Records in the mark of the template `name` (now `comment`) that it is in use, when
/// the last use it records is older than [`USE_NOTED_EVERY`] (or missing). A failure
/// is left alone: the mark is written by its owner, and two processes writing it at
/// once collide; the other one's write serves as well.
async fn note_use(admin: &Client, name: &str, comment: &str) {
    let now = now_secs();
    let recent = template_used(comment)
        .is_some_and(|used| now.saturating_sub(used) < USE_NOTED_EVERY.as_secs());
    if recent || !comment.starts_with(&format!("{MARK} template")) {
        return;
    }
    let sequences = comment.split_once(SEQUENCES).map_or("", |(_, s)| s);
    let sql = format!(
        "COMMENT ON DATABASE {} IS '{}'",
        ident(name),
        template_mark(now, sequences)
    );
    if let Err(error) = admin.batch_execute(&sql).await {
        tracing::debug!(%error, template = name, "recording the template's use failed");
    }
}

/// Whether `error` is a clone's of a template that is gone (a sweep dropped it, unused
/// for [`TEMPLATE_IDLE`], as it was about to be cloned).
pub(crate) fn template_gone(error: &Error) -> bool {
    error
        .postgres()
        .and_then(tokio_postgres::Error::code)
        .is_some_and(|code| *code == SqlState::UNDEFINED_DATABASE)
}

/// The state of the sequences the fixtures left, as `oid:next value` pairs separated by
/// commas: in the connection's database (`schema` empty) or in one schema. Restarting
/// each sequence at its value ([`RESTART_SEQUENCES`]) gives the ids a fresh database
/// would. Only digits, ':' and ',', so it goes into comments and settings as it is.
pub(crate) async fn sequences(client: &Client, schema: &str) -> Result<String> {
    let row = client
        .query_one(
            // What the `pg_sequences` view gives, without planning the view: 1.25 ms
            // of planning a call, 0.17 ms so.
            "SELECT coalesce(string_agg(c.oid || ':' || coalesce(CASE \
                 WHEN has_sequence_privilege(c.oid, 'SELECT,USAGE') \
                 THEN pg_sequence_last_value(c.oid) END + p.seqincrement, p.seqstart), \
                 ',' ORDER BY c.oid), '') \
             FROM pg_class c JOIN pg_sequence p ON p.seqrelid = c.oid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND NOT pg_is_other_temp_schema(n.oid) \
               AND ($1 = '' OR n.nspname = $1)",
            &[&schema],
        )
        .await
        .map_err(Error::pg("reading the fixtures' sequences"))?;
    Ok(row.get(0))
}

/// The state of `template`'s sequences, as its mark holds it.
async fn template_sequences(admin: &Client, template: &str) -> Result<String> {
    let comment = database_comment(admin, template).await?.unwrap_or_default();
    Ok(comment
        .split_once(SEQUENCES)
        .map(|(_, s)| s.to_owned())
        .unwrap_or_default())
}

/// Restarts every sequence of the worker at the value the fixtures left, from the
/// setting `{setting}` ([`sequences`]): inside the test's transaction, so the restart
/// is rolled back with it.
pub(crate) fn restart_sequences(setting: &str) -> String {
    format!(
        "DO $pgfixture$ DECLARE s text; BEGIN \
         FOREACH s IN ARRAY string_to_array({}, ',') LOOP \
         EXECUTE format('ALTER SEQUENCE %s RESTART WITH %s', split_part(s, ':', 1)::oid::regclass, split_part(s, ':', 2)); \
         END LOOP; END $pgfixture$",
        database_setting_sql(setting)
    )
}

/// The value of the database-level setting `setting` as the catalog holds it now, as
/// an SQL expression, `''` when it is unset. `current_setting` would give the value
/// the session read when it started: schema mode keeps a worker's connections across
/// its rebuilds, which write new values.
pub(crate) fn database_setting_sql(setting: &str) -> String {
    let prefix = format!("{setting}=").replace('\'', "''");
    format!(
        "coalesce((SELECT substr(c, {}) FROM pg_db_role_setting r, unnest(r.setconfig) c \
         WHERE r.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND r.setrole = 0 AND left(c, {}) = '{prefix}'), '')",
        prefix.len() + 1,
        prefix.len()
    )
}

/// The setting that holds a worker's sequences' state: `pgfixture.sequences` on a
/// worker database, `pgfixture.sequences_<schema>` for a worker schema.
pub(crate) fn sequences_setting(target: Target<'_>) -> Option<String> {
    match target {
        Target::Database(..) => Some("pgfixture.sequences".to_owned()),
        Target::Schema(name, Some(_)) => Some(format!("pgfixture.sequences_{name}")),
        Target::Schema(_, None) => None,
    }
}

/// Clones `template` into the worker database `name`, unless it exists.
/// Returns whether this call created it.
pub(crate) async fn clone_database(
    server: &Server,
    admin: &Client,
    template: &str,
    name: &str,
    mark: &str,
    shared: bool,
) -> Result<bool> {
    with_lock(admin, name, async || {
        if database_exists(admin, name).await? {
            return Ok(false);
        }
        // Cloned and marked under a temporary name, then renamed: a process killed in
        // between never leaves an unmarked database under the worker's name. The
        // temporary name is derived from the worker's under its lock, so a leftover
        // one is pgfixture's and is dropped without a mark.
        let building = format!("{name}_new");
        drop_derived(admin, &building).await?;
        create_clone(admin, template, &building).await?;
        ddl(admin, &mark_sql(Target::Database(&building, shared), mark, false)).await?;
        set_sequences(admin, template, &building, shared).await?;
        ddl(admin, &format!("ALTER DATABASE {} RENAME TO {}", ident(&building), ident(name))).await?;
        tracing::info!(database = name, template, server = %server.name, "worker database provisioned");
        Ok(true)
    })
    .await
}

/// Schema mode: the schema that holds the fixtures' extensions, on every worker's
/// `search_path` after the worker's own schema.
pub(crate) const SHARED_SCHEMA: &str = "pgfx_shared";

/// Runs the fixtures' statements on extensions and roles (schema mode) once per
/// database, under a lock, before any worker schema is built: extensions go into
/// [`SHARED_SCHEMA`] unless they name a schema, and one that already exists (from an
/// earlier run or fixture set) is no error. The schema's comment records the fixture
/// set (`key`) they ran for.
pub(crate) async fn shared_statements(
    client: &Client,
    statements: &[crate::fixtures::SharedStatement],
    key: &str,
) -> Result<()> {
    if statements.is_empty() {
        return Ok(());
    }
    let done = format!("{MARK} shared {key}");
    let is_done = async || {
        Ok::<_, Error>(
            schema_comment(client, SHARED_SCHEMA).await?.as_deref() == Some(done.as_str()),
        )
    };
    if is_done().await? {
        return Ok(());
    }
    with_lock(client, SHARED_SCHEMA, async || {
        if is_done().await? {
            return Ok(());
        }
        let schema = ident(SHARED_SCHEMA);
        client
            .batch_execute(&format!(
                "BEGIN; CREATE SCHEMA IF NOT EXISTS {schema}; SET LOCAL search_path TO {schema}"
            ))
            .await
            .map_err(Error::pg(format!("creating schema {SHARED_SCHEMA}")))?;
        let run = async {
            for statement in statements {
                let pg = |e| Error::pg(format!("running {}", statement.sql))(e);
                client
                    .batch_execute("SAVEPOINT pgfx_shared")
                    .await
                    .map_err(pg)?;
                match client.batch_execute(&statement.sql).await {
                    Ok(()) => {}
                    // Made by an earlier run, or an earlier fixture set.
                    Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => {
                        client
                            .batch_execute("ROLLBACK TO SAVEPOINT pgfx_shared")
                            .await
                            .map_err(pg)?;
                    }
                    Err(e) => return Err(statement.error(&e)),
                }
                client
                    .batch_execute("RELEASE SAVEPOINT pgfx_shared")
                    .await
                    .map_err(pg)?;
            }
            client
                .batch_execute(&format!("COMMENT ON SCHEMA {schema} IS '{done}'; COMMIT"))
                .await
                .map_err(Error::pg(format!("marking schema {SHARED_SCHEMA}")))
        };
        let result = run.await;
        if result.is_err() {
            let _ = client.batch_execute("ROLLBACK").await;
        }
        result
    })
    .await
}

/// Schema mode on pgfixture's own servers: the schema of the log of DDL run in the
/// database of the worker schemas ([`ddl_log`]).
pub(crate) const DDL_LOG: &str = "pgfx_ddl";

/// The log's table, its function and its event triggers (of `ddl_command_end` and
/// `sql_drop`), which write a row per schema a DDL command touched: the schemas of the
/// objects it made, changed or dropped, and those on the session's `search_path`
/// (where unqualified names go; `GRANT` and `COMMENT` name no schema). Rows of a
/// rolled-back transaction go with it. The function runs as its owner (a superuser),
/// whatever role the session took, and names everything it uses with its schema. The
/// triggers fire in replica mode too (`ENABLE ALWAYS`).
const DDL_LOG_SQL: &str = "BEGIN; \
    CREATE SCHEMA pgfx_ddl; \
    CREATE TABLE pgfx_ddl.log (schema name NOT NULL, id bigserial NOT NULL); \
    CREATE INDEX log_schema_id ON pgfx_ddl.log (schema, id); \
    CREATE FUNCTION pgfx_ddl.logged() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER AS $f$ \
    BEGIN \
      IF TG_EVENT = 'sql_drop' THEN \
        INSERT INTO pgfx_ddl.log (schema) SELECT DISTINCT s FROM ( \
          SELECT o.schema_name FROM pg_catalog.pg_event_trigger_dropped_objects() o \
          UNION ALL SELECT pg_catalog.unnest(pg_catalog.current_schemas(false))) t(s) \
        WHERE s IS NOT NULL; \
      ELSE \
        INSERT INTO pgfx_ddl.log (schema) SELECT DISTINCT s FROM ( \
          SELECT c.schema_name FROM pg_catalog.pg_event_trigger_ddl_commands() c \
          UNION ALL SELECT pg_catalog.unnest(pg_catalog.current_schemas(false))) t(s) \
        WHERE s IS NOT NULL; \
      END IF; \
    END $f$; \
    REVOKE ALL ON FUNCTION pgfx_ddl.logged() FROM PUBLIC; \
    CREATE EVENT TRIGGER pgfx_ddl_end ON ddl_command_end EXECUTE FUNCTION pgfx_ddl.logged(); \
    CREATE EVENT TRIGGER pgfx_ddl_drop ON sql_drop EXECUTE FUNCTION pgfx_ddl.logged(); \
    ALTER EVENT TRIGGER pgfx_ddl_end ENABLE ALWAYS; \
    ALTER EVENT TRIGGER pgfx_ddl_drop ENABLE ALWAYS; \
    COMMIT";

/// Whether the DDL log ([`DDL_LOG`]) is in the database `client` is connected to, its
/// triggers enabled always. A simple query: one round trip, where a prepared one takes
/// two (a nextest process asks on a new connection before its worker pool's reading).
pub(crate) async fn ddl_logged(client: &Client) -> Result<bool> {
    let messages = client
        .simple_query(
            "SELECT to_regclass('pgfx_ddl.log') IS NOT NULL AND (SELECT count(*) = 2 \
               FROM pg_event_trigger WHERE evtname IN ('pgfx_ddl_end', 'pgfx_ddl_drop') \
                AND evtenabled = 'A')",
        )
        .await
        .map_err(Error::pg(format!("looking up schema {DDL_LOG}")))?;
    Ok(messages.iter().any(|message| {
        matches!(message, tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some("t"))
    }))
}

/// Schema mode on pgfixture's own servers: makes the DDL log in the database of the
/// worker schemas unless it is there, so that a worker pool's reading finds DDL in a
/// worker schema from the log rather than from every catalog row of the schema (about
/// 1 ms a reading). A server that refuses it (its user not a superuser) keeps the
/// catalog readings.
pub(crate) async fn ddl_log(client: &Client) -> Result<()> {
    if ddl_logged(client).await? {
        return Ok(());
    }
    with_lock(client, DDL_LOG, async || {
        if ddl_logged(client).await? || schema_exists(client, DDL_LOG).await? {
            return Ok(());
        }
        if let Err(error) = client.batch_execute(DDL_LOG_SQL).await {
            let _ = client.batch_execute("ROLLBACK").await;
            tracing::debug!(%error, "making the DDL log failed; worker pools read the catalogs");
        }
        Ok(())
    })
    .await
}

/// The `search_path` of a worker schema: its own, then the fixtures' extensions.
pub(crate) fn schema_search_path(schema: &str) -> String {
    format!("{schema},{SHARED_SCHEMA}")
}

/// Gives the clone `database` of `template` its sequences' state as a setting.
async fn set_sequences(admin: &Client, template: &str, database: &str, shared: bool) -> Result<()> {
    let sequences = template_sequences(admin, template).await?;
    let sql = format!(
        "ALTER DATABASE {} SET pgfixture.sequences = '{sequences}'",
        ident(database)
    );
    ddl(admin, &settable(sql, shared)).await
}

/// Whether the worker database `name` holds its sequences' state (`pgfixture.sequences`;
/// not on a server of the user's whose user may not write it: [`settable`]).
pub(crate) async fn sequences_recorded(admin: &Client, name: &str) -> Result<bool> {
    let row = admin
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_db_role_setting r, unnest(r.setconfig) c \
             WHERE r.setdatabase = (SELECT oid FROM pg_database WHERE datname = $1) \
             AND r.setrole = 0 AND c LIKE 'pgfixture.sequences=%')",
            &[&name],
        )
        .await
        .map_err(Error::pg(format!("reading the settings of {name}")))?;
    Ok(row.get(0))
}

/// The database that holds the worker schemas of schema mode.
pub(crate) async fn schema_database(admin: &Client, name: &str) -> Result<()> {
    if database_exists(admin, name).await? {
        return Ok(());
    }
    with_lock(admin, name, async || {
        if !database_exists(admin, name).await? {
            ddl(admin, &format!("CREATE DATABASE {}", ident(name))).await?;
        }
        Ok(())
    })
    .await
}

async fn schema_exists(client: &Client, schema: &str) -> Result<bool> {
    let row = client
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
        .await
        .map_err(Error::pg(format!("looking up schema {schema}")))?;
    Ok(row.is_some())
}

/// Creates the worker schema `schema` with the fixtures applied inside it, unless it
/// exists; `settings_on` is the database that holds its mark's setting, if any
/// ([`Target::Schema`]). Returns whether this call created it.
pub(crate) async fn schema(
    client: &Client,
    at: (&Server, &str),
    schema: &str,
    settings_on: Option<&str>,
    fixtures: &FixtureSet,
    mark: &str,
) -> Result<bool> {
    if schema_exists(client, schema).await? {
        return Ok(false);
    }
    with_lock(client, schema, async || {
        if schema_exists(client, schema).await? {
            return Ok(false);
        }
        build_schema(client, at, schema, schema, settings_on, fixtures, mark).await?;
        Ok(true)
    })
    .await
}

/// Builds the fixtures of the worker schema `schema` into a new schema named
/// `as_name`: the worker itself, or its spare ([`refill_spare_schema`]). It is built
/// as `{as_name}_new` and renamed once complete, so that a half-built one is never
/// taken; only the worker itself gets its settings (mark, sequences) here, a spare
/// gets them when it takes the worker's place. Its rows are recorded under the
/// worker's name and the new schema's oid, which a rename keeps.
async fn build_schema(
    client: &Client,
    at: (&Server, &str),
    schema: &str,
    as_name: &str,
    settings_on: Option<&str>,
    fixtures: &FixtureSet,
    mark: &str,
) -> Result<()> {
    if let Err(error) = restore::ensure_store(client).await {
        tracing::debug!(%error, "creating the table of recorded rows failed");
    }
    let building = format!("{as_name}_new");
    let (b, s) = (ident(&building), ident(SHARED_SCHEMA));
    let run = async {
        // A migrator works on a connection of its own, which sees only a
        // committed schema; it is dropped again if anything fails.
        let create = format!("DROP SCHEMA IF EXISTS {b} CASCADE; CREATE SCHEMA {b};");
        let begin = format!("BEGIN; SET LOCAL search_path TO {b}, {s};");
        let sql = if fixtures.migrator() {
            client
                .batch_execute(&create)
                .await
                .map_err(Error::pg(format!("creating schema {building}")))?;
            // Plain migrations run before setup code on this session, with the
            // schema first on its `search_path`.
            let path = format!("SET search_path TO {b}, {s}");
            client
                .batch_execute(&path)
                .await
                .map_err(Error::pg(format!("creating schema {building}")))?;
            let doing = format!("building the schema {building} (its migrations and setup code)");
            let ran = crate::runtime::noticed(
                &doing,
                fixtures.run_migrators(client, at.0, at.1, Some(&building)),
            )
            .await;
            let reset = client.batch_execute("RESET search_path").await;
            ran?;
            reset.map_err(Error::pg(format!("creating schema {building}")))?;
            begin
        } else {
            format!("BEGIN; {create} SET LOCAL search_path TO {b}, {s};")
        };
        client
            .batch_execute(&sql)
            .await
            .map_err(Error::pg(format!("creating schema {building}")))?;
        fixtures.apply(client).await?;
        record_schema(client, schema, &building).await?;
        // A spare's build forgets only its own names: the worker's may be out to a
        // test whose reading the worker's rows of the log are part of (its own are
        // forgotten when the spare takes its place, while no test holds it).
        forget_ddl(client, &[as_name, &building]).await?;
        // Commented under the temporary name; the settings are named after the
        // final one.
        let mut setting = String::new();
        if as_name == schema {
            setting = settings_sql(client, schema, &building, settings_on, mark).await?;
        }
        // The rows' statistics reach the server as the build ends: arriving later
        // (a backend sends them at most once a second), they would show as a change
        // in the first test's reading.
        let flush = flush_statistics_sql(flushes_statistics(client).await?);
        let commit = format!(
            "{}; ALTER SCHEMA {} RENAME TO {}; {setting} COMMIT",
            mark_sql(Target::Schema(&building, None), mark, false),
            ident(&building),
            ident(as_name)
        );
        client
            .batch_execute(&then(commit, flush))
            .await
            .map_err(Error::pg(format!("renaming schema {building}")))
    };
    if let Err(e) = run.await {
        let _ = client.batch_execute("ROLLBACK").await;
        let _ = client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {b} CASCADE"))
            .await;
        return Err(e);
    }
    tracing::info!(
        schema = as_name,
        files = fixtures.files.len(),
        "worker schema provisioned"
    );
    Ok(())
}

/// The statements that give the worker schema `schema`, whose objects are in the
/// schema `built` (itself, or the one about to take its place), its settings on the
/// database `settings_on`: its clean mark and its sequences' state. Empty without
/// such a database.
async fn settings_sql(
    client: &Client,
    schema: &str,
    built: &str,
    settings_on: Option<&str>,
    mark: &str,
) -> Result<String> {
    let target = Target::Schema(schema, settings_on);
    let mut setting = target
        .setting_sql(mark)
        .map(|sql| format!("{sql};"))
        .unwrap_or_default();
    if let (Some(db), Some(name)) = (settings_on, sequences_setting(target)) {
        let sequences = sequences(client, built).await?;
        setting.push_str(&format!(
            " ALTER DATABASE {} SET {name} = '{sequences}';",
            ident(db)
        ));
    }
    Ok(setting)
}

/// Makes the next spare of the worker schema `name` (pgfixture's own servers), after a
/// reset, in the background: drops the schema the last spare replaced
/// (`{name}_old`), and builds `{name}_spare` from the fixtures unless it exists. Under
/// the worker's lock, so that a reset meanwhile waits for the spare rather than
/// building a schema at the same time.
pub(crate) async fn refill_spare_schema(
    client: &Client,
    at: (&Server, &str),
    name: &str,
    fixtures: &FixtureSet,
    mark: &str,
) -> Result<()> {
    let (spare, old) = (format!("{name}_spare"), format!("{name}_old"));
    with_lock(client, name, async || {
        drop_schema(client, &old).await?;
        if !schema_exists(client, &spare).await? {
            build_schema(client, at, name, &spare, None, fixtures, mark).await?;
        }
        Ok(())
    })
    .await
}

/// Drops the DDL log's rows of `schemas` (a worker schema being rebuilt, under its
/// final and its temporary name), if there is a log: a reading compares only rows
/// written since the schema was built.
async fn forget_ddl(client: &Client, schemas: &[&str]) -> Result<()> {
    let forget = || Error::pg(format!("forgetting the DDL of schema {}", schemas[0]));
    let logged: bool = client
        .query_one("SELECT to_regclass('pgfx_ddl.log') IS NOT NULL", &[])
        .await
        .map_err(forget())?
        .get(0);
    if logged {
        client
            .execute(
                "DELETE FROM pgfx_ddl.log WHERE schema = ANY($1)",
                &[&schemas],
            )
            .await
            .map_err(forget())?;
    }
    Ok(())
}

/// Records the rows of the schema `building`, to become the worker schema `schema`,
/// for in-place restores ([`restore::record`]), inside the transaction that builds it:
/// a failure only leaves the schema without a record (it is then rebuilt on reset).
async fn record_schema(client: &Client, schema: &str, building: &str) -> Result<()> {
    let savepoint = || Error::pg(format!("recording the rows of schema {schema}"));
    client
        .batch_execute("SAVEPOINT pgfx_record")
        .await
        .map_err(savepoint())?;
    let recorded = async {
        let oid: u32 = client
            .query_one(
                "SELECT oid FROM pg_namespace WHERE nspname = $1",
                &[&building],
            )
            .await
            .map_err(Error::pg(format!("looking up schema {building}")))?
            .get(0);
        restore::record(
            client,
            client,
            &restore::schema_key(schema, oid),
            Some(building),
        )
        .await
    }
    .await;
    let end = match recorded {
        Ok(()) => "RELEASE SAVEPOINT pgfx_record",
        Err(error) => {
            tracing::debug!(%error, schema, "recording the schema's rows failed");
            "ROLLBACK TO SAVEPOINT pgfx_record"
        }
    };
    client.batch_execute(end).await.map_err(savepoint())
}

/// Replaces the worker database `name` with a fresh clone of `template`: always when
/// `force`, else only if it is still marked dirty once the lock is held (another
/// process may have reset it first). With `spares`, a spare clone ([`refill_spare`])
/// takes the worker's place by two renames, a few milliseconds, and the old database
/// is dropped later. The spare is taken under the refill's lock: a refill still at work
/// (tests that reset back to back) is waited for rather than cloned against, and with
/// no refill and no spare the spare is made here, while the worker's terminated
/// connections exit (a drop of a database whose backends have not exited yet sleeps
/// 100 ms). Without `spares`, the worker is dropped and cloned. Returns whether the
/// worker now holds a spare (so that the caller makes the next one).
pub(crate) async fn reset_database(
    server: &Server,
    admin: &Client,
    template: &str,
    name: &str,
    mark: &str,
    force: bool,
    spares: bool,
) -> Result<bool> {
    with_lock(admin, name, async || {
        let spare = format!("{name}_spare");
        let old = format!("{name}_old");
        let state = database_state(admin, name).await?;
        if !(force || state == State::Dirty) {
            return Ok(false);
        }
        // Its connections go first: a database in use can be neither renamed nor
        // dropped. Their backends take a moment to exit, which the spare's making or
        // marking overlaps. (The drop below refuses a database without pgfixture's
        // mark; its connections are left alone.)
        let terminated = state != State::Missing && (spares || state != State::Foreign);
        if terminated {
            terminate_connections(admin, name).await?;
        }
        if spares && state != State::Missing {
            with_lock(admin, &spare, async || {
                let [spare_state, old_state] =
                    database_states(admin, [spare.as_str(), old.as_str()]).await?;
                if old_state != State::Missing {
                    // Left by a process that exited before its refill: nobody's.
                    drop_derived(admin, &old).await?;
                }
                if spare_state == State::Missing {
                    create_clone(admin, template, &spare).await?;
                }
                // Marked and given its sequences' state here, not when it was made:
                // the process that made it may have exited right after creating it.
                ddl(
                    admin,
                    &mark_sql(Target::Database(&spare, false), mark, false),
                )
                .await?;
                set_sequences(admin, template, &spare, false).await?;
                wait_disconnected(admin, name).await?;
                ddl(
                    admin,
                    &format!("ALTER DATABASE {} RENAME TO {}", ident(name), ident(&old)),
                )
                .await?;
                ddl(
                    admin,
                    &format!("ALTER DATABASE {} RENAME TO {}", ident(&spare), ident(name)),
                )
                .await
            })
            .await?;
            tracing::debug!(database = name, "worker database replaced by its spare");
            return Ok(true);
        }
        if terminated {
            wait_disconnected(admin, name).await?;
        }
        drop_database(admin, name).await?;
        // Without spares: on a server of the user's.
        clone_database(server, admin, template, name, mark, !spares).await?;
        Ok(false)
    })
    .await
}

/// The other backends connected to the database `$1` that [`terminate_connections`]
/// ends: all of them for a superuser (pgfixture's own servers); for another user
/// (`PGFIXTURE_URL`) its clients only, for it may not signal an autovacuum worker,
/// which the server's own wait before a rename or drop stops.
const OTHER_BACKENDS: &str = "FROM pg_stat_activity WHERE datname = $1 \
     AND pid <> pg_backend_pid() \
     AND (backend_type = 'client backend' OR current_setting('is_superuser') = 'on')";

/// Terminates the other connections to the database `name` (see [`wait_disconnected`]).
async fn terminate_connections(admin: &Client, name: &str) -> Result<()> {
    admin
        .execute(
            &format!("SELECT pg_terminate_backend(pid) {OTHER_BACKENDS}"),
            &[&name],
        )
        .await
        .map_err(Error::pg(format!("closing the connections to {name}")))?;
    Ok(())
}

/// Waits, for up to a second, until no other backend is connected to the database
/// `name`, whose connections [`terminate_connections`] closed: PostgreSQL's own wait
/// before a rename or a drop of a database in use sleeps 100 ms at a time, and a
/// terminated backend exits within a millisecond or two. (Its `pg_stat_activity` row
/// goes a moment before it leaves the process array that the server's wait reads, so
/// that wait may still come, rarely.)
async fn wait_disconnected(admin: &Client, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1);
    let waiting = || Error::pg(format!("waiting for the connections to {name} to close"));
    // Prepared once: each poll is then one round trip.
    let query = admin
        .prepare(&format!("SELECT EXISTS (SELECT 1 {OTHER_BACKENDS})"))
        .await
        .map_err(waiting())?;
    loop {
        let connected: bool = admin
            .query_one(&query, &[&name])
            .await
            .map_err(waiting())?
            .get(0);
        if !connected || Instant::now() >= deadline {
            return Ok(());
        }
        crate::runtime::sleep(Duration::from_millis(1)).await;
    }
}

/// Creates the database `name` as a clone of `template` (unmarked: the caller marks it
/// when it takes a worker's place), under the caller's lock. FILE_COPY (PostgreSQL 15+)
/// copies files instead of WAL-logging every block, which is faster for small
/// templates when fsync is off.
async fn create_clone(admin: &Client, template: &str, name: &str) -> Result<()> {
    let version: i32 = admin
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(Error::pg("reading server_version_num"))?
        .get(0);
    let strategy = if version >= 150000 {
        " STRATEGY = FILE_COPY"
    } else {
        ""
    };
    ddl(
        admin,
        &format!(
            "CREATE DATABASE {} TEMPLATE {}{strategy}",
            ident(name),
            ident(template)
        ),
    )
    .await
}

/// Drops what [`reset_database`] left of the worker database `name` (its old self)
/// and makes its next spare, a clone of `template`, unless one is there. Run in the
/// background after a reset; a process that exits meanwhile leaves the server to
/// finish the statement in flight (a half-made database is never visible), and
/// the next reset falls back to cloning.
pub(crate) async fn refill_spare(admin: &Client, template: &str, name: &str) -> Result<()> {
    let spare = format!("{name}_spare");
    let old = format!("{name}_old");
    with_lock(admin, &spare, async || {
        drop_derived(admin, &old).await?;
        if !database_exists(admin, &spare).await? {
            create_clone(admin, template, &spare).await?;
        }
        Ok(())
    })
    .await
}

/// Replaces the worker schema `name` with a fresh one, as [`reset_database`] does:
/// with `spares`, the spare built beforehand ([`refill_spare_schema`]) takes its place
/// by two renames in one transaction with its settings, and the old schema is dropped
/// with the next refill; without one, the schema is dropped and built again. Returns
/// whether a spare was used.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn reset_schema(
    client: &Client,
    at: (&Server, &str),
    name: &str,
    settings_on: Option<&str>,
    fixtures: &FixtureSet,
    mark: &str,
    force: bool,
    spares: bool,
) -> Result<bool> {
    with_lock(client, name, async || {
        if !(force || schema_state(client, name).await? == State::Dirty) {
            return Ok(false);
        }
        let (spare, old) = (format!("{name}_spare"), format!("{name}_old"));
        if spares
            && schema_exists(client, &spare).await?
            && !schema_exists(client, &old).await?
        {
            let setting = settings_sql(client, name, &spare, settings_on, mark).await?;
            let swap = format!(
                "BEGIN; ALTER SCHEMA {} RENAME TO {}; ALTER SCHEMA {} RENAME TO {}; {}; {setting} COMMIT",
                ident(name),
                ident(&old),
                ident(&spare),
                ident(name),
                mark_sql(Target::Schema(name, None), mark, false),
            );
            if let Err(e) = client.batch_execute(&swap).await {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(Error::pg(format!("putting schema {spare} in place of {name}"))(e));
            }
            forget_ddl(client, &[name]).await?;
            return Ok(true);
        }
        drop_schema(client, name).await?;
        schema(client, at, name, settings_on, fixtures, mark).await?;
        Ok(false)
    })
    .await
}

/// Makes the connections `clients` (idle, of the worker's test pool) hand their
/// pending statistics to the server now, so that a later [`crate::restore::fingerprint`] does not see
/// them arrive (a backend sends them at most once a second): `flush`, the worker's
/// [`flush_statistics_sql`].
pub(crate) async fn flush_statistics(clients: &[&Client], flush: &str) {
    if flush.is_empty() {
        return;
    }
    let flushes = clients.iter().map(|c| c.batch_execute(flush));
    let _ = futures::future::join_all(flushes).await;
}

/// Whether the server behind `client` can be told to flush a connection's statistics
/// (`pg_stat_force_next_flush()`, PostgreSQL 15 and later). The function is named in
/// a statement only where it exists: a statement that names a function the server does
/// not have fails as a whole, with whatever was sent in the same message.
pub(crate) async fn flushes_statistics(client: &Client) -> Result<bool> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int >= 150000",
            &[],
        )
        .await
        .map_err(Error::pg("reading server_version_num"))?;
    Ok(row.get(0))
}

/// What makes a connection hand its pending statistics to the server as its
/// transaction ends ([`flush_statistics`]): nothing before PostgreSQL 15
/// ([`flushes_statistics`]), whose statistics collector has no such call.
pub(crate) fn flush_statistics_sql(flushes: bool) -> &'static str {
    if flushes {
        "SELECT pg_stat_force_next_flush()"
    } else {
        ""
    }
}

/// `sql`, then `next` (which may be empty), in one message.
pub(crate) fn then(sql: String, next: &str) -> String {
    if next.is_empty() {
        sql
    } else {
        format!("{sql}; {next}")
    }
}

/// [`pool_cleanup`], with `$flush` (a statement and its `;`, or nothing) before the
/// listing of the SQL-prepared statements.
macro_rules! pool_cleanup {
    ($flush:literal) => {
        concat!(
            "ROLLBACK; CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; \
             SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES; ",
            $flush,
            "SELECT name AS pgfixture_prepared FROM pg_catalog.pg_prepared_statement() \
             WHERE from_sql"
        )
    };
}

/// Ends what the code under test of a worker pool left in a pooled connection's
/// session before tests use it again, as `DISCARD ALL` would but keeping the driver's
/// prepared statements (the SQL-prepared ones are listed for deallocation), and, where
/// the server can (`flushes`, [`flushes_statistics`]), hands its statistics to the
/// server. The `ROLLBACK` ends a transaction left open (a warning when there is none).
pub(crate) fn pool_cleanup(flushes: bool) -> &'static str {
    if flushes {
        pool_cleanup!("SELECT pg_stat_force_next_flush(); ")
    } else {
        pool_cleanup!("")
    }
}

/// The statement of [`none_open`], prepared on `client` (cached).
pub(crate) async fn open_connections(
    client: &deadpool_postgres::ClientWrapper,
) -> Result<tokio_postgres::Statement> {
    client
        .prepare_cached("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
        .await
        .map_err(Error::pg("looking for a worker pool's connections"))
}

/// Whether no connection named `application_name` is open, with `statement` from
/// [`open_connections`]: one message, sent as soon as this is first polled.
pub(crate) async fn none_open(
    client: &Client,
    statement: &tokio_postgres::Statement,
    application_name: &str,
) -> Result<bool> {
    let open: i64 = client
        .query_one(statement, &[&application_name])
        .await
        .map_err(Error::pg("looking for a worker pool's connections"))?
        .get(0);
    Ok(open == 0)
}

/// Ends the connections named `application_name` that the code under test left open
/// once its test is over (a task of the test's still holding one, a pool that closed
/// but not all its connections, as sqlx 0.8's `close()` can leave): their backends are
/// terminated, which rolls back what they left open. Then waits until they are gone
/// (their backends send their statistics as they exit), polling every millisecond for
/// up to a second. Returns whether they are gone. One round trip when none is open.
pub(crate) async fn end_open(
    client: &deadpool_postgres::ClientWrapper,
    application_name: &str,
) -> Result<bool> {
    let statement = open_connections(client).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    let mut terminated = false;
    loop {
        if none_open(client, &statement, application_name).await? {
            return Ok(true);
        }
        if !terminated {
            // A role may end its own backends; where it may not, the wait decides.
            let ended = client
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = $1 AND pid <> pg_backend_pid()",
                    &[&application_name],
                )
                .await;
            if let Err(error) = ended {
                tracing::debug!(%error, "ending a worker pool's connections failed");
            }
            terminated = true;
        } else if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        crate::runtime::sleep(Duration::from_millis(1)).await;
    }
}

/// The mark of a worker database or schema of `run`.
pub(crate) fn worker_mark(run: &str) -> String {
    format!("{MARK} worker run={run}")
}

/// The table of a shared server (url backend) where each run records when one of its
/// processes last started, so that a run between two processes is not taken for dead.
const RUNS: &str = "pgfixture_runs";

/// Records that `run` is alive on `server`, a shared server, and notes it for the run's
/// other processes on this machine ([`crate::runs`]): the table is made on first use,
/// writable by every role, since the runs of all the roles that use the database are
/// recorded in it (it holds nothing but run ids and times).
pub(crate) async fn touch_run(admin: &Client, server: &Server, run: &str) -> Result<()> {
    let user = &server.user;
    let exists: bool = admin
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&RUNS])
        .await
        .map_err(Error::pg(format!("looking up table {RUNS}")))?
        .get(0);
    if !exists {
        with_lock(admin, RUNS, async || {
            admin
                .batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {RUNS} (run text PRIMARY KEY, seen timestamptz NOT NULL); \
                     COMMENT ON TABLE {RUNS} IS '{MARK} runs'; \
                     GRANT SELECT, INSERT, UPDATE, DELETE ON {RUNS} TO PUBLIC"
                ))
                .await
                .map_err(|e| {
                    // Since PostgreSQL 15 only the database's owner may create in its
                    // `public` schema.
                    let user = format!("\"{}\"", user.replace('"', "\"\""));
                    Error::pg(format!(
                        "creating table {RUNS}, where the runs on this server record themselves \
                         (the PGFIXTURE_URL user may not: GRANT CREATE ON SCHEMA public TO {user}, \
                         or let a user who may run once first)"
                    ))(e)
                })
        })
        .await?;
    }
    admin
        .execute(
            &format!(
                "INSERT INTO {RUNS} VALUES ($1, now()) ON CONFLICT (run) DO UPDATE SET seen = now()"
            ),
            &[&run],
        )
        .await
        .map_err(|e| {
            let hint = if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
                format!(
                    " (another role made it without sharing it; as that role: \
                     GRANT SELECT, INSERT, UPDATE, DELETE ON {RUNS} TO PUBLIC)"
                )
            } else {
                String::new()
            };
            Error::pg(format!("recording run {run} in {RUNS}{hint}"))(e)
        })?;
    crate::runs::touched(server, run);
    Ok(())
}

/// Drops the worker databases and schemas (in `admin`'s database) of runs that died: a
/// run other than `own` that no connection belongs to (by `application_name`) and
/// none of whose processes started within `grace`. A worker database is dropped only
/// when its run is recorded in `admin`'s database: the runs of another database of the
/// server (another `PGFIXTURE_URL`) record themselves in that database's table, which
/// this sweep cannot see, so one of them between two processes would look dead here
/// (and `DROP ... WITH (FORCE)` could end its next process's connection); their own
/// database's sweeps drop them. A run's record goes once all its objects are dropped.
/// Only objects with pgfixture's mark are considered, and each is checked again before
/// it is dropped. Another process already sweeping makes this one skip. Returns what
/// was dropped.
pub(crate) async fn sweep(admin: &Client, own: &str, grace: Duration) -> Result<Vec<String>> {
    let key = lock_key("sweep");
    let locked: bool = admin
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
        .await
        .map_err(Error::pg("locking the sweep"))?
        .get(0);
    if !locked {
        return Ok(Vec::new());
    }
    let result = sweep_locked(admin, own, grace).await;
    let _ = admin
        .execute("SELECT pg_advisory_unlock($1)", &[&key])
        .await;
    result
}

async fn sweep_locked(admin: &Client, own: &str, grace: Duration) -> Result<Vec<String>> {
    let objects = admin
        .query(
            &format!(
                "WITH marked AS ( \
                   SELECT 'database' AS kind, datname::text AS name, shobj_description(oid, 'pg_database') AS mark \
                     FROM pg_database \
                   UNION ALL \
                   SELECT 'schema', nspname::text, obj_description(oid, 'pg_namespace') FROM pg_namespace \
                 ), owned AS ( \
                   SELECT kind, name, substring(mark FROM '^{MARK} worker run=([a-z0-9]+)') AS run FROM marked \
                 ) \
                 SELECT kind, name, run FROM owned \
                 WHERE run IS NOT NULL AND run <> $1 \
                   AND NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = '{0}' || run \
                                   OR application_name LIKE '{0}' || run || '/%') \
                   AND NOT EXISTS (SELECT 1 FROM {RUNS} r WHERE r.run = owned.run \
                                   AND r.seen > now() - make_interval(secs => $2)) \
                   AND (kind = 'schema' OR EXISTS (SELECT 1 FROM {RUNS} r WHERE r.run = owned.run))",
                crate::server::APPLICATION
            ),
            &[&own, &grace.as_secs_f64()],
        )
        .await
        .map_err(Error::pg("looking for the objects of runs that died"))?;
    let mut dropped = Vec::new();
    let (mut swept, mut kept) = (
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    );
    for row in objects {
        let (kind, name, run): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let done = if kind == "database" {
            drop_database(admin, &name).await
        } else {
            drop_schema(admin, &name).await
        };
        match done {
            Ok(()) => {
                tracing::info!(kind, name, run, "swept an object of a run that died");
                dropped.push(format!("{kind} {name}"));
                swept.insert(run);
            }
            // In use again, or not droppable: left alone, with its run's record, which
            // the next sweep needs to drop a worker database.
            Err(error) => {
                tracing::debug!(kind, name, %error, "not swept");
                kept.insert(run);
            }
        }
    }
    for run in swept.difference(&kept) {
        let _ = admin
            .execute(&format!("DELETE FROM {RUNS} WHERE run = $1"), &[run])
            .await;
    }
    dropped.extend(sweep_templates(admin).await?);
    Ok(dropped)
}

/// Drops the templates unused for [`TEMPLATE_IDLE`], as their marks record ([`note_use`]),
/// that this user may drop. A clone that meets its template gone builds it again
/// ([`template_gone`]).
async fn sweep_templates(admin: &Client) -> Result<Vec<String>> {
    let templates = admin
        .query(
            "SELECT datname::text, shobj_description(oid, 'pg_database') FROM pg_database \
             WHERE shobj_description(oid, 'pg_database') LIKE $1",
            &[&format!("{MARK} template{USED}%")],
        )
        .await
        .map_err(Error::pg("looking for templates unused for long"))?;
    let now = now_secs();
    let mut dropped = Vec::new();
    for row in templates {
        let (name, comment): (String, String) = (row.get(0), row.get(1));
        let Some(used) = template_used(&comment) else {
            continue;
        };
        if now.saturating_sub(used) < TEMPLATE_IDLE.as_secs() {
            continue;
        }
        match drop_database(admin, &name).await {
            Ok(()) => {
                tracing::info!(template = name, "swept a template unused for a week");
                dropped.push(format!("template {name}"));
            }
            // Another role's, or in use again: left alone.
            Err(error) => tracing::debug!(template = name, %error, "not swept"),
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_templates_mark_holds_its_last_use_and_its_sequences() {
        let mark = template_mark(1_764_650_000, "16384:3,16390:1");
        assert_eq!(
            mark,
            "pgfixture template used=1764650000 sequences=16384:3,16390:1"
        );
        assert_eq!(template_used(&mark), Some(1_764_650_000));
        assert_eq!(
            mark.split_once(SEQUENCES).map(|(_, s)| s),
            Some("16384:3,16390:1")
        );
        assert_eq!(template_used(&template_mark(7, "")), Some(7));
        // A template made before its use was recorded.
        assert_eq!(template_used("pgfixture template sequences=1:2"), None);
    }

    #[test]
    fn lock_keys_are_stable_and_distinct() {
        assert_eq!(lock_key("a"), lock_key("a"));
        assert_ne!(lock_key("a"), lock_key("b"));
    }

    #[test]
    fn workers_are_marked_by_comment_and_setting_alike() {
        assert_eq!(
            mark_sql(Target::Database("pgfx_w_1", false), "pgfixture r1", true),
            "COMMENT ON DATABASE \"pgfx_w_1\" IS 'pgfixture r1 dirty'; \
             ALTER DATABASE \"pgfx_w_1\" SET pgfixture.mark = 'pgfixture r1 dirty'"
        );
        assert_eq!(
            mark_sql(
                Target::Schema("pgfx_w_1", Some("pgfx_schemas")),
                "pgfixture r1",
                false
            ),
            format!(
                "COMMENT ON SCHEMA \"pgfx_w_1\" IS 'pgfixture r1'; \
                 SELECT pg_advisory_xact_lock({}); \
                 ALTER DATABASE \"pgfx_schemas\" SET pgfixture.mark_pgfx_w_1 = 'pgfixture r1'",
                lock_key("schema marks")
            )
        );
        // A schema in a user's database (PGFIXTURE_URL): its comment only.
        assert_eq!(
            mark_sql(Target::Schema("pgfx_w_1", None), "pgfixture r1", false),
            "COMMENT ON SCHEMA \"pgfx_w_1\" IS 'pgfixture r1'"
        );
        assert_eq!(State::of(Some("pgfixture r1 dirty".into())), State::Dirty);
        // A database without the setting reads as not ready, never as clean.
        assert_ne!(State::of(Some(String::new())), State::Clean);
    }
}
