//! A worker's connection settings, for code under test that opens connections of its
//! own (LISTEN/NOTIFY, notices, cancellation, other drivers).

use std::fmt;
use std::sync::Arc;

use crate::config::redact;
use crate::server::Server;

/// A `postgres://` URL of a worker's database, for drivers that take one (sqlx, diesel,
/// `psql`). `Debug` and `Display` show it with the password replaced by `***`;
/// [`DatabaseUrl::as_str`] gives the whole URL.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(Arc<str>);

impl DatabaseUrl {
    /// The whole URL, password included: give it to a driver, never to a log.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    #[cfg(test)]
    pub(crate) fn for_tests(url: &str) -> DatabaseUrl {
        DatabaseUrl(url.into())
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({:?})", redact(&self.0))
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

/// The connection settings of one worker's database (or schema), made once per worker.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) pg_config: tokio_postgres::Config,
    /// What pgfixture's own connections use: through the server's Unix socket when it
    /// has one ([`Server::own_pg_config`]).
    #[cfg_attr(not(any(feature = "sqlx", feature = "sqlx-0_8")), allow(dead_code))]
    pub(crate) own_pg_config: tokio_postgres::Config,
    pub(crate) url: DatabaseUrl,
    /// Through the port published on 127.0.0.1 (Docker); else the same as above.
    pub(crate) published_pg_config: tokio_postgres::Config,
    pub(crate) published_url: DatabaseUrl,
    /// What restarts the worker's sequences at the fixtures' values, where the worker
    /// keeps them ([`crate::provision::restart_sequences`]).
    pub(crate) restart_sequences: Option<String>,
    /// Schema mode: the connections' `search_path`, for drivers that set it themselves.
    #[cfg_attr(not(any(feature = "sqlx", feature = "sqlx-0_8")), allow(dead_code))]
    pub(crate) search_path: Option<String>,
}

impl Settings {
    pub(crate) fn new(
        server: &Server,
        dbname: &str,
        search_path: Option<&str>,
        restart_sequences: Option<String>,
    ) -> Arc<Self> {
        Self::build(server, server, dbname, search_path, restart_sequences)
    }

    /// [`Settings::new`], but the connections code under test opens with them are
    /// named `name` (pgfixture's own keep the server's name): a test handle's, whose
    /// release finds those connections by that name.
    pub(crate) fn handed_out_as(
        name: &str,
        server: &Server,
        dbname: &str,
        search_path: Option<&str>,
        restart_sequences: Option<String>,
    ) -> Arc<Self> {
        let mut theirs = server.clone();
        theirs.application_name = name.to_owned();
        Self::build(&theirs, server, dbname, search_path, restart_sequences)
    }

