//! A server killed mid-run (`docker kill`, `kill -9` of a local postgres): the test in
//! flight fails, and the next `worker_db()` gets a fresh, working server. Each test uses
//! servers of its own run, so killing them disturbs no other test.

use std::time::Duration;

mod common;

use common::own_fixture;
use pgfixture::bollard;
use pgfixture::{Fixture, Isolation};

/// Kills the server `db` is connected to, the hard way.
async fn kill_server(fixture: &Fixture, db: &pgfixture::TestDb) {
    match fixture.stats().backend {
        Some("docker") => {
            let docker = common::docker().await.expect("the Docker daemon");
            let containers = common::run_containers(&fixture.config().run_id).await;
            assert_eq!(containers.len(), 1, "{containers:?}");
            let id = containers[0].id.clone().unwrap();
            let options = bollard::query_parameters::KillContainerOptionsBuilder::new()
                .signal("SIGKILL")
                .build();
            docker.kill_container(&id, Some(options)).await.unwrap();
        }
        Some("local") => {
            let backend: i32 = db
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get(0);
            let stat = std::fs::read_to_string(format!("/proc/{backend}/stat")).unwrap();
            let postmaster = stat
                .rsplit(')')
                .next()
                .unwrap()
                .split_whitespace()
                .nth(1)
                .unwrap()
                .to_owned();
            let status = std::process::Command::new("kill")
                .args(["-9", &postmaster])
                .status()
                .unwrap();
            assert!(status.success());
        }
        other => panic!("unknown backend {other:?}"),
    }
}

async fn survives_a_killed_server(isolation: Isolation) {
    let fixture = own_fixture("fault", isolation);
    let db = fixture.worker_db().await.unwrap();
    let before: String = db
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .unwrap()
        .get(0);
    kill_server(&fixture, &db).await;

    // The test in flight fails with the driver's error, not a hang. (A backend whose
    // postmaster was SIGKILLed may answer until it notices, within moments.)
    let failed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if db.query_one("SELECT 1", &[]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        failed.is_ok(),
        "queries on a killed server kept succeeding or hung"
    );
    drop(db);

    // The next test gets a fresh server, with its fixtures.
    let db = fixture
        .worker_db()
        .await
        .expect("a fresh server after the kill");
    let after: String = db
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(before, after, "still the killed server");
    let users: i64 = db
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(users, 1, "the fresh server has the fixtures");
}

#[tokio::test]
async fn a_killed_shared_server_is_replaced() {
    survives_a_killed_server(Isolation::Database).await;
}

#[tokio::test]
async fn a_killed_worker_server_is_replaced() {
    survives_a_killed_server(Isolation::Container).await;
}

/// A server with no free connection slot: the next worker's provisioning fails at once
/// with an error that says which setting to lower.
#[tokio::test]
async fn a_server_out_of_connections_says_what_to_lower() {
    let one = own_fixture("full", Isolation::Database);
    let fixture = Fixture::builder()
        .config(one.config().clone())
        .workers(2)
        .build()
        .unwrap();
    // Worker 0, and the server's credentials.
    let pool = fixture.worker_pool().await.unwrap();
    let pg = pool.pg_config().clone();
    let mut held = Vec::new();
    let exhausted = loop {
        match pg.connect(pgfixture::tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                held.push(client);
                assert!(held.len() < 1000, "the server never ran out of connections");
            }
            Err(e) => break e,
        }
    };
    assert_eq!(
        exhausted.code(),
        Some(&pgfixture::tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS),
        "{exhausted}"
    );

    // Worker 1 needs new connections: another thread holds no slot yet.
    let other = fixture.clone();
    let error = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(other.worker_db())
            .map(|_| ())
    })
    .join()
    .unwrap()
    .expect_err("no connection slot is free");
    let message = error.to_string();
    assert!(
        matches!(error, pgfixture::Error::OutOfConnections { .. }),
        "{message}"
    );
    assert!(
        message.contains("PGFIXTURE_POOL_SIZE") && message.contains("max_connections"),
        "{message}"
    );

    // The held connections' backends exit a moment after their clients are dropped,
    // and the release below resets the worker on a connection of its own: wait for a
    // free slot (CI once hit "too many clients" here).
    drop(held);
    let waited = std::time::Instant::now();
    while pg.connect(pgfixture::tokio_postgres::NoTls).await.is_err() {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "no connection slot freed up 30 s after the held connections were dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pool.release().await.unwrap();
}

/// The same through the sqlx driver, whose connections wait in the worker's stash: the
/// next handle after the kill gets a fresh server, not a dead connection.
#[tokio::test]
async fn a_killed_server_is_replaced_for_sqlx_too() {
    use pgfixture::sqlx;
    let fixture = own_fixture("fsqx", Isolation::Database);
    let db = fixture.worker_db().await.unwrap();
    let mut conn = pgfixture::sqlx::TestDb::acquire(&fixture).await.unwrap();
    let before: String = sqlx::query_scalar("SELECT pg_postmaster_start_time()::text")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    drop(conn); // into the worker's stash
    kill_server(&fixture, &db).await;
    drop(db);
    // A backend whose postmaster was SIGKILLed may answer until it notices, within
    // moments: until then the stashed connection still works. After, the next handle
    // must come from a fresh server, not fail on the dead connection.
    // A connection to a killed container can also go silent rather than fail (its
    // address vanished with it): each attempt is bounded, and one that hangs is given
    // up, its connection discarded when the handle's end fails.
    let fresh = tokio::time::timeout(Duration::from_secs(150), async {
        loop {
            let attempt = tokio::time::timeout(Duration::from_secs(10), async {
                let mut conn = pgfixture::sqlx::TestDb::acquire(&fixture)
                    .await
                    .expect("a handle after the kill");
                let started: Result<String, _> =
                    sqlx::query_scalar("SELECT pg_postmaster_start_time()::text")
                        .fetch_one(&mut *conn)
                        .await;
                (conn, started)
            })
            .await;
            // The backend died under this query: a test in flight fails.
            let Ok((conn, Ok(after))) = attempt else {
                continue;
            };
            if after != before {
                return conn;
            }
            drop(conn);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let mut conn = fresh.expect("still the killed server after two and a half minutes");
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(users, 1, "the fresh server has the fixtures");
}
