//! What a worker pool's test changed, and putting back in place the tables it wrote.
//!
//! A worker pool hands code under test the worker itself, and its commits are real.
//! Before and after, the worker is read ([`fingerprint`]): the row counters of every
//! relation with storage (of the catalogs too, so that any DDL shows; not the
//! planner's statistics, which an `ANALYZE` writes), and what no
//! counter sees (settings, privileges, prepared transactions; in schema mode, the
//! DDL log's last entry for the schema ([`provision::ddl_log`]) and its relations'
//! files, or where there is no log, the catalog rows of the schema's objects).
//! Counters count attempts, rolled back or not,
//! so a reading can only err towards doing too much.
//!
//! - Nothing changed: the worker goes on as it is.
//! - Only rows of ordinary tables changed (the usual test that commits): those tables
//!   are put back, and the sequences set back, in one transaction with the worker's
//!   clean mark, a millisecond or two ([`restore_sql`]). A table that only had rows
//!   inserted loses the rows of transactions begun after the first reading; any other
//!   is emptied and refilled from the rows the template held, recorded when it was
//!   built ([`record`]).
//! - Anything else (DDL, a catalog, a table too large to record, a trigger that fires
//!   in replica mode, no recorded rows): the worker is rebuilt as before.
//!
//! The rows are recorded, as their text, in a table of pgfixture's ([`STORE`]) in
//! the maintenance database (database and container modes; a worker database is a
//! clone, so an extra schema in it would be the user's to see) or in the database of
//! the schemas (schema mode), never in the worker itself.

use std::collections::BTreeMap;

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::provision::{self, MARK, Target};
use crate::{Error, Result};

/// What a worker pool's test could have changed, as read at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reading {
    /// What no row counter shows.
    summary: String,
    /// Row counters (`inserted.updated.deleted`) of the relations with any, by oid.
    counters: BTreeMap<u32, String>,
    /// The server's first transaction id not yet started at the reading (its low 32
    /// bits, as row headers' `xmin` holds them): every row a transaction begun later
    /// inserts carries one at or after it ([`Change::Rows`]).
    horizon: Option<u32>,
}

/// PostgreSQL's first oid of objects made after `initdb`: every lower one is the
/// catalogs' (their TOAST tables and indexes included).
const FIRST_NORMAL_OBJECT_ID: u32 = 16384;

/// What changed between two readings.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Change {
    None,
    /// Only the rows of these relations (their oids; they may be TOAST tables).
    Rows {
        oids: Vec<u32>,
        /// Those of `oids` whose rows were only inserted (none updated or deleted),
        /// when the first reading knew its horizon: the rows to remove are those whose
        /// `xmin` is at or after it ([`restore_sql`]).
        inserted_only: Vec<u32>,
        horizon: Option<u32>,
    },
    Other,
}

impl Reading {
    /// A reading from its columns: the summary, `oid:counters` pairs separated by
    /// commas, and the horizon (a transaction id with its epoch).
    fn parse(summary: String, counters: &str, horizon: Option<i64>) -> Option<Reading> {
        let counters = counters
            .split(',')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (oid, count) = pair.split_once(':')?;
                Some((oid.parse().ok()?, count.to_owned()))
            })
            .collect::<Option<_>>()?;
        Some(Reading {
            summary,
            counters,
            // The epoch goes: `xmin` has none.
            horizon: horizon.map(|xid| (xid & 0xFFFF_FFFF) as u32),
        })
    }

    /// What changed from `self` (before) to `after`.
    pub(crate) fn change_to(&self, after: &Reading) -> Change {
        if self.summary != after.summary {
            return Change::Other;
        }
        let mut rows: Vec<u32> = after
            .counters
            .iter()
            .filter(|(oid, count)| self.counters.get(oid) != Some(count))
            .map(|(oid, _)| *oid)
            .collect();
        // Counters only grow; one that went missing was reset (the summary holds the
        // reset time, so this is a relation dropped meanwhile).
        if self
            .counters
            .keys()
            .any(|oid| !after.counters.contains_key(oid))
        {
            return Change::Other;
        }
        if rows.is_empty() {
            return Change::None;
        }
        // Rows of a catalog (`COMMENT`, `GRANT`, DDL that leaves the summary alone) are
        // never put back in place: no need to describe them first.
        if rows.iter().any(|oid| *oid < FIRST_NORMAL_OBJECT_ID) {
            return Change::Other;
        }
        rows.sort_unstable();
        let inserted_only = rows
            .iter()
            .filter(|oid| {
                let before = self.counters.get(oid).map_or("0.0.0", String::as_str);
                let after = after.counters.get(oid).map_or("0.0.0", String::as_str);
                // `inserted.updated.deleted`: the same but for the first.
                before.split_once('.').map(|(_, rest)| rest)
                    == after.split_once('.').map(|(_, rest)| rest)
            })
            .copied()
            .collect();
        Change::Rows {
            oids: rows,
            inserted_only,
            horizon: self.horizon,
        }
    }
}

