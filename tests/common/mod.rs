//! Helpers shared by the server-backed test suites.
#![allow(dead_code)] // each suite uses some of them

use std::process::{Command, Output};

use pgfixture::bollard;
use pgfixture::bollard::models::ContainerSummary;

/// The Docker daemon, when one answers.
pub async fn docker() -> Option<bollard::Docker> {
    bollard::Docker::connect_with_local_defaults()
        .ok()?
        .negotiate_version()
        .await
        .ok()
}

/// The containers (running or not) that pgfixture labelled as made by `run`; none
/// when no Docker daemon answers.
pub async fn run_containers(run: &str) -> Vec<ContainerSummary> {
    let Some(docker) = docker().await else {
        return Vec::new();
    };
    let options = bollard::query_parameters::ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&std::collections::HashMap::from([(
            "label",
            vec![format!("pgfixture.run={run}")],
        )]))
        .build();
    docker
        .list_containers(Some(options))
        .await
        .unwrap_or_default()
}

/// SQL for which server a connection reaches, as text. pgfixture's servers start from
/// one initialised data directory (its cache; an initialised image), so they share the
/// system identifier, and two started in the same microsecond share the start time
/// too (seen: two local workers' servers 1 µs apart). The data directory (one per
/// local server), the port (one per server on the host's network) and the host's name
/// (one per container on a network of its own) tell them apart; the superuser
/// pgfixture's servers give may read them.
pub const SERVER_IDENTITY: &str = "(SELECT system_identifier::text FROM pg_control_system()) \
    || ':' || pg_postmaster_start_time()::text || ':' || current_setting('port') || ':' \
    || coalesce(CASE WHEN pg_has_role('pg_read_all_settings', 'MEMBER') \
        THEN current_setting('data_directory') END, '') || ':' \
    || coalesce(CASE WHEN pg_has_role('pg_read_server_files', 'MEMBER') \
        THEN pg_read_file('/etc/hostname', 0, 256, true) END, '')";

/// Variables of the runner that would pin a child to the parent's run or worker.
const RUNNER_VARS: &[&str] = &[
    "NEXTEST_TEST_GLOBAL_SLOT",
    "NEXTEST_RUN_ID",
    "PGFIXTURE_WORKER",
    "PGFIXTURE_RUN_ID",
];

/// Runs this test binary's `child` helper (an ignored test) with the runner's
/// variables removed and `env` set, and waits for it.
pub fn run_child(env: &[(&str, &str)]) -> Output {
    child_command(env)
        .output()
        .expect("running the child helper")
}

/// The command that runs this test binary's `child` helper; see [`run_child`].
pub fn child_command(env: &[(&str, &str)]) -> Command {
    named_child_command("child", env)
}

/// The command that runs this test binary's ignored test `name` as [`child_command`]
/// runs `child`.
pub fn named_child_command(name: &str, env: &[(&str, &str)]) -> Command {
    let mut cmd = captured_child_command(name, env);
    cmd.arg("--nocapture");
    cmd
}

/// [`named_child_command`] with libtest's capture of the test's output on, as a test
/// runs by default: what the test prints shows only if it fails.
pub fn captured_child_command(name: &str, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", name, "--ignored", "--test-threads", "1"]);
    for var in RUNNER_VARS {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd
}

/// Runs the child helper with `env`; fails the test, with the child's output, unless
/// it succeeded. Returns its stdout and stderr.
pub fn run_child_ok(env: &[(&str, &str)]) -> (String, String) {
    let out = run_child(env);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "child {env:?} failed: {stdout}\n{stderr}"
    );
    (stdout, stderr)
}

/// Runs the child helper with `env` until it prints `marker` (it then holds what it
/// took, as a test still running would), and kills it. Fails the test if the child
/// ends without printing it.
pub fn kill_child_after(env: &[(&str, &str)], marker: &str) {
    use std::io::{BufRead, BufReader};
    let mut child = child_command(env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let reached = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .any(|line| line.unwrap().contains(marker));
    assert!(reached, "the child did not get to {marker}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The number after `key=` in the child's report.
pub fn reported(stdout: &str, key: &str) -> u64 {
    stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {stdout:?}"))
}

/// `pgfixture-<uid>`, the name of this user's directories.
fn user_dir_name() -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "pgfixture-{}",
        std::fs::metadata("/proc/self").unwrap().uid()
    )
}

/// This user's directory of pgfixture's records (`$TMPDIR/pgfixture-<uid>`).
pub fn user_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(user_dir_name())
}

