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
//!
//! Under nextest the record also names the run (`NEXTEST_RUN_ID`, a new UUID for every
//! `cargo nextest run`) and the process that wrote it. The other processes of that run
//! take its hash without listing the files (a `statx` per file: 0.5 ms for 200
//! migrations in a release build, more unoptimised), so every process of a run uses
//! the files as the run found them. The process that wrote the record lists them
//! again, since it may have changed them itself.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{Config, Isolation};

/// How much older than the reading every file must be for its hash to be recorded: more
/// than the coarsest timestamps of common file systems (FAT's two seconds).
pub(crate) const SETTLED: Duration = Duration::from_secs(3);

/// The first line of a record; a record of another format is not read. A new format
/// also comes with every change of the key records hold (`the_key_is_pinned` in
/// migrations.rs): 3 since the key of a migrator covers its table name and schemas,
/// 4 since a migrator's lines name its record.
const FORMAT: &str = "pgfixture fixtures cache 4";

/// The metadata of the files a configuration reads, as text.
#[derive(Debug)]
pub(crate) struct Fingerprint {
    /// The directories read, one per line: what names the record.
    dirs: String,
    /// The directories to list, with the kind of each.
    listed: Vec<(&'static str, PathBuf)>,
    /// The lines of every file, and their newest modification or change time; listed
    /// when first needed, `None` inside when a directory or file cannot be listed (the
    /// reading reports it).
    listing: OnceLock<Option<(String, SystemTime)>>,
}

/// A record as written: its files' lines, the hash, and the run and process that wrote
/// it.
struct Record<'a> {
    files: &'a str,
    hash: &'a str,
    run: &'a str,
    pid: &'a str,
}

impl Fingerprint {
    /// The fingerprint of what `config` reads; its files are listed when needed.
    pub(crate) fn of(config: &Config) -> Option<Fingerprint> {
        let mut dirs = format!(
            "pgfixture {} sqlx={} isolation={}\n",
            env!("CARGO_PKG_VERSION"),
            cfg!(any(feature = "sqlx", feature = "sqlx-0_8")),
            match config.isolation {
                Isolation::Database => "database",
                Isolation::Schema => "schema",
                Isolation::Container => "container",
            }
        );
        // The crate's `sqlx.toml` changes how a folder in sqlx's layout is recorded.
        if let Some(toml) = &config.sqlx_toml {
            let _ = writeln!(dirs, "{}", toml.key());
        }
        if let Some(setup) = &config.setup {
            let _ = writeln!(dirs, "setup {:?}", setup.version());
        }
        let mut listed = Vec::new();
        for (kind, dir) in [
            ("migrations", &config.migrations),
            ("fixtures", &config.fixtures),
        ] {
            let Some(dir) = dir else { continue };
            let _ = writeln!(dirs, "{kind} {}", dir.display());
            listed.push((kind, dir.clone()));
        }
        // A migrator given in code has no files to list: its migrations' lines name
        // the record, so that each migrator of a run has its own.
        #[cfg(any(feature = "sqlx", feature = "sqlx-0_8"))]
        if let Some(m) = config.migrator {
            let _ = writeln!(dirs, "migrator {}", m.record());
            for m in m.migrations() {
                let prefix: [u8; 8] = m.checksum.get(..8)?.try_into().ok()?;
                let _ = writeln!(
                    dirs,
                    "{} {:?} {} {:x}",
                    m.version,
                    m.description,
                    m.down,
                    u64::from_le_bytes(prefix)
                );
            }
        }
        Some(Fingerprint {
            dirs,
            listed,
            listing: OnceLock::new(),
        })
    }

    /// The files' lines and their newest time, listed on first use.
    fn listing(&self) -> Option<&(String, SystemTime)> {
        self.listing
            .get_or_init(|| {
                let mut files = String::new();
                let mut newest = UNIX_EPOCH;
                for (kind, dir) in &self.listed {
                    let _ = writeln!(files, "{kind}");
                    list(dir, &mut files, &mut newest)?;
                }
                Some((files, newest))
            })
            .as_ref()
    }

    /// The hash recorded under this fingerprint, if any.
    pub(crate) fn lookup(&self) -> Option<String> {
        self.lookup_as(this_run().as_deref(), std::process::id())
    }

