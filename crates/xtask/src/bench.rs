//! `cargo xtask bench [--quick]`: every figure beside a baseline taken in the same run.
//!
//! Builds in release, starts a fresh durable PostgreSQL (fsync and synchronous commit
//! on) under `target/bench/pg`, takes the baselines (pgbench; the plain tonic echo
//! harness of `keyplane-load`), runs keyplaned (one replica, then a second for the
//! cross-replica figure) under a `keyplane-load drive` process holding the agent
//! streams, then the site-count, codes-per-door and snapshot figures on a second
//! database (see [`scale`]), takes the baselines again, and has `keyplane-load report` write
//! `target/bench/report.json` and `report.md`. Every line of results is appended to
//! `target/bench/results.txt` as it comes, so a failed phase loses only its figures
//! (they appear as "not measured" with the error).

use crate::pg::{self, Durability};
use crate::{run_checked, workspace_root};
use anyhow::{Context, bail};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Sizes of one run.
struct Plan {
    quick: bool,
    /// Seconds of each pgbench run.
    pgbench_secs: u32,
    /// Seconds of each write run.
    write_secs: u32,
    /// Sites that take writes (a door and a user each).
    full_sites: usize,
    /// The small idle fleet and the full one.
    small_fleet: usize,
    fleet: usize,
    /// Agents sending events for G5.
    ingest_agents: usize,
    /// Sites (door and user) that take the writes and hold agents in the
    /// site-count phase.
    scale_full: usize,
    /// Sites in the database for the site-count figures, smallest first.
    site_counts: [(&'static str, i64); 3],
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                pgbench_secs: 2,
                write_secs: 2,
                full_sites: 40,
                small_fleet: 100,
                fleet: 500,
                ingest_agents: 20,
                scale_full: 20,
                site_counts: [
                    ("sites_small", 1_000),
                    ("sites_mid", 2_500),
                    ("sites_large", 5_000),
                ],
            }
        } else {
            Plan {
                quick,
                pgbench_secs: 8,
                write_secs: 8,
                full_sites: 200,
                small_fleet: 1_000,
                fleet: 10_000,
                ingest_agents: 100,
                scale_full: 100,
                site_counts: [
                    ("sites_small", 1_000),
                    ("sites_mid", 10_000),
                    ("sites_large", 50_000),
                ],
            }
        }
    }
}

/// The results file, appended line by line.
struct Results {
    path: PathBuf,
    figures: HashMap<String, f64>,
    /// The numeric `info` and `baseline` lines (operation counts and the like).
    infos: HashMap<String, f64>,
}

impl Results {
    fn new(path: PathBuf) -> anyhow::Result<Results> {
        std::fs::write(&path, "")?;
        Ok(Results {
            path,
            figures: HashMap::new(),
            infos: HashMap::new(),
        })
    }

    /// Results that go nowhere: a phase's figures read here and not reported.
    fn scratch() -> Results {
        Results {
            path: PathBuf::from("/dev/null"),
            figures: HashMap::new(),
            infos: HashMap::new(),
        }
    }

    fn line(&mut self, line: &str) {
        eprintln!("bench: {line}");
        let mut words = line.splitn(3, ' ');
        match (words.next(), words.next(), words.next()) {
            (Some("figure"), Some(id), Some(v)) => {
                if let Ok(v) = v.trim().parse() {
                    self.figures.insert(id.to_owned(), v);
                }
            }
            (Some("info" | "baseline"), Some(id), Some(v)) => {
                if let Ok(v) = v.trim().parse() {
                    self.infos.insert(id.to_owned(), v);
                }
            }
            _ => {}
        }
        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&self.path) {
            let _ = writeln!(f, "{line}");
        }
    }

    fn missing(&mut self, prefix: &str, why: &anyhow::Error) {
        let why = format!("{why:#}").replace('\n', " ");
        self.line(&format!("missing {prefix} {why}"));
    }
}

/// A child process stopped with SIGTERM (then waited for) when dropped.
struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("bench: {} did not stop on SIGTERM; killing it", self.what);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `bin args…` with the open-files limit raised for 10k+ connections.
fn many_files(bin: &Path) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("ulimit -n 200000 2>/dev/null || ulimit -n \"$(ulimit -Hn)\"; exec \"$0\" \"$@\"")
        .arg(bin);
    c
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_port(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{what} did not listen on {port} within 60 s")
}

/// Resident set size of `pid` in KiB (VmRSS of /proc/<pid>/status).
fn rss_kb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// CPU time (user + system) that processes spent, from `/proc`: on a saturated
/// machine a closed-loop run is bound by what each operation costs in CPU, and
/// which process spends it tells keyplane's own work from PostgreSQL's.
struct CpuMeter {
    postmaster: u32,
    tick_ms: f64,
}

/// The parent, the CPU ticks (user + system) and the ticks of the waited-for
/// children of process `pid` (`/proc/<pid>/stat` fields 4, 14+15 and 16+17).
fn stat_ticks(pid: &str) -> anyhow::Result<(u32, u64, u64)> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?)
}

/// [`stat_ticks`] of the text of a `/proc/<pid>/stat`.
fn parse_stat(text: &str) -> anyhow::Result<(u32, u64, u64)> {
    // The command name may hold spaces and parentheses: field 3 starts after the last ')'.
    let rest = text.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field =
        |n: usize| -> anyhow::Result<u64> { Ok(fields.get(n - 3).context("short stat")?.parse()?) };
    Ok((
        u32::try_from(field(4)?)?,
        field(14)? + field(15)?,
        field(16)? + field(17)?,
    ))
}

