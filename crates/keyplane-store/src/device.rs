//! Devices of a site.

use crate::site::{
    AuditParams, LogParams, RememberParams, config_error, etag_check, replayed_id, site_get_in_txn,
    site_load_in_txn,
};
use crate::{
    Actor, Device, DevicePatch, NewDevice, PageRequest, RequestKey, Step, Store, StoreError,
    batch_in_txn, in_txn, params,
};
use crate::{Cached, Transaction};
use keyplane_core::DeviceModel;
use keyplane_core::config::{
    change_log, device_create_check, device_delete_check, device_partition_check,
};
use std::collections::BTreeSet;
use tokio_postgres::Row;
use uuid::Uuid;

pub(crate) const DEVICE_COLUMNS: &str =
    "site_id, id, display_name, model, partition, perimeter, version, create_time, update_time,
    reported_constraints";

pub(crate) fn device_from_row(row: &Row) -> Result<Device, StoreError> {
    let model_id: String = row.get(3);
    let model = DeviceModel::find(&model_id).ok_or_else(|| {
        StoreError::Internal(format!("unknown device model {model_id} in database"))
    })?;
    let partition: Option<i16> = row.get(4);
    Ok(Device {
        site: row.get(0),
        id: row.get(1),
        display_name: row.get(2),
        model,
        partition: partition.and_then(|p| u8::try_from(p).ok()),
        perimeter: row.get(5),
        version: row.get(6),
        create_time: row.get(7),
        update_time: row.get(8),
        // A report that no longer decodes is dropped: the profile stays in force.
        reported: crate::stored_json::reported_from_json(row.get(9)),
    })
}

pub(crate) async fn device_get_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    device: Uuid,
) -> Result<Device, StoreError> {
    let row = tx
        .query_opt(
            &format!("SELECT {DEVICE_COLUMNS} FROM device WHERE site_id = $1 AND id = $2"),
            &[&site, &device],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("device sites/{site}/devices/{device}")))?;
    device_from_row(&row)
}

/// The site's partition numbers (site `$1`).
pub(crate) const PARTITIONS_SQL: &str = "SELECT number FROM partition WHERE site_id = $1";

/// Partition numbers from rows of [`PARTITIONS_SQL`].
fn partitions_from(rows: &[Row]) -> BTreeSet<u8> {
    rows.iter()
        .filter_map(|r| u8::try_from(r.get::<_, i16>(0)).ok())
        .collect()
}

/// Reads device `$2` of site `$1`.
fn device_get_sql() -> String {
    format!("SELECT {DEVICE_COLUMNS} FROM device WHERE site_id = $1 AND id = $2")
}

/// A device as the audit log records it before or after a change.
fn device_audit_json(
    display_name: &str,
    model: &DeviceModel,
    partition: Option<u8>,
    perimeter: bool,
) -> serde_json::Value {
    serde_json::json!({
        "display_name": display_name,
        "model": model.id,
        "partition": partition,
        "perimeter": perimeter,
    })
}

fn device_not_found(site: Uuid, device: Uuid) -> StoreError {
    StoreError::NotFound(format!("device sites/{site}/devices/{device}"))
}

