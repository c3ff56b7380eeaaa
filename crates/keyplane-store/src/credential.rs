//! Credentials: sealed PINs, their scope, and their slots on each device.

use crate::authority::{actor_resolve_in_txn, denied};
use crate::device::device_get_in_txn;
use crate::site::{
    audit_in_txn, etag_check, replayed_id, request_remember_in_txn, request_replay_in_txn,
    site_change_record_in_txn, site_get_in_txn, site_lock_in_txn,
};
use crate::user::user_get_in_txn;
use crate::{
    Actor, Credential, CredentialPatch, Device, NewCredential, PageRequest, RequestKey, Scope,
    Slot, Store, StoreError, in_txn,
};
use keyplane_core::DeviceKind;
use keyplane_core::allocation::lowest_free_slot;
use keyplane_core::authority::CodeFacts;
use keyplane_core::pin::Pin;
use std::collections::BTreeSet;
use tokio_postgres::{Row, Transaction};
use uuid::Uuid;

const CREDENTIAL_COLUMNS: &str =
    "site_id, user_id, id, display_name, version, create_time, update_time, created_partition,
     valid_from, valid_until, max_uses, uses";

fn label(device: &Device) -> String {
    format!("{:?} ({})", device.display_name, device.name())
}

fn dedup<T: Ord + Copy>(items: &[T]) -> Vec<T> {
    items
        .iter()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Resolves a scope to the devices the credential lands on.
async fn scope_resolve_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    scope: &Scope,
) -> Result<Vec<Device>, StoreError> {
    if scope.is_empty() {
        return Err(StoreError::InvalidArgument(
            "credential.scope must name at least one panel partition, lock or door".into(),
        ));
    }
    let mut targets: Vec<Device> = Vec::new();
    if !scope.panel_partitions.is_empty() {
        for p in dedup(&scope.panel_partitions) {
            crate::partition::partition_get_in_txn(tx, site, p).await?;
        }
        let panels = crate::device::device_list_for_site_in_txn(tx, site)
            .await?
            .into_iter()
            .filter(|d| d.kind() == DeviceKind::Panel)
            .collect::<Vec<_>>();
        if panels.is_empty() {
            return Err(StoreError::FailedPrecondition(format!(
                "site sites/{site} has no panel: add the panel device before scoping codes to partitions"
            )));
        }
        targets.extend(panels);
    }
    for (ids, kind, field) in [
        (&scope.locks, DeviceKind::Lock, "locks"),
        (&scope.doors, DeviceKind::Door, "doors"),
    ] {
        for id in dedup(ids) {
            let device = device_get_in_txn(tx, site, id).await?;
            if device.kind() != kind {
                return Err(StoreError::InvalidArgument(format!(
                    "scope.{field} lists device {} which is a {}, not a {kind}",
                    label(&device),
                    device.kind()
                )));
            }
            targets.push(device);
        }
    }
    Ok(targets)
}

/// Partitions a change touches: the panel partitions, and the partitions of the
/// scoped locks and doors.
fn involved_partitions(scopes: &[&Scope], targets: &[Device]) -> Vec<u8> {
    let mut p: Vec<u8> = scopes
        .iter()
        .flat_map(|s| s.panel_partitions.iter().copied())
        .chain(targets.iter().filter_map(|d| d.partition))
        .collect();
    p.sort_unstable();
    p.dedup();
    p
}

/// Checks the actor may touch `user`'s codes in these partitions, and that the user
/// holds a level in every panel partition of `scope`.
async fn authority_check_in_txn(
    tx: &Transaction<'_>,
    actor: &Actor,
    site: Uuid,
    user: Uuid,
    scopes: &[&Scope],
    new_scope: Option<&Scope>,
    targets: &[Device],
) -> Result<keyplane_core::authority::Actor, StoreError> {
    let (who, acting) = actor_resolve_in_txn(tx, actor, site).await?;
    let target = user_get_in_txn(tx, site, user).await?;
    if let Some(scope) = new_scope {
        for p in &scope.panel_partitions {
            if !target.authorities.contains_key(p) {
                return Err(StoreError::FailedPrecondition(format!(
                    "user sites/{site}/users/{user} has no authority level in partition {p}; grant one before giving them a panel code there"
                )));
            }
        }
    }
    let is_self = acting.is_some_and(|a| a.id == user);
    who.check_code_change(
        &target.authorities,
        &involved_partitions(scopes, targets),
        is_self,
    )
    .map_err(denied)?;
    Ok(who)
}

