//! The agent's coordinator: journals what keyplaned sends and wakes one task per
//! device (crate::device), which applies the desired table to its device and acks
//! it once the device holds it. The coordinator never awaits a device.

use crate::clock::Clock;
use crate::device::{DeviceTask, Pacing};
use crate::intake::read_slot;
use crate::journal::{DeviceJournal, Journal};
use keyplane_core::DeviceModel;
use keyplane_core::constraints::ReportedConstraints;
use keyplane_core::observed::{SlotFinding, classify_slot};
use keyplane_devices::{DeviceDriver, DeviceError, DeviceEvent};
use keyplane_proto::v1 as pb;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Opens drivers for the devices keyplaned lists.
pub trait DriverFactory: Send + Sync {
    /// A driver for `device` (a resource name) of `model`.
    fn open(
        &self,
        device: &str,
        model: &'static DeviceModel,
    ) -> Result<Box<dyn DeviceDriver>, DeviceError>;
}

/// Drivers for simulated devices whose state lives in a directory.
#[derive(Debug, Clone)]
pub struct SimulatorFactory {
    dir: PathBuf,
}

impl SimulatorFactory {
    /// Simulators kept in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SimulatorFactory { dir: dir.into() }
    }
}

impl DriverFactory for SimulatorFactory {
    fn open(
        &self,
        device: &str,
        model: &'static DeviceModel,
    ) -> Result<Box<dyn DeviceDriver>, DeviceError> {
        keyplane_devices::open_driver(&self.dir, device, model)
    }
}

/// How often the device tasks act and how they pace their writes.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// A pass per device at least this often (schedules open and close on time).
    pub(crate) reconcile_every: Duration,
    /// Read each device's event log this often.
    pub(crate) event_poll: Duration,
    /// Read each device's slot table back at least this often.
    pub(crate) observe_every: Duration,
    /// The gap between two writes to one device, per kind.
    pub(crate) pacing: Pacing,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            reconcile_every: Duration::from_secs(1),
            event_poll: Duration::from_millis(200),
            observe_every: Duration::from_secs(60),
            pacing: Pacing::default(),
        }
    }
}

/// What the coordinator and the device tasks share: the journal (locked only
/// between awaits, never across device I/O), the driver factory and the counters.
pub(crate) struct Shared {
    journal: Mutex<Journal>,
    pub(crate) factory: Box<dyn DriverFactory>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) settings: Settings,
    pub(crate) progress: Arc<Progress>,
    /// What each device reported about itself, for the Hello's inventory.
    constraints: Mutex<HashMap<String, Option<ReportedConstraints>>>,
    /// The trace context keyplaned sent with recent revisions (in memory only: after
    /// a restart the apply starts a trace of its own).
    traces: Mutex<BTreeMap<i64, String>>,
}

/// Revisions whose trace context is remembered; a device further behind applies
/// without one.
const TRACES_KEPT: usize = 64;

impl Shared {
    /// Runs `f` on the journal. Never held across an await.
    pub(crate) fn journal<T>(&self, f: impl FnOnce(&mut Journal) -> T) -> T {
        let mut journal = self.journal.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut journal)
    }

    pub(crate) fn set_constraints(&self, device: &str, reported: Option<ReportedConstraints>) {
        let mut known = self
            .constraints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        known.insert(device.to_owned(), reported);
    }

    /// Remembers that `revision` came with W3C trace context `traceparent`.
    fn set_trace(&self, revision: i64, traceparent: &str) {
        if traceparent.is_empty() {
            return;
        }
        let mut traces = self.traces.lock().unwrap_or_else(PoisonError::into_inner);
        traces.insert(revision, traceparent.to_owned());
        while traces.len() > TRACES_KEPT {
            traces.pop_first();
        }
    }

    /// The trace context of the newest traced revision in `(after, upto]`: what a
    /// pass that brings a device from `after` to `upto` continues.
    pub(crate) fn trace_between(&self, after: i64, upto: i64) -> Option<String> {
        if after >= upto {
            return None;
        }
        let traces = self.traces.lock().unwrap_or_else(PoisonError::into_inner);
        traces
            .range(after.saturating_add(1)..=upto)
            .next_back()
            .map(|(_, tp)| tp.clone())
    }

    fn constraints(&self, device: &str) -> Option<ReportedConstraints> {
        let known = self
            .constraints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        known.get(device).cloned().flatten()
    }
}

/// The current stream's two outbound queues (urgent: duress; routine: the rest).
#[derive(Clone)]
pub(crate) struct Outbound {
    /// Ahead of everything else.
    pub(crate) urgent: mpsc::Sender<pb::AgentMessage>,
    /// Acks, reports, routine events.
    pub(crate) routine: mpsc::Sender<pb::AgentMessage>,
}

/// Per-device pass and poll counts, folded into the agent-wide counters: one
/// agent-wide pass is counted once every device completed a pass begun after the
/// previous one was counted (likewise for event polls).
#[derive(Default)]
pub(crate) struct Progress {
    state: Mutex<HashMap<String, Counts>>,
    changed: Notify,
    passes: crate::PassCounter,
    event_polls: crate::PassCounter,
}

#[derive(Default, Clone, Copy)]
struct Counts {
    started: u64,
    completed: u64,
    pass_mark: u64,
    polls: u64,
    poll_mark: u64,
}

impl Progress {
    fn new(passes: crate::PassCounter, event_polls: crate::PassCounter) -> Progress {
        Progress {
            passes,
            event_polls,
            ..Progress::default()
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Counts>) -> T) -> T {
        let out = self.peek(f);
        self.changed.notify_waiters();
        out
    }

    /// Like `with`, waking nobody (for the waiters themselves).
    fn peek<T>(&self, f: impl FnOnce(&mut HashMap<String, Counts>) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut state)
    }

    fn join(&self, device: &str) {
        self.with(|s| {
            s.entry(device.to_owned()).or_default();
        });
    }

    /// The device's task ended.
    pub(crate) fn leave(&self, device: &str) {
        self.with(|s| {
            s.remove(device);
        });
        self.fold();
    }

    /// A pass on `device` begins.
    pub(crate) fn started(&self, device: &str) {
        self.with(|s| s.entry(device.to_owned()).or_default().started += 1);
    }

    /// A pass on `device` ended.
    pub(crate) fn completed(&self, device: &str) {
        self.with(|s| s.entry(device.to_owned()).or_default().completed += 1);
        self.fold();
    }

    /// An event poll of `device` ended.
    pub(crate) fn polled(&self, device: &str) {
        self.with(|s| s.entry(device.to_owned()).or_default().polls += 1);
        self.fold();
    }

    /// Counts an agent-wide pass (poll) once every device has one past its mark.
    fn fold(&self) {
        let (pass, poll) = self.peek(|s| {
            if s.is_empty() {
                return (false, false);
            }
            let pass = s.values().all(|c| c.completed > c.pass_mark);
            let poll = s.values().all(|c| c.polls > c.poll_mark);
            for c in s.values_mut() {
                if pass {
                    c.pass_mark = c.started;
                }
                if poll {
                    c.poll_mark = c.polls;
                }
            }
            (pass, poll)
        });
        if pass {
            self.passes.bump();
        }
        if poll {
            self.event_polls.bump();
        }
    }

    /// With no device at all, a tick is a pass and a poll.
    fn idle_tick(&self) {
        if self.peek(|s| s.is_empty()) {
            self.passes.bump();
            self.event_polls.bump();
        }
    }

    /// Waits until every device known now has completed a pass begun after now.
    #[cfg(test)]
    async fn settled(&self) {
        let begun: HashMap<String, u64> =
            self.peek(|s| s.iter().map(|(n, c)| (n.clone(), c.started)).collect());
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let done = self.peek(|s| {
                begun
                    .iter()
                    .all(|(n, b)| s.get(n).is_none_or(|c| c.completed > *b))
            });
            if done {
                return;
            }
            notified.await;
        }
    }
}

