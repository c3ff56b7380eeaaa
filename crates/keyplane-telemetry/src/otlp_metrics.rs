//! Metrics over OTLP. The instruments exist once, in the `prometheus-client`
//! registry the `/metrics` endpoint serves; every `OTEL_METRIC_EXPORT_INTERVAL`
//! (60 s by default) that registry is encoded, read back and sent to the OTLP
//! endpoint as cumulative sums (counters), gauges and histograms. No second set of
//! instruments, so the two ways out always agree.
//!
//! Configured by the standard variables: `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (OTLP/gRPC), `..._HEADERS`, `..._TIMEOUT`,
//! `..._CERTIFICATE` (the CA for an `https` endpoint), `OTEL_METRIC_EXPORT_INTERVAL`,
//! `OTEL_SERVICE_NAME`; `OTEL_SDK_DISABLED=true` or `OTEL_METRICS_EXPORTER=none` turn
//! it off.

use crate::metrics::Refresh;
use crate::{env, env_is};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus_client::registry::Registry;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The export interval when `OTEL_METRIC_EXPORT_INTERVAL` is not set (the
/// specification's default).
const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// How long one export may take when `OTEL_EXPORTER_OTLP_TIMEOUT` is not set.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The first of `names` set in the environment.
fn first_env(names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| env(n))
}

fn millis_env(names: &[&str]) -> Option<Duration> {
    first_env(names)
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

/// Whether the environment asks for metric export: an OTLP endpoint is set, and
/// neither `OTEL_SDK_DISABLED=true` nor `OTEL_METRICS_EXPORTER=none`.
pub fn metrics_configured() -> bool {
    first_env(&[
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ])
    .is_some()
        && !env_is("OTEL_SDK_DISABLED", "true")
        && !env_is("OTEL_METRICS_EXPORTER", "none")
}

/// Why metric export could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The endpoint is not a URI tonic can connect to.
    #[error("OTLP metrics endpoint {0:?} is not a valid URI")]
    Endpoint(String),
    /// An `https` endpoint without a CA to trust.
    #[error(
        "OTLP metrics endpoint {0} is https: set OTEL_EXPORTER_OTLP_CERTIFICATE to the CA that signed it"
    )]
    NoCertificate(String),
    /// The CA file could not be read, or TLS could not be set up with it.
    #[error("OTLP metrics TLS: {0}")]
    Tls(String),
}

/// Starts exporting `registry` over OTLP as `service` when [`metrics_configured`]
/// (None otherwise), until `shutdown` resolves, then sends one last export. `refresh`
/// runs before each export, as before each scrape.
pub fn spawn_export(
    service: &str,
    registry: Arc<Registry>,
    refresh: Option<Refresh>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Option<tokio::task::JoinHandle<()>>, ExportError> {
    if !metrics_configured() {
        return Ok(None);
    }
    let endpoint = first_env(&[
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ])
    .unwrap_or_default();
    let timeout = millis_env(&[
        "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ])
    .unwrap_or(DEFAULT_TIMEOUT);
    let interval = millis_env(&["OTEL_METRIC_EXPORT_INTERVAL"]).unwrap_or(DEFAULT_INTERVAL);
    let mut channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
        .map_err(|_| ExportError::Endpoint(endpoint.clone()))?
        .timeout(timeout)
        .connect_timeout(timeout);
    if endpoint.starts_with("https://") {
        let ca = first_env(&[
            "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
        ])
        .ok_or_else(|| ExportError::NoCertificate(endpoint.clone()))?;
        let pem = std::fs::read(&ca).map_err(|e| ExportError::Tls(format!("{ca}: {e}")))?;
        channel = channel
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            )
            .map_err(|e| ExportError::Tls(e.to_string()))?;
    }
    let headers = parse_headers(
        &first_env(&[
            "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
            "OTEL_EXPORTER_OTLP_HEADERS",
        ])
        .unwrap_or_default(),
    );
    let exporter = Exporter {
        client: MetricsServiceClient::new(channel.connect_lazy()),
        headers,
        registry,
        refresh,
        resource: resource(service),
        start: SystemTime::now(),
        failing: false,
    };
    Ok(Some(tokio::spawn(exporter.run(interval, shutdown))))
}

/// `OTEL_EXPORTER_OTLP_HEADERS`: `key=value` pairs separated by commas; pairs that
/// are not valid gRPC metadata are skipped.
fn parse_headers(value: &str) -> Vec<(String, String)> {
    value
        .split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_owned());
            (!k.is_empty()).then_some((k, v))
        })
        .collect()
}