/// What the authority rules need of an existing code: the partitions it involves
/// (its panel partitions, the partition of the site's panels when it has any, and
/// those of its locks and doors) and where it was created. Unlike resolving a scope
/// for writing, this never fails on a scope whose devices are gone.
pub(crate) fn code_facts(credential: &Credential, devices: &[Device]) -> CodeFacts {
    let mut targets: Vec<Device> = Vec::new();
    if !credential.scope.panel_partitions.is_empty() {
        targets.extend(
            devices
                .iter()
                .filter(|d| d.kind() == DeviceKind::Panel)
                .cloned(),
        );
    }
    let scoped: BTreeSet<Uuid> = credential
        .scope
        .locks
        .iter()
        .chain(&credential.scope.doors)
        .copied()
        .collect();
    targets.extend(devices.iter().filter(|d| scoped.contains(&d.id)).cloned());
    CodeFacts {
        name: format!(
            "sites/{}/users/{}/credentials/{}",
            credential.site, credential.user, credential.id
        ),
        partitions: involved_partitions(&[&credential.scope], &targets),
        created: credential.created_partition,
    }
}

/// Checks the actor may change or delete an existing code: the levels rule over
/// every partition it involves, and the partition it was created in.
pub(crate) async fn existing_check_in_txn(
    tx: &Transaction<'_>,
    actor: &Actor,
    site: Uuid,
    credential: &Credential,
) -> Result<(), StoreError> {
    let (who, acting) = actor_resolve_in_txn(tx, actor, site).await?;
    let target = user_get_in_txn(tx, site, credential.user).await?;
    let devices = crate::device::device_list_for_site_in_txn(tx, site).await?;
    let facts = code_facts(credential, &devices);
    let is_self = acting.is_some_and(|a| a.id == credential.user);
    who.check_code_existing(&target.authorities, &facts, actor.acting_partition, is_self)
        .map_err(denied)
}

/// Checks the PIN fits every target and is not already on any of them.
async fn pin_check_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    targets: &[Device],
    pin: &Pin,
    pin_hash: &[u8],
    exclude: Option<Uuid>,
) -> Result<(), StoreError> {
    for device in targets {
        pin.check_fits(&label(device), device.model)
            .map_err(|e| StoreError::InvalidArgument(e.to_string()))?;
    }
    let ids: Vec<Uuid> = targets.iter().map(|d| d.id).collect();
    let clash = tx
        .query_opt(
            "SELECT device_id FROM slot_assignment
             WHERE site_id = $1 AND device_id = ANY($2) AND pin_hash = $3
               AND ($4::uuid IS NULL OR credential_id <> $4)
             UNION ALL
             SELECT device_id FROM observed_slot
             WHERE site_id = $1 AND device_id = ANY($2) AND pin_hash = $3 AND state IN ('foreign', 'conflict')
             LIMIT 1",
            &[&site, &ids, &pin_hash, &exclude],
        )
        .await?;
    if let Some(row) = clash {
        let device: Uuid = row.get(0);
        let device = targets
            .iter()
            .find(|d| d.id == device)
            .map(label)
            .unwrap_or_default();
        return Err(StoreError::AlreadyExists(format!(
            "this code is already in use on device {device}; choose another code"
        )));
    }
    Ok(())
}

/// Gives the credential the lowest free slot on each device.
async fn slots_allocate_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    credential: Uuid,
    devices: &[Device],
    pin_hash: &[u8],
) -> Result<Vec<(Uuid, u16)>, StoreError> {
    let mut changed = Vec::new();
    for device in devices {
        let occupied: BTreeSet<u16> = tx
            .query(
                // Slots of codes programmed at the device (LOCAL) are reserved too.
                "SELECT slot FROM slot_assignment WHERE site_id = $1 AND device_id = $2
                 UNION SELECT slot FROM observed_slot
                 WHERE site_id = $1 AND device_id = $2 AND state IN ('foreign', 'conflict')",
                &[&site, &device.id],
            )
            .await?
            .iter()
            .filter_map(|r| u16::try_from(r.get::<_, i32>(0)).ok())
            .collect();
        let slot = lowest_free_slot(device.model, &occupied).ok_or_else(|| {
            StoreError::ResourceExhausted(format!(
                "device {} has no free slot: all {} assignable slots of model {} are in use",
                label(device),
                device.model.assignable_count(),
                device.model.id
            ))
        })?;
        tx.execute(
            "INSERT INTO slot_assignment (site_id, device_id, slot, credential_id, pin_hash) VALUES ($1, $2, $3, $4, $5)",
            &[&site, &device.id, &i32::from(slot), &credential, &pin_hash],
        )
        .await?;
        changed.push((device.id, slot));
    }
    Ok(changed)
}

