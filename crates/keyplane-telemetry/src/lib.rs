//! Tracing set-up shared by `keyplaned` and `keyplane-agent`.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`). OpenTelemetry export
//! will plug in here, so both binaries get it at once.

use std::io::Write;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Installs the global subscriber for `service`. Safe to call more than once (later
/// calls do nothing), so tests may call it freely.
pub fn init(service: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let installed = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LossyStderr)
        .with_target(false)
        // Colour codes only for a person at a terminal, never in files or journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // Its report of a failed write goes through `eprintln!`, which panics when
        // stderr is closed: the very case it would report.
        .log_internal_errors(false)
        .try_init()
        .is_ok();
    if installed {
        tracing::debug!(service, "tracing initialised");
    }
}

/// Stderr for log lines, dropping what cannot be written: a log reader that went
/// away (`… 2>&1 | head`, a closed journald socket) must not stop the service.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossyStderr;

impl<'a> MakeWriter<'a> for LossyStderr {
    type Writer = LossyWriter<std::io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        LossyWriter(std::io::stderr())
    }
}

/// A writer whose write errors (EPIPE above all) are swallowed.
#[derive(Debug)]
pub struct LossyWriter<W>(pub W);

impl<W: Write> Write for LossyWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Claiming the whole buffer also ends `write_all` after one failed attempt.
        let _ = self.0.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    const CHILD: &str = "KEYPLANE_TELEMETRY_CLOSED_STDERR_CHILD";

    /// Run by `logging_to_a_closed_stderr_does_not_panic` in a child process whose
    /// stderr is a pipe nobody reads; does nothing otherwise.
    #[test]
    fn child_logs_to_a_closed_stderr() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        super::init("telemetry-test");
        // More than a pipe buffer holds: once it is full the writes block until
        // the reader closes its end, so later ones must meet EPIPE.
        for i in 0..20_000 {
            tracing::info!(
                i,
                "a line for a reader that went away, padded to fill the pipe"
            );
        }
    }

    #[test]
    fn logging_to_a_closed_stderr_does_not_panic() {
        let exe = std::env::current_exe().expect("test executable");
        let mut child = Command::new(exe)
            .args([
                "--exact",
                "tests::child_logs_to_a_closed_stderr",
                // Uncaptured, as in the binaries: libtest's capture would hide a panic
                // of `eprintln!`.
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the test executable");
        drop(child.stderr.take());
        let status = child.wait().expect("wait for the child");
        assert!(
            status.success(),
            "logging to a closed stderr ended the process with {status}"
        );
    }
}
