//! Per-agent gateway secrets: what a container presents to agentd's model gateway instead
//! of the real model credential.
//!
//! A secret is `agentd-gw-<agent id>-<mac>`, where `<mac>` is HMAC-SHA256 over the agent id
//! with the daemon's gateway key (32 random bytes, generated once and kept in the store's
//! `meta` table like the instance id), base64url without padding. So a secret is valid for
//! one agent only, survives daemon restarts (adopted containers keep theirs), and needs no
//! row of its own. Secrets and the key are never logged: their `Debug` is redacted.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Every gateway secret starts with this.
pub const SECRET_PREFIX: &str = "agentd-gw-";

/// The length of the key, in bytes.
pub const KEY_LEN: usize = 32;

/// The base64url length of a 32-byte MAC without padding.
const MAC_CHARS: usize = 43;

type HmacSha256 = Hmac<Sha256>;

/// The daemon's gateway key, which makes and checks every agent's secret.
#[derive(Clone)]
pub struct GatewaySecrets {
    key: [u8; KEY_LEN],
}

impl fmt::Debug for GatewaySecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GatewaySecrets(<redacted>)")
    }
}

impl GatewaySecrets {
    /// The secrets of `key`.
    pub fn from_key(key: [u8; KEY_LEN]) -> Self {
        Self { key }
    }

    /// A new random key, from the operating system's generator.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut key = [0u8; KEY_LEN];
        getrandom::fill(&mut key)?;
        Ok(Self { key })
    }

    /// The key as stored (base64url, no padding).
    pub(crate) fn encoded_key(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.key)
    }

    /// The key from its stored form; `None` if it is not 32 bytes of base64url.
    pub(crate) fn decode_key(text: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(text.trim()).ok()?;
        let key: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(Self { key })
    }

    fn mac(&self, agent_id: &str) -> HmacSha256 {
        // HMAC takes a key of any length; 32 bytes never fails.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!("any key length"));
        mac.update(agent_id.as_bytes());
        mac
    }

    /// The secret of agent `agent_id`.
    pub fn secret_for(&self, agent_id: &str) -> AgentSecret {
        let tag = self.mac(agent_id).finalize().into_bytes();
        AgentSecret(format!("{SECRET_PREFIX}{agent_id}-{}", URL_SAFE_NO_PAD.encode(tag)))
    }

    /// The agent id a presented secret belongs to, if it is one of this key's secrets. The
    /// MAC is compared in constant time. Whether the agent still exists is the caller's
    /// question.
    pub fn verify(&self, presented: &str) -> Option<String> {
        let rest = presented.strip_prefix(SECRET_PREFIX)?;
        // `<id>-<43 chars>`: the MAC's alphabet has '-' too, so split by length.
        let split = rest.len().checked_sub(MAC_CHARS + 1)?;
        if split == 0 || !rest.is_char_boundary(split) || rest.as_bytes()[split] != b'-' {
            return None;
        }
        let (agent_id, tag) = (&rest[..split], &rest[split + 1..]);
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        self.mac(agent_id).verify_slice(&tag).ok()?;
        Some(agent_id.to_owned())
    }
}

/// One agent's gateway secret. `Debug` and `Display` are redacted; [`AgentSecret::expose`]
/// gives the text (for the agent's environment only).
#[derive(Clone, PartialEq, Eq)]
pub struct AgentSecret(String);

impl AgentSecret {
    /// The secret's text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AgentSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentSecret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_valid_for_its_agent_only() {
        let secrets = GatewaySecrets::from_key([7; KEY_LEN]);
        let other_key = GatewaySecrets::from_key([8; KEY_LEN]);
        for id in ["a1b2c3", "with-dashes-in-it", "x"] {
            let secret = secrets.secret_for(id);
            assert!(secret.expose().starts_with("agentd-gw-"));
            assert_eq!(secrets.verify(secret.expose()).as_deref(), Some(id));
            assert_eq!(other_key.verify(secret.expose()), None, "another daemon's key");
        }
        let a = secrets.secret_for("agent-a");
        // The MAC of agent a with agent b's id in front.
        let forged = a.expose().replacen("agent-a", "agent-b", 1);
        assert_eq!(secrets.verify(&forged), None);
        let mut flipped = a.expose().to_owned();
        let last = flipped.pop().expect("char");
        flipped.push(if last == 'A' { 'B' } else { 'A' });
        assert_eq!(secrets.verify(&flipped), None);
        for bad in ["", "agentd-gw-", "sk-ant-api03-x", &a.expose()[..a.expose().len() - 1], "agentd-gw--abc"] {
            assert_eq!(secrets.verify(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn nothing_shows_the_key_or_a_secret() {
        let secrets = GatewaySecrets::generate().expect("random key");
        let secret = secrets.secret_for("agent");
        assert!(!format!("{secrets:?}").contains(&secrets.encoded_key()));
        assert!(!format!("{secret:?}").contains("agentd-gw-"));
        let again = GatewaySecrets::decode_key(&secrets.encoded_key()).expect("decodes");
        assert_eq!(again.verify(secret.expose()).as_deref(), Some("agent"));
        assert!(GatewaySecrets::decode_key("short").is_none());
    }
}
