//! The span every dealer call runs in (`rpc`, opened by [`crate::auth::DealerAuthLayer`]):
//! its fields are [`keyplane_telemetry::RPC_SPAN_FIELDS`], filled in as they become
//! known (the dealer once authenticated, the site once a name is parsed), so every
//! log line of the call names them.

use tracing::field::Empty;

/// The span of a call to `path` (`/package.Service/Method`): a child of the
/// caller's W3C `traceparent` header when it sent one (and traces are exported),
/// with the id of the trace it is in (the caller's, even when nothing is exported).
pub fn rpc_span(path: &str, headers: &tonic::codegen::http::HeaderMap) -> tracing::Span {
    let method = path.strip_prefix('/').unwrap_or(path);
    let span = tracing::info_span!(
        "rpc",
        otel.name = method,
        otel.kind = "server",
        rpc.method = method,
        request_id = Empty,
        dealer = Empty,
        site = Empty,
        trace_id = Empty,
    );
    let caller = headers.get("traceparent").and_then(|v| v.to_str().ok());
    let trace = caller
        .and_then(|tp| keyplane_telemetry::set_parent(&span, tp))
        .or_else(|| keyplane_telemetry::trace_id(&span))
        .or_else(|| {
            caller
                .and_then(keyplane_telemetry::traceparent_trace_id)
                .map(str::to_owned)
        });
    if let Some(trace) = trace {
        span.record("trace_id", trace);
    }
    span
}

/// Records on the current call's span the site of resource name `name`
/// (`sites/{site}/…`), if it names one. Called once a name has parsed.
pub fn record_site(name: &str) {
    if let Some(site) = name
        .strip_prefix("sites/")
        .and_then(|rest| rest.split('/').next())
        .filter(|s| !s.is_empty())
    {
        tracing::Span::current().record("site", site);
    }
}
