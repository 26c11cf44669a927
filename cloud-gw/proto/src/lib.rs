//! The link between cloud-gw and edge-rt, defined once for both sides.
//!
//! One mutual-TLS WebSocket per node carries binary messages; each message
//! is one [`frame::Frame`]: a channel number, flags, and a CBOR payload
//! (deflated when large). Channels multiplex the connection: control
//! (handshake, certificates), sync (objects down, acks up), status (the
//! edge outbox up, acks down), and numbered streams for logs and exec.
//!
//! The first frame each way is the handshake ([`message::Control::Hello`],
//! answered by `Welcome` or `Refused`): peers of the same major version
//! whose minor versions differ by at most one talk at the lower minor; any
//! other pair is refused with both versions named.

pub mod device;
pub mod frame;
pub mod inventory;
pub mod kinds;
pub mod message;
pub mod report;
pub mod stats;
pub mod stream;
pub mod token;
pub mod ws;

use serde::{Deserialize, Serialize};

/// A protocol version: a major bump breaks compatibility, a minor one adds
/// (fields with defaults, new messages only sent to peers that know them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
// On the wire as `[major, minor]`: every connection sends it twice.
#[serde(from = "(u16, u16)", into = "(u16, u16)")]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

impl From<(u16, u16)> for Version {
    fn from((major, minor): (u16, u16)) -> Version {
        Version { major, minor }
    }
}

impl From<Version> for (u16, u16) {
    fn from(v: Version) -> (u16, u16) {
        (v.major, v.minor)
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// What this build speaks. Minor versions of 1: 0, the first; 1, the
/// ServiceAccountToken kind ([`kinds`]); 2, the DeviceModel and Device
/// kinds and the device status report ([`device`], [`report`]); 3, streams
/// ([`stream`]: container logs, exec, attach, port-forward, resource
/// statistics); 4, the Node, Service and EndpointSlice kinds (Services at
/// the edge).
pub const VERSION: Version = Version { major: 1, minor: 4 };

/// The first minor version with streams: the cloud opens none to an older
/// edge.
pub const STREAMS_SINCE_MINOR: u16 = 3;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("incompatible link protocol: we speak {ours}, the peer speaks {theirs} (same major version and at most one minor apart are needed; upgrade the older side)")]
pub struct VersionMismatch {
    pub ours: Version,
    pub theirs: Version,
}

/// The version two peers use, or why they cannot talk.
pub fn negotiate(ours: Version, theirs: Version) -> Result<Version, VersionMismatch> {
    if ours.major == theirs.major && ours.minor.abs_diff(theirs.minor) <= 1 {
        Ok(Version {
            major: ours.major,
            minor: ours.minor.min(theirs.minor),
        })
    } else {
        Err(VersionMismatch { ours, theirs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u16, minor: u16) -> Version {
        Version { major, minor }
    }

    #[test]
    fn the_previous_minor_is_accepted_and_nothing_further() {
        assert_eq!(negotiate(v(1, 3), v(1, 2)), Ok(v(1, 2)));
        assert_eq!(negotiate(v(1, 2), v(1, 3)), Ok(v(1, 2)));
        assert_eq!(negotiate(v(1, 3), v(1, 3)), Ok(v(1, 3)));
        assert!(negotiate(v(1, 3), v(1, 1)).is_err());
        let e = negotiate(v(2, 0), v(1, 9)).unwrap_err().to_string();
        assert!(e.contains("2.0") && e.contains("1.9"), "{e}");
    }
}
