//! PIN sealing at rest (ChaCha20-Poly1305 with a key id for rotation) and keyed hashes
//! for uniqueness checks and idempotency fingerprints without decrypting.

use crate::StoreError;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use keyplane_core::pin::Pin;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use uuid::Uuid;

type HmacSha256 = Hmac<Sha256>;

/// One 32-byte master key's derived sub-keys; wiped from memory when dropped.
struct KeyMaterial {
    id: String,
    seal: [u8; 32],
    hash: [u8; 32],
}

impl Drop for KeyMaterial {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.seal.zeroize();
        self.hash.zeroize();
    }
}

impl KeyMaterial {
    fn new(mut master: [u8; 32]) -> KeyMaterial {
        use zeroize::Zeroize;
        let id = hex::encode(&Sha256::digest(derive(&master, "keyplane key id"))[..4]);
        let material = KeyMaterial {
            id: format!("k{id}"),
            seal: derive(&master, "keyplane pin seal v1"),
            hash: derive(&master, "keyplane pin hash v1"),
        };
        master.zeroize();
        material
    }

    /// The four bytes a tagged hash starts with: the key id's hex digits.
    fn tag(&self) -> Vec<u8> {
        hex::decode(&self.id[1..]).unwrap_or_default()
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

/// The PIN keys: one current key that seals and hashes, and older keys that still open
/// and hash what they sealed until `keyplaned rotate-keys` has moved every row to the
/// current one. Sub-keys are derived from each 32-byte master key and zeroized on drop.
#[derive(Clone)]
pub struct PinKey {
    /// The current key first.
    keys: Arc<Vec<KeyMaterial>>,
}

impl std::fmt::Debug for PinKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinKey({})", self.ids().join(", "))
    }
}

fn derive(master: &[u8; 32], label: &str) -> [u8; 32] {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(master).expect("HMAC takes any key length");
    mac.update(label.as_bytes());
    mac.finalize().into_bytes().into()
}

impl PinKey {
    /// Builds a single-key ring from 32 raw bytes.
    pub fn from_bytes(master: [u8; 32]) -> PinKey {
        PinKey {
            keys: Arc::new(vec![KeyMaterial::new(master)]),
        }
    }

