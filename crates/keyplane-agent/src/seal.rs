//! The key that seals the journal's codes at rest (issue 13), and where it comes from.
//!
//! Every slot row of `journal.redb` (desired, written and observed codes) is sealed
//! with ChaCha20-Poly1305 under a 32-byte journal key, with its place (device, table,
//! slot) as associated data. The key is never stored beside the journal in clear; it
//! comes, in this order, from:
//!
//! 1. `--journal-key-file` (64 hex digits, placed by the installer; refused when group
//!    or world may read it): the journal key is derived from it.
//! 2. The agent's enrollment key (`STATE_DIR/identity/agent.key`): a random journal
//!    key is kept in `STATE_DIR/journal.keywrap`, sealed under a key derived from the
//!    private key. Each new identity (renewal, re-enrollment) re-wraps it before the
//!    new private key replaces the old one, so the journal itself never changes key.
//! 3. Development only (a loopback keyplaned, no key file, not enrolled): a key in
//!    `STATE_DIR/journal.key` (mode 0600) beside the journal, which then protects
//!    nothing; the agent says so at start-up. It becomes the wrapped key of step 2
//!    when the agent enrolls.
//!
//! Anything else (an agent using a token against a remote keyplaned, without a key
//! file) refuses to start and says what to pass.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

type HmacSha256 = Hmac<Sha256>;

/// The wrapped journal key, beside the journal (only useful with the identity key).
pub const WRAP_FILE: &str = "journal.keywrap";
/// The development key file, beside the journal.
pub const DEV_KEY_FILE: &str = "journal.key";

/// Why the journal key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The key file is readable by others.
    #[error(
        "the journal key file {path} is readable by group or others (mode {mode:o}): make it private to the agent's user (chmod 0400 or 0600)"
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file does not hold a key.
    #[error(
        "the journal key file {path} does not hold 64 hex digits: write one with `head -c 32 /dev/urandom | xxd -p -c 64` (mode 0400)"
    )]
    BadKeyFile {
        /// The file.
        path: PathBuf,
    },
    /// The wrap file does not open under the agent's key.
    #[error(
        "{path} does not open under this agent's enrollment key (STATE_DIR/identity was replaced or altered): restore the identity directory, or remove journal.redb and journal.keywrap to start with an empty journal (keyplaned sends every code again)"
    )]
    Unwrap {
        /// The wrap file.
        path: PathBuf,
    },
    /// No key source at all.
    #[error(
        "the agent's journal needs a key that is not kept beside it: pass --journal-key-file (KEYPLANE_JOURNAL_KEY_FILE; 64 hex digits, mode 0400 or 0600) or enroll the agent (--enrollment-code-file)"
    )]
    NoKey,
}

/// The journal's sealing key. Debug shows its id only; the key is wiped on drop.
pub struct JournalKey {
    id: String,
    key: [u8; 32],
}

impl Drop for JournalKey {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.key.zeroize();
    }
}

impl std::fmt::Debug for JournalKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JournalKey({})", self.id)
    }
}

fn derive(key: &[u8], label: &str) -> [u8; 32] {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(label.as_bytes());
    mac.finalize().into_bytes().into()
}

fn key_id(prefix: &str, key: &[u8; 32]) -> String {
    let digest = Sha256::digest(derive(key, "keyplane journal key id"));
    format!("{prefix}{}", hex::encode(&digest[..4]))
}

fn random() -> Result<[u8; 32], SealError> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| SealError::Io {
        path: PathBuf::from("/dev/urandom"),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(key)
}

