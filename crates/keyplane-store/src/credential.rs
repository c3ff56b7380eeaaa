//! Credentials: sealed PINs, their scope, and their slots on each device.

use crate::authority::{
    USER_COLUMNS, USER_FACTS_SQL, UserFacts, actor_from_loaded, actor_precheck_in_txn, denied,
    user_facts, user_from_row, user_get_in_txn,
};
use crate::device::{DEVICE_COLUMNS, device_from_row};
use crate::site::{
    AuditParams, REPLAY_LOCK_SQL, REPLAY_LOOKUP_SQL, SITE_COLUMNS, etag_check, not_found_site,
    replay_decide, replayed_id, site_change_record_in_txn, site_from_row, site_get_in_txn,
};
use crate::{
    Actor, Credential, CredentialPatch, Device, NewCredential, PageRequest, RequestKey, Scope,
    Site, Slot, Store, StoreError, User, batch_in_txn, in_txn, params,
};
use crate::{Cached, Transaction};
use keyplane_core::DeviceKind;
use keyplane_core::authority::CodeFacts;
use keyplane_core::credential::{
    DeviceFacts, ScopeError, SlotPlan, involved_partitions as involved_partitions_core,
    resolve_targets, slot_plan, slots_after,
};
use keyplane_core::pin::Pin;
use std::collections::BTreeSet;
use std::collections::HashMap;
use tokio_postgres::Client as Pg;
use tokio_postgres::Row;
use uuid::Uuid;

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

/// The `INSERT INTO slot_assignment` that gives each device of `$devices` (with its
/// `$first`..`$last` range) its lowest slot not reserved (`$reserved_devices`,
/// `$reserved_slots` pairs), not assigned and not held by a local code, for credential
/// `$2` with PIN hash `$pin_hash` on site `$1`; returns (device_id, slot). One text for
/// every statement that allocates, with its own parameter numbers.
///
/// The taken slots from `$first` up (assigned, reserved, held by a local code, and
/// `$first - 1` as a floor), each once, are walked in order: the first one whose
/// successor is not taken is just below the lowest free slot. One pass over the
/// door's codes, whatever plan PostgreSQL picks. The earlier form (every taken slot +
/// 1 as a candidate, each checked with NOT EXISTS) ran as a nested loop over a
/// materialized scan under the write's generic plan: quadratic, 35-42 ms a create on
/// a door of 992 codes against 1.6 ms now (EXPLAIN ANALYZE, docs/BENCHMARKS.md).
macro_rules! allocate_sql {
    ($pin_hash:literal, $devices:literal, $first:literal, $last:literal,
     $reserved_devices:literal, $reserved_slots:literal) => {
        concat!(
            "INSERT INTO slot_assignment (site_id, device_id, slot, credential_id, pin_hash)
        SELECT $1, t.device, free.slot, $2, ", $pin_hash, "
          FROM unnest(", $devices, "::uuid[], ", $first, "::int[], ", $last, "::int[]) AS t(device, first, last)
          CROSS JOIN LATERAL (
            SELECT g.slot + 1 AS slot FROM (
                SELECT taken.slot, lead(taken.slot) OVER (ORDER BY taken.slot) AS next FROM (
                    SELECT t.first - 1
                    UNION SELECT r.slot FROM unnest(", $reserved_devices, "::uuid[], ", $reserved_slots, "::int[]) AS r(device, slot)
                           WHERE r.device = t.device AND r.slot >= t.first
                    UNION SELECT sa.slot FROM slot_assignment sa
                           WHERE sa.site_id = $1 AND sa.device_id = t.device AND sa.slot >= t.first
                    UNION SELECT o.slot FROM observed_slot o
                           WHERE o.site_id = $1 AND o.device_id = t.device AND o.slot >= t.first
                             AND o.state IN ('foreign', 'conflict')
                ) AS taken(slot)
            ) AS g
             WHERE g.next IS DISTINCT FROM g.slot + 1 AND g.slot + 1 <= t.last
             ORDER BY g.slot LIMIT 1
          ) AS free
        RETURNING device_id, slot"
        )
    };
}

/// The columns of a whole credential (row, scope and slots) from `credential c`, so
/// one query reads it and a page of them is one query too. The three slot arrays
/// share one order.
pub(crate) const CREDENTIAL_FIELDS: &str = "c.site_id, c.user_id, c.id, c.display_name, c.version, c.create_time,
    c.update_time, c.created_partition, c.valid_from, c.valid_until, c.max_uses, c.uses,
    ARRAY(SELECT p.partition FROM credential_partition p
          WHERE p.site_id = c.site_id AND p.credential_id = c.id ORDER BY p.partition),
    ARRAY(SELECT cd.device_id FROM credential_device cd
          JOIN device d ON d.site_id = cd.site_id AND d.id = cd.device_id
          WHERE cd.site_id = c.site_id AND cd.credential_id = c.id AND d.kind <> 'door' ORDER BY cd.device_id),
    ARRAY(SELECT cd.device_id FROM credential_device cd
          JOIN device d ON d.site_id = cd.site_id AND d.id = cd.device_id
          WHERE cd.site_id = c.site_id AND cd.credential_id = c.id AND d.kind = 'door' ORDER BY cd.device_id),
    ARRAY(SELECT sa.device_id FROM slot_assignment sa
          WHERE sa.site_id = c.site_id AND sa.credential_id = c.id ORDER BY sa.device_id),
    ARRAY(SELECT sa.slot FROM slot_assignment sa
          WHERE sa.site_id = c.site_id AND sa.credential_id = c.id ORDER BY sa.device_id),
    ARRAY(SELECT d.model FROM slot_assignment sa JOIN device d ON d.site_id = sa.site_id AND d.id = sa.device_id
          WHERE sa.site_id = c.site_id AND sa.credential_id = c.id ORDER BY sa.device_id)";

