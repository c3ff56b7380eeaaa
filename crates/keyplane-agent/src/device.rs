//! One task per device: it owns the device's driver and is the only one to reach the
//! device, so writes to it are serialized and paced, and a slow, sleeping or offline
//! device holds back nothing but itself. Each pass is level-triggered: observe the
//! device when due, compare with the journaled desired table (the rules are
//! keyplane-core's), act, and hand back the acks and reports the pass produced.

use crate::journal::{Code, DeviceJournal, Journal};
use crate::reconcile::{Outbound, Shared, classify, event_pb, is_link_error};
use crate::reports::{Outcome, Reports};
use keyplane_core::constraints::ReportedConstraints;
use keyplane_core::event_log::{Continuity, EventMark, continuity, epoch_of};
use keyplane_core::plan::{DesiredCode, SlotAction, Validity, WriteCheck, plan_device};
use keyplane_core::{DeviceKind, DeviceModel};
use keyplane_devices::{DeviceDriver, DeviceError, EventKind};
use keyplane_proto::v1 as pb;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// An unchanged observation is sent again after this many read-back periods.
const HEAL_EVERY: u32 = 10;

/// Writes a read-back can recognise are confirmed by one read-back of the device
/// and committed to the journal in batches of at most this many (one redb
/// transaction and fsync each): a crash loses at most a batch, and the first pass
/// after a restart adopts those from the read-back instead of writing them again.
const JOURNAL_BATCH: usize = 64;

/// How long to wait between two writes to one device, per kind of device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pacing {
    /// Alarm panels: programming goes over the keypad bus, one user at a time.
    pub panel: Duration,
    /// Locks: battery powered, one radio command at a time (a Z-Wave JS lock also
    /// keeps its driver's own write gap).
    pub lock: Duration,
    /// Access-control doors: controllers on a wired network.
    pub door: Duration,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            panel: Duration::from_millis(100),
            lock: Duration::from_millis(250),
            door: Duration::ZERO,
        }
    }
}

impl Pacing {
    /// The gap between two writes to a device of `kind`.
    pub fn of(&self, kind: DeviceKind) -> Duration {
        match kind {
            DeviceKind::Panel => self.panel,
            DeviceKind::Lock => self.lock,
            DeviceKind::Door => self.door,
        }
    }
}

/// What one pass decided to tell keyplaned, in order: reports, then the ack.
#[derive(Debug, Default)]
pub(crate) struct PassOutput {
    /// Write outcomes, reachability, inventory and observations.
    pub(crate) reports: Vec<pb::AgentMessage>,
    /// The revision the device now holds in full (acked when connected).
    pub(crate) ack: Option<i64>,
    /// The device left the site and holds nothing of keyplane's: its task ends.
    pub(crate) gone: bool,
}

/// Everything one pass plans from, read from the journal at once, so a pass works
/// on one revision's table even while the next one is journaled.
struct Planned {
    revision: i64,
    model: &'static DeviceModel,
    present: bool,
    zone: String,
    lockdown: bool,
    lockdown_applied: bool,
    desired: BTreeMap<u16, Code>,
    written: BTreeMap<u16, Code>,
    remove_local: BTreeSet<u16>,
    observed: Option<BTreeMap<u16, Option<String>>>,
    refused_by_agent: bool,
}

/// Where the agent stands in a device's event log (from the journal).
#[derive(Debug, Clone, Copy)]
struct LogPosition {
    /// Highest sequence number keyplaned stored, in `epoch`.
    acked: u64,
    /// The epoch naming the log (None: not named yet).
    epoch: Option<u64>,
    /// The last event read.
    anchor: Option<EventMark>,
}

/// The task of one device.
pub(crate) struct DeviceTask {
    name: String,
    shared: Arc<Shared>,
    driver: Option<Box<dyn DeviceDriver>>,
    outbound: watch::Receiver<Option<Outbound>>,
    /// Woken when the journal changed for this device (or all of them).
    kick: Arc<Notify>,
    /// Highest event sequence sent on the current stream.
    events_sent: u64,
    /// Read the device back on the next pass (written to, or a new stream).
    observe_due: bool,
    observed_at: Option<std::time::Instant>,
    /// The last observation sent on this stream, and when: an unchanged one is
    /// sent again only every HEAL_EVERY read-back periods (a lost report heals).
    reported: Option<(Vec<pb::ObservedSlot>, std::time::Instant)>,
    /// The first pass reads the device, so it plans against what the device holds
    /// (a write that landed just before a crash is adopted, not written again).
    read_since_start: bool,
    last_event_poll: Instant,
    last_write: Option<Instant>,
    pace: Duration,
    /// Codes the driver refused as unsupported, per slot: not tried again (nor
    /// reported again) until keyplaned sends another code for the slot.
    refused: HashMap<u16, DesiredCode>,
    /// The door's driver refused a lockdown (reported once).
    lockdown_refused: bool,
    /// The (slot, state) of the findings already logged.
    findings_logged: BTreeSet<(i32, i32)>,
    reports: Reports,
    /// What the device said about itself, once asked.
    constraints: Option<Option<ReportedConstraints>>,
    /// A write waits for a partition to be disarmed: a disarm event starts a pass.
    deferred_armed: bool,
    /// The revision the current pass works on.
    revision: i64,
    /// The revision acked on the current stream: an ack sent on a stream that was
    /// cut may never have reached keyplaned, so each stream is told again.
    acked_on_stream: i64,
    /// Journal changes made in memory and not committed yet (see JOURNAL_BATCH).
    unsaved: usize,
}

