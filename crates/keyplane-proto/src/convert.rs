//! The one conversion between wire values (`keyplane.v1`) and keyplane-core values,
//! used by keyplaned and the agent alike, so both read a field by the same rule.
//!
//! Protobuf is loose, core types are strict: decoding refuses anything it cannot read
//! exactly (an unknown weekday, an unset level, an instant out of range) and never
//! guesses, since a guess about a schedule or a level widens access. Errors name
//! positions and values, never a code; callers add the field path they read.

use crate::v1 as pb;
use chrono::{DateTime, NaiveDate, Utc, Weekday};
use keyplane_core::authority::{Authorities, Level};
use keyplane_core::names::MAX_PARTITIONS;
use keyplane_core::observed::SlotFinding;
use keyplane_core::schedule::{Schedule, ScheduleError, Window, day_bit, format_time, parse_time};
use keyplane_core::{DeviceKind, EventKind};

/// A wire enum value with no core counterpart (unspecified, or from a newer peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{value} is not a {what}")]
pub struct UnknownValue {
    /// What was expected, e.g. `day of the week`.
    pub what: &'static str,
    /// The value received.
    pub value: i32,
}

/// Decodes an open wire enum field (`i32`) into its core value.
pub fn decode<P, C>(value: i32, what: &'static str) -> Result<C, UnknownValue>
where
    P: TryFrom<i32>,
    C: TryFrom<P>,
{
    P::try_from(value)
        .ok()
        .and_then(|p| C::try_from(p).ok())
        .ok_or(UnknownValue { what, value })
}

impl TryFrom<pb::DayOfWeek> for Weekday {
    type Error = UnknownValue;
    fn try_from(day: pb::DayOfWeek) -> Result<Self, Self::Error> {
        Ok(match day {
            pb::DayOfWeek::Monday => Weekday::Mon,
            pb::DayOfWeek::Tuesday => Weekday::Tue,
            pb::DayOfWeek::Wednesday => Weekday::Wed,
            pb::DayOfWeek::Thursday => Weekday::Thu,
            pb::DayOfWeek::Friday => Weekday::Fri,
            pb::DayOfWeek::Saturday => Weekday::Sat,
            pb::DayOfWeek::Sunday => Weekday::Sun,
            pb::DayOfWeek::Unspecified => {
                return Err(UnknownValue {
                    what: "day of the week",
                    value: day as i32,
                });
            }
        })
    }
}

impl From<Weekday> for pb::DayOfWeek {
    fn from(day: Weekday) -> Self {
        match day {
            Weekday::Mon => pb::DayOfWeek::Monday,
            Weekday::Tue => pb::DayOfWeek::Tuesday,
            Weekday::Wed => pb::DayOfWeek::Wednesday,
            Weekday::Thu => pb::DayOfWeek::Thursday,
            Weekday::Fri => pb::DayOfWeek::Friday,
            Weekday::Sat => pb::DayOfWeek::Saturday,
            Weekday::Sun => pb::DayOfWeek::Sunday,
        }
    }
}

impl TryFrom<pb::Level> for Level {
    type Error = UnknownValue;
    fn try_from(level: pb::Level) -> Result<Self, Self::Error> {
        // Wire values are the panel level + 1; 0 is unspecified.
        Level::from_number(level as i32 - 1).ok_or(UnknownValue {
            what: "level",
            value: level as i32,
        })
    }
}

impl From<Level> for pb::Level {
    fn from(level: Level) -> Self {
        match level {
            Level::Installer => pb::Level::Installer,
            Level::Master => pb::Level::Master,
            Level::Manager => pb::Level::Manager,
            Level::OperatorA => pb::Level::OperatorA,
            Level::OperatorB => pb::Level::OperatorB,
            Level::OperatorC => pb::Level::OperatorC,
            Level::Duress => pb::Level::Duress,
        }
    }
}

impl TryFrom<pb::DeviceKind> for DeviceKind {
    type Error = UnknownValue;
    fn try_from(kind: pb::DeviceKind) -> Result<Self, Self::Error> {
        match kind {
            pb::DeviceKind::Panel => Ok(DeviceKind::Panel),
            pb::DeviceKind::Lock => Ok(DeviceKind::Lock),
            pb::DeviceKind::Door => Ok(DeviceKind::Door),
            pb::DeviceKind::Unspecified => Err(UnknownValue {
                what: "device kind",
                value: kind as i32,
            }),
        }
    }
}

impl From<DeviceKind> for pb::DeviceKind {
    fn from(kind: DeviceKind) -> Self {
        match kind {
            DeviceKind::Panel => pb::DeviceKind::Panel,
            DeviceKind::Lock => pb::DeviceKind::Lock,
            DeviceKind::Door => pb::DeviceKind::Door,
        }
    }
}

impl TryFrom<pb::EventKind> for EventKind {
    type Error = UnknownValue;
    fn try_from(kind: pb::EventKind) -> Result<Self, Self::Error> {
        Ok(match kind {
            pb::EventKind::Armed => EventKind::Armed,
            pb::EventKind::Disarmed => EventKind::Disarmed,
            pb::EventKind::ArmRefused => EventKind::ArmRefused,
            pb::EventKind::DisarmRefused => EventKind::DisarmRefused,
            pb::EventKind::Duress => EventKind::Duress,
            pb::EventKind::AccessGranted => EventKind::AccessGranted,
            pb::EventKind::AccessDenied => EventKind::AccessDenied,
            pb::EventKind::Lockdown => EventKind::Lockdown,
            pb::EventKind::LockdownReleased => EventKind::LockdownReleased,
            pb::EventKind::Drift => EventKind::Drift,
            pb::EventKind::LocalCodeCleared => EventKind::LocalCodeCleared,
            // Slot-status transitions are raised by keyplaned itself (docs/STATUS.md):
            // they decode, but `EventKind::device_logged` keeps agents from sending one.
            pb::EventKind::SetOnDevice => EventKind::SetOnDevice,
            pb::EventKind::RemovedFromDevice => EventKind::RemovedFromDevice,
            pb::EventKind::FailedToSetOnDevice => EventKind::FailedToSetOnDevice,
            pb::EventKind::FailedToRemoveFromDevice => EventKind::FailedToRemoveFromDevice,
            pb::EventKind::DelayInSettingOnDevice => EventKind::DelayInSettingOnDevice,
            pb::EventKind::DelayInRemovingFromDevice => EventKind::DelayInRemovingFromDevice,
            pb::EventKind::ModifiedAtDevice => EventKind::ModifiedAtDevice,
            pb::EventKind::WithheldOnDevice => EventKind::WithheldOnDevice,
            pb::EventKind::SlotIssueCleared => EventKind::SlotIssueCleared,
            pb::EventKind::SlotIssueRaised => EventKind::SlotIssueRaised,
            pb::EventKind::ClockSkew => EventKind::ClockSkew,
            pb::EventKind::ClockSkewCleared => EventKind::ClockSkewCleared,
            pb::EventKind::Unspecified => {
                return Err(UnknownValue {
                    what: "event kind",
                    value: kind as i32,
                });
            }
        })
    }
}

impl From<EventKind> for pb::EventKind {
    fn from(kind: EventKind) -> Self {
        match kind {
            EventKind::Armed => pb::EventKind::Armed,
            EventKind::Disarmed => pb::EventKind::Disarmed,
            EventKind::ArmRefused => pb::EventKind::ArmRefused,
            EventKind::DisarmRefused => pb::EventKind::DisarmRefused,
            EventKind::Duress => pb::EventKind::Duress,
            EventKind::AccessGranted => pb::EventKind::AccessGranted,
            EventKind::AccessDenied => pb::EventKind::AccessDenied,
            EventKind::Lockdown => pb::EventKind::Lockdown,
            EventKind::LockdownReleased => pb::EventKind::LockdownReleased,
            EventKind::Drift => pb::EventKind::Drift,
            EventKind::LocalCodeCleared => pb::EventKind::LocalCodeCleared,
            EventKind::SetOnDevice => pb::EventKind::SetOnDevice,
            EventKind::RemovedFromDevice => pb::EventKind::RemovedFromDevice,
            EventKind::FailedToSetOnDevice => pb::EventKind::FailedToSetOnDevice,
            EventKind::FailedToRemoveFromDevice => pb::EventKind::FailedToRemoveFromDevice,
            EventKind::DelayInSettingOnDevice => pb::EventKind::DelayInSettingOnDevice,
            EventKind::DelayInRemovingFromDevice => pb::EventKind::DelayInRemovingFromDevice,
            EventKind::ModifiedAtDevice => pb::EventKind::ModifiedAtDevice,
            EventKind::WithheldOnDevice => pb::EventKind::WithheldOnDevice,
            EventKind::SlotIssueCleared => pb::EventKind::SlotIssueCleared,
            EventKind::SlotIssueRaised => pb::EventKind::SlotIssueRaised,
            EventKind::ClockSkew => pb::EventKind::ClockSkew,
            EventKind::ClockSkewCleared => pb::EventKind::ClockSkewCleared,
        }
    }
}

impl TryFrom<pb::ObservedState> for SlotFinding {
    type Error = UnknownValue;
    fn try_from(state: pb::ObservedState) -> Result<Self, Self::Error> {
        Ok(match state {
            pb::ObservedState::Managed => SlotFinding::Managed,
            pb::ObservedState::Unverifiable => SlotFinding::Unverifiable,
            pb::ObservedState::Drifted => SlotFinding::Drifted,
            pb::ObservedState::Missing => SlotFinding::Missing,
            pb::ObservedState::Foreign => SlotFinding::Foreign,
            pb::ObservedState::Conflict => SlotFinding::Conflict,
            pb::ObservedState::Unspecified => {
                return Err(UnknownValue {
                    what: "observed slot state",
                    value: state as i32,
                });
            }
        })
    }
}

impl From<SlotFinding> for pb::ObservedState {
    fn from(finding: SlotFinding) -> Self {
        match finding {
            SlotFinding::Managed => pb::ObservedState::Managed,
            SlotFinding::Unverifiable => pb::ObservedState::Unverifiable,
            SlotFinding::Drifted => pb::ObservedState::Drifted,
            SlotFinding::Missing => pb::ObservedState::Missing,
            SlotFinding::Foreign => pb::ObservedState::Foreign,
            SlotFinding::Conflict => pb::ObservedState::Conflict,
        }
    }
}

/// A partition number, 1..=8; anything else is `None`.
pub fn partition(value: i32) -> Option<u8> {
    u8::try_from(value)
        .ok()
        .filter(|n| (1..=MAX_PARTITIONS).contains(n))
}

/// Why a list of partition levels was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityWireError {
    /// A partition outside 1..=8.
    #[error("[{index}]: partition {value} is outside 1..={MAX_PARTITIONS}")]
    Partition {
        /// Position in the list.
        index: usize,
        /// The number received.
        value: i32,
    },
    /// A level unset or unknown.
    #[error("[{index}]: level {value} is not a known level")]
    Level {
        /// Position in the list.
        index: usize,
        /// The enum value received.
        value: i32,
    },
    /// A partition listed twice: a user has one level per partition.
    #[error("partition {partition} is listed twice; a user has one level per partition")]
    Duplicate {
        /// The partition.
        partition: u8,
    },
}

