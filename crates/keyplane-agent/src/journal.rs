//! The agent's local journal: the desired table received from keyplaned, what the
//! agent has written to each device, and the site revision it holds. Kept in a redb
//! database (`journal.redb`): every save is one small transaction holding only the
//! rows that changed since the last one (a slot written is one row), so a restarted
//! agent knows exactly what is already on the devices and never writes it again,
//! without the whole journal being rewritten after each write. A JSON journal from
//! an older agent is migrated on first start and then removed.
//!
//! Every slot row (desired, written and observed codes) is sealed at rest under the
//! journal key ([`crate::seal`]) with its place (device, table, slot) as associated
//! data: a row moved to another place, or opened under another key, does not open.
//! The site-wide row and device headers (revisions, model, flags) hold no code and
//! stay clear. A journal of clear rows (an older agent's) is rewritten sealed into a
//! new file on first start, so no clear page of it survives in `journal.redb`. The
//! file is also private to the agent's user (mode 0600).

use crate::seal::{JournalKey, SealError};
use chrono::{DateTime, Utc};
use keyplane_core::authority::Level;
use keyplane_core::event_log::EventMark;
use keyplane_core::plan::DesiredCode;
use keyplane_core::schedule::Schedule;
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One slot's code as journaled.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Code {
    /// Credential resource name.
    pub credential: String,
    /// The code.
    pub pin: String,
    /// Panels: (partition, level number) of the user number.
    #[serde(default)]
    pub authorities: Vec<(u8, u8)>,
    /// Panels: open/close reporting.
    #[serde(default)]
    pub open_close: bool,
    /// When the code opens: while any of these is open (None: always).
    #[serde(default)]
    pub schedules: Option<Vec<Schedule>>,
    /// Written codes on devices that keep schedules: the zone the schedules were
    /// written in (empty otherwise, and in journals older than this field, which
    /// has their scheduled codes written once more).
    #[serde(default)]
    pub time_zone: String,
    /// Temporary codes: on the device only from this instant.
    #[serde(default)]
    pub valid_from: Option<DateTime<Utc>>,
    /// Temporary codes: on the device only until this instant.
    #[serde(default)]
    pub valid_until: Option<DateTime<Utc>>,
    /// Bumped by keyplaned to have the code written again.
    #[serde(default)]
    pub generation: i64,
}

impl std::fmt::Debug for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Code({}, <redacted>)", self.credential)
    }
}

impl From<&Code> for DesiredCode {
    fn from(c: &Code) -> DesiredCode {
        DesiredCode {
            credential: c.credential.clone(),
            pin: c.pin.clone(),
            authorities: c
                .authorities
                .iter()
                .filter_map(|(p, l)| Some((*p, Level::from_number(i32::from(*l))?)))
                .collect(),
            open_close: c.open_close,
            schedules: c.schedules.clone(),
            time_zone: c.time_zone.clone(),
            generation: c.generation,
        }
    }
}

impl From<DesiredCode> for Code {
    fn from(c: DesiredCode) -> Code {
        Code {
            credential: c.credential,
            pin: c.pin,
            authorities: c
                .authorities
                .iter()
                .map(|(p, l)| (*p, u8::try_from(l.number()).unwrap_or(u8::MAX)))
                .collect(),
            open_close: c.open_close,
            schedules: c.schedules,
            time_zone: c.time_zone,
            valid_from: None,
            valid_until: None,
            generation: c.generation,
        }
    }
}

/// One slot table of a device (slot -> value) that remembers which slots changed
/// since the journal last committed it, so a commit writes only those rows: a pass
/// that writes thousands of slots commits each in O(log n), never diffing the whole
/// table. Read it as the map it derefs to; change it only through its methods.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SlotTable<V> {
    map: BTreeMap<u16, V>,
    /// Slots changed since the last commit; None: any may have (a table built or
    /// replaced whole), so the commit compares it whole once.
    #[serde(skip)]
    changed: Option<BTreeSet<u16>>,
}

impl<V> Default for SlotTable<V> {
    fn default() -> Self {
        SlotTable {
            map: BTreeMap::new(),
            changed: None,
        }
    }
}

impl<V> std::ops::Deref for SlotTable<V> {
    type Target = BTreeMap<u16, V>;
    fn deref(&self) -> &BTreeMap<u16, V> {
        &self.map
    }
}