/// The credential row's own columns, in the order [`CREDENTIAL_FIELDS`] starts with:
/// what a write returns, so it need not read the credential back.
macro_rules! credential_row_returning {
    () => {
        "site_id, user_id, id, display_name, version, create_time,
            update_time, created_partition, valid_from, valid_until, max_uses, uses"
    };
}

/// A slot as people see it on its device's model (`002` on panels).
fn slot_shown(device: Uuid, slot: u16, model: Option<&keyplane_core::DeviceModel>) -> Slot {
    Slot {
        device,
        slot,
        display_slot: model
            .map(|m| m.display_slot(slot))
            .unwrap_or_else(|| slot.to_string()),
    }
}

/// Reads a credential selected with [`CREDENTIAL_FIELDS`].
pub(crate) fn credential_from_row(row: &Row) -> Credential {
    let partitions: Vec<i16> = row.get(12);
    let devices: Vec<Uuid> = row.get(15);
    let numbers: Vec<i32> = row.get(16);
    let models: Vec<String> = row.get(17);
    let slots = devices
        .into_iter()
        .zip(numbers)
        .zip(models)
        .map(|((device, slot), model)| {
            let slot = u16::try_from(slot).unwrap_or(0);
            slot_shown(device, slot, keyplane_core::DeviceModel::find(&model))
        })
        .collect();
    let mut credential = credential_head(row);
    credential.scope = Scope {
        panel_partitions: partitions
            .into_iter()
            .filter_map(|p| u8::try_from(p).ok())
            .collect(),
        locks: row.get(13),
        doors: row.get(14),
    };
    credential.slots = slots;
    credential
}

/// The row part of a credential ([`credential_row_returning!`], the first columns of
/// [`CREDENTIAL_FIELDS`]), with no scope and no slots.
fn credential_head(row: &Row) -> Credential {
    Credential {
        site: row.get(0),
        user: row.get(1),
        id: row.get(2),
        display_name: row.get(3),
        scope: Scope::default(),
        slots: Vec::new(),
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
    }
}

/// The credential a write leaves: its row as the write returned it
/// ([`credential_row_returning!`]), the scope written and the slots it holds after,
/// shaped as [`credential_from_row`] reads them (partitions and devices sorted and
/// without repeats, devices split by kind, slots by device).
fn credential_written(
    row: &Row,
    scope: &Scope,
    slots: &[(Uuid, u16)],
    devices: &[Device],
) -> Credential {
    let device = |id: Uuid| devices.iter().find(|d| d.id == id);
    let (doors, locks): (Vec<&Device>, Vec<&Device>) = devices_param(scope)
        .into_iter()
        .filter_map(device)
        .partition(|d| d.model.kind == DeviceKind::Door);
    let mut credential = credential_head(row);
    credential.scope = Scope {
        panel_partitions: dedup(&scope.panel_partitions),
        locks: locks.iter().map(|d| d.id).collect(),
        doors: doors.iter().map(|d| d.id).collect(),
    };
    credential.slots = slots
        .iter()
        .map(|&(id, slot)| slot_shown(id, slot, device(id).map(|d| d.model)))
        .collect();
    credential
}

/// Reads credential `$3` of user `$2` of site `$1` with [`CREDENTIAL_FIELDS`].
pub(crate) fn credential_get_sql() -> String {
    format!(
        "SELECT {CREDENTIAL_FIELDS} FROM credential c WHERE c.site_id = $1 AND c.user_id = $2 AND c.id = $3"
    )
}

fn not_found(site: Uuid, user: Uuid, credential: Uuid) -> StoreError {
    StoreError::NotFound(format!(
        "credential sites/{site}/users/{user}/credentials/{credential}"
    ))
}

pub(crate) async fn credential_get_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    user: Uuid,
    credential: Uuid,
) -> Result<Credential, StoreError> {
    let row = tx
        .query_opt(&credential_get_sql(), &[&site, &user, &credential])
        .await?
        .ok_or_else(|| not_found(site, user, credential))?;
    Ok(credential_from_row(&row))
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
    // Read (for the audit record) and freed in one round trip.
    let get_sql = credential_get_sql();
    let rows = batch_in_txn(
        tx,
        &[
            (get_sql.as_str(), params![&site, &user, &credential]),
            (
                "DELETE FROM slot_assignment WHERE site_id = $1 AND credential_id = $2 RETURNING device_id, slot",
                params![&site, &credential],
            ),
        ],
    )
    .await?;
    let was = rows
        .first()
        .and_then(|r| r.first())
        .map(credential_from_row)
        .ok_or_else(|| not_found(site, user, credential))?;
    let freed: Vec<(Uuid, u16)> = rows
        .get(1)
        .map(|r| r.iter().map(crate::site::device_slot).collect())
        .unwrap_or_default();
    tx.execute(
        "DELETE FROM credential WHERE site_id = $1 AND id = $2",
        &[&site, &credential],
    )
    .await?;
    if !freed.is_empty() {
        site_change_record_in_txn(tx, site, &freed).await?;
    }
    AuditParams::new(
        actor,
        Some(site),
        "credential.delete",
        &format!("sites/{site}/users/{user}/credentials/{credential}"),
        serde_json::json!({ "slots_freed": freed.len() }),
    )
    .before(stored_credential_audit_json(&was))
    .write(tx)
    .await
}

/// What one write asks the load step for.
#[derive(Default)]
pub(crate) struct LoadRequest<'a> {
    /// The user whose codes or levels are written.
    pub user: Uuid,
    /// The PIN to check for clashes; None: the current credential's.
    pub pin_hash: Option<&'a [u8]>,
    /// Locks and doors the write may land on, and whether it names panel partitions.
    pub devices: Vec<Uuid>,
    pub panels: bool,
    /// The credential changed or deleted.
    pub credential: Option<Uuid>,
    /// The create's idempotency key.
    pub key: Option<&'a RequestKey>,
    /// Read the user's row too.
    pub user_row: bool,
    /// Read every credential of the user too.
    pub codes: bool,
    /// More reads of the caller's, sent after the others in the same round trip.
    pub extra: &'a [(&'a str, &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)])],
    /// Switch the transaction to generic plans ([`crate::generic_plans_column!`]) from the
    /// load's second statement on, within it rather than as a statement of its own.
    pub generic_plans: bool,
    /// The write checks no PIN (a delete): the clash read is not sent.
    pub skip_clashes: bool,
}

