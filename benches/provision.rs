//! Worker provisioning time and memory per worker, per isolation mode, on the backend
//! the environment selects.
//!
//! ```text
//! cargo bench --bench provision
//! PGFIXTURE_BACKEND=local cargo bench --bench provision
//! ```
//!
//! Time to the first handle of a fresh process (medians of `BENCH_REPEAT`, default 3):
//! - `cold`: a new run: server start, template (fixtures), worker;
//! - `new worker`: a new worker on the run's running server(s);
//! - `reused`: the same worker again from a new process (as the next nextest process,
//!   or the next run with `PGFIXTURE_REUSE=1`).
//!
//! Memory per worker: a process holds a handle on each of 1, then 4, workers; the
//! difference divided by 3 is one worker's cost: in the test process (its resident
//! set) and on the server side (proportional set size of the servers' processes for
//! local servers, the containers' memory use for Docker).

#[path = "common/run.rs"]
mod run;
use run::median;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn child() {
    let started = Instant::now();
    let hold: usize = std::env::var("BENCH_HOLD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if hold == 0 {
        runtime.block_on(async {
            let db = pgfixture::worker_db().await.unwrap();
            db.query_one("SELECT 1", &[]).await.unwrap();
        });
        println!("first_us={}", started.elapsed().as_micros());
        return;
    }
    // Hold a handle on each of `hold` workers (threads hold slots), then report.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(hold + 1));
    for _ in 0..hold {
        let barrier = std::sync::Arc::clone(&barrier);
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    let db = pgfixture::worker_db().await.unwrap();
                    db.query_one("SELECT 1", &[]).await.unwrap();
                    barrier.wait();
                    tokio::time::sleep(Duration::from_secs(600)).await;
                });
        });
    }
    barrier.wait();
    let rss = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .map(|v| v.trim().trim_end_matches(" kB").parse::<u64>().unwrap())
        })
        .unwrap();
    println!("HOLDING rss_kb={rss}");
    std::thread::sleep(Duration::from_secs(600));
}

fn first_handle(env: &[(&str, &str)]) -> Duration {
    let out = Command::new(std::env::current_exe().unwrap())
        .env("PGFIXTURE_BENCH_CHILD", "1")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let us = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("first_us="))
        .unwrap();
    Duration::from_micros(us.parse().unwrap())
}

fn refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Server-side memory of a run, in kB: the PSS of its local servers' processes, or its
/// containers' memory use.
fn server_kb(run: &str, backend: &str) -> u64 {
    if backend == "docker" {
        let out = Command::new("docker")
            .args([
                "stats",
                "--no-stream",
                "--format",
                "{{.Name}} {{.MemUsage}}",
            ])
            .output()
            .unwrap();
        return String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(&format!("pgfixture-{run}-")))
            .filter_map(|l| l.split_whitespace().nth(1))
            .map(|usage| {
                let (n, unit) = usage.split_at(usage.find(|c: char| c.is_alphabetic()).unwrap());
                let n: f64 = n.parse().unwrap();
                let kb = match unit {
                    "KiB" => n,
                    "MiB" => n * 1024.0,
                    "GiB" => n * 1024.0 * 1024.0,
                    _ => n / 1024.0,
                };
                kb as u64
            })
            .sum();
    }
    let mut total = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let path = entry.path();
        let Ok(cmdline) = std::fs::read(path.join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if !cmdline.contains(&format!("pgfixture-{run}-")) && !is_child_of_run(&path, run) {
            continue;
        }
        if let Ok(rollup) = std::fs::read_to_string(path.join("smaps_rollup")) {
            total += rollup
                .lines()
                .find_map(|l| {
                    l.strip_prefix("Pss:")
                        .map(|v| v.trim().trim_end_matches(" kB").parse::<u64>().unwrap_or(0))
                })
                .unwrap_or(0);
        }
    }
    total
}

