//! The benchmark report: every figure beside the same-run baseline it is judged by.
//!
//! A run produces a results file of lines (`baseline ID VALUE`, `figure ID VALUE`,
//! `missing ID-PREFIX REASON`, `info KEY VALUE`); [`build`] turns it into the report
//! of [`ROWS`], refusing a measured figure whose baseline has no samples, and
//! [`validate`] checks a report's JSON has every row with its baseline and spread.

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// What a row's ratio must satisfy to be "met".
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// ratio >= the bound.
    AtLeast(f64),
    /// ratio <= the bound.
    AtMost(f64),
}

impl Target {
    fn holds(self, ratio: f64) -> bool {
        match self {
            Target::AtLeast(b) => ratio >= b,
            Target::AtMost(b) => ratio <= b,
        }
    }

    fn text(self) -> String {
        match self {
            Target::AtLeast(b) => format!(">= {b} x"),
            Target::AtMost(b) => format!("<= {b} x"),
        }
    }
}

/// One row of the report: a measured figure, the baseline it is divided by, a target.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    /// Goal group: G1..G5, X (extras).
    pub goal: &'static str,
    /// The measurement (a `figure` id in the results).
    pub figure: &'static str,
    /// What it is, for the table.
    pub title: &'static str,
    /// Unit of the figure.
    pub unit: &'static str,
    /// A `baseline` id, `figure:ID` (another figure of the run), or "" (informational).
    pub baseline: &'static str,
    /// Target on the ratio, if any.
    pub target: Option<Target>,
}

const fn row(
    goal: &'static str,
    figure: &'static str,
    title: &'static str,
    unit: &'static str,
    baseline: &'static str,
    target: Option<Target>,
) -> Row {
    Row {
        goal,
        figure,
        title,
        unit,
        baseline,
        target,
    }
}

use Target::{AtLeast, AtMost};