/// The counters of every relation with storage, catalogs included, that has any, but
/// the planner's statistics: `pg_statistic` (2619), `pg_statistic_ext_data` (3429) and
/// their TOAST tables (2840, 3430), which an `ANALYZE` writes, the autovacuum's too, at
/// any moment on a server that runs it. Statistics change plans, never what a query
/// returns; DDL that drops or adds them shows in other catalogs.
const DATABASE_COUNTERS: &str = "\
(SELECT string_agg(c.oid || ':' || c.n, ',' ORDER BY c.oid) FROM ( \
   SELECT oid, pg_stat_get_tuples_inserted(oid) || '.' || pg_stat_get_tuples_updated(oid) \
          || '.' || pg_stat_get_tuples_deleted(oid) AS n \
   FROM pg_class WHERE relkind IN ('r', 't', 'm') AND NOT relisshared \
    AND oid NOT IN (2619, 2840, 3429, 3430)) c \
 WHERE c.n <> '0.0.0')";

/// A worker database's reading ([`Reading`]): its relations' counters, and as the
/// summary its statistics' reset time, settings, privileges and prepared transactions.
/// `NULL` where it cannot tell: counters off, or a server before PostgreSQL 15, whose
/// statistics collector could lose counts.
fn database_fingerprint() -> String {
    format!(
        "SELECT CASE WHEN current_setting('track_counts')::bool \
                 AND current_setting('server_version_num')::int >= 150000 THEN concat_ws(':', \
           pg_stat_get_db_stat_reset_time(d.oid), d.datacl::text, d.datconnlimit, \
           (SELECT string_agg(r.setrole || '=' || c, ',' ORDER BY r.setrole, c) \
              FROM pg_db_role_setting r, unnest(r.setconfig) c \
             WHERE r.setdatabase = d.oid AND c NOT LIKE 'pgfixture.%'), \
           (SELECT count(*) FROM pg_prepared_xacts x WHERE x.database = d.datname)) END, \
         {DATABASE_COUNTERS} \
         FROM pg_database d WHERE d.datname = $1"
    )
}

