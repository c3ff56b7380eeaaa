//! Places for WatchEvents streams, counted per dealer across every replica: each
//! open stream holds a lease row; a replica renews its leases while it lives, so a
//! crashed replica's places come back once its leases expire.

use crate::{Cached, Store, StoreError, in_txn};
use std::time::Duration;
use uuid::Uuid;

/// A place taken for one WatchEvents stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchLease {
    /// The lease row.
    pub id: Uuid,
    /// The dealer it counts against.
    pub dealer: Uuid,
}

impl Store {
    /// Takes one of `cap` places for a stream of `dealer` held by `replica`, valid for
    /// `ttl` unless renewed; ResourceExhausted when every place is taken.
    pub async fn watch_lease_take(
        &self,
        dealer: Uuid,
        replica: Uuid,
        cap: usize,
        ttl: Duration,
    ) -> Result<WatchLease, StoreError> {
        let cap = i64::try_from(cap).unwrap_or(i64::MAX);
        let ttl = ttl.as_secs_f64();
        let id = Uuid::new_v4();
        in_txn!(self, "watch_lease_take", |tx| {
            // One dealer's takes queue on its lock; other dealers do not wait.
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('watch_lease' || $1::uuid::text, 0))",
                &[&dealer],
            )
            .await?;
            let taken = tx
                .query_opt(
                    "WITH expired AS (
                        DELETE FROM watch_lease WHERE dealer_id = $1 AND expires_at <= now()
                     )
                     INSERT INTO watch_lease (id, dealer_id, replica, expires_at)
                     SELECT $2, $1, $3, now() + make_interval(secs => $4)
                     WHERE (SELECT count(*) FROM watch_lease
                            WHERE dealer_id = $1 AND expires_at > now()) < $5
                     RETURNING id",
                    &[&dealer, &id, &replica, &ttl, &cap],
                )
                .await?;
            match taken {
                Some(_) => Ok(WatchLease { id, dealer }),
                None => Err(StoreError::ResourceExhausted(format!(
                    "this dealer already has {cap} WatchEvents streams open (counted over every \
                     keyplaned replica): close one first (one stream with parent sites/- \
                     watches every site)"
                ))),
            }
        })
    }

    /// Extends every lease `replica` holds by `ttl`; how many it holds.
    pub async fn watch_leases_renew(
        &self,
        replica: Uuid,
        ttl: Duration,
    ) -> Result<u64, StoreError> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "UPDATE watch_lease SET expires_at = now() + make_interval(secs => $2)
                 WHERE replica = $1",
                &[&replica, &ttl.as_secs_f64()],
            )
            .await?;
        Ok(n)
    }

    /// Gives a place back.
    pub async fn watch_lease_release(&self, lease: WatchLease) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        conn.execute(
            "DELETE FROM watch_lease WHERE id = $1 AND dealer_id = $2",
            &[&lease.id, &lease.dealer],
        )
        .await?;
        Ok(())
    }
}