/// Every row of the report, in order.
pub const ROWS: &[Row] = &[
    // G1: writes with no agents connected.
    row(
        "G1",
        "G1.many.c1.tps",
        "writes/s, many sites, 1 client, vs B_ins",
        "ops/s",
        "B_ins.c1.tps",
        None,
    ),
    row(
        "G1",
        "G1.many.c1.tps",
        "writes/s, many sites, 1 client, vs B_txn",
        "ops/s",
        "B_txn.c1.tps",
        None,
    ),
    row(
        "G1",
        "G1.many.c1.p99_ms",
        "write p99, many sites, 1 client",
        "ms",
        "B_ins.c1.p99_ms",
        None,
    ),
    row(
        "G1",
        "G1.many.c8.tps",
        "writes/s, many sites, 8 clients, vs B_ins",
        "ops/s",
        "B_ins.c8.tps",
        Some(AtLeast(0.5)),
    ),
    row(
        "G1",
        "G1.many.c8.tps",
        "writes/s, many sites, 8 clients, vs B_txn run right before and right after it",
        "ops/s",
        "B_txn.c8.adjacent.tps",
        Some(AtLeast(0.8)),
    ),
    row(
        "G1",
        "G1.many.c8.tps",
        "writes/s, many sites, 8 clients, vs B_txn_bare (no foreign keys, no partition row) beside it",
        "ops/s",
        "B_txn_bare.c8.adjacent.tps",
        None,
    ),
    row(
        "G1",
        "G1.many.c8.tps",
        "writes/s, many sites, 8 clients, vs B_txn at the start and the end of the run",
        "ops/s",
        "B_txn.c8.tps",
        None,
    ),
    row(
        "G1",
        "G1.many.c8.p50_ms",
        "write p50, many sites, 8 clients",
        "ms",
        "B_ins.c8.p50_ms",
        None,
    ),
    row(
        "G1",
        "G1.many.c8.p99_ms",
        "write p99, many sites, 8 clients",
        "ms",
        "B_ins.c8.p99_ms",
        Some(AtMost(2.0)),
    ),
    // What bounds the row above: on two saturated cores, the CPU each write costs.
    row(
        "G1",
        "G1.many.c8.cpu_ms.postgres",
        "PostgreSQL CPU per write, many sites, 8 clients, vs per B_txn transaction",
        "ms",
        "B_txn.c8.cpu_ms.postgres",
        None,
    ),
    row(
        "G1",
        "G1.many.c8.cpu_ms.keyplaned",
        "keyplaned CPU per write, many sites, 8 clients (B_txn has no service between)",
        "ms",
        "",
        None,
    ),
    row(
        "G1",
        "G1.many.c8.cpu_ms.client",
        "the writers' CPU per write (gRPC clients), vs pgbench's per B_txn transaction",
        "ms",
        "B_txn.c8.cpu_ms.client",
        None,
    ),
    row(
        "G1",
        "G1.many.c32.tps",
        "writes/s, many sites, 32 clients, vs B_ins",
        "ops/s",
        "B_ins.c32.tps",
        None,
    ),
    row(
        "G1",
        "G1.many.c32.tps",
        "writes/s, many sites, 32 clients, vs B_txn",
        "ops/s",
        "B_txn.c32.tps",
        None,
    ),
    row(
        "G1",
        "G1.many.c32.p99_ms",
        "write p99, many sites, 32 clients",
        "ms",
        "B_ins.c32.p99_ms",
        None,
    ),
    row(
        "G1",
        "G1.busy.c1.tps",
        "writes/s, one busy site, 1 client, vs B_ins",
        "ops/s",
        "B_ins.c1.tps",
        None,
    ),
    row(
        "G1",
        "G1.busy.c8.tps",
        "writes/s, one busy site, 8 clients, vs B_ins",
        "ops/s",
        "B_ins.c8.tps",
        Some(AtLeast(0.5)),
    ),
    row(
        "G1",
        "G1.busy.c8.tps",
        "writes/s, one busy site, 8 clients, vs B_txn",
        "ops/s",
        "B_txn.c8.tps",
        Some(AtLeast(0.8)),
    ),
    row(
        "G1",
        "G1.busy.c8.tps",
        "writes/s, one busy site, 8 clients, vs B_txn_busy (B_txn on one site)",
        "ops/s",
        "B_txn_busy.c8.tps",
        None,
    ),
    row(
        "G1",
        "G1.busy.c8.p99_ms",
        "write p99, one busy site, 8 clients",
        "ms",
        "B_ins.c8.p99_ms",
        Some(AtMost(2.0)),
    ),
    row(
        "G1",
        "G1.busy.c32.tps",
        "writes/s, one busy site, 32 clients, vs B_ins",
        "ops/s",
        "B_ins.c32.tps",
        None,
    ),
    row(
        "G1",
        "G1.agents_idle.c8.tps",
        "writes/s, 8 clients, idle fleet (an agent on every site not written), vs none just before",
        "ops/s",
        "figure:G1.agents_idle.base.tps",
        Some(AtLeast(0.9)),
    ),
    row(
        "G1",
        "G1.agents_idle.c8.p99_ms",
        "write p99, 8 clients, idle fleet connected",
        "ms",
        "B_ins.c8.p99_ms",
        Some(AtMost(2.0)),
    ),
    row(
        "G1",
        "G1.agents_small.c8.tps",
        "writes/s, 8 clients, small fleet with the written sites' agents acking, vs no fleet",
        "ops/s",
        "figure:G1.many.c8.tps",
        Some(AtLeast(0.9)),
    ),
    row(
        "G1",
        "G1.agents_small.c8.p99_ms",
        "write p99, 8 clients, small fleet with the written sites' agents",
        "ms",
        "B_ins.c8.p99_ms",
        Some(AtMost(2.0)),
    ),
    row(
        "G1",
        "G1.agents_full.c8.tps",
        "writes/s, 8 clients, full fleet with the written sites' agents acking, vs no fleet",
        "ops/s",
        "figure:G1.many.c8.tps",
        Some(AtLeast(0.9)),
    ),
    row(
        "G1",
        "G1.agents_full.c8.p99_ms",
        "write p99, 8 clients, full fleet with the written sites' agents",
        "ms",
        "B_ins.c8.p99_ms",
        Some(AtMost(2.0)),
    ),
    // G2: commit -> the agent holding the site has the change.
    row(
        "G2",
        "G2.one.p50_ms",
        "propagation p50, one replica, full fleet, half-peak writes",
        "ms",
        "B_ins.c8.p50_ms",
        None,
    ),
    row(
        "G2",
        "G2.one.p99_ms",
        "propagation p99, one replica, full fleet, half-peak writes",
        "ms",
        "B_ins.c8.p99_ms",
        Some(AtMost(3.0)),
    ),
    row(
        "G2",
        "G2.cross.p50_ms",
        "propagation p50, write on another replica",
        "ms",
        "B_ins.c8.p50_ms",
        None,
    ),
    row(
        "G2",
        "G2.cross.p99_ms",
        "propagation p99, write on another replica",
        "ms",
        "B_ins.c8.p99_ms",
        Some(AtMost(3.0)),
    ),
    // G3: idle density.
    row(
        "G3",
        "G3.rss_per_agent_kb",
        "keyplaned RSS per idle agent vs harness per connection",
        "KiB",
        "H.rss_per_conn_kb",
        Some(AtMost(0.67)),
    ),
    // G4: reconnect storm.
    row(
        "G4",
        "G4.reconnect_per_s",
        "reconnects/s after a restart vs harness accepts/s",
        "conn/s",
        "H.accept_per_s",
        Some(AtLeast(0.5)),
    ),
    row(
        "G4",
        "G4.resynced",
        "agents resynced after the restart, of those connected",
        "agents",
        "figure:G4.agents",
        Some(AtLeast(1.0)),
    ),
    row(
        "G4",
        "G4.resync_s",
        "restart -> every agent resynced, vs harness connecting as many",
        "s",
        "H.connect_s",
        None,
    ),
    row(
        "G4",
        "G4.write_p99_storm_ms",
        "write p99 during the storm vs idle",
        "ms",
        "figure:G4.write_p99_idle_ms",
        Some(AtMost(5.0)),
    ),
    // G5: ingestion.
    row(
        "G5",
        "G5.alone.per_s",
        "acks + events stored/s vs one-row inserts/s (8 clients)",
        "rows/s",
        "B_ins.c8.tps",
        Some(AtLeast(1.0)),
    ),
    row(
        "G5",
        "G5.during_g1.per_s",
        "acks + events stored/s during 8-client writes",
        "rows/s",
        "B_ins.c8.tps",
        Some(AtLeast(1.0)),
    ),
    row(
        "G5",
        "G5.alone.rtt_p99_ms",
        "event -> EventAck p99 vs harness stream round trip p99",
        "ms",
        "H.rtt_p99_ms",
        None,
    ),
    // G1/G2 against the number of sites in the database (1k/10k/50k; quick
    // 1k/2.5k/5k): the bulk sites are inserted by SQL, the writes go through the API.
    row(
        "G1",
        "G1.sites_small.c8.tps",
        "writes/s, 8 clients, 1k sites in the database, vs B_ins",
        "ops/s",
        "B_ins.c8.tps",
        None,
    ),
    row(
        "G1",
        "G1.sites_mid.c8.tps",
        "writes/s, 8 clients, 10k sites (quick: 2.5k), vs B_ins",
        "ops/s",
        "B_ins.c8.tps",
        None,
    ),
    row(
        "G1",
        "G1.sites_mid.c8.tps",
        "writes/s, 8 clients, 10k sites (quick: 2.5k), vs 1k sites",
        "ops/s",
        "figure:G1.sites_small.c8.tps",
        None,
    ),
    row(
        "G1",
        "G1.sites_large.c8.tps",
        "writes/s, 8 clients, 50k sites (quick: 5k), vs B_ins",
        "ops/s",
        "B_ins.c8.tps",
        None,
    ),
    row(
        "G1",
        "G1.sites_large.c8.tps",
        "writes/s, 8 clients, 50k sites (quick: 5k), vs 1k sites",
        "ops/s",
        "figure:G1.sites_small.c8.tps",
        None,
    ),
    row(
        "G1",
        "G1.sites_small.c8.p99_ms",
        "write p99, 8 clients, 1k sites in the database",
        "ms",
        "B_ins.c8.p99_ms",
        None,
    ),
    row(
        "G1",
        "G1.sites_mid.c8.p99_ms",
        "write p99, 8 clients, 10k sites (quick: 2.5k), vs 1k sites",
        "ms",
        "figure:G1.sites_small.c8.p99_ms",
        None,
    ),
    row(
        "G1",
        "G1.sites_large.c8.p99_ms",
        "write p99, 8 clients, 50k sites (quick: 5k), vs 1k sites",
        "ms",
        "figure:G1.sites_small.c8.p99_ms",
        None,
    ),
    row(
        "G2",
        "G2.sites_small.p50_ms",
        "propagation p50, 1k sites in the database",
        "ms",
        "B_ins.c8.p50_ms",
        None,
    ),
    row(
        "G2",
        "G2.sites_small.p99_ms",
        "propagation p99, 1k sites in the database",
        "ms",
        "B_ins.c8.p99_ms",
        None,
    ),
    row(
        "G2",
        "G2.sites_mid.p50_ms",
        "propagation p50, 10k sites (quick: 2.5k), vs 1k sites",
        "ms",
        "figure:G2.sites_small.p50_ms",
        None,
    ),
    row(
        "G2",
        "G2.sites_mid.p99_ms",
        "propagation p99, 10k sites (quick: 2.5k), vs 1k sites",
        "ms",
        "figure:G2.sites_small.p99_ms",
        None,
    ),
    row(
        "G2",
        "G2.sites_large.p50_ms",
        "propagation p50, 50k sites (quick: 5k), vs 1k sites",
        "ms",
        "figure:G2.sites_small.p50_ms",
        None,
    ),
    row(
        "G2",
        "G2.sites_large.p99_ms",
        "propagation p99, 50k sites (quick: 5k), vs 1k sites",
        "ms",
        "figure:G2.sites_small.p99_ms",
        None,
    ),
    // G1 on one site against the codes its door holds: 10, and 992 so that each of
    // the 8 clients still finds a free slot (1,000 with every write in flight).
    row(
        "G1",
        "G1.codes_10.c8.tps",
        "writes/s, 8 clients, one site, 10 codes on its door, vs B_ins",
        "ops/s",
        "B_ins.c8.tps",
        None,
    ),
    row(
        "G1",
        "G1.codes_1000.c8.tps",
        "writes/s, 8 clients, one site, 1,000 codes on its door (992 + 8 in flight), vs 10",
        "ops/s",
        "figure:G1.codes_10.c8.tps",
        None,
    ),
    row(
        "G1",
        "G1.codes_1000.c8.p99_ms",
        "write p99, 8 clients, one site, 1,000 codes on its door (992 + 8 in flight), vs 10",
        "ms",
        "figure:G1.codes_10.c8.p99_ms",
        None,
    ),
    // Extras.
    row(
        "X",
        "X.keyplaned_bin_mb",
        "keyplaned release binary size",
        "MB",
        "",
        None,
    ),
    row(
        "X",
        "X.agent_bin_mb",
        "keyplane-agent release binary size",
        "MB",
        "",
        None,
    ),
    row(
        "X",
        "X.agent_rss_kb",
        "keyplane-agent RSS, one site, simulated devices",
        "KiB",
        "",
        None,
    ),
    row(
        "X",
        "X.snapshot_1000_ms",
        "real agent applies a 1,000-code snapshot to a simulated door (start -> applied at head)",
        "ms",
        "",
        None,
    ),
];

