//! `keyplane-agent`: the keyplane edge agent for one site.

use clap::{Parser, Subcommand};
use keyplane_agent::AgentConfig;
use keyplane_agent::config::{Drivers, ZwaveNode};
use keyplane_agent::hand::{self, HandAction};
use keyplane_devices::zwave::ZwaveOptions;
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
    /// Log lines as `text` or `json` (one object a line, with the fields of the
    /// spans it was written in: site, device). Level from RUST_LOG.
    #[arg(long, env = "KEYPLANE_LOG_FORMAT", default_value_t = keyplane_telemetry::LogFormat::Text)]
    log_format: keyplane_telemetry::LogFormat,
    /// Serve Prometheus metrics on this address (`GET /metrics`, plain HTTP), e.g.
    /// 127.0.0.1:9465. Unset: not served.
    #[arg(long, env = "KEYPLANE_METRICS_LISTEN")]
    metrics_listen: Option<String>,
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
    /// File holding the key the journal is sealed under (64 hex digits, mode 0400 or
    /// 0600, kept apart from --state-dir). Without it an enrolled agent seals the
    /// journal under a key derived from its enrollment key.
    #[arg(long, env = "KEYPLANE_JOURNAL_KEY_FILE")]
    journal_key_file: Option<PathBuf>,
    /// Directory of simulated devices: every site device not named by --zwave-node
    /// is simulated there.
    #[arg(long, env = "KEYPLANE_SIM_DIR")]
    sim_dir: Option<PathBuf>,
    /// Z-Wave JS server (zwave-js-server, also inside Z-Wave JS UI and the Home
    /// Assistant add-on), e.g. ws://127.0.0.1:3000.
    #[arg(long, env = "KEYPLANE_ZWAVE_JS")]
    zwave_js: Option<String>,
    /// A lock on the Z-Wave JS server: NODE=DEVICE (node id = site device resource
    /// name or id). Repeat, or comma-separate in KEYPLANE_ZWAVE_NODES.
    #[arg(long, env = "KEYPLANE_ZWAVE_NODES", value_delimiter = ',')]
    zwave_node: Vec<ZwaveNode>,
    /// Least time between two writes to one Z-Wave lock, in milliseconds.
    #[arg(long, env = "KEYPLANE_ZWAVE_WRITE_GAP_MS", default_value_t = 1000)]
    zwave_write_gap_ms: u64,
    /// Read every device's slots back at least this often, in seconds (codes
    /// programmed at a device show up as LOCAL within this time).
    #[arg(long, env = "KEYPLANE_READ_BACK_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    read_back_secs: u64,
    /// Least time between two writes to one alarm panel, in milliseconds (each
    /// device has its own queue; devices never wait for one another).
    #[arg(long, env = "KEYPLANE_PANEL_WRITE_GAP_MS", default_value_t = 100)]
    panel_write_gap_ms: u64,
    /// Least time between two writes to one lock, in milliseconds (a Z-Wave JS
    /// lock also keeps --zwave-write-gap-ms).
    #[arg(long, env = "KEYPLANE_LOCK_WRITE_GAP_MS", default_value_t = 250)]
    lock_write_gap_ms: u64,
    /// Least time between two writes to one access-control door, in milliseconds.
    #[arg(long, env = "KEYPLANE_DOOR_WRITE_GAP_MS", default_value_t = 0)]
    door_write_gap_ms: u64,
    /// Test hook: shift the agent's wall clock by this many seconds (a site whose
    /// clock is wrong; keyplaned flags it as clock_skew). Never in production.
    #[arg(
        long,
        env = "KEYPLANE_AGENT_CLOCK_OFFSET_SECS",
        hide = true,
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    clock_offset_secs: i64,
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
    /// List the lock nodes (User Code CC) of a Z-Wave JS server, with what each
    /// reports (slots, code lengths, checksum, keypad events), and the --zwave-node
    /// line to name each as a site device.
    ZwaveDiscover {
        /// The server, e.g. ws://127.0.0.1:3000.
        #[arg(long, env = "KEYPLANE_ZWAVE_JS")]
        url: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 15)]
        timeout_secs: u64,
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
    if let Some(Command::ZwaveDiscover { url, timeout_secs }) = &cli.command {
        let timeout = std::time::Duration::from_secs(*timeout_secs);
        match keyplane_devices::zwave::discover(url, timeout).await {
            Ok(nodes) if nodes.is_empty() => {
                say(&format!("{url}: no lock node (none has the User Code CC)"));
            }
            Ok(nodes) => {
                for n in nodes {
                    let capacity = n.capacity.map_or_else(
                        || "slots unknown".to_owned(),
                        |c| {
                            format!(
                                "{} slots, codes of {}..{} digits",
                                c.slots, c.min_code_length, c.max_code_length
                            )
                        },
                    );
                    say(&format!(
                        "node {}: {} {} (User Code CC v{}{}{}): {capacity}; name it with --zwave-node {}=<site device>",
                        n.node,
                        n.manufacturer,
                        n.label,
                        n.user_code_version,
                        if n.user_code_version >= 2 {
                            ", checksum"
                        } else {
                            ""
                        },
                        if n.keypad_events {
                            ", keypad events"
                        } else {
                            ""
                        },
                        n.node
                    ));
                }
            }
            Err(e) => {
                complain(&format!("keyplane-agent zwave-discover: error: {e}"));
                std::process::exit(1);
            }
        }
        return Ok(());
    }
    // Held to the end of main: dropping it sends the spans still buffered.
    let _telemetry = keyplane_telemetry::init_with("keyplane-agent", cli.log_format);
    let Some(site) = cli.site else {
        // clap requires it without a subcommand; this is only a safety net.
        complain("keyplane-agent: error: --site is required");
        std::process::exit(2);
    };
    let options = ZwaveOptions {
        write_gap: std::time::Duration::from_millis(cli.zwave_write_gap_ms),
        ..ZwaveOptions::default()
    };
    let drivers = match Drivers::new(
        cli.sim_dir,
        cli.zwave_js.as_deref(),
        cli.zwave_node,
        options,
    ) {
        Ok(drivers) => drivers,
        Err(e) => {
            complain(&format!("keyplane-agent: error: {e}"));
            std::process::exit(2);
        }
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
    if cli.clock_offset_secs != 0 {
        let offset = chrono::TimeDelta::try_seconds(cli.clock_offset_secs)
            .ok_or_else(|| anyhow::anyhow!("--clock-offset-secs is out of range"))?;
        tracing::warn!(
            offset_secs = cli.clock_offset_secs,
            "the agent's clock is shifted (test hook)"
        );
        config.clock = std::sync::Arc::new(keyplane_agent::clock::SteadyClock::with_offset(offset));
    }
    config.observe_every = std::time::Duration::from_secs(cli.read_back_secs);
    config.pacing = keyplane_agent::Pacing {
        panel: std::time::Duration::from_millis(cli.panel_write_gap_ms),
        lock: std::time::Duration::from_millis(cli.lock_write_gap_ms),
        door: std::time::Duration::from_millis(cli.door_write_gap_ms),
    };
    config.server_ca_file = cli.server_ca_file;
    config.enrollment_code_file = cli.enrollment_code_file;
    config.journal_key_file = cli.journal_key_file;
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
    if let Some(at) = &cli.metrics_listen {
        let listener = tokio::net::TcpListener::bind(at)
            .await
            .map_err(|e| anyhow::anyhow!("metrics endpoint {at}: {e}"))?;
        tokio::spawn(keyplane_telemetry::metrics::serve(
            listener,
            keyplane_agent::metrics::metrics().registry(),
            None,
            shutdown.clone().cancelled_owned(),
        ));
    }
    // The same registry over OTLP when the OTEL_* variables ask for it.
    let metrics_export = keyplane_telemetry::otlp_metrics::spawn_export(
        "keyplane-agent",
        keyplane_agent::metrics::metrics().registry(),
        None,
        shutdown.clone().cancelled_owned(),
    )?;
    let stop = shutdown.clone();
    let result = keyplane_agent::run(config, Box::new(drivers), shutdown).await;
    stop.cancel();
    if let Some(export) = metrics_export {
        // Its last export, after the shutdown the run just saw.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), export).await;
    }
    result
}
