//! Simulated devices whose state lives in a JSON file, so it outlives the agent
//! process: a test can restart the agent, or program the device "at the keypad" while
//! the agent is down, and find the device as a real one would be.
//!
//! A handle caches nothing. Every operation takes an exclusive OS lock on a sidecar
//! `.lock` file, loads the state, changes it and atomically rewrites it (temporary
//! file + rename), so several handles and processes can share one device safely.
//! The file I/O is done inline, also inside the async driver methods: a few small
//! local files, quick enough for the agent's executor in tests.

use crate::{DeviceDriver, DeviceError, DeviceEvent, EventKind, ObservedSlot};
use keyplane_core::DeviceModel;
use keyplane_core::authority::{Level, may_disarm};
use keyplane_core::schedule::{Schedule, any_open, parse_time_zone};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// What a simulated device holds, as stored in its JSON file. Holds codes: it has no
/// `Debug` on purpose.
#[derive(Default, Clone, PartialEq, Serialize, Deserialize)]
struct State {
    /// Model profile id the device was created as.
    #[serde(default)]
    model: String,
    /// slot -> code.
    slots: BTreeMap<u16, String>,
    /// Writes (sets and clears) made through the driver interface, per slot.
    writes: BTreeMap<u16, u32>,
    /// Writes made by a person at the keypad, per slot.
    keypad_writes: BTreeMap<u16, u32>,
    /// Panels: level number per partition, per user number.
    #[serde(default)]
    levels: BTreeMap<u16, BTreeMap<u8, u8>>,
    /// Panels: open/close reporting per user number.
    #[serde(default)]
    open_close: BTreeMap<u16, bool>,
    /// Panels: armed partitions and the user number that armed each.
    #[serde(default)]
    armed: BTreeMap<u8, u16>,
    /// The device's event log.
    #[serde(default)]
    events: Vec<DeviceEvent>,
    /// Devices that keep schedules: per slot, when its code opens (absent: always).
    #[serde(default)]
    schedules: BTreeMap<u16, Vec<Schedule>>,
    /// Time zone the schedules are in.
    #[serde(default)]
    time_zone: String,
    /// Doors: refusing everyone.
    #[serde(default)]
    lockdown: bool,
    /// Reads back occupied slots without their codes (masked), as many locks do.
    #[serde(default)]
    masked: bool,
    /// Answers nothing to the driver (link down, battery dead) while true.
    #[serde(default)]
    unreachable: bool,
    /// Offers a checksum of all user codes.
    #[serde(default)]
    checksum: bool,
    /// Full slot-table reads through the driver (each costs battery on a real lock).
    #[serde(default)]
    table_reads: u32,
    /// What the device reports about itself (test hook); absent: nothing.
    #[serde(default)]
    reported: Option<SimReported>,
    /// Driver operations in the order the device took them (test hook).
    #[serde(default)]
    history: Vec<DriverOp>,
    /// Checksum reads through the driver (test hook).
    #[serde(default)]
    checksum_reads: u32,
    /// How long each driver write takes (a slow lock on a busy mesh), in ms.
    #[serde(default)]
    write_delay_ms: u64,
    /// Declines every code written through the driver, with this reason (a jammed
    /// lock, a busy controller), while set.
    #[serde(default)]
    refusing: Option<String>,
    /// Driver writes still to be answered Ok and not kept (a lost write: a lock
    /// that acknowledges a command its memory then misses).
    #[serde(default)]
    drop_writes: u32,
}

impl State {
    /// Answers a driver write as done without keeping it, while writes are to be
    /// dropped: counted as a write all the same (the device was written to).
    fn dropped(&mut self, slot: u16, op: DriverOp) -> bool {
        if self.drop_writes == 0 {
            return false;
        }
        self.drop_writes -= 1;
        *self.writes.entry(slot).or_default() += 1;
        self.history.push(op);
        true
    }

    /// Declines a driver write of a code into `slot` while the device declines codes.
    fn refuse_write(&self, slot: u16) -> Result<(), DeviceError> {
        match &self.refusing {
            Some(reason) => Err(DeviceError::Declined {
                slot,
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }
}

/// One driver operation a simulated device took, in order (test hook).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DriverOp {
    /// A code written into the slot.
    Set(u16),
    /// The slot cleared.
    Clear(u16),
    /// The whole slot table read back.
    ReadTable,
}

/// What a simulated device reports about itself: code lengths and code rules (by
/// their API names), as a real lock reports its own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimReported {
    /// Shortest code accepted.
    #[serde(default)]
    pub min_code_length: Option<u8>,
    /// Longest code accepted.
    #[serde(default)]
    pub max_code_length: Option<u8>,
    /// Code rules, e.g. `no_repeated_digit`.
    #[serde(default)]
    pub rules: Option<Vec<String>>,
}

/// Who changes a slot: the driver interface (the agent) or a person at the keypad.
#[derive(Clone, Copy)]
enum Writer {
    Driver,
    Keypad,
}

impl State {
    fn log(&mut self, kind: EventKind, partition: u8, slot: Option<u16>) {
        self.log_at(kind, (partition > 0).then_some(partition), slot);
    }

    fn log_at(&mut self, kind: EventKind, partition: Option<u8>, slot: Option<u16>) {
        let seq = self.events.last().map_or(1, |e| e.seq + 1);
        let at_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        self.events.push(DeviceEvent {
            seq,
            kind,
            partition,
            slot,
            at_unix_ms,
        });
    }

    /// The level of user number `slot` in `partition`: user 001 is the installer.
    fn level(&self, slot: u16, partition: u8) -> Option<Level> {
        if slot == 1 {
            return Some(Level::Installer);
        }
        self.levels
            .get(&slot)
            .and_then(|l| l.get(&partition))
            .and_then(|n| Level::from_number(i32::from(*n)))
    }

    fn count(&mut self, slot: u16, by: Writer) {
        let log = match by {
            Writer::Driver => &mut self.writes,
            Writer::Keypad => &mut self.keypad_writes,
        };
        *log.entry(slot).or_default() += 1;
        if matches!(by, Writer::Driver) {
            // Counted after the change: an occupied slot was just written.
            let op = if self.slots.contains_key(&slot) {
                DriverOp::Set(slot)
            } else {
                DriverOp::Clear(slot)
            };
            self.history.push(op);
        }
    }
}

/// A simulated panel, lock or door (by model), kept in `<dir>/<device>.json`.
#[derive(Debug)]
pub struct SimulatedDevice {
    device: String,
    model: &'static DeviceModel,
    path: PathBuf,
    lock_path: PathBuf,
    cache: Cache,
}

/// The state this handle last read or wrote, with the version of the file it
/// matches: parsing the whole state file for every slot written made programming a
/// full door quadratic. Another handle's (or process's) write replaces the file,
/// which changes its stamp, so a stale state is never used.
#[derive(Default)]
struct Cache(std::sync::Mutex<Option<(FileStamp, State)>>);

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The state holds codes.
        f.write_str("Cache")
    }
}

