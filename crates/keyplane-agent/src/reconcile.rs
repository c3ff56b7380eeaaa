//! Applying the desired table to devices: journal first, then the planner's writes,
//! one device at a time, acking each device once it holds its whole desired table.

use crate::clock::Clock;
use crate::intake::read_slot;
use crate::journal::{Code, DeviceJournal, Journal};
use crate::reports::{Outcome, Reports};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use keyplane_core::observed::{SlotFinding, classify_slot};
use keyplane_core::plan::{DesiredCode, SlotAction, plan_device};
use keyplane_core::schedule::{any_open, parse_time_zone};
use keyplane_core::{DeviceKind, DeviceModel};
use keyplane_devices::{DeviceDriver, DeviceError, DeviceEvent, EventKind};
use keyplane_proto::v1 as pb;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::mpsc;

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

/// The agent's state: journal and open drivers.
pub struct Agent {
    journal: Journal,
    factory: Box<dyn DriverFactory>,
    drivers: HashMap<String, Box<dyn DeviceDriver>>,
    /// Highest event sequence sent per device on the current stream.
    events_sent: HashMap<String, u64>,
    clock: Arc<dyn Clock>,
    /// Devices to read back on the next pass (written to, or new stream).
    observe_due: std::collections::HashSet<String>,
    /// When each device was last read back, and what was last reported.
    observed_at: HashMap<String, std::time::Instant>,
    reported: HashMap<String, Vec<pb::ObservedSlot>>,
    /// Read every device back at least this often.
    pub observe_every: std::time::Duration,
    /// Completed passes, for whoever waits on the agent's progress.
    pub passes: crate::PassCounter,
    /// Completed event polls, likewise.
    pub event_polls: crate::PassCounter,
    /// Devices read back since this agent started: the first pass for a device
    /// plans against what it holds, not only against the journal (a write that
    /// landed just before a crash is adopted, not written again).
    read_since_start: std::collections::HashSet<String>,
    /// While connected: (period, urgent, routine) for polling device events between
    /// the writes of a long batch, so a duress code waits for one write at most,
    /// not for the whole batch.
    event_poll_between: Option<(
        std::time::Duration,
        mpsc::Sender<pb::AgentMessage>,
        mpsc::Sender<pb::AgentMessage>,
    )>,
    last_event_poll: std::time::Instant,
    /// Codes a driver refused as unsupported, per (device, slot): not tried again
    /// (nor reported again) until keyplaned sends another code for the slot.
    refused: HashMap<(String, u16), DesiredCode>,
    /// Doors whose driver refused a lockdown (reported once).
    lockdown_refused: std::collections::HashSet<String>,
    /// Per device, the (slot, state) of the findings already logged.
    findings_logged: HashMap<String, std::collections::BTreeSet<(i32, i32)>>,
    /// Write outcomes and reachability for keyplaned's status of each slot.
    reports: Reports,
    /// What each device reported about itself, once asked (None: nothing).
    constraints: HashMap<String, Option<keyplane_core::constraints::ReportedConstraints>>,
}

fn desired_codes(table: &BTreeMap<u16, Code>) -> BTreeMap<u16, DesiredCode> {
    table
        .iter()
        .map(|(s, c)| (*s, DesiredCode::from(c)))
        .collect()
}

/// The codes that belong on the device at `now`: temporary codes only within their
/// validity; scheduled codes only while open, unless the device keeps schedules
/// itself (then it gets them with the code, and with `zone`, the site's zone, so a
/// new zone is a change to write). An unknown time zone fails closed.
fn effective_codes(
    table: &BTreeMap<u16, Code>,
    zone: &str,
    now: DateTime<Utc>,
    device_keeps_schedules: bool,
) -> BTreeMap<u16, DesiredCode> {
    let tz: Option<Tz> = parse_time_zone(zone).ok();
    table
        .iter()
        .filter(|(_, c)| {
            c.valid_from.is_none_or(|f| now >= f) && c.valid_until.is_none_or(|u| now < u)
        })
        .filter(|(_, c)| match &c.schedules {
            None => true,
            Some(_) if device_keeps_schedules => true,
            Some(s) => tz.is_some_and(|tz| any_open(s, tz, now)),
        })
        .map(|(s, c)| {
            let mut code = DesiredCode::from(c);
            if !device_keeps_schedules {
                code.schedules = None;
            }
            code.time_zone = if code.schedules.is_some() {
                zone.to_owned()
            } else {
                String::new()
            };
            (*s, code)
        })
        .collect()
}

