//! What a process knows of the fixtures and migrations without reading them.
//!
//! Every test process needs the content hash of the fixtures and migrations: it names
//! the template and the worker databases and schemas. Under nextest every test is a
//! process of its own, and in an unoptimised test build hashing is slow (SHA-256 runs
//! at about 25 MB/s; schema mode also splits every statement): a migrations folder of
//! 200 files and 70 KB cost 6.5 ms per process in database mode and 19 ms in schema
//! mode, more than the whole of a process that opens one connection.
//!
//! So the first process that reads them records the hash under a fingerprint of the
//! files' metadata (name, size, modification and change times, inode), in
//! `$TMPDIR/pgfixture-<uid>/fixtures-cache/`. A process whose files show the same
//! fingerprint takes the hash from there, and reads the files only if it has to build
//! something from them. A file's change time changes with every write, whatever its
//! modification time is set to afterwards. As git does with its index, a record is
//! made only when every file is older than the reading by a few seconds, so that a file
//! written in the same clock tick as it was read (coarse timestamps) is never taken
//! for unchanged.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{Config, Isolation};

/// How much older than the reading every file must be for its hash to be recorded: more
/// than the coarsest timestamps of common file systems (FAT's two seconds).
pub(crate) const SETTLED: Duration = Duration::from_secs(3);

/// The first line of a record; a record of another format is not read.
const FORMAT: &str = "pgfixture fixtures cache 1";

/// The metadata of the files a configuration reads, as text.
#[derive(Debug, PartialEq)]
pub(crate) struct Fingerprint {
    /// The directories read, one per line: what names the record.
    dirs: String,
    /// Everything else, compared whole.
    files: String,
    /// The newest modification or change time among the files.
    newest: SystemTime,
}

impl Fingerprint {
    /// The fingerprint of what `config` reads; `None` when a directory or file cannot
    /// be listed (the reading reports it).
    pub(crate) fn of(config: &Config) -> Option<Fingerprint> {
        let mut dirs = format!(
            "pgfixture {} sqlx={} isolation={}\n",
            env!("CARGO_PKG_VERSION"),
            cfg!(feature = "sqlx"),
            match config.isolation {
                Isolation::Database => "database",
                Isolation::Schema => "schema",
                Isolation::Container => "container",
            }
        );
        let mut files = String::new();
        let mut newest = UNIX_EPOCH;
        for (kind, dir) in [
            ("migrations", &config.migrations),
            ("fixtures", &config.fixtures),
        ] {
            let Some(dir) = dir else { continue };
            let _ = writeln!(dirs, "{kind} {}", dir.display());
            let _ = writeln!(files, "{kind}");
            list(dir, &mut files, &mut newest)?;
        }
        #[cfg(feature = "sqlx")]
        if let Some(migrator) = config.migrator {
            dirs.push_str("migrator\n");
            for m in migrator.0.iter() {
                let prefix: [u8; 8] = m.checksum.get(..8)?.try_into().ok()?;
                let _ = writeln!(
                    files,
                    "{} {:?} {} {:x}",
                    m.version,
                    m.description,
                    m.migration_type.is_down_migration(),
                    u64::from_le_bytes(prefix)
                );
            }
        }
        Some(Fingerprint {
            dirs,
            files,
            newest,
        })
    }

    /// The hash recorded under this fingerprint, if any.
    pub(crate) fn lookup(&self) -> Option<String> {
        let path = self.record(&cache_dir(false)?);
        let text = std::fs::read_to_string(path).ok()?;
        let rest = text.strip_prefix(FORMAT)?.strip_prefix('\n')?;
        let rest = rest.strip_prefix(self.dirs.as_str())?;
        let rest = rest.strip_prefix(self.files.as_str())?;
        let hash = rest.strip_prefix("hash ")?.trim_end();
        (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hash.to_owned())
    }

    /// Records `hash` as the hash of files read at `read_at` (taken before this
    /// fingerprint), unless a file is too recent for its timestamps to be trusted.
    /// Failing to record costs the next process a reading, nothing else.
    pub(crate) fn store(&self, read_at: SystemTime, hash: &str) {
        if !settled(self.newest, read_at) {
            return;
        }
        let Some(dir) = cache_dir(true) else { return };
        sweep(&dir);
        let path = self.record(&dir);
        let staging = path.with_extension(format!("{}.tmp", std::process::id()));
        let text = format!("{FORMAT}\n{}{}hash {hash}\n", self.dirs, self.files);
        if std::fs::write(&staging, text).is_err() || std::fs::rename(&staging, &path).is_err() {
            let _ = std::fs::remove_file(&staging);
        }
    }

    /// The record's file: named by the directories, so that a configuration has one
    /// record, replaced when its files change.
    fn record(&self, dir: &Path) -> PathBuf {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(self.dirs.as_bytes());
        let name: String = digest[..10].iter().map(|b| format!("{b:02x}")).collect();
        dir.join(name)
    }
}

/// Whether files whose newest timestamp is `newest`, read at `read_at`, cannot have
/// changed since within one tick of their timestamps.
fn settled(newest: SystemTime, read_at: SystemTime) -> bool {
    newest
        .checked_add(SETTLED)
        .is_some_and(|settled| settled <= read_at)
}

