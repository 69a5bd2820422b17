//! One deadpool-postgres pool per worker, with connections that outlive test runtimes.

use std::time::Duration;

use deadpool_postgres::{
    Connect, Manager, ManagerConfig, Pool, QueueMode, RecyclingMethod, Runtime,
};
use futures::future::BoxFuture;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Config as PgConfig, NoTls};

use crate::runtime;
use crate::server::Server;
use crate::stream::TestStream;

/// Connections per worker when `PGFIXTURE_POOL_SIZE` is not set. From the sweep of
/// `examples/tune.rs` (BENCHMARKS.md): tests that hold a handle and run four queries
/// at once through more handles were fastest with 8 at every worker count, and 4 made
/// one of the five wait. Connections open only when a test needs them, so the size
/// costs nothing until used; it is lowered to fit the server's `max_connections`.
pub(crate) const DEFAULT_POOL_SIZE: usize = 8;
/// Connections kept free on every server for pgfixture's maintenance connections and
/// PostgreSQL's `superuser_reserved_connections` (3 by default).
pub(crate) const RESERVED_CONNECTIONS: usize = 10;

/// Opens connections on pgfixture's background runtime, so that their tasks survive
/// the runtime of the test that happened to need a new one.
#[derive(Debug, Clone, Copy)]
struct BackgroundConnect;

impl Connect for BackgroundConnect {
    fn connect(
        &self,
        pg_config: &PgConfig,
    ) -> BoxFuture<'_, Result<(Client, JoinHandle<()>), tokio_postgres::Error>> {
        let pg_config = pg_config.clone();
        Box::pin(runtime::run(async move {
            let (client, task) = match test_stream(&pg_config).await {
                Some(stream) => {
                    let (client, connection) = pg_config.connect_raw(stream, NoTls).await?;
                    (client, spawn_connection(connection))
                }
                // The driver's own connect, for its error (or a host we do not open).
                None => {
                    let (client, connection) = pg_config.connect(NoTls).await?;
                    (client, spawn_connection(connection))
                }
            };
            Ok((client, task))
        }))
    }
}

fn spawn_connection<F>(connection: F) -> JoinHandle<()>
where
    F: Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "pooled connection closed");
        }
    })
}

/// The socket of a pooled connection, wrapped in the stream that turns the code
/// under test's transactions into savepoints ([`crate::stream`]); `None` when it
/// cannot be opened (the driver's own connect then reports why).
async fn test_stream(pg_config: &PgConfig) -> Option<TestStream<Socket>> {
    use tokio_postgres::config::Host;
    let port = pg_config.get_ports().first().copied().unwrap_or(5432);
    let limit = pg_config
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(5));
    let socket = match pg_config.get_hosts().first()? {
        Host::Tcp(host) => {
            let tcp =
                runtime::timeout(limit, tokio::net::TcpStream::connect((host.as_str(), port)))
                    .await
                    .ok()?
                    .ok()?;
            // As the driver's own connect does: small messages go out at once.
            tcp.set_nodelay(true).ok()?;
            Socket::Tcp(tcp)
        }
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            let unix = runtime::timeout(limit, tokio::net::UnixStream::connect(path))
                .await
                .ok()?
                .ok()?;
            Socket::Unix(unix)
        }
    };
    Some(TestStream::new(socket))
}

/// A TCP or Unix socket.
#[derive(Debug)]
pub(crate) enum Socket {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl tokio::io::AsyncRead for Socket {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Socket {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The settings of a worker's connections for code under test: to `dbname` on
/// `server`, with a `search_path` set at connection start in schema mode.
pub(crate) fn pg_config(server: &Server, dbname: &str, search_path: Option<&str>) -> PgConfig {
    with_search_path(server.pg_config(dbname), search_path)
}

/// The same for pgfixture's own connections ([`Server::own_pg_config`]).
pub(crate) fn own_pg_config(server: &Server, dbname: &str, search_path: Option<&str>) -> PgConfig {
    with_search_path(server.own_pg_config(dbname), search_path)
}

fn with_search_path(mut pg_config: PgConfig, search_path: Option<&str>) -> PgConfig {
    if let Some(schema) = search_path {
        let path = crate::provision::schema_search_path(schema);
        pg_config.options(format!("-c search_path={path}"));
    }
    pg_config
}

/// Maintenance connections to `server` (its admin database). Each is handed out with
/// its session's advisory locks released: a build cancelled by its acquire timeout
/// could leave one held.
pub(crate) fn admin(server: &Server, wait: Duration) -> Pool {
    let recycling = RecyclingMethod::Custom("SELECT pg_advisory_unlock_all()".to_owned());
    pool(
        own_pg_config(server, &server.admin_db, None),
        recycling,
        ADMIN_POOL_SIZE,
        wait,
    )
}

/// Maintenance connections kept per server: provisioning and resets of parallel
/// workers each hold one for a moment.
const ADMIN_POOL_SIZE: usize = 4;

/// Maintenance connections to `dbname` on `server` (schema mode: the database of the
/// worker schemas, where schemas are built). The fixtures run on them, so each is
/// cleared (`SET`s, roles, locks, temporary tables) before it is handed out again.
pub(crate) fn maintenance(server: &Server, dbname: &str, wait: Duration) -> Pool {
    pool(
        own_pg_config(server, dbname, None),
        RecyclingMethod::Clean,
        ADMIN_POOL_SIZE,
        wait,
    )
}

/// The pool of worker connections to `dbname` on `server`, optionally with a
/// `search_path` set at connection start (schema mode), named `application_name`.
pub(crate) fn build(
    server: &Server,
    dbname: &str,
    search_path: Option<&str>,
    application_name: &str,
    size: usize,
    wait: Duration,
) -> Pool {
    let mut pg_config = own_pg_config(server, dbname, search_path);
    pg_config.application_name(application_name);
    // A test's transaction always ends in ROLLBACK, so a returned connection is
    // clean; a closed one is detected without a query.
    pool(pg_config, RecyclingMethod::Fast, size, wait)
}

/// A pool of `size` connections with `pg_config`, opened on the background runtime,
/// the most recently returned one handed out first: it is warm (its statements and
/// caches are hot), and idle ones beyond what is needed stay idle.
fn pool(
    pg_config: PgConfig,
    recycling_method: RecyclingMethod,
    size: usize,
    wait: Duration,
) -> Pool {
    let manager = Manager::from_connect(
        pg_config,
        BackgroundConnect,
        ManagerConfig { recycling_method },
    );
    Pool::builder(manager)
        .max_size(size)
        .queue_mode(QueueMode::Lifo)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(wait))
        .create_timeout(Some(wait))
        .build()
        .expect("a pool with a runtime and a size always builds")
}
