//! `keyplane-agent`: the keyplane edge agent for one site.

use clap::Parser;
use keyplane_agent::{AgentConfig, SimulatorFactory};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "keyplane-agent", version, about = "keyplane edge agent")]
struct Cli {
    /// keyplaned URL; `host:port` means `http://host:port`.
    #[arg(
        long,
        env = "KEYPLANE_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
    /// The site, `sites/{id}`.
    #[arg(long, env = "KEYPLANE_SITE")]
    site: String,
    /// Agent token (from AdminService.IssueAgentToken).
    #[arg(long, env = "KEYPLANE_AGENT_TOKEN", hide_env_values = true)]
    token: String,
    /// Directory for the agent's journal.
    #[arg(
        long,
        env = "KEYPLANE_STATE_DIR",
        default_value = "keyplane-agent-state"
    )]
    state_dir: PathBuf,
    /// Directory of simulated devices (the only drivers so far).
    #[arg(long, env = "KEYPLANE_SIM_DIR")]
    sim_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    keyplane_telemetry::init("keyplane-agent");
    let cli = Cli::parse();
    let mut config = AgentConfig::new(cli.server, cli.site, cli.token, cli.state_dir);
    if let Err(e) = config.check() {
        // Arguments that can never work: say so and stop, like clap does.
        eprintln!("keyplane-agent: error: {e}");
        std::process::exit(2);
    }
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("shutting down");
            signals.cancel();
        }
    });
    keyplane_agent::run(
        config,
        Box::new(SimulatorFactory::new(cli.sim_dir)),
        shutdown,
    )
    .await
}
