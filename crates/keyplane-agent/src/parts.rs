//! Snapshots and change sets keyplaned sends in parts (`more_parts`, for agents that
//! set `Hello.accepts_parts`): held here until the last part arrives, so the journal
//! only ever takes a whole one. A stream that ends in between drops what was held
//! ([`Assembly::reset`]) and the next stream starts over from the journal's revision.

use keyplane_proto::v1 as pb;

/// A part that does not continue what was held: keyplaned and agent disagree, and
/// the stream must start over.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("keyplaned sent part {got} of a {kind} at revision {revision} while {expected}")]
pub struct PartError {
    got: i32,
    kind: &'static str,
    revision: i64,
    expected: String,
}

/// The parts received so far of one snapshot or change set.
#[derive(Debug, Default)]
pub struct Assembly {
    held: Option<pb::server_message::Msg>,
    next_part: i32,
}

/// The fields of a part that say where it belongs.
fn key(msg: &pb::server_message::Msg) -> Option<(&'static str, i64, i64, i32, bool)> {
    match msg {
        pb::server_message::Msg::Snapshot(s) => {
            Some(("snapshot", s.revision, 0, s.part, s.more_parts))
        }
        pb::server_message::Msg::Changes(c) => Some((
            "change set",
            c.revision,
            c.from_revision,
            c.part,
            c.more_parts,
        )),
        pb::server_message::Msg::EventAck(_) => None,
    }
}

fn slots(msg: &mut pb::server_message::Msg) -> Option<&mut Vec<pb::DesiredSlot>> {
    match msg {
        pb::server_message::Msg::Snapshot(s) => Some(&mut s.slots),
        pb::server_message::Msg::Changes(c) => Some(&mut c.slots),
        pb::server_message::Msg::EventAck(_) => None,
    }
}

impl Assembly {
    /// Takes a message: a whole one (the last part of one, or one never in parts) is
    /// returned; a part with more to come is held. Event acks pass through.
    pub fn take(
        &mut self,
        mut msg: pb::server_message::Msg,
    ) -> Result<Option<pb::server_message::Msg>, PartError> {
        let Some((kind, revision, from, part, more)) = key(&msg) else {
            return Ok(Some(msg));
        };
        let fits = match &self.held {
            None => part == 0,
            Some(held) => {
                key(held).map(|(k, r, f, _, _)| (k, r, f)) == Some((kind, revision, from))
                    && part == self.next_part
            }
        };
        if !fits {
            let expected = match self.held.as_ref().and_then(key) {
                Some((k, r, _, _, _)) => {
                    format!("part {} of a {k} at revision {r} was due", self.next_part)
                }
                None => "no part was due".to_owned(),
            };
            self.reset();
            return Err(PartError {
                got: part,
                kind,
                revision,
                expected,
            });
        }
        let whole = match self.held.take() {
            None => msg,
            Some(mut held) => {
                if let (Some(all), Some(more_slots)) = (slots(&mut held), slots(&mut msg)) {
                    all.append(more_slots);
                }
                held
            }
        };
        if more {
            self.held = Some(whole);
            self.next_part = part + 1;
            return Ok(None);
        }
        self.next_part = 0;
        Ok(Some(whole))
    }

    /// Drops the parts held (the stream they came on ended).
    pub fn reset(&mut self) {
        self.held = None;
        self.next_part = 0;
    }