/// The same for a worker schema in a database that other workers share: the counters
/// of its tables, and as the summary every catalog row of the objects in it with the
/// transaction that last wrote it (`xmin`), so that any DDL in the schema shows. For a
/// database without the DDL log (a server of the user's, `PGFIXTURE_URL`).
const SCHEMA_FINGERPRINT: &str = "\
WITH ns AS (SELECT oid FROM pg_namespace WHERE nspname = $1), \
rel AS (SELECT c.oid, c.xmin FROM pg_class c WHERE c.relnamespace = (SELECT oid FROM ns)), \
rows AS ( \
  SELECT 'c' || oid || ':' || xmin FROM rel \
  UNION ALL SELECT 'a' || a.attrelid || '.' || a.attnum || ':' || a.xmin FROM pg_attribute a JOIN rel ON rel.oid = a.attrelid \
  UNION ALL SELECT 'd' || x.oid || ':' || x.xmin FROM pg_attrdef x JOIN rel ON rel.oid = x.adrelid \
  UNION ALL SELECT 'i' || x.indexrelid || ':' || x.xmin FROM pg_index x JOIN rel ON rel.oid = x.indrelid \
  UNION ALL SELECT 'g' || x.oid || ':' || x.xmin FROM pg_trigger x JOIN rel ON rel.oid = x.tgrelid \
  UNION ALL SELECT 'r' || x.oid || ':' || x.xmin FROM pg_rewrite x JOIN rel ON rel.oid = x.ev_class \
  UNION ALL SELECT 'o' || x.oid || ':' || x.xmin FROM pg_policy x JOIN rel ON rel.oid = x.polrelid \
  UNION ALL SELECT 'q' || x.seqrelid || ':' || x.xmin FROM pg_sequence x JOIN rel ON rel.oid = x.seqrelid \
  UNION ALL SELECT 'e' || x.objoid || '.' || x.objsubid || ':' || x.xmin FROM pg_description x \
    JOIN rel ON rel.oid = x.objoid AND x.classoid = 'pg_class'::regclass \
  UNION ALL SELECT 'p' || x.oid || ':' || x.xmin FROM pg_proc x WHERE x.pronamespace = (SELECT oid FROM ns) \
  UNION ALL SELECT 't' || x.oid || ':' || x.xmin FROM pg_type x WHERE x.typnamespace = (SELECT oid FROM ns) \
  UNION ALL SELECT 'k' || x.oid || ':' || x.xmin FROM pg_constraint x WHERE x.connamespace = (SELECT oid FROM ns) \
  UNION ALL SELECT 'x' || x.oid || ':' || x.xmin FROM pg_statistic_ext x WHERE x.stxnamespace = (SELECT oid FROM ns) \
  UNION ALL SELECT 'n' || x.oid || ':' || x.xmin FROM pg_operator x WHERE x.oprnamespace = (SELECT oid FROM ns) \
  UNION ALL SELECT 'l' || x.oid || ':' || x.xmin FROM pg_collation x WHERE x.collnamespace = (SELECT oid FROM ns) \
) \
SELECT CASE WHEN current_setting('track_counts')::bool \
            AND current_setting('server_version_num')::int >= 150000 THEN \
  (SELECT md5(coalesce(string_agg(r, ',' ORDER BY r), '')) FROM rows r(r)) END, \
  (SELECT string_agg(c.oid || ':' || c.n, ',' ORDER BY c.oid) FROM ( \
     SELECT oid, pg_stat_get_tuples_inserted(oid) || '.' || pg_stat_get_tuples_updated(oid) \
            || '.' || pg_stat_get_tuples_deleted(oid) AS n FROM rel) c \
   WHERE c.n <> '0.0.0')";

/// The same where the database of the schemas has the DDL log
/// ([`provision::ddl_log`]): as the summary, the schema's last row in the log, the
/// log's triggers (one disabled would miss DDL), and the files of the schema's
/// relations (`TRUNCATE`, `CLUSTER` and `VACUUM FULL` give a relation new ones, and
/// fire no event trigger).
const SCHEMA_FINGERPRINT_LOGGED: &str = "\
WITH ns AS (SELECT oid FROM pg_namespace WHERE nspname = $1), \
rel AS (SELECT c.oid, c.relfilenode FROM pg_class c WHERE c.relnamespace = (SELECT oid FROM ns)) \
SELECT CASE WHEN current_setting('track_counts')::bool \
            AND current_setting('server_version_num')::int >= 150000 THEN concat_ws(':', \
  (SELECT max(id) FROM pgfx_ddl.log WHERE schema = $1), \
  (SELECT string_agg(evtname || ':' || evtenabled::text, ',' ORDER BY evtname) FROM pg_event_trigger), \
  (SELECT md5(coalesce(string_agg(oid || '.' || relfilenode, ',' ORDER BY oid), '')) FROM rel)) END, \
  (SELECT string_agg(c.oid || ':' || c.n, ',' ORDER BY c.oid) FROM ( \
     SELECT oid, pg_stat_get_tuples_inserted(oid) || '.' || pg_stat_get_tuples_updated(oid) \
            || '.' || pg_stat_get_tuples_deleted(oid) AS n FROM rel) c \
   WHERE c.n <> '0.0.0')";

/// The reading of `target`, on `client` (a connection to the worker's database, or to
/// the one holding the schema). `None` where it cannot tell.
pub(crate) async fn fingerprint(
    client: &deadpool_postgres::Object,
    target: Target<'_>,
    logged: &tokio::sync::OnceCell<bool>,
) -> Result<Option<Reading>> {
    Reader::prepare(client, target, logged)
        .await?
        .read(client)
        .await
}

