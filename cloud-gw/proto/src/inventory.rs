//! The inventory's compact form: per kind, one byte string of
//! (uid, resourceVersion) pairs, each id in its shortest spelling. A uid is
//! almost always a UUID (16 bytes instead of 36 characters) and a
//! resourceVersion a decimal number (a varint) or a hex digest (half its
//! length), so 200 objects take about 5 KB instead of 12.
//!
//! ```text
//! 0x00 varint(len) bytes   text
//! 0x01 16 bytes            a lowercase UUID
//! 0x02 varint n, n bytes   lowercase hex of even length
//! 0x03 varint              a decimal without leading zeros (u64)
//! ```

use std::collections::BTreeMap;

use crate::kinds::Kind;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &[u8], at: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let x = *b.get(*at).ok_or("truncated varint")?;
        *at += 1;
        v |= u64::from(x & 0x7f) << shift;
        if x & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint too long".into())
}

/// A UUID's bytes, if `s` is one in its canonical lowercase spelling
/// (anything else must go as text to come back the same).
fn uuid_bytes(s: &str) -> Option<[u8; 16]> {
    let u = uuid::Uuid::try_parse(s).ok()?;
    let mut buf = uuid::Uuid::encode_buffer();
    (u.hyphenated().encode_lower(&mut buf) == s).then(|| *u.as_bytes())
}

fn lower_hex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty()
        || !s.len().is_multiple_of(2)
        || !s
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

fn put_id(out: &mut Vec<u8>, s: &str) {
    if let Some(u) = uuid_bytes(s) {
        out.push(1);
        out.extend_from_slice(&u);
    } else if let Some(n) = s.parse::<u64>().ok().filter(|n| n.to_string() == s) {
        out.push(3);
        put_varint(out, n);
    } else if let Some(h) = lower_hex(s) {
        out.push(2);
        put_varint(out, h.len() as u64);
        out.extend_from_slice(&h);
    } else {
        out.push(0);
        put_varint(out, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }
}

fn take<'a>(b: &'a [u8], at: &mut usize, n: usize) -> Result<&'a [u8], String> {
    let end = at.checked_add(n).ok_or("length overflow")?;
    let s = b.get(*at..end).ok_or("truncated id")?;
    *at = end;
    Ok(s)
}

fn get_id(b: &[u8], at: &mut usize) -> Result<String, String> {
    let tag = *b.get(*at).ok_or("truncated id")?;
    *at += 1;
    match tag {
        0 => {
            let n = get_varint(b, at)? as usize;
            String::from_utf8(take(b, at, n)?.to_vec()).map_err(|e| e.to_string())
        }
        1 => {
            let raw: [u8; 16] = take(b, at, 16)?.try_into().map_err(|_| "truncated id")?;
            Ok(uuid_string(&raw))
        }
        2 => {
            let n = get_varint(b, at)? as usize;
            Ok(hex(take(b, at, n)?))
        }
        3 => Ok(get_varint(b, at)?.to_string()),
        t => Err(format!("unknown id tag {t}")),
    }
}

/// 16 bytes in a UUID's canonical spelling (8-4-4-4-12, lowercase).
fn uuid_string(b: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*b).to_string()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// uid -> resourceVersion, packed.
pub fn pack(m: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.len() * 28);
    for (uid, rv) in m {
        put_id(&mut out, uid);
        put_id(&mut out, rv);
    }
    out
}

pub fn unpack(b: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let mut at = 0;
    let mut m = BTreeMap::new();
    while at < b.len() {
        let uid = get_id(b, &mut at)?;
        let rv = get_id(b, &mut at)?;
        m.insert(uid, rv);
    }
    Ok(m)
}

