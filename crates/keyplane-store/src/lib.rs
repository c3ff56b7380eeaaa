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
mod agent_identity;
mod auth;
mod authority;
mod backup;
mod credential;
mod crypto;
mod device;
mod error;
mod event;
mod migrate;
mod observed;
mod partition;
mod plan;
mod rules;
mod site;
mod status;
mod sync;
mod tls;
mod types;
mod user;

pub use access_plan::{AccessPlan, AccessPlanFields, Holiday};
pub use agent_identity::{AgentPrincipal, ENROLLMENT_CODE_MAX_TTL, EnrollmentCode, SessionCheck};
pub use auth::{DEALER_TOKEN_TTL, DealerToken, DealerTokenInfo};
pub use backup::BackupPool;
pub use crypto::{PinKey, new_token, token_hash};
pub use error::StoreError;
pub use event::{Event, EventKind, NewEvent};
pub use migrate::{MIGRATIONS, migrate, migrations_fingerprint};
pub use observed::{LocalCode, Observed, ObservedState};
pub use plan::{PersonalPlan, PlanPatch};
pub use status::{AssignmentFacts, DeviceFindings, EvaluatedSlot, SlotStatusFacts, StatusEvent};
pub use sync::SiteChange;
pub use types::*;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

/// The transaction type every `_in_txn` function takes: deadpool's, which holds the
/// connection's statement cache.
pub(crate) type Transaction<'a> = deadpool_postgres::Transaction<'a>;

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
cached_impl!(
    deadpool_postgres::Transaction<'_>,
    tokio_postgres::Transaction<'_>
);
cached_impl!(deadpool_postgres::ClientWrapper, tokio_postgres::Client);

/// Sent first in a transaction whose statements PostgreSQL would otherwise re-plan on
/// every execution: for statements with many parameters, with `$n IS NULL OR ...`
/// filters or parameter arrays, it keeps choosing a custom plan (the generic plan's
/// estimate is higher), so the cached statement is planned anew each time. Measured
/// with pg_stat_statements: the slot write of a credential change spent about 0.6 ms
/// planning per write, as much as executing it, and an agent's catch-up about 1.2 ms
/// planning its five reads. A generic plan is built once per connection (and again
/// when ANALYZE changes the statistics); every query here is by site, so the generic
/// plan finds the rows through the same keys. Until the transaction ends only.
pub(crate) const GENERIC_PLANS_SQL: &str = "SET LOCAL plan_cache_mode = force_generic_plan";

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
    let results =
        futures_util::future::join_all(steps.iter().zip(&statements).map(
            |((_, params), statement)| tokio_postgres::Transaction::query(tx, statement, params),
        ))
        .await;
    results
        .into_iter()
        .map(|r| r.map_err(StoreError::from))
        .collect()
}

/// Runs `$body` in a transaction on `$store`, committing on success and retrying the
/// whole body (up to 5 attempts) when PostgreSQL reports a serialization failure or
/// deadlock. `$tx` names the transaction inside the body.
macro_rules! in_txn {
    ($store:expr, $label:literal, |$tx:ident| $body:expr) => {{
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut conn = $store.conn().await?;
            let $tx = conn.transaction().await?;
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
                Err(e) if e.is_retryable() && attempt < 5 => {
                    tracing::debug!(txn = $label, attempt, "retrying transaction");
                    continue;
                }
                other => break other,
            }
        }
    }};
}
pub(crate) use in_txn;

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

/// Handle to the database: a connection pool and the PIN key.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    key: PinKey,
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
        let pool = Pool::builder(manager)
            .max_size(max_connections)
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        Ok(Store {
            pool,
            key,
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

    /// Refuses to serve with a key other than the database's: PINs it sealed would
    /// never reach agents, and uniqueness (keyed hashes) would not hold. The first
    /// replica to start records its key id; every later one must match it, even
    /// before any PIN is sealed.
    pub async fn key_check(&self) -> Result<(), StoreError> {
        let mine = self.key.id();
        // One connection for all of it: a pool of one must not wait on itself.
        let conn = self.conn().await?;
        let recorded: Option<String> = conn
            .query_opt("SELECT key_id FROM pin_key_in_use", &[])
            .await?
            .map(|r| r.get(0));
        // Once a key is recorded every replica is checked against it, so only a
        // database without the record (new, or sealed before it existed) needs the
        // scan of every sealed PIN.
        if recorded.is_none() {
            let sealed = sealed_key_ids(&conn).await?;
            let list = |ids: &[(String, i64)]| {
                ids.iter()
                    .map(|(id, n)| format!("{id} ({n} sealed PIN(s))"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if sealed.len() > 1 {
                return Err(StoreError::FailedPrecondition(format!(
                    "the database holds PINs sealed under several keys: {}; every replica must use the same key. Restore the key that sealed most of them and re-create the others' codes",
                    list(&sealed)
                )));
            }
            if let Some((theirs, _)) = sealed.first()
                && theirs != mine
            {
                return Err(StoreError::FailedPrecondition(format!(
                    "the database holds PINs sealed under key id {} but the configured PIN key is {mine}: start keyplaned with the key file that holds {theirs} (every replica must use the same key; `keyplaned key-id --pin-key-file FILE` prints a key file's id)",
                    list(&sealed),
                    theirs = theirs,
                )));
            }
            // Two statements: a replica starting at the same moment may have inserted
            // first, and only a fresh statement sees its row.
            conn.execute(
                "INSERT INTO pin_key_in_use (key_id) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&mine],
            )
            .await?;
        }
        let recorded: String = match recorded {
            Some(id) => id,
            None => conn
                .query_one("SELECT key_id FROM pin_key_in_use", &[])
                .await?
                .get(0),
        };
        if recorded != mine {
            return Err(StoreError::FailedPrecondition(format!(
                "this database is keyed to PIN key id {recorded} (recorded when the first replica started) but the configured PIN key is {mine}: start keyplaned with the key file that holds {recorded} (`keyplaned key-id --pin-key-file FILE` prints a key file's id)"
            )));
        }
        Ok(())
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
        Ok(self.pool.get().await?)
    }
}
