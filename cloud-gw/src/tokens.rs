//! Join tokens as cloud-gw keeps them: only a hash of each secret, its
//! expiry, and whether it was revoked (`tokens.json` in the keeper).

use std::collections::BTreeMap;
use std::time::Duration;

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use outrigger_proto::token::JoinToken;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keeper::{Keeper, KeeperError};

const FILE: &str = "tokens.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenInfo {
    pub id: String,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    pub created: i64,
    /// Unix seconds.
    pub expires: i64,
    #[serde(default)]
    pub revoked: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Keeper(#[from] KeeperError),
    #[error("tokens file: {0}")]
    Corrupt(String),
    #[error("no randomness")]
    Random,
    /// Unknown id or wrong secret: the peer is not told which.
    #[error("invalid join token")]
    Invalid,
    #[error("join token {0} expired")]
    Expired(String),
    #[error("join token {0} was revoked")]
    Revoked(String),
    #[error("no token {0}")]
    Unknown(String),
}

pub struct Tokens<'a> {
    keeper: &'a dyn Keeper,
}

fn random_alnum(n: usize) -> Result<String, TokenError> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut b = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| TokenError::Random)?;
    // 256 % 36 = 4: a bias of 1/64 on four letters, harmless for 80+ bits.
    Ok(b.iter()
        .map(|x| ALPHABET[*x as usize % ALPHABET.len()] as char)
        .collect())
}

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl<'a> Tokens<'a> {
    pub fn new(keeper: &'a dyn Keeper) -> Tokens<'a> {
        Tokens { keeper }
    }

    pub fn list(&self) -> Result<Vec<TokenInfo>, TokenError> {
        Ok(self.load()?.into_values().collect())
    }

    fn load(&self) -> Result<BTreeMap<String, TokenInfo>, TokenError> {
        match self.keeper.get(FILE)? {
            Some(b) => serde_json::from_slice(&b).map_err(|e| TokenError::Corrupt(e.to_string())),
            None => Ok(BTreeMap::new()),
        }
    }

    fn save(&self, all: &BTreeMap<String, TokenInfo>) -> Result<(), TokenError> {
        let b = serde_json::to_vec_pretty(all).map_err(|e| TokenError::Corrupt(e.to_string()))?;
        Ok(self.keeper.put(FILE, &b)?)
    }

    /// A new token valid for `ttl`, pinning the CA of `ca_pin`. Expired
    /// tokens are dropped from the list as this one is added.
    pub fn create(&self, ttl: Duration, ca_pin: &str) -> Result<JoinToken, TokenError> {
        let mut all = self.load()?;
        let now = now();
        all.retain(|_, t| t.expires > now);
        let token = JoinToken {
            id: random_alnum(6)?,
            secret: random_alnum(16)?,
            ca_pin: ca_pin.to_string(),
        };
        all.insert(
            token.id.clone(),
            TokenInfo {
                id: token.id.clone(),
                secret_sha256: sha(&token.secret),
                created: now,
                expires: now + ttl.as_secs() as i64,
                revoked: false,
            },
        );
        self.save(&all)?;
        Ok(token)
    }

    pub fn revoke(&self, id: &str) -> Result<(), TokenError> {
        let mut all = self.load()?;
        let t = all
            .get_mut(id)
            .ok_or_else(|| TokenError::Unknown(id.into()))?;
        t.revoked = true;
        self.save(&all)
    }

    /// Whether `id`/`secret` may join now.
    pub fn check(&self, id: &str, secret: &str, at: i64) -> Result<(), TokenError> {
        let all = self.load()?;
        let t = all.get(id).ok_or(TokenError::Invalid)?;
        let ok = aws_lc_rs::constant_time::verify_slices_are_equal(
            sha(secret).as_bytes(),
            t.secret_sha256.as_bytes(),
        )
        .is_ok();
        if !ok {
            return Err(TokenError::Invalid);
        }
        if t.revoked {
            return Err(TokenError::Revoked(id.into()));
        }
        if t.expires <= at {
            return Err(TokenError::Expired(id.into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keeper::DirKeeper;

    #[test]
    fn created_checked_expired_revoked() {
        let d = tempfile::tempdir().unwrap();
        let k = DirKeeper::new(d.path());
        let tokens = Tokens::new(&k);
        let pin = "ab".repeat(32);
        let t = tokens.create(Duration::from_secs(60), &pin).unwrap();
        assert_eq!(JoinToken::parse(&t.to_string()).unwrap(), t);
        tokens.check(&t.id, &t.secret, now()).unwrap();
        assert!(matches!(
            tokens.check(&t.id, "0000000000000000", now()),
            Err(TokenError::Invalid)
        ));
        assert!(matches!(
            tokens.check("nope00", &t.secret, now()),
            Err(TokenError::Invalid)
        ));
        assert!(matches!(
            tokens.check(&t.id, &t.secret, now() + 61),
            Err(TokenError::Expired(_))
        ));
        tokens.revoke(&t.id).unwrap();
        assert!(matches!(
            tokens.check(&t.id, &t.secret, now()),
            Err(TokenError::Revoked(_))
        ));
        let raw = std::fs::read_to_string(d.path().join(FILE)).unwrap();
        assert!(!raw.contains(&t.secret));
    }
}