/// The credential as it stands, with its sealed PIN.
struct Current {
    credential: Credential,
    sealed: Vec<u8>,
    key_id: String,
}

/// Everything a write decides on.
pub(crate) struct Loaded {
    pub site: Site,
    pub devices: Vec<Device>,
    pub partitions: BTreeSet<u8>,
    pub users: HashMap<Uuid, UserFacts>,
    /// Devices where the PIN is held by another credential or a local code.
    clashes: BTreeSet<Uuid>,
    current: Option<Current>,
    /// The resource an earlier run of this request created.
    pub replayed: Option<String>,
    /// The user's row, when asked for.
    pub user_row: Option<User>,
    /// The user's credentials, when asked for.
    pub codes: Vec<Credential>,
    /// The rows of each of the request's `extra` reads.
    pub extra: Vec<Vec<Row>>,
}

impl Loaded {
    pub(crate) fn facts(&self) -> Vec<DeviceFacts> {
        self.devices
            .iter()
            .map(|d| DeviceFacts {
                id: d.id,
                model: d.model,
                partition: d.partition,
            })
            .collect()
    }

    pub(crate) fn label(&self, id: Uuid) -> String {
        self.devices
            .iter()
            .find(|d| d.id == id)
            .map(label)
            .unwrap_or_default()
    }

    /// The devices `scope` lands on, with the store's messages.
    pub(crate) fn targets(
        &self,
        site: Uuid,
        scope: &Scope,
    ) -> Result<Vec<DeviceFacts>, StoreError> {
        resolve_targets(scope, &self.partitions, &self.facts()).map_err(|e| match e {
            ScopeError::Empty => StoreError::InvalidArgument(
                "credential.scope must name at least one panel partition, lock or door".into(),
            ),
            ScopeError::NoPartition(p) => {
                StoreError::NotFound(format!("partition sites/{site}/partitions/{p}"))
            }
            ScopeError::NoPanel => StoreError::FailedPrecondition(format!(
                "site sites/{site} has no panel: add the panel device before scoping codes to partitions"
            )),
            ScopeError::NoDevice(id) => {
                StoreError::NotFound(format!("device sites/{site}/devices/{id}"))
            }
            ScopeError::WrongKind {
                field,
                device,
                is,
                want,
            } => StoreError::InvalidArgument(format!(
                "scope.{field} lists device {} which is a {is}, not a {want}",
                self.label(device),
            )),
        })
    }

    /// Checks the PIN fits every target and is on none of them yet.
    fn pin_check(&self, targets: &[DeviceFacts], pin: &Pin) -> Result<(), StoreError> {
        for t in targets {
            // Issue 11: what the device reported overrides its profile; the refusal
            // names the device and the constraint, never the code.
            let reported = self
                .devices
                .iter()
                .find(|d| d.id == t.id && d.reported.is_some());
            if let Some(d) = reported {
                d.constraints().check_pin(pin).map_err(|violation| {
                    StoreError::InvalidArgument(
                        keyplane_core::constraints::ConstraintError {
                            device: self.label(t.id),
                            violation,
                        }
                        .to_string(),
                    )
                })?;
            } else {
                pin.check_fits(&self.label(t.id), t.model)
                    .map_err(|e| StoreError::InvalidArgument(e.to_string()))?;
            }
        }
        if let Some(t) = targets.iter().find(|t| self.clashes.contains(&t.id)) {
            return Err(StoreError::AlreadyExists(format!(
                "this code is already in use on device {}; choose another code",
                self.label(t.id)
            )));
        }
        Ok(())
    }

    /// The credential changed, as it stands, when the request named one of the user's.
    pub(crate) fn credential(&self) -> Option<&Credential> {
        self.current.as_ref().map(|c| &c.credential)
    }

    /// The user whose code a dealer's request writes, or not found: keyplane's own
    /// users (the backup pool) are not reachable through the API, as in the user API.
    pub(crate) fn user(&self, site: Uuid, user: Uuid) -> Result<&UserFacts, StoreError> {
        self.user_for(site, user, false)
    }

    /// The user whose code is written; a system user only when `system_owner`.
    pub(crate) fn user_for(
        &self,
        site: Uuid,
        user: Uuid,
        system_owner: bool,
    ) -> Result<&UserFacts, StoreError> {
        self.users
            .get(&user)
            .filter(|u| system_owner || !u.system)
            .ok_or_else(|| StoreError::NotFound(format!("user sites/{site}/users/{user}")))
    }
}

