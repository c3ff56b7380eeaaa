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
    Db(#[from] tokio_postgres::Error),
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

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Timeout(_) => StoreError::ResourceExhausted(format!(
                "the server is busy: no database connection came free within {} s; retry shortly",
                crate::POOL_WAIT.as_secs()
            )),
            e => StoreError::Pool(e.to_string()),
        }
    }
}