impl<V> From<BTreeMap<u16, V>> for SlotTable<V> {
    fn from(map: BTreeMap<u16, V>) -> Self {
        SlotTable { map, changed: None }
    }
}

impl<V> FromIterator<(u16, V)> for SlotTable<V> {
    fn from_iter<I: IntoIterator<Item = (u16, V)>>(iter: I) -> Self {
        SlotTable::from(iter.into_iter().collect::<BTreeMap<u16, V>>())
    }
}

impl<V: PartialEq> PartialEq for SlotTable<V> {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl<V: std::fmt::Debug> std::fmt::Debug for SlotTable<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.map.fmt(f)
    }
}

impl<V> SlotTable<V> {
    fn touch(&mut self, slot: u16) {
        if let Some(changed) = self.changed.as_mut() {
            changed.insert(slot);
        }
    }

    /// Sets `slot`; the previous value, if any.
    pub fn insert(&mut self, slot: u16, value: V) -> Option<V> {
        self.touch(slot);
        self.map.insert(slot, value)
    }

    /// Empties `slot`; the value it had, if any.
    pub fn remove(&mut self, slot: &u16) -> Option<V> {
        self.touch(*slot);
        self.map.remove(slot)
    }

    /// Empties every slot.
    pub fn clear(&mut self) {
        self.map.clear();
        self.changed = None;
    }

    /// The table as a plain map.
    pub fn into_map(self) -> BTreeMap<u16, V> {
        self.map
    }

    /// Committed: nothing changed since.
    fn committed(&mut self) {
        self.changed = Some(BTreeSet::new());
    }
}

/// What the journal knows about one device.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct DeviceJournal {
    /// Model profile id.
    pub model: String,
    /// Whether keyplaned still lists the device.
    pub present: bool,
    /// What keyplaned wants in each slot.
    pub desired: SlotTable<Code>,
    /// What this agent wrote to each slot (and has not cleared).
    pub written: SlotTable<Code>,
    /// Site revision last acked for this device.
    pub acked: i64,
    /// Highest event sequence number keyplaned has stored for this device.
    #[serde(default)]
    pub events_acked: u64,
    /// The epoch naming the device log being read (None: not named yet). See
    /// `keyplane_core::event_log`.
    #[serde(default)]
    pub events_epoch: Option<u64>,
    /// The last event read from the device's log: the next read starts there, to
    /// notice a log that restarted.
    #[serde(default)]
    pub events_anchor: Option<EventMark>,
    /// Doors: whether the device was put in lockdown.
    #[serde(default)]
    pub lockdown_applied: bool,
    /// What the device held when last read (slot -> code, None when masked).
    #[serde(default)]
    pub observed: Option<SlotTable<Option<String>>>,
    /// The device's code checksum when `observed` was read (devices that offer one).
    #[serde(default)]
    pub observed_checksum: Option<u64>,
    /// Slots keyplaned asked to clear although keyplane did not write them.
    #[serde(default)]
    pub remove_local: std::collections::BTreeSet<u16>,
    /// Slots whose desired code this agent could not read, and why: kept off the
    /// device, and the device is not acked while any remain.
    #[serde(default)]
    pub refused: BTreeMap<u16, String>,
}

impl std::fmt::Debug for DeviceJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Observed codes are PINs: only which slots hold something is shown.
        f.debug_struct("DeviceJournal")
            .field("model", &self.model)
            .field("present", &self.present)
            .field("desired", &self.desired)
            .field("written", &self.written)
            .field("acked", &self.acked)
            .field("events_acked", &self.events_acked)
            .field("events_epoch", &self.events_epoch)
            .field("events_anchor", &self.events_anchor)
            .field("lockdown_applied", &self.lockdown_applied)
            .field(
                "observed_slots",
                &self.observed.as_ref().map(|o| o.keys().collect::<Vec<_>>()),
            )
            .field("remove_local", &self.remove_local)
            .field("refused", &self.refused)
            .finish()
    }
}

/// The whole journal.
#[derive(Default, Serialize, Deserialize)]
pub struct Journal {
    /// Site revision whose desired table this journal holds.
    pub revision: i64,
    /// The site's IANA time zone, for schedules.
    #[serde(default)]
    pub time_zone: String,
    /// Doors locked down.
    #[serde(default)]
    pub lockdown: bool,
    /// Per device resource name.
    pub devices: BTreeMap<String, DeviceJournal>,
    #[serde(skip)]
    path: PathBuf,
    #[serde(skip)]
    store: Option<Store>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("revision", &self.revision)
            .field("time_zone", &self.time_zone)
            .field("lockdown", &self.lockdown)
            .field("devices", &self.devices)
            .finish()
    }
}

