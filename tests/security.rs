//! Nobody else gets in: servers listen on loopback only, authenticate TCP connections
//! with a password (no `trust` rule for TCP), refuse a wrong password, and pgfixture's
//! `Debug` output never shows the password. Runs on the backend the environment selects.

use pgfixture::Fixture;
mod common;

/// No `trust` rule for TCP. Inside a container, loopback rules may trust (the official
/// image's do): only processes in the container reach its loopback.
#[tokio::test]
async fn tcp_connections_need_the_password() {
    let db = pgfixture::worker_db().await.unwrap();
    let docker = Fixture::from_env().unwrap().stats().backend == Some("docker");
    let rules: Vec<(String, String, String)> = db
        .query(
            "SELECT type, coalesce(address, 'all'), auth_method FROM pg_hba_file_rules \
             WHERE type LIKE 'host%' AND error IS NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(!rules.is_empty(), "no TCP rules at all");
    for (kind, address, method) in &rules {
        let loopback = address == "127.0.0.1" || address == "::1";
        if docker && loopback {
            continue;
        }
        assert!(
            method == "scram-sha-256" || method == "md5",
            "a {kind} rule for {address} lets TCP connections in with {method}: {rules:?}"
        );
    }
}

/// pgfixture's own connections (a handle's among them) go through the server's Unix
/// socket, which trusts its clients: a local server's always; a container's when its
/// daemon runs on this Linux host at its default socket, through a directory of the
/// user's bind-mounted into it. That directory is where only this user can enter.
#[tokio::test]
async fn own_connections_use_a_socket_only_this_user_reaches() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let db = pgfixture::worker_db().await.unwrap();
    let on_socket: bool = db
        .query_one("SELECT inet_client_addr() IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    let default_daemon = std::env::var("DOCKER_HOST").map_or(true, |host| host.is_empty());
    match Fixture::from_env().unwrap().stats().backend {
        Some("local") => assert!(on_socket, "a local server's handle is not on its socket"),
        Some("docker") if cfg!(target_os = "linux") && default_daemon => {
            assert!(on_socket, "a container's handle is not on its socket");
            let uid = std::fs::metadata("/proc/self").unwrap().uid();
            let dir = std::env::temp_dir()
                .join(format!("pgfixture-{uid}"))
                .join("sockets");
            let meta = std::fs::metadata(&dir).unwrap();
            assert_eq!(meta.uid(), uid, "{} is not the user's", dir.display());
            assert_eq!(
                meta.permissions().mode() & 0o777,
                0o700,
                "others can enter {}",
                dir.display()
            );
        }
        _ => {}
    }
}

/// The port the test can reach the server on from this host, and whether the server
/// itself listens on this host's loopback (a local server, or a container on the host's
/// network) rather than behind a port Docker publishes.
async fn host_port(db: &pgfixture::TestDb) -> (u16, bool) {
    let stats = Fixture::from_env().unwrap().stats();
    // The server's own setting: the handle of a local server is on its Unix socket,
    // where `inet_server_port()` is null.
    let server_port: i32 = db
        .query_one("SELECT current_setting('port')::int", &[])
        .await
        .unwrap()
        .get(0);
    if stats.backend == Some("local") {
        return (server_port as u16, true);
    }
    let run = Fixture::from_env().unwrap().config().run_id.clone();
    let containers = common::run_containers(&run).await;
    // Containers on the host's network: their labels name the ports they listen on
    // (in container mode, one per worker).
    let labelled: Vec<u16> = containers
        .iter()
        .filter_map(|c| c.labels.as_ref()?.get("pgfixture.port")?.parse().ok())
        .collect();
    if !labelled.is_empty() {
        let port = server_port as u16;
        assert!(
            labelled.contains(&port),
            "no container's label names the server's port {port}: {labelled:?}"
        );
        return (port, true);
    }
    // Docker's bridge: the published port of this run's container.
    let ports: Vec<_> = containers
        .iter()
        .flat_map(|c| c.ports.clone().unwrap_or_default())
        .collect();
    for port in &ports {
        assert_eq!(
            port.ip.as_deref(),
            Some("127.0.0.1"),
            "a container port is published beyond loopback: {ports:?}"
        );
    }
    let port = ports
        .iter()
        .find_map(|p| p.public_port)
        .expect("a published port");
    (port, false)
}

#[tokio::test]
async fn a_wrong_password_is_refused_and_servers_listen_on_loopback_only() {
    let db = pgfixture::worker_db().await.unwrap();
    let (port, on_loopback) = host_port(&db).await;
    let listen: String = db
        .query_one("SHOW listen_addresses", &[])
        .await
        .unwrap()
        .get(0);
    if on_loopback {
        assert_eq!(
            listen, "127.0.0.1",
            "a server on this host's network listens beyond loopback"
        );
    }
    let mut config = pgfixture::tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .password("not-the-password")
        .dbname("postgres");
    let error = config
        .connect(pgfixture::tokio_postgres::NoTls)
        .await
        .err()
        .expect("a wrong password must be refused");
    assert_eq!(
        error.code(),
        Some(&pgfixture::tokio_postgres::error::SqlState::INVALID_PASSWORD),
        "{error:?}"
    );
}

#[tokio::test]
async fn debug_output_shows_no_password() {
    let fixture = Fixture::from_env().unwrap();
    let db = fixture.worker_db().await.unwrap();
    // The password of the server is what the superuser's stored hash was made from;
    // look for any long hex run (pgfixture's passwords are 36 hex digits) instead.
    let printed = format!(
        "{fixture:?} {db:?} {:?} {:?}",
        fixture.config(),
        fixture.stats()
    );
    let longest_hex_run = printed
        .split(|c: char| !c.is_ascii_hexdigit())
        .map(str::len)
        .max()
        .unwrap_or(0);
    assert!(
        longest_hex_run < 36,
        "something that looks like a password is printed: {printed}"
    );
}

/// Everything pgfixture logs (every level, the driver's records included), the
/// `Debug` output of its types, and its errors, through a server start, provisioning,
/// a test that commits (reported and reset), a worker pool, and a refused connection:
/// none of it holds the server's password.
#[tokio::test]
async fn the_password_is_never_logged_printed_or_in_an_error() {
    use std::sync::{Arc, Mutex};
    let logs = Arc::new(Mutex::new(Vec::<u8>::new()));
    let sink = Arc::clone(&logs);
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || SharedWriter(Arc::clone(&sink)))
        .try_init()
        .expect("the only subscriber of this test binary");

    let fixture = common::own_fixture("secret", pgfixture::Isolation::Database);
    let db = fixture.worker_db().await.unwrap();
    db.batch_execute("COMMIT").await.unwrap();
    let db_debug = format!("{db:?}");
    drop(db);
    let pool = fixture.worker_pool().await.unwrap();
    let password = String::from_utf8(pool.pg_config().get_password().unwrap().to_vec()).unwrap();
    assert!(password.len() >= 16);
    let mut printed = format!(
        "{fixture:?} {db_debug} {pool:?} {:?} {:?} {:?}",
        pool.pg_config(),
        fixture.config(),
        fixture.stats()
    );

    // Errors: a refused login (the right user and port, a wrong password) and a
    // statement error.
    let mut wrong = pool.pg_config().clone();
    wrong.password("not-the-password");
    let Err(refused) = wrong.connect(pgfixture::tokio_postgres::NoTls).await else {
        panic!("a wrong password was accepted");
    };
    printed.push_str(&format!("{refused} {refused:?}"));
    let db = fixture.worker_db().await.unwrap();
    let failed: pgfixture::Error = db.batch_execute("SELECT nope").await.unwrap_err().into();
    printed.push_str(&format!("{failed} {failed:?}"));
    drop(db);
    pool.release().await.unwrap();

    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("worker ready") && logs.contains("committed its transaction"),
        "the logs were not captured: {logs}"
    );
    let leaking: Vec<&str> = logs.lines().filter(|l| l.contains(&password)).collect();
    assert!(
        leaking.is_empty(),
        "the password is in these log lines: {}",
        leaking.join("\n").replace(&password, "<PASSWORD>")
    );
    assert!(
        !printed.contains(&password),
        "the password is printed: {printed}"
    );
}