/// Decodes a user's levels: each partition 1..=8 once, each level set and known.
pub fn authorities(items: &[pb::PartitionAuthority]) -> Result<Authorities, AuthorityWireError> {
    let mut out = Authorities::new();
    for (index, a) in items.iter().enumerate() {
        let partition = partition(a.partition).ok_or(AuthorityWireError::Partition {
            index,
            value: a.partition,
        })?;
        let level = decode::<pb::Level, Level>(a.level, "level").map_err(|_| {
            AuthorityWireError::Level {
                index,
                value: a.level,
            }
        })?;
        if out.insert(partition, level).is_some() {
            return Err(AuthorityWireError::Duplicate { partition });
        }
    }
    Ok(out)
}

/// A user's levels on the wire, in partition order.
pub fn authorities_pb(authorities: &Authorities) -> Vec<pb::PartitionAuthority> {
    authorities
        .iter()
        .map(|(p, l)| pb::PartitionAuthority {
            partition: i32::from(*p),
            level: pb::Level::from(*l) as i32,
        })
        .collect()
}

/// Why a protobuf timestamp is not an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InstantError {
    /// Negative nanoseconds.
    #[error("has negative nanos")]
    NegativeNanos,
    /// Nanoseconds of a second or more, or seconds beyond what a date holds.
    #[error("is out of range")]
    OutOfRange,
}