async fn scope_write_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    credential: Uuid,
    scope: &Scope,
) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM credential_partition WHERE site_id = $1 AND credential_id = $2",
        &[&site, &credential],
    )
    .await?;
    tx.execute(
        "DELETE FROM credential_device WHERE site_id = $1 AND credential_id = $2",
        &[&site, &credential],
    )
    .await?;
    let partitions: Vec<i16> = dedup(&scope.panel_partitions)
        .into_iter()
        .map(i16::from)
        .collect();
    tx.execute(
        "INSERT INTO credential_partition (site_id, credential_id, partition) SELECT $1, $2, unnest($3::smallint[])",
        &[&site, &credential, &partitions],
    )
    .await?;
    let devices: Vec<Uuid> = dedup(&[scope.locks.as_slice(), &scope.doors].concat());
    tx.execute(
        "INSERT INTO credential_device (site_id, credential_id, device_id) SELECT $1, $2, unnest($3::uuid[])",
        &[&site, &credential, &devices],
    )
    .await?;
    Ok(())
}

async fn credential_from_row_in_txn(
    tx: &Transaction<'_>,
    row: &Row,
) -> Result<Credential, StoreError> {
    let site: Uuid = row.get(0);
    let id: Uuid = row.get(2);
    let partitions = tx
        .query(
            "SELECT partition FROM credential_partition WHERE site_id = $1 AND credential_id = $2 ORDER BY partition",
            &[&site, &id],
        )
        .await?
        .iter()
        .filter_map(|r| u8::try_from(r.get::<_, i16>(0)).ok())
        .collect();
    let mut scope = Scope {
        panel_partitions: partitions,
        ..Scope::default()
    };
    for r in tx
        .query(
            "SELECT cd.device_id, d.kind FROM credential_device cd JOIN device d ON d.site_id = cd.site_id AND d.id = cd.device_id
             WHERE cd.site_id = $1 AND cd.credential_id = $2 ORDER BY cd.device_id",
            &[&site, &id],
        )
        .await?
    {
        let kind: &str = r.get(1);
        if kind == "door" {
            scope.doors.push(r.get(0));
        } else {
            scope.locks.push(r.get(0));
        }
    }
    let mut slots = Vec::new();
    for r in tx
        .query(
            "SELECT sa.device_id, sa.slot, d.model FROM slot_assignment sa
             JOIN device d ON d.site_id = sa.site_id AND d.id = sa.device_id
             WHERE sa.site_id = $1 AND sa.credential_id = $2 ORDER BY sa.device_id",
            &[&site, &id],
        )
        .await?
    {
        let slot = u16::try_from(r.get::<_, i32>(1)).unwrap_or(0);
        let model: &str = r.get(2);
        let display_slot = keyplane_core::DeviceModel::find(model)
            .map(|m| m.display_slot(slot))
            .unwrap_or_else(|| slot.to_string());
        slots.push(Slot {
            device: r.get(0),
            slot,
            display_slot,
        });
    }
    Ok(Credential {
        site,
        user: row.get(1),
        id,
        display_name: row.get(3),
        scope,
        slots,
        version: row.get(4),
        create_time: row.get(5),
        update_time: row.get(6),
        created_partition: row
            .get::<_, Option<i16>>(7)
            .and_then(|p| u8::try_from(p).ok()),
        valid_from: row.get(8),
        valid_until: row.get(9),
        max_uses: row.get(10),
        uses: row.get(11),
    })
}

pub(crate) async fn credential_get_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    user: Uuid,
    credential: Uuid,
) -> Result<Credential, StoreError> {
    let row = tx
        .query_opt(
            &format!("SELECT {CREDENTIAL_COLUMNS} FROM credential WHERE site_id = $1 AND user_id = $2 AND id = $3"),
            &[&site, &user, &credential],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("credential sites/{site}/users/{user}/credentials/{credential}")))?;
    credential_from_row_in_txn(tx, &row).await
}