/// Identifies one version of a state file (each write renames a new file in).
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl FileStamp {
    /// The stamp of the file at `path`; None when there is none.
    fn of(path: &Path) -> Result<Option<FileStamp>, DeviceError> {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(path) {
            Ok(m) => Ok(Some(FileStamp {
                dev: m.dev(),
                ino: m.ino(),
                len: m.len(),
                mtime: m.mtime(),
                mtime_nsec: m.mtime_nsec(),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("reading", path, e)),
        }
    }
}

fn io_error(what: &str, path: &Path, e: impl std::fmt::Display) -> DeviceError {
    DeviceError::Io(format!("{what} {}: {e}", path.display()))
}

/// A file name stem for a device resource name, distinct for distinct names: ASCII
/// letters, digits and `-` stay, `/` becomes `_`, any other byte becomes `%XX`.
fn file_stem(device: &str) -> String {
    let mut stem = String::with_capacity(device.len());
    for b in device.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' => stem.push(char::from(b)),
            b'/' => stem.push('_'),
            _ => {
                let _ = write!(stem, "%{b:02X}");
            }
        }
    }
    stem
}

/// The device resource name a file name stem stands for (the inverse of
/// [`file_stem`]); None for a stem [`file_stem`] never makes.
fn name_of_stem(stem: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(stem.len());
    let mut rest = stem.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        match b {
            b'_' => bytes.push(b'/'),
            b'%' => {
                let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
                rest = tail.get(2..)?;
                continue;
            }
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' => bytes.push(b),
            _ => return None,
        }
        rest = tail;
    }
    String::from_utf8(bytes).ok()
}

/// Just the model id of a state file.
#[derive(Deserialize)]
struct ModelOnly {
    #[serde(default)]
    model: String,
}

