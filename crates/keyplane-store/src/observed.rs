//! What agents observe on devices: drift, and codes programmed at the device (LOCAL),
//! which are kept, their slots reserved, and may be claimed for a user or removed.

use crate::authority::{actor_from_loaded, denied};
use crate::credential::{
    LoadRequest, Loaded, code_facts, credential_from_row, credential_get_sql, devices_param,
    load_in_txn, new_scope_check, partitions_param,
};
use crate::site::{
    AuditParams, LogParams, policy_actor, site_change_record_in_txn, site_get_in_txn,
};
use crate::stored_json::local_code_audit_json;
use crate::{Actor, Credential, LocalCodePolicy, Store, StoreError, batch_in_txn, in_txn, params};
use crate::{Cached, Transaction};
use keyplane_core::DeviceKind;
use keyplane_core::config::{DriftPlan, LocalError, change_log, claim_scope, drift_plan};
use keyplane_core::credential::{DeviceFacts, involved_partitions};
use keyplane_core::pin::Pin;
use std::time::SystemTime;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

/// How an observed slot compares with what keyplane wrote: the agent's finding, one
/// type from the wire to the table.
pub use keyplane_core::observed::SlotFinding as ObservedState;

/// The `observed_slot.state` value of `state`.
fn state_sql(state: ObservedState) -> &'static str {
    match state {
        ObservedState::Managed => "managed",
        ObservedState::Drifted => "drifted",
        ObservedState::Missing => "missing",
        ObservedState::Foreign => "foreign",
        ObservedState::Conflict => "conflict",
        ObservedState::Unverifiable => "unverifiable",
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

/// A credential as the drift records record it: the credential, and the drifted slot
/// while it is drifted.
fn drift_audit_json(current: &Credential, drift: Option<(Uuid, u16)>) -> serde_json::Value {
    let mut v = crate::credential::stored_credential_audit_json(current);
    v["drift"] = match drift {
        Some((device, slot)) => serde_json::json!({ "device": device, "slot": slot }),
        None => serde_json::Value::Null,
    };
    v
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
    AuditParams::new(
        system,
        Some(site),
        "local_code.clear",
        &name,
        serde_json::json!({ "slot": slot }),
    )
    .before(local_code_audit_json(device, slot, false))
    .after(local_code_audit_json(device, slot, true))
    .write(tx)
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
                        Some(self.key().seal_at(site, device, &slot.to_be_bytes(), pin)?),
                        Some(self.key().id().to_owned()),
                        Some(self.site_pin_hash(site, pin)?),
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
                    "INSERT INTO observed_slot (site_id, device_id, slot, state, pin_sealed, pin_key_id, pin_hash, removing, pin_bound_slot)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, true)",
                    &[&site, &device, &slot, &state_sql(o.state), &sealed, &key_id, &hash, &removing],
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

    /// Clears a local code from its device (the agent clears the slot): one round
    /// trip loads the site, the code and the actor, one writes.
    pub async fn local_code_remove(
        &self,
        actor: &Actor,
        site: Uuid,
        device: Uuid,
        slot: u16,
    ) -> Result<LocalCode, StoreError> {
        let n = i32::from(slot);
        in_txn!(self, "local_code_remove", |tx| {
            let extra: [(&str, &[&(dyn ToSql + Sync)]); 1] =
                [(LOCAL_CODE_SQL, &[&site, &device, &n])];
            let loaded = load_in_txn(
                &tx,
                actor,
                site,
                LoadRequest {
                    extra: &extra,
                    ..LoadRequest::default()
                },
            )
            .await?;
            let d = loaded
                .devices
                .iter()
                .find(|d| d.id == device)
                .ok_or_else(|| device_not_found(site, device))?;
            slot_check(d.model, slot)?;
            let local = loaded.extra[0]
                .first()
                .ok_or_else(|| local_not_found(site, device, slot))?;
            let (who, _) = actor_from_loaded(actor, site, &loaded.partitions, &loaded.users)?;
            who.check_local_code_remove(
                d.kind() == DeviceKind::Panel,
                d.partition,
                actor.acting_partition,
            )
            .map_err(denied)?;
            let removed = LocalCode {
                site,
                device,
                slot,
                model: d.model,
                pin_known: local.get(0),
                removing: true,
                observe_time: local.get(2),
            };
            let log =
                LogParams::new(change_log(loaded.site.revision, &[(device, slot)], true).as_ref());
            let name = format!("sites/{site}/devices/{device}/localCodes/{slot}");
            let audit = AuditParams::new(
                actor,
                Some(site),
                "local_code.remove",
                &name,
                serde_json::json!({ "slot": slot }),
            )
            .before(local_code_audit_json(device, slot, local.get(1)))
            .after(local_code_audit_json(device, slot, true));
            batch_in_txn(
                &tx,
                &[
                    (
                        "UPDATE observed_slot SET removing = true WHERE site_id = $1 AND device_id = $2 AND slot = $3",
                        params![&site, &device, &n],
                    ),
                    log.step(&site),
                    audit.step(),
                ],
            )
            .await?;
            Ok(removed)
        })
    }

    /// Makes a local code `user`'s managed credential: same slot, same code. One
    /// round trip loads the site, the code, the user and the actor and looks for the
    /// code on the devices it will sit on; one writes the credential.
    pub async fn local_code_claim(
        &self,
        actor: &Actor,
        site: Uuid,
        device: Uuid,
        slot: u16,
        user: Uuid,
        panel_partitions: &[u8],
    ) -> Result<Credential, StoreError> {
        let n = i32::from(slot);
        in_txn!(self, "local_code_claim", |tx| {
            let extra: [(&str, &[&(dyn ToSql + Sync)]); 2] = [
                (LOCAL_CODE_SQL, &[&site, &device, &n]),
                (CLAIM_CLASH_SQL, &[&site, &device, &n]),
            ];
            let loaded = load_in_txn(
                &tx,
                actor,
                site,
                LoadRequest {
                    user,
                    extra: &extra,
                    ..LoadRequest::default()
                },
            )
            .await?;
            let d = loaded
                .devices
                .iter()
                .find(|d| d.id == device)
                .ok_or_else(|| device_not_found(site, device))?;
            slot_check(d.model, slot)?;
            let local = loaded.extra[0]
                .first()
                .ok_or_else(|| local_not_found(site, device, slot))?;
            let sealed: Option<Vec<u8>> = local.get(3);
            let key_id: Option<String> = local.get(4);
            let scope = claim_scope(
                d.kind(),
                device,
                local.get(1),
                sealed.is_some() && key_id.is_some(),
                panel_partitions,
            )
            .map_err(|e| local_error(site, device, e))?;
            let (Some(sealed), Some(key_id)) = (sealed, key_id) else {
                return Err(local_error(site, device, LocalError::Masked));
            };
            let pin = open_observed(self.key(), site, device, n, local.get(5), &key_id, &sealed)?;
            let targets = loaded.targets(site, &scope)?;
            let (who, acting) = actor_from_loaded(actor, site, &loaded.partitions, &loaded.users)?;
            let target = loaded.user(site, user)?;
            new_scope_check(site, user, &target.authorities, &scope)?;
            let involved = involved_partitions(&[&scope], &targets);
            let is_self = acting.is_some_and(|a| a.id == user);
            who.check_code_change(&target.authorities, &involved, is_self)
                .map_err(denied)?;
            let clashes: Vec<Uuid> = loaded.extra[1].iter().map(|r| r.get(0)).collect();
            pin_check(&loaded, &targets, &pin, &clashes)?;
            let created_partition = who
                .creation_partition(actor.acting_partition, &involved)
                .map_err(denied)?
                .map(i16::from);
            // The code stays where it is: the claimed slot is the credential's on its
            // device; a site has one panel, and a lock or door scope is that device.
            if let Some(other) = targets.iter().find(|t| t.id != device) {
                return Err(StoreError::Internal(format!(
                    "a claimed code would also land on device {}",
                    loaded.label(other.id)
                )));
            }
            let id = Uuid::new_v4();
            let sealed = self.key().seal(site, id, &pin)?;
            let pin_hash = self.site_pin_hash(site, &pin)?;
            let key_id = self.key().id().to_owned();
            let display_name = "Claimed local code";
            let partitions = partitions_param(&scope);
            let devices = devices_param(&scope);
            let log =
                LogParams::new(change_log(loaded.site.revision, &[(device, slot)], true).as_ref());
            let name = format!("sites/{site}/devices/{device}/localCodes/{slot}");
            let audit = AuditParams::new(
                actor,
                Some(site),
                "local_code.claim",
                &name,
                serde_json::json!({ "user": user.to_string() }),
            )
            .before(local_code_audit_json(device, slot, local.get(1)))
            .after(serde_json::json!({
                "claimed_as": format!("sites/{site}/users/{user}/credentials/{id}"),
            }));
            let get_sql = credential_get_sql();
            let rows = batch_in_txn(
                &tx,
                &[
                    // No longer local: it becomes the credential's slot.
                    (
                        "DELETE FROM observed_slot WHERE site_id = $1 AND device_id = $2 AND slot = $3",
                        params![&site, &device, &n],
                    ),
                    (
                        "INSERT INTO credential (site_id, id, user_id, display_name, pin_sealed, pin_key_id, pin_hash, created_partition)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                        params![&site, &id, &user, &display_name, &sealed, &key_id, &pin_hash, &created_partition],
                    ),
                    (
                        "INSERT INTO credential_partition (site_id, credential_id, partition) SELECT $1, $2, unnest($3::smallint[])",
                        params![&site, &id, &partitions],
                    ),
                    (
                        "INSERT INTO credential_device (site_id, credential_id, device_id) SELECT $1, $2, unnest($3::uuid[])",
                        params![&site, &id, &devices],
                    ),
                    (
                        "INSERT INTO slot_assignment (site_id, device_id, slot, credential_id, pin_hash) VALUES ($1, $2, $3, $4, $5)",
                        params![&site, &device, &n, &id, &pin_hash],
                    ),
                    log.step(&site),
                    audit.step(),
                    (get_sql.as_str(), params![&site, &user, &id]),
                ],
            )
            .await?;
            read_back(&rows, site, user, id)
        })
    }

    /// Resolves drift on `device` for a credential: write keyplane's code again, or
    /// adopt the code the device now holds. One round trip loads the site, the
    /// credential, the drifted slot and the actor (and, to adopt, where the device's
    /// code is already in use); one writes.
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
            let by_slot: &[&(dyn ToSql + Sync)] = &[&site, &device, &credential];
            let mut extra: Vec<(&str, &[&(dyn ToSql + Sync)])> = vec![(DRIFTED_SQL, by_slot)];
            if adopt {
                extra.push((ADOPT_CLASH_SQL, by_slot));
            }
            let loaded = load_in_txn(
                &tx,
                actor,
                site,
                LoadRequest {
                    user,
                    credential: Some(credential),
                    extra: &extra,
                    ..LoadRequest::default()
                },
            )
            .await?;
            let current = loaded.credential().ok_or_else(|| {
                StoreError::NotFound(format!(
                    "credential sites/{site}/users/{user}/credentials/{credential}"
                ))
            })?;
            // Re-applying or adopting changes this code on the device: the same rules as
            // changing it through UpdateCredential.
            let (who, acting) = actor_from_loaded(actor, site, &loaded.partitions, &loaded.users)?;
            let target = loaded.user(site, user)?;
            let is_self = acting.is_some_and(|a| a.id == user);
            let facts = code_facts(current, &loaded.devices);
            who.check_code_existing(&target.authorities, &facts, actor.acting_partition, is_self)
                .map_err(denied)?;
            let held: Vec<(Uuid, u16)> = current.slots.iter().map(|s| (s.device, s.slot)).collect();
            let observed = loaded.extra[0].first();
            let reported = observed.map(|r| {
                (
                    r.get::<_, Option<Vec<u8>>>(0),
                    r.get::<_, Option<String>>(1),
                )
            });
            let reported_place: Option<(i32, bool)> = observed.map(|r| (r.get(2), r.get(3)));
            let reported_code = matches!(reported, Some((Some(_), Some(_))));
            let plan = drift_plan(
                loaded.site.revision,
                &held,
                device,
                observed.is_some(),
                reported_code,
                adopt,
            )
            .map_err(|e| local_error(site, device, e))?;
            let name = format!("sites/{site}/users/{user}/credentials/{credential}");
            let get_sql = credential_get_sql();
            let rows = match plan {
                DriftPlan::Reapply { slot, log } => {
                    let log = LogParams::new(Some(&log));
                    let audit = AuditParams::new(
                        actor,
                        Some(site),
                        "drift.reapply",
                        &name,
                        serde_json::json!({ "device": device.to_string(), "slot": slot.1 }),
                    )
                    .before(drift_audit_json(current, Some((device, slot.1))))
                    .after(drift_audit_json(current, None));
                    let n = i32::from(slot.1);
                    batch_in_txn(
                        &tx,
                        &[
                            (
                                "UPDATE slot_assignment SET write_generation = write_generation + 1
                                 WHERE site_id = $1 AND device_id = $2 AND slot = $3",
                                params![&site, &device, &n],
                            ),
                            log.step(&site),
                            audit.step(),
                            (get_sql.as_str(), params![&site, &user, &credential]),
                        ],
                    )
                    .await?
                }
                DriftPlan::Adopt { slots, log } => {
                    let Some((Some(sealed), Some(key_id))) = reported else {
                        return Err(local_error(site, device, LocalError::NothingToAdopt));
                    };
                    let (slot, bound) = reported_place.unwrap_or((0, false));
                    let pin =
                        open_observed(self.key(), site, device, slot, bound, &key_id, &sealed)?;
                    let targets: Vec<DeviceFacts> = loaded
                        .facts()
                        .into_iter()
                        .filter(|d| slots.iter().any(|(s, _)| *s == d.id))
                        .collect();
                    let clashes: Vec<Uuid> = loaded.extra[1].iter().map(|r| r.get(0)).collect();
                    pin_check(&loaded, &targets, &pin, &clashes)?;
                    let sealed = self.key().seal(site, credential, &pin)?;
                    let pin_hash = self.site_pin_hash(site, &pin)?;
                    let key_id = self.key().id().to_owned();
                    let slot = held
                        .iter()
                        .find(|(d, _)| *d == device)
                        .map(|(_, s)| *s)
                        .unwrap_or_default();
                    let log = LogParams::new(Some(&log));
                    let audit = AuditParams::new(
                        actor,
                        Some(site),
                        "drift.adopt",
                        &name,
                        serde_json::json!({ "device": device.to_string(), "slot": slot }),
                    )
                    .before(drift_audit_json(current, Some((device, slot))))
                    .after(drift_audit_json(current, None));
                    batch_in_txn(
                        &tx,
                        &[
                            (
                                "UPDATE credential SET pin_sealed = $3, pin_key_id = $4, pin_hash = $5, version = version + 1, update_time = now()
                                 WHERE site_id = $1 AND id = $2",
                                params![&site, &credential, &sealed, &key_id, &pin_hash],
                            ),
                            (
                                "UPDATE slot_assignment SET pin_hash = $3 WHERE site_id = $1 AND credential_id = $2",
                                params![&site, &credential, &pin_hash],
                            ),
                            log.step(&site),
                            audit.step(),
                            (get_sql.as_str(), params![&site, &user, &credential]),
                        ],
                    )
                    .await?
                }
            };
            read_back(&rows, site, user, credential)
        })
    }
}

