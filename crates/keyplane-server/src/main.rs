//! `keyplaned`: the keyplane central service.

use anyhow::Context;
use clap::{Parser, Subcommand};
use keyplane_store::{PinKey, Store};
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "keyplaned", version, about = "keyplane central service")]
struct Cli {
    /// PostgreSQL URL.
    #[arg(long, env = "KEYPLANE_DATABASE_URL", global = true)]
    database_url: Option<String>,
    /// Log lines as `text` or `json` (one object a line; a call's lines carry its
    /// method, request id, dealer, site and trace id). Level from RUST_LOG.
    #[arg(long, env = "KEYPLANE_LOG_FORMAT", global = true, default_value_t = keyplane_telemetry::LogFormat::Text)]
    log_format: keyplane_telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "KEYPLANE_LISTEN", default_value = "127.0.0.1:50051")]
        listen: String,
        /// File holding the PIN sealing key (create it with `keyplaned keygen`).
        #[arg(long, env = "KEYPLANE_PIN_KEY_FILE")]
        pin_key_file: Option<PathBuf>,
        /// Database connection pool size.
        #[arg(long, env = "KEYPLANE_MAX_CONNECTIONS", default_value_t = 32)]
        max_connections: usize,
        /// Seconds in-flight calls get to finish after SIGTERM or SIGINT; streams end
        /// at once with UNAVAILABLE, and keyplaned exits by then.
        #[arg(long, env = "KEYPLANE_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
        shutdown_grace_secs: u64,
        /// The server's TLS certificate chain (PEM). Without it keyplaned serves
        /// plaintext, and only on a loopback address.
        #[arg(long, env = "KEYPLANE_TLS_CERT_FILE", requires = "tls_key_file")]
        tls_cert_file: Option<PathBuf>,
        /// The server's TLS private key (PEM).
        #[arg(long, env = "KEYPLANE_TLS_KEY_FILE", requires = "tls_cert_file")]
        tls_key_file: Option<PathBuf>,
        /// The agent certificate authority's key (create it with `keyplaned ca-init`);
        /// every replica needs the same one.
        #[arg(long, env = "KEYPLANE_CA_KEY_FILE")]
        ca_key_file: Option<PathBuf>,
        /// The CA certificate; defaults to ca.crt beside the CA key.
        #[arg(long, env = "KEYPLANE_CA_CERT_FILE")]
        ca_cert_file: Option<PathBuf>,
        /// Skew between an agent's clock and this server's beyond which GetSyncStatus
        /// raises `clock_skew` and an event is recorded (seconds).
        #[arg(long, env = "KEYPLANE_CLOCK_SKEW_THRESHOLD_SECS", default_value_t = 30)]
        clock_skew_threshold_secs: u64,
        /// The oldest agent protocol served: the current one or the one before
        /// (default). Older agents are refused with FAILED_PRECONDITION naming it.
        #[arg(long, env = "KEYPLANE_MIN_AGENT_PROTOCOL",
              default_value_t = keyplane_core::compat::MIN_PROTOCOL_VERSION,
              value_parser = clap::value_parser!(i32).range(
                  i64::from(keyplane_core::compat::MIN_PROTOCOL_VERSION)
                      ..=i64::from(keyplane_core::compat::PROTOCOL_VERSION)))]
        min_agent_protocol: i32,
        /// Change log rows kept per site (one per slot and revision); an agent
        /// behind them is sent a snapshot. At least 1000.
        #[arg(long, env = "KEYPLANE_CHANGE_LOG_ROWS", default_value_t = 100_000,
              value_parser = clap::value_parser!(i64).range(1000..))]
        change_log_rows: i64,
        /// Days of changes kept per site; an agent offline longer is sent a snapshot.
        #[arg(long, env = "KEYPLANE_CHANGE_LOG_DAYS", default_value_t = 30,
              value_parser = clap::value_parser!(u64).range(1..))]
        change_log_days: u64,
        /// Serve Prometheus metrics on this address (`GET /metrics`, plain HTTP), e.g.
        /// 0.0.0.0:9464. Unset: not served.
        #[arg(long, env = "KEYPLANE_METRICS_LISTEN")]
        metrics_listen: Option<String>,
        /// Agent sessions opened at once (Hello until the first update is read); a
        /// Hello that finds no place within --agent-open-wait-ms is refused with
        /// RESOURCE_EXHAUSTED and its agent retries after its backoff, so a reconnect
        /// storm does not take the database pool from writes. At most a quarter of
        /// --max-connections is sensible.
        #[arg(long, env = "KEYPLANE_AGENT_OPENS_MAX", default_value_t = 8,
              value_parser = clap::value_parser!(u32).range(1..))]
        agent_opens_max: u32,
        /// How long a Hello waits for a place among the sessions being opened.
        #[arg(long, env = "KEYPLANE_AGENT_OPEN_WAIT_MS", default_value_t = 10000)]
        agent_open_wait_ms: u64,
        /// Do not name written sites to other replicas (NOTIFY after commit) nor
        /// listen for theirs: streams held by other replicas then learn of a change
        /// from their poll (every 250 ms), not at once.
        #[arg(long, env = "KEYPLANE_NO_NOTIFY")]
        no_notify: bool,
        /// Where the wake-up listener connects instead of the database URL (set it in
        /// the environment when it holds a password): LISTEN needs a session of its
        /// own, which a transaction-pooling PgBouncer does not keep, so point it past
        /// PgBouncer at PostgreSQL.
        #[arg(long, env = "KEYPLANE_LISTEN_DATABASE_URL")]
        listen_database_url: Option<String>,
    },
    /// Create the agent certificate authority in a new directory (mode 0700): ca.key
    /// (0600) and ca.crt, and with --server-name a server certificate signed by it
    /// (server.crt, server.key). Never overwrites.
    CaInit {
        /// The directory to create.
        #[arg(long)]
        out: PathBuf,
        /// DNS names or IP addresses the server certificate is for (repeatable).
        #[arg(long)]
        server_name: Vec<String>,
    },
    /// Create a new PIN sealing key file (mode 0600) and print its key id.
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
        /// Start a rotation: also copy the keys of this key file into the new one, after
        /// the new key (which becomes the current key; the old ones stay readable).
        #[arg(long)]
        keep_from: Option<PathBuf>,
    },
    /// Print the key ids of a PIN key file (what the database records and errors name):
    /// the current key, then any older ones.
    KeyId {
        /// The key file.
        #[arg(long, env = "KEYPLANE_PIN_KEY_FILE")]
        pin_key_file: PathBuf,
    },
    /// Re-seal every PIN under the key file's current key and rebuild every PIN hash,
    /// one site per transaction, while keyplaned serves; afterwards the older keys can
    /// be removed from the key file. Run it once every replica serves with the new key
    /// file (see docs/SECURITY.md, "Rotating the PIN key").
    RotateKeys {
        /// The key file: the new key first, the old ones after it.
        #[arg(long, env = "KEYPLANE_PIN_KEY_FILE")]
        pin_key_file: Option<PathBuf>,
        /// Sites listed per round (each site is still its own transaction).
        #[arg(long, default_value_t = 50)]
        batch: usize,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Create a dealer and print its first API token.
    BootstrapDealer {
        /// The dealer's name.
        #[arg(long)]
        display_name: String,
    },
    /// Create a demo site through the API of a running server; prints its names.
    DemoSeed {
        /// Server URL.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        /// File holding the dealer token (or set KEYPLANE_TOKEN; never on the command line,
        /// where every local user can read it).
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
}

/// Whether a connection string carries a password.
fn has_password(url: &str) -> bool {
    if let Some((_, rest)) = url.split_once("://") {
        let userinfo = rest.split(['/', '?']).next().unwrap_or("");
        return userinfo
            .rsplit_once('@')
            .is_some_and(|(user, _)| user.contains(':'))
            || rest.contains("password=");
    }
    url.split_whitespace().any(|kv| kv.starts_with("password="))
}

fn database_url(cli: &Cli) -> anyhow::Result<String> {
    // argv is readable by every local user: a password belongs in the environment.
    let on_command_line =
        std::env::args().any(|a| a == "--database-url" || a.starts_with("--database-url="));
    if on_command_line && cli.database_url.as_deref().is_some_and(has_password) {
        anyhow::bail!(
            "--database-url holds a password, which every local user could read in the process list: \
             set KEYPLANE_DATABASE_URL (or DATABASE_URL) instead"
        );
    }
    cli.database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .context("set --database-url, KEYPLANE_DATABASE_URL or DATABASE_URL")
}

/// A secret from a file (trimmed) or, failing that, the environment variable `env`.
fn secret(file: Option<&Path>, env: &str) -> anyhow::Result<Option<String>> {
    if let Some(path) = file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        return Ok(Some(text.trim().to_owned()));
    }
    Ok(std::env::var(env).ok().filter(|v| !v.trim().is_empty()))
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The key `serve` must use. There is no default and nothing is created here: a
/// replica that made up its own key would seal PINs no other replica can open.
fn load_key(pin_key: Option<&str>, pin_key_file: Option<&Path>) -> anyhow::Result<PinKey> {
    if let Some(hex_key) = pin_key {
        return PinKey::from_hex(hex_key).context("KEYPLANE_PIN_KEY / --pin-key");
    }
    let Some(path) = pin_key_file else {
        anyhow::bail!(
            "no PIN sealing key configured: create one with `keyplaned keygen --out /etc/keyplane/pin.key` \
             (back it up), then pass --pin-key-file /etc/keyplane/pin.key or set KEYPLANE_PIN_KEY_FILE"
        );
    };
    if !path.exists() {
        anyhow::bail!(
            "PIN key file {} does not exist: create it with `keyplaned keygen --out {}` for a new \
             installation, or copy the key file the other replicas use (every replica needs the same key)",
            path.display(),
            path.display()
        );
    }
    warn_if_readable_by_others(path);
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    PinKey::from_hex(&text).with_context(|| format!("PIN key in {}", path.display()))
}

/// A key file (PIN, TLS or CA key) opens too much: say so when anyone but its owner
/// may read it.
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "this key file is readable by other users: chmod 600 it"
        );
    }
}

