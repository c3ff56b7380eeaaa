//! PostgreSQL for development and tests: `DATABASE_URL` when set, otherwise a private
//! cluster under `target/keyplane-pg/` started from the system's PostgreSQL binaries
//! (installed from the OS packages when absent and we may).

use crate::{run_checked, workspace_root};
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A database server the suite can use.
pub struct Database {
    /// URL of its `postgres` database.
    pub url: String,
    cluster: Option<Cluster>,
}

struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    user: Option<String>,
    port: u16,
}

impl Database {
    /// Drops databases left by earlier test runs (private cluster only).
    pub fn drop_test_databases(&self) {
        let Some(c) = &self.cluster else { return };
        let list = c
            .command("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &c.port.to_string(),
                "-d",
                "postgres",
                "-At",
                "-c",
            ])
            .arg("SELECT datname FROM pg_database WHERE datname LIKE 'keyplane\\_test\\_%'")
            .output();
        let Ok(out) = list else { return };
        for name in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
        {
            let _ = c
                .command("psql")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &c.port.to_string(),
                    "-d",
                    "postgres",
                    "-q",
                    "-c",
                ])
                .arg(format!("DROP DATABASE IF EXISTS \"{name}\""))
                .output();
        }
    }

    /// The directory of the cluster's PostgreSQL binaries (pgbench, psql), if private.
    pub fn bin_dir(&self) -> Option<&Path> {
        self.cluster.as_ref().map(|c| c.bin.as_path())
    }

    /// The process id of the private cluster's postmaster (`postmaster.pid`).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let c = self.cluster.as_ref()?;
        std::fs::read_to_string(c.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Stops the private cluster, if we started one.
    pub fn stop(&self) {
        if let Some(c) = &self.cluster {
            let _ = c
                .command("pg_ctl")
                .arg("-D")
                .arg(&c.data)
                .args(["-m", "fast", "-w", "stop"])
                .status();
        }
    }
}

impl Cluster {
    /// A command for PostgreSQL binary `name`, run as the cluster's owner.
    fn command(&self, name: &str) -> Command {
        let bin = self.bin.join(name);
        let mut c = match &self.user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        // The owner may not be able to enter the caller's directory.
        if let Some(dir) = self.data.parent() {
            c.current_dir(dir);
        }
        c
    }
}

/// Whether xtask runs as root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn find_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
    })
}

fn install_postgres() -> anyhow::Result<()> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if !is_root() && !ci {
        bail!(
            "PostgreSQL server binaries not found. Install them with:\n    sudo apt-get install -y postgresql\n\
             or set DATABASE_URL to a server you can create databases on."
        );
    }
    apt_install("postgresql")
}

/// Installs a Debian package (as root, or through sudo on CI).
pub fn apt_install(package: &str) -> anyhow::Result<()> {
    let sudo = if is_root() {
        vec![]
    } else {
        vec!["sudo".to_owned()]
    };
    let apt = |args: &[&str]| {
        let mut c = Command::new(if sudo.is_empty() { "apt-get" } else { "sudo" });
        if !sudo.is_empty() {
            c.arg("apt-get");
        }
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run_checked(&mut apt(&["update", "-q"]), "apt-get update")?;
    run_checked(
        &mut apt(&["install", "-y", "-q", "--no-install-recommends", package]),
        &format!("apt-get install {package}"),
    )
}

fn owner() -> anyhow::Result<Option<String>> {
    if !is_root() {
        return Ok(None);
    }
    let exists = |u: &str| {
        Command::new("id")
            .arg("-u")
            .arg(u)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if exists("postgres") {
        return Ok(Some("postgres".into()));
    }
    if !exists("keyplane") {
        run_checked(
            Command::new("useradd").args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "keyplane",
            ]),
            "creating the unprivileged user keyplane for PostgreSQL",
        )?;
    }
    Ok(Some("keyplane".into()))
}

fn chown(path: &Path, user: &Option<String>) -> anyhow::Result<()> {
    if let Some(user) = user {
        run_checked(
            Command::new("chown").args(["-R", user]).arg(path),
            &format!("chown {} to {user}", path.display()),
        )?;
    }
    Ok(())
}

