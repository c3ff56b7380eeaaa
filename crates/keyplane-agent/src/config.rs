//! Start-up checks of the agent's arguments: a value that can never work is refused
//! before the agent starts, with what to pass instead, rather than retried for ever.

use crate::reconcile::{DriverFactory, SimulatorFactory};
use keyplane_core::DeviceModel;
use keyplane_core::names::SiteName;
use keyplane_devices::zwave::{ZwaveOptions, ZwaveServer};
use keyplane_devices::{DeviceDriver, DeviceError};
use std::path::PathBuf;

/// An argument the agent cannot start with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `--server` is not a URL the agent can connect to.
    #[error(
        "--server {given:?} {why}; pass a URL like https://keyplaned.example:50051 (with --server-ca-file), or http://127.0.0.1:50051 on this machine"
    )]
    Server {
        /// What was given.
        given: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An https server without the CA to verify it by.
    #[error(
        "--server uses https but no --server-ca-file is given: pass the CA certificate that signed keyplaned's certificate (ca.crt from `keyplaned ca-init`)"
    )]
    ServerCa,
    /// Enrollment over plaintext.
    #[error(
        "--enrollment-code-file needs an https --server: a client certificate is only used over TLS"
    )]
    EnrollmentNeedsTls,
    /// Nothing to authenticate with.
    #[error(
        "the agent has no certificate yet and no token: pass --enrollment-code-file with a code from AdminService/CreateEnrollmentCode (or, for now, an agent token in KEYPLANE_AGENT_TOKEN)"
    )]
    NoIdentity,
    /// No key to seal the journal with.
    #[error(
        "the agent's journal needs a key that is not kept beside it: pass --journal-key-file (KEYPLANE_JOURNAL_KEY_FILE; 64 hex digits, mode 0400 or 0600) or enroll the agent (--enrollment-code-file)"
    )]
    NoJournalKey,
    /// `--site` is not `sites/{uuid}`.
    #[error(
        "--site {given:?} is not a site name: pass sites/{{site id}}, as CreateSite returned it{hint}"
    )]
    Site {
        /// What was given.
        given: String,
        /// A suggestion, when one is obvious.
        hint: String,
    },
    /// `--token` cannot be an agent token.
    #[error(
        "the agent token {why}; issue an agent token (kpa_…) with AdminService/IssueAgentToken"
    )]
    Token {
        /// What is wrong with it.
        why: &'static str,
    },
}

/// A Z-Wave JS lock named in the agent's configuration: `NODE=DEVICE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZwaveNode {
    /// Z-Wave node id on the server.
    pub node: u16,
    /// The site device it is: its resource name `sites/…/devices/…` or just the id
    /// at its end.
    pub device: String,
}

impl std::str::FromStr for ZwaveNode {
    type Err = String;

    fn from_str(given: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "{given:?} is not NODE=DEVICE: pass the Z-Wave node id (see `keyplane-agent \
                 zwave-discover`) and the site device, e.g. 5=sites/…/devices/… or 5=<device id>"
            )
        };
        let (node, device) = given.split_once('=').ok_or_else(bad)?;
        let node: u16 = node.trim().parse().map_err(|_| bad())?;
        let device = device.trim().trim_matches('/');
        if node == 0 || device.is_empty() {
            return Err(bad());
        }
        Ok(ZwaveNode {
            node,
            device: device.to_owned(),
        })
    }
}

/// Which driver each site device gets: Z-Wave JS nodes by device, simulators for
/// every other device (when a simulator directory is given). Several kinds side by
/// side; the reconcile loop sees only [`DeviceDriver`]s.
pub struct Drivers {
    sims: Option<SimulatorFactory>,
    zwave: Option<(ZwaveServer, Vec<ZwaveNode>)>,
}

impl Drivers {
    /// Simulated devices kept in `sim_dir` (None: no simulators) and the Z-Wave JS
    /// `nodes` of the server at `zwave_url`. Starts the server connection (needs a
    /// Tokio runtime) when nodes are named.
    pub fn new(
        sim_dir: Option<PathBuf>,
        zwave_url: Option<&str>,
        nodes: Vec<ZwaveNode>,
        options: ZwaveOptions,
    ) -> Result<Drivers, String> {
        let zwave = match (zwave_url, nodes.is_empty()) {
            (_, true) => None,
            (None, false) => {
                return Err("--zwave-node needs --zwave-js (the Z-Wave JS server URL, \
                            e.g. ws://127.0.0.1:3000)"
                    .into());
            }
            (Some(url), false) => {
                if !(url.starts_with("ws://") || url.starts_with("wss://")) {
                    return Err(format!(
                        "--zwave-js {url:?} is not a WebSocket URL; pass e.g. ws://127.0.0.1:3000"
                    ));
                }
                if url.starts_with("wss://") {
                    return Err(format!(
                        "--zwave-js {url:?}: this build speaks ws:// only (Z-Wave JS servers \
                         listen on the LAN without TLS); pass ws://host:3000"
                    ));
                }
                Some((ZwaveServer::connect(url, options), nodes))
            }
        };
        if sim_dir.is_none() && zwave.is_none() {
            return Err(
                "no device drivers: pass --sim-dir and/or --zwave-js with --zwave-node".into(),
            );
        }
        Ok(Drivers {
            sims: sim_dir.map(SimulatorFactory::new),
            zwave,
        })
    }

