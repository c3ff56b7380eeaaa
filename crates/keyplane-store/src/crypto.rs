//! PIN sealing at rest (ChaCha20-Poly1305 with a key id for rotation) and keyed hashes
//! for uniqueness checks and idempotency fingerprints without decrypting.

use crate::StoreError;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use keyplane_core::pin::Pin;
use sha2::{Digest, Sha256};
use uuid::Uuid;

type HmacSha256 = Hmac<Sha256>;

/// A 32-byte master key; sub-keys for sealing and hashing are derived from it.
#[derive(Clone)]
pub struct PinKey {
    id: String,
    seal: [u8; 32],
    hash: [u8; 32],
}

impl std::fmt::Debug for PinKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinKey({})", self.id)
    }
}

fn derive(master: &[u8; 32], label: &str) -> [u8; 32] {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(master).expect("HMAC takes any key length");
    mac.update(label.as_bytes());
    mac.finalize().into_bytes().into()
}

impl PinKey {
    /// Builds a key from 32 raw bytes.
    pub fn from_bytes(master: [u8; 32]) -> PinKey {
        let id = hex::encode(&Sha256::digest(derive(&master, "keyplane key id"))[..4]);
        PinKey {
            id: format!("k{id}"),
            seal: derive(&master, "keyplane pin seal v1"),
            hash: derive(&master, "keyplane pin hash v1"),
        }
    }

    /// Parses 64 hex digits.
    pub fn from_hex(hex_key: &str) -> Result<PinKey, StoreError> {
        let bytes = hex::decode(hex_key.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| StoreError::InvalidArgument("PIN key must be 64 hex digits".into()))?;
        Ok(PinKey::from_bytes(bytes))
    }

    /// A fresh random key.
    pub fn generate() -> Result<PinKey, StoreError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| StoreError::Internal(e.to_string()))?;
        Ok(PinKey::from_bytes(bytes))
    }

    /// The key id stored beside each sealed PIN.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals a PIN, bound to its site and credential so sealed values cannot be swapped.
    pub fn seal(&self, site: Uuid, credential: Uuid, pin: &Pin) -> Result<Vec<u8>, StoreError> {
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&self.seal));
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| StoreError::Internal(e.to_string()))?;
        let aad = [site.as_bytes().as_slice(), credential.as_bytes()].concat();
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: pin.expose().as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| StoreError::Internal("sealing a PIN failed".into()))?;
        Ok([nonce.as_slice(), &sealed].concat())
    }

    /// Opens a sealed PIN.
    pub fn open(
        &self,
        site: Uuid,
        credential: Uuid,
        key_id: &str,
        sealed: &[u8],
    ) -> Result<Pin, StoreError> {
        if key_id != self.id {
            return Err(StoreError::Internal(format!(
                "credential {credential} is sealed with key {key_id}, not the configured {}",
                self.id
            )));
        }
        if sealed.len() < 12 {
            return Err(StoreError::Internal(format!(
                "credential {credential}: sealed PIN too short"
            )));
        }
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&self.seal));
        let aad = [site.as_bytes().as_slice(), credential.as_bytes()].concat();
        let plain = cipher
            .decrypt(
                Nonce::from_slice(&sealed[..12]),
                Payload {
                    msg: &sealed[12..],
                    aad: &aad,
                },
            )
            .map_err(|_| {
                StoreError::Internal(format!("credential {credential}: sealed PIN does not open"))
            })?;
        let text = String::from_utf8(plain).map_err(|_| {
            StoreError::Internal(format!("credential {credential}: sealed PIN is not text"))
        })?;
        Pin::parse(&text).map_err(|_| {
            StoreError::Internal(format!("credential {credential}: sealed PIN is malformed"))
        })
    }

    /// Keyed hash of a PIN within a site: equal PINs hash equal, nothing else is learnt.
    pub fn pin_hash(&self, site: Uuid, pin: &Pin) -> Vec<u8> {
        self.mac(&[b"pin", site.as_bytes(), pin.expose().as_bytes()])
    }

    /// Keyed fingerprint of a request, for idempotency checks (requests may hold PINs).
    pub fn fingerprint(&self, method: &str, request: &[u8]) -> Vec<u8> {
        self.mac(&[b"request", method.as_bytes(), request])
    }

    fn mac(&self, parts: &[&[u8]]) -> Vec<u8> {
        let mut mac =
            <HmacSha256 as Mac>::new_from_slice(&self.hash).expect("HMAC takes any key length");
        for p in parts {
            mac.update(&(p.len() as u64).to_le_bytes());
            mac.update(p);
        }
        mac.finalize().into_bytes().to_vec()
    }
}

/// SHA-256 of a bearer token, as stored.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// A new random bearer token with a readable prefix (`kpd_` dealer, `kpa_` agent).
pub fn new_token(prefix: &str) -> Result<String, StoreError> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::Internal(e.to_string()))?;
    Ok(format!("{prefix}{}", hex::encode(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_binding() {
        let key = PinKey::from_bytes([7; 32]);
        let (site, cred) = (Uuid::new_v4(), Uuid::new_v4());
        let pin = Pin::parse("4821").expect("pin");
        let sealed = key.seal(site, cred, &pin).expect("seal");
        assert!(!sealed.windows(4).any(|w| w == b"4821"));
        assert_eq!(key.open(site, cred, key.id(), &sealed).expect("open"), pin);
        // Bound to the row: another credential id does not open it.
        assert!(key.open(site, Uuid::new_v4(), key.id(), &sealed).is_err());
        // Another key does not open it.
        let other = PinKey::from_bytes([8; 32]);
        assert!(other.open(site, cred, key.id(), &sealed).is_err());
    }

    #[test]
    fn hashes_are_keyed_and_site_scoped() {
        let key = PinKey::from_bytes([7; 32]);
        let site = Uuid::new_v4();
        let pin = Pin::parse("4821").expect("pin");
        assert_eq!(key.pin_hash(site, &pin), key.pin_hash(site, &pin));
        assert_ne!(key.pin_hash(site, &pin), key.pin_hash(Uuid::new_v4(), &pin));
        assert_ne!(
            key.pin_hash(site, &pin),
            PinKey::from_bytes([9; 32]).pin_hash(site, &pin)
        );
        assert!(PinKey::from_hex("abc").is_err());
        assert_eq!(
            PinKey::from_hex(&"07".repeat(32)).expect("hex").id(),
            key.id()
        );
    }
}
