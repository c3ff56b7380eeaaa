//! What agents observe on devices: drift, and codes programmed at the device (LOCAL),
//! which are kept, their slots reserved, and may be claimed for a user or removed.

use crate::authority::{actor_resolve_in_txn, denied};
use crate::credential::credential_get_in_txn;
use crate::site::{
    audit_in_txn, policy_actor, site_change_record_in_txn, site_get_in_txn, site_lock_in_txn,
};
use crate::{Actor, Credential, LocalCodePolicy, Store, StoreError, in_txn};
use crate::{Cached, Transaction};
use keyplane_core::DeviceKind;
use keyplane_core::pin::Pin;
use std::time::SystemTime;
use uuid::Uuid;

/// How an observed slot compares with what keyplane wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObservedState {
    /// Holds keyplane's code.
    Managed,
    /// keyplane's slot holds another code.
    Drifted,
    /// keyplane's slot is empty.
    Missing,
    /// A code keyplane did not write.
    Foreign,
    /// A foreign code equal to a managed one.
    Conflict,
    /// Occupied, codes masked.
    Unverifiable,
}

impl ObservedState {
    fn as_str(self) -> &'static str {
        match self {
            ObservedState::Managed => "managed",
            ObservedState::Drifted => "drifted",
            ObservedState::Missing => "missing",
            ObservedState::Foreign => "foreign",
            ObservedState::Conflict => "conflict",
            ObservedState::Unverifiable => "unverifiable",
        }
    }
}

/// One observed slot, as reported.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Slot.
    pub slot: u16,
    /// State.
    pub state: ObservedState,
    /// The code, when the device reports it (foreign and drifted slots).
    pub pin: Option<Pin>,
}

/// A code programmed at a device.
#[derive(Debug, Clone)]
pub struct LocalCode {
    /// Site id.
    pub site: Uuid,
    /// Device id.
    pub device: Uuid,
    /// Slot.
    pub slot: u16,
    /// Model of the device (for display).
    pub model: &'static keyplane_core::DeviceModel,
    /// Whether the code is known (claimable).
    pub pin_known: bool,
    /// Whether a removal is on its way.
    pub removing: bool,
    /// When last seen.
    pub observe_time: SystemTime,
}

/// Audits and logs the clearing of a local code that the AUTHORITATIVE policy decided.
async fn local_code_cleared_by_policy_in_txn(
    tx: &Transaction<'_>,
    system: &Actor,
    site: Uuid,
    device: Uuid,
    slot: u16,
) -> Result<(), StoreError> {
    let name = format!("sites/{site}/devices/{device}/localCodes/{slot}");
    audit_in_txn(
        tx,
        system,
        Some(site),
        "local_code.clear",
        &name,
        serde_json::json!({ "slot": slot }),
    )
    .await?;
    event_in_txn(
        tx,
        site,
        device,
        "local_code_cleared",
        slot,
        &system.principal,
    )
    .await
}

async fn local_code_get_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    device: Uuid,
    slot: u16,
) -> Result<LocalCode, StoreError> {
    let d = crate::device::device_get_in_txn(tx, site, device).await?;
    let row = tx
        .query_opt(
            "SELECT pin_sealed IS NOT NULL, removing, observe_time FROM observed_slot
             WHERE site_id = $1 AND device_id = $2 AND slot = $3 AND state IN ('foreign', 'conflict')",
            &[&site, &device, &i32::from(slot)],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("local code sites/{site}/devices/{device}/localCodes/{slot}")))?;
    Ok(LocalCode {
        site,
        device,
        slot,
        model: d.model,
        pin_known: row.get(0),
        removing: row.get(1),
        observe_time: row.get(2),
    })
}

