//! PostgreSQL persistence for keyplane: migrations, queries and the per-site change log.
//!
//! No gRPC types here: callers pass domain values and get domain values or a
//! [`StoreError`] back. Every dealer-facing query is scoped by the dealer id; a site of
//! another dealer is simply not found. Functions that must run inside a transaction
//! end in `_in_txn`; every write runs through [`in_txn!`], which retries transactions
//! that failed on a serialization conflict or deadlock.
//!
//! Writes that change what a device should hold lock the site row first, advance the
//! site's revision and record each changed (device, slot) in `site_change`, in the same
//! transaction. That lock serializes allocation within a site, so two requests racing
//! for the last free slot cannot both win; the keys of `slot_assignment` enforce it
//! again at the bottom.

mod access_plan;
mod agent_hello;
mod agent_identity;
mod audit;
mod auth;
mod authority;
mod backup;
mod credential;
mod crypto;
mod device;
mod error;
mod event;
mod metrics;
mod migrate;
#[cfg(test)]
mod module_graph;
mod notify;
mod observed;
mod ops;
mod partition;
mod plan;
mod retention;
mod rotate;
mod rules;
mod site;
mod status;
mod stored_json;
mod sync;
mod tls;
mod types;
mod user;
mod watch;

pub use access_plan::{AccessPlan, AccessPlanFields, Holiday};
pub use agent_hello::{AgentHello, AgentHelloInfo};
pub use agent_identity::{AgentPrincipal, ENROLLMENT_CODE_MAX_TTL, EnrollmentCode, SessionCheck};
pub use audit::{AuditCursor, AuditFilter, AuditRecord};
pub use auth::{DEALER_TOKEN_TTL, DealerToken, DealerTokenInfo};
pub use backup::BackupPool;
pub use crypto::{PinKey, new_token, token_hash};
pub use error::StoreError;
pub use event::{Event, EventKind, NewEvent};
pub use metrics::{MetricsSnapshot, SitePending};
pub use migrate::{MIGRATIONS, migrate, migrations_fingerprint};
pub use notify::{SITES_CHANNEL, SiteListener};
pub use observed::{LocalCode, Observed, ObservedState};
pub use ops::{
    AgentConnection, AgentPlace, DevicePending, ResyncRequested, SessionOpened, SiteOpsStatus,
};
pub use plan::{PersonalPlan, PlanPatch};
pub use retention::{
    AUDIT_RETENTION_DEFAULT, EVENT_RETENTION_DEFAULT, Erased, RETENTION_MAX, RETENTION_MIN,
    Retention, Swept,
};
pub use rotate::RotationReport;
pub use status::{
    AssignmentFacts, DeviceFindings, EvaluatedSlot, Held, SlotStatusFacts, StatusEvent,
};
pub use sync::{Acked, CATCH_UP_READS, ChangeWindow, Pruned, SiteChange};
pub use types::*;
pub use watch::WatchLease;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

/// The transaction every `_in_txn` function takes, on a pooled connection (whose
/// statement cache it uses through `Deref`). Unlike tokio-postgres's own, it does not
/// wait for BEGIN's answer: BEGIN is sent and the first statements follow it in the
/// same round trip, since the connection runs requests in order. BEGIN fails only on
/// a connection that is broken or inside an aborted transaction, and the statements
/// after it then fail as well, so none runs outside the transaction unnoticed. A
/// transaction dropped before [`Transaction::commit`] is rolled back, as
/// tokio-postgres's is.
pub(crate) struct Transaction<'a> {
    client: &'a deadpool_postgres::ClientWrapper,
    /// Set once COMMIT is sent: the transaction is then the server's to end.
    done: std::sync::atomic::AtomicBool,
}

/// How a read of several statements that must agree begins.
pub(crate) const READ_SNAPSHOT: &str =
    "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY";

/// Sends `sql` (simple protocol) without waiting for its answer: the request is
/// queued on the connection when the future is first polled, and its answer is
/// discarded by the connection once the future is gone.
fn send_only(client: &tokio_postgres::Client, sql: &str) {
    let request = client.batch_execute(sql);
    let mut request = std::pin::pin!(request);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let _ = std::future::Future::poll(request.as_mut(), &mut cx);
}

