//! Z-Wave locks reached through a Z-Wave JS server (zwave-js-server's WebSocket API,
//! also inside Z-Wave JS UI and Home Assistant installs).
//!
//! One [`ZwaveServer`] holds one WebSocket connection per server URL in a background
//! task: it greets, negotiates the API schema, starts listening, keeps a cache of every
//! lock's User Code values (fed by the server's state dump and its value events) and
//! reconnects with capped backoff when the server goes away. Each [`ZwaveLock`] is the
//! [`DeviceDriver`] of one node on it.
//!
//! Battery locks drain when polled, so slots are read from the cache whenever it is
//! known to be right: on User Code CC v2 locks, when the lock's user-code checksum
//! equals the checksum of the cache; on v1 locks, when every slot is known and the
//! last full read is younger than [`ZwaveOptions::full_read_every`]. Otherwise (and for
//! slots a keypad event names) the slots are read from the lock, one command each.
//!
//! Writes to one node go one at a time, at least [`ZwaveOptions::write_gap`] apart, and
//! count only once confirmed: by the value event of zwave-js's own verification read,
//! or failing that by a read-back. A lock's refusal is a [`DeviceError::Refused`]
//! carrying the lock's message; a code never appears in an error (a message that
//! quotes it has it replaced).

use crate::{DeviceDriver, DeviceError, DeviceEvent, EventKind, ObservedSlot};
use futures_util::{SinkExt, StreamExt};
use keyplane_core::DeviceModel;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// The oldest API schema this driver speaks: 32 is where notification events name
/// their endpoint, the shape [`ZwaveServer`] parses. Servers that cannot go this high
/// are refused with a message saying so.
pub const MIN_SCHEMA: u32 = 32;
/// The newest API schema this driver knows (tested against zwave-js-server 3.10.2).
pub const MAX_SCHEMA: u32 = 50;

const USER_CODE_CC: u64 = 99;
const NOTIFICATION_CC: u64 = 113;
/// Notification CC type of access-control events (keypad lock/unlock, code changes).
const ACCESS_CONTROL: u64 = 6;

/// How the driver paces and bounds its work.
#[derive(Debug, Clone)]
pub struct ZwaveOptions {
    /// Longest wait for one answer of the server (a sleeping lock answers late).
    pub command_timeout: Duration,
    /// Longest wait for the value event confirming a write before reading it back.
    pub confirm_timeout: Duration,
    /// Least time between two writes to one lock (a lock handles one at a time).
    pub write_gap: Duration,
    /// Longest wait between reconnection attempts.
    pub reconnect_max: Duration,
    /// Locks without a user-code checksum (User Code CC v1): how long a full read of
    /// their slots is trusted, with value events keeping it current meanwhile.
    pub full_read_every: Duration,
}

impl Default for ZwaveOptions {
    fn default() -> Self {
        ZwaveOptions {
            command_timeout: Duration::from_secs(15),
            confirm_timeout: Duration::from_secs(5),
            write_gap: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(30),
            full_read_every: Duration::from_secs(6 * 3600),
        }
    }
}

/// Counters of what the driver asked of locks (radio traffic), for tests and logs.
#[derive(Debug, Default)]
pub struct ZwaveStats {
    /// Slots read from a lock (one User Code Get each).
    pub slot_reads: AtomicU64,
    /// Checksums read from a lock.
    pub checksum_reads: AtomicU64,
    /// Writes (sets and clears) sent to a lock.
    pub writes: AtomicU64,
    /// Connections made to the server (the first and every reconnection).
    pub connections: AtomicU64,
}

/// Why a server command failed.
#[derive(Debug, Clone)]
enum CmdError {
    /// No connection, or no answer in time.
    Unreachable(String),
    /// The server answered `success:false`.
    Failed { code: Option<i64>, message: String },
}

struct Request {
    body: Map<String, Value>,
    reply: oneshot::Sender<Result<Value, CmdError>>,
}

/// What the cache knows of one lock node. Holds codes: no `Debug` on purpose.
#[derive(Default)]
struct NodeCache {
    user_code_version: Option<u8>,
    notification: bool,
    users: Option<u16>,
    min_len: Option<u8>,
    max_len: Option<u8>,
    status: BTreeMap<u16, u8>,
    codes: BTreeMap<u16, String>,
    /// Per slot, a counter bumped by every value event for it (write confirmation).
    touched: BTreeMap<u16, u64>,
    /// Slots a keypad event says changed: read them from the lock.
    stale: BTreeSet<u16>,
    /// An occupied slot read back masked: the lock does not give codes back in clear.
    masks_codes: bool,
    label: String,
    manufacturer: String,
}

impl NodeCache {
    /// The occupied state of `slot` if both its status and code are known.
    fn slot(&self, slot: u16) -> Option<Option<&str>> {
        let status = *self.status.get(&slot)?;
        if status == 0 {
            return Some(None);
        }
        let code = self.codes.get(&slot)?;
        Some((!code.is_empty()).then_some(code.as_str()))
    }

    /// Every slot 1..=users known, and none marked stale.
    fn complete(&self) -> bool {
        self.users
            .is_some_and(|n| self.stale.is_empty() && (1..=n).all(|s| self.slot(s).is_some()))
    }

    /// The User Code CC v2 checksum of what the cache holds (CRC-16/CCITT, start
    /// 0x1D0F, over user id, status and code of every occupied slot).
    fn checksum(&self) -> Option<u16> {
        let users = self.users?;
        let mut data = Vec::new();
        for s in 1..=users {
            let status = *self.status.get(&s)?;
            let code = self.codes.get(&s).map(String::as_str).unwrap_or("");
            if status == 0 || code.is_empty() {
                continue;
            }
            data.extend_from_slice(&s.to_be_bytes());
            data.push(status);
            data.extend_from_slice(code.as_bytes());
        }
        Some(if data.is_empty() {
            0
        } else {
            crc16_ccitt(&data)
        })
    }
}

/// Whether a code read from a lock is masked rather than the code: keypad codes are
/// digits, and locks that keep codes secret answer `****` or similar.
fn masked(code: &str) -> bool {
    !code.is_empty() && !code.bytes().all(|b| b.is_ascii_digit())
}

/// Whether a slot read as `got` holds `want` (None: empty); a masked read of an
/// occupied slot is taken as holding any code.
fn holds(got: Option<&str>, want: Option<&str>) -> bool {
    match (got, want) {
        (Some(g), Some(_)) if masked(g) => true,
        _ => got == want,
    }
}

/// CRC-16/CCITT as Z-Wave computes it (polynomial 0x1021, start 0x1D0F).
fn crc16_ccitt(data: &[u8]) -> u16 {
    let mut crc: u16 = 0x1D0F;
    for byte in data {
        for bit in (0..8).rev() {
            let xor = ((byte >> bit) & 1 == 1) != (crc & 0x8000 != 0);
            crc <<= 1;
            if xor {
                crc ^= 0x1021;
            }
        }
    }
    crc
}

