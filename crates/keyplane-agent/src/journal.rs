//! The agent's local journal: the desired table received from keyplaned, what the
//! agent has written to each device, and the site revision it holds. Saved atomically
//! (write, fsync, rename) after every device write, so a restarted agent knows exactly
//! what is already on the devices and never writes it again. It holds PINs, so the
//! file is private to the agent's user (mode 0600).

use chrono::{DateTime, Utc};
use keyplane_core::authority::Level;
use keyplane_core::plan::DesiredCode;
use keyplane_core::schedule::Schedule;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
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

/// What the journal knows about one device.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceJournal {
    /// Model profile id.
    pub model: String,
    /// Whether keyplaned still lists the device.
    pub present: bool,
    /// What keyplaned wants in each slot.
    pub desired: BTreeMap<u16, Code>,
    /// What this agent wrote to each slot (and has not cleared).
    pub written: BTreeMap<u16, Code>,
    /// Site revision last acked for this device.
    pub acked: i64,
    /// Highest event sequence number keyplaned has stored for this device.
    #[serde(default)]
    pub events_acked: u64,
    /// Doors: whether the device was put in lockdown.
    #[serde(default)]
    pub lockdown_applied: bool,
    /// What the device held when last read (slot -> code, None when masked).
    #[serde(default)]
    pub observed: Option<BTreeMap<u16, Option<String>>>,
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

/// The whole journal.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
}

impl Journal {
    /// Opens the journal in `dir`, or starts an empty one.
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        let io = |source| JournalError::Io {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join("journal.json");
        let mut journal = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<Journal>(&bytes).map_err(|e| JournalError::Corrupt {
                    path: path.clone(),
                    detail: format!("line {} column {}", e.line(), e.column()),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Journal::default(),
            Err(source) => return Err(JournalError::Io { path, source }),
        };
        journal.path = path;
        Ok(journal)
    }

    /// Writes the journal atomically.
    pub fn save(&self) -> Result<(), JournalError> {
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(self).map_err(|e| JournalError::Corrupt {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_hides_pins_in_debug() {
        let dir = std::env::temp_dir().join(format!("kp-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut j = Journal::open(&dir).expect("open");
        assert_eq!(j.revision, 0);
        j.revision = 7;
        let code = Code {
            credential: "c".into(),
            pin: "9930".into(),
            ..Code::default()
        };
        j.devices
            .entry("d".into())
            .or_default()
            .written
            .insert(3, code.clone());
        j.save().expect("save");
        let again = Journal::open(&dir).expect("reopen");
        assert_eq!(again.revision, 7);
        assert_eq!(again.devices["d"].written[&3], code);
        assert!(!format!("{again:?}").contains("9930"));
        std::fs::write(dir.join("journal.json"), b"{not json").expect("write");
        let err = Journal::open(&dir).expect_err("corrupt");
        assert!(matches!(err, JournalError::Corrupt { .. }), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