impl<'a> Transaction<'a> {
    /// Begins a transaction with `begin` (BEGIN, or [`READ_SNAPSHOT`]) on `client`.
    pub(crate) fn begin(client: &'a deadpool_postgres::ClientWrapper, begin: &str) -> Self {
        send_only(client, begin);
        Transaction {
            client,
            done: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Commits, unless [`Transaction::last_then_commit`] already has. Once COMMIT is
    /// sent the transaction is the server's to end, so a commit dropped before its
    /// answer does not also send a ROLLBACK.
    pub(crate) async fn commit(self) -> Result<(), tokio_postgres::Error> {
        if self.done.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        self.send_commit().await
    }

    /// COMMIT, marking the transaction done when it is first polled (sent).
    async fn send_commit(&self) -> Result<(), tokio_postgres::Error> {
        let commit = self.client.batch_execute("COMMIT");
        let mut commit = std::pin::pin!(commit);
        std::future::poll_fn(|cx| {
            let polled = commit.as_mut().poll(cx);
            self.done.store(true, std::sync::atomic::Ordering::Relaxed);
            polled
        })
        .await
    }

    /// Runs `last`, the transaction's last statements, with COMMIT sent right behind
    /// them in the same round trip, and returns `last`'s answer: a write then waits on
    /// the database once instead of twice. `last` must send its statements when first
    /// polled (prepared statements, no await before them). If one fails, the server
    /// ends the transaction at that COMMIT with a rollback and `last`'s error is
    /// returned; so nothing that could still want the transaction undone may be
    /// checked after it (the write refuses itself in SQL instead), and an answer of
    /// another number of rows than expected arrives after the commit: the callers'
    /// site row lock rules that out. The closing [`Transaction::commit`] then only
    /// returns.
    pub(crate) async fn last_then_commit<T, E: From<tokio_postgres::Error>>(
        &self,
        last: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let (last, committed) = tokio::join!(biased; last, self.send_commit());
        let value = last?;
        committed?;
        Ok(value)
    }
}

impl std::ops::Deref for Transaction<'_> {
    type Target = deadpool_postgres::ClientWrapper;

    fn deref(&self) -> &Self::Target {
        self.client
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.done.load(std::sync::atomic::Ordering::Relaxed) {
            send_only(self.client, "ROLLBACK");
        }
    }
}

/// Statements run through the connection's statement cache: each SQL text is parsed
/// once per connection and afterwards only bound and executed, one round trip instead
/// of two. The names shadow tokio-postgres's own, so store code with this trait in
/// scope is cached without a second spelling; SQL texts must therefore be fixed
/// (values always go in parameters), or the cache would grow without bound.
pub(crate) trait Cached {
    /// Rows of `sql`.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error>;
    /// Exactly one row of `sql`.
    async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, tokio_postgres::Error>;
    /// At most one row of `sql`.
    async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, tokio_postgres::Error>;
    /// Rows affected by `sql`.
    async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error>;
}

macro_rules! cached_impl {
    ($ty:ty, $inner:ty) => {
        impl Cached for $ty {
            async fn query(
                &self,
                sql: &str,
                params: &[&(dyn ToSql + Sync)],
            ) -> Result<Vec<Row>, tokio_postgres::Error> {
                let statement = self.prepare_cached(sql).await?;
                <$inner>::query(self, &statement, params).await
            }
            async fn query_one(
                &self,
                sql: &str,
                params: &[&(dyn ToSql + Sync)],
            ) -> Result<Row, tokio_postgres::Error> {
                let statement = self.prepare_cached(sql).await?;
                <$inner>::query_one(self, &statement, params).await
            }
            async fn query_opt(
                &self,
                sql: &str,
                params: &[&(dyn ToSql + Sync)],
            ) -> Result<Option<Row>, tokio_postgres::Error> {
                let statement = self.prepare_cached(sql).await?;
                <$inner>::query_opt(self, &statement, params).await
            }
            async fn execute(
                &self,
                sql: &str,
                params: &[&(dyn ToSql + Sync)],
            ) -> Result<u64, tokio_postgres::Error> {
                let statement = self.prepare_cached(sql).await?;
                <$inner>::execute(self, &statement, params).await
            }
        }
    };
}
cached_impl!(deadpool_postgres::ClientWrapper, tokio_postgres::Client);

/// A column that switches the rest of its transaction to generic plans, put in the
/// first read of a transaction whose statements PostgreSQL would otherwise re-plan on
/// every execution: for statements with many parameters, with `$n IS NULL OR ...`
/// filters or parameter arrays, it keeps choosing a custom plan (the generic plan's
/// estimate is higher), so the cached statement is planned anew each time. Measured
/// with pg_stat_statements: the slot write of a credential change spent about 0.6 ms
/// planning per write, as much as executing it, and an agent's catch-up about 1.2 ms
/// planning its five reads. A generic plan is built once per connection (and again
/// when ANALYZE changes the statistics); every query here is by site, so the generic
/// plan finds the rows through the same keys. Until the transaction ends only. A
/// column of a read the transaction makes anyway, not a `SET LOCAL` of its own: each
/// statement costs PostgreSQL about 25 µs beyond its work (docs/BENCHMARKS.md).
macro_rules! generic_plans_column {
    () => {
        "set_config('plan_cache_mode', 'force_generic_plan', true)"
    };
}
pub(crate) use generic_plans_column;

/// A statement and its parameters, for [`batch_in_txn`].
pub(crate) type Step<'a> = (&'a str, Vec<&'a (dyn ToSql + Sync)>);

/// Parameters of a [`Step`].
macro_rules! params {
    ($($p:expr),* $(,)?) => {
        vec![$($p as &(dyn tokio_postgres::types::ToSql + Sync)),*]
    };
}
pub(crate) use params;

/// Runs `steps` in order in one round trip (pipelined, through the statement cache)
/// and returns each one's rows. Later steps see what earlier ones wrote; the first
/// error is returned, not the "transaction aborted" of the steps after it.
pub(crate) async fn batch_in_txn(
    tx: &Transaction<'_>,
    steps: &[Step<'_>],
) -> Result<Vec<Vec<Row>>, StoreError> {
    let statements =
        futures_util::future::try_join_all(steps.iter().map(|(sql, _)| tx.prepare_cached(sql)))
            .await?;
    // join_all polls in order on its first poll, so the steps are sent in order.
    let results = futures_util::future::join_all(
        steps
            .iter()
            .zip(&statements)
            .map(|((_, params), statement)| tokio_postgres::Client::query(tx, statement, params)),
    )
    .await;
    results
        .into_iter()
        .map(|r| r.map_err(StoreError::from))
        .collect()
}

/// Runs `$body` in a transaction on `$store`, committing on success and retrying the
/// whole body (up to 5 attempts) when PostgreSQL reports a serialization failure or
/// deadlock. `$tx` names the transaction inside the body.
///
/// It runs in a `db.txn` span named by `$label`. When traces are exported, the
/// span's W3C `traceparent` is set for the transaction (`keyplane.traceparent`), and
/// the change log rows it writes take it as their column default: the agent's apply
/// of those changes joins the trace without every writer passing it along.
macro_rules! in_txn {
    ($store:expr, $label:literal, |$tx:ident| $body:expr) => {{
        let span = tracing::info_span!("db.txn", txn = $label);
        let traced: Result<_, $crate::StoreError> = tracing::Instrument::instrument(
            async {
                let mut attempt = 0u32;
                loop {
                    attempt += 1;
                    let conn = $store.conn().await?;
                    let $tx = $crate::Transaction::begin(&conn, "BEGIN");
                    if let Some(tp) = keyplane_telemetry::traceparent(&tracing::Span::current()) {
                        $tx.execute(
                            "SELECT set_config('keyplane.traceparent', $1, true)",
                            &[&tp],
                        )
                        .await?;
                    }
                    let result: Result<_, $crate::StoreError> = async { $body }.await;
                    let result = match result {
                        Ok(v) => $tx
                            .commit()
                            .await
                            .map(|()| v)
                            .map_err($crate::StoreError::from),
                        Err(e) => Err(e),
                    };
                    match result {
                        Err(e) if $store.hash_key_refused(&e) => {
                            break Err($crate::StoreError::Aborted(
                                "the site's PIN keys changed during the request (key rotation): retry it"
                                    .into(),
                            ));
                        }
                        Err(e) if e.is_retryable() && attempt < 5 => {
                            tracing::debug!(txn = $label, attempt, "retrying transaction");
                            continue;
                        }
                        other => break other,
                    }
                }
            },
            span,
        )
        .await;
        traced
    }};
}
pub(crate) use in_txn;

/// What this replica believes each site hashes its PINs under (`site.pin_hash_key`):
/// `None` untagged under the legacy key. Sites not listed use the default.
#[derive(Default)]
pub(crate) struct HashKeys {
    inner: std::sync::Mutex<HashKeysInner>,
}

#[derive(Default)]
struct HashKeysInner {
    /// The default for sites not listed; `None` untagged.
    default: Option<String>,
    /// The key untagged hashes are under (`pin_key_in_use.key_id`), once known.
    legacy: Option<String>,
    sites: std::collections::HashMap<Uuid, Option<String>>,
}

impl HashKeys {
    fn of(&self, site: Uuid, current: &str) -> (Option<String>, String) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let key = g
            .sites
            .get(&site)
            .cloned()
            .unwrap_or_else(|| g.default.clone());
        (key, g.legacy.clone().unwrap_or_else(|| current.to_owned()))
    }

    fn learn(&self, key: Option<String>) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.sites.clear();
        g.default = key;
    }

