//! A barrier between container creation and heavy allocation on other threads.
//!
//! libcontainer creates a container with a raw `clone3` whose child goes on
//! running Rust code that allocates. If another thread held the allocator's
//! lock at that instant, the child would deadlock on it. Creation takes this
//! lock for writing; our own blocking work (layer unpacking, copies) takes it
//! for reading per entry, so no thread of ours is inside a long allocating
//! stretch while a container is cloned. The async runtime itself runs on the
//! creating thread (a current-thread runtime), so it is idle by construction.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

static BARRIER: RwLock<()> = RwLock::new(());

pub fn read() -> RwLockReadGuard<'static, ()> {
    BARRIER.read().unwrap_or_else(|p| p.into_inner())
}

pub fn write() -> RwLockWriteGuard<'static, ()> {
    BARRIER.write().unwrap_or_else(|p| p.into_inner())
}
