//! The background runtime that owns every connection pgfixture opens.
//!
//! Each `#[tokio::test]` builds its own runtime and drops it when the test ends; a
//! connection whose task ran on that runtime dies with it. pgfixture therefore opens
//! connections, and runs their tasks, on one runtime of its own that lives as long as
//! the process. Callers only await a `JoinHandle`, which works from any runtime flavour.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

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

/// `tokio::time::timeout`, on a clock that runs. A test's runtime may have its clock
/// paused (`#[tokio::test(start_paused = true)]`, `tokio::time::pause()`): it then
/// jumps to the next timer whenever the test waits, even on the server, so that a
/// timeout on it expires before any answer can come. Timers of pgfixture's go to the
/// background runtime's clock then, and stay on the caller's otherwise (no thread to
/// start in a process that has none, no wake-up of another thread to arm them).
pub(crate) fn timeout<F: std::future::IntoFuture>(
    limit: Duration,
    work: F,
) -> tokio::time::Timeout<F::IntoFuture> {
    let _clock = clock_paused().then(|| handle().enter());
    tokio::time::timeout(limit, work)
}

/// How long a wait of pgfixture's goes before it says what it is waiting for
/// ([`noticed`]), and how often it says so again.
const SLOW_FIRST: Duration = Duration::from_secs(10);
const SLOW_EVERY: Duration = Duration::from_secs(30);

/// Runs `work` to its end. When it takes longer than 10 s, and every 30 s after, says
/// on stderr (and as a warning) that pgfixture is still `doing` it, so that a lock
/// another test or process holds, or migrations or setup code that hang, are seen
/// rather than silent. Nothing is cut short.
pub(crate) async fn noticed<T>(doing: &str, work: impl Future<Output = T>) -> T {
    noticed_after(doing, work, SLOW_FIRST, SLOW_EVERY, |doing, waited| {
        tracing::warn!(waited_secs = waited.as_secs(), "still {doing}");
        eprintln!("pgfixture: still {doing} after {} s", waited.as_secs());
    })
    .await
}

/// [`noticed`], with its intervals and what it says given.
async fn noticed_after<T>(
    doing: &str,
    work: impl Future<Output = T>,
    first: Duration,
    every: Duration,
    notice: impl Fn(&str, Duration),
) -> T {
    let mut work = std::pin::pin!(work);
    let (mut limit, mut waited) = (first, first);
    loop {
        match timeout(limit, work.as_mut()).await {
            Ok(done) => return done,
            Err(_) => {
                notice(doing, waited);
                limit = every;
                waited += every;
            }
        }
    }
}

/// `tokio::time::sleep`, on a clock that runs ([`timeout`]).
pub(crate) fn sleep(duration: Duration) -> tokio::time::Sleep {
    let _clock = clock_paused().then(|| handle().enter());
    tokio::time::sleep(duration)
}

/// Whether `runtime`'s clock is paused (`start_paused`): the drivers' own timeouts
/// (connecting, a pool's wait) would expire at once on it, so the test's connections
/// live on the background runtime then, as in a process of many tests.
fn paused(runtime: &Runtime) -> bool {
    let _clock = runtime.enter();
    clock_paused()
}

/// Whether the caller's clock is paused: it reads the same twice. A clock that runs
/// has moved by then (nanoseconds); on a system clock too coarse to have moved (ticks
/// of milliseconds on some virtual machines), the same again once the system's clock
/// has moved proves it paused. Otherwise a test on such a machine would start the
/// background runtime and keep its connections there, when it need not.
fn clock_paused() -> bool {
    let first = tokio::time::Instant::now();
    if tokio::time::Instant::now() != first {
        return false;
    }
    let system = std::time::Instant::now();
    while std::time::Instant::now() == system {
        std::hint::spin_loop();
    }
    tokio::time::Instant::now() == first
}

/// Whether the calling thread is one of the background runtime's.
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
/// done, for work a synchronous method needs before it returns; `None` on a thread of
/// the background runtime itself, which cannot wait for its own work.
pub(crate) fn wait<F>(future: F) -> Option<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    if on_background() {
        return None;
    }
    let (done, output) = std::sync::mpsc::channel();
    handle().spawn(async move {
        let _ = done.send(future.await);
    });
    // Nothing when the task panicked (the sender is dropped with it).
    output.recv().ok()
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