    pub(crate) fn set_site(&self, site: Uuid, key: Option<String>) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.sites.insert(site, key);
    }

    fn set_defaults(&self, default: Option<String>, legacy: String) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.default = default;
        g.legacy = Some(legacy);
    }
}

/// Key ids of PINs sealed in the database, with how many rows each holds.
async fn sealed_key_ids(
    conn: &deadpool_postgres::Object,
) -> Result<Vec<(String, i64)>, StoreError> {
    let rows = conn
        .query(
            "SELECT key_id, sum(n)::int8 FROM (
                SELECT pin_key_id AS key_id, count(*) AS n FROM credential GROUP BY pin_key_id
                UNION ALL
                SELECT pin_key_id, count(*) FROM observed_slot
                 WHERE pin_key_id IS NOT NULL GROUP BY pin_key_id
             ) k GROUP BY key_id ORDER BY key_id",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// How long a request waits for a pooled database connection before it is refused
/// with RESOURCE_EXHAUSTED.
pub const POOL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Handle to the database: a connection pool and the PIN key.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// Told how long each wait for a pooled connection took (keyplaned's metrics).
    pool_wait: Option<std::sync::Arc<dyn Fn(std::time::Duration) + Send + Sync>>,
    key: PinKey,
    hash_keys: std::sync::Arc<HashKeys>,
    tokens: std::sync::Arc<auth::TokenCache>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("key", &self.key).finish()
    }
}

