//! The event queue: events in time order, ties in the order they were
//! scheduled (so a run is deterministic).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// A time-ordered queue of events of type `E`.
#[derive(Debug)]
pub struct Queue<E: Ord> {
    heap: BinaryHeap<Reverse<(i64, u64, E)>>,
    seq: u64,
}

impl<E: Ord> Default for Queue<E> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<E: Ord> Queue<E> {
    /// Schedules `event` at `at_ms`.
    pub fn push(&mut self, at_ms: i64, event: E) {
        self.seq += 1;
        self.heap.push(Reverse((at_ms, self.seq, event)));
    }

    /// The earliest event and its time.
    pub fn pop(&mut self) -> Option<(i64, E)> {
        self.heap.pop().map(|Reverse((at, _, e))| (at, e))
    }
}