#[derive(Default)]
struct Cache {
    connected: bool,
    /// Why the last connection attempt failed (for error messages).
    last_error: String,
    schema: u32,
    nodes: BTreeMap<u16, NodeCache>,
    events: BTreeMap<u16, Vec<DeviceEvent>>,
    last_seq: u64,
}

/// Keypad events kept per node until read (the agent reads them every fraction of a
/// second; this only bounds memory while it cannot).
const EVENTS_KEPT: usize = 1000;

struct Inner {
    url: String,
    options: ZwaveOptions,
    cache: Mutex<Cache>,
    changed: Notify,
    stats: ZwaveStats,
    /// One write in flight per node.
    write_locks: Mutex<HashMap<u16, Arc<tokio::sync::Mutex<()>>>>,
}

impl Inner {
    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection to one Z-Wave JS server, shared by the drivers of its nodes. Cloning
/// shares it; the connection task ends when the last clone is dropped.
#[derive(Clone)]
pub struct ZwaveServer {
    requests: mpsc::Sender<Request>,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ZwaveServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZwaveServer")
            .field("url", &self.inner.url)
            .finish()
    }
}

impl ZwaveServer {
    /// Starts the connection task for the server at `url` (`ws://host:port`). Returns
    /// at once; commands wait for the connection up to the command timeout. Must be
    /// called inside a Tokio runtime.
    pub fn connect(url: &str, options: ZwaveOptions) -> ZwaveServer {
        let (requests, rx) = mpsc::channel(64);
        let inner = Arc::new(Inner {
            url: url.trim_end_matches('/').to_owned(),
            options,
            cache: Mutex::new(Cache::default()),
            changed: Notify::new(),
            stats: ZwaveStats::default(),
            write_locks: Mutex::new(HashMap::new()),
        });
        tokio::spawn(connection_task(inner.clone(), rx));
        ZwaveServer { requests, inner }
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// What the driver asked of locks so far.
    pub fn stats(&self) -> &ZwaveStats {
        &self.inner.stats
    }

    /// Whether the connection is up and listening.
    pub fn connected(&self) -> bool {
        self.inner.cache().connected
    }

    /// The API schema agreed with the server (0 before the first connection).
    pub fn schema(&self) -> u32 {
        self.inner.cache().schema
    }

    /// Waits until connected, up to `timeout`; once a connection attempt has failed
    /// or a connection was lost, answers at once (the agent's pass must not wait on a
    /// server that is down; it tries again on its next pass).
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), DeviceError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.changed.notified();
            {
                let cache = self.inner.cache();
                if cache.connected {
                    return Ok(());
                }
                if tokio::time::Instant::now() >= deadline || !cache.last_error.is_empty() {
                    return Err(DeviceError::Unreachable(format!(
                        "Z-Wave JS server {}: not connected{}",
                        self.inner.url,
                        if cache.last_error.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", cache.last_error)
                        }
                    )));
                }
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    /// A driver for `node` as the site device `device` of `model`.
    pub fn lock(&self, node: u16, device: &str, model: &'static DeviceModel) -> ZwaveLock {
        ZwaveLock {
            server: self.clone(),
            node,
            device: device.to_owned(),
            model,
            last_write: None,
            last_checksum: None,
            last_full_read: None,
            verified: None,
            refused: HashMap::new(),
        }
    }

    /// Sends one command and waits for its result, bounded by the command timeout.
    async fn command(&self, body: Value) -> Result<Value, CmdError> {
        let Value::Object(body) = body else {
            return Err(CmdError::Failed {
                code: None,
                message: "internal: command is not an object".into(),
            });
        };
        let timeout = self.inner.options.command_timeout;
        let (reply, rx) = oneshot::channel();
        let sent = tokio::time::timeout(timeout, self.requests.send(Request { body, reply })).await;
        if !matches!(sent, Ok(Ok(()))) {
            return Err(CmdError::Unreachable("the connection task is gone".into()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(CmdError::Unreachable("connection lost".into())),
            Err(_) => Err(CmdError::Unreachable(format!(
                "no answer within {:.0}s",
                timeout.as_secs_f64()
            ))),
        }
    }

    /// Lock nodes on the server (nodes with the User Code CC), once connected.
    pub async fn lock_nodes(&self, timeout: Duration) -> Result<Vec<LockNode>, DeviceError> {
        self.wait_connected(timeout).await?;
        let ids: Vec<u16> = self.inner.cache().nodes.keys().copied().collect();
        let mut out = Vec::new();
        for node in ids {
            let mut lock = self.lock(
                node,
                "",
                DeviceModel::default_for(keyplane_core::DeviceKind::Lock),
            );
            let capacity = lock.capacity().await.ok();
            let cache = self.inner.cache();
            let Some(n) = cache.nodes.get(&node) else {
                continue;
            };
            out.push(LockNode {
                node,
                label: n.label.clone(),
                manufacturer: n.manufacturer.clone(),
                user_code_version: n.user_code_version.unwrap_or(0),
                keypad_events: n.notification,
                capacity,
            });
        }
        Ok(out)
    }
}

/// A lock node found on a Z-Wave JS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockNode {
    /// Z-Wave node id.
    pub node: u16,
    /// Product label from the device database (e.g. `910`).
    pub label: String,
    /// Manufacturer name.
    pub manufacturer: String,
    /// User Code CC version (2 or more: the lock offers a user-code checksum).
    pub user_code_version: u8,
    /// Whether it has the Notification CC (keypad events).
    pub keypad_events: bool,
    /// Slots and code lengths it reports, when they could be read.
    pub capacity: Option<Capacity>,
}

/// What a lock can hold, as it reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// User code slots (1..=slots).
    pub slots: u16,
    /// Shortest code it takes.
    pub min_code_length: u8,
    /// Longest code it takes.
    pub max_code_length: u8,
}

/// Lists the lock nodes of the Z-Wave JS server at `url` (the `zwave-discover`
/// helper): connects, reads the server's state, and disconnects.
pub async fn discover(url: &str, timeout: Duration) -> Result<Vec<LockNode>, DeviceError> {
    let options = ZwaveOptions {
        command_timeout: timeout,
        ..ZwaveOptions::default()
    };
    ZwaveServer::connect(url, options).lock_nodes(timeout).await
}