impl Store {
    /// Records what the agent observed on a device (its whole table). Under the
    /// AUTHORITATIVE policy, foreign codes are scheduled for clearing and drifted
    /// slots re-written, each audited. Returns whether agents must be woken.
    pub async fn observed_record(
        &self,
        site: Uuid,
        device: Uuid,
        slots: &[Observed],
    ) -> Result<bool, StoreError> {
        in_txn!(self, "observed_record", |tx| {
            let row = tx
                .query_one(
                    "SELECT dealer_id, local_code_policy FROM site WHERE id = $1 FOR NO KEY UPDATE",
                    &[&site],
                )
                .await?;
            let dealer: Uuid = row.get(0);
            let authoritative =
                LocalCodePolicy::parse(row.get(1)) == LocalCodePolicy::Authoritative;
            let model = crate::device::device_get_in_txn(&tx, site, device)
                .await?
                .model;
            let before: Vec<(i32, String, bool)> = tx
                .query(
                    "SELECT slot, state, removing FROM observed_slot WHERE site_id = $1 AND device_id = $2",
                    &[&site, &device],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            tx.execute(
                "DELETE FROM observed_slot WHERE site_id = $1 AND device_id = $2",
                &[&site, &device],
            )
            .await?;
            let system = policy_actor(dealer);
            let mut changed = Vec::new();
            // Reserved slots (a panel's installer code, user 001) belong to the device,
            // not to anyone keyplane manages: never a local code, never cleared or
            // claimed, whatever an agent reports.
            for o in slots.iter().filter(|o| model.is_assignable(o.slot)) {
                let slot = i32::from(o.slot);
                let was = before.iter().find(|(s, _, _)| *s == slot);
                let (sealed, key_id, hash) = match &o.pin {
                    Some(pin) => (
                        Some(self.key().seal(site, device, pin)?),
                        Some(self.key().id().to_owned()),
                        Some(self.key().pin_hash(site, pin)),
                    ),
                    None => (None, None, None),
                };
                let local = matches!(o.state, ObservedState::Foreign | ObservedState::Conflict);
                let mut removing = local && was.is_some_and(|(_, _, r)| *r);
                if local && authoritative && !removing {
                    removing = true;
                    changed.push((device, o.slot));
                    local_code_cleared_by_policy_in_txn(&tx, &system, site, device, o.slot).await?;
                }
                let drift = matches!(o.state, ObservedState::Drifted | ObservedState::Missing);
                let new_drift =
                    drift && !was.is_some_and(|(_, s, _)| s == "drifted" || s == "missing");
                if new_drift {
                    event_in_txn(&tx, site, device, "drift", o.slot, "agent").await?;
                    if authoritative {
                        tx.execute(
                            "UPDATE slot_assignment SET write_generation = write_generation + 1
                             WHERE site_id = $1 AND device_id = $2 AND slot = $3",
                            &[&site, &device, &slot],
                        )
                        .await?;
                        changed.push((device, o.slot));
                    }
                }
                tx.execute(
                    "INSERT INTO observed_slot (site_id, device_id, slot, state, pin_sealed, pin_key_id, pin_hash, removing)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    &[&site, &device, &slot, &o.state.as_str(), &sealed, &key_id, &hash, &removing],
                )
                .await?;
            }
            if !changed.is_empty() {
                site_change_record_in_txn(&tx, site, &changed).await?;
            }
            Ok(!changed.is_empty())
        })
    }

    /// Codes programmed at a site's devices.
    pub async fn local_code_list(
        &self,
        dealer: Uuid,
        site: Uuid,
    ) -> Result<Vec<LocalCode>, StoreError> {
        in_txn!(self, "local_code_list", |tx| {
            site_get_in_txn(&tx, dealer, site).await?;
            // One statement: the agent replaces a device's observed table at any time,
            // so a row listed by one statement may be gone by the next.
            let rows = tx
                .query(
                    "SELECT o.device_id, o.slot, d.model, o.pin_sealed IS NOT NULL, o.removing, o.observe_time
                     FROM observed_slot o JOIN device d ON d.site_id = o.site_id AND d.id = o.device_id
                     WHERE o.site_id = $1 AND o.state IN ('foreign', 'conflict')
                     ORDER BY o.device_id, o.slot",
                    &[&site],
                )
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let model: &str = r.get(2);
                out.push(LocalCode {
                    site,
                    device: r.get(0),
                    slot: u16::try_from(r.get::<_, i32>(1)).unwrap_or(0),
                    model: keyplane_core::DeviceModel::find(model)
                        .ok_or_else(|| StoreError::Internal(format!("unknown model {model}")))?,
                    pin_known: r.get(3),
                    removing: r.get(4),
                    observe_time: r.get(5),
                });
            }
            Ok(out)
        })
    }