impl Store {
    /// Connects a pool of up to `max_connections` to `url` (not yet opened), with TLS
    /// as its `sslmode` and `sslrootcert` say (see the `tls` module for what is supported).
    pub fn connect(url: &str, max_connections: usize, key: PinKey) -> Result<Store, StoreError> {
        let connect = tls::pg_connect(url)?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match connect.tls {
            Some(tls) => Manager::from_config(connect.config, tls, manager_config),
            None => Manager::from_config(connect.config, tokio_postgres::NoTls, manager_config),
        };
        // A bounded wait: a caller that cannot get a connection in time is told the
        // server is busy instead of queueing without end behind one tenant's burst.
        let pool = Pool::builder(manager)
            .max_size(max_connections)
            .wait_timeout(Some(POOL_WAIT))
            // Opening a connection to a database that does not answer fails (as
            // UNAVAILABLE) instead of holding the caller.
            .create_timeout(Some(POOL_WAIT))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        Ok(Store {
            pool,
            pool_wait: None,
            key,
            hash_keys: Default::default(),
            tokens: Default::default(),
        })
    }

    /// Trusts a verified dealer token for `ttl` instead of [`DEALER_TOKEN_TTL`].
    pub fn with_dealer_token_ttl(mut self, ttl: std::time::Duration) -> Store {
        self.tokens = std::sync::Arc::new(auth::TokenCache::new(ttl));
        self
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        migrate(&mut conn).await
    }