impl DeviceTask {
    /// The task of device `name`, not started.
    pub(crate) fn new(
        name: String,
        shared: Arc<Shared>,
        outbound: watch::Receiver<Option<Outbound>>,
        kick: Arc<Notify>,
    ) -> DeviceTask {
        DeviceTask {
            name,
            shared,
            driver: None,
            outbound,
            kick,
            events_sent: 0,
            observe_due: true,
            observed_at: None,
            reported: None,
            read_since_start: false,
            last_event_poll: Instant::now(),
            last_write: None,
            pace: Duration::ZERO,
            refused: HashMap::new(),
            lockdown_refused: false,
            findings_logged: BTreeSet::new(),
            reports: Reports::default(),
            constraints: None,
            deferred_armed: false,
            revision: 0,
            acked_on_stream: 0,
            unsaved: 0,
        }
    }

    /// Runs passes (when kicked, and every reconcile period) and event polls (every
    /// poll period) until `cancel`, or until the device left the site.
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        let progress = self.shared.progress.clone();
        let settings = self.shared.settings.clone();
        let mut tick = tokio::time::interval(settings.reconcile_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut events = tokio::time::interval(settings.event_poll);
        events.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The stream current at the start counts as new (once: an ack sent on it
        // is not sent again).
        self.stream_changed();
        loop {
            let pass = tokio::select! {
                // cancel-safe: a token.
                _ = cancel.cancelled() => break,
                // cancel-safe: a Notify keeps its permit until awaited.
                _ = self.kick.notified() => true,
                // cancel-safe: interval ticks.
                _ = tick.tick() => true,
                // cancel-safe: interval ticks.
                _ = events.tick() => false,
                // cancel-safe: a watch remembers the change until seen.
                changed = self.outbound.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.stream_changed();
                    true
                }
            };
            if pass {
                let keep = tokio::select! {
                    // Dropping a pass mid-write is a crash in small: the journal
                    // and the next pass's read-back settle it.
                    _ = cancel.cancelled() => break,
                    keep = self.pass() => keep,
                };
                if !keep {
                    break;
                }
            } else {
                let disarmed = tokio::select! {
                    _ = cancel.cancelled() => break,
                    d = self.poll_events() => d,
                };
                if disarmed && self.deferred_armed {
                    // Programming waited for this: apply it right after the disarm.
                    self.kick.notify_one();
                }
            }
        }
        if let Err(e) = self.flush() {
            tracing::error!(error = %e, "journal save failed");
        }
        progress.leave(&self.name);
    }

    fn out(&self) -> Option<Outbound> {
        self.outbound.borrow().clone()
    }

    /// A new stream (maybe a new server): events keyplaned has not acked are sent
    /// again (it stores each once), and the device is read back and reported again.
    fn stream_changed(&mut self) {
        let _ = self.outbound.borrow_and_update();
        self.events_sent = 0;
        self.acked_on_stream = 0;
        self.reported = None;
        self.reports.stream_started();
        self.observe_due = true;
    }