/// One measurement: a value, or why there is none.
#[derive(Debug, Clone, PartialEq)]
pub enum Measured {
    /// The measured value.
    Value(f64),
    /// Not measured, with the reason.
    NotMeasured(String),
}

/// Everything a run recorded.
#[derive(Debug, Clone, Default)]
pub struct Results {
    /// Baseline samples (before and after the keyplane runs).
    pub baselines: BTreeMap<String, Vec<f64>>,
    /// Measured figures.
    pub figures: BTreeMap<String, f64>,
    /// Figure-id prefixes that were not measured, with the reason.
    pub missing: Vec<(String, String)>,
    /// Machine and run facts.
    pub info: BTreeMap<String, String>,
}

impl Results {
    /// Parses the results file (see the module docs); unknown lines are errors.
    pub fn parse(text: &str) -> Result<Results, String> {
        let mut r = Results::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.splitn(3, ' ');
            let kind = words.next().unwrap_or_default();
            let id = words.next().unwrap_or_default().to_owned();
            let rest = words.next().unwrap_or_default().trim().to_owned();
            let number = || {
                rest.parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| format!("line {}: {rest:?} is not a number", n + 1))
            };
            match kind {
                "baseline" => r.baselines.entry(id).or_default().push(number()?),
                "figure" => {
                    r.figures.insert(id, number()?);
                }
                "missing" => r.missing.push((id, rest)),
                "info" => {
                    r.info.insert(id, rest);
                }
                _ => return Err(format!("line {}: unknown record {line:?}", n + 1)),
            }
        }
        Ok(r)
    }

    /// A figure's value, or why it is not measured (the first matching `missing`).
    pub fn measured(&self, figure: &str) -> Option<Measured> {
        if let Some(v) = self.figures.get(figure) {
            return Some(Measured::Value(*v));
        }
        self.missing
            .iter()
            .find(|(prefix, _)| figure.starts_with(prefix.as_str()))
            .map(|(_, why)| Measured::NotMeasured(why.clone()))
    }
}

