//! Tracing set-up shared by `keyplaned` and `keyplane-agent`.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`), as text or, with
//! [`LogFormat::Json`], one JSON object a line whose `spans` list carries the fields
//! of the spans the line was written in: a server call's `rpc` span holds its method,
//! request id, dealer, site and trace id ([`RPC_SPAN_FIELDS`]), so every line of a
//! call names them.
//!
//! Traces: with `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! set, spans are exported over OTLP/gRPC, configured by the standard `OTEL_*`
//! variables (`OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`, ...); unset,
//! nothing is exported. W3C trace context crosses processes as a `traceparent`
//! string ([`traceparent`], [`set_parent`]): in gRPC metadata, in the change log and
//! on the agent stream.
//!
//! Metrics: [`metrics`] serves a `prometheus-client` registry on the address of
//! `--metrics-listen`.

pub mod metrics;
pub mod otlp_metrics;
pub use prometheus_client;

use std::io::Write;
use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One line of text per event (colours only on a terminal).
    #[default]
    Text,
    /// One JSON object per line, with the fields of the enclosing spans.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?}: use text or json")),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// The fields of the span a server call runs in (`rpc`), in the order declared.
pub const RPC_SPAN_FIELDS: [&str; 5] = ["rpc.method", "request_id", "dealer", "site", "trace_id"];

/// The log-line layer for `format`, writing to `writer`; `ansi` colours text lines.
/// Tests build their subscriber with it, so they see what the binaries write.
pub fn fmt_layer<S, W>(format: LogFormat, writer: W, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_target(false)
        // Its report of a failed write goes through `eprintln!`, which panics when
        // stderr is closed: the very case it would report.
        .log_internal_errors(false);
    match format {
        LogFormat::Text => layer.with_ansi(ansi).boxed(),
        LogFormat::Json => layer
            .json()
            .with_ansi(false)
            .flatten_event(true)
            // Every enclosing span, outermost first: the call's fields stay on the
            // lines of the spans inside it (a database transaction's, say).
            .with_current_span(false)
            .with_span_list(true)
            .boxed(),
    }
}

/// Installs the global subscriber for `service` with text lines and no trace export.
/// Safe to call more than once (later calls do nothing), so tests may call it freely.
pub fn init(service: &str) {
    let _ = install(service, LogFormat::Text, None);
}

/// What [`init_with`] set up; dropping it sends the spans still buffered (call it
/// last in `main`).
#[must_use = "dropping it ends trace export"]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported (an OTLP endpoint is configured).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "flushing the last spans failed");
        }
    }
}

/// Whether the environment asks for trace export: an OTLP endpoint is set, and
/// neither `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`.
pub fn traces_configured() -> bool {
    (env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some())
        && !env_is("OTEL_SDK_DISABLED", "true")
        && !env_is("OTEL_TRACES_EXPORTER", "none")
}

/// An OTEL_* variable's value, trimmed; None when unset or blank.
pub(crate) fn env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Whether variable `name` is set to `value` (case-insensitive).
pub(crate) fn env_is(name: &str, value: &str) -> bool {
    env(name).is_some_and(|v| v.eq_ignore_ascii_case(value))
}

/// Installs the global subscriber for `service`, writing lines in `format`, and
/// exports spans over OTLP when [`traces_configured`]. Needs a Tokio runtime when
/// exporting (the gRPC client). Later calls install nothing.
pub fn init_with(service: &str, format: LogFormat) -> Telemetry {
    let provider = if traces_configured() {
        match tracer_provider(service) {
            Ok(provider) => Some(provider),
            Err(e) => {
                // Logging is not up yet: say it on stderr and serve without traces.
                let _ = writeln!(
                    std::io::stderr(),
                    "{service}: OpenTelemetry trace export not started: {e}"
                );
                None
            }
        }
    } else {
        None
    };
    let installed = install(service, format, provider.as_ref());
    Telemetry {
        provider: provider.filter(|_| installed),
    }
}

fn tracer_provider(
    service: &str,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    // Endpoint, headers, timeout and compression from OTEL_EXPORTER_OTLP_*.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    // OTEL_SERVICE_NAME (read by the builder) wins over the binary's name.
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service.to_owned());
    }
    // The sampler from OTEL_TRACES_SAMPLER (default: parent-based, always on).
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

fn install(
    service: &str,
    format: LogFormat,
    provider: Option<&opentelemetry_sdk::trace::SdkTracerProvider>,
) -> bool {
    use opentelemetry::trace::TracerProvider as _;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, never in files or journald.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let otel = provider.map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("keyplane"))
            // Our spans say where they are by name; code locations and thread ids
            // are noise in a trace viewer.
            .with_location(false)
            .with_threads(false)
            .with_filter(tracing_subscriber::filter::dynamic_filter_fn(in_a_trace))
    });
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer(format, LossyStderr, ansi))
        .with(otel)
        .try_init()
        .is_ok();
    if installed {
        EXPORTING.store(provider.is_some(), std::sync::atomic::Ordering::Relaxed);
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        tracing::debug!(service, %format, traces = provider.is_some(), "tracing initialised");
    }
    installed
}

