//! Weekly access schedules in a site's time zone (seed 001).
//!
//! A schedule is a set of weekly windows in local wall-clock time, with an optional
//! date range. It is evaluated on the local wall clock: on the spring-forward day a
//! 01:30-02:30 window closes when the clock jumps from 02:00 to 03:00 (30 real
//! minutes); on the fall-back day a 02:15-02:45 window is open during both passes
//! of the repeated hour. A window whose end is not after its start crosses midnight
//! into the next day, and belongs to the day it starts on.

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, Timelike, Utc, Weekday};
use chrono_tz::Tz;

/// Minutes in a day; a window may end at 24:00.
pub const DAY_MINUTES: u16 = 24 * 60;

/// One weekly window: on the given days, from `start` to `end` local time.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    /// Days the window starts on: bit 0 Monday .. bit 6 Sunday.
    pub days: u8,
    /// Start, minutes after local midnight (0..1440).
    pub start: u16,
    /// End, minutes after local midnight (1..=1440); not after `start`: next day.
    pub end: u16,
}

/// Weekly windows with an optional date range. No windows: never open.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    /// The windows; access is their union.
    pub windows: Vec<Window>,
    /// First local date a window may start on.
    pub valid_from: Option<NaiveDate>,
    /// Last local date a window may start on.
    pub valid_until: Option<NaiveDate>,
    /// Local dates on which no window starts (holidays pausing the plan).
    #[serde(default)]
    pub paused_dates: Vec<NaiveDate>,
}

/// Why a schedule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// A window names no day.
    #[error("window {0} names no day of the week")]
    NoDays(usize),
    /// A window time is outside the day.
    #[error("window {0}: times must be within 00:00..24:00")]
    OutOfDay(usize),
    /// A window starts and ends at the same time.
    #[error("window {0} starts and ends at the same time")]
    Empty(usize),
    /// valid_from is after valid_until.
    #[error("valid_from is after valid_until")]
    DateRange,
    /// Not an IANA time zone.
    #[error("{0:?} is not an IANA time zone name")]
    TimeZone(String),
    /// A malformed time of day.
    #[error("{0:?} is not a time of day HH:MM")]
    Time(String),
}

/// Bit of `day` in [`Window::days`].
pub fn day_bit(day: Weekday) -> u8 {
    1 << day.num_days_from_monday()
}

/// Parses `HH:MM` (00:00..24:00) into minutes after midnight.
pub fn parse_time(s: &str) -> Result<u16, ScheduleError> {
    let err = || ScheduleError::Time(s.to_owned());
    let (h, m) = s.split_once(':').ok_or_else(err)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(err());
    }
    let (h, m): (u16, u16) = (h.parse().map_err(|_| err())?, m.parse().map_err(|_| err())?);
    let minutes = h * 60 + m;
    if m >= 60 || minutes > DAY_MINUTES {
        return Err(err());
    }
    Ok(minutes)
}

/// Formats minutes after midnight as `HH:MM`.
pub fn format_time(minutes: u16) -> String {
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

/// Parses an IANA time zone name.
pub fn parse_time_zone(name: &str) -> Result<Tz, ScheduleError> {
    name.parse::<Tz>()
        .map_err(|_| ScheduleError::TimeZone(name.to_owned()))
}

impl Schedule {
    /// Checks every window and the date range.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        for (i, w) in self.windows.iter().enumerate() {
            if w.days & 0x7f == 0 {
                return Err(ScheduleError::NoDays(i));
            }
            if w.start >= DAY_MINUTES || w.end == 0 || w.end > DAY_MINUTES {
                return Err(ScheduleError::OutOfDay(i));
            }
            if w.start == w.end {
                return Err(ScheduleError::Empty(i));
            }
        }
        if let (Some(from), Some(until)) = (self.valid_from, self.valid_until)
            && from > until
        {
            return Err(ScheduleError::DateRange);
        }
        Ok(())
    }

    fn in_range(&self, day: NaiveDate) -> bool {
        self.valid_from.is_none_or(|f| day >= f)
            && self.valid_until.is_none_or(|u| day <= u)
            && !self.paused_dates.contains(&day)
    }

    /// Whether access is open at local wall-clock time `local`.
    pub fn is_open_local(&self, local: NaiveDateTime) -> bool {
        let today = local.date();
        let minute = u16::try_from(local.hour() * 60 + local.minute()).unwrap_or(0);
        let yesterday = today.pred_opt();
        self.windows.iter().any(|w| {
            let crosses = w.end <= w.start;
            let starts_today = w.days & day_bit(today.weekday()) != 0 && self.in_range(today);
            let open_today = if crosses {
                minute >= w.start
            } else {
                minute >= w.start && minute < w.end
            };
            let from_yesterday = crosses
                && minute < w.end
                && yesterday
                    .is_some_and(|y| w.days & day_bit(y.weekday()) != 0 && self.in_range(y));
            (starts_today && open_today) || from_yesterday
        })
    }

    /// Whether access is open at instant `at` in time zone `tz`.
    pub fn is_open(&self, tz: Tz, at: DateTime<Utc>) -> bool {
        self.is_open_local(at.with_timezone(&tz).naive_local())
    }
}