/// The median of `samples` (None when empty).
pub fn median(samples: &[f64]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let mid = s.len() / 2;
    Some(if s.len().is_multiple_of(2) {
        (s[mid - 1] + s[mid]) / 2.0
    } else {
        s[mid]
    })
}

/// The `q`-quantile (0..=1) of sorted `samples`, nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Why a report cannot be built.
#[derive(Debug, Clone, PartialEq)]
pub enum ReportError {
    /// A row's figure is neither measured nor declared missing.
    NoFigure(String),
    /// A measured figure's baseline has no samples.
    NoBaseline {
        /// The figure.
        figure: String,
        /// Its baseline.
        baseline: String,
    },
}

impl std::fmt::Display for ReportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReportError::NoFigure(id) => write!(
                f,
                "figure {id} was neither measured nor declared missing (with a reason)"
            ),
            ReportError::NoBaseline { figure, baseline } => {
                write!(
                    f,
                    "figure {figure} is measured but its baseline {baseline} has no samples"
                )
            }
        }
    }
}

impl std::error::Error for ReportError {}

fn baseline_samples(results: &Results, baseline: &str) -> Vec<f64> {
    match baseline.strip_prefix("figure:") {
        Some(fig) => results.figures.get(fig).copied().into_iter().collect(),
        None => results.baselines.get(baseline).cloned().unwrap_or_default(),
    }
}