    /// Parses one or more keys of 64 hex digits, separated by white space or commas
    /// (`#` starts a comment line); the first is the current key.
    pub fn from_hex(text: &str) -> Result<PinKey, StoreError> {
        let mut keys: Vec<KeyMaterial> = Vec::new();
        for word in text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .flat_map(|l| l.split(|c: char| c.is_whitespace() || c == ','))
            .filter(|w| !w.is_empty())
        {
            let bytes = hex::decode(word)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    StoreError::InvalidArgument("a PIN key must be 64 hex digits".into())
                })?;
            let key = KeyMaterial::new(bytes);
            if !keys.iter().any(|k| k.id == key.id) {
                keys.push(key);
            }
        }
        if keys.is_empty() {
            return Err(StoreError::InvalidArgument(
                "no PIN key given (64 hex digits expected)".into(),
            ));
        }
        Ok(PinKey {
            keys: Arc::new(keys),
        })
    }

    /// A fresh random key.
    pub fn generate() -> Result<PinKey, StoreError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| StoreError::Internal(e.to_string()))?;
        Ok(PinKey::from_bytes(bytes))
    }

    /// The current key's id, stored beside each PIN it seals.
    pub fn id(&self) -> &str {
        &self.current().id
    }

    /// Every loaded key id, the current one first.
    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.id.clone()).collect()
    }

    /// Whether `key_id` is loaded (current or older).
    pub fn holds(&self, key_id: &str) -> bool {
        self.find(key_id).is_some()
    }

    fn current(&self) -> &KeyMaterial {
        &self.keys[0]
    }

    fn find(&self, key_id: &str) -> Option<&KeyMaterial> {
        self.keys.iter().find(|k| k.id == key_id)
    }

    /// Seals a PIN under the current key, bound to its place (`site` and `place`, the
    /// credential id or the device and slot) so a sealed value moved elsewhere does not open.
    pub fn seal(&self, site: Uuid, place: Uuid, pin: &Pin) -> Result<Vec<u8>, StoreError> {
        self.seal_at(site, place, &[], pin)
    }

    /// [`PinKey::seal`] with extra place bytes (an observed slot's number).
    pub fn seal_at(
        &self,
        site: Uuid,
        place: Uuid,
        extra: &[u8],
        pin: &Pin,
    ) -> Result<Vec<u8>, StoreError> {
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&self.current().seal));
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| StoreError::Internal(e.to_string()))?;
        let aad = [site.as_bytes().as_slice(), place.as_bytes(), extra].concat();
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

    /// Opens a sealed PIN with whichever loaded key sealed it.
    pub fn open(
        &self,
        site: Uuid,
        credential: Uuid,
        key_id: &str,
        sealed: &[u8],
    ) -> Result<Pin, StoreError> {
        self.open_at(site, credential, &[], key_id, sealed)
    }

    /// [`PinKey::open`] with extra place bytes (an observed slot's number).
    pub fn open_at(
        &self,
        site: Uuid,
        place: Uuid,
        extra: &[u8],
        key_id: &str,
        sealed: &[u8],
    ) -> Result<Pin, StoreError> {
        let Some(key) = self.find(key_id) else {
            return Err(StoreError::Internal(format!(
                "{place} is sealed with key {key_id}, which is not loaded (loaded: {})",
                self.ids().join(", ")
            )));
        };
        if sealed.len() < 12 {
            return Err(StoreError::Internal(format!(
                "{place}: sealed PIN too short"
            )));
        }
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&key.seal));
        let aad = [site.as_bytes().as_slice(), place.as_bytes(), extra].concat();
        let plain = cipher
            .decrypt(
                Nonce::from_slice(&sealed[..12]),
                Payload {
                    msg: &sealed[12..],
                    aad: &aad,
                },
            )
            .map_err(|_| StoreError::Internal(format!("{place}: sealed PIN does not open")))?;
        let text = String::from_utf8(plain)
            .map_err(|_| StoreError::Internal(format!("{place}: sealed PIN is not text")))?;
        Pin::parse(&text)
            .map_err(|_| StoreError::Internal(format!("{place}: sealed PIN is malformed")))
    }

    /// Keyed hash of a PIN within a site under the current key, tagged with its key id
    /// (four bytes, then the HMAC): equal PINs hash equal, nothing else is learnt.
    pub fn pin_hash(&self, site: Uuid, pin: &Pin) -> Vec<u8> {
        let key = self.current();
        [
            key.tag(),
            key.mac(&[b"pin", site.as_bytes(), pin.expose().as_bytes()]),
        ]
        .concat()
    }

    /// A site's hash under `hash_key` (a site's `pin_hash_key`): tagged under that key,
    /// or, for `None` (a site not yet rotated), the untagged hash under `legacy` (the key
    /// the database was keyed to before hashes carried their id).
    pub fn pin_hash_for(
        &self,
        hash_key: Option<&str>,
        legacy: &str,
        site: Uuid,
        pin: &Pin,
    ) -> Result<Vec<u8>, StoreError> {
        let id = hash_key.unwrap_or(legacy);
        let key = self.find(id).ok_or_else(|| {
            StoreError::FailedPrecondition(format!(
                "site {site} hashes its PINs under key {id}, which is not loaded (loaded: {}): add it to the key file",
                self.ids().join(", ")
            ))
        })?;
        let mac = key.mac(&[b"pin", site.as_bytes(), pin.expose().as_bytes()]);
        Ok(match hash_key {
            Some(_) => [key.tag(), mac].concat(),
            None => mac,
        })
    }

    /// Keyed fingerprint of a request, for idempotency checks (requests may hold PINs).
    pub fn fingerprint(&self, method: &str, request: &[u8]) -> Vec<u8> {
        self.current()
            .mac(&[b"request", method.as_bytes(), request])
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

    #[test]
    fn a_ring_opens_what_older_keys_sealed_and_hashes_carry_their_key() {
        let (old_hex, new_hex) = ("07".repeat(32), "09".repeat(32));
        let old = PinKey::from_hex(&old_hex).expect("old");
        let ring = PinKey::from_hex(&format!("# rotated\n{new_hex}\n{old_hex}\n")).expect("ring");
        assert_eq!(
            ring.ids(),
            [PinKey::from_hex(&new_hex).expect("new").id(), old.id()]
        );
        assert!(format!("{ring:?}").contains(old.id()));
        assert!(
            !format!("{ring:?}").contains(&old_hex[..8]),
            "no key bytes in Debug"
        );
        let (site, cred) = (Uuid::new_v4(), Uuid::new_v4());
        let pin = Pin::parse("4821").expect("pin");
        let sealed = old.seal(site, cred, &pin).expect("seal");
        assert_eq!(ring.open(site, cred, old.id(), &sealed).expect("open"), pin);
        // The current key seals; the old one alone cannot open it.
        let resealed = ring.seal(site, cred, &pin).expect("seal");
        assert!(old.open(site, cred, ring.id(), &resealed).is_err());
        // Tagged hashes start with their key id; untagged (legacy) ones are the bare HMAC.
        let tagged = ring.pin_hash(site, &pin);
        assert_eq!(tagged.len(), 36);
        assert_eq!(hex::encode(&tagged[..4]), ring.id()[1..]);
        let legacy = ring
            .pin_hash_for(None, old.id(), site, &pin)
            .expect("legacy");
        assert_eq!(legacy.len(), 32);
        assert_eq!(
            ring.pin_hash_for(Some(old.id()), old.id(), site, &pin)
                .expect("old tagged")[4..],
            legacy[..]
        );
        assert!(
            old.pin_hash_for(Some(ring.id()), old.id(), site, &pin)
                .is_err()
        );
        assert!(PinKey::from_hex("# nothing\n").is_err());
    }
}