/// The spans that start a trace or continue one from another process (a call, the
/// agent's apply of a change, keyplaned's handling of its ack). Other spans (a
/// database transaction, say) are exported only inside one of these: the long-lived
/// spans of a stream or a device task, and the background sweeps' transactions,
/// would otherwise make endless traces or a trace every few hundred milliseconds.
pub const TRACE_SPANS: [&str; 3] = ["rpc", "device.apply", "agent.ack"];

/// The trace export's filter: spans named in [`TRACE_SPANS`], and anything inside
/// one (the context's current span is the nearest exported one).
fn in_a_trace<S>(
    meta: &tracing::Metadata<'_>,
    cx: &tracing_subscriber::layer::Context<'_, S>,
) -> bool
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    (meta.is_span() && TRACE_SPANS.contains(&meta.name())) || cx.lookup_current().is_some()
}

static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process exports spans ([`init_with`] found an OTLP endpoint): work
/// done only for traces (reading a stored `traceparent`) is skipped otherwise.
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// The W3C `traceparent` of `span`: None when traces are not exported (or the span
/// is disabled). Carried where the work it starts continues: the change log row, the
/// agent stream, an ack.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// Makes `span` (not yet entered) a child of the span `traceparent` names, and
/// returns the trace id it is now in; nothing happens (None) when the value is not a
/// valid `traceparent` or traces are not exported.
pub fn set_parent(span: &tracing::Span, traceparent: &str) -> Option<String> {
    use opentelemetry::propagation::TextMapPropagator as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    traceparent_trace_id(traceparent)?;
    let carrier = std::collections::HashMap::from([(
        "traceparent".to_owned(),
        traceparent.trim().to_owned(),
    )]);
    let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    span.set_parent(cx).ok()?;
    trace_id(span)
}

/// The trace id `span` belongs to, when traces are exported.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    traceparent(span).and_then(|tp| traceparent_trace_id(&tp).map(str::to_owned))
}

/// The trace id of a W3C `traceparent` header value (`00-<trace id>-<span id>-<flags>`),
/// when it is well formed and not all zeros.
pub fn traceparent_trace_id(value: &str) -> Option<&str> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let ok = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(span, 16)
        && span.bytes().any(|b| b != b'0')
        && hex(flags, 2)
        && (version != "00" || parts.next().is_none());
    ok.then_some(trace)
}

/// Stderr for log lines, dropping what cannot be written: a log reader that went
/// away (`… 2>&1 | head`, a closed journald socket) must not stop the service.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossyStderr;

impl<'a> MakeWriter<'a> for LossyStderr {
    type Writer = LossyWriter<std::io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        LossyWriter(std::io::stderr())
    }
}

/// A writer whose write errors (EPIPE above all) are swallowed.
#[derive(Debug)]
pub struct LossyWriter<W>(pub W);

impl<W: Write> Write for LossyWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Claiming the whole buffer also ends `write_all` after one failed attempt.
        let _ = self.0.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    #[test]
    fn traceparents_are_read_only_when_well_formed() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        for (value, expect) in [
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Some(trace),
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                Some(trace),
            ),
            // A later version may append fields.
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                Some(trace),
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                None,
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                None,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                None,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                None,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                None,
            ),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", None),
            ("", None),
        ] {
            assert_eq!(super::traceparent_trace_id(value), expect, "{value}");
        }
    }

    #[test]
    fn log_formats_parse_and_print_alike() {
        for format in [super::LogFormat::Text, super::LogFormat::Json] {
            assert_eq!(format.to_string().parse::<super::LogFormat>(), Ok(format));
        }
        assert!("yaml".parse::<super::LogFormat>().is_err());
    }

    const CHILD: &str = "KEYPLANE_TELEMETRY_CLOSED_STDERR_CHILD";

    /// Run by `logging_to_a_closed_stderr_does_not_panic` in a child process whose
    /// stderr is a pipe nobody reads; does nothing otherwise.
    #[test]
    fn child_logs_to_a_closed_stderr() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        super::init("telemetry-test");
        // More than a pipe buffer holds: once it is full the writes block until
        // the reader closes its end, so later ones must meet EPIPE.
        for i in 0..20_000 {
            tracing::info!(
                i,
                "a line for a reader that went away, padded to fill the pipe"
            );
        }
    }

    #[test]
    fn logging_to_a_closed_stderr_does_not_panic() {
        let exe = std::env::current_exe().expect("test executable");
        let mut child = Command::new(exe)
            .args([
                "--exact",
                "tests::child_logs_to_a_closed_stderr",
                // Uncaptured, as in the binaries: libtest's capture would hide a panic
                // of `eprintln!`.
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the test executable");
        drop(child.stderr.take());
        let status = child.wait().expect("wait for the child");
        assert!(
            status.success(),
            "logging to a closed stderr ended the process with {status}"
        );
    }
}
