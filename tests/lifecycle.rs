//! Lifecycle and bad input, on the backend the environment selects: nothing is left
//! behind after the grace period; every invalid environment value is an error naming
//! its variable; a broken fixture names its file and line and leaves nothing
//! half-built. Environment variations run in child processes (this test binary,
//! running its `child` helper), never through `set_var`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

mod common;

use common::{captured_child_command, child_command, reported, run_child, unique_run, user_dir};
use pgfixture::{Error, Fixture, Isolation};

/// Run by the tests below in a child process, with the environment they choose: takes
/// a handle, reports what it got, and exits.
#[test]
#[ignore = "helper, run as a child process by the lifecycle tests"]
fn child() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let asked = Instant::now();
        match pgfixture::worker_db().await {
            Ok(db) => {
                let first_handle = asked.elapsed();
                let n: i64 = db
                    .query_one("SELECT count(*) FROM users", &[])
                    .await
                    .unwrap()
                    .get(0);
                if std::env::var_os("PGFIXTURE_TEST_CHILD_HOLDS").is_some() {
                    use std::io::Write;
                    println!("CHILD-HOLDING");
                    std::io::stdout().flush().unwrap();
                    tokio::time::sleep(Duration::from_secs(120)).await;
                }
                if std::env::var_os("PGFIXTURE_TEST_CHILD_LINGERS").is_some() {
                    // What runs beside the test (the sweep of dead runs) has time to end.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                if std::env::var_os("PGFIXTURE_TEST_CHILD_PANICS").is_some() {
                    panic!("CHILD-PANIC: a failing test that holds its handle");
                }
                let stats = Fixture::from_env().unwrap().stats();
                println!(
                    "CHILD-OK users={n} backend={} started={} templates={} provisioned={} reused={} ms={}",
                    stats.backend.unwrap_or("?"),
                    stats.servers_started,
                    stats.templates_built,
                    stats.workers_provisioned,
                    stats.workers_reused,
                    first_handle.as_millis()
                );
            }
            Err(e) => {
                eprintln!("CHILD-ERR {e}");
                std::process::exit(3);
            }
        }
    });
}

