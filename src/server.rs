//! A running PostgreSQL server and the connections pgfixture makes to it.

use std::fmt;
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use crate::{Error, Result};

/// Settings for throwaway data: nothing needs to survive a crash of a test server.
pub(crate) const THROWAWAY_SETTINGS: &[(&str, &str)] = &[
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    // Room for every worker pool of a run plus pgfixture's own short-lived
    // maintenance connections; each slot costs a few hundred bytes of shared memory.
    ("max_connections", "300"),
];

/// Superuser of every server pgfixture starts.
pub(crate) const SUPERUSER: &str = "postgres";

/// How to reach a server. The password never appears in `Debug` output.
#[derive(Clone)]
pub(crate) struct Server {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: String,
    pub(crate) password: String,
    /// Container name or data directory, for messages.
    pub(crate) name: String,
    /// The database maintenance connections go to.
    pub(crate) admin_db: String,
    /// `application_name` of every connection: `pgfixture/<run>`, which tells a shared
    /// server (the url backend) which runs are alive.
    pub(crate) application_name: String,
    /// The port the server publishes on 127.0.0.1 when `host` and `port` are another
    /// address (a container reached at its own address on its Docker network).
    pub(crate) published_port: Option<u16>,
    /// The directory of the server's Unix socket, where pgfixture's own connections go
    /// (a local server, which trusts its socket): no TCP handshake and no SCRAM
    /// exchange, about 0.7 ms less per connection. What code under test gets stays
    /// `host` and `port`, with the password.
    pub(crate) socket_dir: Option<String>,
}

/// The `application_name` prefix of pgfixture's connections.
pub(crate) const APPLICATION: &str = "pgfixture/";

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("name", &self.name)
            .field("admin_db", &self.admin_db)
            .field("published_port", &self.published_port)
            .field("socket_dir", &self.socket_dir)
            .finish()
    }
}

impl Server {
    /// A server pgfixture started, reached on 127.0.0.1 as its superuser.
    pub(crate) fn loopback(port: u16, password: String, name: String) -> Self {
        Server {
            host: "127.0.0.1".to_owned(),
            port,
            user: SUPERUSER.to_owned(),
            password,
            name,
            admin_db: "postgres".to_owned(),
            application_name: "pgfixture".to_owned(),
            published_port: None,
            socket_dir: None,
        }
    }

    /// The same server, whose Unix socket in `dir` pgfixture's own connections use.
    pub(crate) fn with_socket_dir(mut self, dir: &std::path::Path) -> Self {
        self.socket_dir = Some(dir.display().to_string());
        self
    }

    /// The existing server `url` names, reached as its user.
    pub(crate) fn from_url(url: &crate::config::ServerUrl) -> Self {
        let pg = url.pg_config();
        Server {
            host: url.host(),
            port: pg.get_ports().first().copied().unwrap_or(5432),
            user: pg.get_user().unwrap_or("postgres").to_owned(),
            password: pg
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default(),
            name: format!("PGFIXTURE_URL server {}", url.host()),
            admin_db: pg.get_dbname().unwrap_or("postgres").to_owned(),
            application_name: "pgfixture".to_owned(),
            published_port: None,
            socket_dir: None,
        }
    }

    /// Names the run in the `application_name` of the server's connections.
    pub(crate) fn for_run(mut self, run: &str) -> Self {
        self.application_name = format!("{APPLICATION}{run}");
        self
    }

    /// The settings code under test gets: `host` and `port`, with the password.
    pub(crate) fn pg_config(&self, dbname: &str) -> tokio_postgres::Config {
        self.config_at(&self.host, dbname)
    }

    /// The settings of pgfixture's own connections: through the server's Unix socket
    /// when it has one ([`Server::socket_dir`]), else as [`Server::pg_config`].
    pub(crate) fn own_pg_config(&self, dbname: &str) -> tokio_postgres::Config {
        self.config_at(self.socket_dir.as_deref().unwrap_or(&self.host), dbname)
    }