    /// The Z-Wave JS server connection, when nodes are configured.
    pub fn zwave(&self) -> Option<&ZwaveServer> {
        self.zwave.as_ref().map(|(s, _)| s)
    }
}

impl DriverFactory for Drivers {
    fn open(
        &self,
        device: &str,
        model: &'static DeviceModel,
    ) -> Result<Box<dyn DeviceDriver>, DeviceError> {
        if let Some((server, nodes)) = &self.zwave {
            let id = device.rsplit('/').next().unwrap_or(device);
            if let Some(n) = nodes.iter().find(|n| n.device == device || n.device == id) {
                return Ok(Box::new(server.lock(n.node, device, model)));
            }
        }
        match &self.sims {
            Some(sims) => sims.open(device, model),
            None => Err(DeviceError::NotFound(format!(
                "no driver for {device}: name its Z-Wave node with --zwave-node NODE={device}"
            ))),
        }
    }
}

/// The keyplaned URL to connect to: `host:port` is read as `http://host:port`.
pub fn server_url(given: &str) -> Result<String, ConfigError> {
    let err = |why| ConfigError::Server {
        given: given.to_owned(),
        why,
    };
    let trimmed = given.trim();
    if trimmed.is_empty() {
        return Err(err("is empty"));
    }
    let url = if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("http://{trimmed}")
    };
    let uri: tonic::codegen::http::Uri = url.parse().map_err(|_| err("is not a URL"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(err("has a scheme other than http or https")),
    };
    let Some(authority) = uri.authority().filter(|a| !a.host().is_empty()) else {
        return Err(err("names no host"));
    };
    // Plaintext would hand the agent's credentials and the site's PINs to anyone on
    // the path: only a loopback server may be reached without TLS.
    if !tls && !is_loopback(authority.host()) {
        return Err(err(
            "is plaintext (http) to a host that is not this machine; use https",
        ));
    }
    // The parser keeps a malformed port and only drops it when asked for a number.
    let after_host = authority
        .as_str()
        .rsplit_once(']')
        .map_or(authority.as_str(), |(_, rest)| rest);
    if after_host.contains(':') && authority.port_u16().is_none() {
        return Err(err("has a port that is not a number from 1 to 65535"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(err("has a path; keyplaned is reached at the root"));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// Whether the (checked) server URL names this machine.
pub fn is_loopback_url(url: &str) -> bool {
    url.parse::<tonic::codegen::http::Uri>()
        .ok()
        .and_then(|u| u.host().map(is_loopback))
        .unwrap_or(false)
}

/// Whether `host` (as a URL holds it) is this machine.
fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Checks that `given` is `sites/{uuid}`.
pub fn site_name(given: &str) -> Result<String, ConfigError> {
    match SiteName::parse(given) {
        Ok(site) => Ok(site.to_string()),
        Err(_) => {
            let bare = given.trim().trim_matches('/');
            let hint = if SiteName::parse(&format!("sites/{bare}")).is_ok() {
                format!(" (did you mean sites/{bare}?)")
            } else {
                String::new()
            };
            Err(ConfigError::Site {
                given: given.to_owned(),
                hint,
            })
        }
    }
}

/// Checks that `token` can be sent as an agent token.
pub fn token(token: &str) -> Result<(), ConfigError> {
    let err = |why| Err(ConfigError::Token { why });
    if token.trim().is_empty() {
        return err("is empty");
    }
    if token.starts_with("kpd_") {
        return err("is a dealer token (kpd_…), not an agent token");
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return err("holds spaces or characters a token never has");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SITE: &str = "sites/6f1c2b9e-2d4a-4b8e-9a57-1f0d3c5e7a21";

    #[test]
    fn server_urls() {
        let ok: &[(&str, &str)] = &[
            ("http://127.0.0.1:50051", "http://127.0.0.1:50051"),
            ("127.0.0.1:50051", "http://127.0.0.1:50051"),
            ("localhost:50051", "http://localhost:50051"),
            (
                " https://keyplaned.example:443 ",
                "https://keyplaned.example:443",
            ),
            ("http://[::1]:50051/", "http://[::1]:50051"),
            ("http://127.0.0.2", "http://127.0.0.2"),
            ("https://keyplaned", "https://keyplaned"),
        ];
        for (given, want) in ok {
            assert_eq!(server_url(given).as_deref(), Ok(*want), "{given}");
        }
        let refused: &[(&str, &str)] = &[
            ("", "is empty"),
            ("   ", "is empty"),
            ("keyplaned.example:443", "plaintext (http) to a host"),
            ("http://10.0.0.5:50051", "plaintext (http) to a host"),
            ("grpc://127.0.0.1:50051", "scheme other than http"),
            ("http://127.0.0.1:50051/keyplane", "has a path"),
            ("127.0.0.1:50051/x?y", "has a path"),
            ("http://", "not a URL"),
            ("127.0.0.1:port", "port that is not a number"),
            ("http://127.0.0.1:99999", "not a number from 1 to 65535"),
            ("http://bad host:1", "not a URL"),
        ];
        for (given, want) in refused {
            let e = server_url(given).expect_err(given).to_string();
            assert!(e.contains(want), "{given}: {e}");
            assert!(
                e.contains("http://127.0.0.1:50051"),
                "says what to pass: {e}"
            );
        }
    }

    #[test]
    fn site_names() {
        assert_eq!(site_name(SITE).as_deref(), Ok(SITE));
        let bare = SITE.trim_start_matches("sites/");
        let cases: &[(&str, Option<&str>)] = &[
            (bare, Some(SITE)),
            ("", None),
            ("sites/", None),
            ("sites/not-a-uuid", None),
            ("site/6f1c2b9e-2d4a-4b8e-9a57-1f0d3c5e7a21", None),
            (&format!("{SITE}/devices/x"), None),
        ];
        for (given, suggestion) in cases {
            let e = site_name(given).expect_err(given).to_string();
            assert!(e.contains("pass sites/{site id}"), "{given}: {e}");
            match suggestion {
                Some(s) => assert!(e.contains(&format!("did you mean {s}?")), "{e}"),
                None => assert!(!e.contains("did you mean"), "{e}"),
            }
        }
    }

    #[test]
    fn zwave_nodes() {
        assert_eq!(
            "5=sites/s/devices/d".parse(),
            Ok(ZwaveNode {
                node: 5,
                device: "sites/s/devices/d".into()
            })
        );
        assert_eq!(
            " 12 = abc "
                .parse::<ZwaveNode>()
                .map(|n| (n.node, n.device)),
            Ok((12, "abc".into()))
        );
        for bad in ["5", "=d", "x=d", "0=d", "5=", "70000=d"] {
            let e = bad.parse::<ZwaveNode>().expect_err(bad);
            assert!(e.contains("NODE=DEVICE"), "{e}");
        }
    }

    #[test]
    fn drivers_need_one_kind_and_a_server_for_zwave_nodes() {
        let node = || {
            vec![ZwaveNode {
                node: 2,
                device: "d".into(),
            }]
        };
        let options = ZwaveOptions::default;
        // No simulator directory in any of these.
        let cases: Vec<(Option<&str>, Vec<ZwaveNode>, &str)> = vec![
            (None, vec![], "no device drivers"),
            (Some("ws://127.0.0.1:3000"), vec![], "no device drivers"),
            (None, node(), "--zwave-node needs --zwave-js"),
            (Some("http://127.0.0.1:3000"), node(), "not a WebSocket URL"),
            (Some("wss://127.0.0.1:3000"), node(), "ws:// only"),
        ];
        for (url, nodes, want) in cases {
            let e = Drivers::new(None, url, nodes, options())
                .err()
                .expect("refused");
            assert!(e.contains(want), "{e}");
        }
        let sims_only = Drivers::new(Some("/nonexistent".into()), None, vec![], options());
        assert!(sims_only.is_ok_and(|d| d.zwave().is_none()));
    }

    #[test]
    fn tokens() {
        assert_eq!(token("kpa_0123abcd"), Ok(()));
        for (given, want) in [
            ("", "is empty"),
            ("kpd_0123abcd", "dealer token"),
            ("kpa_01 23", "characters"),
            ("kpa_0123\n", "characters"),
        ] {
            let e = token(given).expect_err(given).to_string();
            assert!(e.contains(want), "{given:?}: {e}");
            assert!(e.contains("IssueAgentToken"), "{e}");
        }
    }
}