/// Locks the site row and reads what a write decides on, in one pipelined round trip:
/// statements are sent in order, so every read runs under the lock.
pub(crate) async fn load_in_txn(
    tx: &Transaction<'_>,
    actor: &Actor,
    site: Uuid,
    req: LoadRequest<'_>,
) -> Result<Loaded, StoreError> {
    let mut users = vec![req.user];
    if let Some((s, u)) = actor.acting_user
        && s == site
    {
        users.push(u);
    }
    let site_sql = format!(
        "SELECT {SITE_COLUMNS} FROM site WHERE id = $1 AND dealer_id = $2 FOR NO KEY UPDATE"
    );
    // The devices and the partitions in one statement (one row at least, the
    // partitions on every row): per-statement overhead is most of PostgreSQL's cost
    // of a write. With `generic_plans`, `set_config` is the transaction's
    // `SET LOCAL` (a volatile call, so evaluated, once), in effect for every
    // statement bound after this one.
    let generic = if req.generic_plans {
        concat!(", ", crate::generic_plans_column!(), " AS generic")
    } else {
        ""
    };
    let devices_sql = format!(
        "SELECT {DEVICE_COLUMNS}, p.parts
         FROM (SELECT ARRAY(SELECT number FROM partition WHERE site_id = $1) AS parts{generic}) p
         LEFT JOIN device ON device.site_id = $1 ORDER BY id"
    );
    let current_sql = format!(
        "SELECT {CREDENTIAL_FIELDS}, c.pin_sealed, c.pin_key_id FROM credential c
         WHERE c.site_id = $1 AND c.user_id = $2 AND c.id = $3"
    );
    let user_sql =
        format!("SELECT {USER_COLUMNS} FROM site_user u WHERE u.site_id = $1 AND u.id = $2");
    let codes_sql = format!(
        "SELECT {CREDENTIAL_FIELDS} FROM credential c WHERE c.site_id = $1 AND c.user_id = $2 ORDER BY c.id"
    );
    let (s_user, s_codes, s_extra) = tokio::try_join!(
        tx.prepare_cached(&user_sql),
        tx.prepare_cached(&codes_sql),
        futures_util::future::try_join_all(req.extra.iter().map(|(sql, _)| tx.prepare_cached(sql))),
    )?;
    let (s_site, s_devices, s_users, s_clash, s_current, s_lock, s_lookup) = tokio::try_join!(
        tx.prepare_cached(&site_sql),
        tx.prepare_cached(&devices_sql),
        tx.prepare_cached(USER_FACTS_SQL),
        tx.prepare_cached(
            // Only the devices the write may land on; the keys make it an index probe
            // per device, whatever the number of codes.
            "SELECT sa.device_id FROM slot_assignment sa
              JOIN device d ON d.site_id = sa.site_id AND d.id = sa.device_id
             WHERE sa.site_id = $1 AND (d.id = ANY($2) OR ($3 AND d.kind = 'panel') OR d.id IN
                   (SELECT device_id FROM credential_device WHERE site_id = $1 AND credential_id = $5))
               AND sa.pin_hash = COALESCE($4, (SELECT pin_hash FROM credential WHERE site_id = $1 AND id = $5))
               AND ($5::uuid IS NULL OR sa.credential_id <> $5)
             UNION ALL
             SELECT o.device_id FROM observed_slot o
              JOIN device d ON d.site_id = o.site_id AND d.id = o.device_id
             WHERE o.site_id = $1 AND (d.id = ANY($2) OR ($3 AND d.kind = 'panel') OR d.id IN
                   (SELECT device_id FROM credential_device WHERE site_id = $1 AND credential_id = $5))
               AND o.pin_hash = COALESCE($4, (SELECT pin_hash FROM credential WHERE site_id = $1 AND id = $5))
               AND o.state IN ('foreign', 'conflict')"
        ),
        tx.prepare_cached(&current_sql),
        tx.prepare_cached(REPLAY_LOCK_SQL),
        tx.prepare_cached(REPLAY_LOOKUP_SQL),
    )?;
    let dealer = actor.dealer.to_string();
    let credential = req.credential.unwrap_or_default();
    let (site_row, devices, user_rows, clashes, current, lock, lookup, user_row, codes, extra) = tokio::join!(
        biased;
        async { Pg::query_opt(tx, &s_site, &[&site, &actor.dealer]).await },
        async { Pg::query(tx, &s_devices, &[&site]).await },
        async { Pg::query(tx, &s_users, &[&site, &users]).await },
        async {
            if req.skip_clashes || (req.pin_hash.is_none() && req.credential.is_none()) {
                return Ok(Vec::new());
            }
            Pg::query(
                tx,
                &s_clash,
                &[&site, &req.devices, &req.panels, &req.pin_hash, &req.credential],
            )
            .await
        },
        async {
            match req.credential {
                None => Ok(None),
                Some(_) => Pg::query_opt(tx, &s_current, &[&site, &req.user, &credential]).await,
            }
        },
        async {
            match req.key {
                None => Ok(0),
                Some(key) => Pg::execute(tx, &s_lock, &[&dealer, &key.request_id]).await,
            }
        },
        async {
            match req.key {
                None => Ok(None),
                Some(key) => Pg::query_opt(tx, &s_lookup, &[&actor.dealer, &key.request_id]).await,
            }
        },
        async {
            if !req.user_row {
                return Ok(None);
            }
            Pg::query_opt(tx, &s_user, &[&site, &req.user]).await
        },
        async {
            if !req.codes {
                return Ok(Vec::new());
            }
            Pg::query(tx, &s_codes, &[&site, &req.user]).await
        },
        // join_all polls in order, so these are sent in order, after the rest.
        futures_util::future::join_all(
            req.extra
                .iter()
                .zip(&s_extra)
                .map(|((_, params), statement)| Pg::query(tx, statement, params)),
        ),
    );
    // In the order sent: after a failed statement the rest only say "aborted".
    let site_row = site_row?.ok_or_else(|| not_found_site(site))?;
    let device_rows = devices?;
    let partitions = device_rows
        .first()
        .map(|r| r.get::<_, Vec<i16>>("parts"))
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| u8::try_from(p).ok())
        .collect();
    // Without devices, the one row holds the partitions only.
    let devices = device_rows
        .iter()
        .filter(|r| r.get::<_, Option<Uuid>>(1).is_some())
        .map(device_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let users = user_facts(&user_rows?);
    actor_precheck_in_txn(tx, actor, site, &partitions, &users).await?;
    let clashes = clashes?.iter().map(|r| r.get(0)).collect();
    let current = current?.map(|row| Current {
        credential: credential_from_row(&row),
        sealed: row.get(18),
        key_id: row.get(19),
    });
    lock?;
    let replayed = match req.key {
        Some(key) => replay_decide(key, lookup?)?,
        None => None,
    };
    let user_row = user_row?.as_ref().map(user_from_row);
    let codes = codes?.iter().map(credential_from_row).collect();
    let extra = extra.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(Loaded {
        site: site_from_row(&site_row),
        devices,
        partitions,
        users,
        clashes,
        current,
        replayed,
        user_row,
        codes,
        extra,
    })
}