/// Opens an observed code: bound to its slot (`bound`), or, for a row sealed before
/// migration 0012 and not re-sealed since, to its device only.
pub(crate) fn open_observed(
    key: &crate::PinKey,
    site: Uuid,
    device: Uuid,
    slot: i32,
    bound: bool,
    key_id: &str,
    sealed: &[u8],
) -> Result<keyplane_core::pin::Pin, StoreError> {
    if bound {
        key.open_at(site, device, &slot.to_be_bytes(), key_id, sealed)
    } else {
        key.open(site, device, key_id, sealed)
    }
}

/// A local code (foreign or conflict) at slot `$3` of device `$2` of site `$1`:
/// whether its code is known, whether it is being removed, when it was seen, and its
/// sealed code with the key id.
const LOCAL_CODE_SQL: &str =
    "SELECT pin_sealed IS NOT NULL, removing, observe_time, pin_sealed, pin_key_id, pin_bound_slot
     FROM observed_slot
     WHERE site_id = $1 AND device_id = $2 AND slot = $3 AND state IN ('foreign', 'conflict')";

/// Where the local code at slot `$3` of device `$2` (site `$1`) is already in use on
/// the devices it would sit on once claimed (that device, or the site's panels): by
/// a credential, or by another local code.
const CLAIM_CLASH_SQL: &str = "WITH code AS (
        SELECT pin_hash FROM observed_slot WHERE site_id = $1 AND device_id = $2 AND slot = $3
     ), targets AS (
        SELECT id FROM device WHERE site_id = $1 AND (id = $2 OR kind = 'panel')
     )
     SELECT sa.device_id FROM slot_assignment sa
      WHERE sa.site_id = $1 AND sa.device_id IN (SELECT id FROM targets)
        AND sa.pin_hash = (SELECT pin_hash FROM code)
     UNION ALL
     SELECT o.device_id FROM observed_slot o
      WHERE o.site_id = $1 AND o.device_id IN (SELECT id FROM targets)
        AND NOT (o.device_id = $2 AND o.slot = $3)
        AND o.state IN ('foreign', 'conflict') AND o.pin_hash = (SELECT pin_hash FROM code)";

