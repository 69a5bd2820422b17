//! sea-orm on pgfixture: a `DatabaseConnection` built on the worker's sqlx pool,
//! commits allowed, and the worker reset before the next test. sea-orm cannot adopt a
//! connection inside a transaction that pgfixture opened, so this is its way. Its
//! migrations, written in Rust (sea-orm-migration), build the template through
//! `FixtureBuilder::setup`.

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

/// sea-orm-migration's migrations, as a project keeps them in its `migration` crate.
mod migration {
    use sea_orm_migration::prelude::*;

    pub struct Migrator;

    impl MigratorTrait for Migrator {
        fn migrations() -> Vec<Box<dyn MigrationTrait>> {
            vec![Box::new(CreatePosts), Box::new(SeedPosts)]
        }
    }

    struct CreatePosts;

    impl MigrationName for CreatePosts {
        fn name(&self) -> &str {
            "m20260101_000001_create_posts"
        }
    }

    #[async_trait::async_trait]
    impl MigrationTrait for CreatePosts {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .create_table(
                    Table::create()
                        .table("posts")
                        .col(
                            ColumnDef::new("id")
                                .integer()
                                .not_null()
                                .auto_increment()
                                .primary_key(),
                        )
                        .col(ColumnDef::new("title").string().not_null())
                        .to_owned(),
                )
                .await
        }
    }

    struct SeedPosts;

    impl MigrationName for SeedPosts {
        fn name(&self) -> &str {
            "m20260101_000002_seed_posts"
        }
    }

    #[async_trait::async_trait]
    impl MigrationTrait for SeedPosts {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .get_connection()
                .execute_unprepared("INSERT INTO posts (title) VALUES ('seeded')")
                .await
                .map(drop)
        }
    }
}

/// The fixture of a project whose schema is sea-orm-migration's `Migrator`: it runs
/// once into the template; its version names the migrations it holds.
fn migrated() -> pgfixture::Fixture {
    use sea_orm_migration::MigratorTrait;
    pgfixture::Fixture::builder()
        .no_migrations()
        .no_fixtures()
        .setup("m20260101_000002", |url| async move {
            let db = sea_orm::Database::connect(url.as_str()).await?;
            migration::Migrator::up(&db, None).await?;
            db.close().await
        })
        .build()
        .expect("fixture")
}

/// Every test gets the template the migrator built: its tables and seed rows, and
/// `seaql_migrations` as sea-orm-migration wrote it, so that the application's own
/// `Migrator::up` at start-up finds nothing to do. What a test commits is gone for
/// the next one.
#[tokio::test]
async fn sea_orm_migrations_build_the_template_once() {
    use sea_orm_migration::MigratorTrait;
    for round in 0..3 {
        let pool = pgfixture::sqlx::WorkerPool::acquire(&migrated())
            .await
            .unwrap();
        let db = SqlxPostgresConnector::from_sqlx_postgres_pool((*pool).clone());
        let pending = migration::Migrator::get_pending_migrations(&db)
            .await
            .unwrap();
        assert!(pending.is_empty(), "round {round}: nothing left to apply");
        let applied = migration::Migrator::get_applied_migrations(&db)
            .await
            .unwrap();
        let names: Vec<&str> = applied.iter().map(|m| m.name()).collect();
        assert_eq!(
            names,
            [
                "m20260101_000001_create_posts",
                "m20260101_000002_seed_posts"
            ]
        );
        migration::Migrator::up(&db, None).await.unwrap();
        let titles = db
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT title FROM posts ORDER BY id",
            ))
            .await
            .unwrap();
        let titles: Vec<String> = titles
            .iter()
            .map(|r| r.try_get("", "title").unwrap())
            .collect();
        assert_eq!(titles, ["seeded"], "round {round}: a commit leaked in");
        db.execute_unprepared("INSERT INTO posts (title) VALUES ('committed')")
            .await
            .unwrap();
        drop(db);
        pool.release().await.unwrap();
    }
}