async fn connection_task(inner: Arc<Inner>, mut rx: mpsc::Receiver<Request>) {
    let mut delay = Duration::from_millis(100);
    loop {
        let outcome = session(&inner, &mut rx).await;
        {
            let mut cache = inner.cache();
            cache.connected = false;
            cache.last_error = match &outcome {
                Err(e) => e.clone(),
                Ok(_) => "the server closed the connection".to_owned(),
            };
        }
        inner.changed.notify_waiters();
        match outcome {
            Ok(Ended::Dropped) => return,
            Ok(Ended::Closed) => {
                tracing::warn!(url = %inner.url, "Z-Wave JS server closed the connection; reconnecting");
                delay = Duration::from_millis(100);
            }
            Err(e) => {
                tracing::warn!(url = %inner.url, error = %e, retry_in = ?delay, "Z-Wave JS server unreachable");
            }
        }
        // While away, commands fail at once instead of waiting out their timeout.
        let wake = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                // cancel-safe: a timer.
                _ = tokio::time::sleep_until(wake) => break,
                // cancel-safe: mpsc recv.
                req = rx.recv() => match req {
                    None => return,
                    Some(req) => {
                        let why = inner.cache().last_error.clone();
                        let _ = req.reply.send(Err(CmdError::Unreachable(format!(
                            "Z-Wave JS server {} is not connected ({why})", inner.url
                        ))));
                    }
                },
            }
        }
        delay = (delay * 2).min(inner.options.reconnect_max);
    }
}

enum Ended {
    /// Every handle was dropped.
    Dropped,
    /// The server closed the connection after it was up.
    Closed,
}

/// The schema to ask for: the highest both sides speak, refusing below [`MIN_SCHEMA`].
fn negotiate(server_min: u64, server_max: u64) -> Result<u32, String> {
    let agreed = server_max.min(u64::from(MAX_SCHEMA));
    if agreed < u64::from(MIN_SCHEMA) || server_min > u64::from(MAX_SCHEMA) {
        return Err(format!(
            "the server speaks API schema {server_min}..={server_max}; this driver needs one in \
             {MIN_SCHEMA}..={MAX_SCHEMA} (upgrade zwave-js-server, or Z-Wave JS UI / the Home \
             Assistant add-on that contains it)"
        ));
    }
    u32::try_from(agreed).map_err(|_| "schema out of range".to_owned())
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_json(ws: &mut Ws, timeout: Duration) -> Result<Value, String> {
    loop {
        let msg = tokio::time::timeout(timeout, ws.next())
            .await
            .map_err(|_| "no answer from the server".to_owned())?;
        match msg {
            None => return Err("connection closed".into()),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(t.as_str()).map_err(|e| format!("bad JSON: {e}"));
            }
            Some(Ok(Message::Close(_))) => return Err("connection closed".into()),
            Some(Ok(_)) => continue,
        }
    }
}

