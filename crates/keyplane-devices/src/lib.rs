//! Device drivers: the [`DeviceDriver`] trait through which the agent reaches every
//! device, and simulators of each kind (panel, Z-Wave lock, access-control door).
//!
//! This crate talks to devices only: no network to keyplaned, no database. Nothing it
//! prints (errors, `Debug`) contains a code.

mod sim;

pub use sim::{SimulatedDevice, open_driver};

use keyplane_core::DeviceModel;

/// What a device reports for one occupied slot.
#[derive(Clone, PartialEq, Eq)]
pub struct ObservedSlot {
    /// Slot (user number) on the device.
    pub slot: u16,
    /// The code, when the device reports codes in clear.
    pub code: Option<String>,
}

impl std::fmt::Debug for ObservedSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let code = if self.code.is_some() {
            "Some(<redacted>)"
        } else {
            "None"
        };
        write!(f, "ObservedSlot {{ slot: {}, code: {code} }}", self.slot)
    }
}

/// Why a device refused or failed an operation. Never holds a code.
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
    /// The code holds something other than digits.
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
    /// The device's memory is full.
    #[error("the device's code memory is full")]
    Full,
    /// The device cannot be reached.
    #[error("device unreachable: {0}")]
    Unreachable(String),
    /// Local I/O failed (the simulator's state file).
    #[error("device state: {0}")]
    Io(String),
}

/// A device the agent can program. Implementations report refusals as the device
/// would; they never retry on their own (the agent's reconcile loop does).
#[async_trait::async_trait]
pub trait DeviceDriver: Send {
    /// The device's resource name, `sites/{site}/devices/{device}`.
    fn device(&self) -> &str;
    /// The device's model profile.
    fn model(&self) -> &'static DeviceModel;
    /// Every occupied slot, sorted by slot.
    async fn read_slots(&mut self) -> Result<Vec<ObservedSlot>, DeviceError>;
    /// Writes `code` into `slot`.
    async fn set_slot(&mut self, slot: u16, code: &str) -> Result<(), DeviceError>;
    /// Clears `slot`.
    async fn clear_slot(&mut self, slot: u16) -> Result<(), DeviceError>;
}
