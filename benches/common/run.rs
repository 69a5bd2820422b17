//! What the benches share: their settings from the environment, medians, and a suite
//! run as `cargo test` runs `#[tokio::test]`s.
#![allow(dead_code)] // each bench uses some of them

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The number in the environment variable `name`, else `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Runs `tests` tests, `workers` at a time, each on a thread of its own with a fresh
/// current-thread runtime per test; returns the wall time.
pub fn run_suite<F, Fut>(workers: usize, tests: usize, test: F) -> Duration
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let next = Arc::new(AtomicUsize::new(0));
    let test = Arc::new(test);
    let started = Instant::now();
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let next = Arc::clone(&next);
            let test = Arc::clone(&test);
            std::thread::spawn(move || {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= tests {
                        break;
                    }
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                        .block_on(test(n));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a test panicked");
    }
    started.elapsed()
}
