//! Device drivers: the [`DeviceDriver`] trait through which the agent reaches every
//! device, and a file-backed simulator for each kind (panel, Z-Wave lock,
//! access-control door), chosen by the device's [`DeviceModel`].
//!
//! What this crate must not contain: any network connection to keyplaned, any
//! database, any policy (who may hold which code, which slot a credential gets,
//! retries). Drivers only read and write device slots and report refusals the way
//! the device does; deciding what to write is the agent's and keyplane-core's job.
//!
//! Nothing this crate formats (errors, `Debug`) contains a code: [`DeviceError`] has
//! no variant that holds one, and [`ObservedSlot`]'s `Debug` redacts it.

mod sim;
pub mod zwave;

pub use sim::{
    AccessOutcome, DeviceSummary, DriverOp, FoundDevice, PanelOutcome, SimReported,
    SimulatedDevice, SimulatedSite, open_driver,
};

use keyplane_core::DeviceModel;
use keyplane_core::authority::Level;
use keyplane_core::schedule::Schedule;
use std::fmt;

/// What a device reports for one occupied slot.
#[derive(Clone, PartialEq, Eq)]
pub struct ObservedSlot {
    /// Slot (user number) on the device.
    pub slot: u16,
    /// The code, when the device reports codes in clear (`None` when it only says
    /// the slot is occupied).
    pub code: Option<String>,
}

impl fmt::Debug for ObservedSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = if self.code.is_some() {
            "Some(<redacted>)"
        } else {
            "None"
        };
        f.debug_struct("ObservedSlot")
            .field("slot", &self.slot)
            .field("code", &format_args!("{code}"))
            .finish()
    }
}

/// Why a device refused or failed an operation. No variant holds a code; drivers
/// must not put one into the free-text variants either.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The code's length is outside what the device accepts.
    #[error("slot {slot}: a {len}-digit code is refused; the device accepts {min}..{max} digits")]
    CodeLength {
        /// Target slot.
        slot: u16,
        /// Length of the refused code.
        len: usize,
        /// Shortest accepted.
        min: u8,
        /// Longest accepted.
        max: u8,
    },
    /// The code is empty or holds something other than the digits 0-9.
    #[error("slot {slot}: codes must be digits only")]
    NotDigits {
        /// Target slot.
        slot: u16,
    },
    /// No such slot on the device.
    #[error("slot {slot} does not exist; the device has slots {first}..{last}")]
    SlotOutOfRange {
        /// Target slot.
        slot: u16,
        /// Lowest slot.
        first: u16,
        /// Highest slot.
        last: u16,
    },
    /// The same code is already in another slot.
    #[error("slot {slot}: the device already holds this code in slot {existing_slot}")]
    DuplicateCode {
        /// Target slot.
        slot: u16,
        /// Where the code already is.
        existing_slot: u16,
    },
    /// The device refused the write, for the reason it gave (its own message, never
    /// quoting the code).
    #[error("slot {slot}: the device refused the write: {reason}")]
    Refused {
        /// Target slot.
        slot: u16,
        /// The device's reason.
        reason: String,
    },
    /// The device turned the write down for now, for the reason it gave (busy,
    /// jammed, a low battery; never quoting the code): unlike [`DeviceError::Refused`],
    /// the same write may go through later, so the agent tries it again.
    #[error("slot {slot}: the device declined the write: {reason}")]
    Declined {
        /// Target slot.
        slot: u16,
        /// The device's reason.
        reason: String,
    },
    /// The device's code memory is full.
    #[error("the device's code memory is full")]
    Full,
    /// A panel is not programmed while a partition is armed; the write waits.
    #[error("partition {partition} is armed: user codes are not programmed until it is disarmed")]
    Armed {
        /// The armed partition.
        partition: u8,
    },
    /// The device cannot be reached (link down, no answer).
    #[error("device unreachable: {0}")]
    Unreachable(String),
    /// Local I/O failed (for the simulator: its state file).
    #[error("device state: {0}")]
    Io(String),
    /// No such device (the simulator directory holds no state file for it).
    #[error("{0}")]
    NotFound(String),
    /// The driver cannot do this; nothing was changed on the device. What a driver
    /// does not implement is refused, never approximated by something that grants
    /// more access (a code without its schedule, a door left open in lockdown).
    #[error("the device's driver does not support {operation}; nothing was written")]
    Unsupported {
        /// What was asked, e.g. `on-device schedules`.
        operation: &'static str,
    },
}

impl DeviceError {
    /// Whether retrying the same request can never succeed (the driver lacks it).
    pub fn is_unsupported(&self) -> bool {
        matches!(self, DeviceError::Unsupported { .. })
    }

