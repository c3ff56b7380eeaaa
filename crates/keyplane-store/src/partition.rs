//! Partitions of a site's alarm system.

use crate::site::{
    audit_in_txn, etag_check, request_remember_in_txn, request_replay_in_txn, site_get_in_txn,
    site_lock_in_txn,
};
use crate::{Actor, Partition, RequestKey, Store, StoreError, in_txn};
use crate::{Cached, Transaction};
use tokio_postgres::Row;
use uuid::Uuid;

fn partition_from_row(row: &Row) -> Partition {
    let number: i16 = row.get(1);
    Partition {
        site: row.get(0),
        number: u8::try_from(number).unwrap_or(0),
        display_name: row.get(2),
        version: row.get(3),
    }
}

fn not_found(site: Uuid, number: u8) -> StoreError {
    StoreError::NotFound(format!("partition sites/{site}/partitions/{number}"))
}

pub(crate) async fn partition_get_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    number: u8,
) -> Result<Partition, StoreError> {
    let row = tx
        .query_opt(
            "SELECT site_id, number, display_name, version FROM partition WHERE site_id = $1 AND number = $2",
            &[&site, &i16::from(number)],
        )
        .await?
        .ok_or_else(|| not_found(site, number))?;
    Ok(partition_from_row(&row))
}

impl Store {
    /// Creates a partition.
    pub async fn partition_create(
        &self,
        actor: &Actor,
        site: Uuid,
        number: u8,
        display_name: &str,
        key: Option<&RequestKey>,
    ) -> Result<Partition, StoreError> {
        in_txn!(self, "partition_create", |tx| {
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            if let Some(name) = request_replay_in_txn(&tx, actor.dealer, key).await? {
                let number = name
                    .rsplit('/')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                return partition_get_in_txn(&tx, site, number).await;
            }
            let exists = tx
                .query_opt(
                    "SELECT 1 FROM partition WHERE site_id = $1 AND number = $2",
                    &[&site, &i16::from(number)],
                )
                .await?
                .is_some();
            if exists {
                return Err(StoreError::AlreadyExists(format!(
                    "partition sites/{site}/partitions/{number} already exists"
                )));
            }
            let row = tx
                .query_one(
                    "INSERT INTO partition (site_id, number, display_name) VALUES ($1, $2, $3)
                     RETURNING site_id, number, display_name, version",
                    &[&site, &i16::from(number), &display_name],
                )
                .await?;
            let name = format!("sites/{site}/partitions/{number}");
            request_remember_in_txn(&tx, actor.dealer, key, &name).await?;
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "partition.create",
                &name,
                serde_json::json!({}),
            )
            .await?;
            Ok(partition_from_row(&row))
        })
    }

    /// Reads a partition.
    pub async fn partition_get(
        &self,
        dealer: Uuid,
        site: Uuid,
        number: u8,
    ) -> Result<Partition, StoreError> {
        in_txn!(self, "partition_get", |tx| {
            site_get_in_txn(&tx, dealer, site).await?;
            partition_get_in_txn(&tx, site, number).await
        })
    }

    /// Lists a site's partitions, after partition `after`.
    pub async fn partition_list(
        &self,
        dealer: Uuid,
        site: Uuid,
        after: u8,
        limit: i64,
    ) -> Result<Vec<Partition>, StoreError> {
        in_txn!(self, "partition_list", |tx| {
            site_get_in_txn(&tx, dealer, site).await?;
            let rows = tx
                .query(
                    "SELECT site_id, number, display_name, version FROM partition
                     WHERE site_id = $1 AND number > $2 ORDER BY number LIMIT $3",
                    &[&site, &i16::from(after), &limit],
                )
                .await?;
            Ok(rows.iter().map(partition_from_row).collect())
        })
    }

    /// Renames a partition.
    pub async fn partition_update(
        &self,
        actor: &Actor,
        site: Uuid,
        number: u8,
        display_name: Option<&str>,
        etag: &str,
    ) -> Result<Partition, StoreError> {
        in_txn!(self, "partition_update", |tx| {
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            let current = partition_get_in_txn(&tx, site, number).await?;
            etag_check(
                &format!("partition sites/{site}/partitions/{number}"),
                etag,
                current.version,
            )?;
            let row = tx
                .query_one(
                    "UPDATE partition SET display_name = COALESCE($3, display_name), version = version + 1
                     WHERE site_id = $1 AND number = $2 RETURNING site_id, number, display_name, version",
                    &[&site, &i16::from(number), &display_name],
                )
                .await?;
            let name = format!("sites/{site}/partitions/{number}");
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "partition.update",
                &name,
                serde_json::json!({}),
            )
            .await?;
            Ok(partition_from_row(&row))
        })
    }

    /// Deletes a partition no device or credential uses.
    pub async fn partition_delete(
        &self,
        actor: &Actor,
        site: Uuid,
        number: u8,
        etag: &str,
    ) -> Result<(), StoreError> {
        in_txn!(self, "partition_delete", |tx| {
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            let current = partition_get_in_txn(&tx, site, number).await?;
            let name = format!("sites/{site}/partitions/{number}");
            etag_check(&format!("partition {name}"), etag, current.version)?;
            let used: i64 = tx
                .query_one(
                    "SELECT (SELECT count(*) FROM device WHERE site_id = $1 AND partition = $2)
                          + (SELECT count(*) FROM credential_partition WHERE site_id = $1 AND partition = $2)",
                    &[&site, &i16::from(number)],
                )
                .await?
                .get(0);
            if used > 0 {
                return Err(StoreError::FailedPrecondition(format!(
                    "partition {name} is used by devices or credentials; remove it from them first"
                )));
            }
            tx.execute(
                "DELETE FROM partition WHERE site_id = $1 AND number = $2",
                &[&site, &i16::from(number)],
            )
            .await?;
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "partition.delete",
                &name,
                serde_json::json!({}),
            )
            .await?;
            Ok(())
        })
    }
}