/// The drifted or missing slot of credential `$3` on device `$2` (site `$1`), with the
/// code the device reported there, sealed, and its key id.
const DRIFTED_SQL: &str = "SELECT o.pin_sealed, o.pin_key_id, o.slot, o.pin_bound_slot FROM observed_slot o
     JOIN slot_assignment sa ON sa.site_id = o.site_id AND sa.device_id = o.device_id AND sa.slot = o.slot
     WHERE o.site_id = $1 AND o.device_id = $2 AND sa.credential_id = $3
       AND o.state IN ('drifted', 'missing')";

/// Where the code reported in the drifted slot of credential `$3` on device `$2`
/// (site `$1`) is already in use on the devices the credential sits on: by another
/// credential, or by a local code.
const ADOPT_CLASH_SQL: &str = "WITH code AS (
        SELECT o.pin_hash FROM observed_slot o
          JOIN slot_assignment sa ON sa.site_id = o.site_id AND sa.device_id = o.device_id AND sa.slot = o.slot
         WHERE o.site_id = $1 AND o.device_id = $2 AND sa.credential_id = $3
           AND o.state IN ('drifted', 'missing')
     ), targets AS (
        SELECT device_id FROM slot_assignment WHERE site_id = $1 AND credential_id = $3
     )
     SELECT sa.device_id FROM slot_assignment sa
      WHERE sa.site_id = $1 AND sa.device_id IN (SELECT device_id FROM targets)
        AND sa.credential_id <> $3 AND sa.pin_hash = (SELECT pin_hash FROM code)
     UNION ALL
     SELECT o.device_id FROM observed_slot o
      WHERE o.site_id = $1 AND o.device_id IN (SELECT device_id FROM targets)
        AND o.state IN ('foreign', 'conflict') AND o.pin_hash = (SELECT pin_hash FROM code)";