impl SimulatedDevice {
    /// Opens the simulated `device` of `model` kept in `dir`, creating the directory
    /// and an empty device if needed. Refuses a device created as another model.
    pub fn open(
        dir: &Path,
        device: &str,
        model: &'static DeviceModel,
    ) -> Result<SimulatedDevice, DeviceError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error("creating", dir, e))?;
        let stem = file_stem(device);
        let sim = SimulatedDevice {
            device: device.to_owned(),
            model,
            path: dir.join(format!("{stem}.json")),
            lock_path: dir.join(format!("{stem}.lock")),
            cache: Cache::default(),
        };
        sim.with_state(|_| Ok(()))?;
        Ok(sim)
    }

    /// Runs `f` on the state under the device's exclusive lock, writing the state
    /// back (atomically) when `f` changed it.
    fn with_state<T>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, DeviceError>,
    ) -> Result<T, DeviceError> {
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)
            .map_err(|e| io_error("opening", &self.lock_path, e))?;
        lock.lock()
            .map_err(|e| io_error("locking", &self.lock_path, e))?;
        let out = self.locked(f);
        // Closing the file releases the lock too; unlocking first just says so.
        let _ = lock.unlock();
        out
    }

    fn locked<T>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, DeviceError>,
    ) -> Result<T, DeviceError> {
        let mut cache = self
            .cache
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stamp = FileStamp::of(&self.path)?;
        let cached = match (stamp, cache.take()) {
            (Some(now), Some((at, state))) if now == at => Some(state),
            _ => None,
        };
        let (mut state, existed) = match cached {
            Some(state) => (state, true),
            None => match std::fs::read(&self.path) {
                // The parse error's line is enough; its text could quote a code.
                Ok(bytes) => (
                    serde_json::from_slice::<State>(&bytes).map_err(|e| {
                        io_error("parsing", &self.path, format_args!("line {}", e.line()))
                    })?,
                    true,
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (State::default(), false),
                Err(e) => return Err(io_error("reading", &self.path, e)),
            },
        };
        if state.model.is_empty() {
            state.model = self.model.id.to_owned();
        } else if state.model != self.model.id {
            return Err(DeviceError::Io(format!(
                "{} is a simulated {} device, not {}",
                self.device, state.model, self.model.id
            )));
        }
        let before = state.clone();
        let out = f(&mut state)?;
        if !existed || state != before {
            let after =
                serde_json::to_vec(&state).map_err(|e| io_error("encoding", &self.path, e))?;
            self.store(&after)?;
            *cache = FileStamp::of(&self.path)?.map(|at| (at, state));
        } else {
            *cache = stamp.map(|at| (at, state));
        }
        Ok(out)
    }

    /// Replaces the state file atomically (rename). Not fsynced: the state must
    /// survive the agent's process being killed, which the page cache does, not a
    /// machine crash; an fsync per write made a full door take minutes to program.
    fn store(&self, bytes: &[u8]) -> Result<(), DeviceError> {
        let tmp = self.path.with_extension("json.tmp");
        let mut file = File::create(&tmp).map_err(|e| io_error("creating", &tmp, e))?;
        file.write_all(bytes)
            .map_err(|e| io_error("writing", &tmp, e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| io_error("replacing", &self.path, e))
    }

    /// Reads the state for a test hook. Panics on an unreadable state file, so a test
    /// fails on the cause rather than on a wrong count.
    fn inspect<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        match self.with_state(|state| Ok(f(state))) {
            Ok(v) => v,
            Err(e) => panic!("simulated device {}: {e}", self.device),
        }
    }

    fn check_slot(&self, slot: u16) -> Result<(), DeviceError> {
        let m = self.model;
        if slot < m.first_slot || slot > m.last_slot {
            return Err(DeviceError::SlotOutOfRange {
                slot,
                first: m.first_slot,
                last: m.last_slot,
            });
        }
        Ok(())
    }

    /// Refuses what the device refuses: a slot it does not have, a code that is not
    /// digits or of a length the model does not take, a code another slot holds.
    fn check_code(&self, state: &State, slot: u16, code: &str) -> Result<(), DeviceError> {
        self.check_slot(slot)?;
        if code.is_empty() || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(DeviceError::NotDigits { slot });
        }
        let m = self.model;
        if !m.accepts_length(code.len()) {
            return Err(DeviceError::CodeLength {
                slot,
                len: code.len(),
                min: m.min_code_length,
                max: m.max_code_length,
            });
        }
        match state.slots.iter().find(|(s, c)| **s != slot && *c == code) {
            Some((existing, _)) => Err(DeviceError::DuplicateCode {
                slot,
                existing_slot: *existing,
            }),
            None => Ok(()),
        }
    }

    fn set(&self, slot: u16, code: &str, by: Writer) -> Result<(), DeviceError> {
        self.with_state(|state| {
            if matches!(by, Writer::Driver) {
                state.refuse_write(slot)?;
            }
            self.check_code(state, slot, code)?;
            if matches!(by, Writer::Driver) && state.dropped(slot, DriverOp::Set(slot)) {
                return Ok(());
            }
            state.slots.insert(slot, code.to_owned());
            state.count(slot, by);
            Ok(())
        })
    }

    fn clear(&self, slot: u16, by: Writer) -> Result<(), DeviceError> {
        self.check_slot(slot)?;
        self.with_state(|state| {
            if matches!(by, Writer::Driver) && state.dropped(slot, DriverOp::Clear(slot)) {
                return Ok(());
            }
            state.slots.remove(&slot);
            state.schedules.remove(&slot);
            state.levels.remove(&slot);
            state.open_close.remove(&slot);
            state.count(slot, by);
            Ok(())
        })
    }

    /// A person at the keypad of a panel enters `code` + ARM for `partition`.
    pub fn arm(&mut self, partition: u8, code: &str) -> Result<PanelOutcome, DeviceError> {
        self.arm_by(partition, code).map(|(outcome, _)| outcome)
    }

    /// Like [`SimulatedDevice::arm`], also returning the user number the code is
    /// in (None for a code the panel does not hold).
    pub fn arm_by(
        &mut self,
        partition: u8,
        code: &str,
    ) -> Result<(PanelOutcome, Option<u16>), DeviceError> {
        self.with_state(|state| {
            let slot = state
                .slots
                .iter()
                .find(|(_, c)| c.as_str() == code)
                .map(|(s, _)| *s);
            let level = slot.and_then(|s| state.level(s, partition));
            let Some((slot, level)) = slot.zip(level) else {
                state.log(EventKind::ArmRefused, partition, slot);
                return Ok((
                    PanelOutcome::Refused("code not valid in this partition"),
                    slot,
                ));
            };
            if state.armed.contains_key(&partition) {
                return Ok((PanelOutcome::Refused("partition already armed"), Some(slot)));
            }
            state.armed.insert(partition, slot);
            state.log(EventKind::Armed, partition, Some(slot));
            if level == Level::Duress {
                state.log(EventKind::Duress, partition, Some(slot));
            }
            Ok((PanelOutcome::Armed, Some(slot)))
        })
    }

    /// A person at the keypad of a panel enters `code` + OFF for `partition`. A duress
    /// code disarms exactly like any other (the intruder sees nothing) and logs a
    /// duress event.
    pub fn disarm(&mut self, partition: u8, code: &str) -> Result<PanelOutcome, DeviceError> {
        self.disarm_by(partition, code).map(|(outcome, _)| outcome)
    }

    /// Like [`SimulatedDevice::disarm`], also returning the user number the code is
    /// in (None for a code the panel does not hold).
    pub fn disarm_by(
        &mut self,
        partition: u8,
        code: &str,
    ) -> Result<(PanelOutcome, Option<u16>), DeviceError> {
        self.with_state(|state| {
            let slot = state
                .slots
                .iter()
                .find(|(_, c)| c.as_str() == code)
                .map(|(s, _)| *s);
            let level = slot.and_then(|s| state.level(s, partition));
            let Some((slot, level)) = slot.zip(level) else {
                state.log(EventKind::DisarmRefused, partition, slot);
                return Ok((
                    PanelOutcome::Refused("code not valid in this partition"),
                    slot,
                ));
            };
            if level == Level::Duress {
                state.log(EventKind::Duress, partition, Some(slot));
            }
            let Some(&armed_by) = state.armed.get(&partition) else {
                return Ok((PanelOutcome::Refused("partition is not armed"), Some(slot)));
            };
            if !may_disarm(level, armed_by == slot) {
                state.log(EventKind::DisarmRefused, partition, Some(slot));
                return Ok((
                    PanelOutcome::Refused("this code may disarm only what it armed"),
                    Some(slot),
                ));
            }
            state.armed.remove(&partition);
            state.log(EventKind::Disarmed, partition, Some(slot));
            Ok((PanelOutcome::Disarmed, Some(slot)))
        })
    }

    /// A person presents `code` at a lock or door at instant `at`: the device grants
    /// or refuses from what it holds (its lockdown, the slot's schedules) and logs it.
    pub fn present(
        &mut self,
        code: &str,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<AccessOutcome, DeviceError> {
        self.present_by(code, at).map(|(outcome, _)| outcome)
    }

    /// Like [`SimulatedDevice::present`], also returning the slot the code is in
    /// (None for a code the device does not hold).
    pub fn present_by(
        &mut self,
        code: &str,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(AccessOutcome, Option<u16>), DeviceError> {
        self.with_state(|state| {
            let slot = state
                .slots
                .iter()
                .find(|(_, c)| c.as_str() == code)
                .map(|(s, _)| *s);
            let outcome = match slot {
                None => AccessOutcome::Denied("unknown code"),
                Some(_) if state.lockdown => AccessOutcome::Denied("lockdown"),
                Some(s) => match state.schedules.get(&s) {
                    None => AccessOutcome::Granted,
                    Some(schedules) => {
                        let open = parse_time_zone(&state.time_zone)
                            .is_ok_and(|tz| any_open(schedules, tz, at));
                        if open {
                            AccessOutcome::Granted
                        } else {
                            AccessOutcome::Denied("outside its schedule")
                        }
                    }
                },
            };
            let kind = match outcome {
                AccessOutcome::Granted => EventKind::AccessGranted,
                AccessOutcome::Denied(_) => EventKind::AccessDenied,
            };
            state.log_at(kind, None, slot);
            Ok((outcome, slot))
        })
    }

    /// The device's resource name.
    pub fn name(&self) -> &str {
        &self.device
    }

    /// The device's model profile.
    pub fn device_model(&self) -> &'static DeviceModel {
        self.model
    }

    /// What a person can see at the device, without any code.
    pub fn summary(&self) -> Result<DeviceSummary, DeviceError> {
        self.with_state(|s| {
            Ok(DeviceSummary {
                occupied: s.slots.keys().copied().collect(),
                armed: s.armed.clone(),
                lockdown: s.lockdown,
            })
        })
    }

    /// Makes the device report slots masked (occupied, code unknown) or in clear.
    pub fn set_masked(&mut self, masked: bool) -> Result<(), DeviceError> {
        self.with_state(|s| {
            s.masked = masked;
            Ok(())
        })
    }

    /// Makes the device answer nothing to its driver (true) or again (false).
    pub fn set_unreachable(&mut self, unreachable: bool) -> Result<(), DeviceError> {
        self.with_state(|s| {
            s.unreachable = unreachable;
            Ok(())
        })
    }

    /// Makes every driver write take `delay` (a slow device; zero: instant).
    pub fn set_write_delay(&mut self, delay: std::time::Duration) -> Result<(), DeviceError> {
        self.with_state(|s| {
            s.write_delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
            Ok(())
        })
    }

    /// Makes the device decline every code its driver writes
    /// ([`DeviceError::Declined`]), giving `reason` as a real device gives its own;
    /// None: it takes codes again (the agent retries). Clears still go through.
    pub fn set_refusing(&mut self, reason: Option<&str>) -> Result<(), DeviceError> {
        self.with_state(|s| {
            s.refusing = reason.map(str::to_owned);
            Ok(())
        })
    }

    /// Makes the device answer its driver's next `n` writes (sets and clears) as
    /// done without keeping them: lost writes, as a lock that acknowledges a command
    /// and then misses it (test hook; 0: every write is kept again).
    pub fn drop_next_writes(&mut self, n: u32) -> Result<(), DeviceError> {
        self.with_state(|s| {
            s.drop_writes = n;
            Ok(())
        })
    }

    /// Checksum reads made through the driver so far (test hook).
    pub fn checksum_reads(&self) -> u32 {
        self.inspect(|s| s.checksum_reads)
    }

    /// Driver operations in the order the device took them (test hook).
    pub fn driver_history(&self) -> Vec<DriverOp> {
        self.inspect(|s| s.history.clone())
    }

    /// Waits as long as one write takes on this device, then checks it answers.
    async fn writable(&self) -> Result<(), DeviceError> {
        let delay = self.inspect(|s| s.write_delay_ms);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        self.reachable()
    }

    /// Refuses a driver operation while the device is unreachable.
    fn reachable(&self) -> Result<(), DeviceError> {
        self.with_state(|s| {
            if s.unreachable {
                Err(DeviceError::Unreachable("no answer".into()))
            } else {
                Ok(())
            }
        })
    }

    /// Makes the device report `reported` about itself (None: nothing).
    pub fn set_reported(&mut self, reported: Option<SimReported>) -> Result<(), DeviceError> {
        self.with_state(|s| {
            s.reported = reported;
            Ok(())
        })
    }

    /// Makes the device offer a checksum of its user codes.
    pub fn set_checksum(&mut self, on: bool) -> Result<(), DeviceError> {
        self.with_state(|s| {
            s.checksum = on;
            Ok(())
        })
    }

    /// Full slot-table reads made through the driver so far (test hook).
    pub fn table_reads(&self) -> u32 {
        self.inspect(|s| s.table_reads)
    }

    /// Whether a door is locked down (test hook).
    pub fn locked_down(&self) -> bool {
        self.inspect(|s| s.lockdown)
    }

    /// The user number that armed `partition`, if it is armed (test hook).
    pub fn armed_by(&self, partition: u8) -> Option<u16> {
        self.inspect(|s| s.armed.get(&partition).copied())
    }

    /// The level user number `slot` holds in `partition` (test hook).
    pub fn level_of(&self, slot: u16, partition: u8) -> Option<Level> {
        self.inspect(|s| s.level(slot, partition))
    }

    /// The device's whole event log (test hook).
    pub fn events(&self) -> Vec<DeviceEvent> {
        self.inspect(|s| s.events.clone())
    }

    /// The panel is reset or replaced: its event log is emptied and numbers its
    /// events from 1 again (slots and settings stay).
    pub fn reset_event_log(&mut self) -> Result<(), DeviceError> {
        self.with_state(|s| {
            s.events.clear();
            Ok(())
        })
    }

    /// A person programs `code` into `slot` at the device: refused like a driver
    /// write, counted as a keypad write, not in the driver write log.
    pub fn program_at_keypad(&mut self, slot: u16, code: &str) -> Result<(), DeviceError> {
        self.set(slot, code, Writer::Keypad)
    }

    /// A person clears `slot` at the device (a keypad write, not a driver write).
    pub fn clear_at_keypad(&mut self, slot: u16) -> Result<(), DeviceError> {
        self.clear(slot, Writer::Keypad)
    }

    /// What the device holds, slot -> code (test hook; panics if the state file is
    /// unreadable).
    pub fn slots(&self) -> BTreeMap<u16, String> {
        self.inspect(|s| s.slots.clone())
    }

    /// The code in `slot`, if any (test hook).
    pub fn code_in(&self, slot: u16) -> Option<String> {
        self.inspect(|s| s.slots.get(&slot).cloned())
    }

    /// Driver writes (sets and clears, refusals excluded) to `slot` so far (test hook).
    pub fn writes(&self, slot: u16) -> u32 {
        self.inspect(|s| s.writes.get(&slot).copied().unwrap_or(0))
    }

    /// Driver writes to all slots so far (test hook).
    pub fn total_writes(&self) -> u32 {
        self.inspect(|s| s.writes.values().sum())
    }

    /// Keypad writes (programs and clears) to all slots so far (test hook).
    pub fn keypad_writes(&self) -> u32 {
        self.inspect(|s| s.keypad_writes.values().sum())
    }
}