/// Sends `body` and waits for its result, handing events that arrive meanwhile to
/// the cache (used before the main loop runs).
async fn handshake_command(
    inner: &Inner,
    ws: &mut Ws,
    id: &str,
    mut body: Value,
) -> Result<Value, String> {
    body["messageId"] = json!(id);
    ws.send(Message::text(body.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let msg = next_json(ws, inner.options.command_timeout).await?;
        match msg["type"].as_str() {
            Some("result") if msg["messageId"] == json!(id) => {
                if msg["success"] == json!(true) {
                    return Ok(msg["result"].clone());
                }
                return Err(format!("{} refused: {}", body["command"], error_text(&msg)));
            }
            Some("event") => handle_event(inner, &msg["event"]),
            _ => {}
        }
    }
}

fn error_text(msg: &Value) -> String {
    msg["zwaveErrorMessage"]
        .as_str()
        .or_else(|| msg["message"].as_str())
        .or_else(|| msg["errorCode"].as_str())
        .unwrap_or("unknown error")
        .to_owned()
}

async fn session(inner: &Arc<Inner>, rx: &mut mpsc::Receiver<Request>) -> Result<Ended, String> {
    let timeout = inner.options.command_timeout;
    let (mut ws, _) = tokio::time::timeout(
        timeout,
        tokio_tungstenite::connect_async(inner.url.as_str()),
    )
    .await
    .map_err(|_| "connect timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    let greeting = next_json(&mut ws, timeout).await?;
    if greeting["type"] != json!("version") {
        return Err(format!(
            "expected a version greeting, got {}",
            greeting["type"]
        ));
    }
    let schema = negotiate(
        greeting["minSchemaVersion"].as_u64().unwrap_or(0),
        greeting["maxSchemaVersion"].as_u64().unwrap_or(0),
    )?;
    handshake_command(
        inner,
        &mut ws,
        "schema",
        json!({"command": "set_api_schema", "schemaVersion": schema}),
    )
    .await?;
    let listening = handshake_command(
        inner,
        &mut ws,
        "listen",
        json!({"command": "start_listening"}),
    )
    .await?;
    {
        let mut cache = inner.cache();
        load_state(&mut cache, &listening["state"]);
        cache.schema = schema;
        cache.connected = true;
        cache.last_error.clear();
    }
    inner.stats.connections.fetch_add(1, Ordering::Relaxed);
    inner.changed.notify_waiters();
    tracing::info!(
        url = %inner.url,
        schema,
        server = %greeting["serverVersion"].as_str().unwrap_or("?"),
        driver = %greeting["driverVersion"].as_str().unwrap_or("?"),
        "connected to the Z-Wave JS server"
    );
    let mut pending: HashMap<String, oneshot::Sender<Result<Value, CmdError>>> = HashMap::new();
    let mut next_id: u64 = 0;
    let outcome = loop {
        tokio::select! {
            // cancel-safe: mpsc recv.
            req = rx.recv() => {
                let Some(req) = req else { break Ok(Ended::Dropped) };
                next_id += 1;
                let id = format!("kp-{next_id}");
                let mut body = req.body;
                body.insert("messageId".into(), json!(id));
                if let Err(e) = ws.send(Message::text(Value::Object(body).to_string())).await {
                    let _ = req.reply.send(Err(CmdError::Unreachable(e.to_string())));
                    break Err(e.to_string());
                }
                // Answers to callers that gave up are dropped when they arrive.
                pending.retain(|_, tx| !tx.is_closed());
                pending.insert(id, req.reply);
            }
            // cancel-safe: WebSocketStream::next keeps partial frames internally.
            msg = ws.next() => {
                let text = match msg {
                    None | Some(Ok(Message::Close(_))) => break Ok(Ended::Closed),
                    Some(Err(e)) => break Err(e.to_string()),
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(_)) => continue,
                };
                let Ok(msg) = serde_json::from_str::<Value>(text.as_str()) else {
                    tracing::warn!(url = %inner.url, "unparsable message from the Z-Wave JS server ignored");
                    continue;
                };
                match msg["type"].as_str() {
                    Some("result") => {
                        let id = msg["messageId"].as_str().unwrap_or_default();
                        if let Some(tx) = pending.remove(id) {
                            let result = if msg["success"] == json!(true) {
                                Ok(msg["result"].clone())
                            } else {
                                Err(CmdError::Failed {
                                    code: msg["zwaveErrorCode"].as_i64(),
                                    message: error_text(&msg),
                                })
                            };
                            let _ = tx.send(result);
                        }
                    }
                    Some("event") => handle_event(inner, &msg["event"]),
                    _ => {}
                }
            }
        }
    };
    for (_, tx) in pending {
        let _ = tx.send(Err(CmdError::Unreachable("connection lost".into())));
    }
    let _ = ws.close(None).await;
    outcome
}

/// Rebuilds the cache from the `start_listening` state (a reconnection starts over:
/// the lock may have changed while the connection was down).
fn load_state(cache: &mut Cache, state: &Value) {
    let events = std::mem::take(&mut cache.events);
    let old = std::mem::take(&mut cache.nodes);
    cache.events = events;
    for node in state["nodes"].as_array().into_iter().flatten() {
        let Some(id) = node["nodeId"].as_u64().and_then(|n| u16::try_from(n).ok()) else {
            continue;
        };
        let ccs = node["endpoints"][0]["commandClasses"].as_array();
        let version = |cc: u64| {
            ccs.into_iter()
                .flatten()
                .find(|c| c["id"].as_u64() == Some(cc))
                .map(|c| u8::try_from(c["version"].as_u64().unwrap_or(1)).unwrap_or(1))
        };
        let Some(user_code_version) = version(USER_CODE_CC) else {
            continue;
        };
        let mut n = NodeCache {
            user_code_version: Some(user_code_version),
            notification: version(NOTIFICATION_CC).is_some(),
            label: node["label"].as_str().unwrap_or_default().to_owned(),
            manufacturer: node["manufacturer"].as_str().unwrap_or_default().to_owned(),
            // The users count is not in the dump; keep what was learnt before, and
            // that the lock masks codes (its empty slots would not show it again).
            users: old.get(&id).and_then(|o| o.users),
            masks_codes: old.get(&id).is_some_and(|o| o.masks_codes),
            ..NodeCache::default()
        };
        for v in node["values"].as_array().into_iter().flatten() {
            if v["commandClass"].as_u64() != Some(USER_CODE_CC)
                || v["endpoint"].as_u64().unwrap_or(0) != 0
            {
                continue;
            }
            if v["property"] == json!("userCode") {
                let meta = &v["metadata"];
                n.min_len = meta["minLength"]
                    .as_u64()
                    .and_then(|l| u8::try_from(l).ok());
                n.max_len = meta["maxLength"]
                    .as_u64()
                    .and_then(|l| u8::try_from(l).ok());
            }
            if let Some(key) = v["propertyKey"]
                .as_u64()
                .and_then(|k| u16::try_from(k).ok())
            {
                apply_value(
                    &mut n,
                    v["property"].as_str().unwrap_or_default(),
                    key,
                    v.get("value"),
                );
            }
        }
        cache.nodes.insert(id, n);
    }
}

/// Takes one User Code value into the cache.
fn apply_value(n: &mut NodeCache, property: &str, slot: u16, value: Option<&Value>) {
    match (property, value) {
        ("userIdStatus", Some(v)) => match v.as_u64().and_then(|s| u8::try_from(s).ok()) {
            Some(s) => {
                n.status.insert(slot, s);
            }
            None => {
                n.status.remove(&slot);
            }
        },
        ("userCode", Some(Value::String(code))) => {
            n.masks_codes |= masked(code);
            n.codes.insert(slot, code.clone());
        }
        ("userIdStatus" | "userCode", _) => {
            n.status.remove(&slot);
            n.codes.remove(&slot);
        }
        _ => return,
    }
    *n.touched.entry(slot).or_default() += 1;
    n.stale.remove(&slot);
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn handle_event(inner: &Inner, event: &Value) {
    if event["source"] != json!("node") {
        return;
    }
    let Some(node) = event["nodeId"].as_u64().and_then(|n| u16::try_from(n).ok()) else {
        return;
    };
    let mut guard = inner.cache();
    let cache = &mut *guard;
    match event["event"].as_str() {
        Some("value added" | "value updated" | "value removed") => {
            let args = &event["args"];
            if args["commandClass"].as_u64() != Some(USER_CODE_CC)
                || args["endpoint"].as_u64().unwrap_or(0) != 0
            {
                return;
            }
            let Some(n) = cache.nodes.get_mut(&node) else {
                return;
            };
            let Some(slot) = args["propertyKey"]
                .as_u64()
                .and_then(|k| u16::try_from(k).ok())
            else {
                // `supportedUsers` and friends carry no key.
                if args["property"] == json!("supportedUsers") {
                    n.users = args["newValue"]
                        .as_u64()
                        .and_then(|u| u16::try_from(u).ok());
                }
                return;
            };
            let removed = event["event"] == json!("value removed");
            let value = if removed { None } else { args.get("newValue") };
            apply_value(
                n,
                args["property"].as_str().unwrap_or_default(),
                slot,
                value,
            );
        }
        Some("notification") => {
            if event["ccId"].as_u64() != Some(NOTIFICATION_CC) {
                return;
            }
            let args = &event["args"];
            if args["type"].as_u64() != Some(ACCESS_CONTROL) {
                return;
            }
            let user = args["parameters"]["userId"]
                .as_u64()
                .and_then(|u| u16::try_from(u).ok());
            match args["event"].as_u64() {
                // Keypad lock / keypad unlock: someone used the code in slot `user`.
                Some(5 | 6) => {
                    let at_unix_ms = now_ms();
                    // Increasing across agent restarts too: the agent skips sequence
                    // numbers at or below the last one keyplaned acked.
                    let seq = (cache.last_seq + 1).max(u64::try_from(at_unix_ms).unwrap_or(0));
                    cache.last_seq = seq;
                    let log = cache.events.entry(node).or_default();
                    log.push(DeviceEvent {
                        seq,
                        kind: EventKind::AccessGranted,
                        partition: None,
                        slot: user,
                        at_unix_ms,
                    });
                    if log.len() > EVENTS_KEPT {
                        log.remove(0);
                    }
                }
                // All codes deleted, one deleted, one added at the keypad: read them.
                Some(12) => {
                    if let Some(n) = cache.nodes.get_mut(&node) {
                        n.status.clear();
                        n.codes.clear();
                    }
                }
                Some(13 | 14) => {
                    if let (Some(n), Some(slot)) = (cache.nodes.get_mut(&node), user) {
                        n.stale.insert(slot);
                    }
                }
                _ => {}
            }
        }
        _ => return,
    }
    drop(guard);
    inner.changed.notify_waiters();
}

/// The driver of one lock node on a Z-Wave JS server.
pub struct ZwaveLock {
    server: ZwaveServer,
    node: u16,
    device: String,
    model: &'static DeviceModel,
    last_write: Option<tokio::time::Instant>,
    last_checksum: Option<(u16, Instant)>,
    last_full_read: Option<Instant>,
    /// Per slot, the value-event counters when the cache last matched the lock's
    /// checksum (v2 locks): a slot whose counter moved since is read first.
    verified: Option<BTreeMap<u16, u64>>,
    /// Writes the lock refused, by slot: (fingerprint of the code, the refusal). The
    /// same code is refused again without radio traffic.
    refused: HashMap<u16, (u64, DeviceError)>,
}

impl std::fmt::Debug for ZwaveLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZwaveLock")
            .field("url", &self.server.inner.url)
            .field("node", &self.node)
            .field("device", &self.device)
            .finish()
    }
}