    fn config_at(&self, host: &str, dbname: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(host)
            .port(self.port)
            .user(&self.user)
            .dbname(dbname)
            .application_name(&self.application_name)
            .connect_timeout(Duration::from_secs(5));
        if !self.password.is_empty() {
            config.password(&self.password);
        }
        config
    }

    /// A connection whose task runs on the current runtime (pgfixture calls this on its
    /// background runtime only).
    pub(crate) async fn connect(&self, dbname: &str) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = self.own_pg_config(dbname).connect(NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    #[cfg_attr(not(feature = "docker"), allow(dead_code))]
    pub(crate) async fn admin(&self) -> Result<Client> {
        self.connect(&self.admin_db)
            .await
            .map_err(Error::pg(format!("connecting to server {}", self.name)))
    }

    /// Waits until a real connection succeeds (a log line is not enough: the official
    /// image prints "ready to accept connections" for its temporary init server too).
    /// `alive` is asked about once a second whether the server can still come up.
    pub(crate) async fn wait_ready<F, Fut>(&self, deadline: Instant, mut alive: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let mut last_check = Instant::now();
        loop {
            let attempt = async {
                let client = self.connect("postgres").await?;
                client.simple_query("SELECT 1").await.map(|_| ())
            };
            let error = match crate::runtime::timeout(Duration::from_secs(2), attempt).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => {
                    let fatal = e.code().is_some_and(|c| {
                        *c == SqlState::INVALID_PASSWORD
                            || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                    });
                    if fatal {
                        return Err(Error::pg(format!(
                            "server {} refused pgfixture's credentials",
                            self.name
                        ))(e));
                    }
                    e.to_string()
                }
                Err(_) => "connection attempt timed out".to_owned(),
            };
            if Instant::now() >= deadline {
                return Err(Error::AcquireTimeout {
                    timeout: Duration::ZERO,
                    waiting_for: format!(
                        "server {} to accept connections (last error: {error})",
                        self.name
                    ),
                });
            }
            if last_check.elapsed() >= Duration::from_secs(1) {
                alive().await?;
                last_check = Instant::now();
            }
            // A server starts in about 0.1 s: polled often, so that little of the
            // wait is the poll's.
            crate::runtime::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The effective uid of this process: the owner of `/proc/self`.
pub(crate) fn current_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// pgfixture's directory for this user: `$TMPDIR/pgfixture-<uid>`.
pub(crate) fn user_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("pgfixture-{}", current_uid().unwrap_or(0)))
}

/// The password of the container `name`, derived from a secret that only this user
/// can read (`$TMPDIR/pgfixture-<uid>/secret`, made on first use). Every process of the
/// user finds a container's password this way, so the password itself never travels
/// through the Docker API, whose client logs request and response bodies at debug level;
/// the container gets only its SCRAM verifier ([`scram_verifier`]).
pub(crate) fn derived_password(name: &str) -> Result<String> {
    let secret = user_secret()?;
    Ok(crate::digest::sha256_hex(format!("{secret}:{name}"), 18))
}

/// PBKDF2 rounds of the SCRAM verifiers pgfixture makes. PostgreSQL's default, 4096,
/// exists to slow down guessing weak passwords from a stolen verifier; pgfixture's
/// passwords are 144 random bits, which no guessing reaches, while every connection
/// pays the rounds on the client: in an unoptimised test build, 4096 rounds cost
/// about 40 ms per connection.
const SCRAM_ITERATIONS: u32 = 1;

/// What PostgreSQL stores for `password` (`SCRAM-SHA-256$<rounds>:<salt>$...`): given
/// as the password (to `initdb --pwfile`, or as `POSTGRES_PASSWORD`), it is stored as
/// is, and it cannot be used to log in.
pub(crate) fn scram_verifier(password: &str) -> Result<String> {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use sha2::{Digest, Sha256};
    let salt = random_bytes::<16>()?;
    // The password is hex, which SASLprep leaves as it is.
    let salted = pbkdf2(password.as_bytes(), &salt, SCRAM_ITERATIONS);
    let client_key = hmac(&salted, &[b"Client Key"]);
    let stored_key = Sha256::digest(client_key);
    let server_key = hmac(&salted, &[b"Server Key"]);
    Ok(format!(
        "SCRAM-SHA-256${SCRAM_ITERATIONS}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(stored_key),
        STANDARD.encode(server_key)
    ))
}

fn user_secret() -> Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = user_dir();
    let path = dir.join("secret");
    let read = || std::fs::read_to_string(&path).map(|s| s.trim().to_owned());
    if let Ok(secret) = read()
        && secret.len() >= 32
    {
        return Ok(secret);
    }
    let io = |what: &str| {
        Error::io(format!(
            "{what} {} (pgfixture's per-user secret)",
            path.display()
        ))
    };
    // The directory stays traversable: local servers run as another user below it
    // when the tests run as root. The file's mode protects the secret.
    std::fs::create_dir_all(&dir).map_err(io("creating the directory of"))?;
    // Written in full under a name of its own, then published with a hard link, which
    // fails if another process published first: every process reads the same secret.
    let staging = dir.join(format!("secret.{}", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staging)
        .map_err(io("writing"))?;
    file.write_all(random_password()?.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io("writing"))?;
    let linked = std::fs::hard_link(&staging, &path);
    let _ = std::fs::remove_file(&staging);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("publishing")(e)),
    }
    read().map_err(io("reading"))
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes keys of any size");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Hi() of RFC 5802: PBKDF2 with HMAC-SHA-256, one block.
fn pbkdf2(password: &[u8], salt: &[u8], rounds: u32) -> [u8; 32] {
    let mut round = hmac(password, &[salt, &1u32.to_be_bytes()]);
    let mut salted = round;
    for _ in 1..rounds {
        round = hmac(password, &[&round]);
        salted
            .iter_mut()
            .zip(round.iter())
            .for_each(|(s, r)| *s ^= r);
    }
    salted
}