/// A credential write as one statement: the write's own changes (`$before`, CTEs
/// ending with a comma, parameters from `$22`), then frees, re-keys and allocates the
/// credential's slots as planned, advances the site's revision when anything changed
/// (or always, with `$11`) and logs the changed slots under it, and appends the
/// write's audit record at the audit position the same update of the site row takes
/// (`$12`..`$21`: dealer, actor, action, resource, peer, detail, acting user, request
/// id, before, after). Per-statement overhead was most of a write's cost in
/// PostgreSQL, so a write sends one statement, not one per table. A new slot is the
/// lowest assignable one not held by a credential or a local code, found by one
/// ordered pass over the device's taken slots (see `allocate_sql!`); the site row
/// lock serializes allocation. Ends with `$select`.
///
/// Every CTE sees the statement's snapshot, not the others' rows: nothing here reads
/// what another CTE writes except through RETURNING, and the foreign keys are checked
/// at the end of the statement. Deleting the credential itself stays a statement of
/// its own, after this one: the removal trigger of `slot_assignment` (migration 0013)
/// reads the credential when the statement ends.
macro_rules! credential_write_sql {
    ($before:expr, $select:expr) => {
        concat!(
            "WITH ",
            $before,
            " freed AS (
        DELETE FROM slot_assignment WHERE site_id = $1 AND credential_id = $2 AND device_id = ANY($3::uuid[])
        RETURNING device_id, slot
     ), rekeyed AS (
        UPDATE slot_assignment SET pin_hash = $4
         WHERE site_id = $1 AND credential_id = $2 AND device_id = ANY($5::uuid[])
        RETURNING device_id, slot
     ), allocated AS (",
            allocate_sql!("$4", "$6", "$7", "$8", "$9", "$10"),
            "
     ), changed AS (
        SELECT * FROM freed UNION ALL SELECT * FROM rekeyed UNION ALL SELECT * FROM allocated
     ), head AS (
        UPDATE site SET revision = revision + CASE WHEN $11 OR EXISTS (SELECT 1 FROM changed) THEN 1 ELSE 0 END,
            audit_seq = audit_seq + 1
         WHERE id = $1
        RETURNING revision, audit_seq
     ), logged AS (
        INSERT INTO site_change (site_id, revision, device_id, slot)
        SELECT $1, head.revision, changed.device_id, changed.slot FROM head, changed
        ON CONFLICT DO NOTHING
     ), audited AS (
        INSERT INTO audit_log (dealer_id, site_id, actor, action, resource, peer, detail, acting_user,
            request_id, before, after, position)
        SELECT $12, $1, $13, $14, $15, $16, $17, $18, $19, $20, $21, head.audit_seq FROM head
     ) ",
            $select
        )
    };
}

/// [`credential_write_sql!`] with no change of the credential row: a delete's first
/// statement.
const SLOTS_WRITE_SQL: &str = credential_write_sql!("", "SELECT 1");

/// CreateCredential's write: the credential row (`$22` user, `$23` name, `$24` sealed
/// PIN, `$25` sealing key id, `$26` created partition, `$27`/`$28` valid from/until,
/// `$29` max uses; the PIN hash is `$4`), its partitions (`$30`) and devices (`$31`),
/// its request id (`$32`..`$34`: request id, method, fingerprint; NULL: none), then
/// its slots and audit record. Returns the row ([`credential_row_returning!`]), then
/// the devices and the slot numbers allocated; fails (KP002, [`slot_refused`]) when
/// a planned device got no slot, so that the COMMIT sent behind it rolls back.
const CREATE_WRITE_SQL: &str = credential_write_sql!(
    concat!(
        "cred AS (
        INSERT INTO credential (site_id, id, user_id, display_name, pin_sealed, pin_key_id, pin_hash,
            created_partition, valid_from, valid_until, max_uses)
        VALUES ($1, $2, $22, $23, $24, $25, $4, $26, $27, $28, $29)
        RETURNING ",
        credential_row_returning!(),
        "
     ), parts AS (
        INSERT INTO credential_partition (site_id, credential_id, partition)
        SELECT $1, $2, unnest($30::smallint[])
     ), devs AS (
        INSERT INTO credential_device (site_id, credential_id, device_id)
        SELECT $1, $2, unnest($31::uuid[])
     ), remembered AS (
        INSERT INTO idempotency_key (dealer_id, request_id, method, fingerprint, resource_name)
        SELECT $12, $32, $33, $34, $15 WHERE $32::text IS NOT NULL
     ),"
    ),
    "SELECT cred.*, ARRAY(SELECT device_id FROM allocated), ARRAY(SELECT slot FROM allocated) FROM cred
      WHERE keyplane_slots_given($6::uuid[], ARRAY(SELECT device_id FROM allocated))"
);

