//! Secrets at rest: AES-256-GCM (aws-lc, the same library rustls already
//! links) with a per-node key from a root-only file.
//!
//! A sealed body is `[1][12-byte nonce][ciphertext + tag]`; the associated
//! data names the row (kind, namespace, name, uid), so a sealed body copied
//! into another row does not open.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};

use super::StoreError;

const VERSION: u8 = 1;

pub struct Key(LessSafeKey);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

fn key_err(path: &Path, msg: impl std::fmt::Display) -> StoreError {
    StoreError::Key(format!("{}: {msg}", path.display()))
}

impl Key {
    /// Read the key file, or create one (32 random bytes, hex, mode 0600)
    /// if there is none yet: a node's first start.
    pub fn load_or_create(path: &Path) -> Result<Key, StoreError> {
        if !path.exists() {
            let mut raw = [0u8; 32];
            SystemRandom::new()
                .fill(&mut raw)
                .map_err(|_| key_err(path, "no randomness for a new key"))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| key_err(path, e))?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| key_err(path, e))?;
            f.write_all(format!("{}\n", hex::encode(raw)).as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|e| key_err(path, e))?;
            tracing::info!(path = %path.display(), "created the store key for secrets at rest");
        }
        Key::load(path)
    }

    /// Read a key file: 64 hex digits (what `openssl rand -hex 32` prints)
    /// or 32 raw bytes, owned by us and readable by nobody else.
    pub fn load(path: &Path) -> Result<Key, StoreError> {
        let meta = std::fs::metadata(path).map_err(|e| key_err(path, e))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(key_err(
                path,
                format!("readable by others (mode {mode:o}); it must be 0600 or 0400"),
            ));
        }
        if meta.uid() != nix::unistd::geteuid().as_raw() {
            return Err(key_err(path, "not owned by the user edge-rt runs as"));
        }
        let bytes = std::fs::read(path).map_err(|e| key_err(path, e))?;
        let text = String::from_utf8_lossy(&bytes);
        let raw = match hex::decode(text.trim()) {
            Ok(k) if k.len() == 32 => k,
            _ if bytes.len() == 32 => bytes,
            _ => {
                return Err(key_err(
                    path,
                    "not a key: expected 64 hex digits or 32 raw bytes",
                ))
            }
        };
        let unbound = UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| key_err(path, "bad key"))?;
        Ok(Key(LessSafeKey::new(unbound)))
    }

    pub fn seal(&self, aad: &str, plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| StoreError::Crypt("no randomness for a nonce".into()))?;
        let mut buf = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut buf,
            )
            .map_err(|_| StoreError::Crypt("sealing failed".into()))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + buf.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(out)
    }

    pub fn open(&self, aad: &str, sealed: &[u8]) -> Result<Vec<u8>, StoreError> {
        if sealed.len() < 1 + NONCE_LEN || sealed[0] != VERSION {
            return Err(StoreError::Crypt("not a sealed body".into()));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[1..1 + NONCE_LEN]);
        let mut buf = sealed[1 + NONCE_LEN..].to_vec();
        let plain = self
            .0
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut buf,
            )
            .map_err(|_| {
                StoreError::Crypt(
                    "does not open with this node's key (another key, or altered)".into(),
                )
            })?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_private_and_round_trips_bound_to_its_row() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        let k = Key::load_or_create(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let s = k.seal("Secret/a/b/u1", b"hunter2").unwrap();
        assert!(!s.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(k.open("Secret/a/b/u1", &s).unwrap(), b"hunter2");
        assert!(k.open("Secret/a/c/u1", &s).is_err());
        // The same file loads the same key.
        let k2 = Key::load(&p).unwrap();
        assert_eq!(k2.open("Secret/a/b/u1", &s).unwrap(), b"hunter2");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Key::load(&p).unwrap_err().to_string();
        assert!(e.contains("readable by others"), "{e}");
    }
}