/// Checks the code fits every target and is on none of them yet (`clashes`: the
/// devices where it is).
fn pin_check(
    loaded: &Loaded,
    targets: &[DeviceFacts],
    pin: &Pin,
    clashes: &[Uuid],
) -> Result<(), StoreError> {
    for t in targets {
        pin.check_fits(&loaded.label(t.id), t.model)
            .map_err(|e| StoreError::InvalidArgument(e.to_string()))?;
    }
    if let Some(t) = targets.iter().find(|t| clashes.contains(&t.id)) {
        return Err(StoreError::AlreadyExists(format!(
            "this code is already in use on device {}; choose another code",
            loaded.label(t.id)
        )));
    }
    Ok(())
}

/// The credential read back by the last step of a write.
fn read_back(
    rows: &[Vec<tokio_postgres::Row>],
    site: Uuid,
    user: Uuid,
    credential: Uuid,
) -> Result<Credential, StoreError> {
    rows.last()
        .and_then(|r| r.first())
        .map(credential_from_row)
        .ok_or_else(|| {
            StoreError::NotFound(format!(
                "credential sites/{site}/users/{user}/credentials/{credential}"
            ))
        })
}

fn device_not_found(site: Uuid, device: Uuid) -> StoreError {
    StoreError::NotFound(format!("device sites/{site}/devices/{device}"))
}