    /// Clears a local code from its device (the agent clears the slot).
    pub async fn local_code_remove(
        &self,
        actor: &Actor,
        site: Uuid,
        device: Uuid,
        slot: u16,
    ) -> Result<LocalCode, StoreError> {
        in_txn!(self, "local_code_remove", |tx| {
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            local_code_get_in_txn(&tx, site, device, slot).await?;
            let (who, _) = actor_resolve_in_txn(&tx, actor, site).await?;
            let d = crate::device::device_get_in_txn(&tx, site, device).await?;
            who.check_local_code_remove(
                d.kind() == DeviceKind::Panel,
                d.partition,
                actor.acting_partition,
            )
            .map_err(denied)?;
            tx.execute(
                "UPDATE observed_slot SET removing = true WHERE site_id = $1 AND device_id = $2 AND slot = $3",
                &[&site, &device, &i32::from(slot)],
            )
            .await?;
            site_change_record_in_txn(&tx, site, &[(device, slot)]).await?;
            let name = format!("sites/{site}/devices/{device}/localCodes/{slot}");
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "local_code.remove",
                &name,
                serde_json::json!({ "slot": slot }),
            )
            .await?;
            local_code_get_in_txn(&tx, site, device, slot).await
        })
    }

    /// Makes a local code `user`'s managed credential: same slot, same code.
    pub async fn local_code_claim(
        &self,
        actor: &Actor,
        site: Uuid,
        device: Uuid,
        slot: u16,
        user: Uuid,
        panel_partitions: &[u8],
    ) -> Result<Credential, StoreError> {
        in_txn!(self, "local_code_claim", |tx| {
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            let local = local_code_get_in_txn(&tx, site, device, slot).await?;
            if local.removing {
                return Err(StoreError::FailedPrecondition(
                    "this local code is being removed".into(),
                ));
            }
            let row = tx
                .query_one(
                    "SELECT pin_sealed, pin_key_id FROM observed_slot WHERE site_id = $1 AND device_id = $2 AND slot = $3",
                    &[&site, &device, &i32::from(slot)],
                )
                .await?;
            let (Some(sealed), Some(key_id)) = (
                row.get::<_, Option<Vec<u8>>>(0),
                row.get::<_, Option<String>>(1),
            ) else {
                return Err(StoreError::FailedPrecondition(
                    "the device masks its codes, so this one cannot be claimed: create a credential and remove the local code".into(),
                ));
            };
            let pin = self.key().open(site, device, &key_id, &sealed)?;
            let mut scope = crate::Scope::default();
            match local.model.kind {
                DeviceKind::Lock => scope.locks.push(device),
                DeviceKind::Door => scope.doors.push(device),
                DeviceKind::Panel => {
                    if panel_partitions.is_empty() {
                        return Err(StoreError::InvalidArgument(
                            "panel_partitions is required to claim a panel user number".into(),
                        ));
                    }
                    scope.panel_partitions = panel_partitions.to_vec();
                }
            }
            // No longer local: it becomes the credential's slot.
            tx.execute(
                "DELETE FROM observed_slot WHERE site_id = $1 AND device_id = $2 AND slot = $3",
                &[&site, &device, &i32::from(slot)],
            )
            .await?;
            let id = crate::credential::credential_insert_in_txn(
                self,
                &tx,
                actor,
                site,
                user,
                "Claimed local code",
                &pin,
                &scope,
                Some((device, slot)),
            )
            .await?;
            let name = format!("sites/{site}/devices/{device}/localCodes/{slot}");
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "local_code.claim",
                &name,
                serde_json::json!({ "user": user.to_string() }),
            )
            .await?;
            credential_get_in_txn(&tx, site, user, id).await
        })
    }

    /// Resolves drift on `device` for a credential: write keyplane's code again, or
    /// adopt the code the device now holds.
    pub async fn drift_resolve(
        &self,
        actor: &Actor,
        site: Uuid,
        user: Uuid,
        credential: Uuid,
        device: Uuid,
        adopt: bool,
    ) -> Result<Credential, StoreError> {
        in_txn!(self, "drift_resolve", |tx| {
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            let current = credential_get_in_txn(&tx, site, user, credential).await?;
            // Re-applying or adopting changes this code on the device: the same rules as
            // changing it through UpdateCredential.
            crate::credential::existing_check_in_txn(&tx, actor, site, &current).await?;
            let slot = current
                .slots
                .iter()
                .find(|s| s.device == device)
                .map(|s| s.slot)
                .ok_or_else(|| {
                    StoreError::NotFound(format!(
                        "slot of this credential on device sites/{site}/devices/{device}"
                    ))
                })?;
            let row = tx
                .query_opt(
                    "SELECT pin_sealed, pin_key_id FROM observed_slot
                     WHERE site_id = $1 AND device_id = $2 AND slot = $3 AND state IN ('drifted', 'missing')",
                    &[&site, &device, &i32::from(slot)],
                )
                .await?
                .ok_or_else(|| StoreError::FailedPrecondition("this slot has not drifted".into()))?;
            let name = format!("sites/{site}/users/{user}/credentials/{credential}");
            if adopt {
                let (Some(sealed), Some(key_id)) = (
                    row.get::<_, Option<Vec<u8>>>(0),
                    row.get::<_, Option<String>>(1),
                ) else {
                    return Err(StoreError::FailedPrecondition(
                        "the device reported no code to adopt (cleared, or masked): re-apply instead".into(),
                    ));
                };
                let pin = self.key().open(site, device, &key_id, &sealed)?;
                crate::credential::credential_pin_set_in_txn(self, &tx, site, credential, &pin)
                    .await?;
            } else {
                tx.execute(
                    "UPDATE slot_assignment SET write_generation = write_generation + 1
                     WHERE site_id = $1 AND device_id = $2 AND slot = $3",
                    &[&site, &device, &i32::from(slot)],
                )
                .await?;
                site_change_record_in_txn(&tx, site, &[(device, slot)]).await?;
            }
            let action = if adopt {
                "drift.adopt"
            } else {
                "drift.reapply"
            };
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                action,
                &name,
                serde_json::json!({ "device": device.to_string(), "slot": slot }),
            )
            .await?;
            credential_get_in_txn(&tx, site, user, credential).await
        })
    }
}

async fn event_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    device: Uuid,
    kind: &str,
    slot: u16,
    actor: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO device_event (site_id, device_id, source_seq, kind, user_number, occur_time, actor)
         VALUES ($1, $2, 0, $3, $4, now(), $5)
         ON CONFLICT DO NOTHING",
        &[&site, &device, &kind, &i32::from(slot), &actor],
    )
    .await?;
    Ok(())
}
