//! Reading a desired slot from keyplaned into a journal [`Code`], or refusing it.
//!
//! Pure. Every field that limits access (validity instants, schedules, panel levels)
//! must be read exactly; a value this agent cannot read refuses the code on that
//! device. Guessing would widen access: an unreadable end read as "no end" never
//! expires, a dropped level writes a panel code with whatever the panel defaults to.

use crate::journal::Code;
use chrono::{DateTime, Utc};
use keyplane_core::authority::Level;
use keyplane_core::names::MAX_PARTITIONS;
use keyplane_core::schedule::{Schedule, Window, day_bit, parse_time};
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
    let authorities =
        slot.authorities
            .iter()
            .enumerate()
            .map(|(index, a)| {
                let partition = u8::try_from(a.partition)
                    .ok()
                    .filter(|p| (1..=MAX_PARTITIONS).contains(p))
                    .ok_or(Unreadable::Partition {
                        index,
                        partition: a.partition,
                    })?;
                // Level enum values are the panel level + 1 (0 is unspecified).
                let level = a.level.checked_sub(1).and_then(Level::from_number).ok_or(
                    Unreadable::Level {
                        index,
                        level: a.level,
                    },
                )?;
                let number = u8::try_from(level.number()).map_err(|_| Unreadable::Level {
                    index,
                    level: a.level,
                })?;
                Ok((partition, number))
            })
            .collect::<Result<Vec<_>, _>>()?;
    let schedules = if slot.scheduled {
        Some(
            slot.schedules
                .iter()
                .enumerate()
                .map(|(index, s)| {
                    schedule_of(s).map_err(|reason| Unreadable::Schedule { index, reason })
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

/// An optional instant: absent is `None` (no bound), unreadable is an error.
fn instant(
    t: Option<&prost_types::Timestamp>,
    field: &'static str,
) -> Result<Option<DateTime<Utc>>, Unreadable> {
    let Some(t) = t else { return Ok(None) };
    u32::try_from(t.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
        .map(Some)
        .ok_or(Unreadable::Instant { field })
}

fn schedule_of(s: &pb::Schedule) -> Result<Schedule, String> {
    let mut windows = Vec::new();
    for (i, w) in s.windows.iter().enumerate() {
        let mut days = 0u8;
        for d in &w.days {
            // DayOfWeek: MONDAY = 1 .. SUNDAY = 7.
            let day = u8::try_from(*d)
                .ok()
                .and_then(|n| n.checked_sub(1))
                .and_then(|n| chrono::Weekday::try_from(n).ok())
                .ok_or_else(|| format!("window {i}: day {d} is not a day of the week"))?;
            days |= day_bit(day);
        }
        let time = |v: &str, field: &str| {
            parse_time(v).map_err(|_| format!("window {i}: {field} is not HH:MM"))
        };
        windows.push(Window {
            days,
            start: time(&w.start_time, "start_time")?,
            end: time(&w.end_time, "end_time")?,
        });
    }
    let date = |v: &str, field: &str| {
        if v.is_empty() {
            Ok(None)
        } else {
            chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d")
                .map(Some)
                .map_err(|_| format!("{field} is not YYYY-MM-DD"))
        }
    };
    let schedule = Schedule {
        windows,
        valid_from: date(&s.valid_from, "valid_from")?,
        valid_until: date(&s.valid_until, "valid_until")?,
        paused_dates: s
            .paused_dates
            .iter()
            .map(|d| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d"))
            .collect::<Result<_, _>>()
            .map_err(|_| "paused_dates holds a date that is not YYYY-MM-DD".to_owned())?,
    };
    schedule.validate().map_err(|e| e.to_string())?;
    Ok(schedule)
}

#[cfg(test)]
mod tests {
    use super::*;

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
                    reason: "window 0: day 8 is not a day of the week".into(),
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
                    reason: "window 0: day 0 is not a day of the week".into(),
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
                    reason: "window 0: end_time is not HH:MM".into(),
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
                    reason: "valid_until is not YYYY-MM-DD".into(),
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
                    reason: "paused_dates holds a date that is not YYYY-MM-DD".into(),
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
