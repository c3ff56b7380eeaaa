//! Developer tasks, run as `cargo xtask <task>`:
//!
//! - `dev`: provisions PostgreSQL, starts `keyplaned`, seeds a demo site, starts an
//!   agent with simulated devices, prints grpcurl calls, and runs until Ctrl-C.
//! - `test [ARGS…]`: provisions PostgreSQL, grpcurl (for the README walk-through
//!   test) and, where Node is installed, the Z-Wave lab's npm packages (for the
//!   Z-Wave JS tests), then runs the proto and deploy linters (`lint.rs`: buf,
//!   shellcheck, yamllint, hadolint), fmt, clippy and the whole test suite (extra
//!   arguments go to the test runner).
//! - `lint`: only the proto and deploy linters of `test`.
//! - `bench [--quick]`: the benchmark suite (see `bench.rs`); writes
//!   `target/bench/report.json` and `report.md`. Not part of `test`.
//!
//! Kept to std + anyhow so it builds in seconds on a clean machine.

mod bench;
mod dev;
mod grpcurl;
mod lint;
mod pg;
mod zwave_lab;

use anyhow::{Context, bail};
use std::path::PathBuf;
use std::process::Command;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let task = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    match task.as_str() {
        "dev" => dev::run(),
        "test" => test(&rest),
        "bench" => bench::run(&rest),
        "lint" => lint::run(std::env::var("CI").is_ok_and(|v| v == "true")),
        _ => {
            eprintln!(
                "usage: cargo xtask dev | cargo xtask test [test-runner args] | cargo xtask lint | cargo xtask bench [--quick]"
            );
            bail!("unknown task {task:?}")
        }
    }
}

/// The workspace root (the parent of `crates/xtask`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs `cmd`, failing with its description when it does not exit 0.
pub fn run_checked(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    eprintln!("xtask: {what}");
    let status = cmd.status().with_context(|| format!("starting: {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root())
        .env("CARGO_BUILD_JOBS", "2");
    cmd
}

fn has_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    let db = pg::ensure_postgres()?;
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let grpcurl = match grpcurl::ensure() {
        Ok(found) => found,
        Err(e) if ci => return Err(e.context("grpcurl (for the README walk-through test)")),
        Err(e) => {
            eprintln!("xtask: no grpcurl, the README walk-through test will be skipped: {e:#}");
            None
        }
    };
    let zwave_lab = zwave_lab::prepare()?;
    let result = (|| {
        lint::run(ci)?;
        run_checked(
            cargo().args(["fmt", "--all", "--check"]),
            "cargo fmt --all --check",
        )?;
        run_checked(
            cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
            "cargo clippy --workspace --all-targets -- -D warnings",
        )?;
        db.drop_test_databases();
        // The kill -9 test (tests/e2e/restart.rs) runs the real agent binary, the
        // shutdown test (tests/e2e/shutdown.rs) the real keyplaned, and the deploy
        // test (tests/e2e/deploy.rs) both binaries' --help, which the test build does
        // not produce on a clean clone.
        run_checked(
            cargo().args([
                "build",
                "-p",
                "keyplane-agent",
                "--bin",
                "keyplane-agent",
                "-p",
                "keyplane-server",
                "--bin",
                "keyplaned",
            ]),
            "cargo build --bin keyplane-agent --bin keyplaned (for the tests that run the binaries)",
        )?;
        let mut runner = cargo();
        if has_nextest() {
            runner.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
        } else {
            runner.args(["test", "--workspace", "--no-fail-fast"]);
        }
        runner.args(extra).env("DATABASE_URL", &db.url);
        if let Some(bin) = &grpcurl {
            runner.env("KEYPLANE_GRPCURL", bin);
        }
        if zwave_lab {
            // Prepared: a Z-Wave JS test that cannot use the lab fails, not skips.
            runner.env("KEYPLANE_ZWAVE_LAB_REQUIRED", "1");
        }
        run_checked(&mut runner, "the test suite")
    })();
    if ci {
        db.stop();
    }
    result
}
