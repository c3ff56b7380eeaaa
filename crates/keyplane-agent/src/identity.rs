//! The agent's own identity: a key generated here (it never leaves the machine) and
//! the client certificate keyplaned's CA issued for it at enrollment, kept in
//! `STATE_DIR/identity/` (key mode 0600).
//!
//! Lifetime: what the server says (30 days today). The agent renews over mutual TLS
//! once two thirds of it have passed; an agent offline past expiry keeps enforcing
//! its journal and enrolls again, with a new code, when it can reach keyplaned.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Why the identity could not be made, read or written.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The stored identity or a new key did not make sense.
    #[error("{0}")]
    Invalid(String),
}

/// A key and the certificate issued for it. Debug never shows the key.
#[derive(Clone)]
pub struct Identity {
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
    /// The client certificate, PEM.
    pub cert_pem: String,
    /// What the server recorded about it.
    pub meta: IdentityMeta,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

/// The certificate's names and lifetime, as the server returned them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityMeta {
    /// `agents/{id}`.
    pub agent: String,
    /// `sites/{id}`.
    pub site: String,
    /// When the certificate was received (seconds since the epoch).
    pub issue_unix: u64,
    /// When it expires (seconds since the epoch).
    pub expire_unix: u64,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl IdentityMeta {
    /// Whether the certificate has expired at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        unix(now) >= self.expire_unix
    }

    /// Whether two thirds of its life have passed at `now`: time to renew.
    pub fn due_for_renewal(&self, now: SystemTime) -> bool {
        let life = self.expire_unix.saturating_sub(self.issue_unix);
        unix(now) >= self.issue_unix + life * 2 / 3
    }

    /// When it expires.
    pub fn expire_time(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.expire_unix)
    }
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("identity")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A new key and a certificate signing request for it: (key PEM, CSR DER).
pub fn new_key_and_csr() -> Result<(String, Vec<u8>), IdentityError> {
    let invalid = |e: rcgen::Error| IdentityError::Invalid(format!("new agent key: {e}"));
    let key = rcgen::KeyPair::generate().map_err(invalid)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(invalid)?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "keyplane-agent");
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).map_err(invalid)?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// The stored identity, if any.
pub fn load(state_dir: &Path) -> Result<Option<Identity>, IdentityError> {
    let d = dir(state_dir);
    let meta_path = d.join("agent.json");
    if !meta_path.exists() {
        return Ok(None);
    }
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).map_err(|source| IdentityError::Io { path: p, source })
    };
    let meta: IdentityMeta = serde_json::from_str(&read(meta_path.clone())?)
        .map_err(|e| IdentityError::Invalid(format!("{}: {e}", meta_path.display())))?;
    Ok(Some(Identity {
        key_pem: read(d.join("agent.key"))?,
        cert_pem: read(d.join("agent.crt"))?,
        meta,
    }))
}

/// Stores `identity`, replacing the previous one; the key file is mode 0600. Each
/// file is written whole, then renamed into place.
pub fn save(state_dir: &Path, identity: &Identity) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let d = dir(state_dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&d)
        .map_err(io(&d))?;
    let meta = serde_json::to_string_pretty(&identity.meta)
        .map_err(|e| IdentityError::Invalid(e.to_string()))?;
    // The journal key is sealed under the new key too before the new key replaces
    // the old one, so a crash in between leaves a journal either key opens.
    let old = load(state_dir)?;
    crate::seal::rewrap(
        state_dir,
        old.as_ref().map(|o| o.key_pem.as_str()),
        &identity.key_pem,
    )
    .map_err(|e| IdentityError::Invalid(format!("sealing the journal key: {e}")))?;
    // Metadata last: a half-written identity without it is not loaded.
    for (name, text, mode) in [
        ("agent.key", identity.key_pem.as_str(), 0o600),
        ("agent.crt", identity.cert_pem.as_str(), 0o644),
        ("agent.json", meta.as_str(), 0o644),
    ] {
        let path = d.join(name);
        let tmp = d.join(format!("{name}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(text.as_bytes()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
    }
    crate::seal::forget_dev_key(state_dir).map_err(|e| {
        IdentityError::Invalid(format!("removing the development journal key: {e}"))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_two_thirds_of_the_life() {
        let meta = IdentityMeta {
            agent: "agents/a".into(),
            site: "sites/s".into(),
            issue_unix: 3_000,
            expire_unix: 6_000,
        };
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        for (now, due, expired) in [
            (3_000, false, false),
            (4_999, false, false),
            (5_000, true, false),
            (5_999, true, false),
            (6_000, true, true),
        ] {
            assert_eq!(meta.due_for_renewal(at(now)), due, "{now}");
            assert_eq!(meta.expired(at(now)), expired, "{now}");
        }
    }

    #[test]
    fn an_identity_round_trips_and_its_key_is_private() {
        let state = std::env::temp_dir().join(format!("keyplane-id-{}", std::process::id()));
        assert!(load(&state).expect("load").is_none());
        let (key_pem, csr) = new_key_and_csr().expect("key");
        assert!(!csr.is_empty());
        let identity = Identity {
            key_pem,
            cert_pem: "cert".into(),
            meta: IdentityMeta {
                agent: "agents/a".into(),
                site: "sites/s".into(),
                issue_unix: 1,
                expire_unix: 2,
            },
        };
        save(&state, &identity).expect("save");
        save(&state, &identity).expect("save again");
        let loaded = load(&state).expect("load").expect("some");
        assert_eq!(loaded.meta, identity.meta);
        assert_eq!(loaded.key_pem, identity.key_pem);
        assert!(!format!("{loaded:?}").contains("PRIVATE KEY"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.join("identity/agent.key"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&state).expect("cleanup");
    }
}
