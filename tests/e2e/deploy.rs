//! The deployable artifacts under `deploy/` (issue 17) read as an operator's cluster
//! would: the Kubernetes manifests and the compose file are parsed and checked for
//! images, non-root and read-only containers, probes, resources and secrets kept out
//! of the files; and every `KEYPLANE_*` variable and every flag that deploy/ hands
//! keyplaned or keyplane-agent must appear in that binary's `--help`, so a renamed
//! flag breaks this test instead of a deployment.

use anyhow::{Context, bail, ensure};
use serde_yaml_ng::Value;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn read(rel: &str) -> anyhow::Result<String> {
    let path = root().join(rel);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Every document of a YAML file, merge keys (`<<: *anchor`) applied.
fn yaml_docs(rel: &str) -> anyhow::Result<Vec<Value>> {
    use serde::Deserialize;
    let text = read(rel)?;
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let mut value = Value::deserialize(doc).with_context(|| format!("parsing {rel}"))?;
        value
            .apply_merge()
            .with_context(|| format!("merge keys in {rel}"))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// `value[a][b]…`, Null when any step is missing.
fn at<'a>(value: &'a Value, path: &[&str]) -> &'a Value {
    path.iter()
        .fold(value, |v, key| v.get(*key).unwrap_or(&Value::Null))
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(value, path).as_str()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// An image reference with a tag that names a release (not `latest`).
fn check_image(image: Option<&str>, what: &str) -> anyhow::Result<String> {
    let image = image.with_context(|| format!("{what}: no image"))?;
    let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
    ensure!(
        !tag.is_empty() && !tag.contains('/') && tag != "latest",
        "{what}: image {image:?} is not pinned to a tag"
    );
    Ok(image.to_owned())
}

/// A database URL or other value that carries a password in clear.
fn has_inline_password(value: &str) -> bool {
    let Some((_, rest)) = value.split_once("://") else {
        return value.contains("password=");
    };
    // Up to the path: `?` may stand inside ${VAR:?message}.
    let authority = rest.split('/').next().unwrap_or("");
    let password = authority
        .rsplit_once('@')
        .and_then(|(user, _)| user.split_once(':'))
        .map(|(_, p)| p);
    // $(VAR) (Kubernetes) and ${VAR} (compose) are filled in from a secret.
    password.is_some_and(|p| !(p.starts_with("$(") || p.starts_with("${")))
        || rest.contains("password=")
}

/// A binary of this workspace next to the test binary (`cargo xtask test` builds
/// both; see its build step).
fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join(name))
        .with_context(|| format!("no target directory above {}", exe.display()))?;
    ensure!(
        bin.exists(),
        "{} is missing: build it (cargo build -p keyplane-agent --bin keyplane-agent -p keyplane-server --bin keyplaned)",
        bin.display()
    );
    Ok(bin)
}

/// What a binary accepts, from its `--help` and every subcommand's.
struct Cli {
    /// Help text of the binary ("") and of each subcommand.
    help: HashMap<String, String>,
}