/// A fingerprint of a code to recognize a refused one again (never shown anywhere).
fn fingerprint(code: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    code.hash(&mut h);
    h.finish()
}

/// A message from the lock or server with `code` replaced, should it quote it.
fn redact(message: &str, code: &str) -> String {
    if code.is_empty() {
        message.to_owned()
    } else {
        message.replace(code, "<redacted>")
    }
}

/// Why a `node.set_value` result is a refusal, or None when the command went out.
///
/// set_value answers before the lock confirms: 254 (sent, unsupervised), 255
/// (success) or 1 (the lock is working on it, supervised) mean it went out, and the
/// confirmation decides; 0, 2, 3, 4, 5 (no support, the lock rejected it, no such
/// endpoint, not implemented, invalid value) are refusals, with the reason given.
/// Transmission failures arrive as `success:false`, not here.
fn set_value_refusal(result: &Value) -> Option<String> {
    let status = result["result"]["status"].as_u64();
    let accepted = match status {
        Some(1 | 254 | 255) => true,
        Some(_) => false,
        // Older servers answer {success: bool}.
        None => result["success"] != json!(false),
    };
    if accepted {
        return None;
    }
    let message = result["result"]["message"]
        .as_str()
        .unwrap_or("refused without a reason");
    Some(format!(
        "{message} (status {})",
        status.map_or_else(|| "?".to_owned(), |s| s.to_string())
    ))
}

/// The inventory report of a lock of capacity `cap`. A value keyplaned would refuse
/// (no slots, lengths out of order or past what a PIN may have) is left out, so the
/// profile's stays in force for it and the rest of the report is still taken.
fn report_of(cap: &Capacity, masks_codes: bool) -> keyplane_core::constraints::ReportedConstraints {
    let max_pin = u8::try_from(keyplane_core::pin::MAX_PIN_LENGTH).unwrap_or(u8::MAX);
    let lengths = (1..=max_pin).contains(&cap.min_code_length)
        && (cap.min_code_length..=max_pin).contains(&cap.max_code_length);
    keyplane_core::constraints::ReportedConstraints {
        first_slot: (cap.slots > 0).then_some(1),
        last_slot: (cap.slots > 0).then_some(cap.slots),
        reserved_slots: Some(Vec::new()),
        min_code_length: lengths.then_some(cap.min_code_length),
        max_code_length: lengths.then_some(cap.max_code_length),
        reads_back: Some(!masks_codes),
        keeps_schedules: Some(false),
        rules: None,
    }
}

impl ZwaveLock {
    /// The Z-Wave node id.
    pub fn node(&self) -> u16 {
        self.node
    }

    fn unreachable(&self, e: CmdError, code: &str) -> DeviceError {
        match e {
            CmdError::Unreachable(why) => DeviceError::Unreachable(format!(
                "node {} via {}: {}",
                self.node, self.server.inner.url, why
            )),
            CmdError::Failed { code: c, message } => DeviceError::Unreachable(format!(
                "node {} via {}: {}{}",
                self.node,
                self.server.inner.url,
                redact(&message, code),
                c.map(|c| format!(" (zwave error {c})")).unwrap_or_default()
            )),
        }
    }

    async fn command(&self, body: Value) -> Result<Value, CmdError> {
        self.server.command(body).await
    }

    async fn invoke(&self, method: &str, args: Value) -> Result<Value, CmdError> {
        self.command(json!({
            "command": "endpoint.invoke_cc_api",
            "nodeId": self.node,
            "endpoint": 0,
            "commandClass": USER_CODE_CC,
            "methodName": method,
            "args": args,
        }))
        .await
    }

    fn with_node<T>(&self, f: impl FnOnce(Option<&mut NodeCache>) -> T) -> T {
        let mut cache = self.server.inner.cache();
        f(cache.nodes.get_mut(&self.node))
    }

    /// Slots and code lengths the lock reports (the users count comes from zwave-js's
    /// cache, or from the lock when zwave-js has none).
    pub async fn capacity(&mut self) -> Result<Capacity, DeviceError> {
        self.server
            .wait_connected(self.server.inner.options.command_timeout)
            .await?;
        let known = self.with_node(|n| n.map(|n| (n.users, n.min_len, n.max_len)));
        let Some((users, min, max)) = known else {
            return Err(DeviceError::NotFound(format!(
                "node {} on {} is not a lock (no User Code CC) or does not exist; \
                 `keyplane-agent zwave-discover --url {}` lists the lock nodes",
                self.node, self.server.inner.url, self.server.inner.url
            )));
        };
        let users = match users {
            Some(u) => u,
            None => {
                let cached = self
                    .command(json!({
                        "command": "node.get_value",
                        "nodeId": self.node,
                        "valueId": {"commandClass": USER_CODE_CC, "endpoint": 0, "property": "supportedUsers"},
                    }))
                    .await
                    .map_err(|e| self.unreachable(e, ""))?;
                let count = match cached["value"].as_u64() {
                    Some(n) => n,
                    None => self
                        .invoke("getUsersCount", json!([]))
                        .await
                        .map_err(|e| self.unreachable(e, ""))?["response"]
                        .as_u64()
                        .unwrap_or(0),
                };
                let count = u16::try_from(count).unwrap_or(u16::MAX);
                if !self.device.is_empty() && self.model.last_slot > count {
                    tracing::info!(
                        device = %self.device,
                        node = self.node,
                        slots = count,
                        model = self.model.id,
                        "the lock has fewer slots than its model offers; the agent reports \
                         them and keyplaned allocates within them"
                    );
                }
                self.with_node(|n| {
                    if let Some(n) = n {
                        n.users = Some(count);
                    }
                });
                count
            }
        };
        Ok(Capacity {
            slots: users,
            // The User Code CC allows 4..10 ASCII characters when the lock says nothing.
            min_code_length: min.unwrap_or(4),
            max_code_length: max.unwrap_or(10),
        })
    }