/// UpdateCredential's write: the credential row (`$22` new name or NULL, `$23` new
/// sealed PIN or NULL, `$24` sealing key id; the PIN hash is `$4`) and, with `$25` (a
/// new scope), its partitions (`$26`) and devices (`$27`): those that left are
/// deleted, the new ones inserted; then its slots and audit record. Returns what
/// [`CREATE_WRITE_SQL`] does.
const UPDATE_WRITE_SQL: &str = credential_write_sql!(
    concat!(
        "cred AS (
        UPDATE credential SET display_name = COALESCE($22, display_name),
            pin_sealed = COALESCE($23, pin_sealed), pin_key_id = $24, pin_hash = $4,
            version = version + 1, update_time = now()
         WHERE site_id = $1 AND id = $2
        RETURNING ",
        credential_row_returning!(),
        "
     ), parts_left AS (
        DELETE FROM credential_partition
         WHERE $25 AND site_id = $1 AND credential_id = $2 AND partition <> ALL($26::smallint[])
     ), parts AS (
        INSERT INTO credential_partition (site_id, credential_id, partition)
        SELECT $1, $2, unnest($26::smallint[]) WHERE $25
        ON CONFLICT DO NOTHING
     ), devs_left AS (
        DELETE FROM credential_device
         WHERE $25 AND site_id = $1 AND credential_id = $2 AND device_id <> ALL($27::uuid[])
     ), devs AS (
        INSERT INTO credential_device (site_id, credential_id, device_id)
        SELECT $1, $2, unnest($27::uuid[]) WHERE $25
        ON CONFLICT DO NOTHING
     ),"
    ),
    "SELECT cred.*, ARRAY(SELECT device_id FROM allocated), ARRAY(SELECT slot FROM allocated) FROM cred
      WHERE keyplane_slots_given($6::uuid[], ARRAY(SELECT device_id FROM allocated))"
);

/// The slot parameters of [`credential_write_sql!`] for a plan.
struct SlotsWrite {
    freed: Vec<Uuid>,
    rekeyed: Vec<Uuid>,
    allocate: Vec<Uuid>,
    first: Vec<i32>,
    last: Vec<i32>,
    reserved_devices: Vec<Uuid>,
    reserved_slots: Vec<i32>,
}

impl SlotsWrite {
    fn new(plan: &SlotPlan, devices: &[Device]) -> SlotsWrite {
        let mut w = SlotsWrite {
            freed: plan.freed.iter().map(|(d, _)| *d).collect(),
            rekeyed: plan.rekeyed.iter().map(|(d, _)| *d).collect(),
            allocate: Vec::new(),
            first: Vec::new(),
            last: Vec::new(),
            reserved_devices: Vec::new(),
            reserved_slots: Vec::new(),
        };
        for id in &plan.allocate {
            let Some(device) = devices.iter().find(|d| d.id == *id) else {
                continue;
            };
            w.allocate.push(*id);
            // Issue 11: the slot range the device reported, if any, over its profile's.
            let c = device.constraints();
            w.first.push(i32::from(c.first_slot));
            w.last.push(i32::from(c.last_slot));
            for s in &c.reserved_slots {
                w.reserved_devices.push(*id);
                w.reserved_slots.push(i32::from(*s));
            }
        }
        w
    }

    /// The parameters of [`credential_write_sql!`] before the write's own (`$1`..`$21`):
    /// the plan's slots for credential `credential` with PIN hash `pin_hash`, `force`,
    /// and the audit record's (its site is `$1`).
    fn params<'a>(
        &'a self,
        site: &'a Uuid,
        credential: &'a Uuid,
        pin_hash: &'a Vec<u8>,
        force: &'a bool,
        audit: &'a AuditParams,
    ) -> Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)> {
        let mut p = params![
            site,
            credential,
            &self.freed,
            pin_hash,
            &self.rekeyed,
            &self.allocate,
            &self.first,
            &self.last,
            &self.reserved_devices,
            &self.reserved_slots,
            force,
        ];
        p.extend(audit.params_without_site());
        p
    }
}

/// Runs a create's or an update's write statement ([`CREATE_WRITE_SQL`],
/// [`UPDATE_WRITE_SQL`]) with COMMIT behind it: the credential row it returned and
/// the slots it gave (the devices after the row's twelve columns of
/// [`credential_row_returning!`], their slot numbers after them). A planned device
/// without a free slot fails the write, so nothing is kept.
async fn credential_write_committed(
    tx: &Transaction<'_>,
    write: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    devices: &[Device],
) -> Result<(Row, Vec<(Uuid, u16)>), StoreError> {
    let row = tx
        .last_then_commit(async {
            Pg::query_one(tx, write, params)
                .await
                .map_err(|e| slot_refused(e, devices))
        })
        .await?;
    let got: Vec<Uuid> = row.get(12);
    let numbers: Vec<i32> = row.get(13);
    let given = got
        .into_iter()
        .zip(numbers)
        .map(|(d, n)| (d, u16::try_from(n).unwrap_or(0)))
        .collect();
    Ok((row, given))
}

/// A write's error, worded for the dealer when the write refused itself because a
/// planned device had no free slot (`keyplane_slots_given`, migration 0028).
fn slot_refused(e: tokio_postgres::Error, devices: &[Device]) -> StoreError {
    let full = e
        .as_db_error()
        .filter(|d| d.code().code() == "KP002")
        .and_then(|d| d.detail()?.parse::<Uuid>().ok())
        .and_then(|id| devices.iter().find(|d| d.id == id));
    match full {
        Some(device) => StoreError::ResourceExhausted(format!(
            "device {} has no free slot: slots_free: all {} assignable slots are in use",
            label(device),
            device.constraints().capacity(&Default::default()).total,
        )),
        None => e.into(),
    }
}

pub(crate) fn partitions_param(scope: &Scope) -> Vec<i16> {
    dedup(&scope.panel_partitions)
        .into_iter()
        .map(i16::from)
        .collect()
}

pub(crate) fn devices_param(scope: &Scope) -> Vec<Uuid> {
    dedup(&[scope.locks.as_slice(), &scope.doors].concat())
}

/// A credential as the audit log records it before or after a change: never the
/// PIN (whether it changed is in the record's detail), nor slot numbers (the
/// allocator's, counted in the detail).
pub(crate) fn credential_audit_json(
    display_name: &str,
    scope: &Scope,
    valid_from: Option<chrono::DateTime<chrono::Utc>>,
    valid_until: Option<chrono::DateTime<chrono::Utc>>,
    max_uses: Option<i32>,
) -> serde_json::Value {
    serde_json::json!({
        "display_name": display_name,
        "panel_partitions": scope.panel_partitions,
        "locks": scope.locks,
        "doors": scope.doors,
        "valid_from": valid_from,
        "valid_until": valid_until,
        "max_uses": max_uses,
    })
}

