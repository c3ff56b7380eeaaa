//! Tracing set-up shared by `keyplaned` and `keyplane-agent`.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`). OpenTelemetry export
//! will plug in here, so both binaries get it at once.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber for `service`. Safe to call more than once (later
/// calls do nothing), so tests may call it freely.
pub fn init(service: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let installed = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colour codes only for a person at a terminal, never in files or journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init()
        .is_ok();
    if installed {
        tracing::debug!(service, "tracing initialised");
    }
}