/// A reading's third column: the first transaction id not yet started
/// ([`Reading::horizon`]); `txid_*` rather than PostgreSQL 13's `pg_*` functions, so
/// that the statement prepares on every server.
const HORIZON: &str = "txid_snapshot_xmax(txid_current_snapshot())";

/// The statement of a reading, prepared on a connection: reading then takes one
/// message, which goes out as soon as [`Reader::read`] is first polled, so that it can
/// follow other statements on the same connection in one round trip.
pub(crate) struct Reader {
    statement: tokio_postgres::Statement,
    name: String,
}

impl Reader {
    /// Prepares the reading of `target` on `client`, once per connection (cached).
    pub(crate) async fn prepare(
        client: &deadpool_postgres::Object,
        target: Target<'_>,
        logged: &tokio::sync::OnceCell<bool>,
    ) -> Result<Reader> {
        let name = match target {
            Target::Database(name, _) | Target::Schema(name, _) => name,
        };
        // Prepared once per connection, with the name written in rather than a
        // parameter: a statement without parameters keeps its plan, and planning the
        // schema's reading costs more than running it (1.5 ms against 1.2 ms).
        let sql = match target {
            Target::Database(..) => database_fingerprint(),
            // Decided once per worker, so that its two readings compare.
            Target::Schema(..) => {
                let logged = logged
                    .get_or_try_init(|| provision::ddl_logged(client))
                    .await?;
                if *logged {
                    SCHEMA_FINGERPRINT_LOGGED
                } else {
                    SCHEMA_FINGERPRINT
                }
                .to_owned()
            }
        }
        .replace("$1", &format!("'{}'", name.replace('\'', "''")));
        let sql = format!("SELECT r.*, {HORIZON} FROM ({sql}) r");
        let statement = client
            .prepare_cached(&sql)
            .await
            .map_err(reading_error(name))?;
        Ok(Reader {
            statement,
            name: name.to_owned(),
        })
    }

    /// Reads, on the connection the statement was prepared on.
    pub(crate) async fn read(&self, client: &tokio_postgres::Client) -> Result<Option<Reading>> {
        let row = client
            .query_opt(&self.statement, &[])
            .await
            .map_err(reading_error(&self.name))?;
        Ok(row.and_then(|row| {
            let summary: Option<String> = row.get(0);
            let counters: Option<String> = row.get(1);
            let horizon: Option<i64> = row.get(2);
            Reading::parse(summary?, counters.as_deref().unwrap_or(""), horizon)
        }))
    }
}

fn reading_error(name: &str) -> impl FnOnce(tokio_postgres::Error) -> Error {
    Error::pg(format!("reading what changed in {name}"))
}

/// The table of recorded rows: a row per table of a template (database mode, `key`
/// the template's name) or of a worker schema (`key` from [`schema_key`]), its rows as
/// the text of a `text[]` of row literals, or `NULL` for a table too large to record.
pub(crate) const STORE: &str = "public.pgfixture_pristine";

/// Tables larger than this (on disk) are not recorded: a test that writes one has its
/// worker rebuilt, which is then the faster way.
const MAX_RECORDED_TABLE: i64 = 1 << 20;

/// The store's key for the worker schema `name` whose oid is `oid`: a schema rebuilt
/// under the same name is a new schema with a new key.
pub(crate) fn schema_key(name: &str, oid: u32) -> String {
    format!("schema:{name}:{oid}")
}

/// Creates the store in `client`'s database unless it is there.
pub(crate) async fn ensure_store(client: &Client) -> Result<()> {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&STORE])
        .await
        .map_err(Error::pg(format!("looking up table {STORE}")))?
        .get(0);
    if exists {
        return Ok(());
    }
    provision::with_lock(client, STORE, async || {
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {STORE} (key text NOT NULL, rel oid NOT NULL, rows text, \
                   PRIMARY KEY (key, rel)); \
                 COMMENT ON TABLE {STORE} IS '{MARK} rows of templates and worker schemas'"
            ))
            .await
            .map_err(Error::pg(format!("creating table {STORE}")))
    })
    .await
}