impl CpuMeter {
    fn new(db: &pg::Database) -> anyhow::Result<CpuMeter> {
        let postmaster = db
            .postmaster_pid()
            .context("the bench cluster has no postmaster.pid")?;
        stat_ticks(&postmaster.to_string()).context("reading the postmaster's CPU time")?;
        let hz: f64 = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0);
        Ok(CpuMeter {
            postmaster,
            tick_ms: 1000.0 / hz,
        })
    }

    /// PostgreSQL's server processes, in ms: the postmaster with the children it has
    /// reaped, and its live children. Read again when a child was reaped meanwhile,
    /// so an exiting backend is counted once.
    fn postgres_ms(&self) -> anyhow::Result<f64> {
        let me = self.postmaster.to_string();
        for _ in 0..20 {
            let (_, _, reaped) = stat_ticks(&me)?;
            let mut live = 0;
            for entry in std::fs::read_dir("/proc")?.flatten() {
                let name = entry.file_name();
                let Some(pid) = name
                    .to_str()
                    .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                else {
                    continue;
                };
                if let Ok((parent, ticks, _)) = stat_ticks(pid)
                    && parent == self.postmaster
                {
                    live += ticks;
                }
            }
            let (_, own_after, reaped_after) = stat_ticks(&me)?;
            if reaped_after == reaped {
                return Ok((own_after + reaped + live) as f64 * self.tick_ms);
            }
        }
        bail!("PostgreSQL's backends kept exiting while their CPU time was read")
    }

    /// Process `pid`'s own CPU time, in ms.
    fn process_ms(&self, pid: u32) -> anyhow::Result<f64> {
        Ok(stat_ticks(&pid.to_string())?.1 as f64 * self.tick_ms)
    }

    /// The CPU time of this process's children that have been waited for, in ms.
    fn reaped_children_ms(&self) -> anyhow::Result<f64> {
        Ok(stat_ticks("self")?.2 as f64 * self.tick_ms)
    }
}

/// PostgreSQL's, keyplaned's (`server`) and the writers' (`client`) CPU time so
/// far, in ms.
fn service_cpu(meter: &CpuMeter, server: u32, client: u32) -> anyhow::Result<[f64; 3]> {
    Ok([
        meter.postgres_ms()?,
        meter.process_ms(server)?,
        meter.process_ms(client)?,
    ])
}

/// A `keyplane-load drive` process: commands in, result lines out.
struct Driver {
    proc: Proc,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Driver {
    /// `dealer_token` reaches the driver through its environment, not its arguments.
    fn start(load: &Path, args: &[&str], dealer_token: &str) -> anyhow::Result<Driver> {
        let mut child = many_files(load)
            .arg("drive")
            .args(args)
            .env("KEYPLANE_DEALER_TOKEN", dealer_token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting keyplane-load drive")?;
        let stdin = child.stdin.take().context("drive stdin")?;
        let stdout = child.stdout.take().context("drive stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Driver {
            proc: Proc {
                child,
                what: "keyplane-load drive".into(),
            },
            stdin,
            lines,
        };
        d.until(|l| l == "ready", Duration::from_secs(60))?;
        Ok(d)
    }

    /// A driver whose agents and writes go to keyplaned at `url`, on the sites of
    /// the file `sites`.
    fn on_sites(
        load: &Path,
        url: &str,
        sites: &Path,
        dealer_token: &str,
    ) -> anyhow::Result<Driver> {
        let sites = sites.display().to_string();
        Driver::start(
            load,
            &["--agents", url, "--admin", url, "--sites", &sites],
            dealer_token,
        )
    }

    fn send(&mut self, command: &str) -> anyhow::Result<()> {
        eprintln!("bench: > {command}");
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Lines until one satisfies `stop` (which is not returned).
    fn until(
        &mut self,
        stop: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .map_err(|_| anyhow::anyhow!("keyplane-load drive went quiet or exited"))?;
            if stop(&line) {
                return Ok(out);
            }
            out.push(line);
        }
    }

    /// Runs a command; its `figure`/`info` lines go to `results`.
    fn run(&mut self, command: &str, results: &mut Results) -> anyhow::Result<()> {
        self.send(command)?;
        let lines = self.until(|l| l == "done", Duration::from_secs(900))?;
        let mut error = None;
        for l in lines {
            if let Some(e) = l.strip_prefix("error ") {
                error = Some(e.to_owned());
            } else if l.starts_with("figure ")
                || l.starts_with("info ")
                || l.starts_with("missing ")
            {
                results.line(&l);
            }
        }
        match error {
            Some(e) => bail!("{command}: {e}"),
            None => Ok(()),
        }
    }
}

/// Runs the suite.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    if let Some(other) = args.iter().find(|a| *a != "--quick") {
        bail!("unknown bench argument {other:?} (only --quick)");
    }
    let plan = Plan::new(quick);
    let root = workspace_root();
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    run_checked(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .env("CARGO_BUILD_JOBS", "2")
            .args([
                "build",
                "--release",
                "-p",
                "keyplane-server",
                "-p",
                "keyplane-bench",
                "-p",
                "keyplane-agent",
            ]),
        "building keyplaned, keyplane-agent and keyplane-load in release",
    )?;
    let started = Instant::now();
    let bin = root.join("target/release");
    let mut results = Results::new(out.join("results.txt"))?;
    machine_info(&mut results, &bin, quick);

    let db = pg::fresh_cluster("bench/pg", Durability::Durable)?;
    let outcome = suite(&plan, &db, &bin, &out, &mut results);
    db.stop();
    if let Err(e) = &outcome {
        eprintln!("bench: the suite stopped early: {e:#}");
    }
    // Whatever a failed phase left unrecorded is reported as such, never made up.
    for goal in ["G1", "G2", "G3", "G4", "G5", "X"] {
        results.line(&format!(
            "missing {goal} no result recorded: its phase failed or did not run (see the bench log)"
        ));
    }
    results.line(&format!(
        "info duration_s {:.0}",
        started.elapsed().as_secs_f64()
    ));
    run_checked(
        Command::new(bin.join("keyplane-load"))
            .arg("report")
            .arg("--results")
            .arg(out.join("results.txt"))
            .arg("--out-dir")
            .arg(&out),
        "writing target/bench/report.json and report.md",
    )?;
    eprintln!(
        "bench: done in {:.0} s (release build not counted): target/bench/report.md",
        started.elapsed().as_secs_f64()
    );
    outcome
}

fn machine_info(results: &mut Results, bin: &Path, quick: bool) {
    let sh = |cmd: &str| {
        Command::new("sh")
            .args(["-c", cmd])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().replace('\n', " "))
            .unwrap_or_default()
    };
    results.line(&format!(
        "info mode {}",
        if quick { "quick" } else { "full" }
    ));
    results.line(&format!("info date {}", sh("date -u +%Y-%m-%dT%H:%M:%SZ")));
    results.line(&format!("info nproc {}", sh("nproc")));
    results.line(&format!(
        "info cpu {}",
        sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2")
    ));
    results.line(&format!(
        "info memory {}",
        sh("grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2-3")
    ));
    results.line(&format!("info kernel {}", sh("uname -r")));
    for (name, id) in [
        ("keyplaned", "X.keyplaned_bin_mb"),
        ("keyplane-agent", "X.agent_bin_mb"),
    ] {
        if let Ok(m) = std::fs::metadata(bin.join(name)) {
            results.line(&format!("figure {id} {:.2}", m.len() as f64 / 1e6));
        }
    }
}

