//! The Z-Wave lab's npm packages (`../shared/zwave-lab/`: zwave-js and
//! zwave-js-server), installed once into `target/zwave-lab/npm` before the tests run,
//! so the Z-Wave JS tests (tests/e2e/zwave.rs) only start stacks and never each run
//! `npm install`. The tests use the same folder (`ZWAVE_LAB_HOME` of the lab's
//! start.sh).

use crate::{run_checked, workspace_root};
use anyhow::Context;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The lab's scripts: `KEYPLANE_ZWAVE_LAB`, else `../shared/zwave-lab` beside the
/// workspace.
fn lab_src() -> PathBuf {
    std::env::var_os("KEYPLANE_ZWAVE_LAB").map_or_else(
        || workspace_root().join("../shared/zwave-lab"),
        PathBuf::from,
    )
}

/// Where the packages go (the tests look there too).
fn lab_home() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
        .join("zwave-lab/npm")
}

fn found(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs the lab's packages when Node and npm are present. Ok(false), with the
/// reason printed, when they are not (the Z-Wave JS tests then print why they skip).
pub fn prepare() -> anyhow::Result<bool> {
    let src = lab_src();
    let why = if !src.join("package.json").exists() {
        Some(format!("no zwave lab at {}", src.display()))
    } else if !found("node") || !found("npm") {
        Some("Node.js/npm not installed".to_owned())
    } else {
        None
    };
    if let Some(why) = why {
        eprintln!("xtask: {why}: the Z-Wave JS tests will be skipped");
        return Ok(false);
    }
    let home = lab_home();
    std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
    std::fs::copy(src.join("package.json"), home.join("package.json"))
        .context("copying the lab's package.json")?;
    if !home.join("node_modules/zwave-js").is_dir() {
        run_checked(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&home),
            &format!("npm install (zwave lab packages, into {})", home.display()),
        )?;
    }
    Ok(true)
}
