//! Devices of a site.

use crate::site::{
    audit_in_txn, etag_check, replayed_id, request_remember_in_txn, request_replay_in_txn,
    site_change_record_in_txn, site_get_in_txn, site_lock_in_txn,
};
use crate::{
    Actor, Device, DevicePatch, NewDevice, PageRequest, RequestKey, Store, StoreError, in_txn,
};
use crate::{Cached, Transaction};
use keyplane_core::{DeviceKind, DeviceModel};
use tokio_postgres::Row;
use uuid::Uuid;

pub(crate) const DEVICE_COLUMNS: &str =
    "site_id, id, display_name, model, partition, perimeter, version, create_time, update_time";

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

pub(crate) async fn device_list_for_site_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
) -> Result<Vec<Device>, StoreError> {
    let rows = tx
        .query(
            &format!("SELECT {DEVICE_COLUMNS} FROM device WHERE site_id = $1 ORDER BY id"),
            &[&site],
        )
        .await?;
    rows.iter().map(device_from_row).collect()
}

async fn partition_check_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    kind: DeviceKind,
    partition: Option<u8>,
) -> Result<(), StoreError> {
    if partition.is_some() && !kind.has_partition() {
        return Err(StoreError::InvalidArgument(
            "device.partition: a panel spans partitions (each code names its own in scope.panel_partitions), so it takes no partition: leave partition unset".into(),
        ));
    }
    if let Some(p) = partition {
        crate::partition::partition_get_in_txn(tx, site, p).await?;
    }
    Ok(())
}

impl Store {
    /// Creates a device.
    pub async fn device_create(
        &self,
        actor: &Actor,
        site: Uuid,
        new: &NewDevice,
        key: Option<&RequestKey>,
    ) -> Result<Device, StoreError> {
        in_txn!(self, "device_create", |tx| {
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            if let Some(name) = request_replay_in_txn(&tx, actor.dealer, key).await? {
                return device_get_in_txn(&tx, site, replayed_id(&name)?).await;
            }
            partition_check_in_txn(&tx, site, new.model.kind, new.partition).await?;
            if new.model.kind == DeviceKind::Panel {
                let panels: i64 = tx
                    .query_one(
                        "SELECT count(*) FROM device WHERE site_id = $1 AND kind = 'panel'",
                        &[&site],
                    )
                    .await?
                    .get(0);
                if panels > 0 {
                    return Err(StoreError::AlreadyExists(format!(
                        "site sites/{site} already has a panel; a site has one alarm panel"
                    )));
                }
            }
            let row = tx
                .query_one(
                    &format!(
                        "INSERT INTO device (site_id, display_name, kind, model, partition, perimeter)
                         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {DEVICE_COLUMNS}"
                    ),
                    &[
                        &site,
                        &new.display_name,
                        &new.model.kind.as_str(),
                        &new.model.id,
                        &new.partition.map(i16::from),
                        &new.perimeter,
                    ],
                )
                .await?;
            let device = device_from_row(&row)?;
            // Every agent message lists the site's devices: the agent must learn of it.
            site_change_record_in_txn(&tx, site, &[]).await?;
            request_remember_in_txn(&tx, actor.dealer, key, &device.name()).await?;
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "device.create",
                &device.name(),
                serde_json::json!({"model": new.model.id}),
            )
            .await?;
            Ok(device)
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
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            let current = device_get_in_txn(&tx, site, device).await?;
            etag_check(&format!("device {}", current.name()), etag, current.version)?;
            let partition = patch.partition.unwrap_or(current.partition);
            partition_check_in_txn(&tx, site, current.kind(), partition).await?;
            let row = tx
                .query_one(
                    &format!(
                        "UPDATE device SET display_name = COALESCE($3, display_name), partition = $4,
                            perimeter = COALESCE($5, perimeter), version = version + 1, update_time = now()
                         WHERE site_id = $1 AND id = $2 RETURNING {DEVICE_COLUMNS}"
                    ),
                    &[&site, &device, &patch.display_name, &partition.map(i16::from), &patch.perimeter],
                )
                .await?;
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "device.update",
                &current.name(),
                serde_json::json!({}),
            )
            .await?;
            device_from_row(&row)
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
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            let current = device_get_in_txn(&tx, site, device).await?;
            etag_check(&format!("device {}", current.name()), etag, current.version)?;
            let row = tx
                .query_one(
                    "SELECT (SELECT count(DISTINCT credential_id) FROM (
                                SELECT credential_id FROM slot_assignment WHERE site_id = $1 AND device_id = $2
                                UNION SELECT credential_id FROM credential_device WHERE site_id = $1 AND device_id = $2) c),
                            ARRAY(SELECT user_id FROM personal_access_point WHERE site_id = $1 AND device_id = $2 ORDER BY user_id),
                            ARRAY(SELECT plan_id FROM access_plan_device WHERE site_id = $1 AND device_id = $2 ORDER BY plan_id)",
                    &[&site, &device],
                )
                .await?;
            let (credentials, personal, plans): (i64, Vec<Uuid>, Vec<Uuid>) =
                (row.get(0), row.get(1), row.get(2));
            // Nothing that names the device is removed behind the dealer's back: a shared
            // plan names its doors on purpose, and a code must leave the device first.
            let mut blockers = Vec::new();
            if credentials > 0 {
                blockers.push(format!(
                    "{credentials} credential(s) are scoped to it: delete them or change their scope (UpdateCredential)"
                ));
            }
            if !personal.is_empty() {
                let names: Vec<String> = personal
                    .iter()
                    .map(|u| format!("sites/{site}/users/{u}/personalAccessPlan"))
                    .collect();
                blockers.push(format!(
                    "it is an access point of personal access plan(s) {}: remove it from their access_points (UpdatePersonalAccessPlan)",
                    names.join(", ")
                ));
            }
            if !plans.is_empty() {
                let names: Vec<String> = plans
                    .iter()
                    .map(|p| format!("sites/{site}/accessPlans/{p}"))
                    .collect();
                blockers.push(format!(
                    "it is an access point of access plan(s) {}: remove it from their devices (UpdateAccessPlan) or delete those plans",
                    names.join(", ")
                ));
            }
            if !blockers.is_empty() {
                return Err(StoreError::FailedPrecondition(format!(
                    "device {} cannot be deleted yet: {}",
                    current.name(),
                    blockers.join("; ")
                )));
            }
            tx.execute(
                "DELETE FROM device WHERE site_id = $1 AND id = $2",
                &[&site, &device],
            )
            .await?;
            site_change_record_in_txn(&tx, site, &[]).await?;
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "device.delete",
                &current.name(),
                serde_json::json!({}),
            )
            .await?;
            Ok(())
        })
    }
}