impl Schedule {
    /// The first instant at or after `after` at which the schedule is open, looking at
    /// most a year ahead (None: it never opens again within that). A window whose
    /// local start falls in a spring-forward gap opens when the wall clock reaches it;
    /// a start in the repeated fall-back hour opens at its first pass.
    pub fn next_open(&self, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.is_open(tz, after) {
            return Some(after);
        }
        let today = after.with_timezone(&tz).date_naive();
        let first = match self.valid_from {
            Some(from) if from > today => from,
            _ => today,
        };
        let mut best: Option<DateTime<Utc>> = None;
        for day in first.iter_days().take(NEXT_OPEN_HORIZON_DAYS) {
            if best.is_some_and(|b| b.with_timezone(&tz).date_naive() < day) {
                break;
            }
            if !self.in_range(day) {
                continue;
            }
            for w in &self.windows {
                if w.days & day_bit(day.weekday()) == 0 {
                    continue;
                }
                let Some(start) = local_instant(tz, day, w.start) else {
                    continue;
                };
                if start > after && self.is_open(tz, start) && best.is_none_or(|b| start < b) {
                    best = Some(start);
                }
            }
        }
        best
    }
}

/// How far [`Schedule::next_open`] looks ahead.
const NEXT_OPEN_HORIZON_DAYS: usize = 366;

/// The instant local `minutes` after midnight of `day` happen in `tz`: the first
/// pass of a repeated hour, or the end of a skipped one.
fn local_instant(tz: Tz, day: NaiveDate, minutes: u16) -> Option<DateTime<Utc>> {
    use chrono::{LocalResult, TimeZone};
    let midnight = day.and_hms_opt(0, 0, 0)?;
    // A DST gap is at most a few hours; step over it a minute at a time.
    (0..=240).find_map(|extra| {
        let local = midnight + chrono::Duration::minutes(i64::from(minutes) + extra);
        match tz.from_local_datetime(&local) {
            LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
            LocalResult::Ambiguous(first, _) => Some(first.with_timezone(&Utc)),
            LocalResult::None => None,
        }
    })
}

/// The first instant at or after `after` at which any of `schedules` is open.
pub fn any_next_open(
    schedules: &[Schedule],
    tz: Tz,
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    schedules
        .iter()
        .filter_map(|s| s.next_open(tz, after))
        .min()
}

