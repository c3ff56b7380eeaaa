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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "KEYPLANE_LISTEN", default_value = "127.0.0.1:50051")]
        listen: String,
        /// PIN sealing key as 64 hex digits (takes precedence over --pin-key-file).
        #[arg(long, env = "KEYPLANE_PIN_KEY", hide_env_values = true)]
        pin_key: Option<String>,
        /// File holding the PIN sealing key; created with a random key if missing.
        #[arg(
            long,
            env = "KEYPLANE_PIN_KEY_FILE",
            default_value = "keyplane-pin.key"
        )]
        pin_key_file: PathBuf,
        /// Database connection pool size.
        #[arg(long, env = "KEYPLANE_MAX_CONNECTIONS", default_value_t = 32)]
        max_connections: usize,
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
        /// Dealer token.
        #[arg(long, env = "KEYPLANE_TOKEN", hide_env_values = true)]
        token: String,
    },
}

fn database_url(cli: &Cli) -> anyhow::Result<String> {
    cli.database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .context("set --database-url, KEYPLANE_DATABASE_URL or DATABASE_URL")
}

fn load_or_create_key(path: &Path) -> anyhow::Result<PinKey> {
    if path.exists() {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        return PinKey::from_hex(&text).with_context(|| format!("PIN key in {}", path.display()));
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("random key: {e}"))?;
    let text = hex::encode(bytes);
    write_private(path, &text)?;
    tracing::warn!(path = %path.display(), "generated a new PIN sealing key; back it up: PINs sealed with it cannot be read without it");
    Ok(PinKey::from_bytes(bytes))
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
    keyplane_telemetry::init("keyplaned");
    let cli = Cli::parse();
    match &cli.command {
        Command::Serve {
            listen,
            pin_key,
            pin_key_file,
            max_connections,
        } => {
            let key = match pin_key {
                Some(hex_key) => PinKey::from_hex(hex_key)?,
                None => load_or_create_key(pin_key_file)?,
            };
            let mut config = keyplane_server::Config::new(database_url(&cli)?, key);
            config.max_connections = *max_connections;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let shutdown = CancellationToken::new();
            tokio::spawn(shutdown_signal(shutdown.clone()));
            keyplane_server::serve(config, listener, shutdown).await
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
        Command::DemoSeed { server, token } => {
            let demo = keyplane_server::demo::seed(server, token).await?;
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
