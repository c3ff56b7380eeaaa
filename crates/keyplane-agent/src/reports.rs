//! What the agent tells keyplaned about each write and each device, for the status of
//! every slot assignment (docs/STATUS.md): how the device answered a write (sent when
//! the outcome of a slot changes) and whether the device is reachable (sent when that
//! changes). Reports carry the device's reason for a refusal, never a code:
//! `DeviceError` holds none.

use chrono::{DateTime, Utc};
use keyplane_devices::DeviceError;
use keyplane_proto::convert as wire;
use keyplane_proto::v1 as pb;
use std::collections::{HashMap, HashSet};

/// How a device answered a write, as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub(crate) outcome: pb::WriteOutcome,
    pub(crate) reason: String,
    /// DEFERRED_ARMED: the armed partition.
    pub(crate) partition: i32,
}

impl Outcome {
    /// The write went through.
    pub(crate) fn done() -> Outcome {
        Outcome {
            outcome: pb::WriteOutcome::Done,
            reason: String::new(),
            partition: 0,
        }
    }

    /// The write went through but the read-back did not show it done.
    pub(crate) fn unconfirmed() -> Outcome {
        Outcome {
            outcome: pb::WriteOutcome::Unconfirmed,
            reason: String::new(),
            partition: 0,
        }
    }

    /// The device refused the write for a reason that retrying the same write will
    /// not change; None for errors of the link (the device was not reached).
    pub(crate) fn refusal(e: &DeviceError) -> Option<Outcome> {
        let outcome = match e {
            DeviceError::Armed { partition } => {
                return Some(Outcome {
                    outcome: pb::WriteOutcome::DeferredArmed,
                    reason: String::new(),
                    partition: i32::from(*partition),
                });
            }
            DeviceError::DuplicateCode { .. } => pb::WriteOutcome::RefusedDuplicate,
            DeviceError::Full => pb::WriteOutcome::RefusedNoSpace,
            DeviceError::CodeLength { .. }
            | DeviceError::NotDigits { .. }
            | DeviceError::SlotOutOfRange { .. }
            | DeviceError::Refused { .. }
            | DeviceError::Declined { .. }
            | DeviceError::Unsupported { .. } => pb::WriteOutcome::Refused,
            DeviceError::Unreachable(_) | DeviceError::Io(_) | DeviceError::NotFound(_) => {
                return None;
            }
        };
        Some(Outcome {
            outcome,
            reason: e.to_string(),
            partition: 0,
        })
    }
}

/// The reports waiting to be sent, and what was last sent.
#[derive(Debug, Default)]
pub(crate) struct Reports {
    /// Last outcome sent per (device, slot), the revision it was about, and the
    /// report itself (sent again on the next stream: the last one may be lost).
    sent: HashMap<(String, u16), (i64, Outcome, pb::AgentMessage)>,
    /// Devices reported unreachable.
    unreachable: HashSet<String>,
    /// Last successful contact per device.
    contact: HashMap<String, DateTime<Utc>>,
    /// Messages to send on the next flush.
    outbox: Vec<pb::AgentMessage>,
}