impl Cli {
    fn load(name: &str) -> anyhow::Result<Cli> {
        let bin = binary(name)?;
        let run = |args: &[&str]| -> anyhow::Result<String> {
            let out = Command::new(&bin)
                .args(args)
                .env_clear()
                .output()
                .with_context(|| format!("running {name} {args:?}"))?;
            ensure!(out.status.success(), "{name} {args:?} failed: {out:?}");
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let top = run(&["--help"])?;
        let mut help = HashMap::new();
        let subcommands: Vec<String> = top
            .lines()
            .skip_while(|l| !l.starts_with("Commands:"))
            .skip(1)
            .take_while(|l| !l.trim().is_empty())
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .filter(|s| s != "help")
            .collect();
        ensure!(!subcommands.is_empty(), "{name} --help lists no subcommand");
        for sub in subcommands {
            let text = run(&[&sub, "--help"])?;
            help.insert(sub, text);
        }
        help.insert(String::new(), top);
        Ok(Cli { help })
    }

    /// Every `KEYPLANE_*` name the help texts mention (clap's `[env: …]` and the
    /// variables they point to, such as KEYPLANE_AGENT_TOKEN).
    fn env_names(&self) -> BTreeSet<String> {
        self.help.values().flat_map(|t| keyplane_names(t)).collect()
    }

    /// Whether `flag` (`--name`) is an option of `sub` ("" for the binary itself).
    fn has_flag(&self, sub: &str, flag: &str) -> bool {
        self.help.get(sub).is_some_and(|text| {
            text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .any(|word| word == flag)
        })
    }
}

fn keyplane_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .filter(|w| w.starts_with("KEYPLANE_") && w.len() > "KEYPLANE_".len())
        .map(str::to_owned)
        .collect()
}

/// The two binaries' command lines.
struct Clis {
    keyplaned: Cli,
    agent: Cli,
}

impl Clis {
    fn cli(&self, program: &str) -> Option<&Cli> {
        match program.rsplit('/').next().unwrap_or(program) {
            "keyplaned" => Some(&self.keyplaned),
            "keyplane-agent" => Some(&self.agent),
            _ => None,
        }
    }

    /// Checks the arguments `args` given to `program` (keyplaned takes a subcommand
    /// first; the agent runs with none). Returns the subcommand.
    fn check_args(&self, program: &str, args: &[String], what: &str) -> anyhow::Result<String> {
        let cli = self
            .cli(program)
            .with_context(|| format!("{what}: {program} is neither binary"))?;
        let mut sub = String::new();
        for arg in args {
            if let Some(flag) = arg.strip_prefix("--") {
                let flag = format!("--{}", flag.split('=').next().unwrap_or(flag));
                ensure!(
                    cli.has_flag(&sub, &flag) || cli.has_flag("", &flag),
                    "{what}: {program} {sub} has no {flag} (see its --help)"
                );
            } else if sub.is_empty() && cli.help.contains_key(arg.as_str()) {
                sub = arg.clone();
            }
        }
        if program.ends_with("keyplaned") {
            ensure!(
                !sub.is_empty(),
                "{what}: keyplaned without a known subcommand: {args:?}"
            );
        }
        Ok(sub)
    }
}

/// The commands a shell script (or a systemd unit's Exec lines) runs keyplaned or
/// keyplane-agent with: each invocation's words up to the end of its command.
fn invocations(text: &str) -> Vec<(String, Vec<String>)> {
    let joined = text.replace("\\\n", " ");
    let mut out = Vec::new();
    for line in joined.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let line =
            line.split_once('=').map_or(
                line,
                |(key, rest)| {
                    if key.starts_with("Exec") { rest } else { line }
                },
            );
        let words: Vec<&str> = line.split_whitespace().collect();
        // Inside a double-quoted string (an echo's message) a name is just text.
        let mut quoted = false;
        for (i, word) in words.iter().enumerate() {
            let was_quoted = quoted;
            quoted ^= word.matches('"').count() % 2 == 1;
            // A flag's value (`--server-name keyplaned`) is no command.
            if was_quoted || i > 0 && words[i - 1].starts_with("--") {
                continue;
            }
            let program = word.rsplit("$(").next().unwrap_or(word).trim_matches('"');
            let base = program.rsplit('/').next().unwrap_or(program);
            if base != "keyplaned" && base != "keyplane-agent" {
                continue;
            }
            let args = words[i + 1..]
                .iter()
                .take_while(|w| !matches!(**w, "|" | "&" | "&&" | "||" | ";" | ")" | ");"))
                .map(|w| w.trim_end_matches(')').to_owned())
                .collect();
            out.push((base.to_owned(), args));
        }
    }
    out
}