fn keygen(out: &Path, older: Option<&str>) -> anyhow::Result<PinKey> {
    if out.exists() {
        anyhow::bail!(
            "{} already exists: a key file is never overwritten (PINs sealed with it would be lost)",
            out.display()
        );
    }
    if let Some(dir) = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("random key: {e}"))?;
    // One key a line, the current one first; older keys follow during a rotation.
    let mut text = format!("{}\n", hex::encode(bytes));
    if let Some(older) = older {
        text.push_str(older.trim());
        text.push('\n');
    }
    write_private(out, &text)?;
    PinKey::from_hex(&text).map_err(Into::into)
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

async fn shutdown_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    token.cancel();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Held to the end of main: dropping it sends the spans still buffered.
    let _telemetry = keyplane_telemetry::init_with("keyplaned", cli.log_format);
    match &cli.command {
        Command::Serve {
            listen,
            pin_key_file,
            max_connections,
            shutdown_grace_secs,
            tls_cert_file,
            tls_key_file,
            ca_key_file,
            ca_cert_file,
            clock_skew_threshold_secs,
            min_agent_protocol,
            change_log_rows,
            change_log_days,
            metrics_listen,
            agent_opens_max,
            agent_open_wait_ms,
            no_notify,
            listen_database_url,
        } => {
            // Hex keys only from the environment: argv is visible to every local user.
            let pin_key = std::env::var("KEYPLANE_PIN_KEY").ok();
            let key = load_key(pin_key.as_deref(), pin_key_file.as_deref())?;
            let mut config = keyplane_server::Config::new(database_url(&cli)?, key);
            config.max_connections = *max_connections;
            config.shutdown_grace = std::time::Duration::from_secs(*shutdown_grace_secs);
            config.clock_skew_threshold =
                std::time::Duration::from_secs(*clock_skew_threshold_secs);
            config.min_agent_protocol = *min_agent_protocol;
            config.metrics_listen = metrics_listen.clone();
            config.agent_opens = (
                usize::try_from(*agent_opens_max).unwrap_or(usize::MAX),
                std::time::Duration::from_millis(*agent_open_wait_ms),
            );
            config.notify = !*no_notify;
            if listen_database_url.as_deref().is_some_and(has_password)
                && std::env::args().any(|a| a.starts_with("--listen-database-url"))
            {
                anyhow::bail!(
                    "--listen-database-url holds a password, which every local user could read in the process list: \
                     set KEYPLANE_LISTEN_DATABASE_URL instead"
                );
            }
            config.listen_url = listen_database_url.clone();
            config.change_window = keyplane_store::ChangeWindow {
                rows: *change_log_rows,
                age: std::time::Duration::from_secs(change_log_days.saturating_mul(86_400)),
            };
            if let (Some(cert), Some(key)) = (tls_cert_file, tls_key_file) {
                warn_if_readable_by_others(key);
                config.tls = Some(keyplane_server::ServerTls {
                    cert_pem: read(cert)?,
                    key_pem: read(key)?,
                });
            }
            if let Some(ca_key) = ca_key_file {
                let ca_cert = ca_cert_file
                    .clone()
                    .unwrap_or_else(|| ca_key.with_file_name("ca.crt"));
                if !ca_key.exists() {
                    anyhow::bail!(
                        "CA key file {} does not exist: create the CA once with `keyplaned ca-init --out DIR`, \
                         or copy the ca.key the other replicas use (every replica needs the same CA key)",
                        ca_key.display()
                    );
                }
                warn_if_readable_by_others(ca_key);
                let ca = keyplane_server::pki::CertAuthority::load(ca_key, &ca_cert)
                    .with_context(|| format!("CA key {}", ca_key.display()))?;
                config.ca = Some(std::sync::Arc::new(ca));
            }
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let shutdown = CancellationToken::new();
            tokio::spawn(shutdown_signal(shutdown.clone()));
            keyplane_server::serve(config, listener, shutdown).await
        }
        Command::Keygen { out, keep_from } => {
            let older = match keep_from {
                Some(path) => {
                    let text = read(path)?;
                    let older = PinKey::from_hex(&text)
                        .with_context(|| format!("PIN keys in {}", path.display()))?;
                    Some((text, older))
                }
                None => None,
            };
            let key = keygen(out, older.as_ref().map(|(text, _)| text.as_str()))?;
            println!("key_id: {}", key.id());
            for id in older.iter().flat_map(|(_, k)| k.ids()) {
                println!("older_key_id: {id}");
            }
            println!(
                "wrote {} (mode 0600): back it up apart from the database; every replica needs this same key",
                out.display()
            );
            Ok(())
        }
        Command::CaInit { out, server_name } => {
            let files = keyplane_server::pki::ca_init(out, server_name)?;
            println!("ca_key_id: {}", files.key_id);
            println!(
                "wrote {} (mode 0600; back it up, every replica needs it) and {}",
                files.key.display(),
                files.cert.display()
            );
            if let Some((cert, key)) = files.server {
                println!("wrote {} and {} (mode 0600)", cert.display(), key.display());
            }
            Ok(())
        }
        Command::KeyId { pin_key_file } => {
            let key = load_key(None, Some(pin_key_file))?;
            println!("key_id: {}", key.id());
            for id in key.ids().iter().skip(1) {
                println!("older_key_id: {id}");
            }
            Ok(())
        }
        Command::RotateKeys {
            pin_key_file,
            batch,
        } => {
            let pin_key = std::env::var("KEYPLANE_PIN_KEY").ok();
            let key = load_key(pin_key.as_deref(), pin_key_file.as_deref())?;
            let store = Store::connect(&database_url(&cli)?, 2, key.clone())?;
            store.migrate().await?;
            store.key_check().await?;
            let report = store.rotate_pin_keys(*batch).await?;
            println!(
                "rotated to key {}: {} site(s), {} code(s), {} observed code(s) re-sealed and re-hashed",
                key.id(),
                report.sites,
                report.credentials,
                report.observed
            );
            if key.ids().len() > 1 {
                println!(
                    "the database now needs only key {}: once every replica runs with this key file, \
                     the older keys may be removed from it (keep the backups of the old file until \
                     no database backup made before the rotation is needed)",
                    key.id()
                );
            }
            Ok(())
        }
        Command::Migrate => {
            // Migrations need no PIN key; a throwaway one satisfies the pool's type.
            let store = Store::connect(&database_url(&cli)?, 2, PinKey::generate()?)?;
            store.migrate().await?;
            println!("migrations applied");
            Ok(())
        }
        Command::BootstrapDealer { display_name } => {
            let store = Store::connect(&database_url(&cli)?, 2, PinKey::generate()?)?;
            store.migrate().await?;
            let (dealer, token) = store.dealer_create(display_name).await?;
            println!("dealer: dealers/{dealer}");
            println!("token: {token}");
            Ok(())
        }
        Command::DemoSeed { server, token_file } => {
            let token = secret(token_file.as_deref(), "KEYPLANE_TOKEN")?
                .context("pass --token-file FILE or set KEYPLANE_TOKEN")?;
            let token = &token;
            // host:port as the agent takes it; plaintext until TLS exists.
            let server = if server.contains("://") {
                server.clone()
            } else {
                format!("http://{server}")
            };
            let demo = keyplane_server::demo::seed(&server, token)
                .await
                .with_context(|| format!("seeding through keyplaned at {server}"))?;
            println!("site: {}", demo.site);
            for d in &demo.devices {
                println!("device: {} {}", d.name, d.model);
            }
            println!("user: {}", demo.user);
            println!("agent_token: {}", demo.agent_token);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_database_urls_are_seen() {
        for (url, password) in [
            ("postgres://u:secret@h:5432/db", true),
            ("postgres://u@h:5432/db", false),
            ("postgres://h/db?user=u&password=secret", true),
            ("postgres://u@[::1]:5432/db", false),
            ("host=h user=u password=secret", true),
            ("host=h user=u", false),
        ] {
            assert_eq!(has_password(url), password, "{url}");
        }
    }

    #[test]
    fn serve_never_makes_up_a_key() {
        let none = load_key(None, None).expect_err("no key configured");
        assert!(format!("{none:#}").contains("keyplaned keygen"), "{none:#}");
        let dir = std::env::temp_dir().join(format!("keyplane-keytest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("etc/keyplane/pin.key");
        let missing = load_key(None, Some(&path)).expect_err("missing file");
        assert!(
            format!("{missing:#}").contains("keygen --out"),
            "{missing:#}"
        );
        assert!(!path.exists(), "a missing key file is not created");

        let made = keygen(&path, None).expect("keygen");
        assert_eq!(load_key(None, Some(&path)).expect("load").id(), made.id());
        assert!(
            keygen(&path, None).is_err(),
            "an existing key file is never overwritten"
        );
        assert_eq!(load_key(None, Some(&path)).expect("load").id(), made.id());
        // A rotation's key file: the new key current, the old one still readable.
        let next = dir.join("pin.key.next");
        let old = std::fs::read_to_string(&path).expect("old");
        let rotated = keygen(&next, Some(&old)).expect("keygen --keep-from");
        let loaded = load_key(None, Some(&next)).expect("load ring");
        assert_eq!(loaded.ids(), rotated.ids());
        assert_eq!(loaded.ids().len(), 2);
        assert_eq!(loaded.ids()[1], made.id());
        assert_ne!(loaded.id(), made.id());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
