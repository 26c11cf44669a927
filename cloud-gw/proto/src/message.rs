//! What the frames carry: one enum per channel, encoded as CBOR (compact,
//! and self-describing, so a field added in a minor version is skipped by
//! an older peer and defaulted by a newer one).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::frame::{self, Channel, FrameError};
use crate::kinds::Kind;
use crate::report::Class;
use crate::Version;

/// The control channel: handshake and certificate rotation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Control {
    /// The edge's first frame.
    Hello {
        version: Version,
        node: String,
    },
    /// The cloud's answer: the version both use, and how often each side
    /// must show it is alive.
    Welcome {
        version: Version,
        heartbeat_secs: u32,
    },
    /// Why the peer will not talk (then it closes).
    Refused {
        reason: String,
    },
    /// A new node asks to join (on the join endpoint, after Hello): the
    /// token's id and secret, the name it wants, and a CSR for its key.
    Join {
        token_id: String,
        token_secret: String,
        node: String,
        #[serde(default)]
        labels: BTreeMap<String, String>,
        csr_pem: String,
    },
    /// The edge asks for a new certificate for the key in this CSR.
    RenewCertificate {
        csr_pem: String,
    },
    Certificate {
        cert_pem: String,
    },
}

/// One object change, cloud to edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Change {
    Put {
        kind: Kind,
        uid: String,
        resource_version: String,
        /// The object as the API server has it (JSON).
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
    Delete {
        kind: Kind,
        uid: String,
    },
    /// The object changed from `base_version`, which the edge has, to
    /// `resource_version`: a JSON Patch (RFC 6902) against the edge's copy.
    /// An edge without that base answers `Stale` and gets a `Put`.
    Patch {
        kind: Kind,
        uid: String,
        base_version: String,
        resource_version: String,
        #[serde(with = "serde_bytes")]
        patch: Vec<u8>,
    },
}

/// The sync channel: objects down, acks up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Sync {
    /// What the edge has, per kind: uid -> resourceVersion (packed on the
    /// wire, see [`crate::inventory`]).
    Inventory {
        #[serde(with = "crate::inventory::packed")]
        kinds: BTreeMap<Kind, BTreeMap<String, String>>,
    },
    /// What the edge has, summarised: per kind, the digests of
    /// [`crate::inventory::digests`]. The cloud asks for the entries of the
    /// buckets that differ from what it would send.
    Digest {
        #[serde(with = "crate::kinds::lenient")]
        kinds: BTreeMap<Kind, serde_bytes::ByteBuf>,
        /// The sync position the edge last committed (from `Changes`): the
        /// cloud may work out what the edge has from its own journal, and
        /// skip the query when the digests confirm it.
        #[serde(default, with = "crate::kinds::lenient")]
        cursors: BTreeMap<Kind, String>,
    },
    /// The buckets (per kind) whose entries the cloud needs; the edge
    /// answers with an `Inventory` of just those.
    Query {
        #[serde(with = "crate::kinds::lenient")]
        kinds: BTreeMap<Kind, serde_bytes::ByteBuf>,
    },
    /// A batch of changes; the edge acks `batch` once it committed them.
    Changes {
        batch: u64,
        changes: Vec<Change>,
        /// Per kind, how far the sync got with this batch.
        #[serde(default, with = "crate::kinds::lenient")]
        cursors: BTreeMap<Kind, String>,
    },
    Ack {
        batch: u64,
    },
    /// The edge asks for one object by name. Only what the node's own pods
    /// use is ever given; anything else is refused (and logged).
    Get {
        id: u64,
        kind: Kind,
        namespace: String,
        name: String,
    },
    /// Patches the edge could not apply (it lacks their base): the cloud
    /// sends these objects whole.
    Stale {
        kind: Kind,
        uids: Vec<String>,
    },
    /// The answer to `Get` with that `id`: the object as a `Put`, or why not.
    Got {
        id: u64,
        object: Option<Change>,
        refused: Option<String>,
    },
}

/// One outbox row, edge to cloud: the envelope of a
/// [`crate::report::Report`] (made and read only through it), numbered by
/// the edge's outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub seq: i64,
    pub class: Class,
    /// What a newer row of the same class replaces (see `Report::key`).
    pub key: String,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// The status channel: the edge outbox up, acks (after the cloud applied
/// the rows) down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Status {
    Rows { rows: Vec<Row> },
    Ack { seqs: Vec<i64> },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Control(Control),
    Sync(Sync),
    Status(Status),
    /// A message of one stream (see [`crate::stream`]), on its channel.
    Stream {
        channel: u8,
        msg: crate::stream::StreamMsg,
    },
}

fn cbor<T: Serialize>(v: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).map_err(|e| FrameError::Payload(e.to_string()))?;
    Ok(out)
}

fn from_cbor<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, FrameError> {
    ciborium::from_reader(b).map_err(|e| FrameError::Payload(e.to_string()))
}

