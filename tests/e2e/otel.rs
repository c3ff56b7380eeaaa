//! Issue 17: one trace follows a change from the AdminService call through the
//! database commit to the agent's apply on the device and keyplaned's handling of
//! its ack. The real keyplaned and keyplane-agent export over OTLP/gRPC (configured
//! by the standard OTEL_* variables only) to a minimal trace receiver run here; the
//! same receiver takes their metrics (the registry `/metrics` serves, over OTLP).

use crate::fixture::{
    SYNC_TIMEOUT, create_device, create_partition, create_site, create_user_with, lock_scope,
    wait_applied_at_head,
};
use crate::shutdown::{client, keyplaned_binary};
use keyplane_proto::v1 as pb;
use keyplane_store::{PinKey, Store};
use keyplane_testkit::pg::test_database;
use keyplane_testkit::server::{TempDir, eventually};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point;
use std::sync::{Arc, Mutex};
use tonic::transport::Endpoint;

/// A span as received, with the service that sent it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: Vec<(String, String)>,
}

impl Got {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The OTLP trace service: keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Got>>>);

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// The `service.name` of an export's resource (empty when not given).
fn service_name(resource: Option<&opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    resource
        .iter()
        .flat_map(|r| &r.attributes)
        .find(|kv| kv.key == "service.name")
        .map(|kv| text(kv.value.as_ref()))
        .unwrap_or_default()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for rs in request.into_inner().resource_spans {
            let service = service_name(rs.resource.as_ref());
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                got.push(Got {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent: hex::encode(&span.parent_span_id),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
                        .collect(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A metric point as received: service, metric, and its value (gauges and sums;
/// histograms give their count).
type GotMetric = (String, String, f64);

/// The OTLP metrics service: keeps every point it is sent.
#[derive(Clone, Default)]
struct MetricsReceiver(Arc<Mutex<Vec<GotMetric>>>);

#[tonic::async_trait]
impl MetricsService for MetricsReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let value = |v: &Option<number_data_point::Value>| match v {
            Some(number_data_point::Value::AsDouble(d)) => *d,
            Some(number_data_point::Value::AsInt(i)) => *i as f64,
            None => f64::NAN,
        };
        let mut got = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for rm in request.into_inner().resource_metrics {
            let service = service_name(rm.resource.as_ref());
            for m in rm.scope_metrics.into_iter().flat_map(|s| s.metrics) {
                let points: Vec<f64> = match &m.data {
                    Some(Data::Gauge(g)) => g.data_points.iter().map(|p| value(&p.value)).collect(),
                    Some(Data::Sum(s)) => s.data_points.iter().map(|p| value(&p.value)).collect(),
                    Some(Data::Histogram(h)) => {
                        h.data_points.iter().map(|p| p.count as f64).collect()
                    }
                    _ => Vec::new(),
                };
                for v in points {
                    got.push((service.clone(), m.name.clone(), v));
                }
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// The OTEL_* environment both binaries get: export to `endpoint` quickly.
fn otel_env(cmd: &mut tokio::process::Command, endpoint: &str) {
    for var in [
        "OTEL_SERVICE_NAME",
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_EXPORTER",
        "OTEL_TRACES_SAMPLER",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_METRICS_EXPORTER",
        "OTEL_RESOURCE_ATTRIBUTES",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("OTEL_METRIC_EXPORT_INTERVAL", "200")
        .env("RUST_LOG", "info");
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn one_trace_follows_a_credential_from_the_call_to_the_device_and_back() -> anyhow::Result<()>
{
    let receiver = Receiver::default();
    let metrics = MetricsReceiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let serving = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .add_service(MetricsServiceServer::new(metrics.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    let db = test_database().await?;
    let dir = TempDir::new("otel")?;
    let key = dir.path().join("pin.key");
    let keygen = tokio::process::Command::new(keyplaned_binary()?)
        .arg("keygen")
        .arg("--out")
        .arg(&key)
        .stdout(std::process::Stdio::null())
        .status()
        .await?;
    anyhow::ensure!(keygen.success(), "keyplaned keygen failed");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let mut serve = tokio::process::Command::new(keyplaned_binary()?);
    serve
        .arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--pin-key-file")
        .arg(&key)
        .env("KEYPLANE_DATABASE_URL", &db.url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("keyplaned.log"))?)
        .kill_on_drop(true);
    otel_env(&mut serve, &endpoint);
    let _keyplaned = serve.spawn()?;

    let store = Store::connect(&db.url, 2, PinKey::generate()?)?;
    client(Endpoint::from_shared(url.clone())?, "").await?;
    let token = store.dealer_create("Dealer One").await?.1;
    let mut admin = client(Endpoint::from_shared(url.clone())?, &token).await?;
    let site = create_site(&mut admin, "Shop", "Europe/Paris").await?;
    create_partition(&mut admin, &site, 1, "Shop").await?;
    let lock = create_device(&mut admin, &site, "Front door", "zwave-lock-30").await?;
    let alice = create_user_with(&mut admin, &site, "Alice", &[(1, pb::Level::OperatorA)]).await?;
    let agent_token = admin
        .issue_agent_token(pb::IssueAgentTokenRequest { site: site.clone() })
        .await?
        .into_inner()
        .token;

    let agent_bin = keyplaned_binary()?.with_file_name("keyplane-agent");
    let mut agent = tokio::process::Command::new(&agent_bin);
    agent
        .args(["--server", &url, "--site", &site])
        .args(["--state-dir", &dir.path().join("state").to_string_lossy()])
        .args(["--sim-dir", &dir.path().join("devices").to_string_lossy()])
        .env("KEYPLANE_AGENT_TOKEN", &agent_token)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("agent.log"))?)
        .kill_on_drop(true);
    otel_env(&mut agent, &endpoint);
    let _agent = agent.spawn()?;
    wait_applied_at_head(&admin, &site, SYNC_TIMEOUT).await?;

    // The caller's own trace context: keyplaned's call span continues it.
    let mut request = tonic::Request::new(pb::CreateCredentialRequest {
        parent: alice.clone(),
        credential: Some(pb::Credential {
            display_name: "code".into(),
            pin: "4821".into(),
            scope: Some(lock_scope(&[&lock])),
            ..Default::default()
        }),
        request_id: String::new(),
        generate_pin: false,
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN}-01").parse()?,
    );
    admin.create_credential(request).await?;
    wait_applied_at_head(&admin, &site, SYNC_TIMEOUT).await?;

    // Every span of the trace, once the apply's (the agent's batch) and the ack's
    // (keyplaned's) have both arrived: each process exports on its own schedule.
    let spans = eventually(
        "the apply's and the ack's spans exported",
        SYNC_TIMEOUT,
        || {
            let got = receiver.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
            async move {
                let trace: Vec<Got> = got.into_iter().filter(|s| s.trace_id == TRACE_ID).collect();
                let has = |name: &str| trace.iter().any(|s| s.name == name);
                Ok((has("agent.ack") && has("device.apply")).then_some(trace))
            }
        },
    )
    .await?;
    let one = |name: &str, service: &str| -> anyhow::Result<Got> {
        let found: Vec<&Got> = spans
            .iter()
            .filter(|s| s.name == name && s.service == service)
            .collect();
        anyhow::ensure!(
            !found.is_empty(),
            "no {name} span from {service} in the trace: {spans:#?}"
        );
        Ok(found[0].clone())
    };
    let call = one("keyplane.v1.AdminService/CreateCredential", "keyplaned")?;
    assert_eq!(
        call.parent, CALLER_SPAN,
        "the call continues the caller's trace"
    );
    assert_eq!(
        call.attribute("rpc.method"),
        Some("keyplane.v1.AdminService/CreateCredential")
    );
    assert_eq!(
        call.attribute("site"),
        Some(site.trim_start_matches("sites/")),
        "{call:?}"
    );
    let commit = spans
        .iter()
        .find(|s| s.name == "db.txn" && s.attribute("txn") == Some("credential_create"))
        .ok_or_else(|| anyhow::anyhow!("no credential_create transaction span: {spans:#?}"))?;
    assert_eq!(commit.parent, call.span_id, "the commit is inside the call");
    let apply = one("device.apply", "keyplane-agent")?;
    assert_eq!(
        apply.parent, commit.span_id,
        "the agent's apply continues the transaction that wrote the change"
    );
    let ack = one("agent.ack", "keyplaned")?;
    assert_eq!(
        ack.parent, apply.span_id,
        "keyplaned's ack handling continues the apply"
    );
    assert_eq!(ack.attribute("device"), Some(lock.name.as_str()));

    // Metrics over OTLP from both processes, with what the scenario did in them: the
    // agent's stream held by keyplaned, the calls counted, the agent's one device.
    let latest = |service: &str, name: &str| {
        let got = metrics.0.lock().unwrap_or_else(|p| p.into_inner());
        got.iter()
            .rev()
            .find(|(s, n, _)| s == service && n == name)
            .map(|(_, _, v)| *v)
    };
    eventually("metrics over OTLP from both", SYNC_TIMEOUT, || {
        let seen = [
            latest("keyplaned", "keyplane_agents_connected") == Some(1.0),
            latest("keyplaned", "keyplane_grpc_calls").is_some_and(|v| v >= 1.0),
            latest("keyplane-agent", "keyplane_agent_devices") == Some(1.0),
            latest("keyplane-agent", "keyplane_agent_connected") == Some(1.0),
        ];
        async move { Ok(seen.iter().all(|s| *s).then_some(())) }
    })
    .await?;
    serving.abort();
    Ok(())
}
