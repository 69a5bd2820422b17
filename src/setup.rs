//! Code that builds part of the template ([`crate::FixtureBuilder::setup`]): migrations
//! written in Rust (sea-orm-migration's `Migrator::up`, refinery's embedded ones), or
//! rows made by the application's own code. It runs once into each template (in schema
//! mode once into each worker schema; in container mode once per server), after the
//! migrations and before the fixtures, on a connection of its own to the database being
//! built. Compiled code has no content to hash: the version the user gives keys the
//! template in its place.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::settings::DatabaseUrl;
use crate::{Error, Result};

/// An error of the user's setup code, as it gave it.
type SetupError = Box<dyn std::error::Error + Send + Sync>;

type Run =
    dyn Fn(DatabaseUrl) -> BoxFuture<'static, std::result::Result<(), SetupError>> + Send + Sync;

/// The setup code and the version that names what it builds.
#[derive(Clone)]
pub(crate) struct Setup {
    version: Arc<str>,
    run: Arc<Run>,
}

impl Setup {
    pub(crate) fn new<F, Fut, E>(version: &str, setup: F) -> Setup
    where
        F: Fn(DatabaseUrl) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<SetupError>,
    {
        let run =
            move |url: DatabaseUrl| -> BoxFuture<'static, std::result::Result<(), SetupError>> {
                let work = setup(url);
                Box::pin(async move { work.await.map_err(Into::into) })
            };
        Setup {
            version: version.into(),
            run: Arc::new(run),
        }
    }

    /// What keys the template besides the files' content.
    pub(crate) fn version(&self) -> &str {
        &self.version
    }

    /// Runs the code on `url`, the database (and in schema mode the schema, first on
    /// its `search_path`) being built. A panic in it is an error too, so that the
    /// half-built database or schema is dropped.
    pub(crate) async fn run(&self, url: DatabaseUrl) -> Result<()> {
        use futures::FutureExt;
        let outcome = std::panic::AssertUnwindSafe((self.run)(url))
            .catch_unwind()
            .await;
        let message = match outcome {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(error)) => error_chain(&*error),
            Err(panic) => match panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
            {
                Some(said) => format!("it panicked: {said}"),
                None => "it panicked".to_owned(),
            },
        };
        Err(Error::Setup {
            version: self.version.to_string(),
            message,
        })
    }
}

/// An error and its sources, as one line.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

/// The version only: a configuration's text names its workers in every process, and
/// the same code gives a new closure each time a fixture is built.
impl fmt::Debug for Setup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Setup(version {:?})", self.version)
    }
}

/// By version: a test that builds its fixture again with the same code (a new closure)
/// gets the same workers and template.
impl PartialEq for Setup {
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url() -> DatabaseUrl {
        DatabaseUrl::for_tests("postgres://u@localhost/db")
    }

    #[tokio::test]
    async fn errors_and_panics_name_the_version_and_what_went_wrong() {
        let failing = Setup::new("v2", |_| async {
            Err::<(), _>(std::io::Error::other("the table exists"))
        });
        let error = failing.run(url()).await.unwrap_err().to_string();
        assert!(
            error.contains("\"v2\"") && error.contains("the table exists"),
            "{error}"
        );
        let panicking = Setup::new("v3", |_| async {
            panic!("no such migration");
            #[allow(unreachable_code)]
            Ok::<(), std::io::Error>(())
        });
        let error = panicking.run(url()).await.unwrap_err().to_string();
        assert!(
            error.contains("\"v3\"") && error.contains("panicked: no such migration"),
            "{error}"
        );
        let fine = Setup::new("v4", |given: DatabaseUrl| async move {
            assert_eq!(given.as_str(), "postgres://u@localhost/db");
            Ok::<(), std::io::Error>(())
        });
        fine.run(url()).await.unwrap();
    }

    #[test]
    fn setups_are_the_same_by_their_version() {
        let a = Setup::new("1", |_| async { Ok::<(), std::io::Error>(()) });
        let b = Setup::new("1", |_| async { Ok::<(), std::io::Error>(()) });
        let c = Setup::new("2", |_| async { Ok::<(), std::io::Error>(()) });
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(format!("{a:?}"), "Setup(version \"1\")");
    }
}
