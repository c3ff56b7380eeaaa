//! keyplaned's certificate authority and TLS material.
//!
//! The CA signs the agents' client certificates (from a CSR: the agent's key never
//! leaves the agent) and, for convenience, keyplaned's own server certificate
//! (`keyplaned ca-init --server-name`). Like the PIN key, every replica loads the same
//! CA key; the database records the CA key id so a replica with another one refuses
//! to start. Keys are ECDSA P-256, signed with ring.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use uuid::Uuid;

/// How long an agent's client certificate is valid.
pub const AGENT_CERT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long the CA certificate made by `ca-init` is valid.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a server certificate made by `ca-init` is valid.
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(397 * 24 * 3600);
/// Certificates start this long before they are made, for clocks slightly behind.
const BACKDATE: Duration = Duration::from_secs(300);

/// Why CA material could not be made, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A key, certificate or CSR did not parse or could not be signed.
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

fn invalid(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |e| PkiError::Invalid(format!("{what}: {e}"))
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| PkiError::Invalid(format!("random serial: {e}")))?;
    // Positive and non-zero as DER INTEGER serials must be.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn validity(params: &mut CertificateParams, now: SystemTime, lifetime: Duration) {
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + lifetime).into();
}

/// The id of a CA key: what the database records and errors name.
pub fn ca_key_id(key: &KeyPair) -> String {
    let digest = Sha256::digest(key.subject_public_key_info());
    format!("ca-{}", hex::encode(&digest[..8]))
}

/// The loaded certificate authority: signs agent certificates.
pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_id: String,
    agent_lifetime: Duration,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("CertAuthority")
            .field("key_id", &self.key_id)
            .finish()
    }
}

/// A signed agent certificate.
#[derive(Debug, Clone)]
pub struct AgentCert {
    /// PEM of the certificate.
    pub pem: String,
    /// SHA-256 of its DER: how the server recognizes it on a connection.
    pub sha256: Vec<u8>,
    /// When it stops being valid.
    pub not_after: SystemTime,
}