    /// Whether the device (or its driver) refused this very request, so sending it
    /// again unchanged gets the same answer: a slot it lacks, a code it does not
    /// take, a refusal it gave. Not a duplicate code (clearing the other slot may
    /// resolve it) nor a link or I/O failure.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            DeviceError::Unsupported { .. }
                | DeviceError::Refused { .. }
                | DeviceError::SlotOutOfRange { .. }
                | DeviceError::CodeLength { .. }
                | DeviceError::NotDigits { .. }
        )
    }
}

/// A device the agent can program. Implementations report refusals as the device
/// would and never retry on their own (the agent's reconcile loop does).
#[async_trait::async_trait]
pub trait DeviceDriver: Send {
    /// The device's resource name, `sites/{site}/devices/{device}`.
    fn device(&self) -> &str;
    /// The device's model profile.
    fn model(&self) -> &'static DeviceModel;
    /// What the device says about itself (slot range, code lengths, code rules...),
    /// where the driver can ask it; None: nothing beyond the model profile. The agent
    /// reports it in its inventory and keyplaned lets it override the profile.
    async fn reported_constraints(
        &mut self,
    ) -> Result<Option<keyplane_core::constraints::ReportedConstraints>, DeviceError> {
        Ok(None)
    }
    /// Whether a write answered Ok was already confirmed by the driver itself (it
    /// saw the device report the slot, or read it back): the agent then does not
    /// read the device back to confirm it. False: the agent confirms every write it
    /// can recognise by reading the device back before acking it.
    fn confirms_writes(&self) -> bool {
        false
    }
    /// Every occupied slot (and only those), sorted by slot.
    async fn read_slots(&mut self) -> Result<Vec<ObservedSlot>, DeviceError>;
    /// Writes `code` into `slot`, replacing what is there.
    async fn set_slot(&mut self, slot: u16, code: &str) -> Result<(), DeviceError>;
    /// Clears `slot` (clearing an empty slot succeeds).
    async fn clear_slot(&mut self, slot: u16) -> Result<(), DeviceError>;

    /// Panels: writes `code` into user number `slot` with the user's level in each
    /// partition and their open/close reporting. The default refuses: a code written
    /// without its levels would get whatever the panel gives by default.
    async fn set_panel_user(
        &mut self,
        slot: u16,
        code: &str,
        authorities: &[(u8, Level)],
        open_close_reporting: bool,
    ) -> Result<(), DeviceError> {
        let _ = (slot, code, authorities, open_close_reporting);
        Err(DeviceError::Unsupported {
            operation: "panel user levels",
        })
    }

    /// Devices that keep schedules: writes `code` into `slot`, valid only while one
    /// of `schedules` is open in time zone `time_zone` (None: always). The default
    /// writes unscheduled codes and refuses scheduled ones, which it could only
    /// write open around the clock.
    async fn set_scheduled_code(
        &mut self,
        slot: u16,
        code: &str,
        schedules: Option<&[Schedule]>,
        time_zone: &str,
    ) -> Result<(), DeviceError> {
        let _ = time_zone;
        match schedules {
            None => self.set_slot(slot, code).await,
            Some(_) => Err(DeviceError::Unsupported {
                operation: "on-device schedules",
            }),
        }
    }

    /// A checksum of all user codes, on devices that offer one (None otherwise):
    /// reading it is cheap, reading every slot drains a battery lock.
    async fn read_checksum(&mut self) -> Result<Option<u64>, DeviceError> {
        Ok(None)
    }

    /// Access-control doors: refuse every credential while `on`. The default
    /// refuses: a driver that cannot lock a door down must say so, not pretend.
    async fn set_lockdown(&mut self, on: bool) -> Result<(), DeviceError> {
        let _ = on;
        Err(DeviceError::Unsupported {
            operation: "lockdown",
        })
    }

    /// Events the device logged after sequence number `after`, oldest first.
    async fn read_events(&mut self, after: u64) -> Result<Vec<DeviceEvent>, DeviceError> {
        let _ = after;
        Ok(Vec::new())
    }
}

/// What happened at a device: the one list, from keyplane-core (devices log the
/// first seven kinds).
pub use keyplane_core::EventKind;

/// One event from a device's log. Never holds a code: only the user number.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceEvent {
    /// Sequence number in the device's log, increasing from 1.
    pub seq: u64,
    /// What happened.
    pub kind: EventKind,
    /// Partition, when the event concerns one.
    pub partition: Option<u8>,
    /// User number (slot) of the code used, when known.
    pub slot: Option<u16>,
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: i64,
}