/// Refuses a slot number the device does not have (issue 13: slot numbers are
/// checked against the device, not only looked up).
fn slot_check(model: &keyplane_core::DeviceModel, slot: u16) -> Result<(), StoreError> {
    if slot < model.first_slot || slot > model.last_slot {
        return Err(StoreError::InvalidArgument(format!(
            "slot {slot} is not a slot of this device: a {} has slots {} to {}",
            model.id, model.first_slot, model.last_slot
        )));
    }
    Ok(())
}

fn local_not_found(site: Uuid, device: Uuid, slot: u16) -> StoreError {
    StoreError::NotFound(format!(
        "local code sites/{site}/devices/{device}/localCodes/{slot}"
    ))
}

/// The store's error for a refused local-code or drift call.
fn local_error(site: Uuid, device: Uuid, e: LocalError) -> StoreError {
    match e {
        LocalError::Removing => {
            StoreError::FailedPrecondition("this local code is being removed".into())
        }
        LocalError::Masked => StoreError::FailedPrecondition(
            "the device masks its codes, so this one cannot be claimed: create a credential and remove the local code".into(),
        ),
        LocalError::NoPartitions => StoreError::InvalidArgument(
            "panel_partitions is required to claim a panel user number".into(),
        ),
        LocalError::NoSlot => StoreError::NotFound(format!(
            "slot of this credential on device sites/{site}/devices/{device}"
        )),
        LocalError::NotDrifted => StoreError::FailedPrecondition("this slot has not drifted".into()),
        LocalError::NothingToAdopt => StoreError::FailedPrecondition(
            "the device reported no code to adopt (cleared, or masked): re-apply instead".into(),
        ),
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