/// Records the rows of the ordinary tables of `source`'s database (of `schema` only,
/// when given) under `key` in the store on `store` (made by [`ensure_store`]), replacing what the key held, and
/// drops the keys of templates and schemas that are gone. A table with no rows is
/// recorded too: a table without a record is never restored.
pub(crate) async fn record(
    source: &Client,
    store: &Client,
    key: &str,
    schema: Option<&str>,
) -> Result<()> {
    let tables = source
        .query(
            "SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname), \
                    pg_relation_size(c.oid) <= $2 \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname !~ '^pg_(toast|temp)' AND ($1::text IS NULL OR n.nspname = $1) \
             ORDER BY c.oid",
            &[&schema, &MAX_RECORDED_TABLE],
        )
        .await
        .map_err(Error::pg("listing the tables to record"))?;
    let mut oids: Vec<u32> = Vec::with_capacity(tables.len());
    let mut rows: Vec<Option<String>> = Vec::with_capacity(tables.len());
    let small: Vec<String> = tables
        .iter()
        .filter(|t| t.get::<_, bool>(2))
        .map(|t| {
            let (oid, name): (u32, String) = (t.get(0), t.get(1));
            format!("SELECT {oid}::oid, coalesce((SELECT array_agg(x::text) FROM ONLY {name} x), '{{}}')::text")
        })
        .collect();
    let mut read = std::collections::HashMap::new();
    if !small.is_empty() {
        for row in source
            .query(&small.join(" UNION ALL "), &[])
            .await
            .map_err(Error::pg("reading the rows to record"))?
        {
            read.insert(row.get::<_, u32>(0), row.get::<_, String>(1));
        }
    }
    for table in &tables {
        let oid: u32 = table.get(0);
        oids.push(oid);
        rows.push(read.remove(&oid));
    }
    store
        .execute(
            &format!(
                "WITH gone AS (DELETE FROM {STORE} WHERE key = $1 \
                   OR (key ~ '^pgfx_t_' AND NOT EXISTS (SELECT 1 FROM pg_database \
                        WHERE datname IN ({STORE}.key, {STORE}.key || '_new'))) \
                   OR (key ~ '^schema:' AND NOT EXISTS (SELECT 1 FROM pg_namespace \
                        WHERE oid = split_part({STORE}.key, ':', 3)::oid))) \
                 INSERT INTO {STORE} (key, rel, rows) \
                 SELECT $1, r.rel, r.rows FROM unnest($2::oid[], $3::text[]) r(rel, rows)"
            ),
            &[&key, &oids, &rows],
        )
        .await
        .map_err(Error::pg(format!("recording the rows of {key} in {STORE}")))?;
    Ok(())
}

/// The rows recorded under `key` in the store on `client`, by table oid (`None` for a
/// table too large); empty where nothing was recorded.
pub(crate) async fn recorded(client: &Client, key: &str) -> Result<Recorded> {
    let rows = match client
        .query(
            &format!("SELECT rel, rows FROM {STORE} WHERE key = $1"),
            &[&key],
        )
        .await
    {
        Ok(rows) => rows,
        // No store (a template built by an older pgfixture, or by a user who may not
        // create it), or another role's on a server of the user's: nothing recorded.
        Err(e)
            if e.code() == Some(&SqlState::UNDEFINED_TABLE)
                || e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) =>
        {
            return Ok(BTreeMap::new());
        }
        Err(e) => {
            return Err(Error::pg(format!(
                "reading the rows recorded for {key} in {STORE}"
            ))(e));
        }
    };
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The rows recorded under one key: the text of each table's rows by table oid,
/// `None` for a table too large to record ([`recorded`]).
pub(crate) type Recorded = BTreeMap<u32, Option<String>>;

/// A table to put back.
#[derive(Debug)]
pub(crate) struct Table {
    pub(crate) oid: u32,
    /// Schema-qualified and quoted.
    name: String,
    /// The columns an `INSERT` may set (not generated), quoted.
    columns: Vec<String>,
    /// The changed relations that stand for it: itself, its TOAST table.
    changed: Vec<u32>,
    /// Whether a trigger (a foreign key's too) or a rule would fire as it is put back,
    /// unless in replica mode.
    triggered: bool,
}

