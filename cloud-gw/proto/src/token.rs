//! Bootstrap tokens: `ort1.<id>.<secret>.<pin>`.
//!
//! `id` (6 characters) names the token in cloud-gw's list; `secret` (16)
//! proves the holder may join; `pin` is the SHA-256 (hex) of the link CA's
//! certificate, so a joining node trusts the right CA without being given
//! it, as kubeadm's discovery hash does.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
    pub ca_pin: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a join token (expected ort1.<6 chars>.<16 chars>.<64 hex digits> from `cloud-gw token create`)")]
pub struct BadToken;

fn lower_alnum(s: &str, n: usize) -> bool {
    s.len() == n
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl JoinToken {
    pub fn parse(s: &str) -> Result<JoinToken, BadToken> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        match parts.as_slice() {
            ["ort1", id, secret, pin]
                if lower_alnum(id, 6)
                    && lower_alnum(secret, 16)
                    && pin.len() == 64
                    && pin.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                Ok(JoinToken {
                    id: id.to_string(),
                    secret: secret.to_string(),
                    ca_pin: pin.to_ascii_lowercase(),
                })
            }
            _ => Err(BadToken),
        }
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ort1.{}.{}.{}", self.id, self.secret, self.ca_pin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_the_malformed() {
        let t = JoinToken {
            id: "abc123".into(),
            secret: "0123456789abcdef".into(),
            ca_pin: "ab".repeat(32),
        };
        assert_eq!(JoinToken::parse(&t.to_string()), Ok(t.clone()));
        for bad in [
            "",
            "ort1.abc123.0123456789abcdef",
            "ort2.abc123.0123456789abcdef.".to_string().as_str(),
            &t.to_string().replace("abc123", "ABC123"),
            &format!("ort1.abc123.0123456789abcdef.{}", "zz".repeat(32)),
        ] {
            assert_eq!(JoinToken::parse(bad), Err(BadToken), "{bad}");
        }
    }
}