    /// [`Self::lookup`] by process `pid` of nextest run `run`.
    fn lookup_as(&self, run: Option<&str>, pid: u32) -> Option<String> {
        let path = self.record(&cache_dir(false)?);
        let text = std::fs::read_to_string(path).ok()?;
        let record = self.parse(&text)?;
        let pid = pid.to_string();
        if run == Some(record.run) && record.pid != pid {
            // Another process of this run listed the files: as the run found them.
            return Some(record.hash.to_owned());
        }
        let (files, _) = self.listing()?;
        if record.files != files {
            return None;
        }
        if let Some(run) = run
            && record.run != run
        {
            // The files are as recorded, so they were settled then and are now: the
            // record is made this run's, for its other processes.
            self.write(record.hash, Some(run), &pid);
        }
        Some(record.hash.to_owned())
    }

    /// The record in `text` if it is one of this fingerprint's directories.
    fn parse<'a>(&self, text: &'a str) -> Option<Record<'a>> {
        let rest = text.strip_prefix(FORMAT)?.strip_prefix('\n')?;
        let rest = rest.strip_prefix(self.dirs.as_str())?.strip_suffix('\n')?;
        // The last two lines: a file's name may hold a line break, never the end.
        let (rest, run) = rest.rsplit_once('\n')?;
        let (files, hash) = match rest.rfind('\n') {
            Some(i) => (&rest[..=i], &rest[i + 1..]),
            None => ("", rest),
        };
        let hash = hash.strip_prefix("hash ")?;
        let (run, pid) = run.strip_prefix("run ")?.split_once(' ')?;
        (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then_some(Record {
            files,
            hash,
            run,
            pid,
        })
    }

    /// Records `hash` as the hash of files read at `read_at` (taken before this
    /// fingerprint was listed), unless a file is too recent for its timestamps to be
    /// trusted. Failing to record costs the next process a reading, nothing else.
    pub(crate) fn store(&self, read_at: SystemTime, hash: &str) {
        self.store_as(read_at, hash, this_run().as_deref(), std::process::id());
    }

    /// [`Self::store`] by process `pid` of nextest run `run`.
    fn store_as(&self, read_at: SystemTime, hash: &str, run: Option<&str>, pid: u32) {
        if self
            .listing()
            .is_some_and(|(_, newest)| settled(*newest, read_at))
        {
            self.write(hash, run, &pid.to_string());
        }
    }

    /// Writes the record of `hash`, made by process `pid` of run `run`.
    fn write(&self, hash: &str, run: Option<&str>, pid: &str) {
        let Some((files, _)) = self.listing() else {
            return;
        };
        let Some(dir) = cache_dir(true) else { return };
        sweep(&dir);
        let path = self.record(&dir);
        let staging = path.with_extension(format!("{}.tmp", std::process::id()));
        let text = format!(
            "{FORMAT}\n{}{files}hash {hash}\nrun {} {pid}\n",
            self.dirs,
            run.unwrap_or("-")
        );
        if std::fs::write(&staging, text).is_err() || std::fs::rename(&staging, &path).is_err() {
            let _ = std::fs::remove_file(&staging);
        }
    }

    /// The record's file: named by the directories (and the record's format, so that
    /// builds of two formats do not replace each other's), so that a configuration has
    /// one record, replaced when its files change.
    fn record(&self, dir: &Path) -> PathBuf {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(FORMAT)
            .chain_update(&self.dirs)
            .finalize();
        dir.join(crate::digest::hex(&digest[..10]))
    }
}

/// This nextest run's id (`NEXTEST_RUN_ID`), if it is one: a UUID, new for every run,
/// unlike `PGFIXTURE_RUN_ID`, which may name every run alike.
fn this_run() -> Option<String> {
    run_id(std::env::var("NEXTEST_RUN_ID").ok())
}

