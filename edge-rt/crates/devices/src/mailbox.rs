//! The channels between the device manager and its drivers, sized for a
//! gateway with hundreds of devices.
//!
//! tokio's mpsc allocates its slots in blocks of 32 from the first
//! message, so a channel of 80-byte events holds 2.5 KB, and two of them
//! for every device added most of a device's memory. Instead all drivers
//! send their events into one channel ([`Events`]), each tagged with the
//! run it comes from, and what goes to a single device (commands, inbound
//! messages, mirror updates) goes through `futures-channel`'s mpsc
//! ([`mailbox`]), which allocates per message and costs a few hundred
//! bytes while empty.

use std::sync::Arc;

pub use futures_channel::mpsc::{Receiver, Sender};
use tokio::sync::mpsc;

use crate::Event;

/// A bounded channel to one task: `capacity` messages (plus one per
/// sender) wait at most; `try_send` says when it is full.
pub fn mailbox<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    futures_channel::mpsc::channel(capacity)
}

/// The next message, None once every sender is gone.
pub async fn recv<T>(rx: &mut Receiver<T>) -> Option<T> {
    futures_util::StreamExt::next(rx).await
}

/// An event and the driver run it comes from.
#[derive(Debug)]
pub struct Tagged {
    pub device: Arc<str>,
    /// Which start of that device: events of a run that was replaced are
    /// the manager's to drop.
    pub run: u64,
    pub event: Event,
}

/// Where one driver run sends what it saw.
#[derive(Debug, Clone)]
pub struct Events {
    device: Arc<str>,
    run: u64,
    tx: mpsc::Sender<Tagged>,
}

/// The manager is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the device manager has stopped")]
pub struct Stopped;

impl Events {
    pub fn new(device: Arc<str>, run: u64, tx: mpsc::Sender<Tagged>) -> Events {
        Events { device, run, tx }
    }

    /// The device (its uid) these events are about.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Send, waiting while the manager is behind.
    pub async fn send(&self, event: Event) -> Result<(), Stopped> {
        self.tx
            .send(Tagged {
                device: self.device.clone(),
                run: self.run,
                event,
            })
            .await
            .map_err(|_| Stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_carry_their_run_and_a_mailbox_says_when_full() {
        let (tx, mut rx) = mpsc::channel(4);
        let a = Events::new("a".into(), 7, tx);
        a.send(Event::Wrote {
            property: "p".into(),
            value: "1".into(),
        })
        .await
        .unwrap();
        let t = rx.recv().await.unwrap();
        assert_eq!((&*t.device, t.run), ("a", 7));
        drop(rx);
        assert_eq!(
            a.send(Event::Wrote {
                property: "p".into(),
                value: "1".into()
            })
            .await,
            Err(Stopped)
        );

        let (mut tx, mut rx) = mailbox::<u8>(1);
        // One slot, plus one for the sender.
        assert!(tx.try_send(1).is_ok());
        assert!(tx.try_send(2).is_ok());
        assert!(tx.try_send(3).unwrap_err().is_full());
        assert_eq!(recv(&mut rx).await, Some(1));
        drop(tx);
        assert_eq!(recv(&mut rx).await, Some(2));
        assert_eq!(recv(&mut rx).await, None);
    }
}