    /// The settings of code under test's connections from `server`, and of pgfixture's
    /// own from `own` (the same server, named otherwise).
    fn build(
        server: &Server,
        own: &Server,
        dbname: &str,
        search_path: Option<&str>,
        restart_sequences: Option<String>,
    ) -> Arc<Self> {
        let pg_config = crate::pool::pg_config(server, dbname, search_path);
        let own_pg_config = crate::pool::own_pg_config(own, dbname, search_path);
        let url = url_for(server, &server.host, server.port, dbname, search_path);
        let (published_pg_config, published_url) = match server.published_port {
            Some(port) => {
                // `host` adds a host to the list: start from one without any.
                let mut published = tokio_postgres::Config::new();
                copy_without_address(&pg_config, &mut published);
                published.host("127.0.0.1").port(port);
                (
                    published,
                    url_for(server, "127.0.0.1", port, dbname, search_path),
                )
            }
            None => (pg_config.clone(), url.clone()),
        };
        Arc::new(Settings {
            pg_config,
            own_pg_config,
            url,
            published_pg_config,
            published_url,
            restart_sequences,
            search_path: search_path.map(crate::provision::schema_search_path),
        })
    }
}

/// Everything of `from` but its hosts and ports.
fn copy_without_address(from: &tokio_postgres::Config, to: &mut tokio_postgres::Config) {
    if let Some(user) = from.get_user() {
        to.user(user);
    }
    if let Some(password) = from.get_password() {
        to.password(password);
    }
    if let Some(dbname) = from.get_dbname() {
        to.dbname(dbname);
    }
    if let Some(options) = from.get_options() {
        to.options(options);
    }
    if let Some(name) = from.get_application_name() {
        to.application_name(name);
    }
    if let Some(timeout) = from.get_connect_timeout() {
        to.connect_timeout(*timeout);
    }
}

/// `postgres://user:password@host:port/dbname?application_name=...`, with the
/// `search_path` as an `options` parameter (understood by libpq, sqlx and
/// tokio-postgres) in schema mode.
fn url_for(
    server: &Server,
    host: &str,
    port: u16,
    dbname: &str,
    search_path: Option<&str>,
) -> DatabaseUrl {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let credentials = if server.password.is_empty() {
        encode(&server.user)
    } else {
        format!("{}:{}", encode(&server.user), encode(&server.password))
    };
    let mut url = format!(
        "postgres://{credentials}@{host}:{port}/{}?application_name={}",
        encode(dbname),
        encode(&server.application_name)
    );
    if let Some(schema) = search_path {
        let path = crate::provision::schema_search_path(schema);
        url.push_str(&format!(
            "&options={}",
            encode(&format!("-c search_path={path}"))
        ));
    }
    DatabaseUrl(url.into())
}

/// Percent-encodes all but RFC 3986's unreserved characters.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_encode_and_hide_the_password() {
        let mut server = Server::loopback(5433, "s3cr/t".into(), "x".into());
        server.application_name = "pgfixture/run1".into();
        let settings = Settings::new(&server, "pgfx_w_1", Some("pgfx_w_1"), None);
        let url = settings.url.as_str();
        assert_eq!(
            url,
            "postgres://postgres:s3cr%2Ft@127.0.0.1:5433/pgfx_w_1?application_name=pgfixture%2Frun1\
             &options=-c%20search_path%3Dpgfx_w_1%2Cpgfx_shared"
        );
        // The URL parses back to the same settings.
        let parsed: tokio_postgres::Config = url.parse().unwrap();
        assert_eq!(parsed.get_password(), Some(&b"s3cr/t"[..]));
        assert_eq!(parsed.get_options(), settings.pg_config.get_options());
        for shown in [format!("{:?}", settings.url), settings.url.to_string()] {
            assert!(!shown.contains("s3cr"), "{shown}");
        }
        assert!(!format!("{:?}", settings.pg_config).contains("s3cr"));
        assert_eq!(settings.published_url, settings.url);
    }

    /// A test handle's settings name the connections code under test opens with them,
    /// by which its release finds them; pgfixture's own keep the run's name.
    #[test]
    fn settings_handed_out_name_their_connections_and_not_pgfixtures() {
        let mut server = Server::loopback(5433, "pw".into(), "x".into())
            .with_socket_dir(std::path::Path::new("/tmp/pgfx"));
        server.application_name = "pgfixture/run1".into();
        server.published_port = Some(32781);
        let name = "pgfixture/run1/test-abc-w0";
        let settings = Settings::handed_out_as(name, &server, "db", Some("s"), None);
        for config in [&settings.pg_config, &settings.published_pg_config] {
            assert_eq!(config.get_application_name(), Some(name));
        }
        for url in [&settings.url, &settings.published_url] {
            let parsed: tokio_postgres::Config = url.as_str().parse().unwrap();
            assert_eq!(parsed.get_application_name(), Some(name), "{url}");
        }
        assert_eq!(
            settings.own_pg_config.get_application_name(),
            Some("pgfixture/run1")
        );
        assert_eq!(
            settings.own_pg_config.get_options(),
            settings.pg_config.get_options()
        );
    }

    /// sqlx's options for pgfixture's own connections go through the server's socket.
    #[cfg(feature = "sqlx")]
    #[test]
    fn sqlxs_own_options_go_through_the_servers_socket() {
        let server = Server::loopback(5433, "pw".into(), "x".into())
            .with_socket_dir(std::path::Path::new("/tmp/pg fx"));
        let settings = Settings::new(&server, "db", Some("s"), None);
        let own = crate::driver::sqlx::own_connect_options(&settings);
        assert_eq!(
            own.get_socket().map(|p| p.as_path()),
            Some(std::path::Path::new("/tmp/pg fx"))
        );
        assert_eq!(own.get_port(), 5433);
        assert_eq!(own.get_database(), Some("db"));
        let search_path = settings.search_path.as_deref().unwrap();
        assert_eq!(
            own.get_options(),
            Some(&*format!("-c search_path={search_path}"))
        );
    }

    #[test]
    fn a_container_reached_directly_also_gives_its_published_port() {
        let mut server = Server::loopback(5432, "pw".into(), "c".into());
        server.host = "172.17.0.2".into();
        server.published_port = Some(32781);
        let settings = Settings::new(&server, "db", None, None);
        assert!(settings.url.as_str().contains("@172.17.0.2:5432/db"));
        assert!(
            settings
                .published_url
                .as_str()
                .contains("@127.0.0.1:32781/db")
        );
        let published = &settings.published_pg_config;
        assert_eq!(published.get_ports(), [32781]);
        assert_eq!(published.get_hosts().len(), 1);
        assert_eq!(published.get_password(), Some(&b"pw"[..]));
        assert_eq!(published.get_dbname(), Some("db"));
    }
}