#[async_trait::async_trait]
impl DeviceDriver for SimulatedDevice {
    fn device(&self) -> &str {
        &self.device
    }

    fn model(&self) -> &'static DeviceModel {
        self.model
    }

    async fn reported_constraints(
        &mut self,
    ) -> Result<Option<keyplane_core::constraints::ReportedConstraints>, DeviceError> {
        self.reachable()?;
        use keyplane_core::constraints::{CodeRule, ReportedConstraints};
        self.with_state(|s| {
            Ok(s.reported.as_ref().map(|r| ReportedConstraints {
                min_code_length: r.min_code_length,
                max_code_length: r.max_code_length,
                rules: r.rules.as_ref().map(|names| {
                    names
                        .iter()
                        .filter_map(|n| CodeRule::ALL.into_iter().find(|c| c.as_str() == n))
                        .collect()
                }),
                ..Default::default()
            }))
        })
    }

    async fn read_checksum(&mut self) -> Result<Option<u64>, DeviceError> {
        self.reachable()?;
        self.with_state(|s| {
            s.checksum_reads += u32::from(s.checksum);
            Ok(s.checksum.then(|| {
                // FNV-1a over slot and code: any change of any code changes it.
                s.slots
                    .iter()
                    .fold(0xcbf2_9ce4_8422_2325u64, |h, (slot, code)| {
                        slot.to_le_bytes()
                            .iter()
                            .chain(code.as_bytes())
                            .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
                    })
            }))
        })
    }

    async fn read_slots(&mut self) -> Result<Vec<ObservedSlot>, DeviceError> {
        self.reachable()?;
        self.with_state(|s| {
            s.table_reads += 1;
            s.history.push(DriverOp::ReadTable);
            Ok(s.slots
                .iter()
                .map(|(slot, code)| ObservedSlot {
                    slot: *slot,
                    code: (!s.masked).then(|| code.clone()),
                })
                .collect())
        })
    }

    async fn set_slot(&mut self, slot: u16, code: &str) -> Result<(), DeviceError> {
        self.writable().await?;
        self.set(slot, code, Writer::Driver)
    }

    async fn clear_slot(&mut self, slot: u16) -> Result<(), DeviceError> {
        self.writable().await?;
        self.clear(slot, Writer::Driver)
    }

    async fn set_panel_user(
        &mut self,
        slot: u16,
        code: &str,
        authorities: &[(u8, Level)],
        open_close_reporting: bool,
    ) -> Result<(), DeviceError> {
        self.writable().await?;
        self.with_state(|state| {
            // Like a VISTA keypad: no user programming while armed.
            if let Some(partition) = state.armed.keys().next() {
                return Err(DeviceError::Armed {
                    partition: *partition,
                });
            }
            state.refuse_write(slot)?;
            self.check_code(state, slot, code)?;
            if state.dropped(slot, DriverOp::Set(slot)) {
                return Ok(());
            }
            state.slots.insert(slot, code.to_owned());
            let levels = authorities
                .iter()
                .map(|(p, l)| (*p, u8::try_from(l.number()).unwrap_or(u8::MAX)))
                .collect();
            state.levels.insert(slot, levels);
            state.open_close.insert(slot, open_close_reporting);
            state.count(slot, Writer::Driver);
            Ok(())
        })
    }

    async fn set_scheduled_code(
        &mut self,
        slot: u16,
        code: &str,
        schedules: Option<&[Schedule]>,
        time_zone: &str,
    ) -> Result<(), DeviceError> {
        self.writable().await?;
        self.with_state(|state| {
            state.refuse_write(slot)?;
            self.check_code(state, slot, code)?;
            if state.dropped(slot, DriverOp::Set(slot)) {
                return Ok(());
            }
            state.slots.insert(slot, code.to_owned());
            match schedules {
                Some(s) => state.schedules.insert(slot, s.to_vec()),
                None => state.schedules.remove(&slot),
            };
            state.time_zone = time_zone.to_owned();
            state.count(slot, Writer::Driver);
            Ok(())
        })
    }

    async fn set_lockdown(&mut self, on: bool) -> Result<(), DeviceError> {
        self.reachable()?;
        self.with_state(|state| {
            state.lockdown = on;
            Ok(())
        })
    }

    async fn read_events(&mut self, after: u64) -> Result<Vec<DeviceEvent>, DeviceError> {
        self.reachable()?;
        self.with_state(|s| Ok(s.events.iter().filter(|e| e.seq > after).cloned().collect()))
    }
}