fn resource(service: &str) -> Resource {
    let service = env("OTEL_SERVICE_NAME").unwrap_or_else(|| service.to_owned());
    Resource {
        attributes: vec![string_attribute("service.name", &service)],
        ..Default::default()
    }
}

fn string_attribute(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..Default::default()
    }
}

struct Exporter {
    client: MetricsServiceClient<tonic::transport::Channel>,
    headers: Vec<(String, String)>,
    registry: Arc<Registry>,
    refresh: Option<Refresh>,
    resource: Resource,
    /// The start of every cumulative series: when this process began exporting.
    start: SystemTime,
    /// Whether the last export failed: a failure is said once, not every interval.
    failing: bool,
}

impl Exporter {
    async fn run(mut self, interval: Duration, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate: the first export waits a whole interval.
        tick.tick().await;
        loop {
            tokio::select! {
                () = &mut shutdown => {
                    // What changed since the last export, before the process ends.
                    self.export().await;
                    return;
                }
                _ = tick.tick() => self.export().await,
            }
        }
    }

    async fn export(&mut self) {
        if let Some(refresh) = &self.refresh {
            refresh().await;
        }
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(error = %e, "encoding the metrics for OTLP failed");
            return;
        }
        let metrics = to_otlp(&parse(&text), self.start, SystemTime::now());
        let mut request = tonic::Request::new(ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(self.resource.clone()),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope {
                        name: "keyplane".to_owned(),
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                        ..Default::default()
                    }),
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        });
        for (k, v) in &self.headers {
            if let (Ok(k), Ok(v)) = (
                tonic::metadata::MetadataKey::from_bytes(k.as_bytes()),
                tonic::metadata::MetadataValue::try_from(v.as_str()),
            ) {
                request.metadata_mut().insert(k, v);
            }
        }
        match self.client.export(request).await {
            Ok(_) => {
                if self.failing {
                    tracing::info!("OTLP metric export works again");
                }
                self.failing = false;
            }
            Err(status) => {
                if !self.failing {
                    tracing::warn!(%status, "OTLP metric export failed; retrying every interval");
                }
                self.failing = true;
            }
        }
    }
}

/// What a metric family is, from its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
    /// Info, stateset, unknown: sent as gauges of their samples.
    Other,
}

/// One sample line: its full name (with `_total`, `_bucket` …), labels and value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// A metric family as the OpenMetrics text gives it.
#[derive(Debug, Clone, PartialEq)]
struct Family {
    name: String,
    kind: Kind,
    help: String,
    unit: String,
    samples: Vec<Sample>,
}

/// Reads the OpenMetrics text `prometheus-client` writes. Lines it does not
/// understand are skipped: the text is our own, and a metric missing from OTLP is
/// better than an export that stops.
fn parse(text: &str) -> Vec<Family> {
    let mut families: Vec<Family> = Vec::new();
    for line in text.lines() {
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.splitn(3, ' ');
            let (what, name, rest) = (parts.next(), parts.next(), parts.next());
            let (Some(what), Some(name)) = (what, name) else {
                continue;
            };
            if what == "EOF" {
                break;
            }
            if families.last().is_none_or(|f| f.name != name) {
                families.push(Family {
                    name: name.to_owned(),
                    kind: Kind::Other,
                    help: String::new(),
                    unit: String::new(),
                    samples: Vec::new(),
                });
            }
            let Some(family) = families.last_mut() else {
                continue;
            };
            let rest = rest.unwrap_or_default();
            match what {
                "TYPE" => {
                    family.kind = match rest {
                        "counter" => Kind::Counter,
                        "gauge" => Kind::Gauge,
                        "histogram" => Kind::Histogram,
                        _ => Kind::Other,
                    }
                }
                "HELP" => family.help = unescape(rest),
                "UNIT" => family.unit = rest.to_owned(),
                _ => {}
            }
        } else if let (Some(sample), Some(family)) = (parse_sample(line), families.last_mut()) {
            family.samples.push(sample);
        }
    }
    families
}

fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `name{label="value",...} value [timestamp]`.
fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let mut key = String::new();
        loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => {
                    rest = &inner[i + 1..];
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                other => key.push(other),
            }
        }
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        number => number.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

fn nanos(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn attributes(labels: &[(String, String)]) -> Vec<KeyValue> {
    labels.iter().map(|(k, v)| string_attribute(k, v)).collect()
}

/// The OTLP metrics of `families`: counters as cumulative monotonic sums from
/// `start`, gauges as gauges, histograms as cumulative explicit-bucket histograms.
fn to_otlp(families: &[Family], start: SystemTime, now: SystemTime) -> Vec<Metric> {
    let (start, now) = (nanos(start), nanos(now));
    let point = |s: &Sample| NumberDataPoint {
        attributes: attributes(&s.labels),
        start_time_unix_nano: start,
        time_unix_nano: now,
        value: Some(number_data_point::Value::AsDouble(s.value)),
        ..Default::default()
    };
    let mut out = Vec::new();
    for family in families {
        let data = match family.kind {
            Kind::Counter => {
                let total = format!("{}_total", family.name);
                metric::Data::Sum(Sum {
                    data_points: family
                        .samples
                        .iter()
                        .filter(|s| s.name == total)
                        .map(point)
                        .collect(),
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    is_monotonic: true,
                })
            }
            Kind::Histogram => metric::Data::Histogram(Histogram {
                data_points: histogram_points(family, start, now),
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
            }),
            Kind::Gauge | Kind::Other => metric::Data::Gauge(Gauge {
                data_points: family
                    .samples
                    .iter()
                    .map(|s| NumberDataPoint {
                        start_time_unix_nano: 0,
                        ..point(s)
                    })
                    .collect(),
            }),
        };
        out.push(Metric {
            name: family.name.clone(),
            description: family.help.clone(),
            unit: family.unit.clone(),
            data: Some(data),
            ..Default::default()
        });
    }
    out
}

/// A series' labels, as written.
type Labels = Vec<(String, String)>;

/// A histogram's buckets: (upper bound, cumulative count).
type Buckets = Vec<(f64, f64)>;

/// One point per label set: OpenMetrics buckets are cumulative (`le`), OTLP's
/// bucket counts are per bucket, the last one above the last bound.
fn histogram_points(family: &Family, start: u64, now: u64) -> Vec<HistogramDataPoint> {
    let (bucket, sum, count) = (
        format!("{}_bucket", family.name),
        format!("{}_sum", family.name),
        format!("{}_count", family.name),
    );
    let mut points: Vec<(Labels, HistogramDataPoint, Buckets)> = Vec::new();
    for s in &family.samples {
        let (labels, le): (Vec<_>, Vec<_>) = s.labels.iter().cloned().partition(|(k, _)| k != "le");
        let index = match points.iter().position(|(l, _, _)| *l == labels) {
            Some(i) => i,
            None => {
                points.push((
                    labels.clone(),
                    HistogramDataPoint {
                        attributes: attributes(&labels),
                        start_time_unix_nano: start,
                        time_unix_nano: now,
                        ..Default::default()
                    },
                    Vec::new(),
                ));
                points.len() - 1
            }
        };
        let (_, point, buckets) = &mut points[index];
        if s.name == bucket {
            let bound = match le.first().map(|(_, v)| v.as_str()) {
                Some("+Inf") | None => f64::INFINITY,
                Some(v) => v.parse().unwrap_or(f64::INFINITY),
            };
            buckets.push((bound, s.value));
        } else if s.name == sum {
            point.sum = Some(s.value);
        } else if s.name == count {
            point.count = s.value as u64;
        }
    }
    points
        .into_iter()
        .map(|(_, mut point, mut buckets)| {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut below = 0.0;
            for (bound, cumulative) in buckets {
                if bound.is_finite() {
                    point.explicit_bounds.push(bound);
                }
                point
                    .bucket_counts
                    .push((cumulative - below).max(0.0) as u64);
                below = cumulative;
            }
            point
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family as Labeled;
    use prometheus_client::metrics::gauge::Gauge as PGauge;
    use prometheus_client::metrics::histogram::Histogram as PHistogram;

    fn encoded(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        text
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn sample_lines_parse_with_labels_escapes_and_special_values() {
        // (line, what it parses to: name, labels, value)
        type Case<'a> = (&'a str, Option<(&'a str, Labels, f64)>);
        let table: &[Case] = &[
            ("up 1", Some(("up", vec![], 1.0))),
            (
                r#"calls_total{method="/a.B/C",code="OK"} 3"#,
                Some((
                    "calls_total",
                    labels(&[("method", "/a.B/C"), ("code", "OK")]),
                    3.0,
                )),
            ),
            (
                r#"x{msg="say \"hi\"\\n"} 2.5 1700000000"#,
                Some(("x", labels(&[("msg", "say \"hi\"\\n")]), 2.5)),
            ),
            (
                r#"h_bucket{le="+Inf"} 7"#,
                Some(("h_bucket", labels(&[("le", "+Inf")]), 7.0)),
            ),
            ("g -Inf", Some(("g", vec![], f64::NEG_INFINITY))),
            ("no_value", None),
            ("bad notanumber", None),
            (r#"open{a="1" 3"#, None),
        ];
        for (line, want) in table {
            let got = parse_sample(line);
            match want {
                None => assert_eq!(got, None, "{line}"),
                Some((name, labels, value)) => {
                    let got = got.unwrap_or_else(|| panic!("{line} did not parse"));
                    assert_eq!(
                        (&got.name, &got.labels),
                        (&(*name).to_owned(), labels),
                        "{line}"
                    );
                    assert_eq!(got.value, *value, "{line}");
                }
            }
        }
    }

    #[test]
    fn a_registry_becomes_sums_gauges_and_histograms() {
        let mut registry = Registry::with_prefix("kp");
        let calls = Labeled::<Vec<(String, String)>, Counter>::default();
        let agents = PGauge::<i64>::default();
        let wait = PHistogram::new([0.1, 1.0]);
        registry.register("calls", "Calls by code", calls.clone());
        registry.register("agents", "Agents \"held\"", agents.clone());
        registry.register("wait_seconds", "Waits", wait.clone());
        calls
            .get_or_create(&vec![("code".to_owned(), "OK".to_owned())])
            .inc_by(3);
        agents.set(5);
        for seconds in [0.05, 0.5, 0.7, 3.0] {
            wait.observe(seconds);
        }
        let families = parse(&encoded(&registry));
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(160);
        let metrics = to_otlp(&families, start, now);
        let by_name = |name: &str| {
            metrics
                .iter()
                .find(|m| m.name == name)
                .and_then(|m| m.data.clone())
                .unwrap_or_else(|| panic!("{name} missing from {metrics:?}"))
        };

        let metric::Data::Sum(sum) = by_name("kp_calls") else {
            panic!("kp_calls is not a sum")
        };
        assert!(sum.is_monotonic);
        assert_eq!(
            sum.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        assert_eq!(sum.data_points.len(), 1);
        let p = &sum.data_points[0];
        assert_eq!(p.value, Some(number_data_point::Value::AsDouble(3.0)));
        assert_eq!(p.attributes, vec![string_attribute("code", "OK")]);
        assert_eq!(
            (p.start_time_unix_nano, p.time_unix_nano),
            (100_000_000_000, 160_000_000_000)
        );

        let metric::Data::Gauge(gauge) = by_name("kp_agents") else {
            panic!("kp_agents is not a gauge")
        };
        assert_eq!(
            gauge.data_points[0].value,
            Some(number_data_point::Value::AsDouble(5.0))
        );
        let help = metrics
            .iter()
            .find(|m| m.name == "kp_agents")
            .map(|m| m.description.clone());
        assert_eq!(help.as_deref(), Some("Agents \"held\"."));

        let metric::Data::Histogram(h) = by_name("kp_wait_seconds") else {
            panic!("kp_wait_seconds is not a histogram")
        };
        let p = &h.data_points[0];
        assert_eq!(p.count, 4);
        assert_eq!(p.sum, Some(0.05 + 0.5 + 0.7 + 3.0));
        assert_eq!(p.explicit_bounds, vec![0.1, 1.0]);
        assert_eq!(p.bucket_counts, vec![1, 2, 1], "per bucket, not cumulative");
    }

    #[test]
    fn headers_are_pairs_and_junk_is_skipped() {
        assert_eq!(
            parse_headers("api-key=abc, X-Tenant = t1 ,novalue,=empty"),
            labels(&[("api-key", "abc"), ("x-tenant", "t1")])
        );
    }
}
