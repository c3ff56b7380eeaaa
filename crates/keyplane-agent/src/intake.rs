//! Reading a desired slot from keyplaned into a journal [`Code`], or refusing it.
//!
//! Pure. Every field that limits access (validity instants, schedules, panel levels)
//! must be read exactly, by the same rules keyplaned reads them
//! (`keyplane_proto::convert`); a value this agent cannot read refuses the code on
//! that device. Guessing would widen access: an unreadable end read as "no end" never
//! expires, a dropped level writes a panel code with whatever the panel defaults to.

use crate::journal::Code;
use chrono::{DateTime, Utc};
use keyplane_core::names::MAX_PARTITIONS;
use keyplane_core::schedule::Schedule;
use keyplane_proto::convert::{self as wire, AuthorityWireError};
use keyplane_proto::v1 as pb;

/// Why a desired code cannot be read. Names fields and positions, never the code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    /// The slot names a credential but carries no code.
    #[error("the slot names a credential but carries no code")]
    NoPin,
    /// A validity instant is out of range or malformed.
    #[error("{field} is not an instant this agent can read")]
    Instant {
        /// `valid_from_time` or `valid_until_time`.
        field: &'static str,
    },
    /// A panel level this agent does not know.
    #[error("authorities[{index}]: level {level} is not a level this agent knows")]
    Level {
        /// Position in `authorities`.
        index: usize,
        /// The enum value received.
        level: i32,
    },
    /// A partition outside 1..=8.
    #[error("authorities[{index}]: partition {partition} is outside 1..={MAX_PARTITIONS}")]
    Partition {
        /// Position in `authorities`.
        index: usize,
        /// The number received.
        partition: i32,
    },
    /// A partition listed twice: which level applies cannot be told.
    #[error("authorities: partition {partition} is listed twice")]
    DuplicatePartition {
        /// The partition.
        partition: u8,
    },
    /// A schedule this agent cannot read.
    #[error("schedules[{index}]: {reason}")]
    Schedule {
        /// Position in `schedules`.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// The code keyplaned wants in `slot`: `Ok(None)` when the slot must be empty,
/// `Err` when the code cannot be read exactly (it must then not be on the device).
pub fn read_slot(slot: &pb::DesiredSlot) -> Result<Option<Code>, Unreadable> {
    if slot.credential.is_empty() {
        return Ok(None);
    }
    if slot.pin.is_empty() {
        return Err(Unreadable::NoPin);
    }
    let authorities = wire::authorities(&slot.authorities)
        .map_err(Unreadable::from)?
        .into_iter()
        .enumerate()
        .map(|(index, (partition, level))| {
            u8::try_from(level.number())
                .map(|number| (partition, number))
                .map_err(|_| Unreadable::Level {
                    index,
                    level: pb::Level::from(level) as i32,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Scheduled with no schedule is never open; a schedule that cannot be read
    // refuses the code on this device: it is never written without its restriction.
    let schedules = if slot.scheduled {
        Some(
            slot.schedules
                .iter()
                .enumerate()
                .map(|(index, s)| {
                    Schedule::try_from(s).map_err(|e| Unreadable::Schedule {
                        index,
                        reason: e.to_string(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        )
    } else {
        None
    };
    Ok(Some(Code {
        credential: slot.credential.clone(),
        pin: slot.pin.clone(),
        authorities,
        open_close: slot.open_close_reporting,
        schedules,
        // The site's zone, not the slot's: set where the code is written.
        time_zone: String::new(),
        valid_from: instant(slot.valid_from_time.as_ref(), "valid_from_time")?,
        valid_until: instant(slot.valid_until_time.as_ref(), "valid_until_time")?,
        generation: slot.write_generation,
    }))
}

impl From<AuthorityWireError> for Unreadable {
    fn from(e: AuthorityWireError) -> Self {
        match e {
            AuthorityWireError::Partition { index, value } => Unreadable::Partition {
                index,
                partition: value,
            },
            AuthorityWireError::Level { index, value } => Unreadable::Level {
                index,
                level: value,
            },
            AuthorityWireError::Duplicate { partition } => {
                Unreadable::DuplicatePartition { partition }
            }
        }
    }
}

/// An optional instant: absent is `None` (no bound), unreadable is an error.
fn instant(
    t: Option<&prost_types::Timestamp>,
    field: &'static str,
) -> Result<Option<DateTime<Utc>>, Unreadable> {
    t.map(|t| wire::instant(t).map_err(|_| Unreadable::Instant { field }))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyplane_core::authority::Level;

    const PIN: &str = "73915";

    fn ts(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos })
    }

    fn panel_code() -> pb::DesiredSlot {
        pb::DesiredSlot {
            device: "sites/s/devices/p".into(),
            slot: 3,
            credential: "sites/s/users/u/credentials/c".into(),
            pin: PIN.into(),
            authorities: vec![pb::PartitionAuthority {
                partition: 1,
                level: pb::Level::Master as i32,
            }],
            ..Default::default()
        }
    }

    fn weekdays() -> pb::Schedule {
        pb::Schedule {
            windows: vec![pb::TimeWindow {
                days: (1..=5).collect(),
                start_time: "08:00".into(),
                end_time: "18:00".into(),
            }],
            ..Default::default()
        }
    }

    fn with(change: impl Fn(&mut pb::DesiredSlot)) -> pb::DesiredSlot {
        let mut slot = panel_code();
        change(&mut slot);
        slot
    }

    fn scheduled(s: pb::Schedule) -> impl Fn(&mut pb::DesiredSlot) {
        move |slot| {
            slot.scheduled = true;
            slot.schedules = vec![weekdays(), s.clone()];
        }
    }

    #[test]
    fn unreadable_values_refuse_the_code_never_widen_it() {
        let bad_window = |w: pb::TimeWindow| pb::Schedule {
            windows: vec![w],
            ..Default::default()
        };
        let window = pb::TimeWindow {
            days: vec![1],
            start_time: "08:00".into(),
            end_time: "18:00".into(),
        };
        let cases: Vec<(&str, pb::DesiredSlot, Unreadable)> = vec![
            ("no code", with(|s| s.pin.clear()), Unreadable::NoPin),
            (
                "end beyond what a date holds",
                with(|s| s.valid_until_time = ts(i64::MAX, 0)),
                Unreadable::Instant {
                    field: "valid_until_time",
                },
            ),
            (
                "end with negative nanos",
                with(|s| s.valid_until_time = ts(1_800_000_000, -1)),
                Unreadable::Instant {
                    field: "valid_until_time",
                },
            ),
            (
                "end with a second's worth of nanos",
                with(|s| s.valid_until_time = ts(1_800_000_000, 1_000_000_000)),
                Unreadable::Instant {
                    field: "valid_until_time",
                },
            ),
            (
                "start before what a date holds",
                with(|s| s.valid_from_time = ts(i64::MIN, 0)),
                Unreadable::Instant {
                    field: "valid_from_time",
                },
            ),
            (
                "unspecified level",
                with(|s| s.authorities[0].level = 0),
                Unreadable::Level { index: 0, level: 0 },
            ),
            (
                "level from a newer keyplaned",
                with(|s| {
                    s.authorities.push(pb::PartitionAuthority {
                        partition: 2,
                        level: 42,
                    })
                }),
                Unreadable::Level {
                    index: 1,
                    level: 42,
                },
            ),
            (
                "negative level",
                with(|s| s.authorities[0].level = -3),
                Unreadable::Level {
                    index: 0,
                    level: -3,
                },
            ),
            (
                "partition twice",
                with(|s| {
                    s.authorities.push(pb::PartitionAuthority {
                        partition: 1,
                        level: pb::Level::OperatorA as i32,
                    })
                }),
                Unreadable::DuplicatePartition { partition: 1 },
            ),
            (
                "partition 0",
                with(|s| s.authorities[0].partition = 0),
                Unreadable::Partition {
                    index: 0,
                    partition: 0,
                },
            ),
            (
                "partition 9",
                with(|s| s.authorities[0].partition = 9),
                Unreadable::Partition {
                    index: 0,
                    partition: 9,
                },
            ),
            (
                "partition beyond a byte",
                with(|s| s.authorities[0].partition = 257),
                Unreadable::Partition {
                    index: 0,
                    partition: 257,
                },
            ),
            (
                "day 8",
                with(scheduled(bad_window(pb::TimeWindow {
                    days: vec![8],
                    ..window.clone()
                }))),
                Unreadable::Schedule {
                    index: 1,
                    reason: "windows[0].days has an unknown day (8)".into(),
                },
            ),
            (
                "day 0",
                with(scheduled(bad_window(pb::TimeWindow {
                    days: vec![0],
                    ..window.clone()
                }))),
                Unreadable::Schedule {
                    index: 1,
                    reason: "windows[0].days has an unknown day (0)".into(),
                },
            ),
            (
                "time not HH:MM",
                with(scheduled(bad_window(pb::TimeWindow {
                    end_time: "6pm".into(),
                    ..window.clone()
                }))),
                Unreadable::Schedule {
                    index: 1,
                    reason: "windows[0].end_time: \"6pm\" is not a time of day HH:MM".into(),
                },
            ),
            (
                "date not YYYY-MM-DD",
                with(scheduled(pb::Schedule {
                    valid_until: "31/12/2026".into(),
                    ..weekdays()
                })),
                Unreadable::Schedule {
                    index: 1,
                    reason: "valid_until \"31/12/2026\" is not a date YYYY-MM-DD".into(),
                },
            ),
            (
                "paused date unreadable",
                with(scheduled(pb::Schedule {
                    paused_dates: vec!["2026-12-25".into(), "Christmas".into()],
                    ..weekdays()
                })),
                Unreadable::Schedule {
                    index: 1,
                    reason: "paused_dates[1] \"Christmas\" is not a date YYYY-MM-DD".into(),
                },
            ),
        ];
        for (what, slot, want) in cases {
            let got = read_slot(&slot);
            assert_eq!(got.as_ref().err(), Some(&want), "{what}");
            assert!(!want.to_string().contains(PIN), "{what}: {want}");
        }
    }

    #[test]
    fn readable_values_are_kept_exactly() {
        let until = DateTime::from_timestamp(1_800_000_000, 500).expect("instant");
        let from = DateTime::from_timestamp(1_700_000_000, 0).expect("instant");
        let code = read_slot(&with(|s| {
            s.valid_until_time = ts(1_800_000_000, 500);
            s.valid_from_time = ts(1_700_000_000, 0);
            s.authorities.push(pb::PartitionAuthority {
                partition: 8,
                level: pb::Level::OperatorC as i32,
            });
            s.open_close_reporting = true;
            s.write_generation = 4;
        }))
        .expect("readable")
        .expect("a code");
        assert_eq!(code.pin, PIN);
        assert_eq!(code.valid_until, Some(until));
        assert_eq!(code.valid_from, Some(from));
        assert_eq!(
            code.authorities,
            vec![
                (1, Level::Master.number() as u8),
                (8, Level::OperatorC.number() as u8)
            ]
        );
        assert!(code.open_close);
        assert_eq!(code.generation, 4);
        assert_eq!(code.schedules, None, "not scheduled: always");
        // Scheduled with no schedule: never open (a cleared plan), not always.
        let never = read_slot(&with(|s| s.scheduled = true))
            .expect("readable")
            .expect("a code");
        assert_eq!(never.schedules, Some(vec![]));
        let two = read_slot(&with(scheduled(weekdays())))
            .expect("readable")
            .expect("a code");
        assert_eq!(two.schedules.map(|s| s.len()), Some(2));
        // No credential: the slot must be empty.
        assert_eq!(read_slot(&with(|s| s.credential.clear())), Ok(None));
    }
}
