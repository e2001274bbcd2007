//! The bounded submission queue between callers and a device's I/O thread(s).
//!
//! Bounded so that a fast producer (the migration driver) is slowed to the disk's pace
//! instead of queueing unbounded memory. One exception: a push from an I/O thread (that
//! is, from inside a completion callback) never blocks, because the thread that would
//! drain the queue may be the one blocked, and a callback that submits follow-up work is
//! the normal shape of a completion-driven driver. That overshoot is bounded by the number
//! of callbacks running at once.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

thread_local! {
    /// Set on threads that run completion callbacks (ring and worker threads).
    static ON_IO_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current thread as an I/O thread; called once at the top of each I/O thread.
pub(crate) fn mark_io_thread() {
    ON_IO_THREAD.with(|flag| flag.set(true));
}

/// Whether the current thread runs completion callbacks.
pub(crate) fn on_io_thread() -> bool {
    ON_IO_THREAD.with(Cell::get)
}

/// Result of a non-blocking pop.
pub(crate) enum Pop<T> {
    /// The oldest queued item.
    Item(T),
    /// Nothing queued right now.
    Empty,
    /// Nothing queued and nothing ever will be: the owner closed the queue.
    Closed,
}

struct State<T> {
    items: VecDeque<T>,
    closed: bool,
}

/// A multi-producer, multi-consumer FIFO with a capacity and a close flag.
pub(crate) struct BoundedQueue<T> {
    state: Mutex<State<T>>,
    not_empty: Condvar,
    not_full: Condvar,
    capacity: usize,
}

impl<T> BoundedQueue<T> {
    pub(crate) fn new(capacity: usize) -> BoundedQueue<T> {
        assert!(capacity > 0, "queue capacity must be positive");
        BoundedQueue {
            state: Mutex::new(State {
                items: VecDeque::with_capacity(capacity),
                closed: false,
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding this lock cannot leave the deque inconsistent (all
        // operations on it are single calls), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `item`, waiting while the queue is full (unless on an I/O thread).
    /// Gives the item back if the queue is closed.
    pub(crate) fn push(&self, item: T) -> Result<(), T> {
        let bypass_bound = on_io_thread();
        let mut state = self.lock();
        while !state.closed && !bypass_bound && state.items.len() >= self.capacity {
            state = self.not_full.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if state.closed {
            return Err(item);
        }
        state.items.push_back(item);
        drop(state);
        self.not_empty.notify_one();
        Ok(())
    }

    /// Takes the oldest item without waiting.
    pub(crate) fn try_pop(&self) -> Pop<T> {
        let mut state = self.lock();
        match state.items.pop_front() {
            Some(item) => {
                drop(state);
                self.not_full.notify_one();
                Pop::Item(item)
            }
            None if state.closed => Pop::Closed,
            None => Pop::Empty,
        }
    }

    /// Takes the oldest item, waiting for one; `None` once closed and drained.
    pub(crate) fn pop_blocking(&self) -> Option<T> {
        let mut state = self.lock();
        loop {
            if let Some(item) = state.items.pop_front() {
                drop(state);
                self.not_full.notify_one();
                return Some(item);
            }
            if state.closed {
                return None;
            }
            state = self
                .not_empty
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Refuses further pushes; items already queued are still handed out.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.not_empty.notify_all();
        self.not_full.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_then_closed_after_drain() {
        let queue = BoundedQueue::new(2);
        assert!(queue.push(1).is_ok());
        assert!(queue.push(2).is_ok());
        queue.close();
        assert_eq!(queue.push(3), Err(3));
        assert!(matches!(queue.try_pop(), Pop::Item(1)));
        assert_eq!(queue.pop_blocking(), Some(2));
        assert!(matches!(queue.try_pop(), Pop::Closed));
        assert_eq!(queue.pop_blocking(), None);
    }

    #[test]
    fn io_threads_may_overshoot_the_bound() {
        let queue = BoundedQueue::new(1);
        let pushed = std::thread::spawn(move || {
            mark_io_thread();
            queue.push(1).is_ok() && queue.push(2).is_ok()
        })
        .join()
        .expect("thread");
        assert!(pushed);
    }
}