/// `#[serde(with = "...")]` for kind -> (uid -> resourceVersion).
pub mod packed {
    use super::*;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(
        v: &BTreeMap<Kind, BTreeMap<String, String>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let m: BTreeMap<&Kind, serde_bytes::ByteBuf> = v
            .iter()
            .map(|(k, inv)| (k, serde_bytes::ByteBuf::from(pack(inv))))
            .collect();
        m.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<Kind, BTreeMap<String, String>>, D::Error> {
        // A kind this build does not know is skipped (see kinds::lenient).
        let m = BTreeMap::<String, serde_bytes::ByteBuf>::deserialize(d)?;
        m.into_iter()
            .filter_map(|(k, b)| Kind::from_name(&k).map(|k| (k, b)))
            .map(|(k, b)| {
                unpack(&b)
                    .map(|inv| (k, inv))
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_inventory_round_trips(m in proptest::collection::btree_map(".{0,40}", ".{0,20}", 0..50)) {
            prop_assert_eq!(unpack(&pack(&m)).unwrap(), m);
        }

        #[test]
        fn any_bytes_unpack_or_fail_cleanly(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = unpack(&b);
        }
    }

    #[test]
    fn uuids_numbers_and_digests_are_short() {
        let m = BTreeMap::from([
            (
                "3f2c9a1e-5b7d-4c1e-9a2b-000000000007".to_string(),
                "1000037".to_string(),
            ),
            (
                "3f2c9a1e-5b7d-4c1e-9a2b-000000000008".to_string(),
                "00ab12cd34ef5678".to_string(),
            ),
            ("Not-A-UUID".to_string(), "007".to_string()),
        ]);
        let p = pack(&m);
        assert_eq!(unpack(&p).unwrap(), m);
        // 17 + 4, 17 + 10, 12 + 5
        assert_eq!(p.len(), 21 + 27 + 17);
    }
}

/// Buckets of the inventory digest: a change anywhere shows in one.
pub const BUCKETS: usize = 16;

fn sha(b: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(b).into()
}

/// Which bucket a uid falls in.
pub fn bucket(uid: &str) -> usize {
    sha(uid.as_bytes())[0] as usize % BUCKETS
}

/// Bytes of digest per bucket: 48 bits make a false match (two different
/// bucket states, one digest) a 1 in 2^48 event, in 16 x 6 bytes a reconnect.
pub const DIGEST_BYTES: usize = 6;

/// Per bucket, [`DIGEST_BYTES`] of SHA-256 over its sorted `uid=rv` lines:
/// both sides compute it, and only buckets that differ need their entries
/// sent. An empty inventory is empty (most nodes have no objects of some
/// kinds).
pub fn digests(m: &BTreeMap<String, String>) -> Vec<u8> {
    if m.is_empty() {
        return Vec::new();
    }
    let mut lines: Vec<Vec<u8>> = vec![Vec::new(); BUCKETS];
    for (uid, rv) in m {
        let b = &mut lines[bucket(uid)];
        b.extend_from_slice(uid.as_bytes());
        b.push(b'=');
        b.extend_from_slice(rv.as_bytes());
        b.push(b'\n');
    }
    lines
        .iter()
        .flat_map(|l| sha(l)[..DIGEST_BYTES].to_vec())
        .collect()
}

/// The buckets whose digests differ (all of them if `theirs` is malformed;
/// none if both are empty).
pub fn differing(ours: &[u8], theirs: &[u8]) -> Vec<u8> {
    if ours == theirs {
        return Vec::new();
    }
    (0..BUCKETS)
        .filter(|&i| {
            let at = i * DIGEST_BYTES..(i + 1) * DIGEST_BYTES;
            ours.get(at.clone()) != theirs.get(at)
        })
        .map(|i| i as u8)
        .collect()
}

/// A node's inventory, per kind.
pub type Inventory = BTreeMap<Kind, BTreeMap<String, String>>;

/// The answer to a query (`Sync::Query`): of each kind asked about, the
/// entries in the buckets asked for; nothing of the kinds not asked about.
pub fn answer(inventory: &Inventory, query: &BTreeMap<Kind, serde_bytes::ByteBuf>) -> Inventory {
    query
        .iter()
        .map(|(kind, buckets)| {
            let part = inventory
                .get(kind)
                .into_iter()
                .flatten()
                .filter(|(uid, _)| buckets.contains(&(bucket(uid) as u8)))
                .map(|(u, v)| (u.clone(), v.clone()))
                .collect();
            (*kind, part)
        })
        .collect()
}

/// Per kind, the inventory's [`digests`] (what a reconnect sends first);
/// kinds with nothing are left out (their digest is empty anyway).
pub fn digests_of(inventory: &Inventory) -> BTreeMap<Kind, serde_bytes::ByteBuf> {
    inventory
        .iter()
        .filter(|(_, m)| !m.is_empty())
        .map(|(k, m)| (*k, serde_bytes::ByteBuf::from(digests(m))))
        .collect()
}

#[cfg(test)]
mod digest_tests {
    use super::*;

    #[test]
    fn one_change_shows_in_one_bucket() {
        let m: BTreeMap<String, String> = (0..200)
            .map(|i| (format!("uid-{i}"), format!("{i}")))
            .collect();
        let mut n = m.clone();
        n.insert("uid-17".into(), "changed".into());
        let d = differing(&digests(&m), &digests(&n));
        assert_eq!(d, vec![bucket("uid-17") as u8]);
        assert!(differing(&digests(&m), &digests(&m)).is_empty());
        assert_eq!(differing(&digests(&m), b"short").len(), BUCKETS);
        // Empty against something: every bucket is asked for.
        assert_eq!(
            differing(&digests(&BTreeMap::new()), &digests(&m)).len(),
            BUCKETS
        );
        assert!(differing(&[], &[]).is_empty());
    }

    #[test]
    fn a_query_is_answered_with_the_buckets_asked_for_only() {
        let pods: BTreeMap<String, String> = (0..100)
            .map(|i| (format!("p{i}"), "1".to_string()))
            .collect();
        let inv = Inventory::from([
            (Kind::Pod, pods.clone()),
            (
                Kind::Secret,
                BTreeMap::from([("s".to_string(), "2".to_string())]),
            ),
        ]);
        let b = bucket("p7") as u8;
        let q = BTreeMap::from([
            (Kind::Pod, serde_bytes::ByteBuf::from(vec![b])),
            (Kind::ConfigMap, serde_bytes::ByteBuf::from(vec![0, 1, 2])),
        ]);
        let a = answer(&inv, &q);
        assert_eq!(
            a.keys().copied().collect::<Vec<_>>(),
            vec![Kind::ConfigMap, Kind::Pod]
        );
        assert!(a[&Kind::ConfigMap].is_empty());
        assert!(a[&Kind::Pod].contains_key("p7"));
        assert!(a[&Kind::Pod].keys().all(|u| bucket(u) as u8 == b));
        let expected = pods.keys().filter(|u| bucket(u) as u8 == b).count();
        assert_eq!(a[&Kind::Pod].len(), expected);
        let d = digests_of(&inv);
        assert_eq!(d.len(), 2);
        assert_eq!(d[&Kind::Pod].to_vec(), digests(&pods));
    }
}