/// A running device task.
struct Worker {
    kick: Arc<Notify>,
    handle: tokio::task::JoinHandle<()>,
}

/// The agent: owns the journal (shared with the device tasks) and one task per
/// device. Applying a server message only journals it and wakes the tasks: nothing
/// here awaits a device.
pub struct Agent {
    shared: Arc<Shared>,
    workers: HashMap<String, Worker>,
    outbound: watch::Sender<Option<Outbound>>,
    cancel: CancellationToken,
    /// Parts of a snapshot or change set still arriving: journaled once whole.
    parts: crate::parts::Assembly,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Agent {
    /// Opens the journal in `state_dir` with the key found there
    /// ([`Journal::open`]), with default periods and pacing.
    pub fn open(
        state_dir: &Path,
        factory: Box<dyn DriverFactory>,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Agent> {
        Ok(Agent::with_journal(
            Journal::open(state_dir)?,
            factory,
            clock,
        ))
    }

    /// An agent following `journal`, with default periods and pacing.
    pub fn with_journal(
        journal: Journal,
        factory: Box<dyn DriverFactory>,
        clock: Arc<dyn Clock>,
    ) -> Agent {
        Agent::open_with(
            journal,
            factory,
            clock,
            Settings::default(),
            crate::PassCounter::default(),
            crate::PassCounter::default(),
        )
    }

    /// An agent following `journal`; `passes` and `event_polls` count the
    /// agent-wide passes and polls.
    pub(crate) fn open_with(
        journal: Journal,
        factory: Box<dyn DriverFactory>,
        clock: Arc<dyn Clock>,
        settings: Settings,
        passes: crate::PassCounter,
        event_polls: crate::PassCounter,
    ) -> Agent {
        let shared = Arc::new(Shared {
            journal: Mutex::new(journal),
            factory,
            clock,
            settings,
            progress: Arc::new(Progress::new(passes, event_polls)),
            constraints: Mutex::new(HashMap::new()),
            traces: Mutex::new(BTreeMap::new()),
        });
        let (outbound, _) = watch::channel(None);
        Agent {
            shared,
            workers: HashMap::new(),
            outbound,
            cancel: CancellationToken::new(),
            parts: crate::parts::Assembly::default(),
        }
    }

    /// The journaled site revision.
    pub fn revision(&self) -> i64 {
        self.shared.journal(|j| j.revision)
    }

    /// Starts a task for every journaled device that has none (a device that left
    /// the site ends its own task once it holds nothing of keyplane's).
    pub fn start_devices(&mut self) {
        self.workers.retain(|_, w| !w.handle.is_finished());
        let names: Vec<String> = self.shared.journal(|j| j.devices.keys().cloned().collect());
        for name in names {
            if self.workers.contains_key(&name) {
                continue;
            }
            let kick = Arc::new(Notify::new());
            self.shared.progress.join(&name);
            let task = DeviceTask::new(
                name.clone(),
                self.shared.clone(),
                self.outbound.subscribe(),
                kick.clone(),
            );
            // Its lines name the device, inside the agent's span (the site).
            let span = tracing::info_span!("device", device = %name);
            let handle = tokio::spawn(tracing::Instrument::instrument(
                task.run(self.cancel.child_token()),
                span,
            ));
            self.workers.insert(name, Worker { kick, handle });
        }
        crate::metrics::metrics()
            .devices
            .set(i64::try_from(self.workers.len()).unwrap_or(i64::MAX));
    }

    /// Wakes every device task for a pass now.
    fn kick_all(&self) {
        for w in self.workers.values() {
            w.kick.notify_one();
        }
    }

    /// A periodic tick of the coordinator: tasks for new devices, and with no
    /// device at all, a pass counted all the same.
    pub fn tick(&mut self) {
        self.start_devices();
        self.shared.progress.idle_tick();
    }

    /// Stops every device task and waits for them (a write in flight is dropped,
    /// as at a crash: the journal and the next read-back settle it).
    pub async fn stop(mut self) {
        self.cancel.cancel();
        for (_, w) in self.workers.drain() {
            let _ = w.handle.await;
        }
    }

    /// The Hello for `site`: journaled revision, known devices, and the agent's
    /// protocol, wall clock and time-zone database (issue 14).
    pub fn hello(&self, site: &str) -> pb::AgentMessage {
        // keyplaned sees the wall clock in this Hello: a held jump is adopted.
        self.shared.clock.checkpoint();
        let (revision, devices) = self.shared.journal(|j| {
            let devices: Vec<(String, String)> = j
                .devices
                .iter()
                .filter(|(_, d)| d.present)
                .map(|(name, d)| (name.clone(), d.model.clone()))
                .collect();
            (j.revision, devices)
        });
        let inventory = devices
            .into_iter()
            .map(|(name, model)| pb::InventoryDevice {
                kind: DeviceModel::find(&model)
                    .map(|m| pb::DeviceKind::from(m.kind))
                    .unwrap_or(pb::DeviceKind::Unspecified) as i32,
                constraints: self
                    .shared
                    .constraints(&name)
                    .as_ref()
                    .map(keyplane_proto::convert::reported_constraints_pb),
                device: name,
                model,
            })
            .collect();
        pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                site: site.to_owned(),
                applied_revision: revision,
                inventory,
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                protocol_version: keyplane_core::compat::PROTOCOL_VERSION,
                agent_time: Some(prost_types::Timestamp::from(std::time::SystemTime::from(
                    self.shared.clock.wall(),
                ))),
                tzdb_version: chrono_tz::IANA_TZDB_VERSION.to_owned(),
                accepts_parts: true,
            })),
        }
    }

    /// A report of the agent's wall clock for the stream (issue 14): keyplaned
    /// measures the skew again, as at Hello.
    pub fn clock_report(&self) -> pb::AgentMessage {
        // keyplaned sees the wall clock in this report: a held jump is adopted.
        self.shared.clock.checkpoint();
        pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Clock(pb::ClockReport {
                agent_time: Some(prost_types::Timestamp::from(std::time::SystemTime::from(
                    self.shared.clock.wall(),
                ))),
            })),
        }
    }

    /// Journals a server message and wakes the device tasks; returns at once.
    pub fn accept(&mut self, msg: pb::server_message::Msg) -> anyhow::Result<()> {
        if let pb::server_message::Msg::EventAck(ack) = &msg {
            return self.shared.journal(|j| {
                if let Some(device) = j.devices.get_mut(&ack.device)
                    && ack.epoch == device.events_epoch.unwrap_or(0)
                    && ack.seq > device.events_acked
                {
                    device.events_acked = ack.seq;
                    j.save()?;
                }
                Ok(())
            });
        }
        // A part with more to come waits: the journal takes only whole updates, so a
        // stream cut in between leaves the last desired table as it was.
        let Some(msg) = self.parts.take(msg)? else {
            return Ok(());
        };
        match &msg {
            pb::server_message::Msg::Snapshot(s) => {
                self.shared.set_trace(s.revision, &s.traceparent)
            }
            pb::server_message::Msg::Changes(c) => {
                self.shared.set_trace(c.revision, &c.traceparent)
            }
            pb::server_message::Msg::EventAck(_) => {}
        }
        self.shared.journal(|j| journal_message(j, msg))?;
        self.start_devices();
        self.kick_all();
        Ok(())
    }

    /// A stream began: the device tasks send on its queues (and resend what
    /// keyplaned has not acked).
    pub fn stream_started(
        &mut self,
        urgent: mpsc::Sender<pb::AgentMessage>,
        routine: mpsc::Sender<pb::AgentMessage>,
    ) {
        self.parts.reset();
        self.outbound
            .send_replace(Some(Outbound { urgent, routine }));
    }

    /// The stream ended: nothing is sent until the next one.
    pub fn stream_ended(&mut self) {
        if self.parts.holding() {
            tracing::info!(
                "the stream ended in the middle of an update sent in parts: nothing of it was applied; the next stream starts over"
            );
        }
        self.parts.reset();
        self.outbound.send_replace(None);
    }

    /// Tests: journals `msg` and waits for every device to complete a pass.
    #[cfg(test)]
    pub(crate) async fn apply(
        &mut self,
        msg: pb::server_message::Msg,
        out: &mpsc::Sender<pb::AgentMessage>,
    ) -> anyhow::Result<()> {
        self.connect_for_test(out);
        self.accept(msg)?;
        self.settle().await;
        Ok(())
    }

    /// Tests: a pass on every device, begun after now, completed.
    #[cfg(test)]
    pub(crate) async fn reconcile_all(&mut self, out: Option<&mpsc::Sender<pb::AgentMessage>>) {
        match out {
            Some(out) => self.connect_for_test(out),
            None => self.stream_ended(),
        }
        self.start_devices();
        self.settle().await;
    }

    #[cfg(test)]
    fn connect_for_test(&mut self, out: &mpsc::Sender<pb::AgentMessage>) {
        let same = self
            .outbound
            .borrow()
            .as_ref()
            .is_some_and(|o| o.routine.same_channel(out));
        if !same {
            self.stream_started(out.clone(), out.clone());
        }
    }

    #[cfg(test)]
    async fn settle(&mut self) {
        self.kick_all();
        self.shared.progress.settled().await;
    }
}