/// Appends a line per entry of `dir` to `out` (every entry: the migrations' layout
/// depends on them all), in the directory's own order, which stays as it is while the
/// directory does not change; updates `newest`.
fn list(dir: &Path, out: &mut String, newest: &mut SystemTime) -> Option<()> {
    for entry in std::fs::read_dir(dir).ok()? {
        let entry = entry.ok()?;
        // Links followed, as the reading follows them.
        let meta = if entry.file_type().ok()?.is_symlink() {
            std::fs::metadata(entry.path()).ok()?
        } else {
            entry.metadata().ok()?
        };
        let changed = UNIX_EPOCH.checked_add(Duration::new(
            u64::try_from(meta.ctime()).ok()?,
            u32::try_from(meta.ctime_nsec()).ok()?,
        ))?;
        *newest = (*newest).max(meta.modified().ok()?).max(changed);
        // The name last: it may hold anything but `/` and NUL.
        let _ = write!(
            out,
            "{} {} {} {}.{} {}.{} ",
            u8::from(meta.is_dir()),
            meta.len(),
            meta.ino(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec()
        );
        out.push_str(&entry.file_name().to_string_lossy());
        out.push('\n');
    }
    Some(())
}

/// `$TMPDIR/pgfixture-<uid>/fixtures-cache`, made if missing and `create` (a record
/// is about to be written; a lookup needs no directory that is not there); `None`
/// unless it is a directory of this user's that no one else may write to (a record
/// written by someone else could name another template).
fn cache_dir(create: bool) -> Option<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = crate::server::user_dir().join("fixtures-cache");
    if create {
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir);
    }
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    let ours = Some(meta.uid()) == crate::server::current_uid();
    (meta.is_dir() && ours && meta.mode() & 0o022 == 0).then_some(dir)
}

/// Removes the records of directories that are gone (a test's temporary fixtures) and
/// staging files left by killed processes. Runs only when a record is written.
fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let stale = if path.extension().is_some_and(|e| e == "tmp") {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(60))
        } else {
            std::fs::read_to_string(&path).is_ok_and(|text| {
                text.lines()
                    .skip(2)
                    .take_while(|l| !l.is_empty())
                    .filter_map(|l| {
                        l.strip_prefix("migrations ")
                            .or_else(|| l.strip_prefix("fixtures "))
                    })
                    .any(|d| !Path::new(d).exists())
            })
        };
        if stale {
            let _ = std::fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(fixtures: &Path) -> Config {
        Config {
            fixtures: Some(fixtures.to_owned()),
            ..Config::default()
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "pgfixture-fingerprint-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_write_changes_the_fingerprint_even_with_the_old_modification_time() {
        let d = dir("write");
        let file = d.join("a.sql");
        std::fs::write(&file, "SELECT 1").unwrap();
        let before = Fingerprint::of(&config(&d)).unwrap();
        let modified = std::fs::metadata(&file).unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        // Same size, and the modification time set back as `cp -p` or rsync would.
        std::fs::write(&file, "SELECT 2").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(modified)
            .unwrap();
        let after = Fingerprint::of(&config(&d)).unwrap();
        assert_ne!(before.files, after.files);
        assert_eq!(before.dirs, after.dirs);
        // A new file changes it too.
        std::fs::write(d.join("b.sql"), "").unwrap();
        assert_ne!(after, Fingerprint::of(&config(&d)).unwrap());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn records_are_made_only_for_settled_files_and_read_back_exactly() {
        let d = dir("store");
        std::fs::write(d.join("a.sql"), "SELECT 1").unwrap();
        let fp = Fingerprint::of(&config(&d)).unwrap();
        let hash = "ab".repeat(32);
        // Just written: not recorded.
        fp.store(SystemTime::now(), &hash);
        assert_eq!(fp.lookup(), None);
        fp.store(SystemTime::now() + SETTLED, &hash);
        assert_eq!(fp.lookup(), Some(hash.clone()));
        // Another isolation mode is another record.
        let mut schema = config(&d);
        schema.isolation = Isolation::Schema;
        assert_eq!(Fingerprint::of(&schema).unwrap().lookup(), None);
        // A changed file does not match the record.
        std::fs::write(d.join("a.sql"), "SELECT 22").unwrap();
        assert_eq!(Fingerprint::of(&config(&d)).unwrap().lookup(), None);
        // The record of a directory that is gone is swept when another is written.
        let record = fp.record(&cache_dir(false).unwrap());
        assert!(record.exists());
        std::fs::remove_dir_all(&d).unwrap();
        let other = dir("store-other");
        let fp = Fingerprint::of(&config(&other)).unwrap();
        fp.store(SystemTime::now() + SETTLED, &hash);
        assert!(!record.exists());
        assert_eq!(fp.lookup(), Some(hash));
        std::fs::remove_file(fp.record(&cache_dir(false).unwrap())).unwrap();
        std::fs::remove_dir_all(&other).unwrap();
    }

    #[test]
    fn settled_needs_every_file_older_than_the_reading_by_a_margin() {
        let now = SystemTime::now();
        assert!(settled(now - SETTLED, now));
        assert!(!settled(now - SETTLED + Duration::from_millis(1), now));
        assert!(!settled(now + Duration::from_secs(60), now));
    }
}
