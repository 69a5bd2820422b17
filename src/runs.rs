//! When the processes of a run on this machine last recorded on a server of the user's
//! (`PGFIXTURE_URL`) that the run is alive ([`crate::provision::touch_run`]). A process
//! that finds its worker ready renews the record only when no process of its run on
//! this machine did within a quarter of the grace period ([`renew_after`]): most
//! processes of a nextest run then need no maintenance connection, and the record
//! stays fresh for any other run's sweep.

use std::path::PathBuf;
use std::time::Duration;

use crate::server::Server;

/// How long a run's record may age before a process of it that found its worker ready
/// renews it: a quarter of the grace period (`PGFIXTURE_GRACE`, or the idle time kept
/// under `PGFIXTURE_REUSE`) within which a sweep counts a recorded run alive. Every
/// process renews it under a grace of zero.
fn renew_after(grace: Duration) -> Duration {
    grace / 4
}

/// Notes of runs older than this are removed as others are written.
const FORGOTTEN_AFTER: Duration = Duration::from_secs(3600);

/// The directory of the notes, one file per server and run whose time is the last
/// record's.
fn dir() -> PathBuf {
    crate::server::user_dir().join("url-runs")
}

fn path(server: &Server, run: &str) -> PathBuf {
    let key = crate::digest::sha256_hex(
        format!("{}:{}:{}:{run}", server.host, server.port, server.admin_db),
        8,
    );
    dir().join(key)
}

/// Whether a process of `run` on this machine recorded on `server` that the run is
/// alive within [`renew_after`] `grace`.
pub(crate) fn touched_recently(server: &Server, run: &str, grace: Duration) -> bool {
    std::fs::metadata(path(server, run))
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < renew_after(grace)))
}

/// Notes that this process recorded `run` alive on `server` just now. A note that
/// cannot be written only makes the next process record the run again.
pub(crate) fn touched(server: &Server, run: &str) {
    let path = path(server, run);
    if std::fs::create_dir_all(dir()).is_err() {
        return;
    }
    for entry in std::fs::read_dir(dir()).into_iter().flatten().flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > FORGOTTEN_AFTER));
        if old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    if let Ok(file) = std::fs::File::create(path) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}
