//! Reconnect backoff: exponential, capped, with jitter, reset after a healthy session.

use std::time::Duration;

/// Exponential backoff with "equal jitter": each delay is half the current step plus
/// a random part of the other half, so agents of many sites do not reconnect in step
/// after a server restart.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    step: Duration,
}

impl Backoff {
    /// Starts at `base`, doubling up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            step: base,
        }
    }

    /// The next delay; `random` is a uniform value in 0..=u64::MAX.
    pub fn next_with(&mut self, random: u64) -> Duration {
        let half = self.step / 2;
        let fraction = random as f64 / u64::MAX as f64;
        let delay = half + half.mul_f64(fraction);
        self.step = (self.step * 2).min(self.cap);
        delay
    }

    /// The next delay with OS randomness.
    pub fn next_delay(&mut self) -> Duration {
        let mut bytes = [0u8; 8];
        // Without randomness the delay is still bounded; only the spread is lost.
        let _ = getrandom::fill(&mut bytes);
        self.next_with(u64::from_le_bytes(bytes))
    }

    /// Back to the base step (after a healthy session).
    pub fn reset(&mut self) {
        self.step = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_bounds_and_reset() {
        let base = Duration::from_millis(200);
        let cap = Duration::from_secs(30);
        let mut b = Backoff::new(base, cap);
        let mut step = base;
        for i in 0..20 {
            for random in [0, u64::MAX / 2, u64::MAX] {
                let mut probe = b.clone();
                let d = probe.next_with(random);
                assert!(
                    d >= step / 2 && d <= step,
                    "attempt {i}: {d:?} outside {step:?}/2..={step:?}"
                );
            }
            b.next_with(0);
            step = (step * 2).min(cap);
        }
        // Capped: the largest delay never exceeds the cap.
        assert!(b.clone().next_with(u64::MAX) <= cap);
        assert_eq!(b.clone().next_with(0), cap / 2);
        b.reset();
        assert!(b.next_with(u64::MAX) <= base);
    }
}
