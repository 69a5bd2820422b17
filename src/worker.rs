//! Worker identity and the in-process worker slots.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Longest worker id: it goes into database, schema and container names, which
/// PostgreSQL limits to 63 bytes.
const MAX_WORKER_ID: usize = 32;

/// The id of a test worker: a nextest slot, an in-process slot, or `PGFIXTURE_WORKER`.
///
/// Ids are lowercase ASCII letters, digits and `_`, at most 32 bytes, so that they fit
/// into PostgreSQL identifiers and container names unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(String);

impl WorkerId {
    /// The worker of slot `n` (nextest's `NEXTEST_TEST_GLOBAL_SLOT`, or an in-process slot).
    pub fn slot(n: u32) -> Self {
        WorkerId(n.to_string())
    }

    /// The id reported by [`crate::worker_id`] on a thread that holds no worker yet.
    pub fn unassigned() -> Self {
        WorkerId("unassigned".to_owned())
    }

    /// Checks an explicit id; the error says what a valid id looks like.
    pub(crate) fn parse(id: &str) -> Result<Self, String> {
        let valid = !id.is_empty()
            && id.len() <= MAX_WORKER_ID
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if valid {
            Ok(WorkerId(id.to_owned()))
        } else {
            Err(format!(
                "must be 1 to {MAX_WORKER_ID} lowercase letters, digits or '_' (it becomes part of PostgreSQL names)"
            ))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A bounded set of in-process worker slots (plain `cargo test`: tests are threads).
#[derive(Debug)]
pub(crate) struct Slots {
    permits: Arc<Semaphore>,
    free: Mutex<BTreeSet<u32>>,
}

/// A slot taken by a test; the slot is free again when the last handle holding it drops.
#[derive(Debug)]
pub(crate) struct SlotLease {
    slots: Arc<Slots>,
    id: u32,
    _permit: OwnedSemaphorePermit,
}

impl SlotLease {
    pub(crate) fn worker(&self) -> WorkerId {
        WorkerId::slot(self.id)
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        // The id goes back before the permit (a field) is released after this body.
        self.slots
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.id);
    }
}

thread_local! {
    /// The slot each fixture has lent to this thread, so that a test that asks twice
    /// gets the slot it already holds instead of waiting for a second one.
    static HELD: RefCell<Vec<(usize, Weak<SlotLease>)>> = const { RefCell::new(Vec::new()) };
}

impl Slots {
    pub(crate) fn new(count: usize) -> Arc<Self> {
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        Arc::new(Slots {
            permits: Arc::new(Semaphore::new(count as usize)),
            free: Mutex::new((0..count).collect()),
        })
    }

    /// The slot this thread already holds for the fixture `owner`, if any.
    pub(crate) fn held(owner: usize) -> Option<Arc<SlotLease>> {
        HELD.with(|held| {
            let mut held = held.borrow_mut();
            held.retain(|(_, lease)| lease.strong_count() > 0);
            held.iter()
                .find(|(o, _)| *o == owner)
                .and_then(|(_, lease)| lease.upgrade())
        })
    }

    /// Records that this thread holds `lease` for the fixture `owner`.
    pub(crate) fn remember(owner: usize, lease: &Arc<SlotLease>) {
        HELD.with(|held| held.borrow_mut().push((owner, Arc::downgrade(lease))));
    }

    /// A free slot, if one is free now (no waiting).
    #[cfg_attr(not(feature = "sqlx"), allow(dead_code))]
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Arc<SlotLease>> {
        let permit = Arc::clone(&self.permits).try_acquire_owned().ok()?;
        Some(self.lease(permit))
    }

    /// Waits for a free slot; the lowest free id is taken, so few workers are
    /// provisioned when few tests run at once.
    pub(crate) async fn acquire(self: &Arc<Self>) -> Arc<SlotLease> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the slot semaphore is never closed");
        self.lease(permit)
    }

    /// The lowest free slot, for a permit just taken.
    fn lease(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Arc<SlotLease> {
        let id = self
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_first()
            .expect("a permit guarantees a free slot id");
        Arc::new(SlotLease {
            slots: Arc::clone(self),
            id,
            _permit: permit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert_eq!(WorkerId::slot(3).as_str(), "3");
        assert!(WorkerId::parse("ci_shard_2").is_ok());
        for bad in ["", "A", "a-b", "a.b", "é", &"x".repeat(33)] {
            assert!(WorkerId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn slots_are_bounded_lowest_first_and_reused() {
        let slots = Slots::new(2);
        let a = slots.acquire().await;
        let b = slots.acquire().await;
        assert_eq!((a.id, b.id), (0, 1));
        let waiting = tokio::spawn({
            let slots = Arc::clone(&slots);
            async move { slots.acquire().await.id }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(b);
        assert_eq!(waiting.await.unwrap(), 1);
        drop(a);
        assert_eq!(slots.acquire().await.id, 0);
    }

    #[test]
    fn a_thread_finds_the_slot_it_holds() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let slots = Slots::new(1);
        let lease = rt.block_on(slots.acquire());
        Slots::remember(7, &lease);
        assert_eq!(Slots::held(7).map(|l| l.id), Some(0));
        assert!(Slots::held(8).is_none());
        std::thread::spawn(|| assert!(Slots::held(7).is_none()))
            .join()
            .unwrap();
        drop(lease);
        assert!(Slots::held(7).is_none());
    }
}
