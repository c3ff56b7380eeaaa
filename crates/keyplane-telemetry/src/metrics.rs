//! The Prometheus endpoint both binaries serve on `--metrics-listen` (off by
//! default): `GET /metrics` answers the registry in the OpenMetrics text format,
//! everything else 404. A minimal HTTP/1.1 responder: one request per connection,
//! then close, which is all a scraper needs.

use prometheus_client::registry::Registry;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Refreshes the gauges read at scrape time (a database query, a pool's status)
/// before the registry is encoded.
pub type Refresh = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The content type of the answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The most of a request read: a scraper's GET is a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;

/// How long a connection may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `registry` on `listener` until `shutdown` resolves; `refresh` runs before
/// each scrape.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    refresh: Option<Refresh>,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let registry = registry.clone();
        let refresh = refresh.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &registry, refresh).await {
                tracing::debug!(error = %e, "metrics endpoint: connection failed");
            }
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    registry: &Registry,
    refresh: Option<Refresh>,
) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Ok(());
    }
    let line = request.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut words = line.split(|b| *b == b' ');
    let (method, path) = (words.next(), words.next());
    let path = path.map(|p| p.split(|b| *b == b'?').next().unwrap_or_default());
    let (status, content_type, body) = if method == Some(b"GET") && path == Some(b"/metrics") {
        if let Some(refresh) = refresh {
            refresh().await;
        }
        let mut text = String::new();
        match prometheus_client::encoding::text::encode(&mut text, registry) {
            Ok(()) => ("200 OK", CONTENT_TYPE, text),
            Err(e) => (
                "500 Internal Server Error",
                "text/plain",
                format!("encoding the metrics failed: {e}\n"),
            ),
        }
    } else {
        ("404 Not Found", "text/plain", "GET /metrics\n".to_owned())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Fetches `/metrics` from `addr` (tests and the README walk-through's checks).
pub async fn scrape(addr: std::net::SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: keyplane\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header end"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "metrics endpoint answered {}",
            head.lines().next().unwrap_or_default()
        )));
    }
    Ok(body.to_owned())
}

/// The value of the sample `series` (name and labels exactly as encoded, e.g.
/// `keyplane_agents_connected` or `keyplane_events_stored_total{kind="duress"}`) in
/// a scrape, if present.
pub fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        let value = rest.strip_prefix(' ')?;
        value.split(' ').next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[tokio::test]
    async fn serves_the_registry_on_get_metrics_only() {
        let mut registry = Registry::default();
        let counter: Counter = Counter::default();
        registry.register("keyplane_test_things", "Things", counter.clone());
        counter.inc_by(3);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            Arc::new(registry),
            None,
            stop.clone().cancelled_owned(),
        ));
        let text = scrape(addr).await.expect("scrape");
        assert_eq!(
            sample(&text, "keyplane_test_things_total"),
            Some(3.0),
            "{text}"
        );
        let mut other = TcpStream::connect(addr).await.expect("connect");
        other
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut answer = String::new();
        other.read_to_string(&mut answer).await.expect("read");
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
        stop.cancel();
        server.await.expect("server ends");
    }

    #[test]
    fn samples_are_found_by_exact_series() {
        let text = "# TYPE a counter\na_total 2\na_total{kind=\"x\"} 5\nab_total 9\n";
        assert_eq!(sample(text, "a_total"), Some(2.0));
        assert_eq!(sample(text, "a_total{kind=\"x\"}"), Some(5.0));
        assert_eq!(sample(text, "a"), None);
    }
}