/// The tables whose changed rows [`restore`] can put back, from the changed relations
/// `oids` (TOAST tables stand for their tables), read on `client` (the worker's
/// database): `None` unless every one is an ordinary table outside the catalogs (in
/// `schema` only, when given) with no trigger or rule that fires in replica mode, and
/// `schema`'s oid (schema mode).
pub(crate) async fn describe(
    client: &Client,
    oids: &[u32],
    schema: Option<&str>,
) -> Result<Option<(Vec<Table>, Option<u32>)>> {
    let rows = client
        .query(
            "SELECT t.oid, t.relkind::text, n.nspname, n.oid, \
                    quote_ident(n.nspname) || '.' || quote_ident(t.relname), \
                    (SELECT array_agg(quote_ident(a.attname::text) ORDER BY a.attnum) \
                       FROM pg_attribute a WHERE a.attrelid = t.oid AND a.attnum > 0 \
                        AND NOT a.attisdropped AND a.attgenerated = ''), \
                    EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = t.oid AND g.tgenabled IN ('R', 'A')) \
                    OR EXISTS (SELECT 1 FROM pg_rewrite r WHERE r.ev_class = t.oid AND r.ev_enabled IN ('R', 'A')), \
                    ch.oid, \
                    EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = t.oid AND g.tgenabled <> 'D') \
                    OR EXISTS (SELECT 1 FROM pg_rewrite r WHERE r.ev_class = t.oid AND r.ev_enabled <> 'D') \
             FROM unnest($1::oid[]) ch(oid) \
             LEFT JOIN pg_class c ON c.oid = ch.oid \
             LEFT JOIN pg_class t ON t.oid = CASE WHEN c.relkind = 't' \
                 THEN (SELECT o.oid FROM pg_class o WHERE o.reltoastrelid = c.oid) ELSE c.oid END \
             LEFT JOIN pg_namespace n ON n.oid = t.relnamespace",
            &[&oids],
        )
        .await
        .map_err(Error::pg("looking up the tables a worker pool's test wrote"))?;
    let mut tables: Vec<Table> = Vec::new();
    let mut schema_oid = None;
    for row in rows {
        let (Some(oid), Some(kind), Some(namespace), Some(namespace_oid), Some(name)) = (
            row.get::<_, Option<u32>>(0),
            row.get::<_, Option<String>>(1),
            row.get::<_, Option<String>>(2),
            row.get::<_, Option<u32>>(3),
            row.get::<_, Option<String>>(4),
        ) else {
            return Ok(None);
        };
        let fires_in_replica: bool = row.get(6);
        let catalog = matches!(namespace.as_str(), "pg_catalog" | "information_schema")
            || namespace.starts_with("pg_toast")
            || namespace.starts_with("pg_temp");
        if kind != "r" || catalog || fires_in_replica || schema.is_some_and(|s| s != namespace) {
            return Ok(None);
        }
        if schema.is_some() {
            schema_oid = Some(namespace_oid);
        }
        let changed: u32 = row.get(7);
        match tables.iter_mut().find(|t| t.oid == oid) {
            Some(table) => table.changed.push(changed),
            None => tables.push(Table {
                oid,
                name,
                columns: row.get::<_, Option<Vec<String>>>(5).unwrap_or_default(),
                changed: vec![changed],
                triggered: row.get(8),
            }),
        }
    }
    Ok(Some((tables, schema_oid)))
}

