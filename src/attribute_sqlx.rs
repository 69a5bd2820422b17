// `#[sqlx::test]`'s types as handles of `#[pgfixture::test]`, written once for each
// sqlx major pgfixture serves and included into a module per major (`src/attribute.rs`),
// which brings that major's names into scope: `PgPool`, `PoolConnection`, `Postgres`,
// `PgConnection`, `PgConnectOptions`, `PgPoolOptions`, `PgTransactionManager`, the
// traits `Connection` and `TransactionManager`, the driver's `WorkerPool` of that
// major, and the shims `raw_execute`, `own_connect_options` and `sqlx_error` (what
// differs between the majors).

/// Applies the test's fixtures on `conn`; an error names the file.
async fn apply(args: &TestArgs, conn: &mut PgConnection) -> Result<()> {
    for fixture in args.fixtures {
        if let Err(e) = raw_execute(&mut *conn, fixture.sql).await {
            return Err(Error::Fixture {
                path: args.fixture_path(fixture),
                line: None,
                statement: None,
                message: e.to_string(),
            });
        }
    }
    Ok(())
}

/// The worker's kept sqlx pool, the test's fixtures applied before the test through
/// the worker's own connection, committed, as `#[sqlx::test]` applies them (an error
/// names the file, the line and the statement).
async fn kept_pool(fixture: &Fixture, args: &TestArgs) -> Result<WorkerPool> {
    let pool = WorkerPool::acquire(fixture).await?;
    if !args.fixtures.is_empty() {
        let client = pool.core().get().await.map_err(|source| Error::Pool {
            worker: pool.worker_id().to_string(),
            source,
        })?;
        args.apply_files(&client).await?;
    }
    Ok(pool)
}

/// `#[sqlx::test]`'s `PgPool`: the worker's pool, kept from test to test, commits
/// allowed.
#[diagnostic::do_not_recommend]
impl TestHandle for PgPool {
    type Guard = WorkerPool;

    async fn acquire(fixture: &Fixture, args: &TestArgs) -> Result<(Self, WorkerPool)> {
        let pool = kept_pool(fixture, args).await?;
        Ok(((*pool).clone(), pool))
    }

    async fn release(guard: WorkerPool) -> Result<()> {
        guard.release().await
    }
}

/// `#[sqlx::test]`'s two parameters, `(opts: PgPoolOptions, connect:
/// PgConnectOptions)`: options for pools and connections of the test's own on the
/// worker, commits allowed. Its guard is the core's worker pool, as for
/// [`PgConnection`]: the connect options carry its `application_name`, so its
/// release ends the test's connections still open (their backends terminated),
/// then puts back the rows they wrote.
#[diagnostic::do_not_recommend]
impl TestHandle for (PgPoolOptions, PgConnectOptions) {
    type Guard = crate::WorkerPool;

    async fn acquire(fixture: &Fixture, args: &TestArgs) -> Result<(Self, crate::WorkerPool)> {
        let (pool, ()) = <crate::WorkerPool as TestHandle>::acquire(fixture, args).await?;
        // As `#[sqlx::test]`'s: 5 connections at most, fewer when the worker's
        // pool (which fits the server's `max_connections`) is smaller.
        let options = PgPoolOptions::new()
            .max_connections(crate::driver::sqlx_pool_size(&pool.state))
            .acquire_timeout(fixture.config().acquire_timeout);
        // Through the server's Unix socket when it has one, as pgfixture's own.
        let connect = own_connect_options(&pool.settings);
        Ok(((options, connect), pool))
    }

    async fn release(guard: crate::WorkerPool) -> Result<()> {
        guard.release().await
    }
}

/// Begins the test's transaction on a connection of the worker through sqlx's
/// transaction manager: the code under test's `begin()` is a savepoint.
async fn begin(conn: &mut PgConnection, args: &TestArgs) -> Result<()> {
    <PgTransactionManager as TransactionManager>::begin(conn, None)
        .await
        .map_err(sqlx_error("starting the test's transaction"))?;
    apply(args, conn).await
}

/// `#[sqlx::test]`'s `PoolConnection<Postgres>`: a connection of the worker's kept
/// pool, inside a transaction that is never committed; the worker is reset after the
/// test if anything changed.
#[diagnostic::do_not_recommend]
impl TestHandle for PoolConnection<Postgres> {
    type Guard = WorkerPool;

    async fn acquire(fixture: &Fixture, args: &TestArgs) -> Result<(Self, WorkerPool)> {
        let pool = WorkerPool::acquire(fixture).await?;
        let mut conn = pool
            .acquire()
            .await
            .map_err(sqlx_error("taking a connection of the worker pool"))?;
        begin(&mut conn, args).await?;
        Ok((conn, pool))
    }

    async fn release(guard: WorkerPool) -> Result<()> {
        guard.release().await
    }
}

/// A `PgConnection` of the test's own, on the worker, inside a transaction that is
/// never committed; the worker is reset after the test if anything changed. Its
/// guard is the core's worker pool, which marks and reads the worker: the sqlx
/// driver's kept pool would open a connection the test never uses.
#[diagnostic::do_not_recommend]
impl TestHandle for PgConnection {
    type Guard = crate::WorkerPool;

    async fn acquire(fixture: &Fixture, args: &TestArgs) -> Result<(Self, crate::WorkerPool)> {
        // The connection opens here, on the test's runtime, as soon as the worker
        // is checked, while the core marks and reads it; through the server's Unix
        // socket when it has one, as pgfixture's own connections.
        let (checked, settings) = tokio::sync::oneshot::channel();
        let opener: crate::fixture::PoolOpener = Box::new(move |_, settings, _| {
            let _ = checked.send(Arc::clone(settings));
        });
        let connect = async {
            let settings = settings.await.ok()?;
            Some(PgConnection::connect_with(&own_connect_options(&settings)).await)
        };
        let (pool, conn) =
            futures::future::join(fixture.worker_pool_opening(Some(opener)), connect).await;
        let pool = pool?;
        let conn = match conn {
            Some(conn) => conn,
            None => PgConnection::connect_with(&own_connect_options(&pool.settings)).await,
        };
        let mut conn = conn.map_err(|e| {
            sqlx_error("connecting to the worker")(e).with_connection_advice()
        })?;
        begin(&mut conn, args).await?;
        Ok((conn, pool))
    }

    async fn release(guard: crate::WorkerPool) -> Result<()> {
        guard.release().await
    }
}