impl Message {
    /// The frame's bytes (see [`frame`]).
    pub fn encode(&self, max: usize) -> Result<Vec<u8>, FrameError> {
        let (channel, payload) = match self {
            Message::Control(m) => (Channel::Control, cbor(m)?),
            Message::Sync(m) => (Channel::Sync, cbor(m)?),
            Message::Status(m) => (Channel::Status, cbor(m)?),
            Message::Stream { channel, msg } => {
                let ch = Channel::from_u8(*channel)?;
                if !matches!(ch, Channel::Stream(_)) {
                    return Err(FrameError::WrongChannel(ch));
                }
                (ch, cbor(msg)?)
            }
        };
        frame::encode(channel, &payload, max)
    }

    /// One frame to a message. Never panics, whatever the bytes.
    pub fn decode(bytes: &[u8], max: usize) -> Result<Message, FrameError> {
        let f = frame::decode(bytes, max)?;
        Ok(match f.channel {
            Channel::Control => Message::Control(from_cbor(&f.payload)?),
            Channel::Sync => Message::Sync(from_cbor(&f.payload)?),
            Channel::Status => Message::Status(from_cbor(&f.payload)?),
            Channel::Stream(n) => Message::Stream {
                channel: n,
                msg: from_cbor(&f.payload)?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::MAX_PAYLOAD;
    use proptest::prelude::*;

    fn kind() -> impl Strategy<Value = Kind> {
        proptest::sample::select(Kind::ALL.to_vec())
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            (
                kind(),
                ".{0,40}",
                "[0-9]{1,8}",
                proptest::collection::vec(any::<u8>(), 0..600)
            )
                .prop_map(|(kind, uid, resource_version, body)| Change::Put {
                    kind,
                    uid,
                    resource_version,
                    body
                }),
            (kind(), ".{0,40}").prop_map(|(kind, uid)| Change::Delete { kind, uid }),
            (
                kind(),
                ".{0,40}",
                "[0-9a-f]{0,16}",
                "[0-9a-f]{0,16}",
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(kind, uid, base_version, resource_version, patch)| {
                    Change::Patch {
                        kind,
                        uid,
                        base_version,
                        resource_version,
                        patch,
                    }
                }),
        ]
    }

    proptest! {
        #[test]
        fn sync_batches_round_trip(batch in any::<u64>(), changes in proptest::collection::vec(change(), 0..30)) {
            let m = Message::Sync(Sync::Changes { batch, changes, cursors: BTreeMap::new() });
            let bytes = m.encode(MAX_PAYLOAD).unwrap();
            prop_assert_eq!(Message::decode(&bytes, MAX_PAYLOAD).unwrap(), m);
        }

        #[test]
        fn stream_data_round_trips(channel in 16u8..=255, bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let m = Message::Stream { channel, msg: crate::stream::StreamMsg::Data { bytes } };
            let encoded = m.encode(MAX_PAYLOAD).unwrap();
            prop_assert_eq!(Message::decode(&encoded, MAX_PAYLOAD).unwrap(), m);
        }

        #[test]
        fn any_payload_on_any_channel_decodes_or_fails_cleanly(ch in prop_oneof![0u8..4, 16u8..20], payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut bytes = vec![ch, 0];
            bytes.extend(payload);
            let _ = Message::decode(&bytes, MAX_PAYLOAD);
        }
    }

    #[test]
    fn a_newer_minor_field_is_ignored_by_an_older_peer() {
        // A Welcome as a 1.1 peer might send it, with a field 1.0 lacks.
        #[derive(Serialize)]
        struct WelcomeV11 {
            t: &'static str,
            version: Version,
            heartbeat_secs: u32,
            resume_token: String,
        }
        let payload = cbor(&WelcomeV11 {
            t: "welcome",
            version: Version { major: 1, minor: 1 },
            heartbeat_secs: 30,
            resume_token: "x".into(),
        })
        .unwrap();
        let bytes = frame::encode(Channel::Control, &payload, MAX_PAYLOAD).unwrap();
        let m = Message::decode(&bytes, MAX_PAYLOAD).unwrap();
        assert_eq!(
            m,
            Message::Control(Control::Welcome {
                version: Version { major: 1, minor: 1 },
                heartbeat_secs: 30
            })
        );
    }

    #[test]
    fn an_inventory_of_200_objects_is_a_few_kb() {
        let pods: BTreeMap<String, String> = (0..200)
            .map(|i| {
                (
                    format!("3f2c9a1e-5b7d-4c1e-9a2b-{i:012}"),
                    format!("{}", 1_000_000 + i * 37),
                )
            })
            .collect();
        let m = Message::Sync(Sync::Inventory {
            kinds: BTreeMap::from([(Kind::Pod, pods)]),
        });
        let n = m.encode(MAX_PAYLOAD).unwrap().len();
        assert!(n < 4096, "{n} bytes");
    }
}