/// Records the devices keyplaned lists; a snapshot replaces every desired table.
fn learn_devices(journal: &mut Journal, devices: &[pb::SiteDevice], snapshot: bool) {
    for d in journal.devices.values_mut() {
        d.present = false;
    }
    for d in devices {
        let entry = journal.devices.entry(d.name.clone()).or_default();
        entry.model = d.model.clone();
        entry.present = true;
    }
    for d in journal.devices.values_mut() {
        if !d.present || snapshot {
            // A snapshot replaces the whole table; a device keyplaned no longer
            // lists keeps nothing keyplane wrote.
            d.desired.clear();
            d.remove_local.clear();
            d.refused.clear();
        }
    }
}

/// Journals a server message (no device I/O: the device tasks act on it).
fn journal_message(journal: &mut Journal, msg: pb::server_message::Msg) -> anyhow::Result<()> {
    let (revision, slots, what, from) = match msg {
        pb::server_message::Msg::EventAck(ack) => {
            if let Some(device) = journal.devices.get_mut(&ack.device)
                && ack.epoch == device.events_epoch.unwrap_or(0)
                && ack.seq > device.events_acked
            {
                device.events_acked = ack.seq;
                journal.save()?;
            }
            return Ok(());
        }
        pb::server_message::Msg::Snapshot(s) => {
            learn_devices(journal, &s.devices, true);
            journal.time_zone = s.time_zone;
            journal.lockdown = s.lockdown;
            (s.revision, s.slots, "snapshot", None)
        }
        pb::server_message::Msg::Changes(c) => {
            learn_devices(journal, &c.devices, false);
            journal.time_zone = c.time_zone;
            journal.lockdown = c.lockdown;
            (c.revision, c.slots, "changes", Some(c.from_revision))
        }
    };
    for slot in &slots {
        let Ok(number) = u16::try_from(slot.slot) else {
            tracing::warn!(device = %slot.device, slot = slot.slot, "slot number out of range ignored");
            continue;
        };
        let Some(device) = journal.devices.get_mut(&slot.device) else {
            tracing::warn!(device = %slot.device, "change for a device keyplaned did not list ignored");
            continue;
        };
        let model = DeviceModel::find(&device.model);
        if let Some(model) = model.filter(|m| m.is_reserved(number)) {
            // The installer's user 001 belongs to the device: whatever keyplaned
            // sends for it, the agent neither writes nor clears it.
            device.desired.remove(&number);
            device.remove_local.remove(&number);
            if slot.remove_local {
                tracing::warn!(
                    device = %slot.device,
                    slot = %model.display_slot(number),
                    "request to clear a reserved slot (the installer's) refused: \
                     it is never cleared by keyplane"
                );
            } else if slot.credential.is_empty() {
                device.refused.remove(&number);
            } else {
                tracing::warn!(
                    device = %slot.device,
                    slot = %model.display_slot(number),
                    credential = %slot.credential,
                    "code refused: the slot is reserved on this model (the installer's) \
                     and never written by keyplane; the device stays out of sync until \
                     keyplaned moves the code to another slot"
                );
                device
                    .refused
                    .insert(number, "the slot is reserved on this model".to_owned());
            }
            continue;
        }
        match read_slot(slot) {
            Ok(code) => {
                device.refused.remove(&number);
                match code {
                    Some(code) => device.desired.insert(number, code),
                    None => device.desired.remove(&number),
                };
            }
            Err(why) => {
                // Not desired as far as the device goes: never written, and
                // cleared if an earlier version of it was.
                device.desired.remove(&number);
                let kind = model.map(|m| m.kind);
                let shown = kind.map_or_else(|| number.to_string(), |k| k.display_slot(number));
                tracing::warn!(
                    device = %slot.device,
                    slot = %shown,
                    credential = %slot.credential,
                    reason = %why,
                    "code refused: a value in it cannot be read by this agent, so it is \
                     kept off the device (never widened); the device stays out of sync \
                     until keyplaned sends a code it can read (upgrade the agent?)"
                );
                device.refused.insert(number, why.to_string());
            }
        }
        if slot.remove_local {
            device.remove_local.insert(number);
        } else {
            device.remove_local.remove(&number);
        }
    }
    journal.revision = revision;
    journal.save()?;
    let devices = journal.devices.values().filter(|d| d.present);
    let (total, in_sync) = devices.fold((0, 0), |(t, n), d| {
        (t + 1, n + usize::from(d.acked >= revision))
    });
    let refused: usize = journal.devices.values().map(|d| d.refused.len()).sum();
    tracing::info!(
        revision,
        from_revision = from,
        slots = slots.len(),
        devices = total,
        devices_acked = in_sync,
        codes_refused = refused,
        lockdown = journal.lockdown,
        "journaled {what} from keyplaned; the devices follow it"
    );
    Ok(())
}