fn check_pod_spec(spec: &Value, what: &str, clis: &Clis) -> anyhow::Result<()> {
    ensure!(
        at(spec, &["securityContext", "runAsNonRoot"]).as_bool() == Some(true),
        "{what}: the pod does not set runAsNonRoot"
    );
    ensure!(
        at(spec, &["securityContext", "runAsUser"])
            .as_u64()
            .is_some_and(|u| u > 0),
        "{what}: the pod runs as root"
    );
    let containers = at(spec, &["containers"])
        .as_sequence()
        .with_context(|| format!("{what}: no containers"))?;
    for c in containers {
        let name = str_at(c, &["name"]).unwrap_or("?");
        let what = format!("{what}, container {name}");
        let image = check_image(str_at(c, &["image"]), &what)?;
        let sc = at(c, &["securityContext"]);
        ensure!(
            at(sc, &["allowPrivilegeEscalation"]).as_bool() == Some(false),
            "{what}: allowPrivilegeEscalation is not false"
        );
        ensure!(
            at(sc, &["readOnlyRootFilesystem"]).as_bool() == Some(true),
            "{what}: the root filesystem is writable"
        );
        ensure!(
            strings(at(sc, &["capabilities", "drop"])).contains(&"ALL".to_owned()),
            "{what}: capabilities are not all dropped"
        );
        for kind in ["requests", "limits"] {
            for res in ["cpu", "memory"] {
                ensure!(
                    !at(c, &["resources", kind, res]).is_null(),
                    "{what}: no resources.{kind}.{res}"
                );
            }
        }
        let env = at(c, &["env"]).as_sequence().cloned().unwrap_or_default();
        for var in &env {
            let var_name = str_at(var, &["name"]).unwrap_or("");
            if let Some(value) = str_at(var, &["value"]) {
                ensure!(
                    !has_inline_password(value),
                    "{what}: {var_name} holds a password inline: take it from a Secret"
                );
                for secretish in ["PASSWORD", "TOKEN", "SECRET"] {
                    ensure!(
                        !var_name.contains(secretish),
                        "{what}: {var_name} is set inline: use valueFrom.secretKeyRef"
                    );
                }
            }
        }
        // keyplaned is the image's entrypoint: args are its command line.
        if image.contains("keyplaned") && at(c, &["command"]).is_null() {
            clis.check_args("keyplaned", &strings(at(c, &["args"])), &what)?;
        }
    }
    Ok(())
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_mapping()
        .is_some_and(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn check_kubernetes(clis: &Clis) -> anyhow::Result<()> {
    let mut docs = Vec::new();
    for file in ["deploy/k8s/keyplaned.yaml", "deploy/k8s/migrate-job.yaml"] {
        for doc in yaml_docs(file)? {
            docs.push((file, doc));
        }
    }
    let kustomization = yaml_docs("deploy/k8s/kustomization.yaml")?;
    let listed = strings(at(&kustomization[0], &["resources"]));
    for file in ["keyplaned.yaml", "migrate-job.yaml"] {
        ensure!(
            listed.contains(&file.to_owned()),
            "kustomization.yaml omits {file}"
        );
    }
    let of_kind = |kind: &str| -> Vec<&Value> {
        docs.iter()
            .filter(|(_, d)| str_at(d, &["kind"]) == Some(kind))
            .map(|(_, d)| d)
            .collect()
    };
    for (file, doc) in &docs {
        // Secrets are made outside the repository; none may be committed here.
        ensure!(
            str_at(doc, &["kind"]) != Some("Secret"),
            "{file}: a Secret is committed"
        );
    }

    let deployments = of_kind("Deployment");
    ensure!(deployments.len() == 1, "one keyplaned Deployment");
    let deployment = deployments[0];
    ensure!(
        at(deployment, &["spec", "replicas"])
            .as_u64()
            .is_some_and(|r| r >= 2),
        "the Deployment runs fewer than two replicas"
    );
    let pod = at(deployment, &["spec", "template", "spec"]);
    check_pod_spec(pod, "Deployment keyplaned", clis)?;
    let labels = at(deployment, &["spec", "template", "metadata", "labels"]);
    ensure!(
        labels_match(at(deployment, &["spec", "selector", "matchLabels"]), labels),
        "the Deployment's selector does not match its pods"
    );
    let container = &pod["containers"][0];
    let grpc_port = at(container, &["ports"])
        .as_sequence()
        .and_then(|ports| {
            ports
                .iter()
                .find(|p| str_at(p, &["name"]) == Some("grpc"))
                .and_then(|p| at(p, &["containerPort"]).as_u64())
        })
        .context("keyplaned has no port named grpc")?;
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let command = strings(at(container, &[probe, "exec", "command"]));
        ensure!(
            command.first().map(String::as_str) == Some("grpc_health_probe"),
            "keyplaned's {probe} does not ask grpc.health.v1: {command:?}"
        );
        ensure!(
            command.contains(&format!("-addr=127.0.0.1:{grpc_port}")),
            "keyplaned's {probe} does not ask the grpc port {grpc_port}: {command:?}"
        );
        // keyplaned serves TLS on every non-loopback address, loopback included
        // once TLS is configured: a plaintext probe would always fail.
        ensure!(
            command.contains(&"-tls".to_owned()),
            "keyplaned's {probe} speaks plaintext"
        );
    }
    let env: Vec<String> = at(container, &["env"])
        .as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|v| str_at(v, &["name"]).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for needed in [
        "KEYPLANE_DATABASE_URL",
        "KEYPLANE_PIN_KEY_FILE",
        "KEYPLANE_TLS_CERT_FILE",
        "KEYPLANE_TLS_KEY_FILE",
        "KEYPLANE_CA_KEY_FILE",
        "KEYPLANE_LISTEN",
    ] {
        ensure!(
            env.iter().any(|e| e == needed),
            "keyplaned's Deployment does not set {needed}"
        );
    }
    for volume in at(pod, &["volumes"]).as_sequence().into_iter().flatten() {
        if let Some(secret) = str_at(volume, &["secret", "secretName"]) {
            ensure!(
                at(volume, &["secret", "defaultMode"])
                    .as_u64()
                    .is_some_and(|m| m & 0o007 == 0),
                "secret volume {secret} is readable by every user"
            );
        }
    }

    let services = of_kind("Service");
    ensure!(
        services
            .iter()
            .any(|s| labels_match(at(s, &["spec", "selector"]), labels)),
        "no Service selects keyplaned's pods"
    );
    let pdbs = of_kind("PodDisruptionBudget");
    ensure!(
        pdbs.iter()
            .any(|p| labels_match(at(p, &["spec", "selector", "matchLabels"]), labels)),
        "no PodDisruptionBudget covers keyplaned's pods"
    );

    let jobs = of_kind("Job");
    ensure!(jobs.len() == 1, "one migration Job");
    let job_pod = at(jobs[0], &["spec", "template", "spec"]);
    check_pod_spec(job_pod, "Job keyplaned-migrate", clis)?;
    let job = &job_pod["containers"][0];
    ensure!(
        str_at(job, &["image"]).is_some_and(|i| i.contains("keyplaned"))
            && at(job, &["command"]).is_null()
            && strings(at(job, &["args"])) == ["migrate"],
        "the migration Job does not run `keyplaned migrate`"
    );
    ensure!(
        matches!(
            str_at(job_pod, &["restartPolicy"]),
            Some("Never" | "OnFailure")
        ),
        "the migration Job restarts forever"
    );
    Ok(())
}

fn check_compose(clis: &Clis) -> anyhow::Result<()> {
    let docs = yaml_docs("deploy/compose/compose.yaml")?;
    let services = at(&docs[0], &["services"])
        .as_mapping()
        .context("compose.yaml has no services")?;
    let service = |name: &str| -> anyhow::Result<&Value> {
        services
            .get(name)
            .with_context(|| format!("compose.yaml has no {name} service"))
    };
    for name in [
        "postgres",
        "keyplaned",
        "keyplane-agent",
        "otel-collector",
        "prometheus",
    ] {
        service(name)?;
    }
    for (name, s) in services {
        let name = name.as_str().unwrap_or("?");
        let what = format!("compose service {name}");
        check_image(str_at(s, &["image"]), &what)?;
        let env = at(s, &["environment"]);
        for (key, value) in env.as_mapping().into_iter().flatten() {
            let (key, value) = (key.as_str().unwrap_or(""), value.as_str().unwrap_or(""));
            ensure!(
                !has_inline_password(value),
                "{what}: {key} holds a password inline"
            );
            if key.contains("PASSWORD") {
                ensure!(
                    value.starts_with("${"),
                    "{what}: {key} is inline: take it from the environment"
                );
            }
        }
        if name == "postgres" {
            continue;
        }
        ensure!(
            at(s, &["read_only"]).as_bool() == Some(true),
            "{what}: the root filesystem is writable"
        );
        ensure!(
            strings(at(s, &["cap_drop"])).contains(&"ALL".to_owned()),
            "{what}: capabilities are not all dropped"
        );
        ensure!(
            strings(at(s, &["security_opt"])).contains(&"no-new-privileges:true".to_owned()),
            "{what}: no-new-privileges is not set"
        );
        if let Some(user) = str_at(s, &["user"]) {
            ensure!(
                !matches!(user.split(':').next(), Some("0" | "root")),
                "{what} runs as root"
            );
        }
    }
    let keyplaned = service("keyplaned")?;
    ensure!(
        strings(at(keyplaned, &["healthcheck", "test"])).contains(&"grpc_health_probe".to_owned()),
        "compose keyplaned has no gRPC health check"
    );
    clis.check_args(
        "keyplaned",
        &strings(at(keyplaned, &["command"])),
        "compose keyplaned",
    )?;
    for (name, script) in [
        ("keyplane-init", "/deploy/init.sh"),
        ("keyplane-agent", "/deploy/agent.sh"),
    ] {
        ensure!(
            strings(at(service(name)?, &["entrypoint"])).contains(&script.to_owned()),
            "compose {name} does not run {script} (checked below)"
        );
    }
    Ok(())
}

/// The Dockerfiles: multi-stage, and the image runs as an unprivileged user.
fn check_dockerfiles() -> anyhow::Result<()> {
    for (file, binary) in [
        ("deploy/docker/keyplaned.Dockerfile", "keyplaned"),
        ("deploy/docker/keyplane-agent.Dockerfile", "keyplane-agent"),
    ] {
        let text = read(file)?;
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .collect();
        let stages = lines.iter().filter(|l| l.starts_with("FROM ")).count();
        ensure!(stages >= 2, "{file}: not a multi-stage build");
        let last_stage = lines
            .iter()
            .rposition(|l| l.starts_with("FROM "))
            .unwrap_or(0);
        let user = lines[last_stage..]
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("USER "))
            .with_context(|| format!("{file}: the runtime image sets no USER"))?;
        ensure!(
            !matches!(user.split(':').next(), Some("0" | "root")),
            "{file}: runs as root"
        );
        ensure!(
            lines[last_stage..]
                .iter()
                .any(|l| l.starts_with("ENTRYPOINT") && l.contains(binary)),
            "{file}: the entrypoint is not {binary}"
        );
        for secret in ["pin.key", "ca.key", "token", "PASSWORD"] {
            ensure!(
                !lines.iter().any(|l| (l.starts_with("COPY")
                    || l.starts_with("ADD")
                    || l.starts_with("ENV"))
                    && l.contains(secret)),
                "{file}: {secret} is baked into the image"
            );
        }
    }
    Ok(())
}