/// The SQL that puts `tables` back as they were, with triggers, rules and foreign keys
/// off (`session_replication_role = replica`, only where one of the tables has any:
/// changing it empties the connection's plan cache, so that the next reading would be
/// planned again), then runs `then` (the sequences' and the mark's statements), all in
/// one transaction; `None` if a table it must refill has no usable record.
///
/// A table whose changed relations are all among `appended`'s oids (rows only
/// inserted) loses the rows whose `xmin` is at or after its horizon ([`Reading`]'s,
/// taken before the test): the test's transactions all began later, and every row the
/// worker held was written before (less than 2^31 transactions before, within which
/// transaction ids compare, or frozen by a server before PostgreSQL 9.4: `xmin` 2).
/// It needs no record, and leaves the worker's own rows in place. Any other table is emptied and refilled from its recorded rows (`rows`).
pub(crate) fn restore_sql(
    tables: &[Table],
    rows: &Recorded,
    appended: Option<(&[u32], u32)>,
    then: &str,
) -> Option<String> {
    let mut sql = String::from("BEGIN; SET LOCAL standard_conforming_strings = on; ");
    if tables.iter().any(|t| t.triggered) {
        sql.push_str("SET LOCAL session_replication_role = replica; ");
    }
    for table in tables {
        let name = &table.name;
        if let Some((inserted_only, horizon)) = appended
            && table.changed.iter().all(|oid| inserted_only.contains(oid))
        {
            sql.push_str(&format!(
                "DELETE FROM ONLY {name} WHERE xmin::text::bigint >= 3 \
                 AND ((xmin::text::bigint - {horizon}) & 4294967295) < 2147483648; "
            ));
            continue;
        }
        let recorded = rows.get(&table.oid)?.as_deref()?;
        sql.push_str(&format!("DELETE FROM ONLY {name}; "));
        if recorded != "{}" && !table.columns.is_empty() {
            let selected: Vec<String> = table.columns.iter().map(|c| format!("x.{c}")).collect();
            sql.push_str(&format!(
                "INSERT INTO {name} ({}) OVERRIDING SYSTEM VALUE SELECT {} \
                 FROM unnest('{}'::text[]::{name}[]) x; ",
                table.columns.join(", "),
                selected.join(", "),
                recorded.replace('\'', "''"),
            ));
        }
    }
    sql.push_str(then);
    sql.push_str("; COMMIT");
    Some(sql)
}

