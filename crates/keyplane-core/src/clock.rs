//! Whether a site agent's clock can be trusted: the skew between the wall time an
//! agent reports in Hello and keyplaned's own clock, classified against a threshold,
//! and the events a change of that classification raises.
//!
//! The agent enforces schedule windows and validity periods on its own clock (also
//! offline), so a site whose clock is wrong opens and closes codes off time. keyplaned
//! cannot fix the site's clock; it says so (`clock_skew` in GetSyncStatus and an event
//! when it starts and when it ends). `docs/STATUS.md` has the vocabulary.

use std::time::Duration;

/// Skew beyond which an agent's clock is flagged, unless keyplaned is told otherwise
/// (`--clock-skew-threshold-secs`). Well above network latency and NTP slewing, well
/// below the granularity of schedule windows (minutes).
pub const DEFAULT_SKEW_THRESHOLD: Duration = Duration::from_secs(30);

/// What one Hello says about the agent's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockCheck {
    /// The agent did not report its clock (it speaks an older protocol).
    NotReported,
    /// Within the threshold; the skew in milliseconds (agent minus keyplaned).
    InSync {
        /// Agent clock minus keyplaned's clock, milliseconds.
        skew_ms: i64,
    },
    /// Beyond the threshold; the skew in milliseconds (agent minus keyplaned).
    Skewed {
        /// Agent clock minus keyplaned's clock, milliseconds.
        skew_ms: i64,
    },
}

impl ClockCheck {
    /// Whether the clock is flagged.
    pub fn skewed(self) -> bool {
        matches!(self, ClockCheck::Skewed { .. })
    }

    /// The measured skew, when the agent reported its clock.
    pub fn skew_ms(self) -> Option<i64> {
        match self {
            ClockCheck::NotReported => None,
            ClockCheck::InSync { skew_ms } | ClockCheck::Skewed { skew_ms } => Some(skew_ms),
        }
    }
}

/// Classifies the agent's reported wall time (`agent_ms`, Unix milliseconds; None when
/// not reported) against keyplaned's clock when the Hello arrived (`server_ms`). A
/// skew exactly at the threshold is still in sync; ahead and behind count alike.
pub fn classify(agent_ms: Option<i64>, server_ms: i64, threshold: Duration) -> ClockCheck {
    let Some(agent_ms) = agent_ms else {
        return ClockCheck::NotReported;
    };
    let skew_ms = agent_ms.saturating_sub(server_ms);
    let limit = i64::try_from(threshold.as_millis()).unwrap_or(i64::MAX);
    if skew_ms.unsigned_abs() > limit.unsigned_abs() {
        ClockCheck::Skewed { skew_ms }
    } else {
        ClockCheck::InSync { skew_ms }
    }
}

/// A change of the flag between two checks, raised as an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockTransition {
    /// The agent's clock became skewed (`clock_skew`).
    SkewRaised,
    /// A skewed clock came back within the threshold, or is no longer reported
    /// (`clock_skew_cleared`): nothing measured, nothing flagged.
    SkewCleared,
}

/// The event between the previous flag (`was_skewed`) and the new check, if any.
pub fn transition(was_skewed: bool, now: ClockCheck) -> Option<ClockTransition> {
    match (was_skewed, now.skewed()) {
        (false, true) => Some(ClockTransition::SkewRaised),
        (true, false) => Some(ClockTransition::SkewCleared),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_table() {
        let t = DEFAULT_SKEW_THRESHOLD;
        let server = 1_700_000_000_000;
        // agent time (offset from server, ms; None: not reported), threshold, expected
        let table: [(Option<i64>, Duration, ClockCheck); 9] = [
            (None, t, ClockCheck::NotReported),
            (Some(0), t, ClockCheck::InSync { skew_ms: 0 }),
            (Some(250), t, ClockCheck::InSync { skew_ms: 250 }),
            (Some(-250), t, ClockCheck::InSync { skew_ms: -250 }),
            (Some(30_000), t, ClockCheck::InSync { skew_ms: 30_000 }),
            (Some(30_001), t, ClockCheck::Skewed { skew_ms: 30_001 }),
            (Some(-30_001), t, ClockCheck::Skewed { skew_ms: -30_001 }),
            (
                Some(-3_600_000),
                t,
                ClockCheck::Skewed {
                    skew_ms: -3_600_000,
                },
            ),
            (
                Some(5_000),
                Duration::from_secs(2),
                ClockCheck::Skewed { skew_ms: 5_000 },
            ),
        ];
        for (offset, threshold, want) in table {
            let got = classify(offset.map(|o| server + o), server, threshold);
            assert_eq!(got, want, "offset {offset:?}, threshold {threshold:?}");
            assert_eq!(got.skew_ms(), offset);
        }
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        let got = classify(Some(i64::MIN), i64::MAX, DEFAULT_SKEW_THRESHOLD);
        assert!(got.skewed());
        let got = classify(Some(0), 0, Duration::MAX);
        assert_eq!(got, ClockCheck::InSync { skew_ms: 0 });
    }

    #[test]
    fn transition_table() {
        use ClockTransition::*;
        let in_sync = ClockCheck::InSync { skew_ms: 10 };
        let skewed = ClockCheck::Skewed { skew_ms: 90_000 };
        // was skewed, now, event
        let table = [
            (false, in_sync, None),
            (false, skewed, Some(SkewRaised)),
            (false, ClockCheck::NotReported, None),
            (true, skewed, None),
            (true, in_sync, Some(SkewCleared)),
            (true, ClockCheck::NotReported, Some(SkewCleared)),
        ];
        for (was, now, want) in table {
            assert_eq!(transition(was, now), want, "was skewed {was}, now {now:?}");
        }
    }
}