    fn check_slot(&self, slot: u16, cap: &Capacity) -> Result<(), DeviceError> {
        if slot == 0 || slot > cap.slots {
            return Err(DeviceError::SlotOutOfRange {
                slot,
                first: 1,
                last: cap.slots,
            });
        }
        Ok(())
    }

    /// Waits out the gap after the previous write and takes the node's write lock.
    async fn pace(&mut self) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self
                .server
                .inner
                .write_locks
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            locks.entry(self.node).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        if let Some(last) = self.last_write {
            tokio::time::sleep_until(last + self.server.inner.options.write_gap).await;
        }
        guard
    }

    fn touched(&self, slot: u16) -> u64 {
        self.with_node(|n| n.and_then(|n| n.touched.get(&slot).copied()).unwrap_or(0))
    }

    /// Waits for a value event for `slot` after `mark` that shows `want` (None: empty);
    /// failing that within the confirm timeout, reads the slot back. On a lock that
    /// masks codes, an occupied slot is all a set can be confirmed by.
    async fn confirm(
        &mut self,
        slot: u16,
        mark: u64,
        want: Option<&str>,
    ) -> Result<(), DeviceError> {
        let inner = self.server.inner.clone();
        let deadline = tokio::time::Instant::now() + inner.options.confirm_timeout;
        loop {
            let notified = inner.changed.notified();
            let seen = self.with_node(|n| {
                n.filter(|n| n.touched.get(&slot).copied().unwrap_or(0) > mark)
                    .and_then(|n| n.slot(slot).map(|s| holds(s, want)))
            });
            if seen == Some(true) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
        let got = self.read_slot(slot, want.unwrap_or("")).await?;
        if holds(got.as_deref(), want) {
            return Ok(());
        }
        Err(DeviceError::Refused {
            slot,
            reason: if want.is_some() {
                "the lock accepted the code but does not hold it when read back".into()
            } else {
                "the lock still holds a code in the slot when read back".into()
            },
        })
    }

    /// Reads one slot from the lock (radio) into the cache.
    async fn read_slot(&mut self, slot: u16, code: &str) -> Result<Option<String>, DeviceError> {
        self.server
            .inner
            .stats
            .slot_reads
            .fetch_add(1, Ordering::Relaxed);
        let got = self
            .invoke("get", json!([slot]))
            .await
            .map_err(|e| self.unreachable(e, code))?;
        let r = &got["response"];
        let status = r["userIdStatus"]
            .as_u64()
            .and_then(|s| u8::try_from(s).ok())
            .unwrap_or(0);
        let value = r["userCode"].as_str().unwrap_or_default().to_owned();
        self.with_node(|n| {
            if let Some(n) = n {
                n.masks_codes |= status != 0 && masked(&value);
                n.status.insert(slot, status);
                n.codes.insert(slot, value.clone());
                n.stale.remove(&slot);
            }
        });
        Ok((status != 0 && !value.is_empty()).then_some(value))
    }

    /// A code changed at the lock reaches the cache as a value event (zwave-js reads
    /// the slot when the lock reports the change), often a moment after the checksum
    /// already shows it. Waits for the cache to agree with `lock_sum`, up to the
    /// confirm timeout: far cheaper than reading every slot.
    async fn settle(&self, lock_sum: Option<u16>) {
        let inner = self.server.inner.clone();
        let deadline = tokio::time::Instant::now() + inner.options.confirm_timeout;
        loop {
            let notified = inner.changed.notified();
            let matches =
                self.with_node(|n| n.is_some_and(|n| n.complete() && n.checksum() == lock_sum));
            if matches || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    fn cached_slots(&self) -> Option<Vec<ObservedSlot>> {
        self.with_node(|n| {
            let n = n?;
            let users = n.users?;
            let mut out = Vec::new();
            for s in 1..=users {
                if let Some(code) = n.slot(s)? {
                    // Locks that mask codes report asterisks: occupied, code unknown.
                    out.push(ObservedSlot {
                        slot: s,
                        code: (!masked(code)).then(|| code.to_owned()),
                    });
                }
            }
            Some(out)
        })
    }

    async fn write(&mut self, slot: u16, code: Option<&str>) -> Result<(), DeviceError> {
        let cap = self.capacity().await?;
        self.check_slot(slot, &cap)?;
        if let Some(code) = code {
            if code.is_empty() || !code.bytes().all(|b| b.is_ascii_digit()) {
                return Err(DeviceError::NotDigits { slot });
            }
            // Lengths are left to the lock (through zwave-js): its refusal says what it takes.
            if let Some((fp, e)) = self.refused.get(&slot)
                && *fp == fingerprint(code)
            {
                return Err(e.clone());
            }
        }
        let _guard = self.pace().await;
        let mark = self.touched(slot);
        self.server
            .inner
            .stats
            .writes
            .fetch_add(1, Ordering::Relaxed);
        self.last_write = Some(tokio::time::Instant::now());
        let secret = code.unwrap_or("");
        let result = match code {
            Some(code) => self
                .command(json!({
                    "command": "node.set_value",
                    "nodeId": self.node,
                    "valueId": {"commandClass": USER_CODE_CC, "endpoint": 0, "property": "userCode", "propertyKey": slot},
                    "value": code,
                }))
                .await,
            None => self.invoke("clear", json!([slot])).await,
        };
        let result = match result {
            Ok(r) => r,
            // ZW03xx: zwave-js or the lock refused the request itself (322: an invalid
            // argument, e.g. a user id past the lock's count; 302: not supported).
            // Other codes (controller, transmission, node timeouts) are the link's.
            Err(CmdError::Failed {
                code: Some(c),
                message,
            }) if (300..400).contains(&c) => {
                let e = DeviceError::Refused {
                    slot,
                    reason: format!("{} (zwave error {c})", redact(&message, secret)),
                };
                if let Some(code) = code {
                    self.refused.insert(slot, (fingerprint(code), e.clone()));
                }
                return Err(e);
            }
            Err(e) => return Err(self.unreachable(e, secret)),
        };
        // A set is answered before the lock confirms: sent, or refused with a reason.
        if let Some(why) = code.and_then(|_| set_value_refusal(&result)) {
            let e = DeviceError::Refused {
                slot,
                reason: redact(&why, secret),
            };
            if let Some(code) = code {
                self.refused.insert(slot, (fingerprint(code), e.clone()));
            }
            return Err(e);
        }
        self.confirm(slot, mark, code).await?;
        self.refused.remove(&slot);
        Ok(())
    }
}

#[async_trait::async_trait]
impl DeviceDriver for ZwaveLock {
    fn device(&self) -> &str {
        &self.device
    }

    fn model(&self) -> &'static DeviceModel {
        self.model
    }

    /// A write counts only once zwave-js's verification read (or the driver's own
    /// read of the slot) shows it: see `confirm`.
    fn confirms_writes(&self) -> bool {
        true
    }

    /// What the lock says of itself: slots 1..=its users count, its code lengths,
    /// whether codes read back in clear (false once an occupied slot read masked), and
    /// no on-lock schedules (keyplane does not use the Schedule Entry Lock CC). Read
    /// from the cache: no radio traffic once the users count is known. Not connected
    /// or not a lock: an error, so the agent asks again on its next pass.
    async fn reported_constraints(
        &mut self,
    ) -> Result<Option<keyplane_core::constraints::ReportedConstraints>, DeviceError> {
        let cap = self.capacity().await?;
        let masks = self.with_node(|n| n.is_some_and(|n| n.masks_codes));
        Ok(Some(report_of(&cap, masks)))
    }

    async fn read_slots(&mut self) -> Result<Vec<ObservedSlot>, DeviceError> {
        let cap = self.capacity().await?;
        let v2 = self
            .with_node(|n| n.and_then(|n| n.user_code_version))
            .unwrap_or(1)
            >= 2;
        let all: Vec<u16> = (1..=cap.slots).collect();
        if v2 {
            // The cache is right when its checksum is the lock's (read just before by
            // the agent, or now). If not, read first the slots the cache cannot vouch
            // for (unknown, named by a keypad event, or changed by a value event since
            // the cache last matched), then, only if it still differs, every slot.
            let lock_sum = match self.last_checksum {
                Some((sum, at)) if at.elapsed() < Duration::from_secs(5) => Some(sum),
                _ => self
                    .read_checksum()
                    .await?
                    .and_then(|s| u16::try_from(s).ok()),
            };
            if lock_sum.is_some() {
                // Rounds: 0 and 2 read the suspect slots, 1 waits for value events
                // under way, 3 reads every slot not read yet, 4 only checks.
                let mut read = BTreeSet::new();
                for round in 0..=4 {
                    let (matches, suspects) = self.with_node(|n| match n {
                        None => (false, all.clone()),
                        Some(n) => {
                            let matches = n.complete() && n.checksum() == lock_sum;
                            let suspects = all
                                .iter()
                                .copied()
                                .filter(|s| {
                                    round == 3
                                        || n.slot(*s).is_none()
                                        || n.stale.contains(s)
                                        || self
                                            .verified
                                            .as_ref()
                                            .is_some_and(|v| v.get(s) != n.touched.get(s))
                                })
                                .filter(|s| !read.contains(s))
                                .collect::<Vec<u16>>();
                            (matches, suspects)
                        }
                    });
                    if matches || round == 4 {
                        break;
                    }
                    if round == 1 {
                        // Nothing to wait for before the cache was ever right.
                        if self.verified.is_some() {
                            self.settle(lock_sum).await;
                        }
                        continue;
                    }
                    for slot in suspects {
                        self.read_slot(slot, "").await?;
                        read.insert(slot);
                    }
                }
                self.verified =
                    Some(self.with_node(|n| n.map(|n| n.touched.clone()).unwrap_or_default()));
            }
        } else {
            // Without a checksum, value events keep the cache current between full
            // reads; a full read is due every `full_read_every`.
            let full = self
                .last_full_read
                .is_none_or(|t| t.elapsed() >= self.server.inner.options.full_read_every);
            let unknown: Vec<u16> = self.with_node(|n| {
                all.iter()
                    .copied()
                    .filter(|s| {
                        full || n
                            .as_ref()
                            .is_none_or(|n| n.slot(*s).is_none() || n.stale.contains(s))
                    })
                    .collect()
            });
            for slot in unknown {
                self.read_slot(slot, "").await?;
            }
            if full {
                self.last_full_read = Some(Instant::now());
            }
        }
        self.cached_slots()
            .ok_or_else(|| DeviceError::Unreachable(format!("node {}: slots unknown", self.node)))
    }

    async fn set_slot(&mut self, slot: u16, code: &str) -> Result<(), DeviceError> {
        self.write(slot, Some(code)).await
    }

    async fn clear_slot(&mut self, slot: u16) -> Result<(), DeviceError> {
        self.write(slot, None).await
    }

    async fn read_checksum(&mut self) -> Result<Option<u64>, DeviceError> {
        self.capacity().await?;
        let v2 = self
            .with_node(|n| n.and_then(|n| n.user_code_version))
            .unwrap_or(1)
            >= 2;
        if !v2 {
            return Ok(None);
        }
        self.server
            .inner
            .stats
            .checksum_reads
            .fetch_add(1, Ordering::Relaxed);
        match self.invoke("getUserCodeChecksum", json!([])).await {
            Ok(r) => {
                let sum = r["response"].as_u64().and_then(|s| u16::try_from(s).ok());
                self.last_checksum = sum.map(|s| (s, Instant::now()));
                Ok(sum.map(u64::from))
            }
            // CC_NotSupported: a v2 lock without the checksum capability.
            Err(CmdError::Failed {
                code: Some(302), ..
            }) => {
                self.with_node(|n| {
                    if let Some(n) = n {
                        n.user_code_version = Some(1);
                    }
                });
                Ok(None)
            }
            Err(e) => Err(self.unreachable(e, "")),
        }
    }

    async fn read_events(&mut self, after: u64) -> Result<Vec<DeviceEvent>, DeviceError> {
        let cache = self.server.inner.cache();
        Ok(cache
            .events
            .get(&self.node)
            .map(|log| log.iter().filter(|e| e.seq > after).cloned().collect())
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_negotiation_takes_the_highest_common_and_refuses_too_old() {
        assert_eq!(negotiate(0, 50), Ok(50));
        assert_eq!(negotiate(0, 70), Ok(MAX_SCHEMA));
        assert_eq!(negotiate(10, 40), Ok(40));
        assert_eq!(negotiate(0, 32), Ok(32));
        for (min, max) in [(0, 31), (0, 0), (60, 70)] {
            let e = negotiate(min, max).expect_err("refused");
            assert!(e.contains("upgrade zwave-js-server"), "{e}");
        }
    }

    #[test]
    fn checksum_matches_zwave_js() {
        // CRC-16/CCITT with start 0x1D0F of "123456789" (the spec's check value).
        assert_eq!(crc16_ccitt(b"123456789"), 0xE5CC);
        let mut n = NodeCache {
            users: Some(3),
            ..NodeCache::default()
        };
        for s in 1..=3 {
            n.status.insert(s, 0);
            n.codes.insert(s, String::new());
        }
        assert_eq!(n.checksum(), Some(0));
        n.status.insert(2, 1);
        n.codes.insert(2, "1234".into());
        let mut data = vec![0, 2, 1];
        data.extend_from_slice(b"1234");
        assert_eq!(n.checksum(), Some(crc16_ccitt(&data)));
        assert!(n.complete());
        n.stale.insert(3);
        assert!(!n.complete());
    }

    fn inner() -> Inner {
        Inner {
            url: "ws://127.0.0.1:1".into(),
            options: ZwaveOptions::default(),
            cache: Mutex::new(Cache::default()),
            changed: Notify::new(),
            stats: ZwaveStats::default(),
            write_locks: Mutex::new(HashMap::new()),
        }
    }

    #[test]
    fn keypad_unlock_becomes_an_event_naming_the_slot_and_code_changes_mark_slots() {
        let inner = inner();
        inner.cache().nodes.insert(2, NodeCache::default());
        // As zwave-js-server (schema >= 32) forwards a Notification CC report.
        let unlock = json!({"source": "node", "event": "notification", "nodeId": 2, "endpointIndex": 0,
            "ccId": 113, "args": {"type": 6, "event": 6, "label": "Access Control",
            "eventLabel": "Keypad unlock operation", "parameters": {"userId": 4}}});
        handle_event(&inner, &unlock);
        handle_event(
            &inner,
            &json!({"source": "node", "event": "notification", "nodeId": 2,
            "ccId": 113, "args": {"type": 6, "event": 14, "parameters": {"userId": 9}}}),
        );
        let cache = inner.cache();
        let events = cache.events.get(&2).expect("events");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::AccessGranted);
        assert_eq!(events[0].slot, Some(4));
        assert!(cache.nodes[&2].stale.contains(&9));
    }

    #[test]
    fn value_events_update_the_cache() {
        let inner = inner();
        inner.cache().nodes.insert(2, NodeCache::default());
        for (prop, value) in [("userIdStatus", json!(1)), ("userCode", json!("2468"))] {
            handle_event(
                &inner,
                &json!({"source": "node", "event": "value updated", "nodeId": 2,
                "args": {"commandClass": 99, "endpoint": 0, "property": prop, "propertyKey": 5, "newValue": value}}),
            );
        }
        let cache = inner.cache();
        assert_eq!(cache.nodes[&2].slot(5), Some(Some("2468")));
        assert_eq!(cache.nodes[&2].touched[&5], 2);
    }

    #[test]
    fn the_report_is_what_the_lock_says_and_leaves_out_what_keyplaned_would_refuse() {
        use keyplane_core::constraints::ReportedConstraints;
        let lab = Capacity {
            slots: 30,
            min_code_length: 4,
            max_code_length: 10,
        };
        assert_eq!(
            report_of(&lab, false),
            ReportedConstraints {
                first_slot: Some(1),
                last_slot: Some(30),
                reserved_slots: Some(Vec::new()),
                min_code_length: Some(4),
                max_code_length: Some(10),
                reads_back: Some(true),
                keeps_schedules: Some(false),
                rules: None,
            }
        );
        assert_eq!(report_of(&lab, true).reads_back, Some(false));
        let odd: &[(u16, u8, u8)] = &[(0, 4, 10), (30, 0, 10), (30, 8, 6), (30, 4, 13)];
        for (slots, min, max) in odd {
            let r = report_of(
                &Capacity {
                    slots: *slots,
                    min_code_length: *min,
                    max_code_length: *max,
                },
                false,
            );
            let profile = keyplane_core::constraints::DeviceConstraints::from_model(
                DeviceModel::find("zwave-js-lock").expect("profile"),
            );
            assert!(profile.with_reported(&r).is_ok(), "{slots} {min} {max}");
        }
    }

    #[test]
    fn a_masked_code_read_back_marks_the_lock_as_masking() {
        for (code, want) in [("2580", false), ("", false), ("****", true), ("12*4", true)] {
            assert_eq!(masked(code), want, "{code}");
        }
        // A set is confirmed by an occupied masked slot; a clear only by an empty one.
        assert!(holds(Some("****"), Some("2580")));
        assert!(holds(Some("2580"), Some("2580")));
        assert!(!holds(Some("2581"), Some("2580")));
        assert!(!holds(Some("****"), None));
        assert!(holds(None, None));
        let inner = inner();
        inner.cache().nodes.insert(2, NodeCache::default());
        for (prop, value) in [("userIdStatus", json!(1)), ("userCode", json!("2580"))] {
            handle_event(
                &inner,
                &json!({"source": "node", "event": "value updated", "nodeId": 2,
                "args": {"commandClass": 99, "endpoint": 0, "property": prop, "propertyKey": 1, "newValue": value}}),
            );
        }
        assert!(!inner.cache().nodes[&2].masks_codes);
        handle_event(
            &inner,
            &json!({"source": "node", "event": "value updated", "nodeId": 2,
            "args": {"commandClass": 99, "endpoint": 0, "property": "userCode", "propertyKey": 1, "newValue": "****"}}),
        );
        assert!(inner.cache().nodes[&2].masks_codes);
        // A reconnection's state dump keeps it (the lock may hold no code to show it).
        let mut cache = inner.cache();
        load_state(
            &mut cache,
            &json!({"nodes": [{"nodeId": 2, "endpoints": [{"commandClasses": [{"id": 99, "version": 1}]}], "values": []}]}),
        );
        assert!(cache.nodes[&2].masks_codes);
    }

    #[test]
    fn set_value_results_sent_or_refused() {
        let cases: &[(Value, Option<&str>)] = &[
            (json!({"result": {"status": 254}}), None),
            (json!({"result": {"status": 255}}), None),
            (json!({"result": {"status": 1}}), None),
            (json!({"success": true}), None),
            (
                json!({"result": {"status": 5, "message": "The user code must have a length of 4 to 10 characters (ZW0322)"}}),
                Some("The user code must have a length of 4 to 10 characters (ZW0322) (status 5)"),
            ),
            (
                json!({"result": {"status": 2}}),
                Some("refused without a reason (status 2)"),
            ),
            (
                json!({"result": {"status": 0, "message": "no"}}),
                Some("no (status 0)"),
            ),
            (
                json!({"success": false}),
                Some("refused without a reason (status ?)"),
            ),
        ];
        for (result, want) in cases {
            assert_eq!(set_value_refusal(result).as_deref(), *want, "{result}");
        }
    }

    #[test]
    fn refusal_messages_never_quote_the_code() {
        assert_eq!(
            redact("code 2468 is a duplicate", "2468"),
            "code <redacted> is a duplicate"
        );
        let e = DeviceError::Refused {
            slot: 3,
            reason: redact("bad 2468", "2468"),
        };
        assert!(!e.to_string().contains("2468"));
    }
}