impl Store {
    /// Creates a device: one round trip locks the site and loads its partitions and
    /// panel count, one writes the device, the change-log entry (every agent message
    /// lists the site's devices) and the audit entry.
    pub async fn device_create(
        &self,
        actor: &Actor,
        site: Uuid,
        new: &NewDevice,
        key: Option<&RequestKey>,
    ) -> Result<Device, StoreError> {
        in_txn!(self, "device_create", |tx| {
            let extra: Vec<Step<'_>> = vec![
                (PARTITIONS_SQL, params![&site]),
                (
                    "SELECT count(*) FROM device WHERE site_id = $1 AND kind = 'panel'",
                    params![&site],
                ),
            ];
            let l = site_load_in_txn(&tx, actor.dealer, site, key, extra).await?;
            if let Some(name) = &l.replayed {
                return device_get_in_txn(&tx, site, replayed_id(name)?).await;
            }
            let panels: i64 = l.extra[1].first().map(|r| r.get(0)).unwrap_or(0);
            device_create_check(
                new.model.kind,
                new.partition,
                &partitions_from(&l.extra[0]),
                panels,
            )
            .map_err(|e| config_error(site, e))?;
            let id = Uuid::new_v4();
            let name = format!("sites/{site}/devices/{id}");
            let insert_sql = format!(
                "INSERT INTO device (site_id, id, display_name, kind, model, partition, perimeter)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {DEVICE_COLUMNS}"
            );
            let kind = new.model.kind.as_str();
            let partition = new.partition.map(i16::from);
            let log = LogParams::new(change_log(l.site.revision, &[], true).as_ref());
            let remember = RememberParams::new(actor.dealer, key, &name);
            let audit = AuditParams::new(
                actor,
                Some(site),
                "device.create",
                &name,
                serde_json::json!({"model": new.model.id}),
            )
            .after(device_audit_json(
                &new.display_name,
                new.model,
                new.partition,
                new.perimeter,
            ));
            let mut steps: Vec<Step<'_>> = vec![(
                insert_sql.as_str(),
                params![
                    &site,
                    &id,
                    &new.display_name,
                    &kind,
                    &new.model.id,
                    &partition,
                    &new.perimeter
                ],
            )];
            steps.push(log.step(&site));
            steps.extend(remember.as_ref().map(RememberParams::step));
            steps.push(audit.step());
            let rows = batch_in_txn(&tx, &steps).await?;
            let row = rows
                .first()
                .and_then(|r| r.first())
                .ok_or_else(|| device_not_found(site, id))?;
            device_from_row(row)
        })
    }

    /// Reads a device.
    pub async fn device_get(
        &self,
        dealer: Uuid,
        site: Uuid,
        device: Uuid,
    ) -> Result<Device, StoreError> {
        in_txn!(self, "device_get", |tx| {
            site_get_in_txn(&tx, dealer, site).await?;
            device_get_in_txn(&tx, site, device).await
        })
    }

    /// Lists a site's devices by id.
    pub async fn device_list(
        &self,
        dealer: Uuid,
        site: Uuid,
        page: PageRequest,
    ) -> Result<Vec<Device>, StoreError> {
        in_txn!(self, "device_list", |tx| {
            site_get_in_txn(&tx, dealer, site).await?;
            let rows = tx
                .query(
                    &format!(
                        "SELECT {DEVICE_COLUMNS} FROM device WHERE site_id = $1 AND ($2::uuid IS NULL OR id > $2)
                         ORDER BY id LIMIT $3"
                    ),
                    &[&site, &page.after, &page.limit],
                )
                .await?;
            rows.iter().map(device_from_row).collect()
        })
    }

    /// Updates a device's name, partition or perimeter flag.
    pub async fn device_update(
        &self,
        actor: &Actor,
        site: Uuid,
        device: Uuid,
        patch: &DevicePatch,
        etag: &str,
    ) -> Result<Device, StoreError> {
        in_txn!(self, "device_update", |tx| {
            let get_sql = device_get_sql();
            let extra: Vec<Step<'_>> = vec![
                (get_sql.as_str(), params![&site, &device]),
                (PARTITIONS_SQL, params![&site]),
            ];
            let l = site_load_in_txn(&tx, actor.dealer, site, None, extra).await?;
            let current = l.extra[0]
                .first()
                .map(device_from_row)
                .transpose()?
                .ok_or_else(|| device_not_found(site, device))?;
            etag_check(&format!("device {}", current.name()), etag, current.version)?;
            let partition = patch.partition.unwrap_or(current.partition);
            device_partition_check(current.kind(), partition, &partitions_from(&l.extra[1]))
                .map_err(|e| config_error(site, e))?;
            let update_sql = format!(
                "UPDATE device SET display_name = COALESCE($3, display_name), partition = $4,
                    perimeter = COALESCE($5, perimeter), version = version + 1, update_time = now()
                 WHERE site_id = $1 AND id = $2 RETURNING {DEVICE_COLUMNS}"
            );
            let audit = AuditParams::new(
                actor,
                Some(site),
                "device.update",
                &current.name(),
                serde_json::json!({}),
            )
            .before(device_audit_json(
                &current.display_name,
                current.model,
                current.partition,
                current.perimeter,
            ))
            .after(device_audit_json(
                patch.display_name.as_ref().unwrap_or(&current.display_name),
                current.model,
                partition,
                patch.perimeter.unwrap_or(current.perimeter),
            ));
            let partition = partition.map(i16::from);
            let rows = batch_in_txn(
                &tx,
                &[
                    (
                        update_sql.as_str(),
                        params![
                            &site,
                            &device,
                            &patch.display_name,
                            &partition,
                            &patch.perimeter
                        ],
                    ),
                    audit.step(),
                ],
            )
            .await?;
            let row = rows
                .first()
                .and_then(|r| r.first())
                .ok_or_else(|| device_not_found(site, device))?;
            device_from_row(row)
        })
    }

    /// Deletes a device that holds no keyplane codes and no credential scopes it.
    pub async fn device_delete(
        &self,
        actor: &Actor,
        site: Uuid,
        device: Uuid,
        etag: &str,
    ) -> Result<(), StoreError> {
        in_txn!(self, "device_delete", |tx| {
            let get_sql = device_get_sql();
            let extra: Vec<Step<'_>> = vec![
                (get_sql.as_str(), params![&site, &device]),
                (
                    "SELECT (SELECT count(DISTINCT credential_id) FROM (
                                SELECT credential_id FROM slot_assignment WHERE site_id = $1 AND device_id = $2
                                UNION SELECT credential_id FROM credential_device WHERE site_id = $1 AND device_id = $2) c),
                            ARRAY(SELECT user_id FROM personal_access_point WHERE site_id = $1 AND device_id = $2 ORDER BY user_id),
                            ARRAY(SELECT plan_id FROM access_plan_device WHERE site_id = $1 AND device_id = $2 ORDER BY plan_id)",
                    params![&site, &device],
                ),
            ];
            let l = site_load_in_txn(&tx, actor.dealer, site, None, extra).await?;
            let current = l.extra[0]
                .first()
                .map(device_from_row)
                .transpose()?
                .ok_or_else(|| device_not_found(site, device))?;
            etag_check(&format!("device {}", current.name()), etag, current.version)?;
            let row = l.extra[1]
                .first()
                .ok_or_else(|| StoreError::Internal("device uses not read".into()))?;
            let (credentials, personal, plans): (i64, Vec<Uuid>, Vec<Uuid>) =
                (row.get(0), row.get(1), row.get(2));
            device_delete_check(device, credentials, &personal, &plans)
                .map_err(|e| config_error(site, e))?;
            let log = LogParams::new(change_log(l.site.revision, &[], true).as_ref());
            let audit = AuditParams::new(
                actor,
                Some(site),
                "device.delete",
                &current.name(),
                serde_json::json!({}),
            )
            .before(device_audit_json(
                &current.display_name,
                current.model,
                current.partition,
                current.perimeter,
            ));
            batch_in_txn(
                &tx,
                &[
                    (
                        "DELETE FROM device WHERE site_id = $1 AND id = $2",
                        params![&site, &device],
                    ),
                    log.step(&site),
                    audit.step(),
                ],
            )
            .await?;
            Ok(())
        })
    }
}
