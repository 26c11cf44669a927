//! Frames: one WebSocket binary message each.
//!
//! ```text
//! byte 0   channel: 0 control, 1 sync, 2 status, 16..=255 streams
//! byte 1   flags: bit 0 = payload deflated; other bits must be 0
//! 2..      payload
//! ```
//!
//! The WebSocket message delimits the frame, so there is no length field.
//! Limits hold before and after inflating, so a small frame cannot expand
//! into a large allocation.

use std::io::{Read, Write};

/// The largest payload accepted, inflated (Kubernetes objects stay under
/// 1.5 MB; a batch of them is split to fit).
pub const MAX_PAYLOAD: usize = 8 << 20;

/// Payloads above this are deflated (when that makes them smaller).
pub const COMPRESS_ABOVE: usize = 128;

/// Payloads above this are first looked at: their start's byte entropy
/// says whether deflating the whole is worth it (a forwarded connection's
/// bytes are mostly compressed or encrypted already, and deflating them
/// for nothing would cost more CPU than the link saves).
const LOOK_ABOVE: usize = 4096;
const LOOK_AT: usize = 1024;
/// Bits per byte above which a payload is taken as incompressible
/// (random bytes: ~7.8 in a 1 KiB sample; text, JSON: 4 to 5.5).
const ENTROPY_MAX: f64 = 7.0;

/// Whether deflating `payload` looks worth it, from its start.
fn compressible(payload: &[u8]) -> bool {
    if payload.len() <= LOOK_ABOVE {
        return true;
    }
    let sample = &payload[..LOOK_AT];
    let mut counts = [0u32; 256];
    for b in sample {
        counts[*b as usize] += 1;
    }
    let n = sample.len() as f64;
    let bits: f64 = counts
        .iter()
        .filter(|c| **c > 0)
        .map(|c| {
            let p = f64::from(*c) / n;
            -p * p.log2()
        })
        .sum();
    bits < ENTROPY_MAX
}

const FLAG_DEFLATE: u8 = 1;
const KNOWN_FLAGS: u8 = FLAG_DEFLATE;
const FIRST_STREAM: u8 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Control,
    Sync,
    Status,
    /// A log or exec stream, by number.
    Stream(u8),
}

impl Channel {
    pub fn to_u8(self) -> u8 {
        match self {
            Channel::Control => 0,
            Channel::Sync => 1,
            Channel::Status => 2,
            Channel::Stream(n) => n.max(FIRST_STREAM),
        }
    }

    pub fn from_u8(b: u8) -> Result<Channel, FrameError> {
        match b {
            0 => Ok(Channel::Control),
            1 => Ok(Channel::Sync),
            2 => Ok(Channel::Status),
            n if n >= FIRST_STREAM => Ok(Channel::Stream(n)),
            n => Err(FrameError::UnknownChannel(n)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is shorter than its 2-byte header")]
    Short(usize),
    #[error("unknown channel {0}")]
    UnknownChannel(u8),
    #[error("unknown flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("payload of more than {max} bytes (limit)")]
    TooLarge { max: usize },
    #[error("deflated payload does not inflate: {0}")]
    Inflate(String),
    #[error("payload does not decode: {0}")]
    Payload(String),
    #[error("a {0:?} frame cannot carry this message")]
    WrongChannel(Channel),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub channel: Channel,
    /// Inflated.
    pub payload: Vec<u8>,
}

/// One frame's bytes, deflating a large payload when that pays.
pub fn encode(channel: Channel, payload: &[u8], max: usize) -> Result<Vec<u8>, FrameError> {
    if payload.len() > max {
        return Err(FrameError::TooLarge { max });
    }
    let mut out = Vec::with_capacity(2 + payload.len());
    out.push(channel.to_u8());
    if payload.len() > COMPRESS_ABOVE && compressible(payload) {
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        let deflated = z
            .write_all(payload)
            .and_then(|_| z.finish())
            .map_err(|e| FrameError::Inflate(e.to_string()))?;
        if deflated.len() < payload.len() {
            out.push(FLAG_DEFLATE);
            out.extend_from_slice(&deflated);
            return Ok(out);
        }
    }
    out.push(0);
    out.extend_from_slice(payload);
    Ok(out)
}

/// Parse one frame. Never panics, whatever the bytes.
pub fn decode(bytes: &[u8], max: usize) -> Result<Frame, FrameError> {
    if bytes.len() < 2 {
        return Err(FrameError::Short(bytes.len()));
    }
    let channel = Channel::from_u8(bytes[0])?;
    let flags = bytes[1];
    if flags & !KNOWN_FLAGS != 0 {
        return Err(FrameError::UnknownFlags(flags));
    }
    let body = &bytes[2..];
    if body.len() > max {
        return Err(FrameError::TooLarge { max });
    }
    let payload = if flags & FLAG_DEFLATE != 0 {
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(body)
            .take(max as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| FrameError::Inflate(e.to_string()))?;
        if out.len() > max {
            return Err(FrameError::TooLarge { max });
        }
        out
    } else {
        body.to_vec()
    };
    Ok(Frame { channel, payload })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn channel() -> impl Strategy<Value = Channel> {
        prop_oneof![
            Just(Channel::Control),
            Just(Channel::Sync),
            Just(Channel::Status),
            (FIRST_STREAM..=255u8).prop_map(Channel::Stream),
        ]
    }

    #[test]
    fn incompressible_payloads_go_as_they_are() {
        // Bytes that do not repeat (xorshift: as random as a test needs).
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let noise: Vec<u8> = (0..32768)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let f = encode(Channel::Stream(16), &noise, MAX_PAYLOAD).unwrap();
        assert_eq!(f[1], 0);
        assert_eq!(decode(&f, MAX_PAYLOAD).unwrap().payload, noise);
        let text = b"line of a log\n".repeat(3000);
        let f = encode(Channel::Stream(16), &text, MAX_PAYLOAD).unwrap();
        assert_eq!(f[1], FLAG_DEFLATE);
        assert!(f.len() < text.len() / 10);
        assert_eq!(decode(&f, MAX_PAYLOAD).unwrap().payload, text);
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = decode(&bytes, 64 * 1024);
        }

        #[test]
        fn deflate_flag_with_garbage_fails_cleanly(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut bytes = vec![1, FLAG_DEFLATE];
            bytes.extend(body);
            let _ = decode(&bytes, 64 * 1024);
        }

        #[test]
        fn frames_round_trip(ch in channel(), payload in proptest::collection::vec(any::<u8>(), 0..3000), repeat in 1usize..40) {
            // Repetitive payloads get deflated; random ones stay as they are.
            let payload: Vec<u8> = payload.iter().copied().cycle().take(payload.len() * repeat).collect();
            let bytes = encode(ch, &payload, MAX_PAYLOAD).unwrap();
            let f = decode(&bytes, MAX_PAYLOAD).unwrap();
            prop_assert_eq!(f.channel, ch);
            prop_assert_eq!(f.payload, payload);
        }
    }

    #[test]
    fn a_small_frame_cannot_inflate_past_the_limit() {
        let bomb = encode(Channel::Sync, &vec![0u8; 4 << 20], MAX_PAYLOAD).unwrap();
        assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
        assert_eq!(
            decode(&bomb, 1 << 20),
            Err(FrameError::TooLarge { max: 1 << 20 })
        );
        assert_eq!(decode(&[3, 0], 10), Err(FrameError::UnknownChannel(3)));
        assert_eq!(decode(&[0, 2], 10), Err(FrameError::UnknownFlags(2)));
        assert!(encode(Channel::Sync, &[0; 11], 10).is_err());
    }
}