impl DeviceEvent {
    /// What tells this event from another with the same sequence number (a log that
    /// restarted): see `keyplane_core::event_log`.
    pub fn mark(&self) -> keyplane_core::event_log::EventMark {
        keyplane_core::event_log::EventMark::of(
            self.seq,
            self.kind,
            self.partition,
            self.slot,
            self.at_unix_ms,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "73915";

    #[test]
    fn observed_slot_debug_redacts_the_code() {
        let with = ObservedSlot {
            slot: 7,
            code: Some(PIN.to_owned()),
        };
        let without = ObservedSlot {
            slot: 7,
            code: None,
        };
        for (slot, want) in [
            (&with, "ObservedSlot { slot: 7, code: Some(<redacted>) }"),
            (&without, "ObservedSlot { slot: 7, code: None }"),
        ] {
            assert_eq!(format!("{slot:?}"), want);
            assert!(!format!("{slot:#?}").contains(PIN));
        }
        assert!(!format!("{:?}", vec![with]).contains(PIN));
    }

    /// A driver that implements only what the trait requires: a bare slot store.
    struct Minimal {
        slots: std::collections::BTreeMap<u16, String>,
    }

    #[async_trait::async_trait]
    impl DeviceDriver for Minimal {
        fn device(&self) -> &str {
            "sites/s/devices/d"
        }
        fn model(&self) -> &'static DeviceModel {
            DeviceModel::find("door-1000").expect("door model")
        }
        async fn read_slots(&mut self) -> Result<Vec<ObservedSlot>, DeviceError> {
            Ok(self
                .slots
                .iter()
                .map(|(slot, code)| ObservedSlot {
                    slot: *slot,
                    code: Some(code.clone()),
                })
                .collect())
        }
        async fn set_slot(&mut self, slot: u16, code: &str) -> Result<(), DeviceError> {
            self.slots.insert(slot, code.to_owned());
            Ok(())
        }
        async fn clear_slot(&mut self, slot: u16) -> Result<(), DeviceError> {
            self.slots.remove(&slot);
            Ok(())
        }
    }

    /// Runs a future that never waits (the minimal driver does no I/O).
    fn block<F: std::future::Future>(f: F) -> F::Output {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match std::pin::pin!(f).poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("future was pending"),
        }
    }

    #[test]
    fn defaults_refuse_what_they_cannot_do_and_write_nothing() {
        let schedule = keyplane_core::schedule::Schedule {
            windows: vec![],
            valid_from: None,
            valid_until: None,
            paused_dates: vec![],
        };
        let mut d = Minimal {
            slots: Default::default(),
        };
        let unsupported = |operation| Err(DeviceError::Unsupported { operation });
        // A scheduled code is refused, not written open around the clock.
        assert_eq!(
            block(d.set_scheduled_code(3, PIN, Some(&[schedule]), "Europe/Paris")),
            unsupported("on-device schedules")
        );
        assert!(d.slots.is_empty(), "nothing written");
        // A panel code is refused rather than written without its levels.
        assert_eq!(
            block(d.set_panel_user(3, PIN, &[(1, Level::Master)], false)),
            unsupported("panel user levels")
        );
        assert!(d.slots.is_empty(), "nothing written");
        // Lockdown is refused, in both directions, rather than ignored.
        for on in [true, false] {
            let refused = block(d.set_lockdown(on));
            assert_eq!(refused, unsupported("lockdown"));
            assert!(refused.is_err_and(|e| e.is_unsupported()));
        }
        // An unscheduled code needs nothing the driver lacks.
        assert_eq!(block(d.set_scheduled_code(3, PIN, None, "UTC")), Ok(()));
        assert_eq!(d.slots.get(&3).map(String::as_str), Some(PIN));
    }

    #[test]
    fn errors_never_print_a_code() {
        let errors = [
            DeviceError::CodeLength {
                slot: 2,
                len: PIN.len(),
                min: 4,
                max: 4,
            },
            DeviceError::NotDigits { slot: 2 },
            DeviceError::SlotOutOfRange {
                slot: 31,
                first: 1,
                last: 30,
            },
            DeviceError::DuplicateCode {
                slot: 2,
                existing_slot: 1,
            },
            DeviceError::Full,
            DeviceError::Refused {
                slot: 2,
                reason: "too short".into(),
            },
            DeviceError::Declined {
                slot: 2,
                reason: "motor jammed".into(),
            },
            DeviceError::Unreachable("link lost".into()),
            DeviceError::Io("state file missing".into()),
            DeviceError::NotFound("no simulated device x".into()),
            DeviceError::Unsupported {
                operation: "lockdown",
            },
        ];
        for e in errors {
            assert!(!e.to_string().contains(PIN), "{e}");
            assert!(!format!("{e:?}").contains(PIN), "{e:?}");
        }
    }
}