/// Builds the report JSON for `rows`.
pub fn build(rows: &[Row], results: &Results) -> Result<Value, ReportError> {
    let mut out = Vec::new();
    for r in rows {
        let mut measured = results
            .measured(r.figure)
            .ok_or_else(|| ReportError::NoFigure(r.figure.to_owned()))?;
        // A figure judged against another figure of the run that has no value
        // (nothing completed in its window) cannot be judged.
        if let (Measured::Value(_), Some(base)) = (&measured, r.baseline.strip_prefix("figure:"))
            && !results.figures.contains_key(base)
        {
            let why = match results.measured(base) {
                Some(Measured::NotMeasured(why)) => why,
                _ => "no value recorded".into(),
            };
            measured = Measured::NotMeasured(format!("its baseline {base} is not measured: {why}"));
        }
        let mut entry = json!({
            "goal": r.goal,
            "figure": r.figure,
            "title": r.title,
            "unit": r.unit,
            "target": r.target.map(Target::text),
        });
        match measured {
            Measured::NotMeasured(reason) => {
                entry["status"] = json!("not measured");
                entry["reason"] = json!(reason);
                entry["value"] = Value::Null;
                if !r.baseline.is_empty() {
                    entry["baseline"] = json!({ "id": r.baseline });
                }
            }
            Measured::Value(value) => {
                entry["value"] = json!(value);
                if r.baseline.is_empty() {
                    entry["status"] = json!("info");
                } else {
                    let samples = baseline_samples(results, r.baseline);
                    let med = median(&samples).ok_or_else(|| ReportError::NoBaseline {
                        figure: r.figure.to_owned(),
                        baseline: r.baseline.to_owned(),
                    })?;
                    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
                    let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let spread = if med != 0.0 {
                        (max - min) / med.abs() * 100.0
                    } else {
                        0.0
                    };
                    let ratio = if med != 0.0 { value / med } else { f64::NAN };
                    entry["baseline"] = json!({
                        "id": r.baseline,
                        "samples": samples,
                        "median": med,
                        "spread_pct": spread,
                    });
                    entry["ratio"] = if ratio.is_finite() {
                        json!(ratio)
                    } else {
                        Value::Null
                    };
                    entry["status"] = json!(match r.target {
                        None => "no target",
                        Some(t) if ratio.is_finite() && t.holds(ratio) => "met",
                        Some(_) => "not met",
                    });
                }
            }
        }
        out.push(entry);
    }
    Ok(json!({ "info": results.info, "rows": out }))
}

