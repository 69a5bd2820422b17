//! The worker pool of sqlx 0.8 (feature `sqlx-0_8`), for `#[sqlx::test]`'s `PgPool`
//! and `PoolConnection` of a crate on sqlx 0.8: the same code as sqlx 0.9's
//! (`src/driver/sqlx.rs`, `kept`), over sqlx 0.8's types, which are the test crate's
//! own (cargo builds one sqlx 0.8). It needs no sqlx 0.9: a crate on sqlx 0.8 builds
//! only its own.

use ::sqlx08::postgres::{
    PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow, PgSslMode, PgTransactionManager,
};
use ::sqlx08::{Column, Executor, Row, TransactionManager};
use futures::future::BoxFuture;

type SqlxError = ::sqlx08::Error;

// Through `Executor` with the SQL as `&str`, which takes no arguments and so goes
// as one simple query (several statements), as `raw_sql` does: its futures are
// boxed and `Send`, where sqlx 0.8's `raw_sql` gives futures that the compiler
// cannot prove `Send` for every lifetime.
pub(crate) fn raw_execute<'c>(
    conn: &'c mut PgConnection,
    sql: &'c str,
) -> BoxFuture<'c, Result<(), SqlxError>> {
    Box::pin(async move { Executor::execute(conn, sql).await.map(drop) })
}

fn raw_rows<'c>(
    conn: &'c mut PgConnection,
    sql: &'c str,
) -> BoxFuture<'c, Result<Vec<PgRow>, SqlxError>> {
    Executor::fetch_all(conn, sql)
}

/// A worker keeps one sqlx pool: sqlx 0.9's goes when sqlx 0.8's is made.
fn close_other_kept(worker: &crate::fixture::Worker) {
    #[cfg(feature = "sqlx")]
    super::sqlx::kept::close_kept(worker);
    #[cfg(not(feature = "sqlx"))]
    let _ = worker;
}

include!("sqlx_kept.rs");