/// `value` if it can name a run in a record's line (nextest's UUIDs can).
fn run_id(value: Option<String>) -> Option<String> {
    value.filter(|id| {
        (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    })
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
        let files = |fp: &Fingerprint| fp.listing().unwrap().0.clone();
        let before = files(&Fingerprint::of(&config(&d)).unwrap());
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
        let after = files(&Fingerprint::of(&config(&d)).unwrap());
        assert_ne!(before, after);
        // A new file changes it too.
        std::fs::write(d.join("b.sql"), "").unwrap();
        assert_ne!(after, files(&Fingerprint::of(&config(&d)).unwrap()));
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
    fn other_processes_of_a_nextest_run_take_its_record_without_listing() {
        let d = dir("run");
        std::fs::write(d.join("a.sql"), "SELECT 1").unwrap();
        let fp = || Fingerprint::of(&config(&d)).unwrap();
        let hash = "cd".repeat(32);
        fp().store_as(SystemTime::now() + SETTLED, &hash, Some("run-1"), 1);
        std::fs::write(d.join("a.sql"), "SELECT 22").unwrap();
        // Another process of the run takes the hash as the run found the files, even
        // though a file has changed since: it lists nothing.
        let other = fp();
        assert_eq!(other.lookup_as(Some("run-1"), 2), Some(hash.clone()));
        assert!(other.listing.get().is_none(), "listed");
        // The process that wrote the record lists the files (it may have changed them),
        // and so do other runs and processes outside nextest.
        assert_eq!(fp().lookup_as(Some("run-1"), 1), None);
        assert_eq!(fp().lookup_as(Some("run-2"), 2), None);
        assert_eq!(fp().lookup_as(None, 2), None);

        // A record that another run made, of files as they are, becomes this run's.
        let settled = SystemTime::now() + SETTLED;
        fp().store_as(settled, &hash, Some("run-1"), 1);
        assert_eq!(fp().lookup_as(Some("run-2"), 3), Some(hash.clone()));
        std::fs::write(d.join("a.sql"), "SELECT 333").unwrap();
        assert_eq!(fp().lookup_as(Some("run-2"), 4), Some(hash.clone()));
        assert_eq!(
            fp().lookup_as(Some("run-1"), 2),
            None,
            "run-1's record remained"
        );
        std::fs::remove_file(fp().record(&cache_dir(false).unwrap())).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Two migrators given in code in one nextest run (two tests' `migrator = ...`):
    /// each has its own record, and no process takes the other's hash.
    #[cfg(feature = "sqlx")]
    #[test]
    fn each_migrator_of_a_run_has_its_own_record() {
        use ::sqlx::migrate::{Migration, MigrationType, Migrator};
        let migrator = |sql: &'static str| -> &'static Migrator {
            let m = Migration::new(
                1,
                "things".into(),
                MigrationType::Simple,
                ::sqlx::SqlSafeStr::into_sql_str(sql),
                false,
            );
            Box::leak(Box::new(Migrator::with_migrations(vec![m])))
        };
        let fp = |m| {
            Fingerprint::of(&Config {
                migrator: Some(crate::config::MigratorRef::Sqlx(m)),
                ..Config::default()
            })
            .unwrap()
        };
        let (a, b) = (
            migrator("CREATE TABLE a_things ()"),
            migrator("CREATE TABLE b_things ()"),
        );
        let run = "run-migrators";
        let hash = "12".repeat(32);
        fp(a).store_as(SystemTime::now() + SETTLED, &hash, Some(run), 1);
        assert_eq!(fp(a).lookup_as(Some(run), 2), Some(hash.clone()));
        assert_eq!(
            fp(b).lookup_as(Some(run), 2),
            None,
            "took the other's record"
        );
        assert_ne!(fp(a).record(Path::new("")), fp(b).record(Path::new("")));
        std::fs::remove_file(fp(a).record(&cache_dir(false).unwrap())).unwrap();
    }

    #[test]
    fn a_file_name_with_a_line_break_cannot_pass_for_the_records_end() {
        let d = dir("names");
        std::fs::write(d.join("a\nhash x\nrun run-1 9"), "").unwrap();
        let fp = Fingerprint::of(&config(&d)).unwrap();
        let hash = "ef".repeat(32);
        fp.store_as(SystemTime::now() + SETTLED, &hash, Some("run-1"), 1);
        assert_eq!(fp.lookup_as(Some("run-1"), 2), Some(hash.clone()));
        assert_eq!(fp.lookup_as(None, 2), Some(hash));
        std::fs::remove_file(fp.record(&cache_dir(false).unwrap())).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn only_a_nextest_run_id_names_a_run() {
        let ok = |id: &str| run_id(Some(id.to_owned())).is_some();
        assert!(ok("1f79aa0d-4ec8-4a5c-aa83-5e8dc2f36573"));
        assert!(!ok(""));
        assert!(!ok("a b"));
        assert!(!ok("a\nrun"));
        assert!(!ok(&"a".repeat(65)));
    }

    #[test]
    fn settled_needs_every_file_older_than_the_reading_by_a_margin() {
        let now = SystemTime::now();
        assert!(settled(now - SETTLED, now));
        assert!(!settled(now - SETTLED + Duration::from_millis(1), now));
        assert!(!settled(now + Duration::from_secs(60), now));
    }
}
