//! Time for schedules, injectable so tests need not wait for hours.
//!
//! The agent's default clock ([`SteadyClock`]) follows the system's wall clock while
//! it advances as the monotonic clock does, and holds to the monotonic clock when the
//! wall clock jumps: a jump is logged and counted, schedules keep the last trusted
//! offset, and the new wall time is adopted at the next check (the next Hello, which
//! reports it to keyplaned, where a wrong clock is flagged as `clock_skew`) or after
//! [`JUMP_HOLD`] at the latest. `docs/ARCHITECTURE.md` ("Time at the site") says
//! what this means for schedules.

use chrono::{DateTime, TimeDelta, Utc};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the agent reads the time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now, as schedules see it.
    fn now(&self) -> DateTime<Utc>;

    /// The wall clock as the system shows it (reported in Hello); by default [`Clock::now`].
    fn wall(&self) -> DateTime<Utc> {
        self.now()
    }

    /// A check with keyplaned (a Hello is sent): a held wall-clock jump is adopted,
    /// since keyplaned now sees the clock and flags it if wrong.
    fn checkpoint(&self) {}
}

/// The system clock, read as is.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// How far the wall clock may stray from the monotonic clock between two readings
/// before it counts as a jump: well above NTP slewing (0.5 ms/s) over the seconds
/// between reconcile passes, well below the minutes of schedule windows.
pub const JUMP_TOLERANCE: Duration = Duration::from_secs(2);

/// The longest a wall-clock jump is held off without a check: an NTP step that fixes
/// a wrong clock is adopted within this time even if the stream stays up.
pub const JUMP_HOLD: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Anchor {
    /// Trusted wall time at `at`.
    wall: DateTime<Utc>,
    at: Instant,
    /// When a jump began being held (None: the wall clock agrees).
    held_since: Option<Instant>,
}

/// The system wall clock held to the monotonic clock between checks (the agent's
/// default). `offset` shifts the wall clock: a test hook (`--clock-offset-secs`)
/// standing for a site whose clock is wrong.
pub struct SteadyClock {
    offset: TimeDelta,
    source: Box<dyn Fn() -> DateTime<Utc> + Send + Sync>,
    anchor: Mutex<Anchor>,
    jumps: AtomicU64,
}

impl std::fmt::Debug for SteadyClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SteadyClock")
            .field("offset", &self.offset)
            .field("anchor", &self.anchor)
            .field("jumps", &self.jumps)
            .finish_non_exhaustive()
    }
}

impl Default for SteadyClock {
    fn default() -> Self {
        SteadyClock::with_offset(TimeDelta::zero())
    }
}

impl SteadyClock {
    /// The system clock shifted by `offset` (zero in production).
    pub fn with_offset(offset: TimeDelta) -> SteadyClock {
        SteadyClock::with_source(offset, Box::new(Utc::now))
    }

    /// A clock reading its wall time from `source` (tests make it jump).
    pub fn with_source(
        offset: TimeDelta,
        source: Box<dyn Fn() -> DateTime<Utc> + Send + Sync>,
    ) -> SteadyClock {
        let wall = source() + offset;
        SteadyClock {
            offset,
            source,
            anchor: Mutex::new(Anchor {
                wall,
                at: Instant::now(),
                held_since: None,
            }),
            jumps: AtomicU64::new(0),
        }
    }

    /// Wall-clock jumps seen so far.
    pub fn jumps(&self) -> u64 {
        self.jumps.load(Ordering::Relaxed)
    }

    fn adopt(anchor: &mut Anchor, wall: DateTime<Utc>, at: Instant) {
        anchor.wall = wall;
        anchor.at = at;
        anchor.held_since = None;
    }
}

