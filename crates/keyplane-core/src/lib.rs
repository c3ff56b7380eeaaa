//! Domain types and rules of keyplane. Pure: no I/O, no async, no clock.
//!
//! Everything that decides what is allowed or what a device should hold lives here,
//! so it can be tested with plain tables. This crate must not depend on any other
//! keyplane crate, nor on tokio, a database or gRPC.

pub mod access;
pub mod allocation;
pub mod authority;
pub mod clock;
pub mod compat;
pub mod config;
pub mod constraints;
pub mod credential;
pub mod event;
pub mod event_cursor;
pub mod event_log;
pub mod model;
pub mod names;
pub mod observed;
pub mod personal;
pub mod pin;
pub mod plan;
pub mod schedule;
pub mod scope;
pub mod status;

pub use event::EventKind;
pub use model::{DeviceKind, DeviceModel};
pub use names::{
    AccessPlanName, CredentialName, DeviceName, EventName, HolidayName, LocalCodeName,
    PartitionName, PersonalPlanName, SiteName, SyncStatusName, UserName,
};
