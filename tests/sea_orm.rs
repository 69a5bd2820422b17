//! sea-orm on pgfixture: a `DatabaseConnection` built on the worker's sqlx pool,
//! commits allowed, and the worker reset before the next test. sea-orm cannot adopt a
//! connection inside a transaction that pgfixture opened, so this is its way.

use pgfixture::sqlx::PgPool;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, SqlxPostgresConnector, Statement,
    TransactionTrait,
};

async fn sea_orm_notes(db: &DatabaseConnection) -> i64 {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT count(*) AS n FROM notes WHERE owner = 'sea-orm'",
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get("", "n").unwrap()
}

/// Two tests that each commit rows and expect to be alone: whichever runs second on a
/// worker fails if the first one's commits survived.
async fn commits_and_is_alone(pool: PgPool) {
    let db = SqlxPostgresConnector::from_sqlx_postgres_pool(pool);
    assert_eq!(
        sea_orm_notes(&db).await,
        0,
        "another test's commit leaked in"
    );
    db.execute_unprepared("INSERT INTO notes (owner, body) VALUES ('sea-orm', 'x')")
        .await
        .unwrap();
    let txn = db.begin().await.unwrap();
    txn.execute_unprepared("INSERT INTO notes (owner, body) VALUES ('sea-orm', 'y')")
        .await
        .unwrap();
    txn.commit().await.unwrap();
    assert_eq!(sea_orm_notes(&db).await, 2);
}

#[pgfixture::test]
async fn sea_orm_commits_on_the_worker_pool(pool: PgPool) {
    commits_and_is_alone(pool).await;
}

#[pgfixture::test]
async fn sea_orm_sees_nothing_of_the_other_test(pool: PgPool) {
    commits_and_is_alone(pool).await;
}