impl Clock for SteadyClock {
    fn now(&self) -> DateTime<Utc> {
        let wall = self.wall();
        let at = Instant::now();
        let mut a = self.anchor.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed =
            TimeDelta::from_std(at.saturating_duration_since(a.at)).unwrap_or(TimeDelta::MAX);
        let projected = a.wall.checked_add_signed(elapsed).unwrap_or(wall);
        let stray = (wall - projected).abs();
        let tolerance = TimeDelta::from_std(JUMP_TOLERANCE).unwrap_or(TimeDelta::MAX);
        if stray <= tolerance {
            // Agrees: follow the wall clock (and its slewing).
            Self::adopt(&mut a, wall, at);
            return wall;
        }
        match a.held_since {
            None => {
                self.jumps.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    jump_ms = (wall - projected).num_milliseconds(),
                    "the system clock jumped: schedules keep the last trusted time until keyplaned next sees the clock (at the latest in {} s)",
                    JUMP_HOLD.as_secs()
                );
                a.held_since = Some(at);
            }
            Some(since) if at.saturating_duration_since(since) >= JUMP_HOLD => {
                tracing::warn!("adopting the jumped system clock after holding it off");
                Self::adopt(&mut a, wall, at);
                return wall;
            }
            Some(_) => {}
        }
        // Keep the anchor: the trusted offset stays, time advances monotonically.
        projected
    }

    fn wall(&self) -> DateTime<Utc> {
        (self.source)() + self.offset
    }

    fn checkpoint(&self) {
        let wall = self.wall();
        let mut a = self.anchor.lock().unwrap_or_else(|e| e.into_inner());
        if a.held_since.is_some() {
            tracing::info!("adopting the jumped system clock: keyplaned sees it in this Hello");
        }
        Self::adopt(&mut a, wall, Instant::now());
    }
}

/// A clock that moves only when told (tests and simulations).
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<DateTime<Utc>>>);

impl ManualClock {
    /// A clock showing `at`.
    pub fn new(at: DateTime<Utc>) -> ManualClock {
        ManualClock(Arc::new(Mutex::new(at)))
    }

    /// Sets the time.
    pub fn set(&self, at: DateTime<Utc>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jumpy(start: DateTime<Utc>) -> (SteadyClock, Arc<Mutex<TimeDelta>>) {
        let jump = Arc::new(Mutex::new(TimeDelta::zero()));
        let j = jump.clone();
        let base = Instant::now();
        // Wall = start + monotonic elapsed + whatever jump the test sets.
        let source = move || {
            let elapsed = TimeDelta::from_std(base.elapsed()).unwrap_or(TimeDelta::MAX);
            start + elapsed + *j.lock().unwrap_or_else(|e| e.into_inner())
        };
        (
            SteadyClock::with_source(TimeDelta::zero(), Box::new(source)),
            jump,
        )
    }

    #[test]
    fn follows_an_agreeing_wall_clock() {
        let start = Utc::now();
        let (clock, _) = jumpy(start);
        let t = clock.now();
        assert!((t - start).abs() < TimeDelta::seconds(1));
        assert_eq!(clock.jumps(), 0);
    }

    #[test]
    fn a_jump_is_held_off_until_the_next_check() {
        let start = Utc::now();
        let (clock, jump) = jumpy(start);
        let _ = clock.now();
        // The system clock is set an hour forward (or back): schedules do not follow.
        for delta in [TimeDelta::hours(1), TimeDelta::hours(-1)] {
            *jump.lock().expect("lock") = delta;
            let t = clock.now();
            assert!((t - Utc::now()).abs() < TimeDelta::seconds(1), "{delta}");
            assert!((clock.wall() - t - delta).abs() < TimeDelta::seconds(1));
            clock.checkpoint();
            // After the check (a Hello reporting it), the new wall time is adopted.
            let t = clock.now();
            assert!(
                (t - Utc::now() - delta).abs() < TimeDelta::seconds(1),
                "{delta}"
            );
            *jump.lock().expect("lock") = TimeDelta::zero();
            clock.checkpoint();
        }
        // One jump counted per held stretch (the second check's reset is not a jump).
        assert_eq!(clock.jumps(), 2);
    }

    #[test]
    fn a_small_step_is_followed() {
        let start = Utc::now();
        let (clock, jump) = jumpy(start);
        let _ = clock.now();
        *jump.lock().expect("lock") = TimeDelta::milliseconds(800);
        let t = clock.now();
        assert!(
            (t - Utc::now() - TimeDelta::milliseconds(800)).abs() < TimeDelta::milliseconds(200)
        );
        assert_eq!(clock.jumps(), 0);
    }

    #[test]
    fn the_offset_shifts_wall_and_now_alike() {
        let clock = SteadyClock::with_offset(TimeDelta::seconds(120));
        let now = Utc::now();
        assert!((clock.wall() - now - TimeDelta::seconds(120)).abs() < TimeDelta::seconds(1));
        assert!((clock.now() - now - TimeDelta::seconds(120)).abs() < TimeDelta::seconds(1));
    }
}