fn seal_with(key: &[u8; 32], aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, SealError> {
    let mut nonce = [0u8; 12];
    getrandom::fill(&mut nonce).map_err(|e| SealError::Io {
        path: PathBuf::from("/dev/urandom"),
        source: std::io::Error::other(e.to_string()),
    })?;
    let cipher = ChaCha20Poly1305::new(Key::from_slice(key));
    let sealed = cipher
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad })
        .map_err(|_| SealError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other("sealing failed"),
        })?;
    let mut out = Vec::with_capacity(12 + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

fn open_with(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < 12 {
        return None;
    }
    let (nonce, body) = sealed.split_at(12);
    ChaCha20Poly1305::new(Key::from_slice(key))
        .decrypt(Nonce::from_slice(nonce), Payload { msg: body, aad })
        .ok()
}

impl JournalKey {
    fn new(key: [u8; 32]) -> JournalKey {
        JournalKey {
            id: key_id("j", &key),
            key,
        }
    }

    /// A random key (tests).
    pub fn random() -> Result<JournalKey, SealError> {
        Ok(JournalKey::new(random()?))
    }

    /// The key's id (`j` and eight hex digits): recorded in the journal, never secret.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals `plain` bound to `aad`.
    pub(crate) fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, SealError> {
        seal_with(&self.key, aad, plain)
    }

    /// Opens what [`JournalKey::seal`] sealed with the same `aad`; None if it was
    /// altered, moved to another place or sealed under another key.
    pub(crate) fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        open_with(&self.key, aad, sealed)
    }

    /// The key derived from an installer-placed key file: 64 hex digits, not readable
    /// by group or others.
    pub fn from_key_file(path: &Path) -> Result<JournalKey, SealError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |source| SealError::Io {
            path: path.to_owned(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(SealError::Exposed {
                path: path.to_owned(),
                mode: mode & 0o777,
            });
        }
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
        let mut master = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut master).map_err(|_| SealError::BadKeyFile {
            path: path.to_owned(),
        })?;
        let key = JournalKey::new(derive(&master, "keyplane journal key v1"));
        use zeroize::Zeroize;
        master.zeroize();
        Ok(key)
    }

    /// The key wrapped under the enrollment key `key_pem` in `state_dir` (made, from
    /// the development key if there is one, when an agent enrolled before journals
    /// were sealed has none yet).
    pub fn from_identity(state_dir: &Path, key_pem: &str) -> Result<JournalKey, SealError> {
        let path = state_dir.join(WRAP_FILE);
        let wraps = read_wraps(&path)?;
        if wraps.wraps.is_empty() {
            rewrap(state_dir, None, key_pem)?;
            forget_dev_key(state_dir)?;
            return JournalKey::from_identity(state_dir, key_pem);
        }
        unwrap(&wraps, key_pem)
            .map(JournalKey::new)
            .ok_or(SealError::Unwrap { path })
    }

    /// The development key beside the journal, made if missing (see the module
    /// docs: it protects nothing).
    pub fn development(state_dir: &Path) -> Result<JournalKey, SealError> {
        let path = state_dir.join(DEV_KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let text = zeroize::Zeroizing::new(text);
                let mut key = [0u8; 32];
                hex::decode_to_slice(text.trim(), &mut key)
                    .map_err(|_| SealError::BadKeyFile { path: path.clone() })?;
                Ok(JournalKey::new(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = random()?;
                write_private(
                    state_dir,
                    DEV_KEY_FILE,
                    zeroize::Zeroizing::new(hex::encode(key)).as_bytes(),
                )?;
                Ok(JournalKey::new(key))
            }
            Err(source) => Err(SealError::Io { path, source }),
        }
    }

    /// The key found in `state_dir` alone: the wrapped one when the agent is enrolled,
    /// the development key otherwise. For tools and tests that open a journal an
    /// agent left; the agent itself also honours `--journal-key-file`.
    pub fn in_state_dir(state_dir: &Path) -> Result<JournalKey, SealError> {
        let key_file = state_dir.join("identity").join("agent.key");
        match std::fs::read_to_string(&key_file) {
            Ok(pem) => JournalKey::from_identity(state_dir, &zeroize::Zeroizing::new(pem)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                JournalKey::development(state_dir)
            }
            Err(source) => Err(SealError::Io {
                path: key_file,
                source,
            }),
        }
    }
}

/// One sealing of the journal key under one enrollment key.
#[derive(Serialize, Deserialize)]
struct Wrap {
    /// Id of the key it is sealed under (derived from the enrollment key).
    kek: String,
    /// Nonce and ciphertext, hex.
    sealed: String,
}

#[derive(Default, Serialize, Deserialize)]
struct Wraps {
    wraps: Vec<Wrap>,
}

fn kek(key_pem: &str) -> ([u8; 32], String) {
    let kek = derive(key_pem.trim().as_bytes(), "keyplane journal kek v1");
    let id = key_id("w", &kek);
    (kek, id)
}