/// What a lock or door did with a presented code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessOutcome {
    /// Let in.
    Granted,
    /// Refused, and why.
    Denied(&'static str),
}

/// What the panel did with a code entered at its keypad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanelOutcome {
    /// The partition is now armed.
    Armed,
    /// The partition is now disarmed.
    Disarmed,
    /// Nothing changed, and why.
    Refused(&'static str),
}

/// The simulated devices of one site, kept together in one directory.
#[derive(Debug, Clone)]
pub struct SimulatedSite {
    dir: PathBuf,
}

impl SimulatedSite {
    /// Simulated devices kept in `dir` (created on first use).
    pub fn new(dir: impl Into<PathBuf>) -> SimulatedSite {
        SimulatedSite { dir: dir.into() }
    }

    /// The directory holding the devices' state files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens (creating if needed) the simulated `device` of `model`.
    pub fn device(
        &self,
        device: &str,
        model: &'static DeviceModel,
    ) -> Result<SimulatedDevice, DeviceError> {
        SimulatedDevice::open(&self.dir, device, model)
    }

    /// Every simulated device kept in the directory, sorted by resource name.
    pub fn list(&self) -> Result<Vec<FoundDevice>, DeviceError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error("listing", &self.dir, e)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| io_error("listing", &self.dir, e))?.path();
            let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let Some(device) = name_of_stem(stem) else {
                continue;
            };
            let bytes = std::fs::read(&path).map_err(|e| io_error("reading", &path, e))?;
            // The parse error's line is enough; its text could quote a code.
            let state: ModelOnly = serde_json::from_slice(&bytes)
                .map_err(|e| io_error("parsing", &path, format_args!("line {}", e.line())))?;
            let model = DeviceModel::find(&state.model).ok_or_else(|| {
                DeviceError::Io(format!(
                    "{} records no known model ({:?})",
                    path.display(),
                    state.model
                ))
            })?;
            found.push(FoundDevice {
                device,
                model,
                file: path,
            });
        }
        found.sort_by(|a, b| a.device.cmp(&b.device));
        Ok(found)
    }

    /// Opens a simulated device that exists, with the model its file records. `name`
    /// is its resource name, its state file (name with or without `.json`, or a
    /// path), or the id at the end of its resource name when only one device has it.
    pub fn find(&self, name: &str) -> Result<SimulatedDevice, DeviceError> {
        let devices = self.list()?;
        let file_name = Path::new(name)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(name);
        let stem = file_name.strip_suffix(".json").unwrap_or(file_name);
        let by_name: Vec<&FoundDevice> = devices
            .iter()
            .filter(|d| d.device == name || file_stem(&d.device) == stem)
            .collect();
        let matches = if by_name.is_empty() {
            devices
                .iter()
                .filter(|d| d.device.rsplit('/').next() == Some(name))
                .collect()
        } else {
            by_name
        };
        match matches.as_slice() {
            [one] => SimulatedDevice::open(&self.dir, &one.device, one.model),
            [] => {
                let known: Vec<&str> = devices.iter().map(|d| d.device.as_str()).collect();
                Err(DeviceError::NotFound(if known.is_empty() {
                    format!(
                        "no simulated device {name:?} in {}: it holds no device yet; the agent \
                         creates each device of its site there once it has connected",
                        self.dir.display()
                    )
                } else {
                    format!(
                        "no simulated device {name:?} in {}; it holds: {}",
                        self.dir.display(),
                        known.join(", ")
                    )
                }))
            }
            many => Err(DeviceError::NotFound(format!(
                "{name:?} names {} simulated devices in {}; give the whole resource name: {}",
                many.len(),
                self.dir.display(),
                many.iter()
                    .map(|d| d.device.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// A driver for the simulated `device` of `model`, as the agent uses it.
    pub fn driver(
        &self,
        device: &str,
        model: &'static DeviceModel,
    ) -> Result<Box<dyn DeviceDriver>, DeviceError> {
        open_driver(&self.dir, device, model)
    }
}

/// What a simulated device shows, without any code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSummary {
    /// Slots holding a code, in order.
    pub occupied: Vec<u16>,
    /// Panels: armed partitions and the user number that armed each.
    pub armed: BTreeMap<u8, u16>,
    /// Doors: locked down.
    pub lockdown: bool,
}

/// A simulated device found in a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundDevice {
    /// Its resource name, `sites/{site}/devices/{device}`.
    pub device: String,
    /// The model its state file records.
    pub model: &'static DeviceModel,
    /// Its state file.
    pub file: PathBuf,
}

/// A driver for the simulated `device` of `model` kept in `dir` (what the agent
/// opens for each inventory device).
pub fn open_driver(
    dir: &Path,
    device: &str,
    model: &'static DeviceModel,
) -> Result<Box<dyn DeviceDriver>, DeviceError> {
    Ok(Box::new(SimulatedDevice::open(dir, device, model)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh directory, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("keyplane-devices-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Runs a simulator future: it never awaits anything, so one poll completes it.
    fn block<F: std::future::Future>(f: F) -> F::Output {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match std::pin::pin!(f).poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("simulator future was pending"),
        }
    }

    fn model(id: &str) -> &'static DeviceModel {
        DeviceModel::find(id).expect("model profile")
    }

    const LOCK: &str = "sites/s1/devices/front-door";
    const PANEL: &str = "sites/s1/devices/panel";

    #[test]
    fn refuses_what_a_real_device_refuses() {
        let dir = TempDir::new();
        let fixed = model("zwave-lock-30-fixed4");
        let mut sim = SimulatedDevice::open(&dir.0, LOCK, fixed).expect("open");
        block(sim.set_slot(1, "4821")).expect("first code");
        let out_of_range = |slot| DeviceError::SlotOutOfRange {
            slot,
            first: 1,
            last: 30,
        };
        let cases: &[(u16, &str, DeviceError)] = &[
            (
                2,
                "48211",
                DeviceError::CodeLength {
                    slot: 2,
                    len: 5,
                    min: 4,
                    max: 4,
                },
            ),
            (
                2,
                "482",
                DeviceError::CodeLength {
                    slot: 2,
                    len: 3,
                    min: 4,
                    max: 4,
                },
            ),
            (2, "48a1", DeviceError::NotDigits { slot: 2 }),
            (2, " 482", DeviceError::NotDigits { slot: 2 }),
            (2, "-482", DeviceError::NotDigits { slot: 2 }),
            (2, "٤٨٢١", DeviceError::NotDigits { slot: 2 }),
            (2, "", DeviceError::NotDigits { slot: 2 }),
            (31, "1357", out_of_range(31)),
            (0, "1357", out_of_range(0)),
            (u16::MAX, "1357", out_of_range(u16::MAX)),
            (
                2,
                "4821",
                DeviceError::DuplicateCode {
                    slot: 2,
                    existing_slot: 1,
                },
            ),
        ];
        for (slot, code, want) in cases {
            assert_eq!(
                block(sim.set_slot(*slot, code)).as_ref(),
                Err(want),
                "set {slot}"
            );
            assert_eq!(
                sim.program_at_keypad(*slot, code).as_ref(),
                Err(want),
                "keypad {slot}"
            );
        }
        assert_eq!(
            block(sim.clear_slot(31)),
            Err(out_of_range(31)),
            "clear out of range"
        );
        assert_eq!(sim.clear_at_keypad(0), Err(out_of_range(0)));
        // Refusals change nothing and are not writes.
        assert_eq!(
            sim.slots(),
            BTreeMap::from([(1, "4821".to_owned())]),
            "only the first code"
        );
        assert_eq!((sim.total_writes(), sim.keypad_writes()), (1, 0));
    }

    #[test]
    fn length_range_follows_the_model() {
        let dir = TempDir::new();
        let cases: &[(&str, &str, bool)] = &[
            ("zwave-lock-30", "1234", true),
            ("zwave-lock-30", "12345678", true),
            ("zwave-lock-30", "123456789", false),
            ("zwave-lock-30-fixed4", "12345", false),
            ("vista-128bpt", "1234", true),
            ("vista-128bpt", "12345", false),
            ("door-1000", "12345678", true),
        ];
        for (i, (id, code, ok)) in cases.iter().enumerate() {
            let mut sim =
                SimulatedDevice::open(&dir.0, &format!("sites/s1/devices/d{i}"), model(id))
                    .expect("open");
            assert_eq!(block(sim.set_slot(2, code)).is_ok(), *ok, "{id} {code}");
        }
    }

    #[test]
    fn counts_every_driver_write() {
        let dir = TempDir::new();
        let mut sim = SimulatedDevice::open(&dir.0, LOCK, model("zwave-lock-30")).expect("open");
        block(sim.set_slot(3, "4821")).expect("set");
        // The same code into the same slot is still a write.
        block(sim.set_slot(3, "4821")).expect("same again");
        block(sim.set_slot(3, "55555")).expect("replace");
        block(sim.clear_slot(3)).expect("clear");
        // Clearing an empty slot is accepted and is a write.
        block(sim.clear_slot(4)).expect("clear empty");
        assert_eq!(
            (sim.writes(3), sim.writes(4), sim.writes(5)),
            (4, 1, 0),
            "per slot"
        );
        assert_eq!(sim.total_writes(), 5);
        assert!(sim.slots().is_empty());
        // Moving a code: clear its old slot first, then it may go elsewhere.
        block(sim.set_slot(1, "9930")).expect("set");
        block(sim.clear_slot(1)).expect("clear");
        block(sim.set_slot(2, "9930")).expect("moved");
        assert_eq!(sim.code_in(2).as_deref(), Some("9930"));
    }

    #[test]
    fn dropped_writes_are_answered_and_counted_but_not_kept() {
        let dir = TempDir::new();
        let mut sim = SimulatedDevice::open(&dir.0, LOCK, model("zwave-lock-30")).expect("open");
        block(sim.set_slot(3, "4821")).expect("set");
        sim.drop_next_writes(2).expect("fault");
        block(sim.set_slot(4, "5930")).expect("a dropped set answers Ok");
        block(sim.clear_slot(3)).expect("a dropped clear answers Ok");
        block(sim.set_slot(5, "6041")).expect("kept again");
        assert_eq!(
            sim.slots(),
            BTreeMap::from([(3, "4821".to_owned()), (5, "6041".to_owned())])
        );
        assert_eq!((sim.writes(3), sim.writes(4), sim.writes(5)), (2, 1, 1));
        assert_eq!(
            sim.driver_history(),
            vec![
                DriverOp::Set(3),
                DriverOp::Set(4),
                DriverOp::Clear(3),
                DriverOp::Set(5)
            ]
        );
    }

    #[test]
    fn state_outlives_the_handle() {
        let dir = TempDir::new();
        let panel = model("vista-128bpt");
        let mut sim = SimulatedDevice::open(&dir.0, PANEL, panel).expect("open");
        block(sim.set_slot(2, "4821")).expect("set");
        block(sim.set_slot(3, "1357")).expect("set");
        block(sim.clear_slot(3)).expect("clear");
        sim.program_at_keypad(7, "9999").expect("keypad");
        drop(sim);
        let again = SimulatedDevice::open(&dir.0, PANEL, panel).expect("reopen");
        assert_eq!(
            again.slots(),
            BTreeMap::from([(2, "4821".to_owned()), (7, "9999".to_owned())])
        );
        assert_eq!(again.code_in(3), None);
        assert_eq!(
            (again.writes(2), again.writes(3), again.total_writes()),
            (1, 2, 3)
        );
        assert_eq!(again.keypad_writes(), 1);
    }

    #[test]
    fn handles_share_the_device() {
        let dir = TempDir::new();
        let lock = model("zwave-lock-30");
        let mut agent = SimulatedDevice::open(&dir.0, LOCK, lock).expect("agent handle");
        let mut person = SimulatedDevice::open(&dir.0, LOCK, lock).expect("keypad handle");
        block(agent.set_slot(1, "4821")).expect("set");
        assert_eq!(person.code_in(1).as_deref(), Some("4821"));
        person.program_at_keypad(2, "1357").expect("keypad");
        assert_eq!(
            block(agent.set_slot(3, "1357")),
            Err(DeviceError::DuplicateCode {
                slot: 3,
                existing_slot: 2
            })
        );
        // Concurrent writers through separate handles lose nothing.
        let threads: Vec<_> = (0..4u16)
            .map(|t| {
                let dir = dir.0.clone();
                std::thread::spawn(move || {
                    let mut sim = SimulatedDevice::open(&dir, LOCK, lock).expect("open");
                    for i in 0..5u16 {
                        let slot = 10 + t * 5 + i;
                        block(sim.set_slot(slot, &format!("{:04}", 1000 + slot))).expect("set");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("writer thread");
        }
        assert_eq!(agent.total_writes(), 21);
        assert_eq!(agent.slots().len(), 22);
    }

    #[test]
    fn keypad_programming_is_not_a_driver_write() {
        let dir = TempDir::new();
        let mut sim = SimulatedDevice::open(&dir.0, LOCK, model("zwave-lock-30")).expect("open");
        block(sim.set_slot(1, "4821")).expect("set");
        sim.program_at_keypad(20, "3141").expect("program");
        sim.program_at_keypad(1, "2718")
            .expect("overwrite at keypad");
        sim.clear_at_keypad(20).expect("clear");
        assert_eq!(
            (sim.writes(1), sim.writes(20), sim.total_writes()),
            (1, 0, 1)
        );
        assert_eq!(sim.keypad_writes(), 3);
        assert_eq!(sim.code_in(1).as_deref(), Some("2718"));
    }

    #[test]
    fn reads_only_occupied_slots_in_order() {
        let dir = TempDir::new();
        let site = SimulatedSite::new(&dir.0);
        let mut driver = site.driver(LOCK, model("zwave-lock-30")).expect("driver");
        assert_eq!(driver.device(), LOCK);
        assert_eq!(driver.model().id, "zwave-lock-30");
        assert_eq!(block(driver.read_slots()), Ok(vec![]));
        for (slot, code) in [(9, "9999"), (2, "2222"), (5, "5555")] {
            block(driver.set_slot(slot, code)).expect("set");
        }
        block(driver.clear_slot(5)).expect("clear");
        let observed = block(driver.read_slots()).expect("read");
        assert_eq!(
            observed,
            vec![
                ObservedSlot {
                    slot: 2,
                    code: Some("2222".into())
                },
                ObservedSlot {
                    slot: 9,
                    code: Some("9999".into())
                },
            ]
        );
        assert_eq!(
            site.device(LOCK, model("zwave-lock-30"))
                .expect("open")
                .total_writes(),
            4
        );
    }

    #[test]
    fn devices_are_separate_and_keep_their_model() {
        let dir = TempDir::new();
        let site = SimulatedSite::new(&dir.0);
        let lock = model("zwave-lock-30");
        // Names that a lossy file name would merge.
        let names = [
            "sites/s1/devices/a_b",
            "sites/s1/devices/a/b",
            "sites/s1/devices/a.b",
            "sites/s1/devices/a%2Fb",
        ];
        for (i, name) in names.iter().enumerate() {
            let mut sim = site.device(name, lock).expect("open");
            assert!(sim.slots().is_empty(), "{name} starts empty");
            let slot = u16::try_from(i + 1).expect("slot");
            block(sim.set_slot(slot, "4821")).expect("set");
        }
        for (i, name) in names.iter().enumerate() {
            let sim = site.device(name, lock).expect("reopen");
            assert_eq!(sim.slots().len(), 1, "{name}");
            assert_eq!(sim.total_writes(), 1, "{name}");
            assert!(sim.code_in(u16::try_from(i + 1).expect("slot")).is_some());
        }
        assert_eq!(
            site.device(names[0], model("door-1000")).map(|_| ()),
            Err(DeviceError::Io(
                "sites/s1/devices/a_b is a simulated zwave-lock-30 device, not door-1000".into()
            ))
        );
    }

    #[test]
    fn file_stems_map_back_to_names() {
        for name in [
            LOCK,
            PANEL,
            "sites/s1/devices/a_b",
            "sites/s1/devices/a.b",
            "sites/s1/devices/a%2Fb",
            "sites/s1/devices/é",
        ] {
            assert_eq!(name_of_stem(&file_stem(name)).as_deref(), Some(name));
        }
        for stem in ["a.b", "a%2", "a%zz", "a b"] {
            assert_eq!(name_of_stem(stem), None, "{stem}");
        }
    }

    #[test]
    fn devices_are_found_by_name_file_or_id_with_their_model() {
        let dir = TempDir::new();
        let site = SimulatedSite::new(&dir.0);
        let err = site.find(LOCK).expect_err("empty directory");
        assert!(err.to_string().contains("holds no device yet"), "{err}");
        site.device(LOCK, model("zwave-lock-30")).expect("lock");
        site.device(PANEL, model("vista-128bpt")).expect("panel");
        site.device("sites/s2/devices/panel", model("vista-128bpt"))
            .expect("other site's panel");
        let listed: Vec<(String, &str)> = site
            .list()
            .expect("list")
            .into_iter()
            .map(|d| (d.device, d.model.id))
            .collect();
        assert_eq!(
            listed,
            vec![
                (LOCK.to_owned(), "zwave-lock-30"),
                (PANEL.to_owned(), "vista-128bpt"),
                ("sites/s2/devices/panel".to_owned(), "vista-128bpt"),
            ]
        );
        let file = dir.0.join("sites_s1_devices_front-door.json");
        for name in [
            LOCK.to_owned(),
            "front-door".to_owned(),
            "sites_s1_devices_front-door".to_owned(),
            "sites_s1_devices_front-door.json".to_owned(),
            file.display().to_string(),
        ] {
            let sim = site.find(&name).expect(&name);
            assert_eq!(sim.name(), LOCK, "{name}");
            assert_eq!(sim.device_model().id, "zwave-lock-30", "{name}");
        }
        let ambiguous = site.find("panel").expect_err("two panels");
        assert!(
            ambiguous.to_string().contains("names 2 simulated devices"),
            "{ambiguous}"
        );
        let unknown = site.find("back-door").expect_err("unknown");
        assert!(
            unknown.to_string().contains(LOCK),
            "lists what exists: {unknown}"
        );
    }

    #[test]
    fn keypad_outcomes_name_the_user_number() {
        let dir = TempDir::new();
        let mut panel = SimulatedDevice::open(&dir.0, PANEL, model("vista-128bpt")).expect("open");
        block(panel.set_panel_user(2, "4821", &[(1, Level::Master)], false)).expect("set");
        assert_eq!(panel.arm_by(1, "4821"), Ok((PanelOutcome::Armed, Some(2))));
        assert_eq!(
            panel.arm_by(1, "4821"),
            Ok((PanelOutcome::Refused("partition already armed"), Some(2)))
        );
        assert_eq!(
            panel.disarm_by(1, "0000"),
            Ok((
                PanelOutcome::Refused("code not valid in this partition"),
                None
            ))
        );
        assert_eq!(
            panel.disarm_by(1, "4821"),
            Ok((PanelOutcome::Disarmed, Some(2)))
        );
        let mut lock = SimulatedDevice::open(&dir.0, LOCK, model("zwave-lock-30")).expect("open");
        lock.program_at_keypad(7, "3141").expect("program");
        let now = chrono::Utc::now();
        assert_eq!(
            lock.present_by("3141", now),
            Ok((AccessOutcome::Granted, Some(7)))
        );
        assert_eq!(
            lock.present_by("2718", now),
            Ok((AccessOutcome::Denied("unknown code"), None))
        );
        assert_eq!(
            lock.summary(),
            Ok(DeviceSummary {
                occupied: vec![7],
                armed: BTreeMap::new(),
                lockdown: false
            }),
            "slots without codes"
        );
    }

    #[test]
    fn nothing_printed_contains_a_code() {
        const PIN: &str = "86420";
        let dir = TempDir::new();
        let site = SimulatedSite::new(&dir.0);
        let mut sim = site.device(LOCK, model("zwave-lock-30")).expect("open");
        block(sim.set_slot(1, PIN)).expect("set");
        let refusals = [
            block(sim.set_slot(2, PIN)),
            sim.program_at_keypad(2, PIN),
            block(sim.set_slot(31, PIN)),
        ];
        let fixed = site
            .device("sites/s1/devices/fixed", model("zwave-lock-30-fixed4"))
            .expect("open");
        let mut printed = vec![
            format!("{sim:?}"),
            format!("{site:?}"),
            format!("{fixed:?}"),
            format!("{:?}", block(sim.read_slots())),
        ];
        let mut fixed = fixed;
        for result in refusals.into_iter().chain([
            block(fixed.set_slot(2, PIN)),
            block(fixed.set_slot(2, "8642a")),
        ]) {
            let e = result.expect_err("refused");
            printed.push(e.to_string());
            printed.push(format!("{e:?}"));
        }
        // A corrupt state file is reported without quoting it.
        std::fs::write(
            dir.0.join("sites_s1_devices_front-door.json"),
            format!("{{\"slots\":{{\"1\":{PIN}}}}}"),
        )
        .expect("corrupt");
        let corrupt = site
            .device(LOCK, model("zwave-lock-30"))
            .expect_err("corrupt");
        printed.push(corrupt.to_string());
        for text in printed {
            assert!(!text.contains(PIN), "leaks the code: {text}");
        }
    }
}