/// The directories local servers may live in (`PGFIXTURE_LOCAL_DIR`, else its two
/// defaults: `/dev/shm/pgfixture-<uid>` and `$TMPDIR/pgfixture-<uid>`).
pub fn local_dirs() -> Vec<std::path::PathBuf> {
    if let Some(dir) = std::env::var_os("PGFIXTURE_LOCAL_DIR") {
        return vec![dir.into()];
    }
    vec![
        std::path::Path::new("/dev/shm").join(user_dir_name()),
        user_dir(),
    ]
}

/// A run id of its own for a test: up to 4 letters of `tag`, then 7 hex digits mixed
/// from the process, the clock and a counter. At 11 characters it is kept as it is
/// (longer ids are hashed), so containers and marks carry this very id.
pub fn unique_run(tag: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mixed = nanos
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(u64::from(std::process::id()) << 32)
        .wrapping_add(
            COUNTER
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x1000_0001),
        );
    let tag: String = tag
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(4)
        .collect();
    format!("{tag}{:07x}", (mixed >> 20) & 0xfff_ffff)
}

/// Whether the environment runs schema mode on a server of the user's
/// (`PGFIXTURE_URL`): pgfixture keeps no record of the sequences' values there, so
/// restarting them is refused by name (README, "An existing server").
pub fn schema_mode_on_a_url_server() -> bool {
    let config = pgfixture::Config::from_env().unwrap();
    config.url.is_some() && config.isolation == pgfixture::Isolation::Schema
}

/// A fixture of one worker of its own, told apart from the other tests' by its pool
/// size: a test whose handle gives its settings out, which before PostgreSQL 15 makes
/// the release rebuild the worker and replace the pooled connections other tests of
/// a shared worker count on.
pub fn worker_of_its_own(pool_size: usize) -> pgfixture::Fixture {
    pgfixture::Fixture::builder()
        .workers(1)
        .pool_size(pool_size)
        .build()
        .expect("fixture")
}

/// Whether the server behind `client` lets pgfixture read a worker before and after a
/// worker pool (PostgreSQL 15 and later): before 15 there is no reading, and every
/// worker pool is followed by a reset (README, "Tests that commit").
pub async fn worker_pools_are_read(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT current_setting('server_version_num')::int >= 150000",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Asserts that a fixture that restarts the sequences before every test is refused by
/// the variable to change, as it is in [`schema_mode_on_a_url_server`].
pub fn assert_sequence_restarts_refused() {
    let refused = pgfixture::Fixture::builder()
        .workers(1)
        .reset_sequences(true)
        .build();
    assert!(
        matches!(
            &refused,
            Err(pgfixture::Error::Config {
                var: "PGFIXTURE_RESET_SEQUENCES",
                ..
            })
        ),
        "{:?}",
        refused.err()
    );
}

/// The environment's configuration for a run of its own (so servers of its own), with
/// in-process workers and a `grace` period.
pub fn own_config(tag: &str, grace: std::time::Duration) -> pgfixture::Config {
    let mut config = pgfixture::Config::from_env().unwrap();
    config.run_id = unique_run(tag);
    config.worker = None;
    config.grace = grace;
    config
}

/// A fixture of a run of its own, from the environment, with one in-process worker on
/// `backend` (the URL of the environment is dropped for the local and Docker ones).
pub fn own_fixture_on(
    tag: &str,
    backend: pgfixture::Backend,
    grace: std::time::Duration,
) -> pgfixture::Fixture {
    let mut config = own_config(tag, grace);
    config.backend = backend;
    config.url = None;
    pgfixture::Fixture::builder()
        .config(config)
        .workers(1)
        .build()
        .unwrap()
}

/// A fixture of a run of its own (so servers of its own), from the environment, with
/// one in-process worker, `isolation`, and a 2 s grace period.
pub fn own_fixture(tag: &str, isolation: pgfixture::Isolation) -> pgfixture::Fixture {
    let mut config = own_config(tag, std::time::Duration::from_secs(2));
    config.isolation = isolation;
    pgfixture::Fixture::builder()
        .config(config)
        .workers(1)
        .build()
        .unwrap()
}

/// A test's runtime whose clock is paused, as `#[tokio::test(start_paused = true)]`
/// builds it: it jumps to the next timer whenever the test waits, the server included.
pub fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

/// Sleeps an hour on a paused clock, which passes at once: the clock is paused.
pub async fn an_hour_passes_at_once() {
    let (clock, wall) = (tokio::time::Instant::now(), std::time::Instant::now());
    tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
    assert!(clock.elapsed() >= std::time::Duration::from_secs(3600));
    assert!(
        wall.elapsed() < std::time::Duration::from_secs(60),
        "the clock runs"
    );
}
