//! sea-orm 1 (on sqlx 0.8) on pgfixture, with the feature `sqlx-0_8`: a
//! `DatabaseConnection` built on the test's sqlx 0.8 `PgPool`, commits allowed, and
//! what the test wrote put back before the next test. sea-orm cannot adopt a
//! connection inside a transaction that pgfixture opened, so this is its way.

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, SqlxPostgresConnector, Statement,
    TransactionTrait,
};
use sqlx::PgPool;

async fn owners(db: &impl ConnectionTrait) -> Vec<String> {
    db.query_all(Statement::from_string(
        DbBackend::Postgres,
        "SELECT owner FROM notes ORDER BY id",
    ))
    .await
    .unwrap()
    .iter()
    .map(|row| row.try_get("", "owner").unwrap())
    .collect()
}

/// Commits rows through sea-orm, in a transaction of its own and outside one, after
/// asserting that no other test's commits are there: whichever of the tests runs
/// second on a worker fails if the first one's survived.
async fn commits_and_is_alone(pool: PgPool, owner: &str) {
    let db: DatabaseConnection = SqlxPostgresConnector::from_sqlx_postgres_pool(pool);
    assert_eq!(
        owners(&db).await,
        ["seed"],
        "another test's commit leaked in"
    );
    db.execute(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO notes (owner, body) VALUES ($1, 'x')",
        [owner.into()],
    ))
    .await
    .unwrap();
    let txn = db.begin().await.unwrap();
    txn.execute(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO notes (owner, body) VALUES ($1, 'y')",
        [owner.into()],
    ))
    .await
    .unwrap();
    txn.commit().await.unwrap();
    // A transaction rolled back leaves nothing.
    let txn = db.begin().await.unwrap();
    txn.execute_unprepared("INSERT INTO notes (owner, body) VALUES ('rolled back', 'z')")
        .await
        .unwrap();
    txn.rollback().await.unwrap();
    assert_eq!(owners(&db).await, ["seed", owner, owner]);
}

macro_rules! sea_orm_tests {
    ($($name:ident),*) => {
        $(
            #[pgfixture::test]
            async fn $name(pool: PgPool) {
                commits_and_is_alone(pool, stringify!($name)).await;
            }
        )*
    };
}

sea_orm_tests!(sea_orm_1_a, sea_orm_1_b, sea_orm_1_c, sea_orm_1_d);

/// The fixtures apply before sea-orm sees the pool. The pool is named through
/// sea-orm's own re-export of sqlx, as a crate with no `sqlx` dependency of its own
/// names it: the attribute's code for it names no `sqlx`.
#[pgfixture::test(fixtures("users"))]
async fn sea_orm_1_sees_the_fixtures(pool: sea_orm::sqlx::PgPool) {
    let db = SqlxPostgresConnector::from_sqlx_postgres_pool(pool);
    assert_eq!(owners(&db).await, ["seed", "fixture"]);
}