/// Checks a report's JSON: every row of `rows` present, each measured one with a
/// status, and each ratio with its baseline samples, median and spread.
pub fn validate(rows: &[Row], report: &Value) -> Result<(), String> {
    let got = report["rows"].as_array().ok_or("report has no rows")?;
    if got.len() != rows.len() {
        return Err(format!("{} rows, expected {}", got.len(), rows.len()));
    }
    for (r, g) in rows.iter().zip(got) {
        if g["figure"] != r.figure {
            return Err(format!("row for {} is {}", r.figure, g["figure"]));
        }
        let status = g["status"]
            .as_str()
            .ok_or(format!("{}: no status", r.figure))?;
        if status == "not measured" {
            if g["reason"].as_str().is_none_or(str::is_empty) {
                return Err(format!("{}: not measured without a reason", r.figure));
            }
            continue;
        }
        if !g["value"].is_number() {
            return Err(format!("{}: no value", r.figure));
        }
        if r.baseline.is_empty() {
            continue;
        }
        let b = &g["baseline"];
        let samples = b["samples"].as_array().map(Vec::len).unwrap_or(0);
        if b["id"] != r.baseline
            || samples == 0
            || !b["median"].is_number()
            || !b["spread_pct"].is_number()
        {
            return Err(format!(
                "{}: baseline {} lacks samples, median or spread",
                r.figure, r.baseline
            ));
        }
    }
    Ok(())
}

fn num(v: &Value) -> String {
    match v.as_f64() {
        None => "-".into(),
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.3}"),
    }
}