/// Access granted by several plans is their union: open while any is open.
pub fn any_open(schedules: &[Schedule], tz: Tz, at: DateTime<Utc>) -> bool {
    schedules.iter().any(|s| s.is_open(tz, at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const WEEKDAYS: u8 = 0b001_1111;

    fn window(days: u8, start: &str, end: &str) -> Window {
        Window {
            days,
            start: parse_time(start).expect("start"),
            end: parse_time(end).expect("end"),
        }
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("rfc3339")
            .with_timezone(&Utc)
    }

    #[test]
    fn time_parsing() {
        assert_eq!(parse_time("08:00"), Ok(480));
        assert_eq!(parse_time("24:00"), Ok(1440));
        for bad in ["8:00", "24:01", "12:60", "ab:cd", "1200", ""] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
        assert_eq!(format_time(1439), "23:59");
    }

    #[test]
    fn office_hours_table() {
        let paris: Tz = parse_time_zone("Europe/Paris").expect("tz");
        let office = Schedule {
            windows: vec![window(WEEKDAYS, "08:00", "18:00")],
            ..Schedule::default()
        };
        // Monday 2026-11-23, Paris is UTC+1.
        let cases = [
            ("2026-11-23T06:59:00Z", false), // 07:59 local
            ("2026-11-23T07:00:00Z", true),  // 08:00
            ("2026-11-23T16:59:59Z", true),  // 17:59:59
            ("2026-11-23T17:00:00Z", false), // 18:00
            ("2026-11-28T10:00:00Z", false), // Saturday
        ];
        for (at, open) in cases {
            assert_eq!(office.is_open(paris, utc(at)), open, "{at}");
        }
    }

    #[test]
    fn crossing_midnight_belongs_to_its_start_day() {
        let night = Schedule {
            windows: vec![window(day_bit(Weekday::Fri), "22:00", "06:00")],
            ..Schedule::default()
        };
        let at = |s: &str| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").expect("datetime");
        let cases = [
            ("2026-11-27 21:59", false), // Friday
            ("2026-11-27 22:00", true),
            ("2026-11-28 05:59", true), // Saturday morning, from Friday
            ("2026-11-28 06:00", false),
            ("2026-11-28 22:30", false), // Saturday night: not a window day
            ("2026-11-26 23:00", false), // Thursday night
        ];
        for (t, open) in cases {
            assert_eq!(night.is_open_local(at(t)), open, "{t}");
        }
    }

    #[test]
    fn daylight_saving_both_ways() {
        let paris: Tz = parse_time_zone("Europe/Paris").expect("tz");
        // Spring forward: Sunday 2026-03-29, 02:00 CET -> 03:00 CEST (01:00Z).
        let spring = Schedule {
            windows: vec![window(day_bit(Weekday::Sun), "01:30", "02:30")],
            ..Schedule::default()
        };
        let cases = [
            ("2026-03-29T00:29:00Z", false), // 01:29 CET
            ("2026-03-29T00:30:00Z", true),  // 01:30 CET
            ("2026-03-29T00:59:00Z", true),  // 01:59 CET
            ("2026-03-29T01:00:00Z", false), // 03:00 CEST: 02:00-02:59 never happened
        ];
        for (at, open) in cases {
            assert_eq!(spring.is_open(paris, utc(at)), open, "spring {at}");
        }
        // Fall back: Sunday 2026-10-25, 03:00 CEST -> 02:00 CET (01:00Z).
        let fall = Schedule {
            windows: vec![window(day_bit(Weekday::Sun), "02:15", "02:45")],
            ..Schedule::default()
        };
        let cases = [
            ("2026-10-25T00:14:00Z", false), // 02:14 CEST
            ("2026-10-25T00:20:00Z", true),  // 02:20 CEST, first pass
            ("2026-10-25T00:50:00Z", false), // 02:50 CEST
            ("2026-10-25T01:20:00Z", true),  // 02:20 CET, second pass
            ("2026-10-25T01:45:00Z", false), // 02:45 CET
        ];
        for (at, open) in cases {
            assert_eq!(fall.is_open(paris, utc(at)), open, "fall {at}");
        }
        // An office window on the spring-forward Monday after is unaffected.
        let office = Schedule {
            windows: vec![window(WEEKDAYS, "08:00", "18:00")],
            ..Schedule::default()
        };
        assert!(
            office.is_open(
                paris,
                Utc.with_ymd_and_hms(2026, 3, 30, 6, 0, 0)
                    .single()
                    .expect("instant")
            )
        );
        assert!(
            !office.is_open(
                paris,
                Utc.with_ymd_and_hms(2026, 3, 30, 5, 59, 0)
                    .single()
                    .expect("instant")
            )
        );
    }

    #[test]
    fn date_range_edges() {
        let d = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").expect("date");
        let weekend = Schedule {
            windows: vec![
                window(0x7f, "00:00", "24:00"),
                window(0x7f, "22:00", "02:00"),
            ],
            valid_from: Some(d("2026-11-27")),
            valid_until: Some(d("2026-11-29")),
            paused_dates: vec![],
        };
        let at = |s: &str| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").expect("datetime");
        let cases = [
            ("2026-11-26 23:59", false),
            ("2026-11-27 00:00", true),
            ("2026-11-29 23:59", true),
            ("2026-11-30 01:00", true), // the crossing window started on the 29th
            ("2026-11-30 02:00", false),
            ("2026-11-30 12:00", false),
        ];
        for (t, open) in cases {
            assert_eq!(weekend.is_open_local(at(t)), open, "{t}");
        }
    }

    #[test]
    fn holidays_pause_and_plans_unite() {
        let d = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").expect("date");
        let paris: Tz = parse_time_zone("Europe/Paris").expect("tz");
        let office = Schedule {
            windows: vec![window(WEEKDAYS, "08:00", "18:00")],
            paused_dates: vec![d("2026-12-25")],
            ..Schedule::default()
        };
        let evenings = Schedule {
            windows: vec![window(0x7f, "18:00", "22:00")],
            ..Schedule::default()
        };
        // Friday 2026-12-25 is a holiday: the office plan does not open.
        assert!(!office.is_open(paris, utc("2026-12-25T09:00:00Z")));
        assert!(office.is_open(paris, utc("2026-12-24T09:00:00Z")));
        let both = [office.clone(), evenings];
        assert!(
            any_open(&both, paris, utc("2026-12-24T09:00:00Z")),
            "office"
        );
        assert!(
            any_open(&both, paris, utc("2026-12-25T18:30:00Z")),
            "evenings, not paused"
        );
        assert!(
            !any_open(&both, paris, utc("2026-12-25T09:00:00Z")),
            "paused office only"
        );
        assert!(
            !any_open(&[], paris, utc("2026-12-24T09:00:00Z")),
            "no plan: never"
        );
    }

    #[test]
    fn next_open_table() {
        let d = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").expect("date");
        let paris: Tz = parse_time_zone("Europe/Paris").expect("tz");
        let office = Schedule {
            windows: vec![window(WEEKDAYS, "08:00", "18:00")],
            paused_dates: vec![d("2026-12-25")],
            ..Schedule::default()
        };
        let spring = Schedule {
            windows: vec![window(day_bit(Weekday::Sun), "02:30", "04:00")],
            ..Schedule::default()
        };
        let later = Schedule {
            windows: vec![window(0x7f, "10:00", "11:00")],
            valid_from: Some(d("2027-02-01")),
            valid_until: Some(d("2027-02-02")),
            ..Schedule::default()
        };
        let ended = Schedule {
            windows: vec![window(0x7f, "10:00", "11:00")],
            valid_until: Some(d("2026-01-01")),
            ..Schedule::default()
        };
        let cases: &[(&str, &Schedule, &str, Option<&str>)] = &[
            (
                "open now",
                &office,
                "2026-11-23T09:00:00Z",
                Some("2026-11-23T09:00:00Z"),
            ),
            (
                "before opening",
                &office,
                "2026-11-23T06:00:00Z",
                Some("2026-11-23T07:00:00Z"),
            ),
            (
                "evening: next morning",
                &office,
                "2026-11-23T18:00:00Z",
                Some("2026-11-24T07:00:00Z"),
            ),
            (
                "friday evening: monday",
                &office,
                "2026-11-27T18:00:00Z",
                Some("2026-11-30T07:00:00Z"),
            ),
            (
                "holiday skipped",
                &office,
                "2026-12-24T18:00:00Z",
                Some("2026-12-28T07:00:00Z"),
            ),
            // 02:30 does not exist on 2026-03-29: the window opens at 03:00 CEST.
            (
                "start in the gap",
                &spring,
                "2026-03-28T12:00:00Z",
                Some("2026-03-29T01:00:00Z"),
            ),
            (
                "date range ahead",
                &later,
                "2026-11-23T12:00:00Z",
                Some("2027-02-01T09:00:00Z"),
            ),
            ("date range over", &ended, "2026-11-23T12:00:00Z", None),
            (
                "no windows",
                &Schedule::default(),
                "2026-11-23T12:00:00Z",
                None,
            ),
        ];
        for (what, schedule, after, want) in cases {
            assert_eq!(
                schedule.next_open(paris, utc(after)),
                want.map(utc),
                "{what}"
            );
        }
        assert_eq!(
            any_next_open(&[office, later], paris, utc("2026-11-23T18:00:00Z")),
            Some(utc("2026-11-24T07:00:00Z"))
        );
    }

    #[test]
    fn validation_table() {
        let ok = window(WEEKDAYS, "08:00", "18:00");
        let cases = [
            (vec![ok.clone()], true),
            (
                vec![Window {
                    days: 0,
                    ..ok.clone()
                }],
                false,
            ),
            (
                vec![Window {
                    start: 1440,
                    ..ok.clone()
                }],
                false,
            ),
            (
                vec![Window {
                    end: 0,
                    ..ok.clone()
                }],
                false,
            ),
            (
                vec![Window {
                    end: 480,
                    ..ok.clone()
                }],
                false,
            ),
            (vec![], true),
        ];
        for (windows, valid) in cases {
            let s = Schedule {
                windows: windows.clone(),
                ..Schedule::default()
            };
            assert_eq!(s.validate().is_ok(), valid, "{windows:?}");
        }
        let d = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").expect("date");
        let backwards = Schedule {
            valid_from: Some(d("2026-12-02")),
            valid_until: Some(d("2026-12-01")),
            ..Schedule::default()
        };
        assert_eq!(backwards.validate(), Err(ScheduleError::DateRange));
        assert!(parse_time_zone("Mars/Olympus").is_err());
        assert!(!Schedule::default().is_open_local(NaiveDateTime::default()));
    }
}
