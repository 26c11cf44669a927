//! A barrier between container creation and allocation on other threads.
//!
//! libcontainer creates a container with a raw `clone3` whose child goes on
//! running Rust code that allocates. If another thread held the allocator's
//! lock at that instant, the child would deadlock on it (and edge-rt with
//! it, waiting for the child). Creation takes this lock for writing; every
//! other thread of ours holds it for reading while it runs ([`super::thread`],
//! [`super::blocking`]), and long work gives way at each step
//! ([`yield_now`]), so a creation waits for one step, not the whole of it.
//! The async runtime runs on the creating thread (a current-thread
//! runtime), so it is idle by construction.
//!
//! The read side is re-entrant per thread: work that already holds it
//! (a blocking task) may call code that takes it again (layer unpacking)
//! without deadlocking against a waiting writer. The lock is
//! parking_lot's, which is fair and hands itself to a waiting writer when
//! a reader gives way (std's lets the reader take it straight back).

use std::cell::RefCell;

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

static BARRIER: RwLock<()> = RwLock::new(());

thread_local! {
    /// This thread's hold on the read side, and how many [`Read`]s share it.
    static HELD: RefCell<(usize, Option<RwLockReadGuard<'static, ()>>)> =
        const { RefCell::new((0, None)) };
}

/// The read side, held by this thread until the last of its `Read`s goes.
pub struct Read(());

pub fn read() -> Read {
    HELD.with(|h| {
        let mut h = h.borrow_mut();
        if h.0 == 0 {
            h.1 = Some(BARRIER.read());
        }
        h.0 += 1;
    });
    Read(())
}

impl Drop for Read {
    fn drop(&mut self) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            h.0 = h.0.saturating_sub(1);
            if h.0 == 0 {
                h.1 = None;
            }
        });
    }
}

/// Between two steps of long work: if this thread holds the read side, let
/// a waiting creation through, then take it again.
pub fn yield_now() {
    HELD.with(|h| {
        if let Some(g) = h.borrow_mut().1.as_mut() {
            RwLockReadGuard::bump(g);
        }
    });
}

pub fn write() -> RwLockWriteGuard<'static, ()> {
    BARRIER.write()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_side_is_re_entrant_and_yields_to_a_writer() {
        let outer = read();
        let inner = read();
        drop(inner);
        // Still held: a writer on another thread waits.
        let (tx, rx) = std::sync::mpsc::channel();
        #[allow(clippy::disallowed_methods)] // the writer stands for the runtime thread
        let w = std::thread::spawn(move || {
            let _w = write();
            tx.send(()).unwrap();
        });
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(100))
            .is_err());
        // Giving way lets it through, then this thread holds the read side again.
        yield_now();
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        w.join().unwrap();
        drop(outer);
        HELD.with(|h| assert!(h.borrow().1.is_none()));
    }
}