fn suite(
    plan: &Plan,
    db: &pg::Database,
    bin: &Path,
    out: &Path,
    results: &mut Results,
) -> anyhow::Result<()> {
    let pgbin = db.bin_dir().context("the bench cluster is private")?;
    let version = Command::new(pgbin.join("postgres"))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    results.line(&format!("info postgres {version}"));
    run_checked(
        Command::new(bin.join("keyplaned"))
            .arg("migrate")
            .env("DATABASE_URL", &db.url),
        "keyplaned migrate",
    )?;
    let pgb = Pgbench::prepare(db, pgbin, out, plan.pgbench_secs)?;
    let meter = CpuMeter::new(db)
        .inspect_err(|e| eprintln!("bench: no CPU time per operation: {e:#}"))
        .ok();

    pgb.baselines(results, meter.as_ref())?;
    if let Err(e) = harness(plan, bin, results) {
        eprintln!("bench: the echo harness failed: {e:#}");
    }

    if let Err(e) = keyplane(plan, db, bin, out, results, &pgb, meter.as_ref()) {
        eprintln!("bench: the keyplane phases stopped: {e:#}");
        results.missing("G", &e);
    }
    if let Err(e) = scale(plan, db, bin, out, results) {
        eprintln!("bench: the site-count and codes phase stopped: {e:#}");
        results.missing("G1.sites", &e);
        results.missing("G2.sites", &e);
        results.missing("G1.codes", &e);
        results.missing("X.snapshot", &e);
    }

    pgb.baselines(results, meter.as_ref())?;
    if let Err(e) = harness(plan, bin, results) {
        eprintln!("bench: the echo harness failed: {e:#}");
    }
    Ok(())
}

/// What one pgbench run measured.
struct PgbenchRun {
    tps: f64,
    /// Latency quantiles, ms.
    p50: f64,
    p99: f64,
    /// CPU per transaction (ms) of PostgreSQL and of pgbench, when metered.
    cpu: Option<(f64, f64)>,
}

/// pgbench runs against the bench cluster.
struct Pgbench {
    pgbench: PathBuf,
    psql: PathBuf,
    url: String,
    dir: PathBuf,
    secs: u32,
}

/// What one CreateCredential (one door in scope) writes, in one transaction, on
/// copies of keyplane's tables in schema `schema`: the site row lock, the
/// credential, its partition and its door, its slot, the revision, the change
/// record and the audit entry. Reads keyplane makes to decide are not in it: they
/// are keyplane's own overhead. `schema` is `bench` (the copies keep keyplane's
/// foreign keys between them, which PostgreSQL checks on every row written: B_txn)
/// or `bench_bare` (no foreign keys and no partition row, the B_txn of the
/// benchmark's first rounds, still reported beside it: B_txn_bare). `sites` is
/// how many sites the transactions spread over: 1,000, or 1 for B_txn_busy, which
/// takes turns on one site row lock as G1's busy site does.
fn txn_script(schema: &str, sites: u32) -> String {
    let partition_row = if schema == "bench" {
        "INSERT INTO bench.credential_partition (site_id, credential_id, partition) VALUES (md5(:s::text)::uuid, md5(:c::text)::uuid, 1);\n"
    } else {
        ""
    };
    format!(
        r#"\set s random(1, {sites})
\set c random(1, 9000000000000000000)
\set slot random(1, 2000000000)
BEGIN;
SELECT revision FROM {schema}.site WHERE id = md5(:s::text)::uuid FOR NO KEY UPDATE;
INSERT INTO {schema}.credential (site_id, id, user_id, display_name, pin_sealed, pin_key_id, pin_hash, created_partition) VALUES (md5(:s::text)::uuid, md5(:c::text)::uuid, md5((:s * 7)::text)::uuid, 'bench', decode(md5(:c::text) || md5(:s::text), 'hex'), 'k0123456789abcdef', decode(md5((:c + 1)::text), 'hex'), 1);
{partition_row}INSERT INTO {schema}.credential_device (site_id, credential_id, device_id) VALUES (md5(:s::text)::uuid, md5(:c::text)::uuid, md5((:s * 3)::text)::uuid);
INSERT INTO {schema}.slot_assignment (site_id, device_id, slot, credential_id, pin_hash) VALUES (md5(:s::text)::uuid, md5((:s * 3)::text)::uuid, :slot, md5(:c::text)::uuid, decode(md5((:c + 1)::text), 'hex'));
UPDATE {schema}.site SET revision = revision + 1 WHERE id = md5(:s::text)::uuid RETURNING revision;
INSERT INTO {schema}.site_change (site_id, revision, device_id, slot) VALUES (md5(:s::text)::uuid, :c, md5((:s * 3)::text)::uuid, :slot);
WITH p AS (UPDATE {schema}.site SET audit_seq = audit_seq + 1 WHERE id = md5(:s::text)::uuid RETURNING audit_seq) INSERT INTO {schema}.audit_log (dealer_id, site_id, position, actor, action, resource, peer, detail) SELECT md5('dealer')::uuid, md5(:s::text)::uuid, p.audit_seq, 'dealer', 'credential.create', 'sites/' || md5(:s::text)::uuid || '/users/' || md5((:s * 7)::text)::uuid || '/credentials/' || md5(:c::text)::uuid, '127.0.0.1:50000', '{{"revision": 1, "slots": 1}}' FROM p;
COMMIT;
"#
    )
}

/// The pgbench tables. `bench` copies the tables a create writes and their
/// parents (same columns, checks and indexes), with a user, partition 1 and a
/// door on each of 1,000 sites, and then copies each foreign key of keyplane's
/// between two copied tables, so a B_txn row is checked as a keyplane row is.
/// `bench_bare` copies only the written tables, without foreign keys.
const SETUP_SQL: &str = r#"
DROP SCHEMA IF EXISTS bench CASCADE;
DROP SCHEMA IF EXISTS bench_bare CASCADE;
CREATE SCHEMA bench;
CREATE SCHEMA bench_bare;
CREATE TABLE bench.ins (id bigserial PRIMARY KEY, v integer NOT NULL, t timestamptz NOT NULL DEFAULT now());
CREATE TABLE bench.sel (id integer PRIMARY KEY, v text NOT NULL);
INSERT INTO bench.sel SELECT g, md5(g::text) FROM generate_series(1, 100000) g;
DO $$
DECLARE
    copied CONSTANT text[] := ARRAY['site', 'site_user', 'partition', 'device', 'credential',
        'credential_partition', 'credential_device', 'slot_assignment', 'site_change', 'audit_log'];
    bare CONSTANT text[] := ARRAY['site', 'credential', 'credential_device', 'slot_assignment',
        'site_change', 'audit_log'];
    t text;
    k record;