/// Deletes a credential and frees its slots (recording the clears). The site row must
/// be locked.
pub(crate) async fn credential_delete_in_txn(
    tx: &Transaction<'_>,
    actor: &Actor,
    site: Uuid,
    user: Uuid,
    credential: Uuid,
) -> Result<(), StoreError> {
    let freed: Vec<(Uuid, u16)> = tx
        .query(
            "DELETE FROM slot_assignment WHERE site_id = $1 AND credential_id = $2 RETURNING device_id, slot",
            &[&site, &credential],
        )
        .await?
        .iter()
        .map(crate::site::device_slot)
        .collect();
    tx.execute(
        "DELETE FROM credential WHERE site_id = $1 AND id = $2",
        &[&site, &credential],
    )
    .await?;
    if !freed.is_empty() {
        site_change_record_in_txn(tx, site, &freed).await?;
    }
    audit_in_txn(
        tx,
        actor,
        Some(site),
        "credential.delete",
        &format!("sites/{site}/users/{user}/credentials/{credential}"),
        serde_json::json!({ "slots_freed": freed.len() }),
    )
    .await
}

impl Store {
    /// Creates a credential: checks its PIN against every scoped device, gives it a slot
    /// on each, and records the change for the site's agent.
    pub async fn credential_create(
        &self,
        actor: &Actor,
        site: Uuid,
        user: Uuid,
        new: &NewCredential,
        key: Option<&RequestKey>,
    ) -> Result<Credential, StoreError> {
        in_txn!(self, "credential_create", |tx| {
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            user_get_in_txn(&tx, site, user).await?;
            if let Some(name) = request_replay_in_txn(&tx, actor.dealer, key).await? {
                return credential_get_in_txn(&tx, site, user, replayed_id(&name)?).await;
            }
            let targets = scope_resolve_in_txn(&tx, site, &new.scope).await?;
            let who = authority_check_in_txn(
                &tx,
                actor,
                site,
                user,
                &[&new.scope],
                Some(&new.scope),
                &targets,
            )
            .await?;
            let pin_hash = self.key().pin_hash(site, &new.pin);
            pin_check_in_txn(&tx, site, &targets, &new.pin, &pin_hash, None).await?;
            let id = Uuid::new_v4();
            let sealed = self.key().seal(site, id, &new.pin)?;
            let created_partition = who
                .creation_partition(
                    actor.acting_partition,
                    &involved_partitions(&[&new.scope], &targets),
                )
                .map_err(denied)?
                .map(i16::from);
            tx.execute(
                "INSERT INTO credential (site_id, id, user_id, display_name, pin_sealed, pin_key_id, pin_hash,
                    created_partition, valid_from, valid_until, max_uses)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                &[&site, &id, &user, &new.display_name, &sealed, &self.key().id(), &pin_hash, &created_partition, &new.valid_from, &new.valid_until, &new.max_uses],
            )
            .await?;
            scope_write_in_txn(&tx, site, id, &new.scope).await?;
            let changed = slots_allocate_in_txn(&tx, site, id, &targets, &pin_hash).await?;
            let revision = site_change_record_in_txn(&tx, site, &changed).await?;
            let name = format!("sites/{site}/users/{user}/credentials/{id}");
            request_remember_in_txn(&tx, actor.dealer, key, &name).await?;
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "credential.create",
                &name,
                serde_json::json!({ "revision": revision, "slots": changed.len() }),
            )
            .await?;
            credential_get_in_txn(&tx, site, user, id).await
        })
    }

    /// Reads a credential (never its PIN).
    pub async fn credential_get(
        &self,
        dealer: Uuid,
        site: Uuid,
        user: Uuid,
        credential: Uuid,
    ) -> Result<Credential, StoreError> {
        in_txn!(self, "credential_get", |tx| {
            site_get_in_txn(&tx, dealer, site).await?;
            credential_get_in_txn(&tx, site, user, credential).await
        })
    }

    /// Lists a user's credentials by id.
    pub async fn credential_list(
        &self,
        dealer: Uuid,
        site: Uuid,
        user: Uuid,
        page: PageRequest,
    ) -> Result<Vec<Credential>, StoreError> {
        in_txn!(self, "credential_list", |tx| {
            site_get_in_txn(&tx, dealer, site).await?;
            user_get_in_txn(&tx, site, user).await?;
            let rows = tx
                .query(
                    &format!(
                        "SELECT {CREDENTIAL_COLUMNS} FROM credential WHERE site_id = $1 AND user_id = $2
                           AND ($3::uuid IS NULL OR id > $3) ORDER BY id LIMIT $4"
                    ),
                    &[&site, &user, &page.after, &page.limit],
                )
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(credential_from_row_in_txn(&tx, row).await?);
            }
            Ok(out)
        })
    }

    /// Changes a credential's name, PIN or scope. Slots on devices that stay in scope
    /// keep their numbers; only changed slots are recorded for the agent.
    pub async fn credential_update(
        &self,
        actor: &Actor,
        site: Uuid,
        user: Uuid,
        credential: Uuid,
        patch: &CredentialPatch,
        etag: &str,
    ) -> Result<Credential, StoreError> {
        in_txn!(self, "credential_update", |tx| {
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            let current = credential_get_in_txn(&tx, site, user, credential).await?;
            let name = format!("sites/{site}/users/{user}/credentials/{credential}");
            etag_check(&format!("credential {name}"), etag, current.version)?;
            let scope = patch.scope.clone().unwrap_or_else(|| current.scope.clone());
            let targets = scope_resolve_in_txn(&tx, site, &scope).await?;
            let mut touched = scope_resolve_in_txn(&tx, site, &current.scope).await?;
            touched.extend(targets.iter().cloned());
            authority_check_in_txn(
                &tx,
                actor,
                site,
                user,
                &[&current.scope, &scope],
                Some(&scope),
                &touched,
            )
            .await?;
            existing_check_in_txn(&tx, actor, site, &current).await?;
            let pin = match &patch.pin {
                Some(pin) => pin.clone(),
                None => {
                    let row = tx
                        .query_one(
                            "SELECT pin_sealed, pin_key_id FROM credential WHERE site_id = $1 AND id = $2",
                            &[&site, &credential],
                        )
                        .await?;
                    self.key().open(site, credential, row.get(1), row.get(0))?
                }
            };
            let pin_hash = self.key().pin_hash(site, &pin);
            pin_check_in_txn(&tx, site, &targets, &pin, &pin_hash, Some(credential)).await?;

            let target_ids: BTreeSet<Uuid> = targets.iter().map(|d| d.id).collect();
            let mut changed: Vec<(Uuid, u16)> = Vec::new();
            for slot in &current.slots {
                if !target_ids.contains(&slot.device) {
                    tx.execute(
                        "DELETE FROM slot_assignment WHERE site_id = $1 AND device_id = $2 AND slot = $3",
                        &[&site, &slot.device, &i32::from(slot.slot)],
                    )
                    .await?;
                    changed.push((slot.device, slot.slot));
                } else if patch.pin.is_some() {
                    tx.execute(
                        "UPDATE slot_assignment SET pin_hash = $4 WHERE site_id = $1 AND device_id = $2 AND slot = $3",
                        &[&site, &slot.device, &i32::from(slot.slot), &pin_hash],
                    )
                    .await?;
                    changed.push((slot.device, slot.slot));
                }
            }
            let held: BTreeSet<Uuid> = current.slots.iter().map(|s| s.device).collect();
            let added: Vec<Device> = targets
                .into_iter()
                .filter(|d| !held.contains(&d.id))
                .collect();
            changed.extend(slots_allocate_in_txn(&tx, site, credential, &added, &pin_hash).await?);

            let sealed = match &patch.pin {
                Some(pin) => Some(self.key().seal(site, credential, pin)?),
                None => None,
            };
            tx.execute(
                "UPDATE credential SET display_name = COALESCE($3, display_name),
                    pin_sealed = COALESCE($4, pin_sealed), pin_key_id = $5, pin_hash = $6,
                    version = version + 1, update_time = now()
                 WHERE site_id = $1 AND id = $2",
                &[
                    &site,
                    &credential,
                    &patch.display_name,
                    &sealed,
                    &self.key().id(),
                    &pin_hash,
                ],
            )
            .await?;
            if patch.scope.is_some() {
                scope_write_in_txn(&tx, site, credential, &scope).await?;
            }
            if !changed.is_empty() {
                site_change_record_in_txn(&tx, site, &changed).await?;
            }
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "credential.update",
                &name,
                serde_json::json!({
                    "display_name": patch.display_name.is_some(),
                    "pin": patch.pin.is_some(),
                    "scope": patch.scope.is_some(),
                    "slots_changed": changed.len(),
                }),
            )
            .await?;
            credential_get_in_txn(&tx, site, user, credential).await
        })
    }

    /// Deletes a credential; its slots are cleared on the devices.
    pub async fn credential_delete(
        &self,
        actor: &Actor,
        site: Uuid,
        user: Uuid,
        credential: Uuid,
        etag: &str,
    ) -> Result<(), StoreError> {
        in_txn!(self, "credential_delete", |tx| {
            site_lock_in_txn(&tx, actor.dealer, site).await?;
            let current = credential_get_in_txn(&tx, site, user, credential).await?;
            etag_check(
                &format!("credential sites/{site}/users/{user}/credentials/{credential}"),
                etag,
                current.version,
            )?;
            existing_check_in_txn(&tx, actor, site, &current).await?;
            credential_delete_in_txn(&tx, actor, site, user, credential).await
        })
    }
}