/// A writer into a shared buffer, for the log subscriber.
struct SharedWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where pgfixture connects: a local server on loopback; a container on the host's
/// network (`PGFIXTURE_DOCKER_NETWORK`: by default where the daemon's network is this
/// process's) on loopback at the port its label names; any other container at its own
/// address on the Docker network when the daemon runs on this host, past the published
/// port's userland proxy (`docker-proxy`), which costs every round trip 0.1–0.3 ms.
#[tokio::test]
async fn connections_go_to_loopback_or_to_the_containers_own_address() {
    let fixture = Fixture::from_env().unwrap();
    let pool = fixture.worker_pool().await.unwrap();
    let host = match &pool.pg_config().get_hosts()[0] {
        pgfixture::tokio_postgres::config::Host::Tcp(h) => h.clone(),
        other => panic!("expected a TCP host, got {other:?}"),
    };
    match fixture.stats().backend {
        Some("docker") if std::env::var_os("DOCKER_HOST").is_none() => {
            let run = fixture.config().run_id.clone();
            let containers = common::run_containers(&run).await;
            let labelled: Vec<u16> = containers
                .iter()
                .filter_map(|c| c.labels.as_ref()?.get("pgfixture.port")?.parse().ok())
                .collect();
            let host_network = match std::env::var("PGFIXTURE_DOCKER_NETWORK").as_deref() {
                Ok("host") => true,
                Ok("bridge") => false,
                _ => std::path::Path::new("/sys/class/net/docker0").exists(),
            };
            assert_eq!(
                !labelled.is_empty(),
                host_network,
                "containers on the host's network: {labelled:?}"
            );
            if host_network {
                assert_eq!(host, "127.0.0.1");
                assert!(
                    labelled.contains(&pool.pg_config().get_ports()[0]),
                    "connected to port {:?}, not to the container's {labelled:?}",
                    pool.pg_config().get_ports()
                );
                return;
            }
            let addresses: Vec<String> = containers
                .iter()
                .flat_map(|c| {
                    let networks = c.network_settings.clone().and_then(|n| n.networks);
                    networks.unwrap_or_default().into_values()
                })
                .filter_map(|endpoint| endpoint.ip_address)
                .collect();
            assert!(
                addresses.contains(&host),
                "connected to {host}, not to the container's own address {addresses:?}"
            );
            assert_eq!(pool.pg_config().get_ports(), [5432]);
        }
        Some("docker") => {}
        _ => assert_eq!(host, "127.0.0.1"),
    }
}