impl Agent {
    /// Opens the journal in `state_dir`.
    pub fn open(
        state_dir: &Path,
        factory: Box<dyn DriverFactory>,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Agent> {
        Ok(Agent {
            journal: Journal::open(state_dir)?,
            factory,
            drivers: HashMap::new(),
            events_sent: HashMap::new(),
            clock,
            observe_due: std::collections::HashSet::new(),
            observed_at: HashMap::new(),
            reported: HashMap::new(),
            observe_every: std::time::Duration::from_secs(60),
            passes: crate::PassCounter::default(),
            event_polls: crate::PassCounter::default(),
            read_since_start: std::collections::HashSet::new(),
            event_poll_between: None,
            last_event_poll: std::time::Instant::now(),
            refused: HashMap::new(),
            lockdown_refused: std::collections::HashSet::new(),
            findings_logged: HashMap::new(),
            reports: Reports::default(),
            constraints: HashMap::new(),
        })
    }

    /// The journaled site revision.
    pub fn revision(&self) -> i64 {
        self.journal.revision
    }

    /// The Hello for `site`: journaled revision and known devices.
    pub fn hello(&self, site: &str) -> pb::AgentMessage {
        let inventory = self
            .journal
            .devices
            .iter()
            .filter(|(_, d)| d.present)
            .map(|(name, d)| pb::InventoryDevice {
                device: name.clone(),
                kind: DeviceModel::find(&d.model)
                    .map(|m| pb::DeviceKind::from(m.kind))
                    .unwrap_or(pb::DeviceKind::Unspecified) as i32,
                model: d.model.clone(),
                constraints: self
                    .constraints
                    .get(name)
                    .and_then(Option::as_ref)
                    .map(keyplane_proto::convert::reported_constraints_pb),
            })
            .collect();
        pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                site: site.to_owned(),
                applied_revision: self.journal.revision,
                inventory,
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            })),
        }
    }

    fn learn_devices(&mut self, devices: &[pb::SiteDevice], snapshot: bool) {
        for d in self.journal.devices.values_mut() {
            d.present = false;
        }
        for d in devices {
            let entry = self.journal.devices.entry(d.name.clone()).or_default();
            entry.model = d.model.clone();
            entry.present = true;
        }
        for d in self.journal.devices.values_mut() {
            if !d.present || snapshot {
                // A snapshot replaces the whole table; a device keyplaned no longer
                // lists keeps nothing keyplane wrote.
                d.desired.clear();
                d.remove_local.clear();
                d.refused.clear();
            }
        }
    }

    /// Journals a server message, then reconciles every device, acking those done.
    pub async fn apply(
        &mut self,
        msg: pb::server_message::Msg,
        out: &mpsc::Sender<pb::AgentMessage>,
    ) -> anyhow::Result<()> {
        let (revision, slots, what, from) = match msg {
            pb::server_message::Msg::EventAck(ack) => {
                if let Some(device) = self.journal.devices.get_mut(&ack.device)
                    && ack.seq > device.events_acked
                {
                    device.events_acked = ack.seq;
                    self.journal.save()?;
                }
                return Ok(());
            }
            pb::server_message::Msg::Snapshot(s) => {
                self.learn_devices(&s.devices, true);
                self.journal.time_zone = s.time_zone;
                self.journal.lockdown = s.lockdown;
                (s.revision, s.slots, "snapshot", None)
            }
            pb::server_message::Msg::Changes(c) => {
                self.learn_devices(&c.devices, false);
                self.journal.time_zone = c.time_zone;
                self.journal.lockdown = c.lockdown;
                (c.revision, c.slots, "changes", Some(c.from_revision))
            }
        };
        for slot in &slots {
            let Ok(number) = u16::try_from(slot.slot) else {
                tracing::warn!(device = %slot.device, slot = slot.slot, "slot number out of range ignored");
                continue;
            };
            let Some(device) = self.journal.devices.get_mut(&slot.device) else {
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
        self.journal.revision = revision;
        self.journal.save()?;
        self.reconcile_all(Some(out)).await;
        let devices = self.journal.devices.values().filter(|d| d.present);
        let (total, in_sync) = devices.fold((0, 0), |(t, n), d| {
            (t + 1, n + usize::from(d.acked >= revision))
        });
        let refused: usize = self.journal.devices.values().map(|d| d.refused.len()).sum();
        tracing::info!(
            revision,
            from_revision = from,
            slots = slots.len(),
            devices = total,
            devices_in_sync = in_sync,
            codes_refused = refused,
            lockdown = self.journal.lockdown,
            "applied {what} from keyplaned"
        );
        Ok(())
    }

    /// Forgets what was sent on an earlier stream: events keyplaned has not acked are
    /// sent again (it stores each once).
    pub fn stream_started(&mut self) {
        self.events_sent.clear();
        self.reports.stream_started();
        // A new stream (maybe a new server) hears every device's table again.
        self.reported.clear();
        self.observe_due
            .extend(self.journal.devices.keys().cloned());
    }

    /// Reads a device's slot table back and reports it when it changed since the
    /// last report. Codes programmed at the device are never touched here.
    async fn observe(
        &mut self,
        name: &str,
        out: &mpsc::Sender<pb::AgentMessage>,
    ) -> anyhow::Result<()> {
        let Some(model) = self
            .journal
            .devices
            .get(name)
            .and_then(|d| DeviceModel::find(&d.model))
        else {
            return Ok(());
        };
        let checksum = self.driver(name, model)?.read_checksum().await?;
        let known = self.journal.devices.get(name).and_then(|d| {
            // Same checksum as at the last full read: the table has not changed.
            d.observed
                .clone()
                .filter(|_| checksum.is_some() && d.observed_checksum == checksum)
        });
        let table: BTreeMap<u16, Option<String>> = match known {
            Some(table) => table,
            None => {
                let slots = self.driver(name, model)?.read_slots().await?;
                slots.into_iter().map(|o| (o.slot, o.code)).collect()
            }
        };
        let Some(device) = self.journal.devices.get_mut(name) else {
            return Ok(());
        };
        device.observed = Some(table.clone());
        device.observed_checksum = checksum;
        let report = classify(model, device, &table);
        self.journal.save()?;
        self.log_findings(name, model, &report);
        self.observed_at
            .insert(name.to_owned(), std::time::Instant::now());
        if self.reported.get(name) != Some(&report) {
            let msg = pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Observed(pb::ObservedSlots {
                    device: name.to_owned(),
                    slots: report.clone(),
                })),
            };
            if out.send(msg).await.is_ok() {
                self.reported.insert(name.to_owned(), report);
            }
        }
        Ok(())
    }

    /// Logs each drifted, missing or hand-programmed slot once, when first found
    /// (also across reconnects, which report every device again).
    fn log_findings(&mut self, name: &str, model: &DeviceModel, report: &[pb::ObservedSlot]) {
        let found: std::collections::BTreeSet<(i32, i32)> = report
            .iter()
            .filter(|o| o.state != pb::ObservedState::Managed as i32)
            .map(|o| (o.slot, o.state))
            .collect();
        let logged = self.findings_logged.entry(name.to_owned()).or_default();
        for &(slot, state) in found.difference(logged) {
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
            tracing::info!(device = %name, slot = %shown, "{what}");
        }
        *logged = found;
    }

    fn driver(
        &mut self,
        name: &str,
        model: &'static DeviceModel,
    ) -> anyhow::Result<&mut Box<dyn DeviceDriver>> {
        if !self.drivers.contains_key(name) {
            let driver = self.factory.open(name, model)?;
            self.drivers.insert(name.to_owned(), driver);
        }
        self.drivers
            .get_mut(name)
            .ok_or_else(|| anyhow::anyhow!("driver for {name} vanished"))
    }

    /// Reads new events from every panel and sends them: duress on `urgent`, ahead
    /// of everything else, the rest on `routine`.
    pub async fn poll_events(
        &mut self,
        urgent: &mpsc::Sender<pb::AgentMessage>,
        routine: &mpsc::Sender<pb::AgentMessage>,
    ) {
        let panels: Vec<(String, &'static DeviceModel, u64)> = self
            .journal
            .devices
            .iter()
            .filter(|(_, d)| d.present)
            .filter_map(|(name, d)| {
                let model = DeviceModel::find(&d.model)?;
                Some((name.clone(), model, d.events_acked))
            })
            .collect();
        for (name, model, acked) in panels {
            let after = self.events_sent.get(&name).copied().unwrap_or(0).max(acked);
            let events = match self.driver(&name, model) {
                Ok(driver) => driver.read_events(after).await,
                Err(e) => {
                    tracing::warn!(device = %name, error = %e, "cannot open device for events");
                    continue;
                }
            };
            let events = match events {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!(device = %name, error = %e, "reading events failed; will retry");
                    continue;
                }
            };
            for event in events {
                let duress = event.kind == EventKind::Duress;
                let msg = event_pb(&name, &event);
                let channel = if duress { urgent } else { routine };
                if channel.send(msg).await.is_err() {
                    return;
                }
                if duress {
                    tracing::warn!(device = %name, seq = event.seq, "duress code used: silent alarm sent");
                }
                self.events_sent.insert(name.clone(), event.seq);
            }
        }
        self.last_event_poll = std::time::Instant::now();
        self.event_polls.bump();
    }

    /// Polls device events every `period` between the writes of a reconcile pass,
    /// on this stream's channels.
    pub fn events_between_writes(
        &mut self,
        period: std::time::Duration,
        urgent: mpsc::Sender<pb::AgentMessage>,
        routine: mpsc::Sender<pb::AgentMessage>,
    ) {
        self.event_poll_between = Some((period, urgent, routine));
    }

    /// Polls events if a period has passed since the last poll (between writes).
    async fn poll_events_if_due(&mut self) {
        let Some((period, urgent, routine)) = self.event_poll_between.clone() else {
            return;
        };
        if urgent.is_closed() {
            self.event_poll_between = None;
            return;
        }
        if self.last_event_poll.elapsed() >= period {
            self.poll_events(&urgent, &routine).await;
        }
    }

    /// Makes every device hold its desired table; acks devices that do (when
    /// connected). Errors are logged and retried on the next pass.
    pub async fn reconcile_all(&mut self, out: Option<&mpsc::Sender<pb::AgentMessage>>) {
        let names: Vec<String> = self.journal.devices.keys().cloned().collect();
        for name in names {
            self.ask_constraints(&name).await;
            let result = self.reconcile_device(&name).await;
            // Reachability for the status of each slot: a link error means the device
            // was not reached; a read-back that went through means it was.
            let mut reached = match &result {
                Err(e) if is_link_error(e) => Some(false),
                _ => None,
            };
            if let Some(out) = out {
                let stale = self
                    .observed_at
                    .get(&name)
                    .is_none_or(|t| t.elapsed() >= self.observe_every);
                let present = self.journal.devices.get(&name).is_some_and(|d| d.present);
                if present && (self.observe_due.remove(&name) || stale) {
                    match self.observe(&name, out).await {
                        Ok(()) => reached = reached.or(Some(true)),
                        Err(e) => {
                            if is_link_error(&e) {
                                reached = Some(false);
                            }
                            tracing::warn!(device = %name, error = %e, "reading the device back failed; will retry");
                        }
                    }
                }
            }
            if let Some(reachable) = reached {
                self.reports.reached(&name, reachable, self.clock.now());
            }
            let queued = self.reports.take();
            if let Some(out) = out {
                for msg in queued {
                    if out.send(msg).await.is_err() {
                        break;
                    }
                }
            }
            match result {
                Ok(true) => {
                    let revision = self.journal.revision;
                    let Some(device) = self.journal.devices.get_mut(&name) else {
                        continue;
                    };
                    if !device.present {
                        self.journal.devices.remove(&name);
                        self.drivers.remove(&name);
                        if let Err(e) = self.journal.save() {
                            tracing::error!(error = %e, "journal save failed");
                        }
                        continue;
                    }
                    if let Some(out) = out
                        && device.acked < revision
                    {
                        let ack = pb::AgentMessage {
                            msg: Some(pb::agent_message::Msg::Ack(pb::Ack {
                                device: name.clone(),
                                revision,
                            })),
                        };
                        if out.send(ack).await.is_ok() {
                            device.acked = revision;
                            if let Err(e) = self.journal.save() {
                                tracing::error!(error = %e, "journal save failed");
                            }
                        }
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(device = %name, error = %e, "device not reconciled; will retry")
                }
            }
        }
        self.passes.bump();
    }

    /// Asks a device what it says about itself, and queues an inventory entry for
    /// keyplaned when that changes (issue 11: reported constraints; a Z-Wave lock's
    /// count is learnt once its server answers, and masking once a code reads masked).
    async fn ask_constraints(&mut self, name: &str) {
        let Some(model) = self
            .journal
            .devices
            .get(name)
            .filter(|d| d.present)
            .and_then(|d| DeviceModel::find(&d.model))
        else {
            return;
        };
        let asked = match self.driver(name, model) {
            Ok(driver) => driver.reported_constraints().await,
            Err(e) => {
                tracing::debug!(device = %name, error = %e, "driver not opened; constraints asked later");
                return;
            }
        };
        match asked {
            Ok(reported) => {
                let known = self.constraints.get(name);
                if known != Some(&reported) && (reported.is_some() || known.is_some()) {
                    self.reports.inventory(pb::InventoryDevice {
                        device: name.to_owned(),
                        kind: pb::DeviceKind::from(model.kind) as i32,
                        model: model.id.to_owned(),
                        constraints: reported
                            .as_ref()
                            .map(keyplane_proto::convert::reported_constraints_pb),
                    });
                }
                self.constraints.insert(name.to_owned(), reported);
            }
            Err(e) => {
                tracing::debug!(device = %name, error = %e, "device constraints not read; asked again next pass")
            }
        }
    }

    /// Applies the planner's actions to one device; true when it is in sync.
    async fn reconcile_device(&mut self, name: &str) -> anyhow::Result<bool> {
        if !self.read_since_start.contains(name)
            && let Some(d) = self.journal.devices.get(name).filter(|d| d.present)
            && let Some(model) = DeviceModel::find(&d.model)
        {
            let held = self.driver(name, model)?.read_slots().await?;
            if let Some(entry) = self.journal.devices.get_mut(name) {
                entry.observed = Some(held.into_iter().map(|o| (o.slot, o.code)).collect());
                entry.observed_checksum = None;
            }
            self.journal.save()?;
            self.read_since_start.insert(name.to_owned());
        }
        let Some(device) = self.journal.devices.get(name) else {
            return Ok(true);
        };
        let zone = if self.journal.time_zone.is_empty() {
            "UTC".to_owned()
        } else {
            self.journal.time_zone.clone()
        };
        let model = DeviceModel::find(&device.model)
            .ok_or_else(|| anyhow::anyhow!("unknown device model {}", device.model))?;
        let door = model.kind == DeviceKind::Door;
        // Locks and doors that keep schedules enforce them; for the others (panels)
        // the agent installs and removes codes on time.
        let keeps_schedules = model.on_device_schedules;
        let lockdown = door && device.present && self.journal.lockdown;
        let lockdown_change = (lockdown != device.lockdown_applied).then_some(lockdown);
        // Reserved slots never reach the planner (a journal from an older agent may
        // still name one): keyplane neither writes nor clears them.
        let usable = |table: &BTreeMap<u16, Code>| -> BTreeMap<u16, Code> {
            table
                .iter()
                .filter(|(s, _)| !model.is_reserved(**s))
                .map(|(s, c)| (*s, c.clone()))
                .collect()
        };
        let actions = plan_device(
            &effective_codes(
                &usable(&device.desired),
                &zone,
                self.clock.now(),
                keeps_schedules,
            ),
            &desired_codes(&usable(&device.written)),
        );
        let removals: Vec<u16> = device
            .remove_local
            .iter()
            .copied()
            .filter(|s| !device.written.contains_key(s) && !model.is_reserved(*s))
            .collect();
        let observed = device.observed.clone().unwrap_or_default();
        // False once anything keyplaned wants could not be done: no ack then, so
        // the device shows as not applied in GetSyncStatus.
        let mut in_sync = device.refused.is_empty();
        // A door that should be locked down but cannot be gets no new code.
        let mut adding_allowed = true;
        if let Some(on) = lockdown_change {
            match self.driver(name, model)?.set_lockdown(on).await {
                Ok(()) => {
                    if let Some(entry) = self.journal.devices.get_mut(name) {
                        entry.lockdown_applied = on;
                    }
                    self.journal.save()?;
                    self.lockdown_refused.remove(name);
                    tracing::info!(device = %name, lockdown = on, "door lockdown applied");
                }
                Err(e) if e.is_unsupported() => {
                    if self.lockdown_refused.insert(name.to_owned()) {
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
        } else if !lockdown {
            self.lockdown_refused.remove(name);
        }
        for slot in removals {
            // A code programmed at the device that the dealer removed (or the
            // AUTHORITATIVE policy clears): the only slots keyplane clears unwritten.
            if observed.contains_key(&slot)
                || device_observed_unknown(self.journal.devices.get(name))
            {
                self.driver(name, model)?.clear_slot(slot).await?;
                tracing::info!(device = %name, slot = %model.display_slot(slot), "local code cleared");
            }
            if let Some(entry) = self.journal.devices.get_mut(name) {
                entry.remove_local.remove(&slot);
                if let Some(o) = entry.observed.as_mut() {
                    o.remove(&slot);
                }
            }
            self.journal.save()?;
            self.observe_due.insert(name.to_owned());
        }
        if actions.is_empty() {
            return Ok(in_sync);
        }
        self.observe_due.insert(name.to_owned());
        // Clears the device took, waiting for the read-back that confirms them.
        let mut cleared: Vec<u16> = Vec::new();
        for action in actions {
            // Revocations first: every clear is confirmed by reading the device back
            // before the first code is added.
            if matches!(action, SlotAction::Set { .. }) && !cleared.is_empty() {
                in_sync &= self
                    .confirm_clears(name, model, std::mem::take(&mut cleared))
                    .await?;
            }
            if let SlotAction::Set { slot, code } = &action
                && (!adding_allowed || self.refused.get(&(name.to_owned(), *slot)) == Some(code))
            {
                in_sync = false;
                continue;
            }
            // A claimed local code (or an adopted drift) is already on the device: no write.
            if let SlotAction::Set { slot, code } = &action
                && model.kind != DeviceKind::Panel
                && code.schedules.is_none()
                && observed.get(slot) == Some(&Some(code.pin.clone()))
            {
                if let Some(entry) = self.journal.devices.get_mut(name) {
                    entry.written.insert(*slot, Code::from(code.clone()));
                }
                self.journal.save()?;
                continue;
            }
            let driver = self.driver(name, model)?;
            let done = match &action {
                SlotAction::Set { slot, code } if model.kind == DeviceKind::Panel => {
                    driver
                        .set_panel_user(*slot, &code.pin, &code.authorities, code.open_close)
                        .await
                }
                SlotAction::Set { slot, code } if keeps_schedules => {
                    driver
                        .set_scheduled_code(*slot, &code.pin, code.schedules.as_deref(), &zone)
                        .await
                }
                SlotAction::Set { slot, code } => driver.set_slot(*slot, &code.pin).await,
                SlotAction::Clear { slot } => driver.clear_slot(*slot).await,
            };
            let (report_slot, clear) = match &action {
                SlotAction::Set { slot, .. } => (*slot, false),
                SlotAction::Clear { slot } => (*slot, true),
            };
            let (revision, now) = (self.journal.revision, self.clock.now());
            match (done, &action) {
                (Ok(()), SlotAction::Clear { slot }) => {
                    // Stays journaled as written (so the next pass clears it again)
                    // until the read-back shows the slot empty.
                    cleared.push(*slot);
                    continue;
                }
                (Ok(()), _) => {
                    self.reports
                        .write(name, report_slot, revision, clear, Outcome::done(), now);
                }
                (Err(e), SlotAction::Set { slot, code }) if e.is_refusal() => {
                    self.refuse(name, model, *slot, code, &e).await?;
                    if let Some(refusal) = Outcome::refusal(&e) {
                        self.reports
                            .write(name, report_slot, revision, clear, refusal, now);
                    }
                    in_sync = false;
                    continue;
                }
                (Err(e), _) => match Outcome::refusal(&e) {
                    // The device said no: reported, retried next pass, the other
                    // slots still written.
                    Some(refusal) => {
                        tracing::debug!(device = %name, slot = %model.display_slot(report_slot), error = %e, "the device refused a write; will retry");
                        self.reports
                            .write(name, report_slot, revision, clear, refusal, now);
                        in_sync = false;
                        continue;
                    }
                    None => return Err(e.into()),
                },
            }
            let entry: &mut DeviceJournal = self
                .journal
                .devices
                .get_mut(name)
                .ok_or_else(|| anyhow::anyhow!("journal entry for {name} vanished"))?;
            match action {
                SlotAction::Set { slot, code } => {
                    if let Some(o) = entry.observed.as_mut() {
                        o.insert(slot, Some(code.pin.clone()));
                    }
                    entry.written.insert(slot, Code::from(code));
                }
                SlotAction::Clear { slot } => {
                    if let Some(o) = entry.observed.as_mut() {
                        o.remove(&slot);
                    }
                    entry.written.remove(&slot);
                }
            }
            // Journal each write as it lands: a restart never repeats it.
            self.journal.save()?;
            self.poll_events_if_due().await;
        }
        if !cleared.is_empty() {
            in_sync &= self.confirm_clears(name, model, cleared).await?;
        }
        Ok(in_sync)
    }

    /// Reads the device back after clears and settles each one: a slot the device
    /// shows empty is journaled cleared and reported done; one it still shows
    /// occupied (or a read that failed) is reported unconfirmed (the status says
    /// revocation_unconfirmed) and stays journaled as written, so the next pass
    /// clears it again. True when every clear was confirmed.
    async fn confirm_clears(
        &mut self,
        name: &str,
        model: &'static DeviceModel,
        cleared: Vec<u16>,
    ) -> anyhow::Result<bool> {
        let read = self.driver(name, model)?.read_slots().await;
        let (revision, now) = (self.journal.revision, self.clock.now());
        let held: Option<BTreeMap<u16, Option<String>>> = match &read {
            Ok(slots) => Some(slots.iter().map(|o| (o.slot, o.code.clone())).collect()),
            Err(e) => {
                tracing::warn!(device = %name, error = %e, "clears not confirmed: the device could not be read back; will retry");
                None
            }
        };
        let occupied: std::collections::BTreeSet<u16> = held
            .as_ref()
            .map(|h| h.keys().copied().collect())
            .unwrap_or_default();
        let (confirmed, unconfirmed) =
            keyplane_core::plan::settle_clears(&cleared, held.as_ref().map(|_| &occupied));
        let entry: &mut DeviceJournal = self
            .journal
            .devices
            .get_mut(name)
            .ok_or_else(|| anyhow::anyhow!("journal entry for {name} vanished"))?;
        if let Some(h) = held {
            entry.observed = Some(h);
            entry.observed_checksum = None;
        }
        for slot in &confirmed {
            entry.written.remove(slot);
        }
        self.journal.save()?;
        for slot in &confirmed {
            self.reports
                .write(name, *slot, revision, true, Outcome::done(), now);
        }
        for slot in &unconfirmed {
            tracing::warn!(device = %name, slot = %model.display_slot(*slot), "a cleared slot still shows occupied on read-back; cleared again next pass");
            self.reports
                .write(name, *slot, revision, true, Outcome::unconfirmed(), now);
        }
        if let Err(e) = read
            && is_link_error(&anyhow::Error::from(e))
        {
            self.reports.reached(name, false, now);
        }
        Ok(unconfirmed.is_empty())
    }

    /// A code the device's driver cannot write as asked: whatever keyplane wrote in
    /// that slot before is cleared (it must not outlive the change, e.g. stay open
    /// around the clock once a schedule was added), and the refusal is reported
    /// once. The code is tried again only when keyplaned sends another one.
    async fn refuse(
        &mut self,
        name: &str,
        model: &'static DeviceModel,
        slot: u16,
        code: &DesiredCode,
        why: &DeviceError,
    ) -> anyhow::Result<()> {
        let was_written = self
            .journal
            .devices
            .get(name)
            .is_some_and(|d| d.written.contains_key(&slot));
        if was_written {
            self.driver(name, model)?.clear_slot(slot).await?;
            if let Some(entry) = self.journal.devices.get_mut(name) {
                entry.written.remove(&slot);
                if let Some(o) = entry.observed.as_mut() {
                    o.remove(&slot);
                }
            }
            self.journal.save()?;
        }
        let key = (name.to_owned(), slot);
        if self.refused.get(&key) != Some(code) {
            tracing::warn!(
                device = %name,
                slot = %model.display_slot(slot),
                credential = %code.credential,
                error = %why,
                cleared_previous = was_written,
                "code not written: the device refuses it as asked; the device stays \
                 out of sync until the code or the driver changes"
            );
            self.refused.insert(key, code.clone());
        }
        Ok(())
    }
}

/// Whether an error means the device was not reached (rather than refused).
fn is_link_error(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<DeviceError>(),
        Some(DeviceError::Unreachable(_) | DeviceError::Io(_))
    )
}

fn device_observed_unknown(device: Option<&DeviceJournal>) -> bool {
    device.is_none_or(|d| d.observed.is_none())
}

/// Compares what a device holds with what keyplane wrote and wants there (the rule
/// is keyplane-core's; reserved slots are never reported).
fn classify(
    model: &DeviceModel,
    device: &DeviceJournal,
    observed: &BTreeMap<u16, Option<String>>,
) -> Vec<pb::ObservedSlot> {
    let wanted: Vec<&str> = device.desired.values().map(|c| c.pin.as_str()).collect();
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

fn event_pb(device: &str, e: &DeviceEvent) -> pb::AgentMessage {
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
            slots.insert(slot, code.to_owned());
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

    struct BareFactory(Slots, Arc<std::sync::atomic::AtomicBool>);

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
        let slots = Slots::default();
        let sticky = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let agent = Agent::open(
            &dir.0,
            Box::new(BareFactory(slots.clone(), sticky.clone())),
            Arc::new(SystemClock),
        )
        .expect("agent");
        (agent, slots, sticky)
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
        drop(agent);
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
            .with_timezone(&Utc);
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
}
