//! Shutdown for server-streaming calls: a task blocked on a full channel (a client
//! that stopped reading) must still see the shutdown, and a stream must end with a
//! status that says why, so every task ends within the grace period.

use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// Why a stream ended at shutdown: retryable, on another replica or after restart.
pub fn shutting_down() -> Status {
    Status::unavailable(
        "keyplaned is shutting down: reconnect (to another replica, or once it is back)",
    )
}

/// Sends `item` unless the receiver is gone or shutdown comes first; false then.
pub async fn send<T>(tx: &mpsc::Sender<T>, item: T, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        // cancel-safe: a token.
        _ = shutdown.cancelled() => false,
        // cancel-safe: a send dropped before it completes sends nothing.
        sent = tx.send(item) => sent.is_ok(),
    }
}

/// The responses in `rx`, until `shutdown`: then the stream ends at once with
/// UNAVAILABLE ([`shutting_down`]), whatever is still queued.
pub fn until_shutdown<T: Send + 'static>(
    rx: mpsc::Receiver<Result<T, Status>>,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<T, Status>> + Send + 'static {
    futures_util::stream::unfold(Some((rx, shutdown)), |state| async move {
        let (mut rx, shutdown) = state?;
        tokio::select! {
            biased;
            // cancel-safe: a token.
            _ = shutdown.cancelled() => Some((Err(shutting_down()), None)),
            // cancel-safe: mpsc::Receiver::recv.
            item = rx.recv() => item.map(|item| (item, Some((rx, shutdown)))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn a_blocked_send_and_a_queued_stream_end_at_shutdown() {
        let shutdown = CancellationToken::new();
        let (tx, rx) = mpsc::channel::<Result<u32, Status>>(1);
        assert!(send(&tx, Ok(1), &shutdown).await);
        let blocked = tokio::spawn({
            let (tx, shutdown) = (tx.clone(), shutdown.clone());
            async move { send(&tx, Ok(2), &shutdown).await }
        });
        let mut stream = Box::pin(until_shutdown(rx, shutdown.clone()));
        shutdown.cancel();
        assert!(!blocked.await.expect("joins"), "the blocked send gave up");
        let status = match stream.next().await {
            Some(Err(status)) => status,
            other => panic!("expected the shutdown status, got {other:?}"),
        };
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(stream.next().await.is_none(), "then the stream ends");
    }
}
