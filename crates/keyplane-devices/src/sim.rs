//! Simulated devices whose state lives in a JSON file, so it outlives the agent
//! process: a test can restart the agent, or program the device "at the keypad" while
//! the agent is down, and find the device as a real one would be. Every operation
//! takes an exclusive lock on a sidecar file, loads, changes and atomically rewrites
//! the state, so separate processes can share a device safely.

use crate::{DeviceDriver, DeviceError, ObservedSlot};
use keyplane_core::DeviceModel;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// slot -> code.
    slots: BTreeMap<u16, String>,
    /// Writes made through the driver interface, per slot.
    writes: BTreeMap<u16, u32>,
    /// Writes made at the keypad, per slot.
    keypad_writes: BTreeMap<u16, u32>,
}

/// A simulated panel, lock or door (by model).
#[derive(Debug)]
pub struct SimulatedDevice {
    device: String,
    model: &'static DeviceModel,
    path: PathBuf,
    lock_path: PathBuf,
}

fn io(e: impl std::fmt::Display) -> DeviceError {
    DeviceError::Io(e.to_string())
}

fn file_name(device: &str) -> String {
    device
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl SimulatedDevice {
    /// Opens (creating if needed) the simulated `device` of `model` kept in `dir`.
    pub fn open(
        dir: &Path,
        device: &str,
        model: &'static DeviceModel,
    ) -> Result<SimulatedDevice, DeviceError> {
        std::fs::create_dir_all(dir).map_err(io)?;
        let base = file_name(device);
        let sim = SimulatedDevice {
            device: device.to_owned(),
            model,
            path: dir.join(format!("{base}.json")),
            lock_path: dir.join(format!("{base}.lock")),
        };
        sim.with_state(|_| Ok(()))?;
        Ok(sim)
    }

    fn with_state<T>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, DeviceError>,
    ) -> Result<T, DeviceError> {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)
            .map_err(io)?;
        lock.lock().map_err(io)?;
        let mut state: State = match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| io(format!("corrupt state: line {}", e.line())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(io(e)),
        };
        let before = serde_json::to_vec(&state).map_err(io)?;
        let out = f(&mut state)?;
        let after = serde_json::to_vec(&state).map_err(io)?;
        if before != after || !self.path.exists() {
            let tmp = self.path.with_extension("json.tmp");
            let mut file = std::fs::File::create(&tmp).map_err(io)?;
            file.write_all(&after).map_err(io)?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &self.path).map_err(io)?;
        }
        drop(lock);
        Ok(out)
    }

    fn check(&self, state: &State, slot: u16, code: &str) -> Result<(), DeviceError> {
        let m = self.model;
        if slot < m.first_slot || slot > m.last_slot {
            return Err(DeviceError::SlotOutOfRange {
                slot,
                first: m.first_slot,
                last: m.last_slot,
            });
        }
        if code.is_empty() || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(DeviceError::NotDigits { slot });
        }
        if !m.accepts_length(code.len()) {
            return Err(DeviceError::CodeLength {
                slot,
                len: code.len(),
                min: m.min_code_length,
                max: m.max_code_length,
            });
        }
        if let Some((existing, _)) = state
            .slots
            .iter()
            .find(|(s, c)| **s != slot && c.as_str() == code)
        {
            return Err(DeviceError::DuplicateCode {
                slot,
                existing_slot: *existing,
            });
        }
        Ok(())
    }

    fn check_slot(&self, slot: u16) -> Result<(), DeviceError> {
        if slot < self.model.first_slot || slot > self.model.last_slot {
            return Err(DeviceError::SlotOutOfRange {
                slot,
                first: self.model.first_slot,
                last: self.model.last_slot,
            });
        }
        Ok(())
    }

    /// A person programs `code` into `slot` at the device (not a driver write).
    pub fn program_at_keypad(&mut self, slot: u16, code: &str) -> Result<(), DeviceError> {
        self.with_state(|state| {
            self.check(state, slot, code)?;
            state.slots.insert(slot, code.to_owned());
            *state.keypad_writes.entry(slot).or_default() += 1;
            Ok(())
        })
    }

    /// A person clears `slot` at the device.
    pub fn clear_at_keypad(&mut self, slot: u16) -> Result<(), DeviceError> {
        self.check_slot(slot)?;
        self.with_state(|state| {
            state.slots.remove(&slot);
            *state.keypad_writes.entry(slot).or_default() += 1;
            Ok(())
        })
    }

    /// What the device holds, slot -> code (for tests).
    pub fn slots(&self) -> BTreeMap<u16, String> {
        self.with_state(|s| Ok(s.slots.clone())).unwrap_or_default()
    }

    /// The code in `slot` (for tests).
    pub fn code_in(&self, slot: u16) -> Option<String> {
        self.slots().remove(&slot)
    }

    /// Driver writes (sets and clears) to `slot` so far.
    pub fn writes(&self, slot: u16) -> u32 {
        self.with_state(|s| Ok(s.writes.get(&slot).copied().unwrap_or(0)))
            .unwrap_or(0)
    }

    /// Driver writes to all slots so far.
    pub fn total_writes(&self) -> u32 {
        self.with_state(|s| Ok(s.writes.values().sum()))
            .unwrap_or(0)
    }

    /// Keypad writes to all slots so far.
    pub fn keypad_writes(&self) -> u32 {
        self.with_state(|s| Ok(s.keypad_writes.values().sum()))
            .unwrap_or(0)
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

    async fn read_slots(&mut self) -> Result<Vec<ObservedSlot>, DeviceError> {
        self.with_state(|s| {
            Ok(s.slots
                .iter()
                .map(|(slot, code)| ObservedSlot {
                    slot: *slot,
                    code: Some(code.clone()),
                })
                .collect())
        })
    }

    async fn set_slot(&mut self, slot: u16, code: &str) -> Result<(), DeviceError> {
        self.with_state(|state| {
            self.check(state, slot, code)?;
            state.slots.insert(slot, code.to_owned());
            *state.writes.entry(slot).or_default() += 1;
            Ok(())
        })
    }

    async fn clear_slot(&mut self, slot: u16) -> Result<(), DeviceError> {
        self.check_slot(slot)?;
        self.with_state(|state| {
            state.slots.remove(&slot);
            *state.writes.entry(slot).or_default() += 1;
            Ok(())
        })
    }
}