    /// Refuses to serve without the database's keys: PINs sealed under a key this
    /// replica lacks would never reach agents, and uniqueness (keyed hashes) would not
    /// hold. The first replica to start records its current key id; every later one
    /// must hold the recorded key (as its current key or an older one, during a
    /// rotation), even before any PIN is sealed.
    pub async fn key_check(&self) -> Result<(), StoreError> {
        let mine = self.key.id();
        let loaded = self.key.ids().join(", ");
        // One connection for all of it: a pool of one must not wait on itself.
        let conn = self.conn().await?;
        let recorded = conn
            .query_opt("SELECT key_id, hash_key FROM pin_key_in_use", &[])
            .await?;
        // Once a key is recorded every replica is checked against it, so only a
        // database without the record (new, or sealed before it existed) needs the
        // scan of every sealed PIN.
        if recorded.is_none() {
            let sealed = sealed_key_ids(&conn).await?;
            let missing: Vec<String> = sealed
                .iter()
                .filter(|(id, _)| !self.key.holds(id))
                .map(|(id, n)| format!("{id} ({n} sealed PIN(s))"))
                .collect();
            if !missing.is_empty() {
                return Err(StoreError::FailedPrecondition(format!(
                    "the database holds PINs sealed under key id(s) {} but the configured PIN key file holds {loaded}: start keyplaned with a key file that holds them (every replica must use the same keys; `keyplaned key-id --pin-key-file FILE` prints a key file's ids)",
                    missing.join(", ")
                )));
            }
            // Two statements: a replica starting at the same moment may have inserted
            // first, and only a fresh statement sees its row.
            let legacy = match sealed.as_slice() {
                [(only, _)] => only.clone(),
                _ => mine.to_owned(),
            };
            conn.execute(
                "INSERT INTO pin_key_in_use (key_id) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&legacy],
            )
            .await?;
        }
        let row = match recorded {
            Some(row) => row,
            None => {
                conn.query_one("SELECT key_id, hash_key FROM pin_key_in_use", &[])
                    .await?
            }
        };
        let (recorded, hash_key): (String, Option<String>) = (row.get(0), row.get(1));
        for id in std::iter::once(&recorded).chain(hash_key.as_ref()) {
            if !self.key.holds(id) {
                return Err(StoreError::FailedPrecondition(format!(
                    "this database is keyed to PIN key id {id} but the configured PIN key file holds {loaded}: start keyplaned with the key file that holds {id} (`keyplaned key-id --pin-key-file FILE` prints a key file's ids)"
                )));
            }
        }
        self.hash_keys.set_defaults(hash_key, recorded);
        Ok(())
    }

    /// The hash of `pin` as `site` stores it: under the site's hash key (see migration
    /// 0011) as this replica last learnt it. A stale guess is refused by the database
    /// (the caller gets ABORTED and its retry uses the key the refusal named).
    pub(crate) fn site_pin_hash(
        &self,
        site: Uuid,
        pin: &keyplane_core::pin::Pin,
    ) -> Result<Vec<u8>, StoreError> {
        let (site_key, legacy) = self.hash_keys.of(site, self.key.id());
        self.key
            .pin_hash_for(site_key.as_deref(), &legacy, site, pin)
    }

    /// Whether `e` is the database refusing a hash under another key than its site's;
    /// if so, remembers the site's key for the retry.
    pub(crate) fn hash_key_refused(&self, e: &StoreError) -> bool {
        let StoreError::Db(db) = e else { return false };
        let Some(d) = db.as_db_error() else {
            return false;
        };
        if d.code().code() != "KP001" {
            return false;
        }
        let key = d.detail().filter(|k| !k.is_empty()).map(str::to_owned);
        match d.hint().and_then(|h| h.parse::<Uuid>().ok()) {
            Some(site) => self.hash_keys.set_site(site, key),
            None => self.hash_keys.learn(key),
        }
        true
    }

    /// The PIN key in use.
    pub fn key(&self) -> &PinKey {
        &self.key
    }

    /// Closes the pool: waiting callers fail, idle connections are dropped.
    pub fn close(&self) {
        self.pool.close();
    }

    pub(crate) async fn conn(&self) -> Result<deadpool_postgres::Object, StoreError> {
        let Some(observe) = &self.pool_wait else {
            return Ok(self.pool.get().await?);
        };
        let started = std::time::Instant::now();
        let conn = self.pool.get().await;
        observe(started.elapsed());
        Ok(conn?)
    }

    /// The store, telling `observe` how long each wait for a pooled connection took.
    pub fn with_pool_wait_observer(
        mut self,
        observe: impl Fn(std::time::Duration) + Send + Sync + 'static,
    ) -> Store {
        self.pool_wait = Some(std::sync::Arc::new(observe));
        self
    }

    /// The pool's connections now: open, idle, waited for, and its limit.
    pub fn pool_status(&self) -> deadpool_postgres::Status {
        self.pool.status()
    }
}