    /// One level-triggered pass, then what it produced is sent (when connected).
    /// False when the device left the site and its task ends.
    async fn pass(&mut self) -> bool {
        self.shared.progress.started(&self.name);
        // A pass that brings the device to a revision keyplaned sent with trace
        // context is a span of that trace; the ack carries it back.
        let (acked, journaled) = self
            .shared
            .journal(|j| (j.devices.get(&self.name).map_or(0, |d| d.acked), j.revision));
        let span = match self.shared.trace_between(acked, journaled) {
            Some(traceparent) => {
                let span = tracing::info_span!(
                    "device.apply",
                    revision = journaled,
                    trace_id = tracing::field::Empty
                );
                if let Some(trace) = keyplane_telemetry::set_parent(&span, &traceparent) {
                    span.record("trace_id", trace);
                }
                span
            }
            None => tracing::Span::none(),
        };
        let output = tracing::Instrument::instrument(self.reconcile_pass(), span.clone()).await;
        let traceparent = keyplane_telemetry::traceparent(&span).unwrap_or_default();
        drop(span);
        let out = self.out();
        if let Some(out) = &out {
            for msg in output.reports {
                if out.routine.send(msg).await.is_err() {
                    break;
                }
            }
            if let Some(revision) = output.ack {
                let ack = pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::Ack(pb::Ack {
                        device: self.name.clone(),
                        revision,
                        traceparent,
                    })),
                };
                if out.routine.send(ack).await.is_ok() {
                    crate::metrics::metrics().applied();
                    self.acked_on_stream = revision;
                    let journaled = self.device_mut(|d| d.acked = d.acked.max(revision));
                    if let Err(e) = journaled {
                        tracing::error!(error = %e, "journal save failed");
                    }
                }
            }
        }
        if let Some(out) = &out {
            let queued = out.routine.max_capacity() - out.routine.capacity();
            crate::metrics::metrics()
                .queue_depth
                .set(i64::try_from(queued).unwrap_or(i64::MAX));
        }
        self.shared.progress.completed(&self.name);
        !output.gone
    }

    /// Observes, compares, acts on the device; returns the reports and the ack to
    /// send instead of sending them.
    pub(crate) async fn reconcile_pass(&mut self) -> PassOutput {
        let connected = self.out().is_some();
        self.ask_constraints().await;
        let mut result = self.reconcile().await;
        if let Err(e) = self.flush() {
            result = result.and(Err(e));
        }
        // Reachability for the status of each slot: a link error means the device
        // was not reached; a read-back that went through means it was.
        let mut reached = match &result {
            Err(e) if is_link_error(e) => Some(false),
            _ => None,
        };
        let mut output = PassOutput::default();
        let present = self
            .shared
            .journal(|j| j.devices.get(&self.name).is_some_and(|d| d.present));
        let stale = self
            .observed_at
            .is_none_or(|t| t.elapsed() >= self.shared.settings.observe_every);
        if connected && present && (std::mem::take(&mut self.observe_due) || stale) {
            match self.observe().await {
                Ok(msg) => {
                    reached = reached.or(Some(true));
                    output.reports.extend(msg);
                }
                Err(e) => {
                    if is_link_error(&e) {
                        reached = Some(false);
                    }
                    self.observe_due = true;
                    tracing::warn!(device = %self.name, error = %e, "reading the device back failed; will retry");
                }
            }
        }
        if let Some(reachable) = reached {
            self.reports
                .reached(&self.name, reachable, self.shared.clock.now());
        }
        let mut queued = self.reports.take();
        queued.append(&mut output.reports);
        output.reports = queued;
        match result {
            Ok(true) => {
                let revision = self.revision;
                let name = self.name.clone();
                // A device keyplaned no longer lists, now holding nothing of
                // keyplane's, leaves the journal and its task ends.
                let settled: anyhow::Result<Option<()>> = self.shared.journal(|j| {
                    let Some(d) = j.devices.get(&name) else {
                        return Ok(None);
                    };
                    if !d.present {
                        j.devices.remove(&name);
                        j.save()?;
                        return Ok(None);
                    }
                    Ok(Some(()))
                });
                match settled {
                    Ok(None) => {
                        output.gone = true;
                        self.driver = None;
                    }
                    Ok(Some(())) => {
                        output.ack =
                            (connected && self.acked_on_stream < revision).then_some(revision);
                    }
                    Err(e) => tracing::error!(error = %e, "journal save failed"),
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(device = %self.name, error = %e, "device not reconciled; will retry")
            }
        }
        output
    }

    /// Runs `f` on this device's journal entry and commits; None when the device
    /// is no longer journaled.
    fn device_mut<T>(&self, f: impl FnOnce(&mut DeviceJournal) -> T) -> anyhow::Result<Option<T>> {
        self.shared.journal(|j: &mut Journal| {
            let Some(d) = j.devices.get_mut(&self.name) else {
                return Ok(None);
            };
            let out = f(d);
            j.save()?;
            Ok(Some(out))
        })
    }

    /// Runs `f` on this device's journal entry without committing: the change is
    /// committed with the next batch (or any save before). Only for changes a
    /// read-back recovers after a crash (see JOURNAL_BATCH).
    fn device_batched<T>(
        &mut self,
        f: impl FnOnce(&mut DeviceJournal) -> T,
    ) -> anyhow::Result<Option<T>> {
        let out = self
            .shared
            .journal(|j: &mut Journal| j.devices.get_mut(&self.name).map(f));
        self.unsaved += 1;
        if self.unsaved >= JOURNAL_BATCH {
            self.flush()?;
        }
        Ok(out)
    }

    /// Commits the batched journal changes.
    fn flush(&mut self) -> anyhow::Result<()> {
        if std::mem::take(&mut self.unsaved) > 0 {
            self.shared.journal(|j| j.save())?;
        }
        Ok(())
    }

    fn driver(
        &mut self,
        model: &'static DeviceModel,
    ) -> anyhow::Result<&mut Box<dyn DeviceDriver>> {
        if self.driver.is_none() {
            self.driver = Some(self.shared.factory.open(&self.name, model)?);
            self.pace = self.shared.settings.pacing.of(model.kind);
        }
        self.driver
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("driver for {} vanished", self.name))
    }

    fn model(&self) -> Option<&'static DeviceModel> {
        self.shared.journal(|j| {
            j.devices
                .get(&self.name)
                .and_then(|d| DeviceModel::find(&d.model))
        })
    }

    /// Waits out the device's pacing since its last write, reading its events if a
    /// poll is due meanwhile: a duress code waits for one write at most.
    async fn before_write(&mut self) {
        if let Some(last) = self.last_write {
            tokio::time::sleep_until(last + self.pace).await;
        }
        if self.last_event_poll.elapsed() >= self.shared.settings.event_poll {
            let disarmed = self.poll_events().await;
            let _ = disarmed;
        }
    }

    fn wrote(&mut self) {
        self.last_write = Some(Instant::now());
    }

    /// Reads new events from the device and sends them: duress on the urgent queue,
    /// ahead of everything else, the rest on the routine one. True when a partition
    /// was disarmed.
    async fn poll_events(&mut self) -> bool {
        self.last_event_poll = Instant::now();
        let Some(out) = self.out() else {
            return false;
        };
        let mut disarmed = false;
        let known = self.shared.journal(|j| {
            j.devices
                .get(&self.name)
                .filter(|d| d.present)
                .and_then(|d| {
                    DeviceModel::find(&d.model).map(|m| {
                        let log = LogPosition {
                            acked: d.events_acked,
                            epoch: d.events_epoch.or((d.events_acked > 0).then_some(0)),
                            anchor: d.events_anchor,
                        };
                        (m, log)
                    })
                })
        });
        if let Some((model, log)) = known {
            match self.read_new_events(model, log).await {
                Ok((epoch, events)) => {
                    // Duress first, on the urgent queue: it never waits behind
                    // routine events the stream has not taken yet.
                    for event in events.iter().filter(|e| e.kind == EventKind::Duress) {
                        if out
                            .urgent
                            .send(event_pb(&self.name, epoch, event))
                            .await
                            .is_ok()
                        {
                            tracing::warn!(device = %self.name, seq = event.seq, "duress code used: silent alarm sent");
                        }
                    }
                    for event in events {
                        disarmed |= event.kind == EventKind::Disarmed;
                        // keyplaned stores each event once: a duress event seen
                        // again (after a routine send failed) is harmless.
                        if event.kind != EventKind::Duress
                            && out
                                .routine
                                .send(event_pb(&self.name, epoch, &event))
                                .await
                                .is_err()
                        {
                            break;
                        }
                        self.events_sent = event.seq;
                    }
                }
                Err(e) => {
                    tracing::warn!(device = %self.name, error = %e, "reading events failed; will retry")
                }
            }
        }
        self.shared.progress.polled(&self.name);
        disarmed
    }

    /// The events of the device's log keyplaned has not stored, and the epoch naming
    /// the log. Each read starts at the anchor (the last event read), so a log that
    /// restarted (panel reset or replaced, counter wrapped) is noticed and read from
    /// its start under a new epoch instead of being taken for events already stored.
    async fn read_new_events(
        &mut self,
        model: &'static DeviceModel,
        log: LogPosition,
    ) -> anyhow::Result<(u64, Vec<keyplane_devices::DeviceEvent>)> {
        let mut after = self.events_sent.max(log.acked);
        let from = log
            .anchor
            .map_or(after, |a| a.seq.saturating_sub(1).min(after));
        let mut read = self.driver(model)?.read_events(from).await?;
        let marks: Vec<EventMark> = read.iter().map(|e| e.mark()).collect();
        let restarted = continuity(log.anchor, &marks) == Continuity::Restarted;
        if restarted {
            tracing::info!(
                device = %self.name,
                "the device's event log restarted (reset, replaced or wrapped): reading it from its start under a new epoch"
            );
            read = self.driver(model)?.read_events(0).await?;
            self.events_sent = 0;
            after = 0;
        }
        let epoch = match (log.epoch, read.first()) {
            (Some(epoch), _) if !restarted => Some(epoch),
            (previous, Some(first)) => Some(epoch_of(first.mark(), previous.unwrap_or(0))),
            (_, None) => None,
        };
        let anchor = read
            .last()
            .map(|e| e.mark())
            .or(if restarted { None } else { log.anchor });
        if restarted || epoch != log.epoch {
            // Committed before any event of the new log is sent: an ack of it must
            // find the epoch it names.
            self.device_mut(|d| {
                d.events_epoch = epoch;
                d.events_anchor = anchor;
                if restarted {
                    d.events_acked = 0;
                }
            })?;
        } else if anchor != log.anchor {
            // Losing this to a crash only means starting from an older anchor, one
            // the log still holds.
            self.device_batched(|d| d.events_anchor = anchor)?;
        }
        let Some(epoch) = epoch else {
            return Ok((0, Vec::new()));
        };
        read.retain(|e| e.seq > after);
        Ok((epoch, read))
    }

    /// Reads the device's slot table back (through its checksum first, where it
    /// has one) and returns its classification to send when it changed, or when
    /// the same one was last sent HEAL_EVERY read-back periods ago (a lost report
    /// heals). Codes programmed at the device are never touched here.
    async fn observe(&mut self) -> anyhow::Result<Option<pb::AgentMessage>> {
        let Some(model) = self.model() else {
            return Ok(None);
        };
        let checksum = self.driver(model)?.read_checksum().await?;
        let name = self.name.clone();
        let known = self.shared.journal(|j| {
            j.devices.get(&name).and_then(|d| {
                // Same checksum as at the last full read: the table has not changed.
                d.observed
                    .as_deref()
                    .filter(|_| checksum.is_some() && d.observed_checksum == checksum)
                    .cloned()
            })
        });
        let table: BTreeMap<u16, Option<String>> = match known {
            Some(table) => table,
            None => {
                let slots = self.driver(model)?.read_slots().await?;
                slots.into_iter().map(|o| (o.slot, o.code)).collect()
            }
        };
        let report = self.device_mut(|d| {
            d.observed = Some(table.clone().into());
            d.observed_checksum = checksum;
            classify(model, d, &table)
        })?;
        let Some(report) = report else {
            return Ok(None);
        };
        self.log_findings(model, &report);
        let now = std::time::Instant::now();
        self.observed_at = Some(now);
        let heal = self.shared.settings.observe_every * HEAL_EVERY;
        let fresh = self
            .reported
            .as_ref()
            .is_some_and(|(last, at)| *last == report && now.duration_since(*at) < heal);
        if fresh {
            return Ok(None);
        }
        self.reported = Some((report.clone(), now));
        Ok(Some(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Observed(pb::ObservedSlots {
                device: self.name.clone(),
                slots: report,
            })),
        }))
    }

    /// Logs each drifted, missing or hand-programmed slot once, when first found
    /// (also across reconnects, which report every device again).
    fn log_findings(&mut self, model: &DeviceModel, report: &[pb::ObservedSlot]) {
        let found: BTreeSet<(i32, i32)> = report
            .iter()
            .filter(|o| o.state != pb::ObservedState::Managed as i32)
            .map(|o| (o.slot, o.state))
            .collect();
        for &(slot, state) in found.difference(&self.findings_logged) {
            let shown =
                u16::try_from(slot).map_or_else(|_| slot.to_string(), |s| model.display_slot(s));
            let what = match pb::ObservedState::try_from(state) {
                Ok(pb::ObservedState::Drifted) => {
                    "drift: the code keyplane wrote was changed at the device; left alone until the dealer re-applies or adopts it (ResolveDrift)"
                }
                Ok(pb::ObservedState::Missing) => {
                    "drift: the code keyplane wrote was cleared at the device; left alone until the dealer re-applies it (ResolveDrift)"
                }
                Ok(pb::ObservedState::Foreign) => {
                    "a code programmed at the device was found (a LOCAL code: ListLocalCodes)"
                }
                Ok(pb::ObservedState::Conflict) => {
                    "a code programmed at the device repeats a code keyplane manages on it (a LOCAL code in conflict)"
                }
                Ok(pb::ObservedState::Unverifiable) => {
                    "the device masks this slot's code: whether it holds keyplane's code cannot be checked"
                }
                _ => continue,
            };
            tracing::info!(device = %self.name, slot = %shown, "{what}");
        }
        self.findings_logged = found;
    }

    /// Asks the device what it says about itself, and queues an inventory entry for
    /// keyplaned when that changes (issue 11: reported constraints; a Z-Wave lock's
    /// count is learnt once its server answers, and masking once a code reads masked).
    async fn ask_constraints(&mut self) {
        let Some(model) = self.shared.journal(|j| {
            j.devices
                .get(&self.name)
                .filter(|d| d.present)
                .and_then(|d| DeviceModel::find(&d.model))
        }) else {
            return;
        };
        let asked = match self.driver(model) {
            Ok(driver) => driver.reported_constraints().await,
            Err(e) => {
                tracing::debug!(device = %self.name, error = %e, "driver not opened; constraints asked later");
                return;
            }
        };
        match asked {
            Ok(reported) => {
                let known = self.constraints.as_ref();
                if known != Some(&reported) && (reported.is_some() || known.is_some()) {
                    self.reports.inventory(pb::InventoryDevice {
                        device: self.name.clone(),
                        kind: pb::DeviceKind::from(model.kind) as i32,
                        model: model.id.to_owned(),
                        constraints: reported
                            .as_ref()
                            .map(keyplane_proto::convert::reported_constraints_pb),
                    });
                }
                self.shared.set_constraints(&self.name, reported.clone());
                self.constraints = Some(reported);
            }
            Err(e) => {
                tracing::debug!(device = %self.name, error = %e, "device constraints not read; asked again next pass")
            }
        }
    }

    /// Reads what one pass plans from, at once.
    fn planned(&self) -> anyhow::Result<Option<Planned>> {
        self.shared.journal(|j| {
            let Some(d) = j.devices.get(&self.name) else {
                return Ok(None);
            };
            let model = DeviceModel::find(&d.model)
                .ok_or_else(|| anyhow::anyhow!("unknown device model {}", d.model))?;
            // Reserved slots never reach the planner (a journal from an older
            // agent may still name one): keyplane neither writes nor clears them.
            let usable = |table: &BTreeMap<u16, Code>| -> BTreeMap<u16, Code> {
                table
                    .iter()
                    .filter(|(s, _)| !model.is_reserved(**s))
                    .map(|(s, c)| (*s, c.clone()))
                    .collect()
            };
            Ok(Some(Planned {
                revision: j.revision,
                model,
                present: d.present,
                zone: if j.time_zone.is_empty() {
                    "UTC".to_owned()
                } else {
                    j.time_zone.clone()
                },
                lockdown: model.kind == DeviceKind::Door && d.present && j.lockdown,
                lockdown_applied: d.lockdown_applied,
                desired: usable(&d.desired),
                written: usable(&d.written),
                remove_local: d
                    .remove_local
                    .iter()
                    .copied()
                    .filter(|s| !model.is_reserved(*s))
                    .collect(),
                observed: d.observed.as_deref().cloned(),
                refused_by_agent: !d.refused.is_empty(),
            }))
        })
    }

    /// Applies the planner's actions to the device; true when it holds the pass's
    /// revision in full.
    async fn reconcile(&mut self) -> anyhow::Result<bool> {
        let Some(first) = self.planned()? else {
            return Ok(true);
        };
        if !self.read_since_start && first.present {
            let held = self.driver(first.model)?.read_slots().await?;
            self.device_mut(|d| {
                d.observed = Some(held.into_iter().map(|o| (o.slot, o.code)).collect());
                d.observed_checksum = None;
            })?;
            self.read_since_start = true;
        }
        let Some(p) = self.planned()? else {
            return Ok(true);
        };
        self.revision = p.revision;
        let model = p.model;
        let name = self.name.clone();
        // Locks and doors that keep schedules enforce them; for the others (panels)
        // the agent installs and removes codes on time.
        let keeps_schedules = model.on_device_schedules;
        let now = self.shared.clock.now();
        let due: BTreeMap<u16, DesiredCode> = p
            .desired
            .iter()
            .filter_map(|(s, c)| {
                let validity = Validity {
                    from: c.valid_from,
                    until: c.valid_until,
                };
                keyplane_core::plan::code_due(
                    &DesiredCode::from(c),
                    validity,
                    &p.zone,
                    now,
                    keeps_schedules,
                )
                .map(|code| (*s, code))
            })
            .collect();
        let written: BTreeMap<u16, DesiredCode> = p
            .written
            .iter()
            .map(|(s, c)| (*s, DesiredCode::from(c)))
            .collect();
        let actions = plan_device(&due, &written);
        let observed = p.observed.clone().unwrap_or_default();
        // A device that masks codes cannot show a write landed: those are committed
        // one by one.
        let masking = observed.values().any(Option::is_none);
        // False once anything keyplaned wants could not be done: no ack then, so
        // the device shows as not applied in GetSyncStatus.
        let mut in_sync = !p.refused_by_agent;
        self.deferred_armed = false;
        // A door that should be locked down but cannot be gets no new code.
        let mut adding_allowed = true;
        if p.lockdown != p.lockdown_applied {
            let on = p.lockdown;
            self.before_write().await;
            let result = self.driver(model)?.set_lockdown(on).await;
            self.wrote();
            match result {
                Ok(()) => {
                    self.device_mut(|d| d.lockdown_applied = on)?;
                    self.lockdown_refused = false;
                    tracing::info!(device = %name, lockdown = on, "door lockdown applied");
                }
                Err(e) if e.is_unsupported() => {
                    if !self.lockdown_refused {
                        self.lockdown_refused = true;
                        tracing::error!(
                            device = %name,
                            lockdown = on,
                            error = %e,
                            "the door cannot be locked down and still accepts its codes; \
                             no new code is written to it until the lockdown is released"
                        );
                    }
                    in_sync = false;
                    adding_allowed = !on;
                }
                Err(e) => return Err(e.into()),
            }
        } else if !p.lockdown {
            self.lockdown_refused = false;
        }
        // Revocations first: codes programmed at the device that the dealer removed
        // (or the AUTHORITATIVE policy clears), the only slots keyplane clears
        // unwritten, each confirmed by reading the device back.
        let (to_clear, to_forget) =
            keyplane_core::plan::local_clears(&p.remove_local, &written, p.observed.as_ref());
        if !to_forget.is_empty() {
            self.device_mut(|d| {
                for slot in &to_forget {
                    d.remove_local.remove(slot);
                }
            })?;
        }
        if !to_clear.is_empty() {
            for slot in &to_clear {
                self.before_write().await;
                let result = self.driver(model)?.clear_slot(*slot).await;
                self.wrote();
                result?;
            }
            self.observe_due = true;
            let held = self.read_back(model).await;
            let occupied: Option<BTreeSet<u16>> =
                held.as_ref().map(|h| h.keys().copied().collect());
            let (confirmed, unconfirmed) =
                keyplane_core::plan::settle_clears(&to_clear, occupied.as_ref());
            self.device_mut(|d| {
                if let Some(h) = held {
                    d.observed = Some(h.into());
                    d.observed_checksum = None;
                }
                for slot in &confirmed {
                    d.remove_local.remove(slot);
                }
            })?;
            for slot in &confirmed {
                tracing::info!(device = %name, slot = %model.display_slot(*slot), "local code cleared");
            }
            for slot in &unconfirmed {
                tracing::warn!(device = %name, slot = %model.display_slot(*slot), "a cleared local code still shows on read-back; cleared again next pass");
            }
            in_sync &= unconfirmed.is_empty();
        }
        if actions.is_empty() {
            return Ok(in_sync);
        }
        self.observe_due = true;
        // Clears the device took, waiting for the read-back that confirms them.
        let mut cleared: Vec<u16> = Vec::new();
        // Codes the device took that a read-back can recognise, waiting for the one
        // that confirms them (drivers that confirm their own writes excepted).
        let mut set: Vec<(u16, DesiredCode)> = Vec::new();
        let is_panel = model.kind == DeviceKind::Panel;
        let confirms_writes = self.driver(model)?.confirms_writes();
        for action in actions {
            // Revocations first: every clear is confirmed by reading the device back
            // before the first code is added.
            if matches!(action, SlotAction::Set { .. }) && !cleared.is_empty() {
                in_sync &= self
                    .confirm(model, std::mem::take(&mut cleared), Vec::new())
                    .await?;
            }
            if let SlotAction::Set { slot, code } = &action {
                if !adding_allowed {
                    in_sync = false;
                    continue;
                }
                if self.refused.get(slot) == Some(code) {
                    // Refused before: whatever keyplane wrote there earlier must
                    // still go (a clear the last read-back did not confirm).
                    if written.contains_key(slot) {
                        self.clear_refused(model, *slot).await?;
                    }
                    in_sync = false;
                    continue;
                }
                // A claimed local code, an adopted drift or a write that landed
                // before a crash: the device already holds it, no write.
                if keyplane_core::plan::already_held(is_panel, code, observed.get(slot)) {
                    self.device_batched(|d| d.written.insert(*slot, Code::from(code.clone())))?;
                    continue;
                }
            }
            self.before_write().await;
            let driver = self.driver(model)?;
            let done = match &action {
                SlotAction::Set { slot, code } if is_panel => {
                    driver
                        .set_panel_user(*slot, &code.pin, &code.authorities, code.open_close)
                        .await
                }
                SlotAction::Set { slot, code } if keeps_schedules => {
                    driver
                        .set_scheduled_code(*slot, &code.pin, code.schedules.as_deref(), &p.zone)
                        .await
                }
                SlotAction::Set { slot, code } => driver.set_slot(*slot, &code.pin).await,
                SlotAction::Clear { slot } => driver.clear_slot(*slot).await,
            };
            self.wrote();
            let (report_slot, clear) = match &action {
                SlotAction::Set { slot, .. } => (*slot, false),
                SlotAction::Clear { slot } => (*slot, true),
            };
            let (revision, now) = (self.revision, self.shared.clock.now());
            // A write the read-back can recognise: journaled once a read-back shows
            // it (a restart reads the device back first and adopts those that landed).
            let recognisable = match &action {
                SlotAction::Set { code, .. } => {
                    !masking
                        && keyplane_core::plan::already_held(
                            is_panel,
                            code,
                            Some(&Some(code.pin.clone())),
                        )
                }
                SlotAction::Clear { .. } => false,
            };
            match (done, &action) {
                (Ok(()), SlotAction::Clear { slot }) => {
                    // Stays journaled as written (so the next pass clears it again)
                    // until the read-back shows the slot empty.
                    cleared.push(*slot);
                    continue;
                }
                (Ok(()), SlotAction::Set { slot, code }) if recognisable && !confirms_writes => {
                    // Acked only once a read-back shows it: a device that answers a
                    // write and does not keep it gets it again next pass.
                    set.push((*slot, code.clone()));
                    if set.len() >= JOURNAL_BATCH {
                        in_sync &= self
                            .confirm(
                                model,
                                std::mem::take(&mut cleared),
                                std::mem::take(&mut set),
                            )
                            .await?;
                    }
                    continue;
                }
                (Ok(()), _) => {
                    self.reports
                        .write(&name, report_slot, revision, clear, Outcome::done(), now);
                }
                (Err(e), SlotAction::Set { slot, code }) if e.is_refusal() => {
                    self.refuse(model, *slot, code, &e, written.contains_key(slot))
                        .await?;
                    if let Some(refusal) = Outcome::refusal(&e) {
                        self.reports
                            .write(&name, report_slot, revision, clear, refusal, now);
                    }
                    in_sync = false;
                    continue;
                }
                (Err(e), _) => match Outcome::refusal(&e) {
                    // The device said no: reported, retried next pass, the other
                    // slots still written.
                    Some(refusal) => {
                        if matches!(e, DeviceError::Armed { .. }) {
                            self.deferred_armed = true;
                        }
                        tracing::debug!(device = %name, slot = %model.display_slot(report_slot), error = %e, "the device refused a write; will retry");
                        self.reports
                            .write(&name, report_slot, revision, clear, refusal, now);
                        in_sync = false;
                        continue;
                    }
                    None => return Err(e.into()),
                },
            }
            // Journal each write as it lands: a restart never repeats it (a write
            // the read-back can recognise, confirmed by the driver, is committed with
            // its batch).
            let journal = |d: &mut DeviceJournal| match action {
                SlotAction::Set { slot, code } => {
                    if let Some(o) = d.observed.as_mut() {
                        o.insert(slot, Some(code.pin.clone()));
                    }
                    d.written.insert(slot, Code::from(code));
                }
                SlotAction::Clear { slot } => {
                    if let Some(o) = d.observed.as_mut() {
                        o.remove(&slot);
                    }
                    d.written.remove(&slot);
                }
            };
            if recognisable {
                self.device_batched(journal)?;
            } else {
                self.device_mut(journal)?;
            }
        }
        if !cleared.is_empty() || !set.is_empty() {
            in_sync &= self.confirm(model, cleared, set).await?;
        }
        Ok(in_sync)
    }

    /// Reads the device's whole table back (None when it could not be read, which
    /// is also reported as unreachable on a link error).
    async fn read_back(
        &mut self,
        model: &'static DeviceModel,
    ) -> Option<BTreeMap<u16, Option<String>>> {
        let read = match self.driver(model) {
            Ok(driver) => driver.read_slots().await.map_err(anyhow::Error::from),
            Err(e) => Err(e),
        };
        match read {
            Ok(slots) => Some(slots.into_iter().map(|o| (o.slot, o.code)).collect()),
            Err(e) => {
                tracing::warn!(device = %self.name, error = %e, "clears not confirmed: the device could not be read back; will retry");
                if is_link_error(&e) {
                    self.reports
                        .reached(&self.name, false, self.shared.clock.now());
                }
                None
            }
        }
    }

    /// Reads the device back once after clears and sets and settles each one
    /// (keyplane-core's `settle_clears` and `settle_writes`). A cleared slot the
    /// device shows empty is journaled cleared and reported done; one it still shows
    /// occupied (or a read that failed) is reported unconfirmed (the status says
    /// revocation_unconfirmed) and stays journaled as written, so the next pass
    /// clears it again. A code the device shows is journaled written; one it does
    /// not keep (a lost write) is reported unconfirmed and not journaled, so the next
    /// pass writes it again; with no read-back at all, the next pass reads the
    /// device before planning. True when every write was confirmed.
    async fn confirm(
        &mut self,
        model: &'static DeviceModel,
        cleared: Vec<u16>,
        set: Vec<(u16, DesiredCode)>,
    ) -> anyhow::Result<bool> {
        let held = self.read_back(model).await;
        let (revision, now) = (self.revision, self.shared.clock.now());
        let occupied: Option<BTreeSet<u16>> = held.as_ref().map(|h| h.keys().copied().collect());
        let (confirmed, unconfirmed) =
            keyplane_core::plan::settle_clears(&cleared, occupied.as_ref());
        let pins: Vec<(u16, &str)> = set.iter().map(|(s, c)| (*s, c.pin.as_str())).collect();
        let checks = keyplane_core::plan::settle_writes(&pins, held.as_ref());
        if held.is_none() && !set.is_empty() {
            // Whether those writes landed is learnt by reading the device first.
            self.read_since_start = false;
        }
        self.device_mut(|d| {
            if let Some(h) = held {
                d.observed = Some(h.into());
                d.observed_checksum = None;
            }
            for slot in &confirmed {
                d.written.remove(slot);
            }
            for ((slot, code), (_, check)) in set.iter().zip(&checks) {
                if check.journaled() {
                    d.written.insert(*slot, Code::from(code.clone()));
                }
            }
        })?;
        // The batched adoptions were committed with it.
        self.unsaved = 0;
        for slot in &confirmed {
            self.reports
                .write(&self.name, *slot, revision, true, Outcome::done(), now);
        }
        for slot in &unconfirmed {
            tracing::warn!(device = %self.name, slot = %model.display_slot(*slot), "a cleared slot still shows occupied on read-back; cleared again next pass");
            self.reports.write(
                &self.name,
                *slot,
                revision,
                true,
                Outcome::unconfirmed(),
                now,
            );
        }
        let mut in_sync = unconfirmed.is_empty();
        for (slot, check) in checks {
            match check {
                WriteCheck::Confirmed | WriteCheck::Unverifiable => {
                    self.reports
                        .write(&self.name, slot, revision, false, Outcome::done(), now);
                }
                WriteCheck::Lost => {
                    tracing::warn!(device = %self.name, slot = %model.display_slot(slot), "the device answered a write but does not hold the code on read-back; written again next pass");
                    self.reports.write(
                        &self.name,
                        slot,
                        revision,
                        false,
                        Outcome::unconfirmed(),
                        now,
                    );
                    in_sync = false;
                }
                WriteCheck::Unread => in_sync = false,
            }
        }
        Ok(in_sync)
    }

    /// Clears what keyplane wrote in `slot` before a code the driver refuses, and
    /// forgets it once the read-back shows the slot empty (not before: until then
    /// the next pass clears it again).
    async fn clear_refused(
        &mut self,
        model: &'static DeviceModel,
        slot: u16,
    ) -> anyhow::Result<bool> {
        self.before_write().await;
        let result = self.driver(model)?.clear_slot(slot).await;
        self.wrote();
        result?;
        self.observe_due = true;
        let held = self.read_back(model).await;
        let gone = held.as_ref().is_some_and(|h| !h.contains_key(&slot));
        self.device_mut(|d| {
            if let Some(h) = held {
                d.observed = Some(h.into());
                d.observed_checksum = None;
            }
            if gone {
                d.written.remove(&slot);
            }
        })?;
        if !gone {
            tracing::warn!(device = %self.name, slot = %model.display_slot(slot), "the code before a refused one still shows on read-back; cleared again next pass");
        }
        Ok(gone)
    }

    /// A code the device's driver cannot write as asked: whatever keyplane wrote in
    /// that slot before is cleared (it must not outlive the change, e.g. stay open
    /// around the clock once a schedule was added), confirmed by read-back, and the
    /// refusal is reported once. The code is tried again only when keyplaned sends
    /// another one.
    async fn refuse(
        &mut self,
        model: &'static DeviceModel,
        slot: u16,
        code: &DesiredCode,
        why: &DeviceError,
        was_written: bool,
    ) -> anyhow::Result<()> {
        if was_written {
            self.clear_refused(model, slot).await?;
        }
        if self.refused.get(&slot) != Some(code) {
            tracing::warn!(
                device = %self.name,
                slot = %model.display_slot(slot),
                credential = %code.credential,
                error = %why,
                cleared_previous = was_written,
                "code not written: the device refuses it as asked; the device stays \
                 out of sync until the code or the driver changes"
            );
            self.refused.insert(slot, code.clone());
        }
        Ok(())
    }
}