/// A driver for the simulated `device` kept in `dir`.
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

    fn dir(label: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kp-sim-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn block<F: std::future::Future>(f: F) -> F::Output {
        // The simulator never awaits anything, so one poll completes it.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("simulator future was pending"),
        }
    }

    #[test]
    fn refuses_what_a_real_device_refuses() {
        let d = dir("refuse");
        let lock = DeviceModel::find("zwave-lock-30-fixed4").expect("model");
        let mut sim = SimulatedDevice::open(&d, "sites/s/devices/lock", lock).expect("open");
        block(sim.set_slot(1, "4821")).expect("first code");
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
            (2, "48a1", DeviceError::NotDigits { slot: 2 }),
            (2, "", DeviceError::NotDigits { slot: 2 }),
            (
                31,
                "1111",
                DeviceError::SlotOutOfRange {
                    slot: 31,
                    first: 1,
                    last: 30,
                },
            ),
            (
                0,
                "1111",
                DeviceError::SlotOutOfRange {
                    slot: 0,
                    first: 1,
                    last: 30,
                },
            ),
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
                "{slot} {code:?}"
            );
            let msg = want.to_string();
            assert!(
                code.is_empty() || !msg.contains(code),
                "message leaks the code: {msg}"
            );
        }
        // Rewriting the same code into its own slot is allowed (and counted).
        block(sim.set_slot(1, "4821")).expect("same slot");
        assert_eq!(sim.writes(1), 2);
        assert_eq!(sim.slots().len(), 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn state_outlives_the_handle_and_keypad_is_not_a_driver_write() {
        let d = dir("persist");
        let panel = DeviceModel::find("vista-128bpt").expect("model");
        let mut sim = SimulatedDevice::open(&d, "sites/s/devices/panel", panel).expect("open");
        block(sim.set_slot(2, "4821")).expect("set");
        block(sim.set_slot(3, "1357")).expect("set");
        block(sim.clear_slot(3)).expect("clear");
        drop(sim);
        let mut again = SimulatedDevice::open(&d, "sites/s/devices/panel", panel).expect("reopen");
        assert_eq!(again.code_in(2).as_deref(), Some("4821"));
        assert_eq!(again.code_in(3), None);
        assert_eq!(
            (again.writes(2), again.writes(3), again.total_writes()),
            (1, 2, 3)
        );
        again.program_at_keypad(7, "9999").expect("keypad");
        assert_eq!(again.total_writes(), 3);
        assert_eq!(again.keypad_writes(), 1);
        let observed = block(again.read_slots()).expect("read");
        assert_eq!(
            observed.iter().map(|o| o.slot).collect::<Vec<_>>(),
            vec![2, 7]
        );
        assert!(!format!("{observed:?}").contains("9999"));
        // Another device in the same directory is separate.
        let other = SimulatedDevice::open(&d, "sites/s/devices/other", panel).expect("other");
        assert!(other.slots().is_empty());
        let _ = std::fs::remove_dir_all(&d);
    }
}