/// Whether an error means the device was not reached (rather than refused).
pub(crate) fn is_link_error(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<DeviceError>(),
        Some(DeviceError::Unreachable(_) | DeviceError::Io(_))
    )
}

/// Compares what a device holds with what keyplane wrote and wants there (the rule
/// is keyplane-core's; reserved slots are never reported).
pub(crate) fn classify(
    model: &DeviceModel,
    device: &DeviceJournal,
    observed: &BTreeMap<u16, Option<String>>,
) -> Vec<pb::ObservedSlot> {
    let wanted: std::collections::BTreeSet<&str> =
        device.desired.values().map(|c| c.pin.as_str()).collect();
    let slots: std::collections::BTreeSet<u16> = observed
        .keys()
        .chain(device.written.keys())
        .copied()
        .collect();
    slots
        .into_iter()
        .filter_map(|slot| {
            let code = observed.get(&slot);
            let finding = classify_slot(
                model,
                slot,
                device.written.get(&slot).map(|w| w.pin.as_str()),
                code.map(Option::as_deref),
                &wanted,
            )?;
            let state = pb::ObservedState::from(finding);
            // keyplaned is told the code only where it is not keyplane's own.
            let pin = match finding {
                SlotFinding::Drifted | SlotFinding::Foreign | SlotFinding::Conflict => {
                    code.cloned().flatten().unwrap_or_default()
                }
                _ => String::new(),
            };
            Some(pb::ObservedSlot {
                slot: i32::from(slot),
                state: state as i32,
                pin,
            })
        })
        .collect()
}