/// Eight test processes of one run start at the same moment, each on its own worker:
/// exactly one shared server and one template are made, and each worker is provisioned
/// exactly once; every process finds what the others made.
#[test]
fn eight_processes_at_once_make_one_server_and_one_template() {
    for isolation in ["database", "schema"] {
        let run = unique_run("race");
        let children: Vec<_> = (0..8)
            .map(|i| {
                let worker = format!("race{i}");
                child_command(&[
                    ("PGFIXTURE_RUN_ID", run.as_str()),
                    ("PGFIXTURE_WORKER", worker.as_str()),
                    ("PGFIXTURE_ISOLATION", isolation),
                    ("PGFIXTURE_GRACE", "2"),
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
            })
            .collect();
        let outputs: Vec<String> = children
            .into_iter()
            .map(|c| {
                let out = c.wait_with_output().unwrap();
                let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                assert!(
                    stdout.contains("CHILD-OK users=1"),
                    "{isolation}: {stdout}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                stdout
            })
            .collect();
        let sum = |key| outputs.iter().map(|o| reported(o, key)).sum::<u64>();
        assert_eq!(
            sum("started"),
            1,
            "{isolation}: servers started by 8 processes: {outputs:?}"
        );
        let templates = if isolation == "database" { 1 } else { 0 };
        assert_eq!(
            sum("templates"),
            templates,
            "{isolation}: templates built: {outputs:?}"
        );
        assert_eq!(
            sum("provisioned"),
            8,
            "{isolation}: workers provisioned: {outputs:?}"
        );
    }
}

/// Containers, server directories and server processes that belong to `run`.
async fn leftovers(run: &str) -> Vec<String> {
    let mut found = Vec::new();
    let marker = format!("pgfixture-{run}");
    for c in common::run_containers(run).await {
        found.push(format!("container {:?}", c.names));
    }
    for base in common::local_dirs() {
        for server in std::fs::read_dir(base).into_iter().flatten().flatten() {
            if server.file_name().to_string_lossy().starts_with(&marker) {
                found.push(format!("directory {}", server.path().display()));
            }
        }
    }
    for proc in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmdline) = std::fs::read(proc.path().join("cmdline"))
            && String::from_utf8_lossy(&cmdline).contains(&marker)
        {
            found.push(format!("process {}", proc.file_name().to_string_lossy()));
        }
    }
    found
}

/// Asserts that `run` still has servers (they are in their grace period) and that
/// they are all gone soon after: a grace of 1 s (2 polls at least), a fast shutdown and
/// container removal, and a minute more if a watchdog never saw its server used.
async fn assert_gone_after_grace(run: &str, when: &str) {
    assert!(
        !leftovers(run).await.is_empty(),
        "the servers should still be in their grace period"
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left = leftovers(run).await;
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left behind {when}: {left:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn nothing_remains_after_the_grace_period() {
    let run = unique_run("gone");
    for isolation in ["database", "container", "schema"] {
        let out = run_child(&[
            ("PGFIXTURE_RUN_ID", &run),
            ("PGFIXTURE_GRACE", "1"),
            ("PGFIXTURE_ISOLATION", isolation),
            ("PGFIXTURE_WORKERS", "2"),
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("CHILD-OK users=1"),
            "child ({isolation}) failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A failing test run leaves nothing behind either.
    let out = run_child(&[
        ("PGFIXTURE_RUN_ID", &run),
        ("PGFIXTURE_GRACE", "1"),
        ("PGFIXTURE_ISOLATION", "container"),
        ("PGFIXTURE_TEST_CHILD_PANICS", "1"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("CHILD-PANIC"),
        "{stderr}"
    );
    assert_gone_after_grace(&run, "after the grace period").await;
}

/// A test process killed with SIGKILL while it holds connections (it runs no code
/// after the signal) leaves nothing behind once the grace period has passed.
#[tokio::test]
async fn a_killed_test_process_leaves_nothing_behind() {
    use std::io::BufRead;
    let run = unique_run("kill");
    for isolation in ["database", "container"] {
        let mut child = child_command(&[
            ("PGFIXTURE_RUN_ID", &run),
            ("PGFIXTURE_GRACE", "1"),
            ("PGFIXTURE_ISOLATION", isolation),
            ("PGFIXTURE_TEST_CHILD_HOLDS", "1"),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
        let stdout = child.stdout.take().unwrap();
        let holding = tokio::task::spawn_blocking(move || {
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .any(|line| line.contains("CHILD-HOLDING"))
        });
        assert!(
            tokio::time::timeout(Duration::from_secs(60), holding)
                .await
                .unwrap()
                .unwrap(),
            "the child never held a handle"
        );
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
    }
    assert_gone_after_grace(&run, "after SIGKILL and the grace period").await;
}

#[test]
fn every_invalid_environment_value_names_its_variable() {
    let cases: &[(&str, &str)] = &[
        ("PGFIXTURE_ISOLATION", "tables"),
        ("PGFIXTURE_BACKEND", "podman"),
        ("PGFIXTURE_IMAGE", "Not An Image"),
        ("PGFIXTURE_FIXTURES", "/nonexistent/pgfixture-fixtures"),
        ("PGFIXTURE_WORKER", "Worker-1"),
        ("PGFIXTURE_WORKER", "w23456789012345678901234567890123"),
        ("NEXTEST_TEST_GLOBAL_SLOT", "first"),
        ("PGFIXTURE_WORKERS", "0"),
        ("PGFIXTURE_WORKERS", "lots"),
        ("PGFIXTURE_WORKERS", "99999999"),
        ("PGFIXTURE_POOL_SIZE", "0"),
        ("PGFIXTURE_POOL_SIZE", "zero"),
        ("PGFIXTURE_POOL_SIZE", "100000"),
        ("PGFIXTURE_ACQUIRE_TIMEOUT", "0"),
        ("PGFIXTURE_ACQUIRE_TIMEOUT", "forever"),
        ("PGFIXTURE_ACQUIRE_TIMEOUT", "1e12"),
        ("PGFIXTURE_GRACE", "-5"),
        ("PGFIXTURE_REQUIRE_DOCKER", "perhaps"),
        ("PGFIXTURE_RUN_ID", " "),
        ("RUST_TEST_THREADS", "0"),
        ("PGFIXTURE_WORKER", "wörker"),
        ("PGFIXTURE_REUSE", "sometimes"),
        ("PGFIXTURE_REUSE_IDLE", "0"),
        ("PGFIXTURE_ALLOW_REMOTE", "maybe"),
        ("PGFIXTURE_URL", "postgres://u:p@127.0.0.1:notaport/db"),
        ("PGFIXTURE_URL", "postgres://u:p@db.example.com/db"),
        // A file where a directory is expected.
        (
            "PGFIXTURE_FIXTURES",
            concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
        ),
    ];
    let mut runs = Vec::new();
    for (var, value) in cases {
        let run = unique_run("bad");
        let mut env = vec![(*var, *value)];
        if *var != "PGFIXTURE_RUN_ID" {
            env.push(("PGFIXTURE_RUN_ID", run.as_str()));
        }
        let out = run_child(&env);
        runs.push(run);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{var}={value:?} did not fail cleanly: {stderr}"
        );
        let line = stderr
            .lines()
            .find(|l| l.starts_with("CHILD-ERR"))
            .unwrap_or_default();
        assert!(
            line.contains(var),
            "{var}={value:?}: the error does not name the variable: {line}"
        );
    }
    // Nothing was started for any of them.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for run in &runs {
        let left = rt.block_on(leftovers(run));
        assert!(left.is_empty(), "bad input left {left:?}");
    }
    // A local backend pointed at a directory without PostgreSQL names PGFIXTURE_PG_BIN.
    let out = run_child(&[
        ("PGFIXTURE_BACKEND", "local"),
        ("PGFIXTURE_PG_BIN", "/nonexistent/bin"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PGFIXTURE_PG_BIN"), "{stderr}");
}

/// With Docker, an image that is not there and cannot be pulled names the image and
/// `PGFIXTURE_IMAGE`; without Docker, `PGFIXTURE_REQUIRE_DOCKER=1` fails naming Docker.
#[test]
fn docker_failures_say_what_to_fix() {
    let out = run_child(&[
        ("PGFIXTURE_BACKEND", "docker"),
        ("PGFIXTURE_IMAGE", "pgfixture-test/absent-image:0"),
        ("PGFIXTURE_ACQUIRE_TIMEOUT", "60"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout} {stderr}");
    let docker_answers = !stderr.contains("no Docker daemon answers");
    if docker_answers {
        assert!(
            stderr.contains("pgfixture-test/absent-image:0") && stderr.contains("PGFIXTURE_IMAGE"),
            "{stderr}"
        );
    } else {
        assert!(
            stderr.contains("DOCKER_HOST") && stderr.contains("PGFIXTURE_BACKEND=local"),
            "{stderr}"
        );
    }
    // An unreachable daemon is reported within seconds.
    let started = Instant::now();
    let out = run_child(&[
        ("PGFIXTURE_BACKEND", "auto"),
        ("PGFIXTURE_REQUIRE_DOCKER", "1"),
        ("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no Docker daemon answers")
            && stderr.contains("unix:///nonexistent/docker.sock"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "an unreachable daemon must not hang"
    );
}

/// Docker: a container opens with the user's first password and takes its own once
/// up; one that refuses both (its password changed behind pgfixture's back) fails the
/// next process within its acquire timeout, naming the refusal, and is not waited on
/// forever.
#[tokio::test]
async fn a_container_that_refuses_both_passwords_fails_in_time() {
    // Database mode: the run's one shared container, which the child looks for too.
    let fixture = common::own_fixture("pwgone", Isolation::Database);
    let db = fixture.worker_db().await.unwrap();
    if fixture.stats().backend != Some("docker") {
        assert_eq!(fixture.stats().backend, Some("local"));
        return;
    }
    // Outside the test's transaction, which would roll it back.
    let (own, connection) = db
        .pg_config()
        .connect(pgfixture::tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    own.batch_execute("ALTER ROLE postgres PASSWORD 'neither-of-them'")
        .await
        .unwrap();
    let run = fixture.config().run_id.clone();
    // pgfixture's own connections would take the container's Unix socket, which
    // trusts its clients (where the daemon runs on this host): without it, as where
    // there is none, every way in asks for the password.
    let sockets = user_dir().join("sockets");
    for dir in std::fs::read_dir(&sockets).into_iter().flatten().flatten() {
        if dir
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("pgfixture-{run}-"))
        {
            // `.s.PGSQL.<port>`: 5432 on Docker's bridge, a free port on the host's
            // network.
            for socket in std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = socket.file_name().to_string_lossy().into_owned();
                if name.starts_with(".s.PGSQL.") && !name.ends_with(".lock") {
                    let _ = std::fs::remove_file(socket.path());
                }
            }
        }
    }
    let started = Instant::now();
    let out = run_child(&[
        ("PGFIXTURE_RUN_ID", &run),
        ("PGFIXTURE_ISOLATION", "database"),
        ("PGFIXTURE_ACQUIRE_TIMEOUT", "10"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout} {stderr}");
    assert!(
        stderr.contains("refused pgfixture's credentials"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "waited {:?}",
        started.elapsed()
    );
    drop(db);
}

/// Docker: pgfixture initialises a data directory from `PGFIXTURE_IMAGE` once, commits
/// it as an image, and later containers start from that image instead of running
/// initdb, each with a password of its own (set before the server listens).
#[tokio::test]
async fn containers_start_initialised_with_passwords_of_their_own() {
    use pgfixture::bollard;
    let first = common::own_fixture("init1", Isolation::Container);
    let db = first.worker_db().await.unwrap();
    if first.stats().backend != Some("docker") {
        // Local servers run initdb themselves; there is no image to initialise.
        assert_eq!(first.stats().backend, Some("local"));
        return;
    }
    let docker = common::docker().await.expect("the Docker daemon");
    let base = first.config().image.clone();
    let filters = std::collections::HashMap::from([(
        "label".to_owned(),
        vec![format!("pgfixture.base={base}")],
    )]);
    let options = bollard::query_parameters::ListImagesOptionsBuilder::new()
        .filters(&filters)
        .build();
    // The first container creation of any process (this one's, or an earlier test's)
    // started the build; it takes a few seconds.
    let waited = Instant::now();
    let initialised = loop {
        let images = docker.list_images(Some(options.clone())).await.unwrap();
        let tags: Vec<String> = images.into_iter().flat_map(|i| i.repo_tags).collect();
        if let Some(tag) = tags
            .into_iter()
            .find(|t| t.starts_with("pgfixture-initialized:"))
        {
            break tag;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(90),
            "no initialised image of {base} after 90 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let second = common::own_fixture("init2", Isolation::Container);
    let db2 = second.worker_db().await.unwrap();
    let containers = common::run_containers(&second.config().run_id).await;
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(containers[0].image.as_deref(), Some(initialised.as_str()));
    let verifier = "SELECT rolpassword FROM pg_authid WHERE rolname = current_user";
    let mine: String = db.query_one(verifier, &[]).await.unwrap().get(0);
    let theirs: String = db2.query_one(verifier, &[]).await.unwrap().get(0);
    assert!(theirs.starts_with("SCRAM-SHA-256$"), "{theirs}");
    assert_ne!(mine, theirs, "two containers share a password");

    // The initialised image removed under a running fixture (as a newer base image's
    // builder does to the old one): its next container starts from the base image.
    let mut config = second.config().clone();
    config.run_id = common::unique_run("init3");
    let third = pgfixture::Fixture::builder()
        .config(config)
        .workers(2)
        .build()
        .unwrap();
    let held = third.worker_db().await.unwrap();
    // The builder also removes the untagged initialised images of this base that no
    // container uses, such as one left by a rebuild under the same tag: here, one made
    // for it before the tag goes, so that whichever build comes next (this test's
    // child's, or one another test's container creation starts) runs after it.
    let orphan = docker
        .commit_container(
            bollard::query_parameters::CommitContainerOptionsBuilder::default()
                .container(containers[0].id.as_deref().unwrap())
                .changes(&format!("LABEL pgfixture.base={base}"))
                .build(),
            bollard::models::ContainerConfig::default(),
        )
        .await
        .unwrap()
        .id;
    let options = bollard::query_parameters::RemoveImageOptionsBuilder::new()
        .force(true)
        .build();
    // Untags it; the containers made from it keep running.
    docker
        .remove_image(&initialised, Some(options), None)
        .await
        .unwrap();
    // Another thread, as another test: this one holds its slot.
    let fixture = third.clone();
    let other = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let db = fixture.worker_db().await.unwrap();
                db.query_one("SELECT 1", &[]).await.unwrap();
                db.worker_id().clone()
            })
    })
    .join()
    .unwrap();
    assert_ne!(held.worker_id(), &other);
    let images: Vec<String> = common::run_containers(&third.config().run_id)
        .await
        .into_iter()
        .filter_map(|c| c.image)
        .collect();
    assert!(images.contains(&base), "{images:?}");

    // The next process finds no initialised image and has it built again, unless a
    // container creation of another test had it built meanwhile. Either way a build
    // ran after the orphan above was made, and removed it.
    let out = run_child(&[
        ("PGFIXTURE_RUN_ID", &common::unique_run("init4")),
        ("PGFIXTURE_ISOLATION", "container"),
        ("PGFIXTURE_GRACE", "1"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("CHILD-OK users=1"), "{stdout}");
    let waited = Instant::now();
    while docker.inspect_image(&orphan).await.is_ok() {
        assert!(
            waited.elapsed() < Duration::from_secs(90),
            "the unused untagged image {orphan} of {base} is still there after 90 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `auto` with neither Docker nor local binaries lists the ways to fix it.
#[test]
fn no_backend_lists_the_fixes() {
    let out = run_child(&[
        ("PGFIXTURE_BACKEND", "auto"),
        ("PGFIXTURE_REQUIRE_DOCKER", "0"),
        ("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
        ("PGFIXTURE_PG_BIN", "/nonexistent/bin"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout} {stderr}");
    for fix in [
        "start a Docker daemon",
        "PGFIXTURE_PG_BIN",
        "apt-get install postgresql",
        "PGFIXTURE_BACKEND",
    ] {
        assert!(stderr.contains(fix), "missing {fix:?} in {stderr}");
    }
}

/// Run by [`the_fallback_to_local_binaries_is_said_once`] in a child process: two
/// configurations (as two migrations sets would make) resolve their backend at once.
#[test]
#[ignore = "helper, run as a child process by the_fallback_to_local_binaries_is_said_once"]
fn two_configurations_child() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let one = Fixture::from_env().unwrap();
        let other = Fixture::builder().no_fixtures().build().unwrap();
        let (a, b) = tokio::join!(one.worker_db(), other.worker_db());
        let (_a, _b) = (a.unwrap(), b.unwrap());
        assert_eq!(one.stats().backend, Some("local"));
        assert_eq!(other.stats().backend, Some("local"));
    });
}

/// With Docker unreachable, the fallback to local binaries is said on stderr once per
/// process, however many configurations resolve their backend, and past libtest's
/// capture of a passing test's output.
#[test]
fn the_fallback_to_local_binaries_is_said_once() {
    let out = captured_child_command(
        "two_configurations_child",
        &[
            ("PGFIXTURE_BACKEND", "auto"),
            ("PGFIXTURE_REQUIRE_DOCKER", "0"),
            ("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
            ("PGFIXTURE_GRACE", "2"),
        ],
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stderr.matches("using local PostgreSQL binaries").count(),
        1,
        "{stderr}"
    );
}

/// Run twice by [`the_test_binaries_of_one_cargo_test_share_its_run`], as `cargo test`
/// runs two test binaries: the first commits a row through the worker pool and exits
/// holding it (as a binary stopped by a failure would); the second reports whether it
/// finds that row, and what it had to build.
#[test]
#[ignore = "helper, run as a child process by the_test_binaries_of_one_cargo_test_share_its_run"]
fn cargo_binary_child() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let fixture = Fixture::builder().workers(1).build().unwrap();
        if std::env::var("PGFIXTURE_TEST_CHILD_COMMITS").as_deref() == Ok("1") {
            let pool = fixture.worker_pool().await.unwrap();
            pool.get()
                .await
                .unwrap()
                .batch_execute("INSERT INTO users (email) VALUES ('first-binary@example.com')")
                .await
                .unwrap();
            println!("CHILD-OK run={} committed", fixture.config().run_id);
            std::process::exit(0);
        }
        let db = fixture.worker_db().await.unwrap();
        let leaked: i64 = db
            .query_one(
                "SELECT count(*) FROM users WHERE email = 'first-binary@example.com'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let stats = fixture.stats();
        println!(
            "CHILD-OK run={} leaked={leaked} started={} templates={} reset={}",
            fixture.config().run_id,
            stats.servers_started,
            stats.templates_built,
            stats.workers_reset,
        );
    });
}

/// `cargo test` runs its test binaries one after another, as children of one `cargo`
/// process: they share its run. The second binary finds the server and template the
/// first made, and the worker it left marked as in use by a worker pool, which it
/// resets: none of the rows the first committed.
#[test]
fn the_test_binaries_of_one_cargo_test_share_its_run() {
    // A `cargo` of our own: a shell by that name, which runs this binary's helper twice.
    let dir = std::env::temp_dir().join(format!("pgfx-cargo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cargo = dir.join("cargo");
    let _ = std::fs::remove_file(&cargo);
    std::os::unix::fs::symlink("/bin/sh", &cargo).unwrap();
    let helper = captured_child_command("cargo_binary_child", &[]);
    let exe = helper.get_program().to_owned();
    let args: Vec<_> = helper.get_args().map(|a| a.to_owned()).collect();
    let mut command = std::process::Command::new(&cargo);
    // Never `exec`ed in the shell's place (the last command of a script may be).
    command
        .arg("-c")
        .arg("\"$0\" \"$@\" --nocapture || exit 1; PGFIXTURE_TEST_CHILD_COMMITS=0 \"$0\" \"$@\" --nocapture || exit 2; exit 0")
        .arg(exe)
        .args(args);
    for (key, value) in helper.get_envs() {
        match value {
            Some(value) => command.env(key, value),
            None => command.env_remove(key),
        };
    }
    command.env("PGFIXTURE_TEST_CHILD_COMMITS", "1");
    let out = command.output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let reports: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_once("CHILD-OK").map(|(_, report)| report))
        .collect();
    assert_eq!(reports.len(), 2, "{stdout}");
    let run = |report: &str| report.split_whitespace().next().unwrap().to_owned();
    assert_eq!(run(reports[0]), run(reports[1]), "one run: {stdout}");
    assert!(run(reports[0]).starts_with("run=t"), "{stdout}");
    assert_eq!(reported(reports[1], "leaked"), 0, "{stdout}");
    assert_eq!(reported(reports[1], "reset"), 1, "{stdout}");
    for built in ["started", "templates"] {
        assert_eq!(reported(reports[1], built), 0, "{built}: {stdout}");
    }
}

/// `PGFIXTURE_REUSE=1`: the next run finds the servers, template and worker of the
/// last one, past the grace period; a changed fixture makes a new template; after the
/// idle time nothing is left.
#[tokio::test]
async fn reuse_keeps_servers_for_the_next_run_until_idle() {
    for isolation in ["database", "container"] {
        let run = unique_run("reuse");
        let fixtures = fixture_dir(
            "reuse",
            &[
                ("001_schema.sql", include_str!("../fixtures/001_schema.sql")),
                (
                    "002_applied_marker.sql",
                    include_str!("../fixtures/002_applied_marker.sql"),
                ),
            ],
        );
        let env = [
            ("PGFIXTURE_REUSE", "1"),
            // The second and third processes must come within the idle time. 6 s left
            // 3.5 s for a process's start and its Docker lookups, and CI once saw the
            // second process start a new server (likely a Docker daemon busy with
            // another test's image build).
            ("PGFIXTURE_REUSE_IDLE", "12"),
            ("PGFIXTURE_GRACE", "1"),
            ("PGFIXTURE_RUN_ID", run.as_str()),
            ("PGFIXTURE_ISOLATION", isolation),
            ("PGFIXTURE_WORKER", "0"),
            ("PGFIXTURE_FIXTURES", fixtures.to_str().unwrap()),
        ];
        let report = |env: &[(&str, &str)]| {
            let out = run_child(env);
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                stdout.contains("CHILD-OK"),
                "{isolation}: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            stdout
        };
        let first = report(&env);
        assert_eq!(reported(&first, "started"), 1, "{isolation}: {first}");
        assert_eq!(reported(&first, "provisioned"), 1, "{isolation}: {first}");
        // Longer than the grace period: without reuse the servers would be gone.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let second = report(&env);
        for key in ["started", "templates", "provisioned"] {
            assert_eq!(reported(&second, key), 0, "{isolation}: {key} in {second}");
        }
        assert_eq!(reported(&second, "reused"), 1, "{isolation}: {second}");
        println!(
            "{isolation}: first handle {} ms cold, {} ms reused",
            reported(&first, "ms"),
            reported(&second, "ms")
        );
        std::fs::write(
            fixtures.join("003_more.sql"),
            "CREATE TABLE more (id int);\n",
        )
        .unwrap();
        let third = report(&env);
        assert_eq!(reported(&third, "started"), 0, "{isolation}: {third}");
        assert_eq!(
            reported(&third, "templates"),
            1,
            "{isolation}: a changed fixture needs a new template: {third}"
        );
        assert_gone_after_grace(&run, "the reuse idle time").await;
    }
}

fn fixture_dir(tag: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("fixtures-{tag}-{}", unique_run("f")));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, sql) in files {
        std::fs::write(dir.join(name), sql).unwrap();
    }
    dir
}

async fn broken_fixture_in(isolation: Isolation) {
    let dir = fixture_dir(
        isolation_name(isolation),
        &[
            ("001_ok.sql", "CREATE TABLE fine (id int);\n"),
            (
                "002_bad.sql",
                "-- a comment\nCREATE TABLE also_fine (id int);\nCREATE TABEL broken (id int);\n",
            ),
        ],
    );
    // A run of its own: the check below counts every half-built name on the server,
    // and other tests of the default run build (`..._new`) on theirs at any moment.
    let config = common::own_config("brkn", Duration::from_secs(10));
    let builder = || {
        Fixture::builder()
            .config(config.clone())
            .isolation(isolation)
    };
    let broken = builder().fixtures(&dir).build().unwrap();
    match broken.worker_db().await {
        Err(Error::Fixture {
            path,
            line,
            statement,
            message,
            ..
        }) => {
            assert!(path.ends_with("002_bad.sql"), "{path:?}");
            assert_eq!(line, Some(3), "{message}");
            assert!(message.contains("syntax error"), "{message}");
            assert_eq!(statement.as_deref(), Some("CREATE TABEL broken (id int);"));
        }
        other => panic!("expected a fixture error, got {other:?}"),
    }
    // Nothing half-built is left where the next attempt could find it.
    let good = builder().build().unwrap();
    let db = good.worker_db().await.unwrap();
    let half_built: i64 = db
        .query_one(
            "SELECT (SELECT count(*) FROM pg_database WHERE datname LIKE 'pgfx\\_%\\_new') + \
                    (SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'pgfx\\_%\\_new')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        half_built, 0,
        "a half-applied template or schema was left behind"
    );
    let also_fine: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'also_fine'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        also_fine, 0,
        "the broken fixture's first statement is visible to working tests"
    );

    // The same failure again, then fixed: the fixed files are applied from scratch.
    assert!(matches!(
        broken.worker_db().await,
        Err(Error::Fixture { .. })
    ));
    let fixed_dir = fixture_dir(
        isolation_name(isolation),
        &[
            ("001_ok.sql", "CREATE TABLE fine (id int);\n"),
            (
                "002_bad.sql",
                "CREATE TABLE also_fine (id int);\nCREATE TABLE broken (id int);\n",
            ),
        ],
    );
    let fixed = builder().fixtures(&fixed_dir).build().unwrap();
    let db = fixed.worker_db().await.unwrap();
    db.execute("INSERT INTO broken VALUES (1)", &[])
        .await
        .unwrap();
}

/// An error of execution (the server gives no position) names the file, the line
/// where the failing statement starts, and the statement, in every mode.
#[tokio::test]
async fn an_execution_error_in_a_fixture_names_its_line_and_statement() {
    for isolation in [Isolation::Database, Isolation::Schema] {
        let dir = fixture_dir(
            isolation_name(isolation),
            &[(
                "001_seed.sql",
                "CREATE TABLE t (id int PRIMARY KEY, note text DEFAULT 'a;b');\n\
                 INSERT INTO t (id) VALUES (1);\n\
                 /* the same id again; */\n\
                 INSERT INTO t (id)\n  VALUES (1);\n\
                 INSERT INTO t (id) VALUES (2);\n",
            )],
        );
        let fixture = Fixture::builder()
            .isolation(isolation)
            .fixtures(&dir)
            .build()
            .unwrap();
        let error = fixture.worker_db().await.unwrap_err();
        let Error::Fixture {
            path,
            line,
            statement,
            message,
            ..
        } = &error
        else {
            panic!("{isolation:?}: expected a fixture error, got {error:?}");
        };
        assert!(path.ends_with("001_seed.sql"), "{path:?}");
        assert_eq!(*line, Some(4), "{isolation:?}: {error}");
        assert_eq!(statement.as_deref(), Some("INSERT INTO t (id) VALUES (1);"));
        assert!(message.contains("duplicate key"), "{message}");
        let text = error.to_string();
        assert!(
            text.contains("001_seed.sql (line 4)")
                && text.contains("INSERT INTO t (id) VALUES (1);"),
            "{text}"
        );
    }
}

fn isolation_name(isolation: Isolation) -> &'static str {
    match isolation {
        Isolation::Container => "container",
        Isolation::Database => "database",
        Isolation::Schema => "schema",
    }
}

/// One test for both modes, each on a run of its own.
#[tokio::test]
async fn a_broken_fixture_names_file_and_line_and_leaves_nothing_half_built() {
    broken_fixture_in(Isolation::Database).await;
    broken_fixture_in(Isolation::Schema).await;
}

#[tokio::test]
async fn a_fixture_file_that_cannot_be_read_is_named() {
    let dir = fixture_dir("gone", &[("001_ok.sql", "SELECT 1;")]);
    std::os::unix::fs::symlink("/nonexistent/pgfixture.sql", dir.join("002_gone.sql")).unwrap();
    let message = Fixture::builder()
        .fixtures(&dir)
        .build()
        .unwrap_err()
        .to_string();
    assert!(message.contains("002_gone.sql"), "{message}");
}

#[tokio::test]
async fn a_fixture_file_that_is_not_utf8_is_named() {
    let dir = fixture_dir("utf8", &[]);
    std::fs::write(
        dir.join("001_latin1.sql"),
        b"INSERT INTO t VALUES ('caf\xe9');",
    )
    .unwrap();
    let err = Fixture::builder().fixtures(&dir).build().unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("001_latin1.sql") && message.contains("UTF-8"),
        "{message}"
    );
}

#[tokio::test]
async fn stats_count_what_was_provisioned() {
    let fixture = Fixture::builder().workers(1).build().unwrap();
    let db = fixture.worker_db().await.unwrap();
    drop(db);
    let db = fixture.worker_db().await.unwrap();
    drop(db);
    let stats = fixture.stats();
    assert!(stats.backend.is_some());
    assert_eq!(stats.served.values().sum::<u64>(), 2, "{stats:?}");
    assert_eq!(
        stats.workers_provisioned + stats.workers_reused,
        1,
        "{stats:?}"
    );
}

/// The process environment with some variables overridden: a configuration as a
/// child with those variables would read it.
struct Overlay(Vec<(&'static str, String)>);

impl pgfixture::Env for Overlay {
    fn var(&self, name: &str) -> Option<String> {
        match self.0.iter().find(|(k, _)| *k == name) {
            Some((_, v)) => Some(v.clone()).filter(|v| !v.is_empty()),
            None => pgfixture::OsEnv.var(name),
        }
    }
}

/// Two concurrent CI jobs whose run ids differ only in their tail, or only in case and
/// punctuation, share no server: each one's committed rows stay its own. (Run ids were
/// once cut to 12 letters and digits, so such jobs dropped each other's databases.)
#[tokio::test]
async fn run_ids_that_differ_only_in_tail_case_or_punctuation_share_nothing() {
    let salt = unique_run("ids");
    let pairs = [
        (format!("pipeline{salt}job1"), format!("pipeline{salt}job2")),
        (format!("Job-{salt}"), format!("job{salt}")),
    ];
    for (a, b) in pairs {
        let fixture = |run: &str| {
            let env = Overlay(vec![
                ("PGFIXTURE_RUN_ID", run.to_owned()),
                ("PGFIXTURE_WORKER", String::new()),
                ("NEXTEST_TEST_GLOBAL_SLOT", String::new()),
                ("NEXTEST_RUN_ID", String::new()),
                ("PGFIXTURE_GRACE", "2".to_owned()),
            ]);
            let config = pgfixture::Config::from_lookup(&env).unwrap();
            Fixture::builder()
                .config(config)
                .workers(1)
                .build()
                .unwrap()
        };
        let (fa, fb) = (fixture(&a), fixture(&b));
        assert_ne!(fa.config().run_id, fb.config().run_id, "{a} and {b}");
        let (da, db) = tokio::join!(fa.worker_db(), fb.worker_db());
        let (da, db) = (da.unwrap(), db.unwrap());
        let server = format!("SELECT {}", common::SERVER_IDENTITY);
        let sa: String = da.query_one(&server, &[]).await.unwrap().get(0);
        let sb: String = db.query_one(&server, &[]).await.unwrap().get(0);
        assert_ne!(sa, sb, "runs {a} and {b} share a server");
        // What one run commits is not there for the other.
        da.batch_execute("COMMIT; INSERT INTO users (email) VALUES ('run-a@example.com')")
            .await
            .unwrap();
        let seen: i64 = db
            .query_one(
                "SELECT count(*) FROM users WHERE email = 'run-a@example.com'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(seen, 0, "run {b} sees what run {a} committed");
        drop((da, db));
    }
}

/// Fixtures that create an extension and roles work in every shared-server mode, with
/// workers built at the same moment: in schema mode those statements run once per
/// database (extensions in a schema on every worker's `search_path`), never racing.
/// A database-wide object that schema mode cannot isolate is refused up front, with
/// its file, line and statement.
#[test]
fn extensions_and_roles_in_fixtures_work_in_schema_mode_too() {
    let salt = unique_run("ext");
    for isolation in [Isolation::Schema, Isolation::Database] {
        let dir = fixture_dir(
            isolation_name(isolation),
            &[
                (
                    "001_ext.sql",
                    &format!(
                        "CREATE EXTENSION hstore;\nCREATE ROLE reader_{salt};\n\
                         CREATE TABLE items (id serial PRIMARY KEY, attrs hstore, tags hstore[]);\n\
                         GRANT SELECT ON items TO reader_{salt};\n"
                    ),
                ),
                (
                    "002_seed.sql",
                    "INSERT INTO items (attrs) VALUES ('a=>1');\n",
                ),
            ],
        );
        let mut config = common::own_config("ext", Duration::from_secs(2));
        config.isolation = isolation;
        let fixture = Fixture::builder()
            .config(config)
            .fixtures(&dir)
            .workers(4)
            .build()
            .unwrap();
        let barrier = std::sync::Barrier::new(4);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    barrier.wait();
                    rt.block_on(async {
                        let db = fixture.worker_db().await.unwrap_or_else(|e| {
                            panic!("{isolation:?}: {e}");
                        });
                        let row = db
                            .query_one(
                                "INSERT INTO items (attrs) VALUES ('b=>2') RETURNING \
                                 (SELECT count(*) FROM items), attrs -> 'b', \
                                 has_table_privilege($1, 'items', 'SELECT')",
                                &[&format!("reader_{salt}")],
                            )
                            .await
                            .unwrap();
                        let (count, b, granted): (i64, String, bool) =
                            (row.get(0), row.get(1), row.get(2));
                        assert_eq!(
                            (count, b.as_str(), granted),
                            (1, "2", true),
                            "{isolation:?}"
                        );
                        // Hold the worker a moment so that the four overlap.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    });
                });
            }
        });
        assert_eq!(
            fixture.stats().served.len(),
            4,
            "{isolation:?}: four workers"
        );
    }
    let dir = fixture_dir(
        "refused",
        &[("001.sql", "CREATE TABLE t ();\nCREATE SCHEMA audit;\n")],
    );
    let error = Fixture::builder()
        .isolation(Isolation::Schema)
        .fixtures(&dir)
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("001.sql (line 2)")
            && error.contains("CREATE SCHEMA audit;")
            && error.contains("PGFIXTURE_ISOLATION=database"),
        "{error}"
    );
}

/// A test binary run outside cargo (a debugger, an IDE, a nextest archive) has no
/// `CARGO_MANIFEST_DIR`, so the default fixtures directory cannot be found: it says so
/// on stderr, naming `PGFIXTURE_FIXTURES`, instead of failing far from the cause.
#[test]
fn fixtures_not_found_outside_cargo_are_announced() {
    let run = unique_run("nomf");
    let out = run_child(&[
        ("CARGO_MANIFEST_DIR", ""),
        ("PGFIXTURE_RUN_ID", &run),
        ("PGFIXTURE_GRACE", "1"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("CARGO_MANIFEST_DIR is not set").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("set PGFIXTURE_FIXTURES"), "{stderr}");
    // With the directory named, the fixtures are there.
    let out = run_child(&[
        ("CARGO_MANIFEST_DIR", ""),
        (
            "PGFIXTURE_FIXTURES",
            concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures"),
        ),
        ("PGFIXTURE_RUN_ID", &run),
        ("PGFIXTURE_GRACE", "1"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("CHILD-OK users=1"),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("CARGO_MANIFEST_DIR is not set"));
}

/// `PGFIXTURE_SERVER_SETTINGS` (here the builder's `server_setting`) reaches the
/// servers pgfixture starts, which are other servers than those without it; a setting
/// the server refuses is an error naming it, and leaves nothing behind.
#[tokio::test]
async fn server_settings_make_other_servers_and_a_refused_one_is_named() {
    let (run, refused_run) = (unique_run("sets"), unique_run("refu"));
    let fixture = |settings: &[(&str, &str)]| {
        let mut config = pgfixture::Config::from_env().unwrap();
        // The servers that refuse their settings are checked for leftovers; this
        // process keeps connections to the others.
        config.run_id = if settings.iter().any(|(_, v)| *v == "lots" || *v == "1") {
            refused_run.clone()
        } else {
            run.clone()
        };
        config.worker = None;
        config.grace = Duration::from_secs(1);
        let mut builder = Fixture::builder().config(config).workers(1);
        for setting in settings {
            builder = builder.server_setting(*setting);
        }
        builder.build().unwrap()
    };
    let server = format!(
        "SELECT {}, current_setting('timezone'), current_setting('work_mem')",
        common::SERVER_IDENTITY
    );
    let plain = fixture(&[]).worker_db().await.unwrap();
    let set = fixture(&[("TimeZone", "Pacific/Chatham"), ("work_mem", "5MB")])
        .worker_db()
        .await
        .unwrap();
    let a = plain.query_one(&server, &[]).await.unwrap();
    let b = set.query_one(&server, &[]).await.unwrap();
    assert_ne!(
        a.get::<_, String>(0),
        b.get::<_, String>(0),
        "one server for both"
    );
    assert_eq!(b.get::<_, String>(1), "Pacific/Chatham");
    assert_eq!(b.get::<_, String>(2), "5MB");
    assert_ne!(a.get::<_, String>(1), "Pacific/Chatham");
    drop((plain, set));

    for (name, value) in [("work_mem", "lots"), ("no_such_setting", "1")] {
        let error = fixture(&[(name, value)]).worker_db().await.unwrap_err();
        let text = error.to_string();
        assert!(
            matches!(
                error,
                Error::Config {
                    var: "PGFIXTURE_SERVER_SETTINGS",
                    ..
                }
            ) && text.contains(&format!("{name}={value}"))
                && text.contains(&format!("\"{name}\"")),
            "{name}={value}: {text}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    while !leftovers(&refused_run).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind by servers that refused their settings: {:?}",
            leftovers(&refused_run).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn process_alive(pid: &str) -> bool {
    // A zombie (killed, not yet reaped by init) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or_default()
            .trim_start()
            .starts_with('Z')
    })
}

/// A local server whose watchdog is killed (as a CI system kills every process of a
/// job's session) stops by itself, and the next pgfixture process removes its directory.
#[tokio::test]
async fn a_local_server_stops_when_its_watchdog_is_killed() {
    let fixture =
        common::own_fixture_on("wdog", pgfixture::Backend::Local, Duration::from_secs(60));
    let run = fixture.config().run_id.clone();
    let db = fixture.worker_db().await.unwrap();
    let dir = local_server_dir(&run);
    let watchdog = std::fs::read_to_string(dir.join("watchdog"))
        .unwrap()
        .trim()
        .to_owned();
    let postmaster = std::fs::read_to_string(dir.join("data/postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned();
    assert!(process_alive(&postmaster));
    std::process::Command::new("kill")
        .args(["-KILL", &watchdog])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while process_alive(&postmaster) {
        assert!(
            Instant::now() < deadline,
            "postgres {postmaster} outlived its watchdog"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(db);
    // The next process that starts a local server sweeps it (under nextest, another
    // test's process may be first), once the watchdog's record is two seconds old (a
    // younger one may be being written).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let out = run_child(&[
        ("PGFIXTURE_RUN_ID", &unique_run("wdog")),
        ("PGFIXTURE_BACKEND", "local"),
        ("PGFIXTURE_GRACE", "1"),
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("CHILD-OK"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !dir.exists(),
        "the orphaned directory {} is still there",
        dir.display()
    );
}

/// A process that finds its run's local server ready (as every nextest process but the
/// first does) still sweeps what dead runs left, beside its test rather than before it.
#[tokio::test]
async fn a_process_that_finds_its_server_ready_sweeps_dead_runs() {
    let (run, server) = started_local_run("swpt");
    let env = local_run_env(&run);
    // A directory a dead run left: its watchdog's process is gone, and its record is
    // old enough to be judged.
    let orphan = server
        .parent()
        .unwrap()
        .join(format!("pgfixture-{}-000000-shared", unique_run("dead")));
    std::fs::create_dir(&orphan).unwrap();
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    std::fs::write(orphan.join("watchdog"), format!("{pid}\n")).unwrap();
    let aged = std::process::Command::new("touch")
        .args(["-d", "1 minute ago"])
        .arg(orphan.join("watchdog"))
        .status()
        .unwrap();
    assert!(aged.success());
    let mut lingering = env.to_vec();
    lingering.push(("PGFIXTURE_TEST_CHILD_LINGERS", "1"));
    let (stdout, _) = common::run_child_ok(&lingering);
    assert!(stdout.contains("started=0"), "{stdout}");
    assert!(
        !orphan.exists(),
        "the dead run's directory {} is still there",
        orphan.display()
    );
}

/// A process finds its run's local server through the record the first process left,
/// without looking for the binaries; a record that names a directory that is gone is
/// not trusted: the process finds the server the long way and records it again.
#[tokio::test]
async fn a_process_finds_its_runs_local_server_through_a_record() {
    let (run, server) = started_local_run("rcrd");
    let env = local_run_env(&run);
    let records = user_dir().join("local-servers");
    let names_server = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| text.lines().next().map(std::path::PathBuf::from))
            == Some(server.clone())
    };
    let record = std::fs::read_dir(&records)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| names_server(p))
        .expect("a record of the run's server");
    let (stdout, _) = common::run_child_ok(&env);
    assert!(stdout.contains("started=0"), "{stdout}");
    // A record of a server whose directory is gone.
    let text = std::fs::read_to_string(&record).unwrap();
    let bin = text.lines().nth(1).unwrap();
    std::fs::write(&record, format!("{}-gone\n{bin}\n", server.display())).unwrap();
    let (stdout, _) = common::run_child_ok(&env);
    assert!(stdout.contains("started=0"), "{stdout}");
    assert!(
        names_server(&record),
        "the record was not written again: {:?}",
        std::fs::read_to_string(&record)
    );
}

/// A new run of the local backend whose first child process started its server: the
/// run, and the server's directory.
fn started_local_run(prefix: &str) -> (String, std::path::PathBuf) {
    let run = unique_run(prefix);
    let (stdout, _) = common::run_child_ok(&local_run_env(&run));
    assert!(stdout.contains("started=1"), "{stdout}");
    let server = local_server_dir(&run);
    (run, server)
}

/// The environment of a child process of the local run `run`.
fn local_run_env(run: &str) -> [(&'static str, &str); 4] {
    [
        ("PGFIXTURE_RUN_ID", run),
        ("PGFIXTURE_BACKEND", "local"),
        ("PGFIXTURE_ISOLATION", "database"),
        ("PGFIXTURE_GRACE", "5"),
    ]
}

/// The directory of the local server of the run `run`.
fn local_server_dir(run: &str) -> std::path::PathBuf {
    common::local_dirs()
        .into_iter()
        .flat_map(|base| std::fs::read_dir(base).into_iter().flatten().flatten())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("pgfixture-{run}"))
        })
        .expect("the server's directory")
}

/// The per-user record of container addresses loses the records of containers that
/// are gone, at the next container creation (it once grew by a file per container),
/// and so do the directories of their sockets.
#[tokio::test]
async fn records_of_gone_containers_are_removed() {
    // Docker itself: scripts/test.sh selects this test out of the local backend's runs.
    let user = user_dir();
    let records = user.join("docker-endpoints");
    std::fs::create_dir_all(&records).unwrap();
    let gone = format!("pgfixture-{}-000000-shared", unique_run("gone"));
    let stale = records.join(&gone);
    std::fs::write(&stale, "172.17.0.99:5432\n").unwrap();
    let stale_socket = user.join("sockets").join(format!("{gone}.0badc0de"));
    std::fs::create_dir_all(&stale_socket).unwrap();
    std::fs::write(stale_socket.join(".s.PGSQL.5432.lock"), "1\n").unwrap();
    // Older than a minute, as a record of a container long gone.
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(old)
        .unwrap();
    std::fs::File::open(&stale_socket)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let fixture =
        common::own_fixture_on("recs", pgfixture::Backend::Docker, Duration::from_secs(2));
    let db = fixture.worker_db().await.unwrap();
    let own: Vec<_> = std::fs::read_dir(&records)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .contains(&fixture.config().run_id)
        })
        .collect();
    assert_eq!(own.len(), 1, "the new container's record");
    assert!(
        !stale.exists(),
        "the gone container's record is still there"
    );
    assert!(
        !stale_socket.exists(),
        "the gone container's socket directory is still there"
    );
    drop(db);
}

/// Local servers start from a cached initialised data directory (no initdb after the
/// first); a damaged cache is detected, removed, and made again by the next start.
#[test]
fn a_damaged_initdb_cache_is_detected_and_rebuilt() {
    // A directory of its own, so that the damage meets no other test.
    let tmp = std::env::temp_dir().join(format!("pgfx-{}", unique_run("c")));
    std::fs::create_dir_all(&tmp).unwrap();
    let tmp_text = tmp.display().to_string();
    let child = || {
        let out = run_child(&[
            ("PGFIXTURE_RUN_ID", &unique_run("cache")),
            ("PGFIXTURE_BACKEND", "local"),
            ("PGFIXTURE_GRACE", "1"),
            ("PGFIXTURE_LOCAL_DIR", &tmp_text),
        ]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("CHILD-OK users=1"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    child();
    let caches = tmp.join("initdb-cache");
    let versions: Vec<PathBuf> = std::fs::read_dir(&caches)
        .expect("a cache after a local start")
        .flatten()
        .map(|e| e.path().join("data").join("PG_VERSION"))
        .filter(|p| p.exists())
        .collect();
    assert!(
        !versions.is_empty(),
        "no cached data directory in {}",
        caches.display()
    );
    let original = std::fs::read(&versions[0]).unwrap();
    for version in &versions {
        // Cut short, as a disk that filled up or a stray clean-up would leave it.
        std::fs::write(version, b"").unwrap();
    }
    child();
    for version in &versions {
        assert_eq!(
            std::fs::read(version).ok().as_deref(),
            Some(original.as_slice()),
            "the damaged cache {} was not rebuilt",
            version.display()
        );
    }
    // The servers' directories go after their grace period; then the rest.
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(&tmp)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("pgfixture-"))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The watchdog counts every connection of pgfixture's, whichever way it goes (a local
/// server's are on its Unix socket, a container's on TCP): a server whose test holds
/// a handle for longer than the grace period stays up, and its connection keeps
/// working. (That it goes once idle is `nothing_remains_after_the_grace_period`.)
#[tokio::test]
async fn a_server_in_use_outlives_its_grace_period() {
    let mut config = pgfixture::Config::from_env().unwrap();
    config.run_id = unique_run("held");
    config.worker = None;
    config.grace = Duration::from_secs(1);
    let fixture = Fixture::builder()
        .config(config)
        .isolation(Isolation::Database)
        .workers(1)
        .build()
        .unwrap();
    let db = fixture.worker_db().await.unwrap();
    let started: String = db
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .unwrap()
        .get(0);
    // Four polls of the watchdog past a grace of one.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let still: String = db
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .expect("the server was stopped while a test held its connection")
        .get(0);
    assert_eq!(started, still);
    db.release().await.unwrap();
}
