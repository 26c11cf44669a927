//! One reaper for the whole process.
//!
//! edge-rt is a child subreaper (and may be PID 1), so orphans anywhere below
//! it become its children and must be reaped. Children whose exit status
//! matters (container inits, processes we spawn) are registered first; the
//! reaper keeps their status for whoever asks. Everything runs on the one
//! runtime thread, so registration after a spawn cannot race the reap.

use std::collections::HashMap;
use std::sync::Mutex;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

static WATCHED: Mutex<Option<HashMap<i32, Option<WaitStatus>>>> = Mutex::new(None);

fn with<R>(f: impl FnOnce(&mut HashMap<i32, Option<WaitStatus>>) -> R) -> R {
    let mut g = WATCHED.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(HashMap::new))
}

/// Keep the exit status of `pid` when it is reaped.
pub fn register(pid: i32) {
    with(|m| {
        m.entry(pid).or_insert(None);
    });
}

/// Reap every child that has exited; returns how many.
pub fn reap_all() -> usize {
    let mut n = 0;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(status) => {
                n += 1;
                if let Some(pid) = status.pid() {
                    with(|m| {
                        if let Some(slot) = m.get_mut(&pid.as_raw()) {
                            *slot = Some(status);
                        }
                    });
                }
            }
        }
    }
    n
}

/// The status of a registered child, once reaped (and forget it).
pub fn take(pid: i32) -> Option<WaitStatus> {
    reap_all();
    with(|m| match m.get(&pid) {
        Some(Some(_)) => m.remove(&pid).flatten(),
        _ => None,
    })
}

pub fn is_registered(pid: i32) -> bool {
    with(|m| m.contains_key(&pid))
}

pub fn forget(pid: i32) {
    with(|m| {
        m.remove(&pid);
    });
}