/// A protobuf timestamp as an instant. Nanos must be 0..1e9 (the protobuf rule: no
/// leap-second reading), seconds within what a date holds.
pub fn instant(t: &prost_types::Timestamp) -> Result<DateTime<Utc>, InstantError> {
    let nanos = u32::try_from(t.nanos).map_err(|_| InstantError::NegativeNanos)?;
    if nanos >= 1_000_000_000 {
        return Err(InstantError::OutOfRange);
    }
    DateTime::from_timestamp(t.seconds, nanos).ok_or(InstantError::OutOfRange)
}

/// An instant as a protobuf timestamp.
pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// Why a schedule was refused. Paths are relative to the schedule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleWireError {
    /// A window names a day that is not a day of the week (unspecified or unknown).
    #[error("windows[{window}].days has an unknown day ({value})")]
    Day {
        /// Position of the window.
        window: usize,
        /// The enum value received.
        value: i32,
    },
    /// A window time is not `HH:MM` within the day.
    #[error("windows[{window}].{field}: {error}")]
    Time {
        /// Position of the window.
        window: usize,
        /// `start_time` or `end_time`.
        field: &'static str,
        /// Why.
        error: ScheduleError,
    },
    /// `valid_from` or `valid_until` is not a date.
    #[error("{field} {value:?} is not a date YYYY-MM-DD")]
    Date {
        /// `valid_from` or `valid_until`.
        field: &'static str,
        /// The text received.
        value: String,
    },
    /// A paused date is not a date.
    #[error("paused_dates[{index}] {value:?} is not a date YYYY-MM-DD")]
    PausedDate {
        /// Position in `paused_dates`.
        index: usize,
        /// The text received.
        value: String,
    },
    /// Read, but breaks a schedule rule (a window with no day, an empty window, a
    /// date range backwards).
    #[error("{0}")]
    Invalid(ScheduleError),
}

fn date(field: &'static str, value: &str) -> Result<Option<NaiveDate>, ScheduleWireError> {
    if value.is_empty() {
        return Ok(None);
    }
    NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .map(Some)
        .map_err(|_| ScheduleWireError::Date {
            field,
            value: value.to_owned(),
        })
}