/// Sets every sequence of a worker back to the state the fixtures left, from the
/// setting `setting` ([`provision::sequences`]), as a fresh clone would have them.
pub(crate) fn set_sequences_sql(setting: &str) -> String {
    format!(
        "SELECT setval(split_part(s, ':', 1)::oid::regclass, split_part(s, ':', 2)::bigint, false) \
         FROM unnest(string_to_array({}, ',')) s",
        provision::database_setting_sql(setting)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(summary: &str, counters: &str) -> Reading {
        Reading::parse(summary.to_owned(), counters, Some((7 << 32) + 1000))
            .expect("a valid reading")
    }

    fn rows(oids: Vec<u32>, inserted_only: Vec<u32>) -> Change {
        Change::Rows {
            oids,
            inserted_only,
            horizon: Some(1000),
        }
    }

    #[test]
    fn equal_readings_changed_nothing() {
        let a = reading("s", "16384:1.0.0,16390:5.2.1");
        assert_eq!(a.change_to(&a.clone()), Change::None);
        assert_eq!(reading("s", "").change_to(&reading("s", "")), Change::None);
    }

    #[test]
    fn changed_and_new_counters_name_their_relations() {
        let before = reading("s", "16384:1.0.0,16390:5.2.1");
        let after = reading("s", "16384:2.0.0,16390:5.2.1,16400:0.0.1");
        assert_eq!(
            before.change_to(&after),
            rows(vec![16384, 16400], vec![16384])
        );
        // A catalog's rows (pg_description's, after a COMMENT): rebuilt, not put back.
        let commented = reading("s", "2609:1.0.0,16384:1.0.0,16390:5.2.1");
        assert_eq!(before.change_to(&commented), Change::Other);
    }

    #[test]
    fn rows_only_inserted_are_told_apart_from_rows_updated_or_deleted() {
        let before = reading("s", "16384:1.0.0,16390:5.2.1");
        let after = reading(
            "s",
            "16384:3.0.0,16390:6.3.1,16400:2.0.0,16410:0.0.1,16420:1.1.0",
        );
        assert_eq!(
            before.change_to(&after),
            rows(vec![16384, 16390, 16400, 16410, 16420], vec![16384, 16400])
        );
        // Counters of more digits compare as numbers written out, not by prefix.
        let before = reading("s", "16384:9.10.0");
        let after = reading("s", "16384:10.10.0");
        assert_eq!(before.change_to(&after), rows(vec![16384], vec![16384]));
        let after = reading("s", "16384:10.1.0");
        assert_eq!(before.change_to(&after), rows(vec![16384], vec![]));
    }

    #[test]
    fn a_reading_without_a_horizon_removes_no_rows_by_it() {
        let before = Reading::parse("s".into(), "", None).unwrap();
        let after = reading("s", "16384:1.0.0");
        assert_eq!(
            before.change_to(&after),
            Change::Rows {
                oids: vec![16384],
                inserted_only: vec![16384],
                horizon: None
            }
        );
    }

    #[test]
    fn a_changed_summary_or_a_lost_counter_is_another_change() {
        let before = reading("s", "16384:1.0.0");
        assert_eq!(
            before.change_to(&reading("t", "16384:1.0.0")),
            Change::Other
        );
        assert_eq!(before.change_to(&reading("s", "")), Change::Other);
    }

    #[test]
    fn malformed_counters_give_no_reading() {
        assert!(Reading::parse("s".into(), "16384", None).is_none());
        assert!(Reading::parse("s".into(), "x:1.0.0", None).is_none());
    }

    fn table(oid: u32, changed: &[u32]) -> Table {
        Table {
            oid,
            name: format!("public.t{oid}"),
            columns: vec!["id".into(), "\"Na,me\"".into()],
            changed: changed.to_vec(),
            triggered: oid == 1,
        }
    }

    #[test]
    fn the_restore_needs_a_record_of_every_table_it_refills() {
        let t = |oid| table(oid, &[oid]);
        let rows = BTreeMap::from([
            (1, Some("{\"(1,it's)\"}".to_owned())),
            (2, Some("{}".to_owned())),
            (3, None),
        ]);
        let sql = restore_sql(&[t(1), t(2)], &rows, None, "SELECT 1").unwrap();
        assert!(sql.starts_with(
            "BEGIN; SET LOCAL standard_conforming_strings = on; \
             SET LOCAL session_replication_role = replica; "
        ));
        // Without triggers, outside replica mode.
        let sql2 = restore_sql(&[t(2)], &rows, None, "SELECT 1").unwrap();
        assert_eq!(
            sql2,
            "BEGIN; SET LOCAL standard_conforming_strings = on; \
             DELETE FROM ONLY public.t2; SELECT 1; COMMIT"
        );
        assert!(sql.contains(
            "DELETE FROM ONLY public.t1; INSERT INTO public.t1 (id, \"Na,me\") OVERRIDING SYSTEM VALUE \
             SELECT x.id, x.\"Na,me\" FROM unnest('{\"(1,it''s)\"}'::text[]::public.t1[]) x;"
        ));
        // An empty table is only emptied.
        assert!(sql.contains("DELETE FROM ONLY public.t2; SELECT 1; COMMIT"));
        assert!(restore_sql(&[t(3)], &rows, None, "").is_none());
        assert!(restore_sql(&[t(4)], &rows, None, "").is_none());
    }

    #[test]
    fn tables_only_inserted_into_lose_the_rows_after_the_horizon() {
        let rows = BTreeMap::from([(1, Some("{\"(1,a)\"}".to_owned()))]);
        // Table 3 (no record) and its TOAST table 4 had rows inserted only; table 1
        // had rows updated.
        let tables = [table(1, &[1]), table(3, &[3, 4])];
        let sql = restore_sql(&tables, &rows, Some((&[3, 4], 4_000_000_000)), "SELECT 1").unwrap();
        assert!(sql.contains("DELETE FROM ONLY public.t1; INSERT INTO public.t1"));
        assert!(sql.contains(
            "DELETE FROM ONLY public.t3 WHERE xmin::text::bigint >= 3 \
             AND ((xmin::text::bigint - 4000000000) & 4294967295) < 2147483648; SELECT 1; COMMIT"
        ));
        // Its TOAST table updated: the table is refilled, and needs its record.
        assert!(restore_sql(&tables, &rows, Some((&[3], 1)), "").is_none());
        // Without a horizon, too.
        assert!(restore_sql(&tables, &rows, None, "").is_none());
    }

    #[test]
    fn the_horizon_keeps_the_low_32_bits_of_the_transaction_id() {
        let r = Reading::parse("s".into(), "", Some((3 << 32) + 42)).unwrap();
        assert_eq!(r.horizon, Some(42));
    }
}