BEGIN
    FOREACH t IN ARRAY copied LOOP
        EXECUTE format('CREATE TABLE bench.%I (LIKE public.%I INCLUDING ALL)', t, t);
    END LOOP;
    FOREACH t IN ARRAY bare LOOP
        EXECUTE format('CREATE TABLE bench_bare.%I (LIKE public.%I INCLUDING ALL)', t, t);
    END LOOP;
    -- pg_get_constraintdef names the referenced table unqualified (public is on the
    -- search path), so pointing it at the copy is a prefix.
    FOR k IN SELECT c.conrelid::regclass::text AS child, c.conname, pg_get_constraintdef(c.oid) AS def
               FROM pg_constraint c
              WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace
                AND c.conrelid::regclass::text = ANY (copied)
                AND c.confrelid::regclass::text = ANY (copied)
    LOOP
        EXECUTE format('ALTER TABLE bench.%I ADD CONSTRAINT %I %s',
            k.child, k.conname, replace(k.def, 'REFERENCES ', 'REFERENCES bench.'));
    END LOOP;
END $$;
INSERT INTO bench.site (id, dealer_id, display_name, time_zone)
    SELECT md5(g::text)::uuid, md5('dealer')::uuid, 'site ' || g, 'Europe/Paris' FROM generate_series(1, 1000) g;
INSERT INTO bench_bare.site SELECT * FROM bench.site;
INSERT INTO bench.site_user (site_id, id, display_name)
    SELECT md5(g::text)::uuid, md5((g * 7)::text)::uuid, 'user ' || g FROM generate_series(1, 1000) g;
INSERT INTO bench.partition (site_id, number, display_name)
    SELECT md5(g::text)::uuid, 1, 'Area 1' FROM generate_series(1, 1000) g;
INSERT INTO bench.device (site_id, id, display_name, kind, model, partition)
    SELECT md5(g::text)::uuid, md5((g * 3)::text)::uuid, 'Door', 'door', 'door-1000', 1 FROM generate_series(1, 1000) g;
VACUUM ANALYZE;
"#;

impl Pgbench {
    fn prepare(db: &pg::Database, pgbin: &Path, out: &Path, secs: u32) -> anyhow::Result<Pgbench> {
        let dir = out.join("pgbench");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("ins.sql"),
            "\\set v random(1, 1000000)\nINSERT INTO bench.ins (v) VALUES (:v);\n",
        )?;
        std::fs::write(dir.join("txn.sql"), txn_script("bench", 1000))?;
        std::fs::write(dir.join("txn_bare.sql"), txn_script("bench_bare", 1000))?;
        std::fs::write(dir.join("txn_busy.sql"), txn_script("bench", 1))?;
        std::fs::write(
            dir.join("sel.sql"),
            "\\set id random(1, 100000)\nSELECT v FROM bench.sel WHERE id = :id;\n",
        )?;
        let p = Pgbench {
            pgbench: pgbin.join("pgbench"),
            psql: pgbin.join("psql"),
            url: db.url.clone(),
            dir,
            secs,
        };
        std::fs::write(p.dir.join("setup.sql"), SETUP_SQL)?;
        run_checked(
            Command::new(&p.psql)
                .arg(&p.url)
                .args(["-q", "-v", "ON_ERROR_STOP=1", "-f"])
                .arg(p.dir.join("setup.sql"))
                .stdout(Stdio::null()),
            "creating the pgbench tables",
        )?;
        Ok(p)
    }

    /// One run: TPS, p50 and p99 (ms) from the per-transaction log; with `meter`,
    /// also the CPU per transaction (ms) of PostgreSQL and of pgbench itself.
    fn one(
        &self,
        script: &str,
        clients: u32,
        meter: Option<&CpuMeter>,
    ) -> anyhow::Result<PgbenchRun> {
        let prefix = self.dir.join(format!("log_{script}_{clients}"));
        for e in std::fs::read_dir(&self.dir)?.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("log_{script}_{clients}."))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let before = meter
            .map(|m| anyhow::Ok((m, m.postgres_ms()?, m.reaped_children_ms()?)))
            .transpose()?;
        let output = Command::new(&self.pgbench)
            .arg("-n")
            .arg("-c")
            .arg(clients.to_string())
            .arg("-j")
            .arg(clients.min(4).to_string())
            .arg("-T")
            .arg(self.secs.to_string())
            .arg("-f")
            .arg(self.dir.join(format!("{script}.sql")))
            .arg("--log")
            .arg("--log-prefix")
            .arg(&prefix)
            .arg(&self.url)
            .current_dir(&self.dir)
            .output()
            .context("running pgbench")?;
        let text = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "pgbench {script} -c {clients} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let tps = text
            .lines()
            .find(|l| l.starts_with("tps = "))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|v| v.parse().ok())
            .context("no tps in pgbench output")?;
        let cpu = match before {
            Some((m, postgres, pgbench)) => {
                let transactions: f64 = text
                    .lines()
                    .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
                    .and_then(|v| v.split(['/', ' ']).next())
                    .and_then(|v| v.parse().ok())
                    .filter(|n: &f64| *n > 0.0)
                    .context("no transaction count in pgbench output")?;
                Some((
                    (m.postgres_ms()? - postgres) / transactions,
                    (m.reaped_children_ms()? - pgbench) / transactions,
                ))
            }
            None => None,
        };
        let mut lat = Vec::new();
        for e in std::fs::read_dir(&self.dir)?.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("log_{script}_{clients}."))
            {
                for line in std::fs::read_to_string(e.path())?.lines() {
                    // client_id transaction_no time(us) script_no epoch epoch_us
                    if let Some(us) = line
                        .split_whitespace()
                        .nth(2)
                        .and_then(|v| v.parse::<f64>().ok())
                    {
                        lat.push(us / 1000.0);
                    }
                }
            }
        }
        lat.sort_by(f64::total_cmp);
        if lat.is_empty() {
            bail!("pgbench {script} -c {clients} logged no transactions");
        }
        let q = |q: f64| lat[((q * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1];
        Ok(PgbenchRun {
            tps,
            p50: q(0.5),
            p99: q(0.99),
            cpu,
        })
    }

    /// B_txn at 8 clients once more, as a sample of `B_txn.c8.adjacent.tps`: run
    /// right before and right after G1's 8-client run, the baseline its target is
    /// judged by; B_txn_bare beside it, for the row that compares with the rounds
    /// before B_txn checked foreign keys. A failed run is said in the log and
    /// leaves the sample out.
    fn adjacent_txn(&self, results: &mut Results) {
        for (name, script) in [("B_txn", "txn"), ("B_txn_bare", "txn_bare")] {
            match self.one(script, 8, None) {
                Ok(run) => results.line(&format!("baseline {name}.c8.adjacent.tps {:.1}", run.tps)),
                Err(e) => eprintln!("bench: {name} beside G1 failed: {e:#}"),
            }
        }
    }

    /// Every baseline; with `meter`, B_txn at 8 clients also records its CPU per
    /// transaction, for G1's rows of CPU per write.
    fn baselines(&self, results: &mut Results, meter: Option<&CpuMeter>) -> anyhow::Result<()> {
        for (name, script, clients) in [
            ("B_ins", "ins", &[1u32, 8, 32][..]),
            ("B_txn", "txn", &[1, 8, 32][..]),
            ("B_txn_bare", "txn_bare", &[8][..]),
            ("B_txn_busy", "txn_busy", &[8][..]),
            ("B_sel", "sel", &[8][..]),
        ] {
            for &c in clients {
                let metered = meter.filter(|_| name == "B_txn" && c == 8);
                let PgbenchRun { tps, p50, p99, cpu } = self.one(script, c, metered)?;
                results.line(&format!("baseline {name}.c{c}.tps {tps:.1}"));
                results.line(&format!("baseline {name}.c{c}.p50_ms {p50:.3}"));
                results.line(&format!("baseline {name}.c{c}.p99_ms {p99:.3}"));
                if let Some((postgres, pgbench)) = cpu {
                    results.line(&format!(
                        "baseline {name}.c{c}.cpu_ms.postgres {postgres:.4}"
                    ));
                    results.line(&format!("baseline {name}.c{c}.cpu_ms.client {pgbench:.4}"));
                }
            }
        }
        Ok(())
    }
}

