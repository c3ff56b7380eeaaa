//! Reading a device's event log across resets.
//!
//! keyplaned stores an event once per `(device, epoch, seq)`. A device numbers its log
//! from 1, and starts again from 1 when it is replaced, reset or its counter wraps:
//! read with the old epoch, every new event would look like one already stored and be
//! dropped, duress included. The agent keeps an *anchor*, the last event it read, and
//! each read starts at the anchor: if the device no longer holds that event as it was
//! (or holds nothing from there on), the log restarted and gets a new epoch.
//!
//! The epoch of a log is derived from its first event, not counted, so an agent whose
//! state was lost names the same log the same way and re-sends nothing as new.

use crate::EventKind;

/// One event of a device's log, as far as telling logs apart is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EventMark {
    /// Sequence number in the device's log.
    pub seq: u64,
    /// Hash of everything the device said about the event (never a code: devices
    /// log user numbers only).
    pub fingerprint: u64,
}

impl EventMark {
    /// The mark of an event with these fields.
    pub fn of(
        seq: u64,
        kind: EventKind,
        partition: Option<u8>,
        slot: Option<u16>,
        at_unix_ms: i64,
    ) -> EventMark {
        // FNV-1a: stable across builds and platforms (the mark is journaled).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(&seq.to_le_bytes());
        eat(kind.as_str().as_bytes());
        eat(&[0xff]);
        eat(&partition.map_or([0, 0], |p| [1, p]));
        eat(&slot.map_or([0, 0, 0], |s| {
            let [a, b] = s.to_le_bytes();
            [1, a, b]
        }));
        eat(&at_unix_ms.to_le_bytes());
        EventMark {
            seq,
            fingerprint: h,
        }
    }
}

/// Whether the log read now is the one the anchor came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuity {
    /// The same log: events after the anchor are new.
    Continues,
    /// Another log (reset, replaced, wrapped): read it from its start, with a new epoch.
    Restarted,
}

/// Judges a read that started at the anchor (`read` holds the events from the anchor's
/// sequence number on, oldest first). Without an anchor there is nothing to compare.
pub fn continuity(anchor: Option<EventMark>, read: &[EventMark]) -> Continuity {
    let Some(anchor) = anchor else {
        return Continuity::Continues;
    };
    if let Some(same_seq) = read.iter().find(|m| m.seq == anchor.seq) {
        return if same_seq.fingerprint == anchor.fingerprint {
            Continuity::Continues
        } else {
            Continuity::Restarted
        };
    }
    match read.iter().map(|m| m.seq).min() {
        // A log drops its oldest events only to make room for newer ones: the anchor
        // is gone and nothing came after it, so this is another, shorter log.
        None => Continuity::Restarted,
        // The anchor was pushed out of a full log by newer events.
        Some(first) if first > anchor.seq => Continuity::Continues,
        Some(_) => Continuity::Restarted,
    }
}

/// The epoch naming a log whose oldest held event is `first`: never 0 (the epoch of
/// logs read before epochs existed) nor `previous`, and at most `i64::MAX` (stored in
/// a `bigint`).
pub fn epoch_of(first: EventMark, previous: u64) -> u64 {
    let epoch = (first.fingerprint & (i64::MAX as u64)).max(1);
    if epoch == previous {
        // Practically never: two logs whose first events hash alike.
        (epoch % (i64::MAX as u64)) + 1
    } else {
        epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(seq: u64, at: i64) -> EventMark {
        EventMark::of(seq, EventKind::Armed, Some(1), Some(3), at)
    }

    #[test]
    fn a_read_from_the_anchor_tells_one_log_from_another() {
        let anchor = mark(5, 1_000);
        let cases: &[(&str, Option<EventMark>, Vec<EventMark>, Continuity)] = &[
            (
                "no anchor yet",
                None,
                vec![mark(1, 1)],
                Continuity::Continues,
            ),
            ("no anchor, empty log", None, vec![], Continuity::Continues),
            (
                "anchor held, nothing new",
                Some(anchor),
                vec![anchor],
                Continuity::Continues,
            ),
            (
                "anchor held, new events after it",
                Some(anchor),
                vec![anchor, mark(6, 1_001), mark(7, 1_002)],
                Continuity::Continues,
            ),
            (
                "reset log grew past the anchor's number: same seq, other event",
                Some(anchor),
                vec![mark(5, 9_000), mark(6, 9_001)],
                Continuity::Restarted,
            ),
            (
                "reset log shorter than the anchor's number",
                Some(anchor),
                vec![],
                Continuity::Restarted,
            ),
            (
                "anchor pushed out of a full log by newer events",
                Some(anchor),
                vec![mark(9, 1_004), mark(10, 1_005)],
                Continuity::Continues,
            ),
            (
                "device answers with numbers below the anchor",
                Some(anchor),
                vec![mark(2, 9_000), mark(3, 9_001)],
                Continuity::Restarted,
            ),
        ];
        for (what, anchor, read, want) in cases {
            assert_eq!(continuity(*anchor, read), *want, "{what}");
        }
    }

    #[test]
    fn marks_differ_in_every_field() {
        let base = EventMark::of(4, EventKind::Armed, Some(1), Some(3), 77);
        let others = [
            EventMark::of(5, EventKind::Armed, Some(1), Some(3), 77),
            EventMark::of(4, EventKind::Disarmed, Some(1), Some(3), 77),
            EventMark::of(4, EventKind::Armed, Some(2), Some(3), 77),
            EventMark::of(4, EventKind::Armed, None, Some(3), 77),
            EventMark::of(4, EventKind::Armed, Some(1), Some(4), 77),
            EventMark::of(4, EventKind::Armed, Some(1), None, 77),
            EventMark::of(4, EventKind::Armed, Some(1), Some(3), 78),
        ];
        for other in others {
            assert_ne!(base.fingerprint, other.fingerprint, "{other:?}");
        }
        assert_eq!(
            base,
            EventMark::of(4, EventKind::Armed, Some(1), Some(3), 77)
        );
    }

    #[test]
    fn epochs_are_stable_positive_and_new() {
        let first = mark(1, 1_000);
        let epoch = epoch_of(first, 0);
        assert!(epoch >= 1 && epoch <= i64::MAX as u64);
        assert_eq!(epoch, epoch_of(first, 0), "the same log is named alike");
        assert_ne!(epoch, epoch_of(mark(1, 2_000), 0));
        assert_ne!(epoch_of(first, epoch), epoch, "never the previous epoch");
        let zero = EventMark {
            seq: 1,
            fingerprint: 1 << 63,
        };
        assert_eq!(epoch_of(zero, 0), 1, "never 0");
        let top = EventMark {
            seq: 1,
            fingerprint: u64::MAX,
        };
        assert_eq!(epoch_of(top, i64::MAX as u64), 1);
    }
}