/// The report as a Markdown table.
pub fn markdown(report: &Value) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| goal | figure | value | baseline (median; samples; spread) | ratio | target | status |"
    );
    let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- |");
    for g in report["rows"].as_array().into_iter().flatten() {
        let value = if g["value"].is_number() {
            format!("{} {}", num(&g["value"]), g["unit"].as_str().unwrap_or(""))
        } else {
            "-".into()
        };
        let b = &g["baseline"];
        let baseline = if b["median"].is_number() {
            let samples: Vec<String> = b["samples"]
                .as_array()
                .into_iter()
                .flatten()
                .map(num)
                .collect();
            format!(
                "{}: {} ({}; spread {:.0}%)",
                b["id"].as_str().unwrap_or(""),
                num(&b["median"]),
                samples.join(", "),
                b["spread_pct"].as_f64().unwrap_or(0.0)
            )
        } else if let Some(id) = b["id"].as_str() {
            id.to_owned()
        } else {
            "-".into()
        };
        let status = match g["status"].as_str() {
            Some("not measured") => format!(
                "not measured: {}",
                g["reason"].as_str().unwrap_or("").replace('|', "/")
            ),
            Some(s) => s.to_owned(),
            None => "-".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {value} | {baseline} | {} | {} | {status} |",
            g["goal"].as_str().unwrap_or(""),
            g["title"].as_str().unwrap_or(""),
            if g["ratio"].is_number() {
                format!("{} x", num(&g["ratio"]))
            } else {
                "-".into()
            },
            g["target"].as_str().unwrap_or("-"),
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A results file measuring every row, with two samples per baseline.
    fn synthetic() -> String {
        let mut text = String::from("info nproc 2\n");
        let mut seen = std::collections::BTreeSet::new();
        for r in ROWS {
            text.push_str(&format!("figure {} 12.5\n", r.figure));
            if !r.baseline.is_empty()
                && !r.baseline.starts_with("figure:")
                && seen.insert(r.baseline)
            {
                text.push_str(&format!(
                    "baseline {} 20\nbaseline {} 30\n",
                    r.baseline, r.baseline
                ));
            }
        }
        text.push_str("figure G4.agents 12.5\nfigure G4.write_p99_idle_ms 5\n");
        text
    }

    #[test]
    fn every_row_has_its_baseline_and_spread() {
        let results = Results::parse(&synthetic()).expect("parse");
        let report = build(ROWS, &results).expect("build");
        validate(ROWS, &report).expect("valid");
        let row = report["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .find(|r| r["figure"] == "G1.many.c8.p99_ms")
            .expect("G1 p99 row");
        assert_eq!(row["baseline"]["median"], 25.0);
        assert_eq!(row["baseline"]["spread_pct"], 40.0);
        assert_eq!(row["ratio"], 0.5);
        assert_eq!(row["status"], "met");
        let md = markdown(&report);
        assert_eq!(md.lines().count(), ROWS.len() + 2);
        assert!(
            md.contains("B_ins.c8.p99_ms: 25.0 (20.0, 30.0; spread 40%)"),
            "{md}"
        );
    }

    #[test]
    fn a_figure_without_baseline_samples_is_rejected() {
        let text: String = synthetic()
            .lines()
            .filter(|l| !l.starts_with("baseline B_txn.c8.tps"))
            .map(|l| format!("{l}\n"))
            .collect();
        let results = Results::parse(&text).expect("parse");
        assert_eq!(
            build(ROWS, &results),
            Err(ReportError::NoBaseline {
                figure: "G1.many.c8.tps".into(),
                baseline: "B_txn.c8.tps".into()
            })
        );
        // The target row's own baseline, B_txn run beside the figure, is required too.
        let text: String = synthetic()
            .lines()
            .filter(|l| !l.starts_with("baseline B_txn.c8.adjacent.tps"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            build(ROWS, &Results::parse(&text).expect("parse")),
            Err(ReportError::NoBaseline {
                figure: "G1.many.c8.tps".into(),
                baseline: "B_txn.c8.adjacent.tps".into()
            })
        );
        let mut report = build(ROWS, &Results::parse(&synthetic()).expect("parse")).expect("ok");
        report["rows"][4]["baseline"]
            .as_object_mut()
            .expect("baseline")
            .remove("spread_pct");
        assert!(validate(ROWS, &report).is_err());
    }

    #[test]
    fn unmeasured_figures_need_a_reason() {
        let text: String = synthetic()
            .lines()
            .filter(|l| !l.contains(" G4."))
            .map(|l| format!("{l}\n"))
            .collect();
        let results = Results::parse(&text).expect("parse");
        assert_eq!(
            build(ROWS, &results),
            Err(ReportError::NoFigure("G4.reconnect_per_s".into()))
        );
        let results =
            Results::parse(&format!("{text}missing G4 the storm phase failed\n")).expect("parse");
        let report = build(ROWS, &results).expect("build");
        validate(ROWS, &report).expect("valid");
        assert!(markdown(&report).contains("not measured: the storm phase failed"));
        assert!(Results::parse("figure G1.x fast\n").is_err());

        // Judged against another figure that has no value: not measured, and why.
        let text: String = synthetic()
            .lines()
            .filter(|l| !l.contains("G4.write_p99_idle_ms"))
            .map(|l| format!("{l}\n"))
            .collect();
        let text = format!("{text}missing G4.write_p99_idle_ms no samples\n");
        let report = build(ROWS, &Results::parse(&text).expect("parse")).expect("build");
        validate(ROWS, &report).expect("valid");
        assert!(markdown(&report).contains(
            "not measured: its baseline G4.write_p99_idle_ms is not measured: no samples"
        ));
    }

    /// The row of `figure` judged against `baseline`.
    fn row_of<'a>(report: &'a Value, figure: &str, baseline: &str) -> &'a Value {
        report["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .find(|r| {
                r["figure"] == figure
                    && (r["baseline"]["id"] == baseline
                        || baseline.is_empty() && r["baseline"].is_null())
            })
            .unwrap_or_else(|| panic!("no row {figure} vs {baseline}"))
    }

    #[test]
    fn site_counts_and_codes_are_ratios_to_the_smallest_case() {
        let text = format!(
            "{}figure G1.sites_small.c8.tps 200\nfigure G1.sites_large.c8.tps 150\n\
             figure G2.sites_small.p99_ms 40\nfigure G2.sites_large.p99_ms 60\n\
             figure G1.codes_10.c8.tps 80\nfigure G1.codes_1000.c8.tps 60\n\
             figure X.snapshot_1000_ms 900\n",
            synthetic()
        );
        let report = build(ROWS, &Results::parse(&text).expect("parse")).expect("build");
        validate(ROWS, &report).expect("valid");
        let large = row_of(
            &report,
            "G1.sites_large.c8.tps",
            "figure:G1.sites_small.c8.tps",
        );
        assert_eq!(large["ratio"], 0.75);
        assert_eq!(large["status"], "no target");
        // Also against B_ins (median 25), as every other G1 figure.
        assert_eq!(
            row_of(&report, "G1.sites_large.c8.tps", "B_ins.c8.tps")["ratio"],
            6.0
        );
        assert_eq!(
            row_of(
                &report,
                "G2.sites_large.p99_ms",
                "figure:G2.sites_small.p99_ms"
            )["ratio"],
            1.5
        );
        assert_eq!(
            row_of(&report, "G1.codes_1000.c8.tps", "figure:G1.codes_10.c8.tps")["ratio"],
            0.75
        );
        let snapshot = row_of(&report, "X.snapshot_1000_ms", "");
        assert_eq!(snapshot["status"], "info");
        assert_eq!(snapshot["value"], 900.0);
        for figure in [
            "G1.sites_small.c8.tps",
            "G1.sites_mid.c8.tps",
            "G1.sites_large.c8.p99_ms",
            "G2.sites_mid.p50_ms",
            "G2.sites_large.p99_ms",
            "G1.codes_10.c8.tps",
            "G1.codes_1000.c8.p99_ms",
        ] {
            assert!(
                ROWS.iter().any(|r| r.figure == figure),
                "{figure} has no row"
            );
        }
        assert!(
            !ROWS.iter().any(|r| r.figure.ends_with("_scaling")),
            "the placeholder rows are gone"
        );

        // The smallest size not measured: the larger ones cannot be judged, and say why.
        let text: String = text
            .lines()
            .filter(|l| !l.contains("G1.sites_small"))
            .map(|l| format!("{l}\n"))
            .collect();
        let text = format!("{text}missing G1.sites_small seed-sql failed\n");
        let report = build(ROWS, &Results::parse(&text).expect("parse")).expect("build");
        validate(ROWS, &report).expect("valid");
        let large = row_of(
            &report,
            "G1.sites_large.c8.tps",
            "figure:G1.sites_small.c8.tps",
        );
        assert_eq!(large["status"], "not measured");
        assert!(markdown(&report).contains(
            "not measured: its baseline G1.sites_small.c8.tps is not measured: seed-sql failed"
        ));
    }

    #[test]
    fn quantiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), Some(2.5));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
