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
    let mut bootstrap = lines_to_map(&String::from_utf8_lossy(&out.stdout));
    let token = bootstrap
        .remove("token")
        .context("bootstrap-dealer printed no token")?;
    let dealer = bootstrap.remove("dealer").unwrap_or_default();

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
        .args(["demo-seed", "--server", &format!("http://{LISTEN}")])
        // Never in argv, where every local user can read it.
        .env("KEYPLANE_TOKEN", &token)
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
            .args(["--server", &format!("http://{LISTEN}"), "--site", &site])
            .env("KEYPLANE_AGENT_TOKEN", agent_token)
            .arg("--state-dir")
            .arg(site_dir.join("agent-state"))
            .arg("--sim-dir")
            .arg(site_dir.join("devices"))
            // Codes typed in with `keyplane-agent sim` show up within seconds.
            .args(["--read-back-secs", "2"])
            .spawn()
            .context("starting keyplane-agent")?,
    );
    println!(
        "{}",
        banner(&Banner {
            url: &db.url,
            keyplaned: &bin.join("keyplaned").display().to_string(),
            agent: &bin.join("keyplane-agent").display().to_string(),
            dealer: &dealer,
            token: &token,
            seeded: &seeded,
            site: &site,
            user: &user,
            devices: &site_dir.join("devices").display().to_string(),
        })
    );
    let status = children.0[0].wait()?;
    eprintln!("xtask: keyplaned exited ({status})");
    Ok(())
}

/// What `cargo xtask dev` started, for the banner it prints.
struct Banner<'a> {
    url: &'a str,
    keyplaned: &'a str,
    agent: &'a str,
    dealer: &'a str,
    token: &'a str,
    seeded: &'a str,
    site: &'a str,
    user: &'a str,
    devices: &'a str,
}

/// The text printed once everything runs: where the database is, whose token it is,
/// and grpcurl calls that work when pasted.
fn banner(b: &Banner) -> String {
    let admin = "keyplane.v1.AdminService";
    let mut out = format!(
        "\nkeyplane is running (Ctrl-C stops it).\n\n\
         database: {url}\n  \
         (for psql, and for `DATABASE_URL={url} {keyplaned} bootstrap-dealer --display-name NAME`)\n\n\
         Created the demo dealer \"Demo Dealer\" ({dealer}); TOKEN below is its API token.\n\
         Its demo site:\n{seeded}simulated devices: {devices}\n\n\
         Paste into a shell:\n\
         export TOKEN={token}\n\
         alias kp='grpcurl -plaintext -H \"authorization: Bearer $TOKEN\"'\n\n\
         Try (grpcurl takes its flags before the address):\n\
         grpcurl -plaintext {LISTEN} list\n\
         kp {LISTEN} {admin}/ListSites\n",
        url = b.url,
        keyplaned = b.keyplaned,
        dealer = b.dealer,
        seeded = b.seeded,
        devices = b.devices,
        token = b.token,
    );
    for (field, value, method) in [
        ("parent", b.site, "ListDevices"),
        ("parent", b.site, "ListUsers"),
        ("parent", b.user, "ListCredentials"),
        ("name", &format!("{}/syncStatus", b.site), "GetSyncStatus"),
    ] {
        out.push_str(&format!(
            "kp -d '{{\"{field}\":\"{value}\"}}' {LISTEN} {admin}/{method}\n"
        ));
    }
    // What each simulated device holds (user numbers and slots, never a code), and
    // how to act at it as a person would.
    let devices: Vec<&str> = b
        .seeded
        .lines()
        .filter_map(|l| l.strip_prefix("device: "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    out.push_str("\nAt the simulated devices (see \"Trying things by hand\" in README.md):\n");
    for device in devices {
        out.push_str(&format!(
            "{} sim --sim-dir {} {device} show\n",
            b.agent, b.devices
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_calls_put_every_flag_before_the_address() {
        let text = banner(&Banner {
            url: "postgres://postgres@127.0.0.1:5432/postgres",
            keyplaned: "target/debug/keyplaned",
            agent: "target/debug/keyplane-agent",
            dealer: "dealers/d1",
            token: "kpd_t",
            seeded: "site: sites/s1\ndevice: sites/s1/devices/d1 zwave-lock-30\n",
            site: "sites/s1",
            user: "sites/s1/users/u1",
            devices: ".dev/devices",
        });
        assert!(text.contains("database: postgres://postgres@127.0.0.1:5432/postgres"));
        assert!(text.contains("dealers/d1"));
        assert!(text.contains("export TOKEN=kpd_t"));
        let calls: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("kp ") || l.starts_with("grpcurl "))
            .collect();
        assert_eq!(calls.len(), 6, "{text}");
        // Device state files hold codes: the banner shows devices through `sim show`.
        assert!(!text.contains(".json"), "{text}");
        assert!(
            text.contains(
                "target/debug/keyplane-agent sim --sim-dir .dev/devices sites/s1/devices/d1 show"
            ),
            "{text}"
        );
        for call in calls {
            // grpcurl reads `ADDRESS [METHOD]` last; anything after them is "Too many arguments".
            let words: Vec<&str> = call.split_whitespace().collect();
            let at = words.iter().position(|w| *w == LISTEN).expect(call);
            assert!(words.len() - at <= 2, "flags after the address: {call}");
        }
    }
}