/// Every deploy/ file that is not YAML handed to a parser above.
fn deploy_files() -> anyhow::Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, out)?;
            } else {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(&root().join("deploy"), &mut out)?;
    out.sort();
    Ok(out)
}

#[test]
fn deploy_manifests_are_hardened_and_match_the_binaries() -> anyhow::Result<()> {
    let clis = Clis {
        keyplaned: Cli::load("keyplaned")?,
        agent: Cli::load("keyplane-agent")?,
    };
    check_kubernetes(&clis)?;
    check_compose(&clis)?;
    check_dockerfiles()?;

    // Every KEYPLANE_* name anywhere under deploy/ (env entries, scripts, units,
    // comments) is one the binaries document.
    let known: BTreeSet<String> = clis
        .keyplaned
        .env_names()
        .union(&clis.agent.env_names())
        .cloned()
        .collect();
    ensure!(
        known.contains("KEYPLANE_DATABASE_URL") && known.contains("KEYPLANE_SITE"),
        "the help texts name no environment variables: {known:?}"
    );
    let mut checked = 0;
    let mut invoked = 0;
    for path in deploy_files()? {
        let rel = path
            .strip_prefix(root())
            .unwrap_or(&path)
            .display()
            .to_string();
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for name in keyplane_names(&text) {
            ensure!(
                known.contains(&name),
                "{rel} names {name}, which neither keyplaned nor keyplane-agent --help mentions"
            );
            checked += 1;
        }
        // Shell scripts and systemd units: their command lines.
        if rel.ends_with(".sh") || rel.ends_with(".service") {
            for (program, args) in invocations(&text) {
                clis.check_args(&program, &args, &rel)?;
                invoked += 1;
            }
        }
    }
    ensure!(
        checked > 10,
        "only {checked} KEYPLANE_ names found under deploy/"
    );
    // init.sh alone runs keyplaned six times; the units and agent.sh add three.
    ensure!(
        invoked >= 9,
        "only {invoked} command lines found under deploy/"
    );
    Ok(())
}