/// Where the private cluster lives: `target/keyplane-pg`, unless it runs as another
/// user who cannot reach the checkout (a clone under a private directory), then a
/// directory under the system temp dir named after the checkout.
fn cluster_root(other_owner: bool, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let root = workspace_root();
    let reachable = root
        .ancestors()
        .all(|dir| std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
    if !other_owner || reachable {
        return root.join("target").join(name);
    }
    let tag: u64 = root
        .to_string_lossy()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    std::env::temp_dir().join(format!("{name}-{tag:016x}"))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `DATABASE_URL` if set, else a running private cluster (started if needed).
pub fn ensure_postgres() -> anyhow::Result<Database> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        eprintln!("xtask: using DATABASE_URL");
        return Ok(Database { url, cluster: None });
    }
    let bin = match find_bin_dir() {
        Some(b) => b,
        None => {
            install_postgres()?;
            find_bin_dir().context("PostgreSQL was installed but initdb is still not found")?
        }
    };
    let user = owner()?;
    let root = cluster_root(user.is_some(), "keyplane-pg");
    start_cluster(bin, user, root, Durability::Fast)
}

/// How a private cluster commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync and synchronous commit off: the test cluster, where speed matters.
    Fast,
    /// fsync and synchronous commit on, as in production: the bench cluster.
    Durable,
}

/// A fresh private cluster under `target/<name>` (or the temp-dir fallback), for
/// `cargo xtask bench`: whatever an earlier run left there is removed first.
pub fn fresh_cluster(name: &str, durability: Durability) -> anyhow::Result<Database> {
    let bin = match find_bin_dir() {
        Some(b) => b,
        None => {
            install_postgres()?;
            find_bin_dir().context("PostgreSQL was installed but initdb is still not found")?
        }
    };
    let user = owner()?;
    let root = cluster_root(user.is_some(), name);
    let data = root.join("data");
    if data.join("postmaster.pid").exists() {
        let stale = Database {
            url: String::new(),
            cluster: Some(Cluster {
                bin: bin.clone(),
                data: data.clone(),
                user: user.clone(),
                port: 0,
            }),
        };
        stale.stop();
    }
    if root.exists() {
        std::fs::remove_dir_all(&root)
            .with_context(|| format!("removing the old cluster {}", root.display()))?;
    }
    start_cluster(bin, user, root, durability)
}

fn start_cluster(
    bin: PathBuf,
    user: Option<String>,
    root: PathBuf,
    durability: Durability,
) -> anyhow::Result<Database> {
    let data = root.join("data");
    let sock = root.join("sock");
    std::fs::create_dir_all(&sock)?;
    let port_file = root.join("port");
    let mut cluster = Cluster {
        bin,
        data: data.clone(),
        user: user.clone(),
        port: 0,
    };
    let running = cluster
        .command("pg_ctl")
        .arg("-D")
        .arg(&data)
        .arg("status")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if running
        && let Some(port) = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
    {
        cluster.port = port;
    } else {
        if !data.join("PG_VERSION").exists() {
            std::fs::create_dir_all(&data)?;
            chown(&root, &user)?;
            let mut init = cluster.command("initdb");
            init.arg("-D")
                .arg(&data)
                .args(["--auth=trust", "--encoding=UTF8", "--no-sync", "-U"])
                .arg(user.clone().unwrap_or_else(whoami));
            run_checked(
                init.stdout(std::process::Stdio::null()),
                "initdb (private cluster)",
            )?;
        }
        chown(&root, &user)?;
        cluster.port = free_port()?;
        let commit = match durability {
            Durability::Fast => "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            Durability::Durable => "-c fsync=on -c synchronous_commit=on -c full_page_writes=on",
        };
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 {commit} -c max_connections=300",
            cluster.port,
            sock.display()
        );
        let mut start = cluster.command("pg_ctl");
        start
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(root.join("postgres.log"))
            .args(["-w", "-o", &options, "start"]);
        run_checked(
            start.stdout(std::process::Stdio::null()),
            "starting the private PostgreSQL cluster",
        )?;
        std::fs::write(&port_file, cluster.port.to_string())?;
    }
    let user_name = user.unwrap_or_else(whoami);
    let url = format!("postgres://{user_name}@127.0.0.1:{}/postgres", cluster.port);
    eprintln!(
        "xtask: private PostgreSQL at 127.0.0.1:{} (data in {})",
        cluster.port,
        data.display()
    );
    Ok(Database {
        url,
        cluster: Some(cluster),
    })
}

fn whoami() -> String {
    std::env::var("USER")
        .ok()
        .or_else(|| {
            Command::new("id")
                .arg("-un")
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        })
        .unwrap_or_else(|| "postgres".into())
}
