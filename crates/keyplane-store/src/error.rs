//! The store's error type. Messages of the client-facing variants are written for a
//! person and never contain a PIN; `Db` and `Internal` carry internal detail that the
//! server logs but does not return.

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The named resource does not exist (or belongs to another dealer).
    #[error("{0} not found")]
    NotFound(String),
    /// The request conflicts with an existing resource.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is malformed in a way only the store can see.
    #[error("{0}")]
    InvalidArgument(String),
    /// The system is not in a state that allows the request.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A device or table has no room left.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The acting user's authority does not allow the change.
    #[error("{0}")]
    PermissionDenied(String),
    /// An etag did not match: the resource changed since it was read.
    #[error("{0}")]
    Aborted(String),
    /// A database error (internal detail; never shown to clients).
    #[error("database error: {0}")]
    Db(tokio_postgres::Error),
    /// The database went away mid-call (connection lost, server shutting down or
    /// restarting): retryable, and nothing of an uncommitted transaction was kept.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The connection pool failed.
    #[error("connection pool: {0}")]
    Pool(String),
    /// Something that should not happen (e.g. a sealed PIN that no key opens).
    #[error("internal: {0}")]
    Internal(String),
}

impl StoreError {
    /// Whether retrying the whole transaction may succeed (serialization failure,
    /// deadlock, a unique race on an idempotency key).
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Db(e) => {
                matches!(e.code().map(|c| c.code()), Some("40001") | Some("40P01"))
            }
            _ => false,
        }
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        if connection_lost(&e) {
            StoreError::Unavailable(e.to_string())
        } else {
            StoreError::Db(e)
        }
    }
}

/// SQLSTATEs of a server going away: connection exceptions (class 08), and
/// admin_shutdown, crash_shutdown, cannot_connect_now (a restart under way).
fn lost_sqlstate(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
}

/// Whether `e` says the connection (or the server) is gone rather than that the
/// statement failed.
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        return lost_sqlstate(code.code());
    }
    // No SQLSTATE: a socket error (reset, broken pipe, EOF) on the connection.
    std::error::Error::source(e).is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some())
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::{PoolError, TimeoutType};
        match e {
            PoolError::Timeout(TimeoutType::Wait) => StoreError::ResourceExhausted(format!(
                "the server is busy: no database connection came free within {} s; retry shortly",
                crate::POOL_WAIT.as_secs()
            )),
            // A new connection that cannot be made (the database down or restarting).
            e => StoreError::Pool(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn shutdown_and_connection_sqlstates_mean_the_database_went_away() {
        for (code, lost) in [
            ("57P01", true),
            ("57P02", true),
            ("57P03", true),
            ("08006", true),
            ("08003", true),
            ("08001", true),
            ("40001", false),
            ("23505", false),
            ("57014", false), // query_canceled: the statement, not the server
            ("XX000", false),
        ] {
            assert_eq!(super::lost_sqlstate(code), lost, "{code}");
        }
    }
}