/// Inserts a credential for `user` with `pin` and `scope`; with `fixed`, its slot on
/// that device is the given one (a claimed local code) instead of a free one.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn credential_insert_in_txn(
    store: &Store,
    tx: &Transaction<'_>,
    actor: &Actor,
    site: Uuid,
    user: Uuid,
    display_name: &str,
    pin: &Pin,
    scope: &Scope,
    fixed: Option<(Uuid, u16)>,
) -> Result<Uuid, StoreError> {
    let targets = scope_resolve_in_txn(tx, site, scope).await?;
    let who =
        authority_check_in_txn(tx, actor, site, user, &[scope], Some(scope), &targets).await?;
    let pin_hash = store.key().pin_hash(site, pin);
    pin_check_in_txn(tx, site, &targets, pin, &pin_hash, None).await?;
    let id = Uuid::new_v4();
    let sealed = store.key().seal(site, id, pin)?;
    let created_partition = who
        .creation_partition(
            actor.acting_partition,
            &involved_partitions(&[scope], &targets),
        )
        .map_err(denied)?
        .map(i16::from);
    tx.execute(
        "INSERT INTO credential (site_id, id, user_id, display_name, pin_sealed, pin_key_id, pin_hash, created_partition)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[&site, &id, &user, &display_name, &sealed, &store.key().id(), &pin_hash, &created_partition],
    )
    .await?;
    scope_write_in_txn(tx, site, id, scope).await?;
    let mut changed = Vec::new();
    for device in &targets {
        match fixed {
            Some((d, slot)) if d == device.id => {
                tx.execute(
                    "INSERT INTO slot_assignment (site_id, device_id, slot, credential_id, pin_hash) VALUES ($1, $2, $3, $4, $5)",
                    &[&site, &device.id, &i32::from(slot), &id, &pin_hash],
                )
                .await?;
                changed.push((device.id, slot));
            }
            _ => changed.extend(
                slots_allocate_in_txn(tx, site, id, std::slice::from_ref(device), &pin_hash)
                    .await?,
            ),
        }
    }
    site_change_record_in_txn(tx, site, &changed).await?;
    Ok(id)
}

