//! The hand-off from the processor to one endpoint's dispatcher.
//!
//! A dispatcher normally finds work by claiming due deliveries from the
//! database, which reads and rewrites every row it takes. Most deliveries are
//! due the moment the processor creates them, though, and the dispatcher of
//! their endpoint usually has room. The processor then creates them already
//! claimed (attempt 1, with a lease) and passes them here, in memory, after
//! its transaction commits, so no claim query runs for them.
//!
//! Nothing depends on the hand-off for safety. A handed delivery is a claimed
//! delivery like any other: if this sidecar dies before sending it, its lease
//! expires and any sidecar claims it. Deliveries that were not handed (no
//! room, or an earlier delivery of the same row still waits at an ordered
//! endpoint) are created unclaimed, and the processor requests a claim.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

use super::send::ClaimedDelivery;

pub struct Inbox {
    wake: Notify,
    /// How many more deliveries the dispatcher would take now, as it last
    /// offered. Zero while its endpoint is paused, probing or disabled.
    room: AtomicUsize,
    /// Set when deliveries may wait in the database for a claim.
    claim_requested: AtomicBool,
    handed: Mutex<Vec<ClaimedDelivery>>,
}

impl Default for Inbox {
    fn default() -> Inbox {
        Inbox {
            wake: Notify::new(),
            room: AtomicUsize::new(0),
            // Deliveries left by an earlier run may be waiting.
            claim_requested: AtomicBool::new(true),
            handed: Mutex::new(Vec::new()),
        }
    }
}

impl Inbox {
    /// Reserves up to `requested` of the room the dispatcher offered and
    /// returns how much was granted.
    pub fn reserve(&self, requested: usize) -> usize {
        let mut granted = 0;
        let _ = self.room.fetch_update(Ordering::AcqRel, Ordering::Acquire, |room| {
            granted = room.min(requested);
            Some(room - granted)
        });
        granted
    }

    /// Passes deliveries created claimed to the dispatcher.
    pub fn hand(&self, deliveries: Vec<ClaimedDelivery>) {
        if deliveries.is_empty() {
            return;
        }
        self.handed.lock().expect("inbox lock").extend(deliveries);
        self.wake.notify_one();
    }

    /// Tells the dispatcher that deliveries wait in the database.
    pub fn request_claim(&self) {
        self.claim_requested.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Called by the dispatcher: how many deliveries it would take now.
    pub(super) fn offer(&self, room: usize) {
        self.room.store(room, Ordering::Release);
    }

    pub(super) fn take(&self) -> Vec<ClaimedDelivery> {
        std::mem::take(&mut *self.handed.lock().expect("inbox lock"))
    }

    pub(super) fn take_claim_request(&self) -> bool {
        self.claim_requested.swap(false, Ordering::AcqRel)
    }

    pub(super) async fn notified(&self) {
        self.wake.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_never_takes_more_than_offered() {
        let inbox = Inbox::default();
        assert_eq!(inbox.reserve(5), 0, "nothing is offered before the dispatcher runs");

        inbox.offer(10);
        assert_eq!(inbox.reserve(4), 4);
        assert_eq!(inbox.reserve(20), 6);
        assert_eq!(inbox.reserve(1), 0);

        inbox.offer(3);
        assert_eq!(inbox.reserve(3), 3);
    }

    #[test]
    fn claim_request_is_taken_once() {
        let inbox = Inbox::default();
        assert!(inbox.take_claim_request(), "a new inbox asks for one claim at start");
        assert!(!inbox.take_claim_request());

        inbox.request_claim();
        assert!(inbox.take_claim_request());
        assert!(!inbox.take_claim_request());
    }
}
