//! PostgreSQL TLS: the `sslmode` and `sslrootcert` of the database URL, honoured with
//! rustls (ring provider).
//!
//! Supported modes:
//! - `disable`: plaintext.
//! - `prefer` (the default): TLS verified against `sslrootcert` when the server offers
//!   it, plaintext otherwise; without `sslrootcert` nothing could be verified, so it
//!   connects in plaintext (like `disable`).
//! - `require` and `verify-full`: TLS only, the server's certificate verified against
//!   `sslrootcert` *and its host name checked*. This `require` is stricter than
//!   libpq's (which encrypts without verifying): an unverified server could be anyone.
//!
//! `verify-ca` and `allow` are refused with what to use instead; client certificates
//! (`sslcert`/`sslkey`) are not supported.

use crate::StoreError;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::str::FromStr;
use std::sync::Arc;
use tokio_postgres::config::SslMode;

/// How the pool reaches PostgreSQL: a parsed config and, when TLS may be used, the
/// connector that verifies the server.
pub(crate) struct PgConnect {
    pub(crate) config: tokio_postgres::Config,
    pub(crate) tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

/// The TLS options of a connection string, taken out before tokio-postgres (which
/// knows neither `verify-full` nor `sslrootcert`) parses the rest.
#[derive(Debug, Default, PartialEq, Eq)]
struct SslOptions {
    mode: Option<String>,
    root_cert: Option<String>,
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = bytes.get(i + 1..i + 3)
            && let Ok(hex) = std::str::from_utf8(hex)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits the TLS options off `url` (URL or key=value form); returns the rest.
fn split_ssl_options(url: &str) -> (String, SslOptions) {
    let mut options = SslOptions::default();
    let mut take = |key: &str, value: String| match key {
        "sslmode" => {
            options.mode = Some(value);
            true
        }
        "sslrootcert" => {
            options.root_cert = Some(value);
            true
        }
        _ => false,
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_owned(), options);
        };
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                !take(k, percent_decode(v))
            })
            .collect();
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        (rest, options)
    } else {
        let kept: Vec<&str> = url
            .split_whitespace()
            .filter(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                !take(k.trim(), v.trim().to_owned())
            })
            .collect();
        (kept.join(" "), options)
    }
}

fn client_config(root_cert: &str) -> Result<rustls::ClientConfig, StoreError> {
    let invalid = |why: String| StoreError::InvalidArgument(format!("database url: {why}"));
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(root_cert)
        .map_err(|e| invalid(format!("sslrootcert {root_cert}: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(format!("sslrootcert {root_cert}: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "sslrootcert {root_cert} holds no PEM certificate"
        )));
    }
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| invalid(format!("sslrootcert {root_cert}: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Internal(format!("TLS versions: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Parses `url` and decides how to reach the database (see the module doc).
pub(crate) fn pg_connect(url: &str) -> Result<PgConnect, StoreError> {
    let (rest, options) = split_ssl_options(url);
    let invalid = |why: String| StoreError::InvalidArgument(format!("database url: {why}"));
    let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| invalid(e.to_string()))?;
    let mode = options.mode.as_deref().unwrap_or("prefer");
    let (ssl_mode, needs_roots) = match mode {
        "disable" => (SslMode::Disable, false),
        "prefer" => (SslMode::Prefer, false),
        "require" | "verify-full" => (SslMode::Require, true),
        "verify-ca" => {
            return Err(invalid(
                "sslmode=verify-ca is not supported (the host name is always checked): use sslmode=verify-full".into(),
            ));
        }
        other => {
            return Err(invalid(format!(
                "sslmode={other} is not supported: use disable, prefer, require or verify-full"
            )));
        }
    };
    config.ssl_mode(ssl_mode);
    let tls = match (&options.root_cert, ssl_mode) {
        (_, SslMode::Disable) => None,
        (Some(file), _) => Some(tokio_postgres_rustls::MakeRustlsConnect::new(
            client_config(file)?,
        )),
        (None, _) if needs_roots => {
            return Err(invalid(format!(
                "sslmode={mode} verifies the server's certificate: add sslrootcert=/path/to/ca.pem (the CA that signed PostgreSQL's certificate)"
            )));
        }
        (None, _) => {
            // prefer with nothing to verify against: plaintext, as documented.
            config.ssl_mode(SslMode::Disable);
            None
        }
    };
    Ok(PgConnect { config, tls })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_options_are_split_off() {
        let cases = [
            (
                "postgres://u@h:5/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
                "postgres://u@h:5/db?application_name=x",
                Some("verify-full"),
                Some("/etc/ca.pem"),
            ),
            ("postgres://u@h/db", "postgres://u@h/db", None, None),
            (
                "postgres://u@h/db?sslmode=disable",
                "postgres://u@h/db",
                Some("disable"),
                None,
            ),
            (
                "host=h user=u sslmode=require sslrootcert=/ca.pem",
                "host=h user=u",
                Some("require"),
                Some("/ca.pem"),
            ),
        ];
        for (url, rest, mode, root) in cases {
            let (r, o) = split_ssl_options(url);
            assert_eq!(r, rest, "{url}");
            assert_eq!(o.mode.as_deref(), mode, "{url}");
            assert_eq!(o.root_cert.as_deref(), root, "{url}");
        }
    }

    #[test]
    fn modes() {
        let plain = |url: &str| {
            let c = pg_connect(url).expect(url);
            (c.config.get_ssl_mode(), c.tls.is_some())
        };
        assert_eq!(plain("postgres://u@h/db"), (SslMode::Disable, false));
        assert_eq!(
            plain("postgres://u@h/db?sslmode=prefer"),
            (SslMode::Disable, false)
        );
        assert_eq!(
            plain("postgres://u@h/db?sslmode=disable"),
            (SslMode::Disable, false)
        );
        for (url, words) in [
            ("postgres://u@h/db?sslmode=require", "add sslrootcert"),
            ("postgres://u@h/db?sslmode=verify-full", "add sslrootcert"),
            (
                "postgres://u@h/db?sslmode=verify-ca",
                "use sslmode=verify-full",
            ),
            ("postgres://u@h/db?sslmode=allow", "not supported"),
            (
                "postgres://u@h/db?sslmode=require&sslrootcert=/nonexistent/ca.pem",
                "/nonexistent/ca.pem",
            ),
        ] {
            let e = pg_connect(url).err().expect(url).to_string();
            assert!(e.contains(words), "{url}: {e}");
        }
    }
}