fn read_wraps(path: &Path) -> Result<Wraps, SealError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| SealError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(format!("not a key wrap file: {e}")),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Wraps::default()),
        Err(source) => Err(SealError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn unwrap(wraps: &Wraps, key_pem: &str) -> Option<[u8; 32]> {
    let (kek, id) = kek(key_pem);
    let wrap = wraps.wraps.iter().find(|w| w.kek == id)?;
    let sealed = hex::decode(&wrap.sealed).ok()?;
    let plain = zeroize::Zeroizing::new(open_with(&kek, id.as_bytes(), &sealed)?);
    <[u8; 32]>::try_from(plain.as_slice()).ok()
}

fn write_private(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), SealError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| SealError::Io { path: p, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(())
}

/// Seals the journal key under `new_pem` as well, before that key replaces
/// `old_pem` on disk (renewal, enrollment): the wrap file then opens under either,
/// so a crash between the two writes loses nothing. Older wraps are dropped. With no
/// journal key yet, the development key (if any) or a new random key becomes it.
pub fn rewrap(state_dir: &Path, old_pem: Option<&str>, new_pem: &str) -> Result<(), SealError> {
    let path = state_dir.join(WRAP_FILE);
    let wraps = read_wraps(&path)?;
    let mut kept = Vec::new();
    let journal_key = match old_pem.and_then(|old| Some((old, unwrap(&wraps, old)?))) {
        Some((old, key)) => {
            let (_, old_id) = kek(old);
            kept.extend(wraps.wraps.into_iter().filter(|w| w.kek == old_id));
            key
        }
        None if wraps.wraps.is_empty() => match std::fs::metadata(state_dir.join(DEV_KEY_FILE)) {
            Ok(_) => JournalKey::development(state_dir)?.key,
            Err(_) => random()?,
        },
        None => {
            // The previous identity cannot open the wrap: whatever it sealed is lost
            // (opening the journal says so and how to start afresh).
            tracing::warn!(
                "{} does not open under the previous agent key: a new journal key is made",
                path.display()
            );
            random()?
        }
    };
    let (new_kek, new_id) = kek(new_pem);
    let sealed = seal_with(&new_kek, new_id.as_bytes(), &journal_key)?;
    let mut journal_key = journal_key;
    use zeroize::Zeroize;
    journal_key.zeroize();
    kept.retain(|w| w.kek != new_id);
    kept.insert(
        0,
        Wrap {
            kek: new_id,
            sealed: hex::encode(sealed),
        },
    );
    let bytes = serde_json::to_vec_pretty(&Wraps { wraps: kept }).map_err(|e| SealError::Io {
        path: path.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    write_private(state_dir, WRAP_FILE, &bytes)
}

/// Removes the development key once the journal key is wrapped under an enrollment
/// key (it would otherwise stay beside the journal in clear).
pub fn forget_dev_key(state_dir: &Path) -> Result<(), SealError> {
    if read_wraps(&state_dir.join(WRAP_FILE))?.wraps.is_empty() {
        return Ok(());
    }
    let path = state_dir.join(DEV_KEY_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SealError::Io { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kp-seal-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[test]
    fn a_key_file_must_be_private_and_hold_a_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp("file");
        let file = dir.join("k");
        std::fs::write(&file, "ab".repeat(32)).expect("write");
        for (mode, ok) in [
            (0o644, false),
            (0o640, false),
            (0o604, false),
            (0o600, true),
            (0o400, true),
        ] {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let got = JournalKey::from_key_file(&file);
            assert_eq!(got.is_ok(), ok, "mode {mode:o}: {got:?}");
            if !ok {
                let msg = got.expect_err("refused").to_string();
                assert!(msg.contains("chmod 0400"), "{msg}");
            }
        }
        let a = JournalKey::from_key_file(&file).expect("key");
        assert_eq!(a.id(), JournalKey::from_key_file(&file).expect("key").id());
        assert!(!format!("{a:?}").contains(&"ab".repeat(8)));
        std::fs::write(&file, "not hex").expect("write");
        assert!(matches!(
            JournalKey::from_key_file(&file),
            Err(SealError::BadKeyFile { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_wrapped_key_survives_renewals_and_takes_over_the_development_key() {
        let dir = temp("wrap");
        let dev = JournalKey::development(&dir).expect("dev");
        let (first, _) = crate::identity::new_key_and_csr().expect("key");
        // Enrolling: the development key becomes the wrapped key, and goes.
        rewrap(&dir, None, &first).expect("wrap");
        forget_dev_key(&dir).expect("forget");
        assert!(!dir.join(DEV_KEY_FILE).exists());
        let k1 = JournalKey::from_identity(&dir, &first).expect("unwrap");
        assert_eq!(k1.id(), dev.id());
        // Renewal: the new key opens it, and so does the old one until the next.
        let (second, _) = crate::identity::new_key_and_csr().expect("key");
        rewrap(&dir, Some(&first), &second).expect("rewrap");
        assert_eq!(
            JournalKey::from_identity(&dir, &second).expect("new").id(),
            dev.id()
        );
        assert_eq!(
            JournalKey::from_identity(&dir, &first).expect("old").id(),
            dev.id()
        );
        let (third, _) = crate::identity::new_key_and_csr().expect("key");
        rewrap(&dir, Some(&second), &third).expect("rewrap");
        assert!(matches!(
            JournalKey::from_identity(&dir, &first),
            Err(SealError::Unwrap { .. })
        ));
        assert_eq!(
            JournalKey::from_identity(&dir, &third).expect("third").id(),
            dev.id()
        );
        // Sealed values are bound to their place.
        let sealed = k1.seal(b"d/1/3", b"1234").expect("seal");
        assert_eq!(k1.open(b"d/1/3", &sealed).as_deref(), Some(&b"1234"[..]));
        assert!(k1.open(b"d/1/4", &sealed).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