/// [`credential_audit_json`] of a stored credential.
pub(crate) fn stored_credential_audit_json(c: &Credential) -> serde_json::Value {
    credential_audit_json(
        &c.display_name,
        &c.scope,
        c.valid_from,
        c.valid_until,
        c.max_uses,
    )
}

impl Store {
    /// Creates a credential: checks its PIN against every scoped device, gives it a slot
    /// on each, and records the change for the site's agent. One round trip loads what
    /// the rules need, one writes the result.
    pub async fn credential_create(
        &self,
        actor: &Actor,
        site: Uuid,
        user: Uuid,
        new: &NewCredential,
        key: Option<&RequestKey>,
    ) -> Result<Credential, StoreError> {
        let pin_hash = self.site_pin_hash(site, &new.pin)?;
        in_txn!(self, "credential_create", |tx| {
            let loaded = load_in_txn(
                &tx,
                actor,
                site,
                LoadRequest {
                    user,
                    pin_hash: Some(&pin_hash),
                    devices: devices_param(&new.scope),
                    panels: !new.scope.panel_partitions.is_empty(),
                    credential: None,
                    key,
                    generic_plans: true,
                    ..LoadRequest::default()
                },
            )
            .await?;
            let target = loaded.user_for(site, user, new.system_owner)?;
            if let Some(name) = &loaded.replayed {
                return credential_get_in_txn(&tx, site, user, replayed_id(name)?).await;
            }
            let targets = loaded.targets(site, &new.scope)?;
            let (who, acting) = actor_from_loaded(actor, site, &loaded.partitions, &loaded.users)?;
            new_scope_check(site, user, &target.authorities, &new.scope)?;
            let involved = involved_partitions_core(&[&new.scope], &targets);
            let is_self = acting.is_some_and(|a| a.id == user);
            who.check_code_change(&target.authorities, &involved, is_self)
                .map_err(denied)?;
            loaded.pin_check(&targets, &new.pin)?;
            let id = Uuid::new_v4();
            let sealed = self.key().seal(site, id, &new.pin)?;
            let created_partition = who
                .creation_partition(actor.acting_partition, &involved)
                .map_err(denied)?
                .map(i16::from);
            let target_ids: Vec<Uuid> = targets.iter().map(|t| t.id).collect();
            let plan = slot_plan(&[], &target_ids, false);
            let slots = SlotsWrite::new(&plan, &loaded.devices);
            let name = format!("sites/{site}/users/{user}/credentials/{id}");
            let revision = loaded.site.revision + 1;
            let detail = serde_json::json!({ "revision": revision, "slots": plan.allocate.len() });
            let audit = AuditParams::new(actor, Some(site), "credential.create", &name, detail)
                .after(credential_audit_json(
                    &new.display_name,
                    &new.scope,
                    new.valid_from,
                    new.valid_until,
                    new.max_uses,
                ));
            let s_write = tx.prepare_cached(CREATE_WRITE_SQL).await?;
            let force = true;
            let (request_id, method, fingerprint) = match key {
                Some(k) => (
                    Some(k.request_id.as_str()),
                    Some(k.method),
                    Some(k.fingerprint.as_slice()),
                ),
                None => (None, None, None),
            };
            let (key_id, scope_partitions, scope_devices) = (
                self.key().id(),
                partitions_param(&new.scope),
                devices_param(&new.scope),
            );
            let params = [
                slots.params(&site, &id, &pin_hash, &force, &audit),
                params![
                    &user,
                    &new.display_name,
                    &sealed,
                    &key_id,
                    &created_partition,
                    &new.valid_from,
                    &new.valid_until,
                    &new.max_uses,
                    &scope_partitions,
                    &scope_devices,
                    &request_id,
                    &method,
                    &fingerprint,
                ],
            ]
            .concat();
            let (row, allocated) =
                credential_write_committed(&tx, &s_write, &params, &loaded.devices).await?;
            let after = slots_after(&[], &plan, &allocated);
            Ok(credential_written(
                &row,
                &new.scope,
                &after,
                &loaded.devices,
            ))
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

    /// Lists a user's credentials by id: one query for the page, whatever its size.
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
                        "SELECT {CREDENTIAL_FIELDS} FROM credential c WHERE c.site_id = $1 AND c.user_id = $2
                           AND ($3::uuid IS NULL OR c.id > $3) ORDER BY c.id LIMIT $4"
                    ),
                    &[&site, &user, &page.after, &page.limit],
                )
                .await?;
            Ok(rows.iter().map(credential_from_row).collect())
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
        let new_hash = patch
            .pin
            .as_ref()
            .map(|pin| self.site_pin_hash(site, pin))
            .transpose()?;
        // The load adds the devices the credential is scoped to now.
        let devices = patch.scope.as_ref().map(devices_param).unwrap_or_default();
        in_txn!(self, "credential_update", |tx| {
            let loaded = load_in_txn(
                &tx,
                actor,
                site,
                LoadRequest {
                    user,
                    pin_hash: new_hash.as_deref(),
                    devices: devices.clone(),
                    panels: true,
                    credential: Some(credential),
                    key: None,
                    generic_plans: true,
                    ..LoadRequest::default()
                },
            )
            .await?;
            let current = loaded
                .current
                .as_ref()
                .ok_or_else(|| not_found(site, user, credential))?;
            let name = format!("sites/{site}/users/{user}/credentials/{credential}");
            etag_check(
                &format!("credential {name}"),
                etag,
                current.credential.version,
            )?;
            let scope = patch
                .scope
                .clone()
                .unwrap_or_else(|| current.credential.scope.clone());
            let targets = loaded.targets(site, &scope)?;
            let mut touched = loaded.targets(site, &current.credential.scope)?;
            touched.extend(targets.iter().copied());
            let (who, acting) = actor_from_loaded(actor, site, &loaded.partitions, &loaded.users)?;
            let target = loaded.user(site, user)?;
            new_scope_check(site, user, &target.authorities, &scope)?;
            let is_self = acting.as_ref().is_some_and(|a| a.id == user);
            who.check_code_change(
                &target.authorities,
                &involved_partitions_core(&[&current.credential.scope, &scope], &touched),
                is_self,
            )
            .map_err(denied)?;
            let facts = code_facts(&current.credential, &loaded.devices);
            who.check_code_existing(&target.authorities, &facts, actor.acting_partition, is_self)
                .map_err(denied)?;
            let pin = match &patch.pin {
                Some(pin) => pin.clone(),
                None => self
                    .key()
                    .open(site, credential, &current.key_id, &current.sealed)?,
            };
            let pin_hash = match &new_hash {
                Some(h) => h.clone(),
                None => self.site_pin_hash(site, &pin)?,
            };
            loaded.pin_check(&targets, &pin)?;

            let held: Vec<(Uuid, u16)> = current
                .credential
                .slots
                .iter()
                .map(|s| (s.device, s.slot))
                .collect();
            let target_ids: Vec<Uuid> = targets.iter().map(|t| t.id).collect();
            let plan = slot_plan(&held, &target_ids, patch.pin.is_some());
            let slots = SlotsWrite::new(&plan, &loaded.devices);
            let slots_changed = plan.freed.len() + plan.rekeyed.len() + plan.allocate.len();
            let sealed = match &patch.pin {
                Some(pin) => Some(self.key().seal(site, credential, pin)?),
                None => None,
            };
            let detail = serde_json::json!({
                "display_name": patch.display_name.is_some(),
                "pin": patch.pin.is_some(),
                "scope": patch.scope.is_some(),
                "slots_changed": slots_changed,
            });
            let was = &current.credential;
            let audit = AuditParams::new(actor, Some(site), "credential.update", &name, detail)
                .before(stored_credential_audit_json(was))
                .after(credential_audit_json(
                    patch.display_name.as_deref().unwrap_or(&was.display_name),
                    &scope,
                    was.valid_from,
                    was.valid_until,
                    was.max_uses,
                ));
            let s_write = tx.prepare_cached(UPDATE_WRITE_SQL).await?;
            let new_scope = patch.scope.is_some();
            let force = false;
            let (scope_partitions, scope_devices) =
                (partitions_param(&scope), devices_param(&scope));
            let key_id = self.key().id();
            let params = [
                slots.params(&site, &credential, &pin_hash, &force, &audit),
                params![
                    &patch.display_name,
                    &sealed,
                    &key_id,
                    &new_scope,
                    &scope_partitions,
                    &scope_devices,
                ],
            ]
            .concat();
            let (row, allocated) =
                credential_write_committed(&tx, &s_write, &params, &loaded.devices).await?;
            let after = slots_after(&held, &plan, &allocated);
            Ok(credential_written(&row, &scope, &after, &loaded.devices))
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
            let loaded = load_in_txn(
                &tx,
                actor,
                site,
                LoadRequest {
                    user,
                    pin_hash: None,
                    devices: Vec::new(),
                    panels: false,
                    credential: Some(credential),
                    key: None,
                    generic_plans: true,
                    skip_clashes: true,
                    ..LoadRequest::default()
                },
            )
            .await?;
            let current = loaded
                .current
                .as_ref()
                .ok_or_else(|| not_found(site, user, credential))?;
            let name = format!("sites/{site}/users/{user}/credentials/{credential}");
            etag_check(
                &format!("credential {name}"),
                etag,
                current.credential.version,
            )?;
            let (who, acting) = actor_from_loaded(actor, site, &loaded.partitions, &loaded.users)?;
            let target = loaded.user(site, user)?;
            let is_self = acting.is_some_and(|a| a.id == user);
            let facts = code_facts(&current.credential, &loaded.devices);
            who.check_code_existing(&target.authorities, &facts, actor.acting_partition, is_self)
                .map_err(denied)?;
            let held: Vec<(Uuid, u16)> = current
                .credential
                .slots
                .iter()
                .map(|s| (s.device, s.slot))
                .collect();
            let plan = slot_plan(&held, &[], false);
            let slots = SlotsWrite::new(&plan, &loaded.devices);
            let detail = serde_json::json!({ "slots_freed": plan.freed.len() });
            let was = &current.credential;
            let audit = AuditParams::new(actor, Some(site), "credential.delete", &name, detail)
                .before(stored_credential_audit_json(was));
            let (s_slots, s_delete) = tokio::try_join!(
                tx.prepare_cached(SLOTS_WRITE_SQL),
                tx.prepare_cached("DELETE FROM credential WHERE site_id = $1 AND id = $2"),
            )?;
            let no_hash: Vec<u8> = Vec::new();
            let force = false;
            let slot_params = slots.params(&site, &credential, &no_hash, &force, &audit);
            let delete_params = params![&site, &credential];
            // Two statements: the removal trigger reads the credential when the first ends.
            tx.last_then_commit(async {
                let (freed, deleted) = tokio::join!(
                    biased;
                    Pg::query_one(&tx, &s_slots, &slot_params),
                    Pg::execute(&tx, &s_delete, &delete_params),
                );
                freed?;
                deleted.map_err(StoreError::from)
            })
            .await?;
            Ok(())
        })
    }
}

/// The user must hold a level in every panel partition the code is scoped to.
pub(crate) fn new_scope_check(
    site: Uuid,
    user: Uuid,
    authorities: &keyplane_core::authority::Authorities,
    scope: &Scope,
) -> Result<(), StoreError> {
    for p in &scope.panel_partitions {
        if !authorities.contains_key(p) {
            return Err(StoreError::FailedPrecondition(format!(
                "user sites/{site}/users/{user} has no authority level in partition {p}; grant one before giving them a panel code there"
            )));
        }
    }
    Ok(())
}