    /// Whether parts are held.
    pub fn holding(&self) -> bool {
        self.held.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::server_message::Msg;

    fn slot(n: i32) -> pb::DesiredSlot {
        pb::DesiredSlot {
            device: "sites/s/devices/d".into(),
            slot: n,
            ..Default::default()
        }
    }

    fn snap(revision: i64, part: i32, more: bool, slots: &[i32]) -> Msg {
        Msg::Snapshot(pb::DesiredSnapshot {
            revision,
            part,
            more_parts: more,
            slots: slots.iter().map(|n| slot(*n)).collect(),
            ..Default::default()
        })
    }

    fn changes(from: i64, revision: i64, part: i32, more: bool, slots: &[i32]) -> Msg {
        Msg::Changes(pb::DesiredChanges {
            from_revision: from,
            revision,
            part,
            more_parts: more,
            slots: slots.iter().map(|n| slot(*n)).collect(),
            ..Default::default()
        })
    }

    fn numbers(msg: &Msg) -> Vec<i32> {
        match msg {
            Msg::Snapshot(s) => s.slots.iter().map(|s| s.slot).collect(),
            Msg::Changes(c) => c.slots.iter().map(|s| s.slot).collect(),
            Msg::EventAck(_) => Vec::new(),
        }
    }

    #[test]
    fn parts_are_whole_only_at_the_last_and_in_order() {
        // (messages fed in, slots of what comes out whole after each, error at)
        type Case = (Vec<Msg>, Vec<Option<Vec<i32>>>, Option<usize>);
        let cases: Vec<Case> = vec![
            // One message, never in parts.
            (
                vec![snap(5, 0, false, &[1, 2])],
                vec![Some(vec![1, 2])],
                None,
            ),
            // Three parts.
            (
                vec![
                    snap(5, 0, true, &[1]),
                    snap(5, 1, true, &[2]),
                    snap(5, 2, false, &[3]),
                ],
                vec![None, None, Some(vec![1, 2, 3])],
                None,
            ),
            (
                vec![changes(3, 9, 0, true, &[1]), changes(3, 9, 1, false, &[])],
                vec![None, Some(vec![1])],
                None,
            ),
            // A part skipped.
            (
                vec![snap(5, 0, true, &[1]), snap(5, 2, false, &[3])],
                vec![None],
                Some(1),
            ),
            // A part of another revision.
            (
                vec![snap(5, 0, true, &[1]), snap(6, 1, false, &[3])],
                vec![None],
                Some(1),
            ),
            // Changes from another revision.
            (
                vec![changes(3, 9, 0, true, &[1]), changes(4, 9, 1, false, &[])],
                vec![None],
                Some(1),
            ),
            // A snapshot interrupting change parts.
            (
                vec![changes(3, 9, 0, true, &[1]), snap(9, 0, false, &[])],
                vec![None],
                Some(1),
            ),
            // A later part with none before.
            (vec![snap(5, 1, false, &[1])], vec![], Some(0)),
        ];
        for (i, (messages, want, error_at)) in cases.into_iter().enumerate() {
            let mut a = Assembly::default();
            let mut got = Vec::new();
            let mut failed = None;
            for (n, msg) in messages.into_iter().enumerate() {
                match a.take(msg) {
                    Ok(whole) => got.push(whole.as_ref().map(numbers)),
                    Err(_) => {
                        failed = Some(n);
                        assert!(!a.holding(), "case {i}: an error drops what was held");
                        break;
                    }
                }
            }
            assert_eq!(got, want, "case {i}");
            assert_eq!(failed, error_at, "case {i}");
        }
    }

    #[test]
    fn a_reset_drops_the_parts_and_the_next_snapshot_starts_over() {
        let mut a = Assembly::default();
        assert_eq!(
            a.take(snap(5, 0, true, &[1])).map(|m| m.is_some()),
            Ok(false)
        );
        assert!(a.holding());
        a.reset();
        assert!(!a.holding());
        let whole = a
            .take(snap(5, 0, true, &[7]))
            .and_then(|_| a.take(snap(5, 1, false, &[8])))
            .expect("in order")
            .expect("whole");
        assert_eq!(numbers(&whole), vec![7, 8]);
    }

    #[test]
    fn event_acks_pass_through_while_parts_are_held() {
        let mut a = Assembly::default();
        assert_eq!(a.take(snap(5, 0, true, &[1])), Ok(None));
        let ack = Msg::EventAck(pb::EventAck::default());
        assert_eq!(a.take(ack.clone()), Ok(Some(ack)));
        assert!(a.holding());
    }
}