/// The plain tonic echo harness: accept rate, memory per connection, round trip.
fn harness(plan: &Plan, bin: &Path, results: &mut Results) -> anyhow::Result<()> {
    let port = free_port()?;
    let mut server = Proc {
        child: many_files(&bin.join("keyplane-load"))
            .args(["echo-serve", "--listen", &format!("127.0.0.1:{port}")])
            .spawn()
            .context("starting the echo harness")?,
        what: "echo harness".into(),
    };
    wait_port(port, "the echo harness")?;
    std::thread::sleep(Duration::from_millis(300));
    let rss0 = rss_kb(server.pid())?;
    let mut drive = Driver::start(
        &bin.join("keyplane-load"),
        &["--agents", &format!("http://127.0.0.1:{port}")],
        "",
    )?;
    let mut scratch = Results::scratch();
    drive.run(&format!("connect {} H", plan.fleet), &mut scratch)?;
    std::thread::sleep(Duration::from_millis(500));
    let rss1 = rss_kb(server.pid())?;
    drive.run(
        &format!("ingest {} {} 0 H", plan.ingest_agents, plan.write_secs),
        &mut scratch,
    )?;
    drive.send("quit")?;
    drive.proc.stop();
    server.stop();
    let f = &scratch.figures;
    let get = |k: &str| {
        f.get(k)
            .copied()
            .with_context(|| format!("harness gave no {k}"))
    };
    results.line(&format!(
        "baseline H.accept_per_s {:.1}",
        get("H.accept_per_s")?
    ));
    results.line(&format!("baseline H.connect_s {:.3}", get("H.connect_s")?));
    results.line(&format!(
        "baseline H.rss_per_conn_kb {:.3}",
        (rss1 - rss0) / plan.fleet as f64
    ));
    results.line(&format!(
        "baseline H.rtt_p50_ms {:.3}",
        get("H.rtt_p50_ms")?
    ));
    results.line(&format!(
        "baseline H.rtt_p99_ms {:.3}",
        get("H.rtt_p99_ms")?
    ));
    Ok(())
}

fn keyplaned(bin: &Path, url: &str, key: &Path, port: u16) -> anyhow::Result<Proc> {
    let child = many_files(&bin.join("keyplaned"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--pin-key-file",
        ])
        .arg(key)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .spawn()
        .context("starting keyplaned")?;
    let p = Proc {
        child,
        what: format!("keyplaned :{port}"),
    };
    wait_port(port, "keyplaned")?;
    Ok(p)
}