/// Backends (postgres children) carry no directory in their command line: match them
/// by their parent, the postmaster.
fn is_child_of_run(path: &std::path::Path, run: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
        return false;
    };
    let Some(ppid) = stat
        .rsplit(')')
        .next()
        .and_then(|s| s.split_whitespace().nth(1))
    else {
        return false;
    };
    std::fs::read(format!("/proc/{ppid}/cmdline"))
        .map(|c| {
            String::from_utf8_lossy(&c).contains(&format!("pgfixture-{run}-"))
                && String::from_utf8_lossy(&c).contains("postgres")
        })
        .unwrap_or(false)
}

/// Starts a child holding handles on `workers` workers; returns it, its RSS and the
/// servers' memory once it holds them.
fn holding(env: &[(&str, &str)], workers: usize, run: &str, backend: &str) -> (u64, u64) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("PGFIXTURE_BENCH_CHILD", "1")
        .env("BENCH_HOLD", workers.to_string())
        .env("PGFIXTURE_WORKERS", workers.to_string())
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut rss = 0;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(kb) = line.strip_prefix("HOLDING rss_kb=") {
            rss = kb.parse().unwrap();
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let server = server_kb(run, backend);
    child.kill().unwrap();
    child.wait().unwrap();
    (rss, server)
}

fn main() {
    if std::env::var_os("PGFIXTURE_BENCH_CHILD").is_some() {
        child();
        return;
    }
    let repeat: usize = std::env::var("BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let backend = match std::env::var("PGFIXTURE_BACKEND").as_deref() {
        Ok("local") => "local",
        Ok("docker") => "docker",
        _ if Command::new("docker")
            .arg("info")
            .output()
            .is_ok_and(|o| o.status.success()) =>
        {
            "docker"
        }
        _ => "local",
    };
    println!(
        "worker provisioning, time to the first handle of a new process ({backend}, median of {repeat})"
    );
    println!(
        "{:<10} {:>10} {:>11} {:>10}",
        "mode", "cold", "new worker", "reused"
    );
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    let mut memory = Vec::new();
    for mode in ["database", "schema", "container"] {
        let (mut cold, mut fresh, mut reused) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..repeat {
            let run = format!("bp{:06x}{}{i}", std::process::id() & 0xffffff, &mode[..1]);
            let env = |worker: &'static str| {
                [
                    ("PGFIXTURE_RUN_ID", run.clone()),
                    ("PGFIXTURE_ISOLATION", mode.to_owned()),
                    ("PGFIXTURE_BACKEND", backend.to_owned()),
                    ("PGFIXTURE_WORKER", worker.to_owned()),
                    ("PGFIXTURE_GRACE", "3".to_owned()),
                ]
            };
            let (e0, e1) = (env("w0"), env("w1"));
            cold.push(first_handle(&refs(&e0)));
            fresh.push(first_handle(&refs(&e1)));
            reused.push(first_handle(&refs(&e1)));
        }
        println!(
            "{mode:<10} {:>10} {:>11} {:>10}",
            ms(median(cold)),
            ms(median(fresh)),
            ms(median(reused))
        );
        // Memory: 1 worker, then 4 workers, on a run of its own.
        let run = format!("bm{:06x}{}", std::process::id() & 0xffffff, &mode[..1]);
        let env = [
            ("PGFIXTURE_RUN_ID", run.as_str()),
            ("PGFIXTURE_ISOLATION", mode),
            ("PGFIXTURE_BACKEND", backend),
            ("PGFIXTURE_GRACE", "3"),
        ];
        let (rss1, server1) = holding(&env, 1, &run, backend);
        let (rss4, server4) = holding(&env, 4, &run, backend);
        memory.push((
            mode,
            rss4.saturating_sub(rss1) / 3,
            server4.saturating_sub(server1) / 3,
            server1,
        ));
    }
    println!();
    println!("memory per worker ({backend}): one worker's share, from 1 and 4 workers held");
    println!(
        "{:<10} {:>12} {:>12} {:>16}",
        "mode", "client", "server", "server, 1 worker"
    );
    for (mode, client, server, base) in memory {
        println!(
            "{mode:<10} {:>9} kB {:>9} kB {:>13} kB",
            client, server, base
        );
    }
}