impl TryFrom<&pb::Schedule> for Schedule {
    type Error = ScheduleWireError;
    fn try_from(s: &pb::Schedule) -> Result<Self, Self::Error> {
        let mut windows = Vec::with_capacity(s.windows.len());
        for (window, w) in s.windows.iter().enumerate() {
            let mut days = 0u8;
            for d in &w.days {
                let day = decode::<pb::DayOfWeek, Weekday>(*d, "day of the week")
                    .map_err(|_| ScheduleWireError::Day { window, value: *d })?;
                days |= day_bit(day);
            }
            let time = |field: &'static str, v: &str| {
                parse_time(v).map_err(|error| ScheduleWireError::Time {
                    window,
                    field,
                    error,
                })
            };
            windows.push(Window {
                days,
                start: time("start_time", &w.start_time)?,
                end: time("end_time", &w.end_time)?,
            });
        }
        let paused_dates = s
            .paused_dates
            .iter()
            .enumerate()
            .map(|(index, d)| {
                NaiveDate::parse_from_str(d, "%Y-%m-%d").map_err(|_| {
                    ScheduleWireError::PausedDate {
                        index,
                        value: d.clone(),
                    }
                })
            })
            .collect::<Result<_, _>>()?;
        let schedule = Schedule {
            windows,
            valid_from: date("valid_from", &s.valid_from)?,
            valid_until: date("valid_until", &s.valid_until)?,
            paused_dates,
        };
        schedule.validate().map_err(ScheduleWireError::Invalid)?;
        Ok(schedule)
    }
}