#[test]
fn the_drift_check_catches_a_renamed_flag() -> anyhow::Result<()> {
    let clis = Clis {
        keyplaned: Cli::load("keyplaned")?,
        agent: Cli::load("keyplane-agent")?,
    };
    let script = "keyplaned ca-init --out d --server-name keyplaned\n\
                  keyplaned serve --listen 127.0.0.1:1 \\\n    --pin-key-file k\n\
                  seed=$(KEYPLANE_TOKEN=\"$t\" keyplaned demo-seed --server x)\n\
                  exec keyplane-agent --site \"$site\" --token-file f\n\
                  echo \"then: docker compose exec keyplaned cat x\"\n";
    let found = invocations(script);
    assert_eq!(found.len(), 4, "{found:?}");
    for (program, args) in &found {
        clis.check_args(program, args, "script")?;
    }
    for (program, args) in [
        ("keyplaned", vec!["serve", "--pin-key", "k"]),
        ("keyplaned", vec!["migrate", "--listen", "x"]),
        ("keyplaned", vec!["--database-url", "x"]),
        ("keyplane-agent", vec!["--server-ca", "x"]),
        ("/usr/local/bin/keyplane-agent", vec!["--state", "x"]),
    ] {
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        if clis.check_args(program, &args, "bad").is_ok() {
            bail!("{program} {args:?} passed the check");
        }
    }
    assert!(has_inline_password("postgres://u:pw@h/db"));
    assert!(!has_inline_password("postgres://u:$(DB_PASSWORD)@h/db"));
    assert!(!has_inline_password("postgres://u:${DB_PASSWORD:?x}@h/db"));
    assert!(!has_inline_password(
        "postgres://u@h/db?sslmode=verify-full"
    ));
    assert!(has_inline_password("postgres://h/db?user=u&password=pw"));
    Ok(())
}