/// Rows: `meta` holds the site-wide fields; `devices` one header per device (its
/// fields but the slot tables); `slots` one row per (device, table, slot).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
const SLOTS: TableDefinition<(&str, u8, u16), &[u8]> = TableDefinition::new("slots");
const DESIRED: u8 = 0;
const WRITTEN: u8 = 1;
const OBSERVED: u8 = 2;
/// A sealed slot row starts with this byte (a clear one is JSON).
const SEALED: u8 = 1;

/// The associated data a slot row is sealed with: its place.
fn place(device: &str, kind: u8, slot: u16) -> Vec<u8> {
    let mut aad = Vec::with_capacity(device.len() + 16);
    aad.extend_from_slice(b"keyplane journal slot v1\0");
    aad.extend_from_slice(&(device.len() as u64).to_le_bytes());
    aad.extend_from_slice(device.as_bytes());
    aad.push(kind);
    aad.extend_from_slice(&slot.to_le_bytes());
    aad
}

/// The open database and what it holds now, to write only what changed.
struct Store {
    db: redb::Database,
    key: JournalKey,
    meta: Vec<u8>,
    devices: BTreeMap<String, SavedDevice>,
}

/// A device as last committed.
#[derive(Default)]
struct SavedDevice {
    header: Vec<u8>,
    desired: BTreeMap<u16, Code>,
    written: BTreeMap<u16, Code>,
    observed: BTreeMap<u16, Option<String>>,
}

/// Site-wide fields, as one row.
#[derive(Serialize, Deserialize)]
struct Meta {
    revision: i64,
    time_zone: String,
    lockdown: bool,
}

/// A device's own fields (its slot tables are rows of their own).
#[derive(Serialize, Deserialize)]
struct Header {
    model: String,
    present: bool,
    acked: i64,
    events_acked: u64,
    #[serde(default)]
    events_epoch: Option<u64>,
    #[serde(default)]
    events_anchor: Option<EventMark>,
    lockdown_applied: bool,
    observed_known: bool,
    observed_checksum: Option<u64>,
    remove_local: std::collections::BTreeSet<u16>,
    refused: BTreeMap<u16, String>,
}

impl Header {
    fn of(d: &DeviceJournal) -> Header {
        Header {
            model: d.model.clone(),
            present: d.present,
            acked: d.acked,
            events_acked: d.events_acked,
            events_epoch: d.events_epoch,
            events_anchor: d.events_anchor,
            lockdown_applied: d.lockdown_applied,
            observed_known: d.observed.is_some(),
            observed_checksum: d.observed_checksum,
            remove_local: d.remove_local.clone(),
            refused: d.refused.clone(),
        }
    }
}

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// File system error.
    #[error("journal {path}: {source}")]
    Io {
        /// The journal path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a journal.
    #[error("journal {path} is corrupt: {detail}")]
    Corrupt {
        /// The journal path.
        path: PathBuf,
        /// What failed to parse (serde's message; it names positions, not values).
        detail: String,
    },
    /// The embedded database failed (its messages name pages and tables, never values).
    #[error("journal {path}: {detail}")]
    Store {
        /// The journal path.
        path: PathBuf,
        /// redb's message.
        detail: String,
    },
    /// No key to seal it with (the message says what to pass).
    #[error("journal: {0}")]
    Key(#[from] SealError),
    /// The journal was sealed under another key than the agent has.
    #[error(
        "journal {path} is sealed under key {sealed_with} but the agent has key {have} (another --journal-key-file, or an identity that replaced the key's source): start it with the key it was sealed under, or remove journal.redb to start with an empty journal (keyplaned sends every code again)"
    )]
    OtherKey {
        /// The journal path.
        path: PathBuf,
        /// The id recorded in the journal.
        sealed_with: String,
        /// The id of the key the agent has.
        have: String,
    },
    /// A sealed row did not open: altered, or moved from another place.
    #[error(
        "journal {path}: the sealed row of {device} slot {slot} does not open (altered or moved)"
    )]
    Unsealable {
        /// The journal path.
        path: PathBuf,
        /// The device of the row.
        device: String,
        /// Its slot.
        slot: u16,
    },
}