impl CertAuthority {
    /// Loads the CA from its key and certificate (PEM); refuses a certificate that
    /// does not belong to the key.
    pub fn from_pem(key_pem: &str, cert_pem: &str) -> Result<CertAuthority, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(invalid("CA key"))?;
        let cert = rustls_pki_cert(cert_pem)?;
        if !cert_holds_key(&cert, &key) {
            return Err(PkiError::Invalid(
                "the CA certificate does not belong to the CA key (pass the ca.crt written with this ca.key)"
                    .into(),
            ));
        }
        let key_id = ca_key_id(&key);
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(invalid("CA certificate"))?;
        Ok(CertAuthority {
            issuer,
            cert_pem: cert_pem.to_owned(),
            key_id,
            agent_lifetime: AGENT_CERT_LIFETIME,
        })
    }

    /// Loads the CA from files.
    pub fn load(key_file: &Path, cert_file: &Path) -> Result<CertAuthority, PkiError> {
        let key = std::fs::read_to_string(key_file).map_err(io(key_file))?;
        let cert = std::fs::read_to_string(cert_file).map_err(io(cert_file))?;
        CertAuthority::from_pem(&key, &cert)
    }

    /// Issues agent certificates valid for `lifetime` instead of
    /// [`AGENT_CERT_LIFETIME`] (tests of renewal).
    pub fn with_agent_lifetime(mut self, lifetime: Duration) -> CertAuthority {
        self.agent_lifetime = lifetime;
        self
    }

    /// The CA key id (see [`ca_key_id`]).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The CA certificate (PEM): what agents and servers trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs a client certificate naming `agent` for the public key of `csr_der`.
    /// Only the key is taken from the CSR (after checking its signature, which proves
    /// the agent holds the private key); names, usages and lifetime are the CA's.
    pub fn sign_agent(
        &self,
        csr_der: &[u8],
        agent: Uuid,
        now: SystemTime,
    ) -> Result<AgentCert, PkiError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(invalid("certificate signing request"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("agents/{agent}"));
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            format!("urn:keyplane:agent:{agent}")
                .try_into()
                .map_err(|e| PkiError::Invalid(format!("agent name: {e}")))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, now, self.agent_lifetime);
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(invalid("signing the agent certificate"))?;
        Ok(AgentCert {
            pem: cert.pem(),
            sha256: Sha256::digest(cert.der()).to_vec(),
            not_after: now + self.agent_lifetime,
        })
    }

    /// Signs a server certificate for `names` (DNS names or IP addresses) with a new
    /// key; returns (certificate PEM, key PEM).
    pub fn sign_server(&self, names: &[String]) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate().map_err(invalid("server key"))?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(invalid("server names"))?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_else(|| "keyplaned".into()),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, SystemTime::now(), SERVER_CERT_LIFETIME);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(invalid("signing the server certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

fn rustls_pki_cert(pem: &str) -> Result<rustls::pki_types::CertificateDer<'static>, PkiError> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::Invalid(format!("CA certificate: {e}")))
}

/// Whether the certificate's public key is `key`'s (its SPKI appears in the DER).
fn cert_holds_key(cert: &[u8], key: &KeyPair) -> bool {
    let spki = key.subject_public_key_info();
    cert.windows(spki.len()).any(|w| w == spki.as_slice())
}

/// Makes a new CA; returns (key PEM, certificate PEM).
pub fn new_ca(common_name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(invalid("CA key"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial()?);
    validity(&mut params, SystemTime::now(), CA_LIFETIME);
    let cert = params
        .self_signed(&key)
        .map_err(invalid("CA certificate"))?;
    Ok((key.serialize_pem(), cert.pem()))
}

/// Files written by [`ca_init`].
#[derive(Debug)]
pub struct CaFiles {
    /// The CA key (mode 0600): back it up; every replica needs it.
    pub key: PathBuf,
    /// The CA certificate: agents and servers trust it.
    pub cert: PathBuf,
    /// The server certificate and key, when server names were given.
    pub server: Option<(PathBuf, PathBuf)>,
    /// The CA key id.
    pub key_id: String,
}

/// Creates `dir` (mode 0700) holding a new CA (`ca.key`, `ca.crt`) and, for each of
/// `server_names`, a server certificate (`server.crt`, `server.key`). Never
/// overwrites: an existing file is an error and nothing is written.
pub fn ca_init(dir: &Path, server_names: &[String]) -> Result<CaFiles, PkiError> {
    use std::os::unix::fs::DirBuilderExt;
    let key = dir.join("ca.key");
    let cert = dir.join("ca.crt");
    let server =
        (!server_names.is_empty()).then(|| (dir.join("server.crt"), dir.join("server.key")));
    let mut all = vec![key.clone(), cert.clone()];
    if let Some((c, k)) = &server {
        all.extend([c.clone(), k.clone()]);
    }
    if let Some(existing) = all.iter().find(|p| p.exists()) {
        return Err(PkiError::Invalid(format!(
            "{} already exists: CA files are never overwritten (agents' certificates would stop working)",
            existing.display()
        )));
    }
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
    }
    let (key_pem, cert_pem) = new_ca("keyplaned agent CA")?;
    let ca = CertAuthority::from_pem(&key_pem, &cert_pem)?;
    write_new(&key, &key_pem, 0o600)?;
    write_new(&cert, &cert_pem, 0o644)?;
    if let Some((c, k)) = &server {
        let (server_cert, server_key) = ca.sign_server(server_names)?;
        write_new(k, &server_key, 0o600)?;
        write_new(c, &server_cert, 0o644)?;
    }
    Ok(CaFiles {
        key,
        cert,
        server,
        key_id: ca.key_id().to_owned(),
    })
}

/// Writes a file that must not exist yet.
pub fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    f.write_all(text.as_bytes()).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_signs_only_the_key_of_a_csr() {
        let (key, cert) = new_ca("test CA").expect("ca");
        let ca = CertAuthority::from_pem(&key, &cert).expect("load");
        assert!(ca.key_id().starts_with("ca-"));
        let agent_key = KeyPair::generate().expect("key");
        let mut asked = CertificateParams::new(vec!["evil.example".to_owned()]).expect("params");
        asked.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = asked.serialize_request(&agent_key).expect("csr");
        let agent = Uuid::new_v4();
        let signed = ca
            .sign_agent(csr.der(), agent, SystemTime::now())
            .expect("sign");
        let der = rustls_pki_cert(&signed.pem).expect("pem");
        let text = String::from_utf8_lossy(&der);
        assert!(text.contains(&format!("agents/{agent}")));
        assert!(
            !text.contains("evil.example"),
            "the CSR's names are ignored"
        );
        assert!(cert_holds_key(&der, &agent_key));

        let (other_key, _) = new_ca("other").expect("ca");
        let mixed = CertAuthority::from_pem(&other_key, &cert).expect_err("mismatch");
        assert!(mixed.to_string().contains("does not belong"), "{mixed}");
        assert!(
            ca.sign_agent(b"not a csr", agent, SystemTime::now())
                .is_err()
        );
    }

    #[test]
    fn ca_init_never_overwrites() {
        let dir = std::env::temp_dir().join(format!("keyplane-ca-{}", Uuid::new_v4()));
        let files = ca_init(&dir.join("ca"), &["localhost".into()]).expect("init");
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("ca")), 0o700);
        assert_eq!(mode(&files.key), 0o600);
        let before = std::fs::read(&files.key).expect("read");
        assert!(ca_init(&dir.join("ca"), &[]).is_err());
        assert_eq!(std::fs::read(&files.key).expect("read"), before);
        let loaded = CertAuthority::load(&files.key, &files.cert).expect("load");
        assert_eq!(loaded.key_id(), files.key_id);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