impl Reports {
    /// Queues a write report unless the same outcome was sent for the same revision.
    /// A success is reported only after a report of another outcome for the slot: an
    /// ack says as much otherwise.
    pub(crate) fn write(
        &mut self,
        device: &str,
        slot: u16,
        revision: i64,
        clear: bool,
        outcome: Outcome,
        now: DateTime<Utc>,
    ) {
        let key = (device.to_owned(), slot);
        match self.sent.get(&key) {
            None if outcome.outcome == pb::WriteOutcome::Done => return,
            Some((r, o, _)) if *r == revision && *o == outcome => return,
            Some((_, o, _)) if outcome.outcome == pb::WriteOutcome::Done && *o == outcome => {
                return;
            }
            _ => {}
        }
        let report = pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::WriteReport(pb::SlotWriteReport {
                device: device.to_owned(),
                slot: i32::from(slot),
                revision,
                clear,
                outcome: outcome.outcome as i32,
                device_reason: outcome.reason.clone(),
                partition: outcome.partition,
                report_time: Some(wire::timestamp(now)),
            })),
        };
        self.outbox.push(report.clone());
        self.sent.insert(key, (revision, outcome, report));
    }

    /// Records whether `device` was reached; queues a report when that changed.
    pub(crate) fn reached(&mut self, device: &str, reachable: bool, now: DateTime<Utc>) {
        if reachable {
            self.contact.insert(device.to_owned(), now);
        }
        let was_unreachable = self.unreachable.contains(device);
        if reachable != was_unreachable {
            return;
        }
        if reachable {
            self.unreachable.remove(device);
        } else {
            self.unreachable.insert(device.to_owned());
        }
        self.outbox.push(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Reachability(
                pb::DeviceReachability {
                    device: device.to_owned(),
                    reachable,
                    last_contact_time: self.contact.get(device).map(|t| wire::timestamp(*t)),
                },
            )),
        });
    }

    /// Queues a device's inventory entry (what it reports about itself).
    pub(crate) fn inventory(&mut self, device: pb::InventoryDevice) {
        self.outbox.push(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Inventory(device)),
        });
    }

    /// The queued messages.
    pub(crate) fn take(&mut self) -> Vec<pb::AgentMessage> {
        std::mem::take(&mut self.outbox)
    }

    /// A new stream (maybe a new server): the last report of each slot is sent
    /// again (the stream that carried it may have been cut before keyplaned stored
    /// it; keyplaned takes the same report twice as once), and reachability is
    /// reported again as it recurs.
    pub(crate) fn stream_started(&mut self) {
        self.outbox.clear();
        let mut last: Vec<(&(String, u16), &pb::AgentMessage)> =
            self.sent.iter().map(|(k, (_, _, m))| (k, m)).collect();
        last.sort_by(|a, b| a.0.cmp(b.0));
        self.outbox = last.into_iter().map(|(_, m)| m.clone()).collect();
        // Unreachable devices are reported again on the next failed attempt.
        self.unreachable.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(r: &mut Reports) -> Vec<(i32, String)> {
        r.take()
            .into_iter()
            .filter_map(|m| match m.msg {
                Some(pb::agent_message::Msg::WriteReport(w)) => Some((w.outcome, w.device_reason)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_refusal_is_reported_once_and_its_end_once() {
        let now = Utc::now();
        let mut r = Reports::default();
        r.write("d", 3, 5, false, Outcome::done(), now);
        assert!(
            kinds(&mut r).is_empty(),
            "a plain success is said by the ack"
        );
        let refused = Outcome::refusal(&DeviceError::Full).expect("a refusal");
        r.write("d", 3, 5, false, refused.clone(), now);
        r.write("d", 3, 5, false, refused, now);
        assert_eq!(
            kinds(&mut r),
            vec![(
                pb::WriteOutcome::RefusedNoSpace as i32,
                "the device's code memory is full".to_owned()
            )]
        );
        r.write("d", 3, 6, false, Outcome::done(), now);
        r.write("d", 3, 7, false, Outcome::done(), now);
        assert_eq!(
            kinds(&mut r),
            vec![(pb::WriteOutcome::Done as i32, String::new())]
        );
    }

    #[test]
    fn a_new_stream_is_sent_the_last_report_of_each_slot_again() {
        let now = Utc::now();
        let mut r = Reports::default();
        let refused = Outcome::refusal(&DeviceError::Full).expect("a refusal");
        r.write("d", 3, 5, false, refused, now);
        r.write("d", 4, 5, false, Outcome::unconfirmed(), now);
        r.write("d", 4, 5, false, Outcome::done(), now);
        r.write("d", 6, 5, false, Outcome::done(), now);
        assert_eq!(kinds(&mut r).len(), 3);
        r.stream_started();
        assert_eq!(
            kinds(&mut r),
            vec![
                (
                    pb::WriteOutcome::RefusedNoSpace as i32,
                    "the device's code memory is full".to_owned()
                ),
                (pb::WriteOutcome::Done as i32, String::new())
            ],
            "the refusal and the end of the unconfirmed write, once each"
        );
        r.write(
            "d",
            3,
            5,
            false,
            Outcome::refusal(&DeviceError::Full).expect("refusal"),
            now,
        );
        assert!(kinds(&mut r).is_empty(), "not again on the same stream");
    }

    #[test]
    fn link_errors_are_not_refusals_and_reachability_is_sent_on_change() {
        assert_eq!(
            Outcome::refusal(&DeviceError::Unreachable("x".into())),
            None
        );
        let now = Utc::now();
        let mut r = Reports::default();
        r.reached("d", true, now);
        assert!(r.take().is_empty());
        r.reached("d", false, now);
        r.reached("d", false, now);
        assert_eq!(r.take().len(), 1);
        r.reached("d", true, now);
        assert_eq!(r.take().len(), 1);
    }
}
