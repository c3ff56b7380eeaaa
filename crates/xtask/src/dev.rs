//! `cargo xtask dev`: a running keyplane with a demo site, for trying the API.

use crate::{pg, run_checked, workspace_root};
use anyhow::{Context, bail};
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const LISTEN: &str = "127.0.0.1:50051";

fn lines_to_map(out: &str) -> HashMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if matches!(child.try_wait(), Ok(Some(_))) {
                continue;
            }
            // SIGTERM lets both binaries shut down gracefully.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
        }
        for child in &mut self.0 {
            let _ = child.wait();
        }
    }
}

/// Provisions, starts and seeds; waits until keyplaned exits (Ctrl-C).
pub fn run() -> anyhow::Result<()> {
    let db = pg::ensure_postgres()?;
    let root = workspace_root();
    run_checked(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .env("CARGO_BUILD_JOBS", "2")
            .args(["build", "-p", "keyplane-server", "-p", "keyplane-agent"]),
        "building keyplaned and keyplane-agent",
    )?;
    let bin = root.join("target/debug");
    let dev = root.join(".dev");
    std::fs::create_dir_all(&dev)?;
    if std::net::TcpStream::connect(LISTEN).is_ok() {
        bail!(
            "{LISTEN} is already in use: stop whatever listens there (an earlier `cargo xtask dev`?)"
        );
    }

    let out = Command::new(bin.join("keyplaned"))
        .args(["bootstrap-dealer", "--display-name", "Demo Dealer"])
        .env("DATABASE_URL", &db.url)
        .stderr(Stdio::inherit())
        .output()
        .context("running keyplaned bootstrap-dealer")?;
    if !out.status.success() {
        bail!("keyplaned bootstrap-dealer failed");
    }
    let token = lines_to_map(&String::from_utf8_lossy(&out.stdout))
        .remove("token")
        .context("bootstrap-dealer printed no token")?;

    let pin_key = dev.join("pin.key");
    if !pin_key.exists() {
        run_checked(
            Command::new(bin.join("keyplaned"))
                .arg("keygen")
                .arg("--out")
                .arg(&pin_key)
                .stdout(Stdio::null()),
            "creating the development PIN key (.dev/pin.key)",
        )?;
    }
    let mut children = Children(Vec::new());
    children.0.push(
        Command::new(bin.join("keyplaned"))
            .args(["serve", "--listen", LISTEN, "--pin-key-file"])
            .arg(&pin_key)
            .env("DATABASE_URL", &db.url)
            .spawn()
            .context("starting keyplaned")?,
    );
    let mut ready = false;
    for _ in 0..100 {
        if std::net::TcpStream::connect(LISTEN).is_ok() {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !ready {
        bail!("keyplaned did not start listening on {LISTEN}");
    }
    let out = Command::new(bin.join("keyplaned"))
        .args([
            "demo-seed",
            "--server",
            &format!("http://{LISTEN}"),
            "--token",
            &token,
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running keyplaned demo-seed")?;
    if !out.status.success() {
        bail!("keyplaned demo-seed failed");
    }
    let seeded = String::from_utf8_lossy(&out.stdout).to_string();
    let demo = lines_to_map(&seeded);
    let site = demo
        .get("site")
        .context("demo-seed printed no site")?
        .clone();
    let agent_token = demo
        .get("agent_token")
        .context("demo-seed printed no agent token")?;
    let user = demo.get("user").cloned().unwrap_or_default();
    let site_dir = dev.join(site.replace('/', "_"));
    children.0.push(
        Command::new(bin.join("keyplane-agent"))
            .args([
                "--server",
                &format!("http://{LISTEN}"),
                "--site",
                &site,
                "--token",
                agent_token,
            ])
            .arg("--state-dir")
            .arg(site_dir.join("agent-state"))
            .arg("--sim-dir")
            .arg(site_dir.join("devices"))
            .spawn()
            .context("starting keyplane-agent")?,
    );
    let kp = format!("grpcurl -plaintext -H 'authorization: Bearer {token}' {LISTEN}");
    println!(
        "\nkeyplane is running (Ctrl-C stops it).\n\n{seeded}\
         simulated devices: {devices}\n\nTry:\n\
         grpcurl -plaintext {LISTEN} list\n\
         {kp} keyplane.v1.AdminService/ListSites\n\
         {kp} -d '{{\"parent\":\"{site}\"}}' keyplane.v1.AdminService/ListDevices\n\
         {kp} -d '{{\"parent\":\"{site}\"}}' keyplane.v1.AdminService/ListUsers\n\
         {kp} -d '{{\"parent\":\"{user}\"}}' keyplane.v1.AdminService/ListCredentials\n\
         {kp} -d '{{\"name\":\"{site}/syncStatus\"}}' keyplane.v1.AdminService/GetSyncStatus\n\
         cat {devices}/*.json    # what each simulated device holds\n",
        devices = site_dir.join("devices").display(),
    );
    let status = children.0[0].wait()?;
    eprintln!("xtask: keyplaned exited ({status})");
    Ok(())
}
