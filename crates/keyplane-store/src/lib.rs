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
mod auth;
mod authority;
mod credential;
mod crypto;
mod device;
mod error;
mod event;
mod migrate;
mod observed;
mod partition;
mod plan;
mod site;
mod sync;
mod types;
mod user;

pub use access_plan::{AccessPlan, AccessPlanFields, Holiday};
pub use crypto::{PinKey, new_token, token_hash};
pub use error::StoreError;
pub use event::{Event, EventKind, NewEvent};
pub use migrate::{MIGRATIONS, migrate, migrations_fingerprint};
pub use observed::{LocalCode, Observed, ObservedState};
pub use plan::{PersonalPlan, PlanPatch};
pub use types::*;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::str::FromStr;

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

/// Handle to the database: a connection pool and the PIN key.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    key: PinKey,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("key", &self.key).finish()
    }
}

impl Store {
    /// Connects a pool of up to `max_connections` to `url` (not yet opened).
    pub fn connect(url: &str, max_connections: usize, key: PinKey) -> Result<Store, StoreError> {
        let config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::InvalidArgument(format!("database url: {e}")))?;
        let manager = Manager::from_config(
            config,
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_connections)
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        Ok(Store { pool, key })
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        migrate(&mut conn).await
    }

    /// Key ids of PINs sealed in the database, with how many rows each holds.
    pub async fn sealed_key_ids(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let conn = self.conn().await?;
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

    /// Refuses to serve with a key other than the database's: PINs it sealed would
    /// never reach agents, and uniqueness (keyed hashes) would not hold. The first
    /// replica to start records its key id; every later one must match it, even
    /// before any PIN is sealed.
    pub async fn key_check(&self) -> Result<(), StoreError> {
        let sealed = self.sealed_key_ids().await?;
        let mine = self.key.id();
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
        let conn = self.conn().await?;
        // Two statements: a replica starting at the same moment may have inserted
        // first, and only a fresh statement sees its row.
        conn.execute(
            "INSERT INTO pin_key_in_use (key_id) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&mine],
        )
        .await?;
        let recorded: String = conn
            .query_one("SELECT key_id FROM pin_key_in_use", &[])
            .await?
            .get(0);
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
