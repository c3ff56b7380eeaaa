//! `keyplane-agent`: the keyplane edge agent for one site.

use clap::{Parser, Subcommand};
use keyplane_agent::hand::{self, HandAction};
use keyplane_agent::{AgentConfig, SimulatorFactory};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "keyplane-agent",
    version,
    about = "keyplane edge agent",
    // `sim` needs none of the agent's own arguments.
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// keyplaned URL: https://host:port, or http:// to this machine only (`host:port`
    /// means `http://host:port`).
    #[arg(
        long,
        env = "KEYPLANE_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
    /// CA certificate (PEM) keyplaned's certificate must be signed by; needed for https.
    #[arg(long, env = "KEYPLANE_SERVER_CA_FILE")]
    server_ca_file: Option<PathBuf>,
    /// The site, `sites/{id}`.
    #[arg(long, env = "KEYPLANE_SITE", required = true)]
    site: Option<String>,
    /// File holding a one-time enrollment code (AdminService.CreateEnrollmentCode),
    /// read when the agent has no valid certificate; needs an https --server.
    #[arg(long, env = "KEYPLANE_ENROLLMENT_CODE_FILE")]
    enrollment_code_file: Option<PathBuf>,
    /// File holding an agent token (AdminService.IssueAgentToken), for agents not
    /// enrolled yet; or set KEYPLANE_AGENT_TOKEN. Never on the command line, where
    /// every local user can read it.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Directory for the agent's journal.
    #[arg(
        long,
        env = "KEYPLANE_STATE_DIR",
        default_value = "keyplane-agent-state"
    )]
    state_dir: PathBuf,
    /// Directory of simulated devices (the only drivers so far).
    #[arg(long, env = "KEYPLANE_SIM_DIR", required = true)]
    sim_dir: Option<PathBuf>,
    /// Read every device's slots back at least this often, in seconds (codes
    /// programmed at a device show up as LOCAL within this time).
    #[arg(long, env = "KEYPLANE_READ_BACK_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    read_back_secs: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Act as a person at a simulated device (works while the agent runs).
    ///
    /// Prints what the device did, never a code. Exit status 0 when the device did
    /// what was asked, 1 when it refused (the line says why), 2 when the command
    /// could not act (no such device, wrong kind of device).
    Sim {
        /// Directory of simulated devices (the agent's --sim-dir).
        #[arg(long, env = "KEYPLANE_SIM_DIR")]
        sim_dir: Option<PathBuf>,
        /// The device: its resource name (sites/…/devices/…), its state file, or
        /// just its device id.
        device: String,
        #[command(subcommand)]
        action: HandAction,
    },
}

/// Prints a line on stdout; a reader that went away (`| head`) is no reason to panic.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Prints a line on stderr, like [`say`].
fn complain(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Sim {
        sim_dir,
        device,
        action,
    }) = cli.command
    {
        let Some(sim_dir) = sim_dir.or(cli.sim_dir) else {
            complain("keyplane-agent sim: error: --sim-dir (or KEYPLANE_SIM_DIR) is required");
            std::process::exit(2);
        };
        match hand::act(&sim_dir, &device, &action) {
            Ok(result) => {
                say(&result.message);
                std::process::exit(if result.done { 0 } else { 1 });
            }
            Err(e) => {
                complain(&format!("keyplane-agent sim: error: {e}"));
                std::process::exit(2);
            }
        }
    }
    keyplane_telemetry::init("keyplane-agent");
    let (Some(site), Some(sim_dir)) = (cli.site, cli.sim_dir) else {
        // clap requires them without a subcommand; this is only a safety net.
        complain("keyplane-agent: error: --site and --sim-dir are required");
        std::process::exit(2);
    };
    let token = match &cli.token_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => text.trim().to_owned(),
            Err(e) => {
                complain(&format!(
                    "keyplane-agent: error: reading --token-file {}: {e}",
                    path.display()
                ));
                std::process::exit(2);
            }
        },
        None => std::env::var("KEYPLANE_AGENT_TOKEN")
            .map(|t| t.trim().to_owned())
            .unwrap_or_default(),
    };
    let mut config = AgentConfig::new(cli.server, site, token, cli.state_dir);
    config.observe_every = std::time::Duration::from_secs(cli.read_back_secs);
    config.server_ca_file = cli.server_ca_file;
    config.enrollment_code_file = cli.enrollment_code_file;
    if let Err(e) = config.check() {
        // Arguments that can never work: say so and stop, like clap does.
        complain(&format!("keyplane-agent: error: {e}"));
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
    keyplane_agent::run(config, Box::new(SimulatorFactory::new(sim_dir)), shutdown).await
}