fn to_json<T: Serialize>(path: &Path, value: &T) -> Result<Vec<u8>, JournalError> {
    serde_json::to_vec(value).map_err(|e| JournalError::Corrupt {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

fn from_json<T: serde::de::DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, JournalError> {
    serde_json::from_slice(bytes).map_err(|e| JournalError::Corrupt {
        path: path.to_owned(),
        detail: format!("line {} column {}", e.line(), e.column()),
    })
}

/// Creates `path` private (mode 0600) before redb writes anything into it.
fn create_private(path: &Path) -> Result<(), JournalError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|source| JournalError::Io {
            path: path.to_owned(),
            source,
        })?;
    Ok(())
}

impl Journal {
    /// Opens the journal in `dir`, or starts an empty one (migrating a JSON journal
    /// left by an older agent), with the key found in `dir` alone
    /// ([`JournalKey::in_state_dir`]: the enrolled agent's, else the development key).
    /// The agent itself resolves its key strictly and calls [`Journal::open_with_key`].
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        std::fs::create_dir_all(dir).map_err(|source| JournalError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let key = JournalKey::in_state_dir(dir)?;
        Journal::open_with_key(dir, key)
    }

    /// Opens the journal in `dir` sealed under `key`, or starts an empty one. A JSON
    /// journal or a journal of clear rows left by an older agent is rewritten sealed.
    pub fn open_with_key(dir: &Path, key: JournalKey) -> Result<Journal, JournalError> {
        std::fs::create_dir_all(dir).map_err(|source| JournalError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join("journal.redb");
        let legacy = dir.join("journal.json");
        let store_err = |e: &dyn std::fmt::Display| JournalError::Store {
            path: path.clone(),
            detail: e.to_string(),
        };
        // A journal file is only ever created whole, under another name that then
        // replaces it (below): creating it in place, an agent killed while redb
        // wrote its header left a file no later start could open.
        let db = if path.exists() {
            create_private(&path)?;
            Some(redb::Database::create(&path).map_err(|e| store_err(&e))?)
        } else {
            None
        };
        let loaded = match &db {
            Some(db) => load(&path, db, &key)?,
            None => None,
        };
        // No site row: nothing was ever committed here (a first start, or one
        // that died before its first commit), so a JSON journal still rules.
        let (mut journal, rewrite) = match loaded {
            Some((j, clear)) => (j, clear),
            None => match std::fs::read(&legacy) {
                Ok(bytes) => {
                    let mut j = from_json::<Journal>(&legacy, &bytes)?;
                    for d in j.devices.values_mut() {
                        // Acked before epochs existed: under epoch 0.
                        if d.events_epoch.is_none() && d.events_acked > 0 {
                            d.events_epoch = Some(0);
                        }
                    }
                    (j, true)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Journal::default(), true),
                Err(source) => {
                    return Err(JournalError::Io {
                        path: legacy,
                        source,
                    });
                }
            },
        };
        if rewrite {
            // Written whole into a new file that then replaces the old one: clear
            // rows updated in place would leave their old pages (codes in clear) in
            // the file.
            drop(db);
            let fresh = dir.join("journal.redb.new");
            let _ = std::fs::remove_file(&fresh);
            create_private(&fresh)?;
            let db = redb::Database::create(&fresh).map_err(|e| JournalError::Store {
                path: fresh.clone(),
                detail: e.to_string(),
            })?;
            journal.path = fresh.clone();
            journal.store = Some(Store {
                db,
                key,
                meta: Vec::new(),
                devices: BTreeMap::new(),
            });
            journal.save()?;
            std::fs::rename(&fresh, &path).map_err(|source| JournalError::Io {
                path: path.clone(),
                source,
            })?;
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            journal.path = path;
            match std::fs::remove_file(&legacy) {
                Ok(()) => tracing::info!("JSON journal migrated to a sealed journal.redb"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(JournalError::Io {
                        path: legacy,
                        source,
                    });
                }
            }
            return Ok(journal);
        }
        journal.path = path;
        let meta = to_json(&journal.path, &journal.meta())?;
        let mut devices = BTreeMap::new();
        for (name, d) in &journal.devices {
            devices.insert(
                name.clone(),
                SavedDevice {
                    header: to_json(&journal.path, &Header::of(d))?,
                    desired: d.desired.map.clone(),
                    written: d.written.map.clone(),
                    observed: d.observed.as_deref().cloned().unwrap_or_default(),
                },
            );
        }
        journal.committed();
        let db = db.ok_or_else(|| JournalError::Store {
            path: journal.path.clone(),
            detail: "a journal read without its file".to_owned(),
        })?;
        journal.store = Some(Store {
            db,
            key,
            meta,
            devices,
        });
        Ok(journal)
    }

    /// The id of the key the journal is sealed under (never secret).
    pub fn key_id(&self) -> Option<&str> {
        self.store.as_ref().map(|s| s.key.id())
    }

    fn meta(&self) -> Meta {
        Meta {
            revision: self.revision,
            time_zone: self.time_zone.clone(),
            lockdown: self.lockdown,
        }
    }

    /// Commits what changed since the last save, in one transaction.
    pub fn save(&mut self) -> Result<(), JournalError> {
        let path = self.path.clone();
        let meta = to_json(&path, &self.meta())?;
        let Some(store) = self.store.as_mut() else {
            return Ok(());
        };
        let Store {
            db,
            key,
            meta: saved_meta,
            devices: saved_devices,
        } = store;
        let store_err = |e: &dyn std::fmt::Display| JournalError::Store {
            path: path.clone(),
            detail: e.to_string(),
        };
        let sealed =
            |name: &str, kind: u8, slot: u16, json: &[u8]| -> Result<Vec<u8>, JournalError> {
                let mut row = vec![SEALED];
                row.extend(key.seal(&place(name, kind, slot), json)?);
                Ok(row)
            };
        let txn = db.begin_write().map_err(|e| store_err(&e))?;
        let mut changed = false;
        {
            let mut meta_t = txn.open_table(META).map_err(|e| store_err(&e))?;
            let mut dev_t = txn.open_table(DEVICES).map_err(|e| store_err(&e))?;
            let mut slot_t = txn.open_table(SLOTS).map_err(|e| store_err(&e))?;
            if *saved_meta != meta {
                meta_t
                    .insert("site", meta.as_slice())
                    .map_err(|e| store_err(&e))?;
                meta_t
                    .insert("key", key.id().as_bytes())
                    .map_err(|e| store_err(&e))?;
                *saved_meta = meta;
                changed = true;
            }
            let gone: Vec<String> = saved_devices
                .keys()
                .filter(|n| !self.devices.contains_key(*n))
                .cloned()
                .collect();
            for name in gone {
                if let Some(saved) = saved_devices.remove(&name) {
                    dev_t.remove(name.as_str()).map_err(|e| store_err(&e))?;
                    for (kind, slots) in [
                        (DESIRED, saved.desired.keys().copied().collect::<Vec<_>>()),
                        (WRITTEN, saved.written.keys().copied().collect()),
                        (OBSERVED, saved.observed.keys().copied().collect()),
                    ] {
                        for slot in slots {
                            slot_t
                                .remove((name.as_str(), kind, slot))
                                .map_err(|e| store_err(&e))?;
                        }
                    }
                    changed = true;
                }
            }
            for (name, d) in &self.devices {
                let saved = saved_devices.entry(name.clone()).or_default();
                let header = to_json(&path, &Header::of(d))?;
                if saved.header != header {
                    dev_t
                        .insert(name.as_str(), header.as_slice())
                        .map_err(|e| store_err(&e))?;
                    saved.header = header;
                    changed = true;
                }
                let empty = SlotTable::default();
                let observed = d.observed.as_ref().unwrap_or(&empty);
                let mut rows = TableRows {
                    slots: &mut slot_t,
                    device: name,
                    seal: &sealed,
                    path: &path,
                };
                changed |= rows.commit(DESIRED, &d.desired, &mut saved.desired)?;
                changed |= rows.commit(WRITTEN, &d.written, &mut saved.written)?;
                changed |= rows.commit(OBSERVED, observed, &mut saved.observed)?;
            }
        }
        if changed {
            txn.commit().map_err(|e| store_err(&e))?;
        } else {
            txn.abort().map_err(|e| store_err(&e))?;
        }
        self.committed();
        Ok(())
    }

    /// Every slot table as committed: the next save starts from no change.
    fn committed(&mut self) {
        for d in self.devices.values_mut() {
            d.desired.committed();
            d.written.committed();
            if let Some(o) = d.observed.as_mut() {
                o.committed();
            }
        }
    }
}

/// Seals a slot row's JSON for its place.
type Seal<'a> = dyn Fn(&str, u8, u16, &[u8]) -> Result<Vec<u8>, JournalError> + 'a;

/// The slot rows of one device inside a write transaction.
struct TableRows<'t, 'a> {
    slots: &'a mut redb::Table<'t, (&'static str, u8, u16), &'static [u8]>,
    device: &'a str,
    seal: &'a Seal<'a>,
    path: &'a Path,
}

impl TableRows<'_, '_> {
    /// Writes the rows of table `kind` that differ from what was committed (`was`,
    /// brought up to date): only the slots changed since, or the whole table when
    /// it was replaced whole. True when a row changed.
    fn commit<V: Serialize + Clone + PartialEq>(
        &mut self,
        kind: u8,
        now: &SlotTable<V>,
        was: &mut BTreeMap<u16, V>,
    ) -> Result<bool, JournalError> {
        let store_err = |e: &dyn std::fmt::Display| JournalError::Store {
            path: self.path.to_owned(),
            detail: e.to_string(),
        };
        let slots: Vec<u16> = match &now.changed {
            Some(changed) => changed.iter().copied().collect(),
            // Equal tables (the common case) cost one comparison, no row.
            None if now.map == *was => return Ok(false),
            None => was
                .keys()
                .chain(now.map.keys())
                .copied()
                .collect::<BTreeSet<u16>>()
                .into_iter()
                .collect(),
        };
        let mut changed = false;
        for slot in slots {
            let key = (self.device, kind, slot);
            match now.map.get(&slot) {
                None => {
                    if was.remove(&slot).is_some() {
                        self.slots.remove(key).map_err(|e| store_err(&e))?;
                        changed = true;
                    }
                }
                Some(value) => {
                    if was.get(&slot) != Some(value) {
                        let bytes =
                            (self.seal)(self.device, kind, slot, &to_json(self.path, value)?)?;
                        self.slots
                            .insert(key, bytes.as_slice())
                            .map_err(|e| store_err(&e))?;
                        was.insert(slot, value.clone());
                        changed = true;
                    }
                }
            }
        }
        Ok(changed)
    }
}

/// Reads a whole journal back from its rows, opening sealed rows under `key`; with
/// whether any row was in clear (an older agent's journal, to be rewritten sealed).
fn load(
    path: &Path,
    db: &redb::Database,
    key: &JournalKey,
) -> Result<Option<(Journal, bool)>, JournalError> {
    let store_err = |e: &dyn std::fmt::Display| JournalError::Store {
        path: path.to_owned(),
        detail: e.to_string(),
    };
    let txn = db.begin_read().map_err(|e| store_err(&e))?;
    let mut journal = Journal::default();
    let missing = |e: &redb::TableError| matches!(e, redb::TableError::TableDoesNotExist(_));
    let mut clear = false;
    match txn.open_table(META) {
        Ok(t) => {
            let Some(v) = t.get("site").map_err(|e| store_err(&e))? else {
                return Ok(None);
            };
            let meta: Meta = from_json(path, v.value())?;
            journal.revision = meta.revision;
            journal.time_zone = meta.time_zone;
            journal.lockdown = meta.lockdown;
            match t.get("key").map_err(|e| store_err(&e))? {
                Some(id) if id.value() != key.id().as_bytes() => {
                    return Err(JournalError::OtherKey {
                        path: path.to_owned(),
                        sealed_with: String::from_utf8_lossy(id.value()).into_owned(),
                        have: key.id().to_owned(),
                    });
                }
                Some(_) => {}
                None => clear = true,
            }
        }
        Err(e) if missing(&e) => return Ok(None),
        Err(e) => return Err(store_err(&e)),
    }
    let dev_t = txn.open_table(DEVICES).map_err(|e| store_err(&e))?;
    for row in dev_t.iter().map_err(|e| store_err(&e))? {
        let (k, v) = row.map_err(|e| store_err(&e))?;
        let h: Header = from_json(path, v.value())?;
        journal.devices.insert(
            k.value().to_owned(),
            DeviceJournal {
                model: h.model,
                present: h.present,
                acked: h.acked,
                events_acked: h.events_acked,
                // Journaled before epochs: what was acked was acked under epoch 0.
                events_epoch: h.events_epoch.or((h.events_acked > 0).then_some(0)),
                events_anchor: h.events_anchor,
                lockdown_applied: h.lockdown_applied,
                observed: h.observed_known.then(SlotTable::default),
                observed_checksum: h.observed_checksum,
                remove_local: h.remove_local,
                refused: h.refused,
                ..DeviceJournal::default()
            },
        );
    }
    let slot_t = txn.open_table(SLOTS).map_err(|e| store_err(&e))?;
    for row in slot_t.iter().map_err(|e| store_err(&e))? {
        let (k, v) = row.map_err(|e| store_err(&e))?;
        let (name, kind, slot) = k.value();
        let Some(d) = journal.devices.get_mut(name) else {
            continue;
        };
        let bytes = v.value();
        let plain;
        let json = match bytes.first() {
            Some(&SEALED) => {
                plain = key
                    .open(&place(name, kind, slot), &bytes[1..])
                    .ok_or_else(|| JournalError::Unsealable {
                        path: path.to_owned(),
                        device: name.to_owned(),
                        slot,
                    })?;
                plain.as_slice()
            }
            _ => {
                clear = true;
                bytes
            }
        };
        match kind {
            DESIRED => {
                d.desired.insert(slot, from_json(path, json)?);
            }
            WRITTEN => {
                d.written.insert(slot, from_json(path, json)?);
            }
            _ => {
                d.observed
                    .get_or_insert_with(SlotTable::default)
                    .insert(slot, from_json(path, json)?);
            }
        }
    }
    Ok(Some((journal, clear)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kp-journal-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn code(pin: &str) -> Code {
        Code {
            credential: "c".into(),
            pin: pin.into(),
            ..Code::default()
        }
    }

    #[test]
    fn survives_reopen_and_hides_pins_in_debug() {
        let dir = temp("reopen");
        let mut j = Journal::open(&dir).expect("open");
        assert_eq!(j.revision, 0);
        j.revision = 7;
        j.time_zone = "Asia/Tokyo".into();
        let d = j.devices.entry("d".into()).or_default();
        d.written.insert(3, code("9930"));
        d.desired.insert(3, code("9930"));
        d.desired.insert(4, code("1111"));
        d.observed = Some(BTreeMap::from([(3, Some("9930".into())), (9, None)]).into());
        j.devices
            .entry("gone".into())
            .or_default()
            .written
            .insert(1, code("2222"));
        j.save().expect("save");
        // Changes after the first commit: a slot cleared, one changed, a device dropped.
        let d = j.devices.get_mut("d").expect("device");
        d.desired.remove(&4);
        d.written.insert(3, code("5555"));
        d.acked = 7;
        j.devices.remove("gone");
        j.save().expect("save again");
        drop(j);
        let again = Journal::open(&dir).expect("reopen");
        assert_eq!(again.revision, 7);
        assert_eq!(again.time_zone, "Asia/Tokyo");
        assert_eq!(again.devices.len(), 1);
        let d = &again.devices["d"];
        assert_eq!(d.written[&3], code("5555"));
        assert_eq!(d.desired.keys().copied().collect::<Vec<_>>(), vec![3]);
        assert_eq!(d.acked, 7);
        assert_eq!(
            d.observed.as_deref(),
            Some(&BTreeMap::from([(3, Some("9930".into())), (9, None)]))
        );
        assert!(!format!("{again:?}").contains("9930"));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join("journal.redb"))
                .expect("meta")
                .permissions(),
        );
        assert_eq!(mode & 0o077, 0, "the journal is private");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_json_journal_is_migrated_once_and_removed() {
        let dir = temp("migrate");
        std::fs::create_dir_all(&dir).expect("dir");
        let mut old = Journal {
            revision: 5,
            ..Journal::default()
        };
        old.devices
            .entry("d".into())
            .or_default()
            .written
            .insert(2, code("4821"));
        std::fs::write(
            dir.join("journal.json"),
            serde_json::to_vec(&old).expect("json"),
        )
        .expect("write");
        let j = Journal::open(&dir).expect("migrate");
        assert_eq!(j.revision, 5);
        assert_eq!(j.devices["d"].written[&2], code("4821"));
        assert!(!dir.join("journal.json").exists());
        drop(j);
        let again = Journal::open(&dir).expect("reopen");
        assert_eq!(again.devices["d"].written[&2], code("4821"));
        let _ = std::fs::remove_dir_all(&dir);

        let dir = temp("corrupt");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("journal.json"), b"{not json").expect("write");
        let err = Journal::open(&dir).expect_err("corrupt");
        assert!(matches!(err, JournalError::Corrupt { .. }), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn file_has(dir: &Path, needle: &str) -> bool {
        let bytes = std::fs::read(dir.join("journal.redb")).expect("read");
        bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
    }

    #[test]
    fn codes_are_sealed_bound_to_their_place_and_key() {
        let dir = temp("sealed");
        let key_file = dir.with_extension("key");
        {
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::remove_file(&key_file);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(&key_file)
                .expect("key file");
            std::io::Write::write_all(&mut f, "7e".repeat(32).as_bytes()).expect("write");
        }
        let key = || JournalKey::from_key_file(&key_file).expect("key");
        let mut j = Journal::open_with_key(&dir, key()).expect("open");
        let d = j.devices.entry("sites/s/devices/d".into()).or_default();
        d.desired.insert(3, code("73194682"));
        d.written.insert(3, code("73194682"));
        d.observed = Some(BTreeMap::from([(5, Some("58203917".into()))]).into());
        j.save().expect("save");
        drop(j);
        assert!(
            !file_has(&dir, "73194682"),
            "a desired/written code in clear"
        );
        assert!(!file_has(&dir, "58203917"), "an observed code in clear");
        assert!(!dir.join(crate::seal::DEV_KEY_FILE).exists());
        let again = Journal::open_with_key(&dir, key()).expect("reopen");
        assert_eq!(
            again.devices["sites/s/devices/d"].written[&3].pin,
            "73194682"
        );
        assert_eq!(again.key_id(), Some(key().id()));
        drop(again);

        // Another key: refused, naming both ids, not read as garbage.
        let other = JournalKey::random().expect("key");
        let err = Journal::open_with_key(&dir, other).expect_err("other key");
        assert!(matches!(err, JournalError::OtherKey { .. }), "{err}");
        assert!(err.to_string().contains(key().id()), "{err}");

        // A sealed row moved to another slot does not open.
        {
            let db = redb::Database::create(dir.join("journal.redb")).expect("db");
            let txn = db.begin_write().expect("txn");
            {
                let mut t = txn.open_table(SLOTS).expect("slots");
                let row = t
                    .get(("sites/s/devices/d", WRITTEN, 3))
                    .expect("get")
                    .expect("row")
                    .value()
                    .to_vec();
                t.insert(("sites/s/devices/d", WRITTEN, 4), row.as_slice())
                    .expect("insert");
            }
            txn.commit().expect("commit");
        }
        let err = Journal::open_with_key(&dir, key()).expect_err("moved row");
        assert!(
            matches!(err, JournalError::Unsealable { slot: 4, .. }),
            "{err}"
        );
        assert!(!err.to_string().contains("73194682"));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&key_file);
    }

    #[test]
    fn a_journal_of_clear_rows_is_rewritten_sealed() {
        let dir = temp("clear");
        std::fs::create_dir_all(&dir).expect("dir");
        // What an agent before sealing left: JSON rows, no key row.
        {
            let db = redb::Database::create(dir.join("journal.redb")).expect("db");
            let txn = db.begin_write().expect("txn");
            {
                let meta = serde_json::to_vec(&Meta {
                    revision: 9,
                    time_zone: String::new(),
                    lockdown: false,
                })
                .expect("json");
                txn.open_table(META)
                    .expect("meta")
                    .insert("site", meta.as_slice())
                    .expect("insert");
                let d = DeviceJournal {
                    model: "m".into(),
                    ..DeviceJournal::default()
                };
                let header = serde_json::to_vec(&Header::of(&d)).expect("json");
                txn.open_table(DEVICES)
                    .expect("devices")
                    .insert("d", header.as_slice())
                    .expect("insert");
                let row = serde_json::to_vec(&code("64920531")).expect("json");
                txn.open_table(SLOTS)
                    .expect("slots")
                    .insert(("d", WRITTEN, 2), row.as_slice())
                    .expect("insert");
            }
            txn.commit().expect("commit");
        }
        assert!(file_has(&dir, "64920531"));
        let key = JournalKey::random().expect("key");
        let id = key.id().to_owned();
        let j = Journal::open_with_key(&dir, key).expect("migrate");
        assert_eq!(j.revision, 9);
        assert_eq!(j.devices["d"].written[&2].pin, "64920531");
        assert_eq!(j.key_id(), Some(id.as_str()));
        drop(j);
        assert!(!file_has(&dir, "64920531"), "no clear page survives");
        assert!(!dir.join("journal.redb.new").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
