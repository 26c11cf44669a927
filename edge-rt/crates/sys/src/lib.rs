//! The bottom layer: what the process as a whole depends on, and the only
//! ways to run code off the runtime thread.
//!
//! libcontainer creates a container with a raw `clone3` whose child goes on
//! running Rust code that allocates; a thread of ours holding the
//! allocator's lock at that instant would deadlock it ([`fork_guard`]). So
//! no module starts a thread or a blocking task itself: [`thread`],
//! [`blocking`] and [`fs`] do it, inside the guard's read side, and
//! clippy's `disallowed-methods` (see `clippy.toml`) refuses the raw calls
//! everywhere else. The runtime keeps its blocking threads once started
//! ([`runtime`]): a thread that exits frees its memory outside any guard.
//! [`reaper`] is the one `waitpid(-1)` of the process.
//!
//! Layers above may use this one; it uses none of them.

pub mod fork_guard;
pub mod fs;
pub mod reaper;

/// The wall clock in milliseconds since the epoch (0 if the clock is
/// before it: a gateway without an RTC before NTP).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The async runtime edge-rt runs on: one thread (container creation
/// happens on it), and blocking threads that, once started, stay (an idle
/// one that exited would free its memory while a container may be cloned).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_keep_alive(std::time::Duration::from_secs(100 * 365 * 24 * 3600))
        .max_blocking_threads(64)
        .build()
}

/// Run `f` on a thread of its own, holding the fork guard's read side
/// while it runs (so keep it short: a container creation waits for it).
#[allow(clippy::disallowed_methods)]
pub fn thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _guard = fork_guard::read();
            f()
        })
}

/// Run `f` on the blocking pool, holding the fork guard's read side while
/// it runs; long work gives way at each step ([`fork_guard::yield_now`]).
#[allow(clippy::disallowed_methods)]
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    tokio::task::spawn_blocking(move || {
        let _guard = fork_guard::read();
        f()
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // The creator stands for the runtime thread: outside the guard.
    #[allow(clippy::disallowed_methods)]
    fn a_guarded_thread_holds_creation_off_until_it_ends() {
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let t = thread("guarded", move || {
            started_tx.send(()).unwrap();
            release_rx.recv().unwrap();
        })
        .unwrap();
        started_rx.recv().unwrap();
        // While it runs, the write side (a container creation) waits.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let creator = std::thread::spawn(move || {
            let _w = fork_guard::write();
            done_tx.send(()).unwrap();
        });
        assert!(done_rx
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        release_tx.send(()).unwrap();
        t.join().unwrap();
        done_rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .unwrap();
        creator.join().unwrap();
    }
}
