//! The background runtime that owns every connection pgfixture opens.
//!
//! Each `#[tokio::test]` builds its own runtime and drops it when the test ends; a
//! connection whose task ran on that runtime dies with it. pgfixture therefore opens
//! connections, and runs their tasks, on one runtime of its own that lives as long as
//! the process. Callers only await a `JoinHandle`, which works from any runtime flavour.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::{Builder, Handle, Runtime};

/// Two threads: connection I/O is light, and these machines have two cores. One in a
/// process that runs one test (nextest), whose background work is one connection:
/// a thread less to start, and no hand-offs between two.
const THREADS: usize = 2;
const THREAD_NAME: &str = "pgfixture";

pub(crate) fn handle() -> &'static Handle {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let threads = if crate::driver::one_test_per_process() {
                1
            } else {
                THREADS
            };
            Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name(THREAD_NAME)
                .enable_all()
                .build()
                .expect("pgfixture: cannot start its background runtime")
        })
        .handle()
}

/// Whether the calling thread is one of the background runtime's.
#[cfg_attr(not(feature = "sqlx"), allow(dead_code))]
pub(crate) fn on_background() -> bool {
    std::thread::current().name() == Some(THREAD_NAME)
}

/// Runs `future` on the background runtime and waits for it from wherever the caller is.
pub(crate) async fn run<F>(future: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match handle().spawn(future).await {
        Ok(output) => output,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("pgfixture: background task cancelled: {e}"),
    }
}

/// Runs `future` on the background runtime and blocks the calling thread until it is
/// done: for `Drop` implementations, whose work must finish before the next test takes
/// the worker (or before a nextest process exits). On a thread of the background
/// runtime itself it cannot wait, and only starts the work.
pub(crate) fn block_on<F>(future: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let (done, wait) = std::sync::mpsc::channel::<()>();
    handle().spawn(async move {
        future.await;
        drop(done);
    });
    if !on_background() {
        // Returns when the task ends, panicking or not (the sender is dropped either way).
        let _ = wait.recv();
    }
}
