//! Partitions of a site's alarm system.

use crate::site::{
    AuditParams, RememberParams, config_error, etag_check, site_get_in_txn, site_load_in_txn,
};
use crate::{Actor, Partition, RequestKey, Step, Store, StoreError, batch_in_txn, in_txn, params};
use crate::{Cached, Transaction};
use keyplane_core::config::{partition_create_check, partition_delete_check};
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

/// A partition as the audit log records it before or after a change.
fn partition_audit_json(display_name: &str) -> serde_json::Value {
    serde_json::json!({ "display_name": display_name })
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
        .query_opt(PARTITION_GET_SQL, &[&site, &i16::from(number)])
        .await?
        .ok_or_else(|| not_found(site, number))?;
    Ok(partition_from_row(&row))
}

/// Reads partition `$2` of site `$1`.
const PARTITION_GET_SQL: &str = "SELECT site_id, number, display_name, version FROM partition WHERE site_id = $1 AND number = $2";

impl Store {
    /// Creates a partition: one round trip locks the site and looks for the number,
    /// one writes the partition with its audit entry.
    pub async fn partition_create(
        &self,
        actor: &Actor,
        site: Uuid,
        number: u8,
        display_name: &str,
        key: Option<&RequestKey>,
    ) -> Result<Partition, StoreError> {
        let n = i16::from(number);
        in_txn!(self, "partition_create", |tx| {
            let extra: Vec<Step<'_>> = vec![(PARTITION_GET_SQL, params![&site, &n])];
            let l = site_load_in_txn(&tx, actor.dealer, site, key, extra).await?;
            if let Some(name) = &l.replayed {
                let number = name
                    .rsplit('/')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                return partition_get_in_txn(&tx, site, number).await;
            }
            partition_create_check(number, !l.extra[0].is_empty())
                .map_err(|e| config_error(site, e))?;
            let name = format!("sites/{site}/partitions/{number}");
            let remember = RememberParams::new(actor.dealer, key, &name);
            let audit = AuditParams::new(
                actor,
                Some(site),
                "partition.create",
                &name,
                serde_json::json!({}),
            )
            .after(partition_audit_json(display_name));
            let mut steps: Vec<Step<'_>> = vec![(
                "INSERT INTO partition (site_id, number, display_name) VALUES ($1, $2, $3)
                 RETURNING site_id, number, display_name, version",
                params![&site, &n, &display_name],
            )];
            steps.extend(remember.as_ref().map(RememberParams::step));
            steps.push(audit.step());
            let rows = batch_in_txn(&tx, &steps).await?;
            rows.first()
                .and_then(|r| r.first())
                .map(partition_from_row)
                .ok_or_else(|| not_found(site, number))
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
        let n = i16::from(number);
        in_txn!(self, "partition_update", |tx| {
            let extra: Vec<Step<'_>> = vec![(PARTITION_GET_SQL, params![&site, &n])];
            let l = site_load_in_txn(&tx, actor.dealer, site, None, extra).await?;
            let current = l.extra[0]
                .first()
                .map(partition_from_row)
                .ok_or_else(|| not_found(site, number))?;
            let name = format!("sites/{site}/partitions/{number}");
            etag_check(&format!("partition {name}"), etag, current.version)?;
            let audit = AuditParams::new(
                actor,
                Some(site),
                "partition.update",
                &name,
                serde_json::json!({}),
            )
            .before(partition_audit_json(&current.display_name))
            .after(partition_audit_json(
                display_name.unwrap_or(&current.display_name),
            ));
            let rows = batch_in_txn(
                &tx,
                &[
                    (
                        "UPDATE partition SET display_name = COALESCE($3, display_name), version = version + 1
                         WHERE site_id = $1 AND number = $2 RETURNING site_id, number, display_name, version",
                        params![&site, &n, &display_name],
                    ),
                    audit.step(),
                ],
            )
            .await?;
            rows.first()
                .and_then(|r| r.first())
                .map(partition_from_row)
                .ok_or_else(|| not_found(site, number))
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
        let n = i16::from(number);
        in_txn!(self, "partition_delete", |tx| {
            let extra: Vec<Step<'_>> = vec![
                (PARTITION_GET_SQL, params![&site, &n]),
                (
                    "SELECT (SELECT count(*) FROM device WHERE site_id = $1 AND partition = $2)
                          + (SELECT count(*) FROM credential_partition WHERE site_id = $1 AND partition = $2)",
                    params![&site, &n],
                ),
            ];
            let l = site_load_in_txn(&tx, actor.dealer, site, None, extra).await?;
            let current = l.extra[0]
                .first()
                .map(partition_from_row)
                .ok_or_else(|| not_found(site, number))?;
            let name = format!("sites/{site}/partitions/{number}");
            etag_check(&format!("partition {name}"), etag, current.version)?;
            let uses: i64 = l.extra[1].first().map(|r| r.get(0)).unwrap_or(0);
            partition_delete_check(number, uses).map_err(|e| config_error(site, e))?;
            let audit = AuditParams::new(
                actor,
                Some(site),
                "partition.delete",
                &name,
                serde_json::json!({}),
            )
            .before(partition_audit_json(&current.display_name));
            batch_in_txn(
                &tx,
                &[
                    (
                        "DELETE FROM partition WHERE site_id = $1 AND number = $2",
                        params![&site, &n],
                    ),
                    audit.step(),
                ],
            )
            .await?;
            Ok(())
        })
    }
}