/// Gives a credential a new PIN everywhere it sits (drift adopted).
pub(crate) async fn credential_pin_set_in_txn(
    store: &Store,
    tx: &Transaction<'_>,
    site: Uuid,
    credential: Uuid,
    pin: &Pin,
) -> Result<(), StoreError> {
    let device_ids: Vec<Uuid> = tx
        .query(
            "SELECT device_id FROM slot_assignment WHERE site_id = $1 AND credential_id = $2",
            &[&site, &credential],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut targets = Vec::new();
    for d in device_ids {
        targets.push(device_get_in_txn(tx, site, d).await?);
    }
    let pin_hash = store.key().pin_hash(site, pin);
    pin_check_in_txn(tx, site, &targets, pin, &pin_hash, Some(credential)).await?;
    let sealed = store.key().seal(site, credential, pin)?;
    tx.execute(
        "UPDATE credential SET pin_sealed = $3, pin_key_id = $4, pin_hash = $5, version = version + 1, update_time = now()
         WHERE site_id = $1 AND id = $2",
        &[&site, &credential, &sealed, &store.key().id(), &pin_hash],
    )
    .await?;
    let changed: Vec<(Uuid, u16)> = tx
        .query(
            "UPDATE slot_assignment SET pin_hash = $3 WHERE site_id = $1 AND credential_id = $2 RETURNING device_id, slot",
            &[&site, &credential, &pin_hash],
        )
        .await?
        .iter()
        .map(crate::site::device_slot)
        .collect();
    site_change_record_in_txn(tx, site, &changed).await?;
    Ok(())
}