/// The wire form of event `e` of `device`'s log named `epoch`.
pub(crate) fn event_pb(device: &str, epoch: u64, e: &DeviceEvent) -> pb::AgentMessage {
    let kind = pb::EventKind::from(e.kind);
    let secs = e.at_unix_ms.div_euclid(1000);
    let nanos = i32::try_from(e.at_unix_ms.rem_euclid(1000) * 1_000_000).unwrap_or(0);
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Event(pb::DeviceEvent {
            device: device.to_owned(),
            seq: e.seq,
            kind: kind as i32,
            partition: e.partition.map(i32::from).unwrap_or(0),
            user_number: e.slot.map(i32::from).unwrap_or(0),
            occur_time: Some(prost_types::Timestamp {
                seconds: secs,
                nanos,
            }),
            epoch,
        })),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use keyplane_devices::ObservedSlot;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh directory, removed when dropped.
    pub(crate) struct TempDir(pub(crate) PathBuf);

    impl TempDir {
        pub(crate) fn new() -> TempDir {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("keyplane-agent-unit-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    type Slots = Arc<Mutex<BTreeMap<u16, String>>>;

    /// A driver implementing only what the trait requires (no schedules, no
    /// lockdown, no panel levels), over slots the test can see.
    struct Bare {
        device: String,
        model: &'static DeviceModel,
        slots: Slots,
        /// Clears are answered Ok but do not take (a lost write).
        sticky: Arc<std::sync::atomic::AtomicBool>,
        /// The next this many sets are answered Ok but do not take (lost writes).
        lost: Arc<AtomicU32>,
    }

    #[async_trait::async_trait]
    impl DeviceDriver for Bare {
        fn device(&self) -> &str {
            &self.device
        }
        fn model(&self) -> &'static DeviceModel {
            self.model
        }
        async fn read_slots(&mut self) -> Result<Vec<ObservedSlot>, DeviceError> {
            let slots = self
                .slots
                .lock()
                .map_err(|e| DeviceError::Io(e.to_string()))?;
            Ok(slots
                .iter()
                .map(|(slot, code)| ObservedSlot {
                    slot: *slot,
                    code: Some(code.clone()),
                })
                .collect())
        }
        async fn set_slot(&mut self, slot: u16, code: &str) -> Result<(), DeviceError> {
            let mut slots = self
                .slots
                .lock()
                .map_err(|e| DeviceError::Io(e.to_string()))?;
            let dropped = self
                .lost
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
            if !dropped {
                slots.insert(slot, code.to_owned());
            }
            Ok(())
        }
        async fn clear_slot(&mut self, slot: u16) -> Result<(), DeviceError> {
            let mut slots = self
                .slots
                .lock()
                .map_err(|e| DeviceError::Io(e.to_string()))?;
            if !self.sticky.load(Ordering::Relaxed) {
                slots.remove(&slot);
            }
            Ok(())
        }
    }

    struct BareFactory(Slots, Arc<std::sync::atomic::AtomicBool>, Arc<AtomicU32>);

    impl DriverFactory for BareFactory {
        fn open(
            &self,
            device: &str,
            model: &'static DeviceModel,
        ) -> Result<Box<dyn DeviceDriver>, DeviceError> {
            Ok(Box::new(Bare {
                device: device.to_owned(),
                model,
                slots: self.0.clone(),
                sticky: self.1.clone(),
                lost: self.2.clone(),
            }))
        }
    }

    pub(crate) const DOOR: &str = "sites/s/devices/door";

    pub(crate) fn snapshot(
        revision: i64,
        lockdown: bool,
        devices: &[(&str, &str)],
        slots: Vec<pb::DesiredSlot>,
    ) -> pb::server_message::Msg {
        pb::server_message::Msg::Snapshot(pb::DesiredSnapshot {
            revision,
            devices: devices
                .iter()
                .map(|(name, model)| pb::SiteDevice {
                    name: (*name).to_owned(),
                    kind: 0,
                    model: (*model).to_owned(),
                })
                .collect(),
            slots,
            time_zone: "Europe/Paris".into(),
            lockdown,
            ..Default::default()
        })
    }

    /// A code for `slot` of `device`; scheduled ones open on weekdays 08:00-18:00.
    pub(crate) fn code(device: &str, slot: i32, pin: &str, scheduled: bool) -> pb::DesiredSlot {
        pb::DesiredSlot {
            device: device.to_owned(),
            slot,
            credential: format!("sites/s/users/u/credentials/c{slot}"),
            pin: pin.to_owned(),
            scheduled,
            schedules: if scheduled {
                vec![pb::Schedule {
                    windows: vec![pb::TimeWindow {
                        days: (1..=5).collect(),
                        start_time: "08:00".into(),
                        end_time: "18:00".into(),
                    }],
                    ..Default::default()
                }]
            } else {
                vec![]
            },
            ..Default::default()
        }
    }

    /// Revisions acked so far for `device` (drains the channel).
    pub(crate) fn acks(rx: &mut mpsc::Receiver<pb::AgentMessage>, device: &str) -> Vec<i64> {
        let mut out = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            if let Some(pb::agent_message::Msg::Ack(a)) = msg.msg
                && a.device == device
            {
                out.push(a.revision);
            }
        }
        out
    }

    fn bare_agent(dir: &TempDir) -> (Agent, Slots) {
        let (agent, slots, _) = sticky_agent(dir);
        (agent, slots)
    }

    fn sticky_agent(dir: &TempDir) -> (Agent, Slots, Arc<std::sync::atomic::AtomicBool>) {
        let (agent, slots, sticky, _) = faulty_agent(dir);
        (agent, slots, sticky)
    }

    /// An agent over a bare driver whose clears (`sticky`) or next sets (`lost`)
    /// can be made not to take.
    fn faulty_agent(
        dir: &TempDir,
    ) -> (
        Agent,
        Slots,
        Arc<std::sync::atomic::AtomicBool>,
        Arc<AtomicU32>,
    ) {
        let slots = Slots::default();
        let sticky = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lost = Arc::new(AtomicU32::new(0));
        let agent = Agent::open(
            &dir.0,
            Box::new(BareFactory(slots.clone(), sticky.clone(), lost.clone())),
            Arc::new(SystemClock),
        )
        .expect("agent");
        (agent, slots, sticky, lost)
    }

    /// Write reports (slot, clear, outcome) and acked revisions so far (drains).
    fn reports_and_acks(
        rx: &mut mpsc::Receiver<pb::AgentMessage>,
    ) -> (Vec<(i32, bool, i32)>, Vec<i64>) {
        let mut reports = Vec::new();
        let mut acked = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            match msg.msg {
                Some(pb::agent_message::Msg::WriteReport(r)) => {
                    reports.push((r.slot, r.clear, r.outcome))
                }
                Some(pb::agent_message::Msg::Ack(a)) => acked.push(a.revision),
                _ => {}
            }
        }
        (reports, acked)
    }

    #[tokio::test]
    async fn a_write_the_device_does_not_keep_is_not_acked_and_written_again() {
        let dir = TempDir::new();
        let (mut agent, slots, _, lost) = faulty_agent(&dir);
        let (tx, mut rx) = mpsc::channel(64);
        let devices = [(DOOR, "door-1000")];
        lost.store(1, Ordering::Relaxed);
        let codes = vec![code(DOOR, 3, "4821", false), code(DOOR, 4, "5930", false)];
        agent
            .apply(snapshot(1, false, &devices, codes), &tx)
            .await
            .expect("apply");
        assert_eq!(
            held(&slots),
            BTreeMap::from([(4, "5930".to_owned())]),
            "the first write was answered and dropped"
        );
        assert_eq!(
            reports_and_acks(&mut rx),
            (
                vec![(3, false, pb::WriteOutcome::Unconfirmed as i32)],
                vec![]
            ),
            "reported unconfirmed, not acked"
        );
        // The next pass (level-triggered) writes it again, reads it back and acks.
        agent.reconcile_all(Some(&tx)).await;
        assert_eq!(
            held(&slots),
            BTreeMap::from([(3, "4821".to_owned()), (4, "5930".to_owned())])
        );
        assert_eq!(
            reports_and_acks(&mut rx),
            (vec![(3, false, pb::WriteOutcome::Done as i32)], vec![1])
        );
        // Nothing is left to write: further passes leave the device alone.
        agent.reconcile_all(Some(&tx)).await;
        assert_eq!(reports_and_acks(&mut rx), (vec![], vec![]));
    }

    /// `msg` as one part of several (see `crate::parts`).
    fn part(msg: pb::server_message::Msg, part: i32, more: bool) -> pb::server_message::Msg {
        match msg {
            pb::server_message::Msg::Snapshot(mut s) => {
                s.part = part;
                s.more_parts = more;
                pb::server_message::Msg::Snapshot(s)
            }
            other => other,
        }
    }

    #[tokio::test]
    async fn a_snapshot_in_parts_is_journaled_whole_and_a_cut_stream_leaves_the_old_table() {
        let dir = TempDir::new();
        let (mut agent, slots) = bare_agent(&dir);
        let (tx, mut rx) = mpsc::channel(64);
        let devices = [(DOOR, "door-1000")];
        agent
            .apply(
                snapshot(1, false, &devices, vec![code(DOOR, 3, "4821", false)]),
                &tx,
            )
            .await
            .expect("apply");
        assert_eq!(acks(&mut rx, DOOR), vec![1]);
        // Revision 2 in two parts; the stream ends after the first.
        let first = vec![code(DOOR, 4, "5930", false)];
        agent
            .apply(
                part(snapshot(2, false, &devices, first.clone()), 0, true),
                &tx,
            )
            .await
            .expect("first part held");
        assert_eq!(
            agent.revision(),
            1,
            "nothing journaled before the last part"
        );
        assert_eq!(held(&slots).keys().copied().collect::<Vec<_>>(), vec![3]);
        assert!(acks(&mut rx, DOOR).iter().all(|r| *r == 1));
        agent.stream_ended();
        // The next stream starts over; a stray later part is refused, not applied.
        assert!(
            agent
                .accept(part(snapshot(2, false, &devices, vec![]), 1, false))
                .is_err()
        );
        assert_eq!(agent.revision(), 1);
        agent
            .apply(part(snapshot(2, false, &devices, first), 0, true), &tx)
            .await
            .expect("first part");
        agent
            .apply(
                part(
                    snapshot(2, false, &devices, vec![code(DOOR, 5, "6041", false)]),
                    1,
                    false,
                ),
                &tx,
            )
            .await
            .expect("last part");
        assert_eq!(agent.revision(), 2);
        assert_eq!(
            held(&slots).keys().copied().collect::<Vec<_>>(),
            vec![4, 5],
            "the whole snapshot replaced the table: slot 3 cleared, both parts written"
        );
        assert_eq!(acks(&mut rx, DOOR).last(), Some(&2));
    }

    #[tokio::test]
    async fn a_clear_the_read_back_does_not_show_is_unconfirmed_not_acked_and_cleared_again() {
        let dir = TempDir::new();
        let (mut agent, slots, sticky) = sticky_agent(&dir);
        let (tx, mut rx) = mpsc::channel(64);
        let devices = [(DOOR, "door-1000")];
        let with = vec![code(DOOR, 3, "4821", false)];
        agent
            .apply(snapshot(1, false, &devices, with), &tx)
            .await
            .expect("apply");
        assert_eq!(acks(&mut rx, DOOR), vec![1]);
        sticky.store(true, Ordering::Relaxed);
        agent
            .apply(snapshot(2, false, &devices, vec![]), &tx)
            .await
            .expect("apply");
        let mut reports = Vec::new();
        let mut acked = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            match msg.msg {
                Some(pb::agent_message::Msg::WriteReport(r)) => {
                    reports.push((r.slot, r.clear, r.outcome))
                }
                Some(pb::agent_message::Msg::Ack(a)) => acked.push(a.revision),
                _ => {}
            }
        }
        assert_eq!(
            reports,
            vec![(3, true, pb::WriteOutcome::Unconfirmed as i32)],
            "the revocation is reported unconfirmed"
        );
        assert!(acked.is_empty(), "not acked before the read-back shows it");
        assert!(held(&slots).contains_key(&3));
        // The next pass (level-triggered) clears it again; now it takes and is acked.
        sticky.store(false, Ordering::Relaxed);
        agent.reconcile_all(Some(&tx)).await;
        assert!(held(&slots).is_empty());
        assert_eq!(acks(&mut rx, DOOR), vec![2]);
    }

    fn held(slots: &Slots) -> BTreeMap<u16, String> {
        slots.lock().expect("slots").clone()
    }

    #[tokio::test]
    async fn a_driver_without_schedules_refuses_a_scheduled_code_never_writes_it_always_on() {
        let dir = TempDir::new();
        let (mut agent, slots) = bare_agent(&dir);
        let (tx, mut rx) = mpsc::channel(64);
        let devices = [(DOOR, "door-1000")];
        agent
            .apply(
                snapshot(
                    1,
                    false,
                    &devices,
                    vec![code(DOOR, 3, "4821", true), code(DOOR, 4, "5931", false)],
                ),
                &tx,
            )
            .await
            .expect("apply");
        assert_eq!(
            held(&slots),
            BTreeMap::from([(4, "5931".to_owned())]),
            "only the unscheduled code"
        );
        assert_eq!(
            acks(&mut rx, DOOR),
            Vec::<i64>::new(),
            "not in sync: no ack"
        );
        // The written code gets a schedule: it is cleared, not left open around the clock.
        agent
            .apply(
                snapshot(2, false, &devices, vec![code(DOOR, 4, "5931", true)]),
                &tx,
            )
            .await
            .expect("apply");
        assert_eq!(held(&slots), BTreeMap::new());
        assert_eq!(acks(&mut rx, DOOR), Vec::<i64>::new());
        // Passes later neither write it nor ack.
        agent.reconcile_all(Some(&tx)).await;
        assert_eq!(held(&slots), BTreeMap::new());
        assert_eq!(acks(&mut rx, DOOR), Vec::<i64>::new());
        // The schedule removed again: the code is written and the door acked.
        agent
            .apply(
                snapshot(3, false, &devices, vec![code(DOOR, 4, "5931", false)]),
                &tx,
            )
            .await
            .expect("apply");
        assert_eq!(held(&slots), BTreeMap::from([(4, "5931".to_owned())]));
        assert_eq!(acks(&mut rx, DOOR), vec![3]);
    }

    /// A lock that refuses every code in slot 9 (as a lock past its capacity or
    /// refusing the code would), counting the attempts.
    struct Picky {
        slots: Slots,
        attempts: Arc<AtomicU32>,
    }

    #[async_trait::async_trait]
    impl DeviceDriver for Picky {
        fn device(&self) -> &str {
            DOOR
        }
        fn model(&self) -> &'static DeviceModel {
            DeviceModel::find("door-1000").expect("door")
        }
        async fn read_slots(&mut self) -> Result<Vec<ObservedSlot>, DeviceError> {
            Ok(held(&self.slots)
                .into_iter()
                .map(|(slot, code)| ObservedSlot {
                    slot,
                    code: Some(code),
                })
                .collect())
        }
        async fn set_slot(&mut self, slot: u16, code: &str) -> Result<(), DeviceError> {
            if slot == 9 {
                self.attempts.fetch_add(1, Ordering::Relaxed);
                return Err(DeviceError::Refused {
                    slot,
                    reason: "the lock says no".into(),
                });
            }
            self.slots
                .lock()
                .expect("slots")
                .insert(slot, code.to_owned());
            Ok(())
        }
        async fn clear_slot(&mut self, slot: u16) -> Result<(), DeviceError> {
            self.slots.lock().expect("slots").remove(&slot);
            Ok(())
        }
    }

    struct PickyFactory(Slots, Arc<AtomicU32>);

    impl DriverFactory for PickyFactory {
        fn open(
            &self,
            _device: &str,
            _model: &'static DeviceModel,
        ) -> Result<Box<dyn DeviceDriver>, DeviceError> {
            Ok(Box::new(Picky {
                slots: self.0.clone(),
                attempts: self.1.clone(),
            }))
        }
    }

    #[tokio::test]
    async fn a_refused_code_is_tried_once_per_version_and_the_rest_still_lands() {
        let dir = TempDir::new();
        let slots = Slots::default();
        let attempts = Arc::new(AtomicU32::new(0));
        let mut agent = Agent::open(
            &dir.0,
            Box::new(PickyFactory(slots.clone(), attempts.clone())),
            Arc::new(SystemClock),
        )
        .expect("agent");
        let (tx, mut rx) = mpsc::channel(64);
        let devices = [(DOOR, "door-1000")];
        let table = |pin: &str| {
            vec![
                code(DOOR, 3, "4821", false),
                code(DOOR, 9, pin, false),
                code(DOOR, 12, "6042", false),
            ]
        };
        agent
            .apply(snapshot(1, false, &devices, table("5931")), &tx)
            .await
            .expect("apply");
        assert_eq!(
            held(&slots),
            BTreeMap::from([(3, "4821".to_owned()), (12, "6042".to_owned())]),
            "the codes after the refused one are written too"
        );
        assert_eq!(attempts.load(Ordering::Relaxed), 1);
        // Later passes do not send it again, and the device is not acked.
        agent.reconcile_all(Some(&tx)).await;
        agent.reconcile_all(Some(&tx)).await;
        assert_eq!(attempts.load(Ordering::Relaxed), 1);
        assert_eq!(acks(&mut rx, DOOR), Vec::<i64>::new());
        // Another code for the slot is tried (once).
        agent
            .apply(snapshot(2, false, &devices, table("7360")), &tx)
            .await
            .expect("apply");
        agent.reconcile_all(Some(&tx)).await;
        assert_eq!(attempts.load(Ordering::Relaxed), 2);
        assert_eq!(acks(&mut rx, DOOR), Vec::<i64>::new());
    }

    #[tokio::test]
    async fn a_door_that_cannot_lock_down_is_not_acked_and_gets_no_new_code() {
        let dir = TempDir::new();
        let (mut agent, slots) = bare_agent(&dir);
        let (tx, mut rx) = mpsc::channel(64);
        let devices = [(DOOR, "door-1000")];
        let one = || vec![code(DOOR, 3, "4821", false)];
        let two = || vec![code(DOOR, 3, "4821", false), code(DOOR, 4, "5931", false)];
        agent
            .apply(snapshot(1, false, &devices, one()), &tx)
            .await
            .expect("apply");
        assert_eq!(acks(&mut rx, DOOR), vec![1]);
        agent
            .apply(snapshot(2, true, &devices, two()), &tx)
            .await
            .expect("apply");
        agent.reconcile_all(Some(&tx)).await;
        assert_eq!(
            held(&slots),
            BTreeMap::from([(3, "4821".to_owned())]),
            "no new code while the lockdown is refused"
        );
        assert_eq!(acks(&mut rx, DOOR), Vec::<i64>::new(), "refused: no ack");
        // A removal still lands.
        agent
            .apply(snapshot(3, true, &devices, vec![]), &tx)
            .await
            .expect("apply");
        assert_eq!(held(&slots), BTreeMap::new());
        assert_eq!(acks(&mut rx, DOOR), Vec::<i64>::new());
        agent
            .apply(snapshot(4, false, &devices, two()), &tx)
            .await
            .expect("apply");
        assert_eq!(held(&slots).len(), 2);
        assert_eq!(acks(&mut rx, DOOR), vec![4]);
    }

    fn changes(
        revision: i64,
        devices: &[(&str, &str)],
        slots: Vec<pb::DesiredSlot>,
    ) -> pb::server_message::Msg {
        let pb::server_message::Msg::Snapshot(snap) = snapshot(revision, false, devices, slots)
        else {
            unreachable!("snapshot() builds snapshots")
        };
        pb::server_message::Msg::Changes(pb::DesiredChanges {
            from_revision: revision - 1,
            revision,
            slots: snap.slots,
            devices: snap.devices,
            time_zone: snap.time_zone,
            lockdown: false,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn a_code_with_an_unreadable_value_is_kept_off_the_device_and_not_acked() {
        let dir = TempDir::new();
        let (mut agent, slots) = bare_agent(&dir);
        let (tx, mut rx) = mpsc::channel(64);
        const LOCK: &str = "sites/s/devices/lock";
        let devices = [(LOCK, "zwave-lock-30")];
        let unreadable_end = |slot, pin| {
            let mut c = code(LOCK, slot, pin, false);
            c.valid_until_time = Some(prost_types::Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            });
            c
        };
        // Never written when first sent unreadable (read as "no end", it would be
        // on the lock for ever).
        agent
            .apply(
                snapshot(
                    1,
                    false,
                    &devices,
                    vec![unreadable_end(3, "4821"), code(LOCK, 4, "5931", false)],
                ),
                &tx,
            )
            .await
            .expect("apply");
        assert_eq!(held(&slots), BTreeMap::from([(4, "5931".to_owned())]));
        assert_eq!(acks(&mut rx, LOCK), Vec::<i64>::new(), "refused: no ack");
        // A written code that changes into an unreadable one is removed.
        agent
            .apply(changes(2, &devices, vec![unreadable_end(4, "5931")]), &tx)
            .await
            .expect("apply");
        assert_eq!(held(&slots), BTreeMap::new());
        assert_eq!(acks(&mut rx, LOCK), Vec::<i64>::new());
        // A restarted agent still knows the device is not in sync.
        agent.stop().await;
        let (mut agent, _) = bare_agent(&dir);
        agent.reconcile_all(Some(&tx)).await;
        assert_eq!(acks(&mut rx, LOCK), Vec::<i64>::new());
        // Readable again: written and acked.
        agent
            .apply(
                changes(
                    3,
                    &devices,
                    vec![code(LOCK, 3, "4821", false), code(LOCK, 4, "5931", false)],
                ),
                &tx,
            )
            .await
            .expect("apply");
        assert_eq!(acks(&mut rx, LOCK), vec![3]);
    }

    #[tokio::test]
    async fn a_panel_code_with_an_unknown_level_is_not_written_without_it() {
        let dir = TempDir::new();
        let mut agent = Agent::open(
            &dir.0,
            Box::new(SimulatorFactory::new(dir.0.join("devices"))),
            Arc::new(SystemClock),
        )
        .expect("agent");
        let (tx, mut rx) = mpsc::channel(64);
        const PANEL: &str = "sites/s/devices/panel";
        let mut unknown = code(PANEL, 3, "4821", false);
        unknown.authorities = vec![
            pb::PartitionAuthority {
                partition: 1,
                level: pb::Level::OperatorA as i32,
            },
            pb::PartitionAuthority {
                partition: 2,
                level: 99,
            },
        ];
        agent
            .apply(
                snapshot(1, false, &[(PANEL, "vista-128bpt")], vec![unknown]),
                &tx,
            )
            .await
            .expect("apply");
        let sim = keyplane_devices::SimulatedDevice::open(
            &dir.0.join("devices"),
            PANEL,
            DeviceModel::find("vista-128bpt").expect("panel model"),
        )
        .expect("sim");
        assert_eq!(
            sim.slots(),
            BTreeMap::new(),
            "not written with fewer levels"
        );
        assert_eq!(acks(&mut rx, PANEL), Vec::<i64>::new());
    }

    /// Devices acked so far (drains the channel).
    fn acked_devices(rx: &mut mpsc::Receiver<pb::AgentMessage>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            if let Some(pb::agent_message::Msg::Ack(a)) = msg.msg {
                out.push(a.device);
            }
        }
        out
    }

    /// A snapshot of `devices` in time zone `zone`.
    fn snapshot_in(
        zone: &str,
        revision: i64,
        devices: &[(&str, &str)],
        slots: Vec<pb::DesiredSlot>,
    ) -> pb::server_message::Msg {
        let pb::server_message::Msg::Snapshot(snap) = snapshot(revision, false, devices, slots)
        else {
            unreachable!("snapshot() builds snapshots")
        };
        pb::server_message::Msg::Snapshot(pb::DesiredSnapshot {
            time_zone: zone.to_owned(),
            ..snap
        })
    }

    #[tokio::test]
    async fn a_time_zone_change_re_times_every_scheduled_code_before_the_ack() {
        let dir = TempDir::new();
        // Wednesday 10:00 UTC is 19:00 in Tokyo: inside 08:00-18:00 in UTC only.
        let now = chrono::DateTime::parse_from_rfc3339("2024-01-10T10:00:00Z")
            .expect("instant")
            .with_timezone(&chrono::Utc);
        let clock = crate::clock::ManualClock::new(now);
        let sims = dir.0.join("devices");
        let mut agent = Agent::open(
            &dir.0,
            Box::new(SimulatorFactory::new(&sims)),
            Arc::new(clock),
        )
        .expect("agent");
        let (tx, mut rx) = mpsc::channel(64);
        const LOCK: &str = "sites/s/devices/lock";
        const PANEL: &str = "sites/s/devices/panel";
        let devices = [
            (LOCK, "zwave-lock-30"),
            (DOOR, "door-1000"),
            (PANEL, "vista-128bpt"),
        ];
        let slots = || {
            vec![
                code(LOCK, 3, "4821", true),
                code(DOOR, 3, "5931", true),
                code(PANEL, 3, "6042", true),
            ]
        };
        let sim = |device: &str, model: &str| {
            keyplane_devices::SimulatedDevice::open(
                &sims,
                device,
                DeviceModel::find(model).expect("model"),
            )
            .expect("sim")
        };
        agent
            .apply(snapshot_in("UTC", 1, &devices, slots()), &tx)
            .await
            .expect("apply");
        let acked = acked_devices(&mut rx);
        for (device, pin, model) in [(LOCK, "4821", devices[0].1), (DOOR, "5931", devices[1].1)] {
            assert_eq!(
                sim(device, model).present(pin, now).expect("present"),
                keyplane_devices::AccessOutcome::Granted,
                "{device}: open at 10:00 UTC"
            );
            assert!(acked.iter().any(|a| a == device), "{device} acked");
        }
        assert_eq!(sim(PANEL, "vista-128bpt").slots().len(), 1, "panel: open");
        // Only the zone changes.
        agent
            .apply(snapshot_in("Asia/Tokyo", 2, &devices, slots()), &tx)
            .await
            .expect("apply");
        let acked = acked_devices(&mut rx);
        for (device, pin, model) in [(LOCK, "4821", devices[0].1), (DOOR, "5931", devices[1].1)] {
            let mut device_sim = sim(device, model);
            assert_eq!(
                device_sim.present(pin, now).expect("present"),
                keyplane_devices::AccessOutcome::Denied("outside its schedule"),
                "{device}: 19:00 in Tokyo is outside 08:00-18:00"
            );
            assert_eq!(device_sim.writes(3), 2, "{device}: re-timed by a write");
            assert!(
                acked.iter().any(|a| a == device),
                "{device} acked once re-timed"
            );
        }
        assert_eq!(
            sim(PANEL, "vista-128bpt").slots().len(),
            0,
            "panel: the agent-timed code is removed at once"
        );
        assert!(acked.iter().any(|a| a == PANEL));
        // Nothing further to write in the same zone.
        agent.reconcile_all(Some(&tx)).await;
        assert_eq!(sim(LOCK, devices[0].1).writes(3), 2);
    }

    /// Slots reported in the Observed messages so far, per device (drains the channel).
    fn reported(rx: &mut mpsc::Receiver<pb::AgentMessage>) -> Vec<(String, Vec<i32>)> {
        let mut out = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            if let Some(pb::agent_message::Msg::Observed(o)) = msg.msg {
                out.push((o.device, o.slots.iter().map(|s| s.slot).collect()));
            }
        }
        out
    }

    #[tokio::test]
    async fn the_installer_slot_is_never_reported_written_nor_cleared() {
        let dir = TempDir::new();
        let sims = dir.0.join("devices");
        const PANEL: &str = "sites/s/devices/panel";
        let model = DeviceModel::find("vista-128bpt").expect("panel model");
        let mut panel = keyplane_devices::SimulatedDevice::open(&sims, PANEL, model).expect("sim");
        // Set at installation, at the keypad, and a user code programmed by hand.
        panel.program_at_keypad(1, "4140").expect("installer code");
        panel.program_at_keypad(5, "7777").expect("hand code");
        let mut agent = Agent::open(
            &dir.0,
            Box::new(SimulatorFactory::new(&sims)),
            Arc::new(SystemClock),
        )
        .expect("agent");
        let (tx, mut rx) = mpsc::channel(64);
        let devices = [(PANEL, "vista-128bpt")];
        agent
            .apply(
                snapshot(
                    1,
                    false,
                    &devices,
                    vec![code(PANEL, 1, "5555", false), code(PANEL, 3, "4821", false)],
                ),
                &tx,
            )
            .await
            .expect("apply");
        assert_eq!(panel.code_in(1).as_deref(), Some("4140"), "never written");
        assert_eq!(panel.code_in(3).as_deref(), Some("4821"));
        let msgs = reported(&mut rx);
        assert!(!msgs.is_empty(), "the panel was read back");
        for (_, slots) in &msgs {
            assert!(!slots.contains(&1), "user 001 reported: {slots:?}");
            assert!(slots.contains(&5), "the hand code is reported");
        }
        // Asked to clear it (as AUTHORITATIVE would clear a LOCAL code): refused.
        let clear = |slot| pb::DesiredSlot {
            device: PANEL.to_owned(),
            slot,
            remove_local: true,
            ..Default::default()
        };
        agent
            .apply(changes(2, &devices, vec![clear(1), clear(5)]), &tx)
            .await
            .expect("apply");
        assert_eq!(panel.code_in(1).as_deref(), Some("4140"), "never cleared");
        assert_eq!(panel.code_in(5), None, "a LOCAL code is cleared");
        assert_eq!(
            acks(&mut rx, PANEL),
            Vec::<i64>::new(),
            "a code keyplaned wants in a reserved slot keeps the panel out of sync"
        );
        // keyplaned moves the code away from 001: in sync, 001 untouched.
        agent
            .apply(
                changes(
                    3,
                    &devices,
                    vec![
                        pb::DesiredSlot {
                            device: PANEL.to_owned(),
                            slot: 1,
                            ..Default::default()
                        },
                        code(PANEL, 2, "5555", false),
                    ],
                ),
                &tx,
            )
            .await
            .expect("apply");
        assert_eq!(panel.code_in(1).as_deref(), Some("4140"));
        assert_eq!(panel.code_in(2).as_deref(), Some("5555"));
        assert_eq!(acks(&mut rx, PANEL), vec![3]);
    }

    /// Log lines written while the returned guard lives (this thread only).
    fn capture_logs() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
        #[derive(Clone)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("log sink").extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Sink(buf.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish();
        (buf, tracing::subscriber::set_default(subscriber))
    }

    #[tokio::test]
    async fn a_panel_user_number_is_logged_one_way() {
        let (logs, _guard) = capture_logs();
        let dir = TempDir::new();
        let sims = dir.0.join("devices");
        const PANEL: &str = "sites/s/devices/panel";
        let model = DeviceModel::find("vista-128bpt").expect("panel model");
        let mut panel = keyplane_devices::SimulatedDevice::open(&sims, PANEL, model).expect("sim");
        panel.program_at_keypad(5, "7777").expect("hand code");
        let mut agent = Agent::open(
            &dir.0,
            Box::new(SimulatorFactory::new(&sims)),
            Arc::new(SystemClock),
        )
        .expect("agent");
        let (tx, _rx) = mpsc::channel(64);
        let devices = [(PANEL, "vista-128bpt")];
        agent
            .apply(snapshot(1, false, &devices, vec![]), &tx)
            .await
            .expect("apply");
        let remove = pb::DesiredSlot {
            device: PANEL.to_owned(),
            slot: 5,
            remove_local: true,
            ..Default::default()
        };
        agent
            .apply(changes(2, &devices, vec![remove]), &tx)
            .await
            .expect("apply");
        assert_eq!(panel.code_in(5), None);
        let logs = String::from_utf8(logs.lock().expect("logs").clone()).expect("utf-8");
        let slots: Vec<&str> = logs
            .lines()
            .filter(|l| {
                l.contains("code programmed at the device") || l.contains("local code cleared")
            })
            .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("slot=")))
            .collect();
        assert_eq!(slots, ["slot=005", "slot=005"], "{logs}");
        assert!(!logs.contains("7777"), "no code in the logs");
    }

    /// Full doors (every slot of a door-1000) applied by one agent: each slot is
    /// written once and every door acked. Prints how long it took (the per-device
    /// pass must stay O(n log n) in the slots: it was O(n^2), minutes for a site of
    /// full doors); no time is asserted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_doors_are_applied_once_each_slot() {
        const DOORS: usize = 5;
        let dir = TempDir::new();
        let sims = dir.0.join("devices");
        let mut agent = Agent::open(
            &dir.0,
            Box::new(SimulatorFactory::new(&sims)),
            Arc::new(SystemClock),
        )
        .expect("agent");
        let (tx, mut rx) = mpsc::channel(DOORS * 1100);
        let names: Vec<String> = (0..DOORS)
            .map(|d| format!("sites/s/devices/door{d}"))
            .collect();
        let devices: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "door-1000")).collect();
        let slots: Vec<pb::DesiredSlot> = names
            .iter()
            .flat_map(|n| {
                (1..=1000).map(move |s| code(n, s, &format!("{:06}", 100_000 + s * 7), false))
            })
            .collect();
        let started = std::time::Instant::now();
        agent
            .apply(snapshot(1, false, &devices, slots), &tx)
            .await
            .expect("apply");
        let took = started.elapsed();
        eprintln!(
            "{} slots on {DOORS} full doors applied in {:.2} s",
            DOORS * 1000,
            took.as_secs_f64()
        );
        let acked = acked_devices(&mut rx);
        for name in &names {
            let sim = keyplane_devices::SimulatedDevice::open(
                &sims,
                name,
                DeviceModel::find("door-1000").expect("model"),
            )
            .expect("sim");
            assert_eq!(sim.slots().len(), 1000, "{name}");
            assert_eq!(sim.total_writes(), 1000, "{name}: each slot written once");
            assert!(acked.contains(name), "{name} acked");
        }
        agent.stop().await;
    }
}