fn keyplane(
    plan: &Plan,
    db: &pg::Database,
    bin: &Path,
    out: &Path,
    results: &mut Results,
    pgb: &Pgbench,
    meter: Option<&CpuMeter>,
) -> anyhow::Result<()> {
    let key = out.join("pin.key");
    let _ = std::fs::remove_file(&key);
    run_checked(
        Command::new(bin.join("keyplaned"))
            .arg("keygen")
            .arg("--out")
            .arg(&key)
            .stdout(Stdio::null()),
        "keyplaned keygen",
    )?;
    let boot = Command::new(bin.join("keyplaned"))
        .args(["bootstrap-dealer", "--display-name", "Bench dealer"])
        .env("DATABASE_URL", &db.url)
        .output()?;
    let token = String::from_utf8_lossy(&boot.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("token: ").map(str::to_owned))
        .context("bootstrap-dealer printed no token")?;

    let port_a = free_port()?;
    let mut a = keyplaned(bin, &db.url, &key, port_a)?;
    let url_a = format!("http://127.0.0.1:{port_a}");
    let sites = out.join("sites.txt");
    let seed_started = Instant::now();
    let seeded = Command::new(bin.join("keyplane-load"))
        .args(["seed", "--server", &url_a])
        .env("KEYPLANE_DEALER_TOKEN", &token)
        .args(["--full", &plan.full_sites.to_string()])
        .args(["--bare", &(plan.fleet - plan.full_sites).to_string()])
        .arg("--out")
        .arg(&sites)
        .output()?;
    if !seeded.status.success() {
        bail!(
            "seeding sites failed: {}",
            String::from_utf8_lossy(&seeded.stderr)
        );
    }
    for l in String::from_utf8_lossy(&seeded.stdout).lines() {
        results.line(l);
    }
    results.line(&format!(
        "info seed_s {:.1}",
        seed_started.elapsed().as_secs_f64()
    ));
    settle(db)?;
    let mut drive = Driver::on_sites(&bin.join("keyplane-load"), &url_a, &sites, &token)?;
    let secs = plan.write_secs;
    // keyplaned's pool opens its connections and their statement caches fill on the
    // first writes: not part of a steady write rate (pgbench's connections are
    // warm after their first transactions too).
    let mut scratch = Results::scratch();
    drive.run("write 8 2 many warmup", &mut scratch)?;

    // G1 without agents.
    for mode in ["many", "busy"] {
        for c in [1, 8, 32] {
            let id = format!("G1.{mode}.c{c}");
            // The run of G1's target row: profiled on request, B_txn run beside it,
            // its CPU per write metered.
            let target_run = id == "G1.many.c8";
            // KEYPLANE_BENCH_PERF=1: profile keyplaned under this load (for
            // docs/BENCHMARKS.md; it slows the run down, so not by default).
            let perf = (target_run && std::env::var_os("KEYPLANE_BENCH_PERF").is_some())
                .then(|| {
                    Command::new("perf")
                        .args([
                            "record",
                            "-g",
                            "-F",
                            "499",
                            "-p",
                            &a.pid().to_string(),
                            "-o",
                        ])
                        .arg(out.join("perf.data"))
                        .stderr(Stdio::null())
                        .spawn()
                })
                .and_then(Result::ok);
            // B_txn at 8 clients right before and right after the 8-client run: the
            // machine's speed drifts by 10-20 % over the minutes between the
            // baselines at the start and at the end of the suite, which alone moved
            // this ratio from 0.63 to 0.84 x over three runs of one binary.
            if target_run {
                pgb.adjacent_txn(results);
            }
            // The CPU each write costs, and whose: beside B_txn's at 8 clients.
            let metered = meter.filter(|_| target_run);
            let cpu_before = metered.map(|m| (m, service_cpu(m, a.pid(), drive.proc.pid())));
            if let Err(e) = drive.run(&format!("write {c} {secs} {mode} {id}"), results) {
                results.missing(&id, &e);
            }
            if let Some((m, before)) = cpu_before {
                let per_write = before.and_then(|before| {
                    let after = service_cpu(m, a.pid(), drive.proc.pid())?;
                    let writes = results
                        .infos
                        .get(&format!("{id}.ops"))
                        .copied()
                        .filter(|n| *n > 0.0)
                        .context("no writes completed")?;
                    if !results.infos.contains_key("B_txn.c8.cpu_ms.postgres") {
                        bail!("B_txn's CPU per transaction was not read");
                    }
                    Ok([0, 1, 2].map(|i| (after[i] - before[i]) / writes))
                });
                match per_write {
                    Ok([postgres, keyplaned, client]) => {
                        results.line(&format!("figure {id}.cpu_ms.postgres {postgres:.4}"));
                        results.line(&format!("figure {id}.cpu_ms.keyplaned {keyplaned:.4}"));
                        results.line(&format!("figure {id}.cpu_ms.client {client:.4}"));
                    }
                    Err(e) => results.missing(&format!("{id}.cpu_ms"), &e),
                }
            } else if target_run {
                results.missing(
                    &format!("{id}.cpu_ms"),
                    &anyhow::anyhow!("no CPU time per operation on this machine"),
                );
            }
            if target_run {
                pgb.adjacent_txn(results);
            }
            if let Some(mut p) = perf {
                let _ = Command::new("kill")
                    .arg("-INT")
                    .arg(p.id().to_string())
                    .status();
                let _ = p.wait();
            }
        }
    }

    // G1 with fleets; G3 from keyplaned's RSS before and after the full fleet.
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = rss_kb(a.pid())?;
    drive.run(
        &format!("connect {} G1.agents_small", plan.small_fleet),
        results,
    )?;
    if let Err(e) = drive.run(&format!("write 8 {secs} many G1.agents_small.c8"), results) {
        results.missing("G1.agents_small", &e);
    }
    // G5: acks + events, alone and during 8-client writes, with the small fleet
    // connected (the full fleet alone saturates keyplaned today, see BENCHMARKS.md).
    let n = plan.ingest_agents;
    if let Err(e) = drive.run(&format!("ingest {n} {secs} 0 G5.alone"), results) {
        results.missing("G5.alone", &e);
    }
    if let Err(e) = drive.run(&format!("ingest {n} {secs} 8 G5.during_g1"), results) {
        results.missing("G5.during_g1", &e);
    }

    drive.run(&format!("connect {} G1.agents_full", plan.fleet), results)?;
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = rss_kb(a.pid())?;
    results.line(&format!("info G3.keyplaned_rss_idle_kb {rss_before:.0}"));
    results.line(&format!("info G3.keyplaned_rss_fleet_kb {rss_after:.0}"));
    results.line(&format!(
        "figure G3.rss_per_agent_kb {:.3}",
        (rss_after - rss_before) / plan.fleet as f64
    ));
    if let Err(e) = drive.run(&format!("write 8 {secs} many G1.agents_full.c8"), results) {
        results.missing("G1.agents_full", &e);
    }

    // G2: half the peak G1 write rate, with the whole fleet connected.
    let peak = results
        .figures
        .get("G1.many.c8.tps")
        .copied()
        .unwrap_or(100.0);
    let rate = (peak / 2.0).max(1.0);
    let prop_secs = if plan.quick { 3 } else { 15 };
    if let Err(e) = drive.run(
        &format!("prop {rate:.1} {prop_secs} {url_a} G2.one"),
        results,
    ) {
        results.missing("G2.one", &e);
    }

    // Agent RSS: the real agent on one site, with its simulated door.
    if let Err(e) = agent_rss(bin, &url_a, &sites, out, results) {
        results.missing("X.agent_rss", &e);
    }

    // G4: restart keyplaned under the whole fleet.
    if let Err(e) = storm(&mut drive, &mut a, bin, db, &key, port_a, secs, results) {
        results.missing("G4", &e);
    }

    // G2 across replicas: agents on A, writes through B.
    let port_b = free_port()?;
    let b = keyplaned(bin, &db.url, &key, port_b);
    match b {
        Ok(_b) => {
            let url_b = format!("http://127.0.0.1:{port_b}");
            if let Err(e) = drive.run(
                &format!("prop {rate:.1} {prop_secs} {url_b} G2.cross"),
                results,
            ) {
                results.missing("G2.cross", &e);
            }
        }
        Err(e) => results.missing("G2.cross", &e),
    }
    drive.send("quit")?;
    drive.proc.stop();

    // G1 with only idle agents, last (so G3 above is not read after a fleet came and
    // went): with every session above closed, 8 clients write with no agent
    // connected, then again while a second driver holds an agent on every site no
    // write touches (the sites without a device). The fleets above include the
    // written sites' own agents, which catch up and ack after each write.
    if let Err(e) = idle_fleet(plan, db, bin, out, &url_a, &token, results) {
        results.missing("G1.agents_idle", &e);
    }
    a.stop();
    Ok(())
}