/// `N` bytes from the kernel's generator.
fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    use std::io::Read;
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(Error::io("reading /dev/urandom"))?;
    Ok(bytes)
}

/// A random password for a new server: 144 bits, in hex.
pub(crate) fn random_password() -> Result<String> {
    Ok(random_bytes::<18>()?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Prints one line on stderr if a start takes longer than a couple of seconds, so a
/// user knows why the first test waits. Dropping it cancels the line.
pub(crate) struct SlowNotice(tokio::task::JoinHandle<()>);

/// How long a start may take before the user is told why the test waits.
const SLOW_AFTER: Duration = Duration::from_secs(2);

impl SlowNotice {
    pub(crate) fn new(what: String) -> Self {
        SlowNotice(tokio::spawn(async move {
            crate::runtime::sleep(SLOW_AFTER).await;
            eprintln!("pgfixture: {what} (first start only; later tests reuse it)");
        }))
    }
}

impl Drop for SlowNotice {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_matches_published_vectors() {
        let hex = |b: [u8; 32]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        // RFC 7914, section 11 (the first 32 bytes), and the common 4096-round vector.
        assert_eq!(
            hex(pbkdf2(b"passwd", b"salt", 1)),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
        assert_eq!(
            hex(pbkdf2(b"password", b"salt", 4096)),
            "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a"
        );
    }

    #[test]
    fn container_passwords_are_derived_per_name_and_verifiers_hide_them() {
        let a = derived_password("pgfixture-run-abc-shared").unwrap();
        assert_eq!(a, derived_password("pgfixture-run-abc-shared").unwrap());
        assert_ne!(a, derived_password("pgfixture-run-abd-shared").unwrap());
        assert_eq!(a.len(), 36);
        let verifier = scram_verifier(&a).unwrap();
        assert!(verifier.starts_with("SCRAM-SHA-256$1:"), "{verifier}");
        assert!(!verifier.contains(&a));
    }
}