impl From<&Schedule> for pb::Schedule {
    fn from(s: &Schedule) -> Self {
        const WEEK: [Weekday; 7] = [
            Weekday::Mon,
            Weekday::Tue,
            Weekday::Wed,
            Weekday::Thu,
            Weekday::Fri,
            Weekday::Sat,
            Weekday::Sun,
        ];
        pb::Schedule {
            windows: s
                .windows
                .iter()
                .map(|w| pb::TimeWindow {
                    days: WEEK
                        .iter()
                        .filter(|d| w.days & day_bit(**d) != 0)
                        .map(|d| pb::DayOfWeek::from(*d) as i32)
                        .collect(),
                    start_time: format_time(w.start),
                    end_time: format_time(w.end),
                })
                .collect(),
            valid_from: s.valid_from.map(|d| d.to_string()).unwrap_or_default(),
            valid_until: s.valid_until.map(|d| d.to_string()).unwrap_or_default(),
            paused_dates: s.paused_dates.iter().map(|d| d.to_string()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(days: Vec<i32>, start: &str, end: &str) -> pb::TimeWindow {
        pb::TimeWindow {
            days,
            start_time: start.into(),
            end_time: end.into(),
        }
    }

    fn weekdays() -> pb::Schedule {
        pb::Schedule {
            windows: vec![window((1..=5).collect(), "08:00", "18:00")],
            ..Default::default()
        }
    }

    #[test]
    fn schedule_rules_table() {
        let with = |change: &dyn Fn(&mut pb::Schedule)| {
            let mut s = weekdays();
            change(&mut s);
            s
        };
        // (what, wire schedule, the refusal or None when it reads)
        let cases: Vec<(&str, pb::Schedule, Option<ScheduleWireError>)> = vec![
            ("weekdays", weekdays(), None),
            ("no windows: never open", pb::Schedule::default(), None),
            (
                "every day, overnight",
                with(&|s| s.windows = vec![window((1..=7).collect(), "22:00", "06:00")]),
                None,
            ),
            (
                "dates and paused dates",
                with(&|s| {
                    s.valid_from = "2026-01-01".into();
                    s.valid_until = "2026-12-31".into();
                    s.paused_dates = vec!["2026-12-25".into()];
                }),
                None,
            ),
            (
                "unknown weekday 8 is refused, not dropped",
                with(&|s| s.windows[0].days.push(8)),
                Some(ScheduleWireError::Day {
                    window: 0,
                    value: 8,
                }),
            ),
            (
                "unspecified weekday is refused",
                with(&|s| s.windows[0].days = vec![0]),
                Some(ScheduleWireError::Day {
                    window: 0,
                    value: 0,
                }),
            ),
            (
                "negative weekday is refused",
                with(&|s| s.windows[0].days = vec![-1]),
                Some(ScheduleWireError::Day {
                    window: 0,
                    value: -1,
                }),
            ),
            (
                "a window with no day",
                with(&|s| s.windows[0].days.clear()),
                Some(ScheduleWireError::Invalid(ScheduleError::NoDays(0))),
            ),
            (
                "time not HH:MM",
                with(&|s| s.windows[0].end_time = "6pm".into()),
                Some(ScheduleWireError::Time {
                    window: 0,
                    field: "end_time",
                    error: ScheduleError::Time("6pm".into()),
                }),
            ),
            (
                "empty window",
                with(&|s| s.windows[0].end_time = "08:00".into()),
                Some(ScheduleWireError::Invalid(ScheduleError::Empty(0))),
            ),
            (
                "date not YYYY-MM-DD",
                with(&|s| s.valid_until = "31/12/2026".into()),
                Some(ScheduleWireError::Date {
                    field: "valid_until",
                    value: "31/12/2026".into(),
                }),
            ),
            (
                "date range backwards",
                with(&|s| {
                    s.valid_from = "2026-12-31".into();
                    s.valid_until = "2026-01-01".into();
                }),
                Some(ScheduleWireError::Invalid(ScheduleError::DateRange)),
            ),
            (
                "paused date unreadable",
                with(&|s| s.paused_dates = vec!["2026-12-25".into(), "Christmas".into()]),
                Some(ScheduleWireError::PausedDate {
                    index: 1,
                    value: "Christmas".into(),
                }),
            ),
        ];
        for (what, wire, want) in cases {
            let got = Schedule::try_from(&wire);
            match want {
                None => {
                    let s = got.unwrap_or_else(|e| panic!("{what}: {e}"));
                    // What reads encodes back to the same wire value.
                    assert_eq!(pb::Schedule::from(&s), wire, "{what}");
                }
                Some(want) => assert_eq!(got, Err(want), "{what}"),
            }
        }
    }

    #[test]
    fn weekday_table() {
        let table = [
            (1, Some(Weekday::Mon)),
            (2, Some(Weekday::Tue)),
            (3, Some(Weekday::Wed)),
            (4, Some(Weekday::Thu)),
            (5, Some(Weekday::Fri)),
            (6, Some(Weekday::Sat)),
            (7, Some(Weekday::Sun)),
            (0, None),
            (8, None),
            (-7, None),
        ];
        for (wire, want) in table {
            let got = decode::<pb::DayOfWeek, Weekday>(wire, "day of the week").ok();
            assert_eq!(got, want, "{wire}");
            if let Some(day) = want {
                assert_eq!(pb::DayOfWeek::from(day) as i32, wire);
            }
        }
    }

    #[test]
    fn level_table() {
        let table = [
            (0, None),
            (1, Some(Level::Installer)),
            (2, Some(Level::Master)),
            (3, Some(Level::Manager)),
            (4, Some(Level::OperatorA)),
            (5, Some(Level::OperatorB)),
            (6, Some(Level::OperatorC)),
            (7, Some(Level::Duress)),
            (8, None),
            (-1, None),
        ];
        for (wire, want) in table {
            assert_eq!(
                decode::<pb::Level, Level>(wire, "level").ok(),
                want,
                "{wire}"
            );
            if let Some(level) = want {
                assert_eq!(pb::Level::from(level) as i32, wire);
            }
        }
    }

    #[test]
    fn device_kind_table() {
        let table = [
            (0, None),
            (1, Some(DeviceKind::Panel)),
            (2, Some(DeviceKind::Lock)),
            (3, Some(DeviceKind::Door)),
            (4, None),
        ];
        for (wire, want) in table {
            let got = decode::<pb::DeviceKind, DeviceKind>(wire, "device kind").ok();
            assert_eq!(got, want, "{wire}");
            if let Some(kind) = want {
                assert_eq!(pb::DeviceKind::from(kind) as i32, wire);
            }
        }
    }

    #[test]
    fn event_kind_round_trips_and_refuses_unknown() {
        for kind in EventKind::ALL {
            let wire = pb::EventKind::from(kind) as i32;
            assert_ne!(wire, 0, "{kind}");
            assert_eq!(
                decode::<pb::EventKind, EventKind>(wire, "event kind"),
                Ok(kind)
            );
        }
        for wire in [0, 999, -1] {
            assert!(decode::<pb::EventKind, EventKind>(wire, "event kind").is_err());
        }
    }

    #[test]
    fn authorities_table() {
        let a = |partition, level| pb::PartitionAuthority { partition, level };
        type Want = Result<Vec<(u8, Level)>, AuthorityWireError>;
        let cases: Vec<(&str, Vec<pb::PartitionAuthority>, Want)> = vec![
            ("none", vec![], Ok(vec![])),
            (
                "two partitions",
                vec![a(8, 6), a(1, 2)],
                Ok(vec![(1, Level::Master), (8, Level::OperatorC)]),
            ),
            (
                "partition 0",
                vec![a(0, 2)],
                Err(AuthorityWireError::Partition { index: 0, value: 0 }),
            ),
            (
                "partition 9",
                vec![a(1, 2), a(9, 2)],
                Err(AuthorityWireError::Partition { index: 1, value: 9 }),
            ),
            (
                "partition beyond a byte",
                vec![a(257, 2)],
                Err(AuthorityWireError::Partition {
                    index: 0,
                    value: 257,
                }),
            ),
            (
                "unset level",
                vec![a(1, 0)],
                Err(AuthorityWireError::Level { index: 0, value: 0 }),
            ),
            (
                "level from a newer peer",
                vec![a(1, 2), a(2, 42)],
                Err(AuthorityWireError::Level {
                    index: 1,
                    value: 42,
                }),
            ),
            (
                "partition twice",
                vec![a(3, 2), a(3, 4)],
                Err(AuthorityWireError::Duplicate { partition: 3 }),
            ),
        ];
        for (what, wire, want) in cases {
            let got = authorities(&wire).map(|m| m.into_iter().collect::<Vec<_>>());
            assert_eq!(got, want, "{what}");
            if let Ok(levels) = got {
                let back = authorities_pb(&levels.into_iter().collect());
                let again = authorities(&back).expect("round trip");
                assert_eq!(authorities_pb(&again), back, "{what}");
            }
        }
    }

    #[test]
    fn instant_table() {
        let t = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
        let cases = [
            (t(1_800_000_000, 500), Ok(())),
            (t(0, 0), Ok(())),
            (t(1_800_000_000, -1), Err(InstantError::NegativeNanos)),
            (
                t(1_800_000_000, 1_000_000_000),
                Err(InstantError::OutOfRange),
            ),
            (
                t(1_799_999_999, 1_500_000_000),
                Err(InstantError::OutOfRange),
            ),
            (t(i64::MAX, 0), Err(InstantError::OutOfRange)),
            (t(i64::MIN, 0), Err(InstantError::OutOfRange)),
        ];
        for (wire, want) in cases {
            let got = instant(&wire);
            assert_eq!(got.map(|_| ()), want, "{wire:?}");
            if let Ok(at) = got {
                assert_eq!(timestamp(at), wire);
            }
        }
    }

    #[test]
    fn partition_table() {
        for (wire, want) in [(0, None), (1, Some(1)), (8, Some(8)), (9, None), (-1, None)] {
            assert_eq!(partition(wire), want, "{wire}");
        }
    }
}

// ---------------------------------------------------------------------------
// Slot assignment status (docs/STATUS.md): core decisions to wire, and the agent's
// write reports from wire.
// ---------------------------------------------------------------------------

use keyplane_core::status::{
    Issue, IssueCode, PendingChange, Refusal, Rollup, SiteRollup, SlotIssue, SlotState, SlotStatus,
    WithheldReason, WriteOutcome,
};

impl From<SlotStatus> for pb::SlotStatus {
    fn from(s: SlotStatus) -> Self {
        match s {
            SlotStatus::Setting => pb::SlotStatus::Setting,
            SlotStatus::Set => pb::SlotStatus::Set,
            SlotStatus::Removing => pb::SlotStatus::Removing,
            SlotStatus::Unset => pb::SlotStatus::Unset,
            SlotStatus::Withheld => pb::SlotStatus::Withheld,
            SlotStatus::Unknown => pb::SlotStatus::Unknown,
        }
    }
}

impl From<IssueCode> for pb::SlotIssueCode {
    fn from(c: IssueCode) -> Self {
        match c {
            IssueCode::FailedToSetOnDevice => pb::SlotIssueCode::FailedToSetOnDevice,
            IssueCode::FailedToRemoveFromDevice => pb::SlotIssueCode::FailedToRemoveFromDevice,
            IssueCode::DuplicateCodeOnDevice => pb::SlotIssueCode::DuplicateCodeOnDevice,
            IssueCode::NoSpaceOnDevice => pb::SlotIssueCode::NoSpaceOnDevice,
            IssueCode::CodeModifiedAtDevice => pb::SlotIssueCode::CodeModifiedAtDevice,
            IssueCode::LocalCodeConflict => pb::SlotIssueCode::LocalCodeConflict,
            IssueCode::StateUnconfirmed => pb::SlotIssueCode::StateUnconfirmed,
            IssueCode::DeviceOffline => pb::SlotIssueCode::DeviceOffline,
            IssueCode::AgentDisconnected => pb::SlotIssueCode::AgentDisconnected,
            IssueCode::PanelArmedProgrammingDeferred => {
                pb::SlotIssueCode::PanelArmedProgrammingDeferred
            }
            IssueCode::RevocationUnconfirmed => pb::SlotIssueCode::RevocationUnconfirmed,
            IssueCode::DelayInSetting => pb::SlotIssueCode::DelayInSetting,
            IssueCode::DelayInRemoving => pb::SlotIssueCode::DelayInRemoving,
        }
    }
}

fn withheld_pb(w: &WithheldReason, set_time: Option<DateTime<Utc>>) -> pb::Withheld {
    let reason = match w {
        WithheldReason::NotAnAccessPoint => pb::WithheldReason::NotAnAccessPoint,
        WithheldReason::OutsideSchedule { .. } => pb::WithheldReason::OutsideSchedule,
        WithheldReason::BeforeValidity { .. } => pb::WithheldReason::BeforeValidity,
        WithheldReason::AfterValidity => pb::WithheldReason::AfterValidity,
        WithheldReason::Lockdown => pb::WithheldReason::Lockdown,
    };
    pb::Withheld {
        reason: reason as i32,
        set_time: set_time.map(timestamp),
    }
}

fn schedule_set(s: &Option<Vec<Schedule>>) -> Option<pb::ScheduleSet> {
    s.as_ref().map(|list| pb::ScheduleSet {
        schedules: list.iter().map(pb::Schedule::from).collect(),
    })
}

fn pending_pb(p: &PendingChange) -> pb::PendingChange {
    let mut out = pb::PendingChange::default();
    out.kind = match p {
        PendingChange::Creating => pb::PendingChangeKind::Creating,
        PendingChange::DeferredCreation { at } => {
            out.at_time = Some(timestamp(*at));
            pb::PendingChangeKind::DeferredCreation
        }
        PendingChange::UpdatingCode => pb::PendingChangeKind::UpdatingCode,
        PendingChange::UpdatingSchedule { from, to } => {
            out.from_schedules = schedule_set(from);
            out.to_schedules = schedule_set(to);
            pb::PendingChangeKind::UpdatingSchedule
        }
        PendingChange::UpdatingSettings => pb::PendingChangeKind::UpdatingSettings,
        PendingChange::Removing => pb::PendingChangeKind::Removing,
    } as i32;
    out
}

fn issue_pb(i: &SlotIssue, kind: DeviceKind) -> pb::SlotIssue {
    let mut out = pb::SlotIssue {
        code: pb::SlotIssueCode::from(i.code()) as i32,
        severity: match i.severity() {
            keyplane_core::status::Severity::Error => pb::IssueSeverity::Error,
            keyplane_core::status::Severity::Warning => pb::IssueSeverity::Warning,
        } as i32,
        create_time: Some(timestamp(i.since)),
        detail: i.detail(kind),
        ..Default::default()
    };
    match &i.issue {
        Issue::FailedToSetOnDevice { reason } | Issue::FailedToRemoveFromDevice { reason } => {
            out.device_reason = reason.clone();
        }
        Issue::CodeModifiedAtDevice { slot, cleared } => {
            out.slot = i32::from(*slot);
            out.display_slot = kind.display_slot(*slot);
            out.cleared = *cleared;
        }
        Issue::LocalCodeConflict { local_slot } => {
            out.slot = i32::from(*local_slot);
            out.display_slot = kind.display_slot(*local_slot);
        }
        Issue::PanelArmedProgrammingDeferred { partition } => {
            out.partition = i32::from(*partition);
        }
        _ => {}
    }
    out
}

/// The wire status of one slot assignment of a `kind` device named `device`.
pub fn slot_state_pb(
    device: String,
    slot: u16,
    kind: DeviceKind,
    state: &SlotState,
) -> pb::SlotAssignmentStatus {
    let set_time = state.pending.iter().find_map(|p| match p {
        PendingChange::DeferredCreation { at } => Some(*at),
        _ => None,
    });
    pb::SlotAssignmentStatus {
        device,
        slot: i32::from(slot),
        display_slot: kind.display_slot(slot),
        status: pb::SlotStatus::from(state.status) as i32,
        withheld: state.withheld.as_ref().map(|w| withheld_pb(w, set_time)),
        pending_changes: state.pending.iter().map(pending_pb).collect(),
        errors: state.errors().map(|i| issue_pb(i, kind)).collect(),
        warnings: state.warnings().map(|i| issue_pb(i, kind)).collect(),
        credential: String::new(),
    }
}

fn count(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// A roll-up as wire counts.
pub fn rollup_pb(r: &Rollup) -> pb::SlotStatusCounts {
    pb::SlotStatusCounts {
        total: count(r.total),
        set: count(r.set),
        pending: count(r.pending),
        withheld: count(r.withheld),
        failed: count(r.failed),
        unset: count(r.unset),
        unknown: count(r.unknown),
    }
}

/// A site roll-up to wire.
pub fn site_rollup_pb(r: &SiteRollup) -> pb::SiteSlotRollup {
    pb::SiteSlotRollup {
        counts: Some(rollup_pb(&r.slots)),
        issues: r
            .issues
            .iter()
            .map(|(code, n)| pb::SlotIssueCount {
                code: pb::SlotIssueCode::from(*code) as i32,
                count: count(*n),
            })
            .collect(),
    }
}

/// Why a write report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteReportError {
    /// The outcome is unspecified or unknown.
    #[error("outcome {0} is not a write outcome")]
    Outcome(i32),
    /// A deferred write names no partition 1..=8.
    #[error("partition {0} is not a partition")]
    Partition(i32),
}

/// A write report's outcome as core's; the device's reason is kept as sent (the
/// agent keeps PINs out of it).
pub fn write_outcome(r: &pb::SlotWriteReport) -> Result<WriteOutcome, WriteReportError> {
    Ok(match pb::WriteOutcome::try_from(r.outcome) {
        Ok(pb::WriteOutcome::Done) => WriteOutcome::Done,
        Ok(pb::WriteOutcome::RefusedDuplicate) => WriteOutcome::Refused(Refusal::Duplicate),
        Ok(pb::WriteOutcome::RefusedNoSpace) => WriteOutcome::Refused(Refusal::NoSpace),
        Ok(pb::WriteOutcome::Refused) => {
            WriteOutcome::Refused(Refusal::Other(r.device_reason.clone()))
        }
        Ok(pb::WriteOutcome::Unconfirmed) => WriteOutcome::Unconfirmed,
        Ok(pb::WriteOutcome::DeferredArmed) => WriteOutcome::DeferredArmed {
            partition: partition(r.partition).ok_or(WriteReportError::Partition(r.partition))?,
        },
        _ => return Err(WriteReportError::Outcome(r.outcome)),
    })
}

// ---------------------------------------------------------------------------
// Device constraints (docs/STATUS.md): reported constraints both ways, published
// capacity.
// ---------------------------------------------------------------------------

use keyplane_core::constraints::{CodeRule, DeviceConstraints, ReportedConstraints, SlotCapacity};

impl From<CodeRule> for pb::CodeRule {
    fn from(r: CodeRule) -> Self {
        match r {
            CodeRule::NoRepeatedDigit => pb::CodeRule::NoRepeatedDigit,
            CodeRule::NoStraightRun => pb::CodeRule::NoStraightRun,
            CodeRule::NoAdjacentRepeat => pb::CodeRule::NoAdjacentRepeat,
        }
    }
}

/// Why reported constraints were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportedWireError {
    /// A number does not fit its field.
    #[error("{0} is out of range")]
    OutOfRange(&'static str),
    /// A code rule is unspecified or unknown.
    #[error("code_rules: {0} is not a code rule")]
    Rule(i32),
}

/// Reported constraints from the wire; zero / unreported fields stay None.
pub fn reported_constraints(
    r: &pb::ReportedConstraints,
) -> Result<ReportedConstraints, ReportedWireError> {
    fn opt<T: TryFrom<i32>>(v: i32, what: &'static str) -> Result<Option<T>, ReportedWireError> {
        if v == 0 {
            return Ok(None);
        }
        T::try_from(v)
            .map(Some)
            .map_err(|_| ReportedWireError::OutOfRange(what))
    }
    Ok(ReportedConstraints {
        first_slot: opt(r.first_slot, "first_slot")?,
        last_slot: opt(r.last_slot, "last_slot")?,
        reserved_slots: if r.reserved_slots_reported {
            Some(
                r.reserved_slots
                    .iter()
                    .map(|s| {
                        u16::try_from(*s)
                            .map_err(|_| ReportedWireError::OutOfRange("reserved_slots"))
                    })
                    .collect::<Result<_, _>>()?,
            )
        } else {
            None
        },
        min_code_length: opt(r.min_code_length, "min_code_length")?,
        max_code_length: opt(r.max_code_length, "max_code_length")?,
        reads_back: r.reads_back_reported.then_some(r.reads_back),
        keeps_schedules: r.keeps_schedules_reported.then_some(r.keeps_schedules),
        rules: if r.code_rules_reported {
            Some(
                r.code_rules
                    .iter()
                    .map(|v| match pb::CodeRule::try_from(*v) {
                        Ok(pb::CodeRule::NoRepeatedDigit) => Ok(CodeRule::NoRepeatedDigit),
                        Ok(pb::CodeRule::NoStraightRun) => Ok(CodeRule::NoStraightRun),
                        Ok(pb::CodeRule::NoAdjacentRepeat) => Ok(CodeRule::NoAdjacentRepeat),
                        _ => Err(ReportedWireError::Rule(*v)),
                    })
                    .collect::<Result<_, _>>()?,
            )
        } else {
            None
        },
    })
}

/// Reported constraints to the wire (what an agent sends).
pub fn reported_constraints_pb(r: &ReportedConstraints) -> pb::ReportedConstraints {
    pb::ReportedConstraints {
        first_slot: r.first_slot.map(i32::from).unwrap_or(0),
        last_slot: r.last_slot.map(i32::from).unwrap_or(0),
        reserved_slots: r
            .reserved_slots
            .iter()
            .flatten()
            .map(|s| i32::from(*s))
            .collect(),
        reserved_slots_reported: r.reserved_slots.is_some(),
        min_code_length: r.min_code_length.map(i32::from).unwrap_or(0),
        max_code_length: r.max_code_length.map(i32::from).unwrap_or(0),
        reads_back: r.reads_back.unwrap_or(false),
        reads_back_reported: r.reads_back.is_some(),
        keeps_schedules: r.keeps_schedules.unwrap_or(false),
        keeps_schedules_reported: r.keeps_schedules.is_some(),
        code_rules: r
            .rules
            .iter()
            .flatten()
            .map(|c| pb::CodeRule::from(*c) as i32)
            .collect(),
        code_rules_reported: r.rules.is_some(),
    }
}

/// A device's published capacity.
pub fn capacity_pb(c: &DeviceConstraints, slots: &SlotCapacity) -> pb::DeviceCapacity {
    let n = |v: usize| i32::try_from(v).unwrap_or(i32::MAX);
    pb::DeviceCapacity {
        slots_total: n(slots.total),
        slots_used: n(slots.used),
        slots_free: n(slots.free),
        reads_back: c.reads_back,
        code_rules: c
            .rules
            .iter()
            .map(|r| pb::CodeRule::from(*r) as i32)
            .collect(),
        source: if c.reported {
            pb::ConstraintSource::Reported
        } else {
            pb::ConstraintSource::Profile
        } as i32,
    }
}