/// The bench cluster's psql.
fn psql(db: &pg::Database) -> anyhow::Result<PathBuf> {
    Ok(db
        .bin_dir()
        .context("the bench cluster is private")?
        .join("psql"))
}

/// Leaves the database as pgbench's tables are left before B_ins and B_txn run:
/// vacuumed, analyzed and checkpointed, so the writes measured next do not run
/// beside autovacuum's first pass over the freshly seeded tables and the flush of
/// the seed's pages (the first G1 figures of the 18:01Z run were 1.8 x below the
/// same load at the end of the run, docs/BENCHMARKS.md).
fn settle(db: &pg::Database) -> anyhow::Result<()> {
    let psql = psql(db)?;
    for sql in ["VACUUM ANALYZE", "CHECKPOINT"] {
        run_checked(
            Command::new(&psql)
                .arg(&db.url)
                .args(["-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
                .stdout(Stdio::null()),
            "settling the seeded database",
        )?;
    }
    Ok(())
}

/// Waits (up to 2 minutes) until keyplaned has recorded every agent session closed.
fn wait_no_agents(db: &pg::Database) -> anyhow::Result<()> {
    let psql = psql(db)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let open = Command::new(&psql)
            .arg(&db.url)
            .args([
                "-qAt",
                "-c",
                "SELECT count(*) FROM site WHERE agent_connected",
            ])
            .output()?;
        if String::from_utf8_lossy(&open.stdout).trim() == "0" {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("agent sessions still open 2 minutes after their drivers quit");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// G1 (8 clients, many sites) with no agent connected, then while a second
/// `keyplane-load drive` holds an agent on each site without a device.
fn idle_fleet(
    plan: &Plan,
    db: &pg::Database,
    bin: &Path,
    out: &Path,
    url: &str,
    token: &str,
    results: &mut Results,
) -> anyhow::Result<()> {
    wait_no_agents(db)?;
    let load = bin.join("keyplane-load");
    let all_sites = out.join("sites.txt");
    let mut writer = Driver::on_sites(&load, url, &all_sites, token)?;
    let secs = plan.write_secs;
    writer.run(&format!("write 8 {secs} many G1.agents_idle.base"), results)?;
    let text = std::fs::read_to_string(&all_sites)?;
    let idle: Vec<&str> = text
        .lines()
        .filter(|l| l.split(' ').nth(2) == Some("-"))
        .collect();
    let sites = out.join("idle-sites.txt");
    std::fs::write(&sites, idle.join("\n") + "\n")?;
    let mut fleet = Driver::on_sites(&load, url, &sites, token)?;
    fleet.run(&format!("connect {} G1.agents_idle", idle.len()), results)?;
    results.line(&format!("info G1.agents_idle.agents {}", idle.len()));
    let measured = writer.run(&format!("write 8 {secs} many G1.agents_idle.c8"), results);
    fleet.send("quit")?;
    fleet.proc.stop();
    writer.send("quit")?;
    writer.proc.stop();
    measured
}

// The restart needs everything keyplaned was started with.
#[allow(clippy::too_many_arguments)]
fn storm(
    drive: &mut Driver,
    a: &mut Proc,
    bin: &Path,
    db: &pg::Database,
    key: &Path,
    port: u16,
    idle_secs: u32,
    results: &mut Results,
) -> anyhow::Result<()> {
    drive.send(&format!("storm {idle_secs} G4"))?;
    drive.until(|l| l == "restart", Duration::from_secs(60))?;
    a.stop();
    *a = keyplaned(bin, &db.url, key, port)?;
    drive.send("restarted")?;
    let lines = drive.until(|l| l == "done", Duration::from_secs(900))?;
    let mut error = None;
    for l in lines {
        if let Some(e) = l.strip_prefix("error ") {
            error = Some(e.to_owned());
        } else if l.starts_with("figure ") || l.starts_with("info ") || l.starts_with("missing ") {
            results.line(&l);
        }
    }
    match error {
        Some(e) => bail!("storm: {e}"),
        None => Ok(()),
    }
}

fn agent_rss(
    bin: &Path,
    url: &str,
    sites: &Path,
    out: &Path,
    results: &mut Results,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(sites)?;
    let first = text.lines().nth(1).context("no site")?;
    let words: Vec<&str> = first.split(' ').collect();
    let dir = out.join("agent");
    let _ = std::fs::remove_dir_all(&dir);
    let mut agent = Proc {
        child: Command::new(bin.join("keyplane-agent"))
            .args(["--server", url, "--site", words[0]])
            .env("KEYPLANE_AGENT_TOKEN", words[1])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--sim-dir")
            .arg(dir.join("devices"))
            .env("RUST_LOG", "warn")
            .spawn()
            .context("starting keyplane-agent")?,
        what: "keyplane-agent".into(),
    };
    std::thread::sleep(Duration::from_secs(3));
    let rss = rss_kb(agent.pid())?;
    agent.stop();
    results.line(&format!("figure X.agent_rss_kb {rss:.0}"));
    Ok(())
}

/// The site-count and codes figures, on their own database of the bench cluster
/// (so the database holds exactly the sites counted) and their own keyplaned:
/// - the real agent applying a 1,000-code snapshot to a simulated door;
/// - 8-client writes on one site whose door holds 10, then 1,000 codes;
/// - G1 (8 clients) and G2 with 1k, 10k and 50k sites in the database (quick: 1k,
///   2.5k, 5k). The bulk sites are inserted by `keyplane-load seed-sql` straight
///   into PostgreSQL (volume only); every measured write goes through the API.
fn scale(
    plan: &Plan,
    db: &pg::Database,
    bin: &Path,
    out: &Path,
    results: &mut Results,
) -> anyhow::Result<()> {
    let pgbin = db.bin_dir().context("the bench cluster is private")?;
    let (server, _) = db
        .url
        .rsplit_once('/')
        .context("the bench database URL has no database name")?;
    let url = format!("{server}/keyplane_scale");
    for sql in [
        "DROP DATABASE IF EXISTS keyplane_scale",
        "CREATE DATABASE keyplane_scale",
    ] {
        run_checked(
            Command::new(pgbin.join("psql"))
                .arg(&db.url)
                .args(["-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
                .stdout(Stdio::null()),
            "creating the site-count database",
        )?;
    }
    run_checked(
        Command::new(bin.join("keyplaned"))
            .arg("migrate")
            .env("DATABASE_URL", &url),
        "keyplaned migrate (site-count database)",
    )?;
    let boot = Command::new(bin.join("keyplaned"))
        .args(["bootstrap-dealer", "--display-name", "Bench dealer"])
        .env("DATABASE_URL", &url)
        .output()?;
    let token = String::from_utf8_lossy(&boot.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("token: ").map(str::to_owned))
        .context("bootstrap-dealer printed no token")?;
    let port = free_port()?;
    let mut server = keyplaned(bin, &url, &out.join("pin.key"), port)?;
    let api = format!("http://127.0.0.1:{port}");
    let load = bin.join("keyplane-load");
    let secs = plan.write_secs;

    // One site per code count, through the API. The 1,000-code door is first
    // applied by the real agent (timed); then it keeps 992 codes, so that each of
    // the 8 write clients finds a free slot (a full door refuses the create) and
    // the door holds 1,000 codes with every write in flight.
    for (codes, hold, snapshot) in [(10usize, 10usize, false), (1_000, 992, true)] {
        let id = format!("G1.codes_{codes}");
        let file = out.join(format!("codes_{codes}.txt"));
        let mut cmd = Command::new(&load);
        cmd.args(["codes", "--server", &api])
            .env("KEYPLANE_DEALER_TOKEN", &token)
            .args(["--codes", &codes.to_string()])
            .args(["--hold", &hold.to_string()])
            .arg("--out")
            .arg(&file);
        if snapshot {
            cmd.args(["--snapshot", "X.snapshot_1000_ms"]);
        }
        let made = cmd.output()?;
        for l in String::from_utf8_lossy(&made.stdout).lines() {
            results.line(l);
        }
        if !made.status.success() {
            let e = anyhow::anyhow!(
                "creating the {codes}-code site failed: {}",
                String::from_utf8_lossy(&made.stderr).trim()
            );
            results.missing(&id, &e);
            if snapshot {
                results.missing("X.snapshot_1000_ms", &e);
            }
            continue;
        }
        let writes = Driver::on_sites(&load, &api, &file, &token).and_then(|mut d| {
            let r = d.run(&format!("write 8 {secs} busy {id}.c8"), results);
            let _ = d.send("quit");
            d.proc.stop();
            r
        });
        if let Err(e) = writes {
            results.missing(&id, &e);
        }
    }

    // Sites that take the writes and hold the agents, through the API.
    let sites = out.join("scale_sites.txt");
    let seeded = Command::new(&load)
        .args(["seed", "--server", &api])
        .env("KEYPLANE_DEALER_TOKEN", &token)
        .args(["--full", &plan.scale_full.to_string(), "--bare", "0"])
        .arg("--out")
        .arg(&sites)
        .output()?;
    if !seeded.status.success() {
        bail!(
            "seeding the site-count sites failed: {}",
            String::from_utf8_lossy(&seeded.stderr)
        );
    }
    let mut drive = Driver::on_sites(&load, &api, &sites, &token)?;
    drive.run(&format!("connect {} S.agents", plan.scale_full), results)?;
    let prop_secs = if plan.quick { 3 } else { 15 };
    // One propagation write rate for every size (half the smallest size's G1), so
    // the sizes differ only in the sites the database holds.
    let mut rate = None;
    for (name, total) in plan.site_counts {
        let started = Instant::now();
        let bulk = Command::new(&load)
            .args([
                "seed-sql",
                "--database-url",
                &url,
                "--total",
                &total.to_string(),
            ])
            .output()?;
        if !bulk.status.success() {
            let e = anyhow::anyhow!(
                "seed-sql to {total} sites failed: {}",
                String::from_utf8_lossy(&bulk.stderr).trim()
            );
            results.missing(&format!("G1.{name}"), &e);
            results.missing(&format!("G2.{name}"), &e);
            continue;
        }
        for l in String::from_utf8_lossy(&bulk.stdout).lines() {
            results.line(&l.replace("info seed_sql.", &format!("info seed_sql.{name}.")));
        }
        results.line(&format!("info {name}.sites {total}"));
        results.line(&format!(
            "info {name}.seed_s {:.1}",
            started.elapsed().as_secs_f64()
        ));
        let id = format!("G1.{name}.c8");
        if let Err(e) = drive.run(&format!("write 8 {secs} many {id}"), results) {
            results.missing(&id, &e);
        }
        let r = *rate.get_or_insert_with(|| {
            (results
                .figures
                .get(&format!("{id}.tps"))
                .copied()
                .unwrap_or(100.0)
                / 2.0)
                .max(1.0)
        });
        let id = format!("G2.{name}");
        if let Err(e) = drive.run(&format!("prop {r:.1} {prop_secs} {api} {id}"), results) {
            results.missing(&id, &e);
        }
    }
    drive.send("quit")?;
    drive.proc.stop();
    server.stop();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_give_parent_cpu_and_reaped_children_whatever_the_command_name() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt
        // cmajflt utime stime cutime cstime ...
        let line = "4242 (postgres: kp (idle) x) S 17 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 50 7 3 20 0 1 0 123 456 789";
        assert_eq!(parse_stat(line).expect("parsed"), (17, 300, 10));
        let own = stat_ticks("self").expect("this process's stat");
        assert!(own.0 > 0, "a parent pid: {own:?}");
        assert!(parse_stat("4242 (cut short) S 17 1 2").is_err());
        assert!(parse_stat("no parenthesis").is_err());
    }
}