/// Whether the runtime of the calling thread goes on running its tasks while the
/// thread blocks in [`tokio::task::block_in_place`]: a multi-thread runtime (its other
/// threads, or a new one for this thread's share) other than pgfixture's own. A
/// current-thread runtime has no other thread, and `block_in_place` refuses it.
#[cfg_attr(not(any(feature = "sqlx", feature = "sqlx-0_8")), allow(dead_code))]
pub(crate) fn tasks_run_while_blocked() -> bool {
    Handle::try_current()
        .is_ok_and(|handle| handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        && !on_background()
}

/// A handle's end that a test's scope runs on the test's runtime once the test is over
/// ([`in_test_scope`]).
#[cfg_attr(not(any(feature = "sqlx", feature = "sqlx-0_8")), allow(dead_code))]
pub(crate) trait Deferred: Send {
    /// Ends the handle, on the runtime its connection lives on.
    fn end(self: Box<Self>) -> futures::future::BoxFuture<'static, ()>;
    /// The runtime is gone, and the connection with it, before the handle could be
    /// ended (it dropped with a task the test left running): what the test did cannot
    /// be read, so its worker is reset.
    fn lost(self: Box<Self>);
}

thread_local! {
    /// The ends deferred in the test scope this thread runs, if it runs one.
    static SCOPE: std::cell::RefCell<Option<Vec<Box<dyn Deferred>>>> =
        const { std::cell::RefCell::new(None) };
}

/// Whether this thread runs a test scope ([`in_test_scope`]): a connection opened here,
/// on the test's own runtime, lives as long as the test.
pub(crate) fn in_scope() -> bool {
    SCOPE.with(|scope| scope.borrow().is_some())
}

/// Runs `future` here in a test scope (on the test's own runtime, with no trip to
/// another thread), else on the background runtime ([`run`]).
#[cfg_attr(not(feature = "sqlx"), allow(dead_code))]
pub(crate) async fn run_for_test<F>(future: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    if in_scope() {
        future.await
    } else {
        run(future).await
    }
}

/// Leaves `end` to the test scope this thread runs; gives it back when there is none.
#[cfg_attr(not(feature = "sqlx"), allow(dead_code))]
pub(crate) fn defer(end: Box<dyn Deferred>) -> Option<Box<dyn Deferred>> {
    SCOPE.with(|scope| match scope.borrow_mut().as_mut() {
        Some(ends) => {
            ends.push(end);
            None
        }
        None => Some(end),
    })
}

/// Runs a `#[pgfixture::test]` (`test`, given its runtime) as a test scope when the
/// process runs this test only (nextest) on a current-thread runtime that nothing
/// outlives: the test's connections are then opened on that runtime rather than on the
/// background one, which the process then never starts (a thread, and a hand-off
/// between threads for every round trip: about 0.8 ms of a nextest process). What a
/// dropped handle must still do is deferred here and run on the runtime once the test
/// is over, panicking or not; a handle dropped with the runtime itself (by a task the
/// test left running) is [`Deferred::lost`].
pub(crate) fn in_test_scope<T>(runtime: Runtime, test: impl FnOnce(&Runtime) -> T) -> T {
    use tokio::runtime::RuntimeFlavor;
    if !crate::driver::one_test_per_process()
        || runtime.handle().runtime_flavor() != RuntimeFlavor::CurrentThread
        || in_scope()
        || paused(&runtime)
    {
        return test(&runtime);
    }
    SCOPE.with(|scope| *scope.borrow_mut() = Some(Vec::new()));
    let output = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(&runtime)));
    let ends = SCOPE.with(|scope| scope.borrow_mut().as_mut().map(std::mem::take));
    let ends = ends.unwrap_or_default();
    if !ends.is_empty() {
        runtime.block_on(futures::future::join_all(
            ends.into_iter().map(|end| end.end()),
        ));
    }
    // The tasks the test left running drop with the runtime, and their handles with
    // them: deferred still, and lost.
    drop(runtime);
    let lost = SCOPE
        .with(|scope| scope.borrow_mut().take())
        .unwrap_or_default();
    for end in lost {
        end.lost();
    }
    match output {
        Ok(output) => output,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long wait is noticed after the first interval and at every one after it,
    /// with the time waited; a short one is not.
    #[test]
    fn a_long_wait_is_noticed_and_a_short_one_is_not() {
        let rt = current_thread(false);
        let notices = std::sync::Mutex::new(Vec::new());
        let (done, finished) = tokio::sync::oneshot::channel::<u8>();
        let done = std::sync::Mutex::new(Some(done));
        let (first, every) = (Duration::from_millis(5), Duration::from_millis(7));
        let out = rt.block_on(noticed_after(
            "waiting",
            finished,
            first,
            every,
            |doing, waited| {
                let mut seen = notices.lock().unwrap();
                seen.push((doing.to_owned(), waited));
                if seen.len() == 3 {
                    let _ = done.lock().unwrap().take().unwrap().send(7);
                }
            },
        ));
        assert_eq!(out, Ok(7));
        let ms = |n| Duration::from_millis(n);
        assert_eq!(
            notices.into_inner().unwrap(),
            [
                ("waiting".into(), ms(5)),
                ("waiting".into(), ms(12)),
                ("waiting".into(), ms(19))
            ]
        );
        let quiet = rt.block_on(noticed_after("x", async { 3 }, first, every, |_, _| {
            panic!("a short wait noticed")
        }));
        assert_eq!(quiet, 3);
    }

    fn current_thread(paused: bool) -> Runtime {
        Builder::new_current_thread()
            .enable_time()
            .start_paused(paused)
            .build()
            .unwrap()
    }

    #[test]
    fn a_paused_clock_is_told_from_one_that_runs() {
        for _ in 0..1000 {
            assert!(paused(&current_thread(true)));
            assert!(!paused(&current_thread(false)));
        }
        let runtime = current_thread(false);
        runtime.block_on(async {
            assert!(!clock_paused());
            tokio::time::pause();
            assert!(clock_paused());
            tokio::time::resume();
            assert!(!clock_paused());
        });
    }
}
