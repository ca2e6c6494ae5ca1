//! Several replicas share one gate through Redis (`[state] backend =
//! "redis"`): the [`InputLog`] that gives every replica's gate the same
//! inputs in the same order. See `docs/replicas.md` for the design.
//!
//! Every gate input (a knock, a verified authorization, a revocation) is
//! appended to one Redis Stream (`XADD`); every replica reads the stream
//! (`XREAD BLOCK`) and feeds each entry to its own gate, so the knock logic
//! exists once, in [`crate::gate`], and each replica's grant store is the
//! mirror the connection path reads locally. The server-assigned entry id
//! gives the total order and a millisecond timestamp all replicas share:
//! it is the input's gate time, mapped to the local monotonic clock.
//!
//! On start a replica reads the whole retained stream (trimmed by `MINID`
//! to what can still matter: the longest grant plus the knock windows);
//! after a reconnect it reads on from the last entry it applied. While
//! Redis is unreachable new knocks and authorizations are refused and
//! counted (`state_store_down`), revocations apply locally (tighter is
//! safe), and grants already mirrored keep working until they expire.
//!
//! A Redis that lost what it held (restarted empty, failed over to a
//! replica that lagged) is detected by a marker key and by the stream's
//! last id; SPA is then refused until every packet it may have recorded
//! has left the acceptance window ([`replay::SharedReplay`]).

pub mod replay;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use redis::{AsyncConnectionConfig, IntoConnectionInfo as _};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::clock::Clock;
use crate::config::Config;
use crate::driver::{Entry, InputLog, Reply};
use crate::gate::{Input, Knock, Method, ServiceRule};
use crate::metrics;
use crate::step::{Proto, Step};

/// Most entries read, or written, in one round trip.
const BATCH: usize = 512;

/// How long one `XREAD` blocks before it is asked again.
const BLOCK: Duration = Duration::from_millis(1000);

/// Inputs waiting for the writer; past it they are refused as busy.
const OUTGOING: usize = 4096;

/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// How long past the acceptance window a replay digest, and the hold after
/// a Redis that lost its data, last: as for the local replay log.
pub const MARGIN: Duration = crate::store::replay::MARGIN;

/// The key names under `state.key_prefix`.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    /// The stream of gate inputs.
    pub inputs: String,
    /// Written at first use; missing means Redis lost what it held.
    pub marker: String,
    /// `{prefix}:spa:{digest}`: one SPA replay digest each.
    pub spa: String,
}

/// What every part of the Redis backend shares: the client, whether the
/// store is reachable, and until when SPA must wait.
#[derive(Debug)]
pub struct Link {
    target: Target,
    pub(crate) keys: Keys,
    replica: Arc<str>,
    up: AtomicBool,
    /// Whether this outage has been logged (the first one may come before
    /// the store was ever up).
    down_logged: AtomicBool,
    /// Unix milliseconds before which SPA packets are refused
    /// (`replay_window`): a Redis without its replay digests.
    spa_hold_until: AtomicU64,
    /// How long after a loss of data SPA waits: every packet accepted
    /// before it has then left the window (2 × `spa.max_age`: a packet
    /// stamped up to `max_age` ahead stays acceptable that long after).
    spa_hold: Duration,
    /// How long the stream keeps entries.
    retain: Duration,
    clock: Arc<dyn Clock>,
    /// The replica whose input the driver is applying now (see
    /// [`crate::store::mirror::MirrorStore`]).
    pub(crate) origin: Arc<Mutex<Arc<str>>>,
}

/// The Redis backend of one process (clone freely).
#[derive(Debug, Clone)]
pub struct Replication {
    link: Arc<Link>,
}

/// Why the Redis backend could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("state.url: {0}")]
pub struct SetupError(#[from] redis::RedisError);

/// Where the primary is.
enum Target {
    /// At the url.
    Direct(Box<redis::Client>),
    /// Wherever the sentinels say: asked at every connect (one client for
    /// the async tasks, one for the recorder's thread).
    Sentinel {
        tasks: Box<tokio::sync::Mutex<redis::sentinel::SentinelClient>>,
        thread: Box<Mutex<redis::sentinel::SentinelClient>>,
    },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Direct(c) => f.debug_tuple("Direct").field(c).finish(),
            Target::Sentinel { .. } => f.write_str("Sentinel"),
        }
    }
}

/// The one backend of this process (see [`Replication::process`]).
static PROCESS: std::sync::OnceLock<Option<Replication>> = std::sync::OnceLock::new();

impl Replication {
    /// The backend of this process, set up from the first config that
    /// asks (`serve`'s): the replay recorder, the store and the driver's
    /// log share it. `[state]` changes need a restart; a reload keeps it.
    pub fn process(config: &Config) -> Result<Option<Self>, SetupError> {
        if let Some(r) = PROCESS.get() {
            return Ok(r.clone());
        }
        let made = Self::new(config, Arc::new(crate::clock::SystemClock))?;
        Ok(PROCESS.get_or_init(|| made).clone())
    }

    /// The backend `config` asks for, not connected yet; `None` for the
    /// memory backend.
    pub fn new(config: &Config, clock: Arc<dyn Clock>) -> Result<Option<Self>, SetupError> {
        let Some(redis_cfg) = config.state.redis() else {
            return Ok(None);
        };
        let info = redis_cfg.url.as_str().into_connection_info()?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &redis_cfg.username {
            settings = settings.set_username(user);
        }
        if let Some(pw) = &redis_cfg.password {
            settings = settings.set_password(String::from_utf8_lossy(pw.expose()));
        }
        let target = match &redis_cfg.sentinel {
            None => Target::Direct(Box::new(redis::Client::open(info.set_redis_settings(settings))?)),
            Some(sentinel) => {
                let tls = match info.addr() {
                    redis::ConnectionAddr::TcpTls { insecure, .. } => Some(if *insecure {
                        redis::TlsMode::Insecure
                    } else {
                        redis::TlsMode::Secure
                    }),
                    _ => None,
                };
                let build = || {
                    let mut node = redis::sentinel::SentinelNodeConnectionInfo::default()
                        .set_redis_connection_info(settings.clone());
                    if let Some(mode) = tls {
                        node = node.set_tls_mode(mode);
                    }
                    redis::sentinel::SentinelClient::build(
                        sentinel.addrs.iter().map(String::as_str).collect(),
                        sentinel.master_name.as_str(),
                        Some(node),
                        redis::sentinel::SentinelServerType::Master,
                    )
                };
                Target::Sentinel {
                    tasks: Box::new(tokio::sync::Mutex::new(build()?)),
                    thread: Box::new(Mutex::new(build()?)),
                }
            }
        };
        let prefix = &redis_cfg.key_prefix;
        let max_age = config.spa.as_ref().map_or(Duration::ZERO, |s| s.max_age);
        Ok(Some(Self {
            link: Arc::new(Link {
                target,
                keys: Keys {
                    inputs: format!("{prefix}:inputs"),
                    marker: format!("{prefix}:marker"),
                    spa: format!("{prefix}:spa:"),
                },
                replica: config.state.replica.clone(),
                up: AtomicBool::new(false),
                down_logged: AtomicBool::new(false),
                spa_hold_until: AtomicU64::new(0),
                spa_hold: max_age.saturating_mul(2),
                retain: retain(config),
                origin: Arc::new(Mutex::new(config.state.replica.clone())),
                clock,
            }),
        }))
    }

    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// The local mirror of the shared grants, for the connection path.
    pub fn store(&self) -> Arc<crate::store::mirror::MirrorStore> {
        Arc::new(crate::store::mirror::MirrorStore::new(self.link.origin.clone()))
    }

    /// The shared SPA replay check, for the replay recorder's thread.
    pub fn replay(&self) -> replay::SharedReplay {
        replay::SharedReplay::new(self.link.clone())
    }

    /// The input log of this replica's driver; starts reading the stream
    /// at once (a tokio runtime must be running). `rules` are the gate's
    /// first rules: knock steps are carried by port and matched to this
    /// replica's own endpoints.
    pub fn log(&self, rules: &[ServiceRule]) -> RedisLog {
        let stop = CancellationToken::new();
        let (out_tx, out_rx) = mpsc::channel(OUTGOING);
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        tokio::spawn(read_loop(self.link.clone(), in_tx.clone(), stop.clone()));
        tokio::spawn(write_loop(self.link.clone(), out_rx, in_tx, stop.clone()));
        RedisLog {
            link: self.link.clone(),
            out: out_tx,
            incoming: in_rx,
            local: VecDeque::new(),
            pending: HashMap::new(),
            next_tag: 0,
            steps: StepMap::new(rules, &[]),
            pools: Vec::new(),
            last_at: None,
            _stop: stop.drop_guard(),
        }
    }
}

/// How long the stream must keep an input: the longest grant any input
/// can give, plus the longest knock sequence, plus a margin.
fn retain(config: &Config) -> Duration {
    let mut longest = Duration::ZERO;
    for s in &config.services {
        longest = longest.max(s.open_for).max(s.spa.max_open_for);
        if let Some(k) = &s.knock {
            longest = longest.max(s.open_for.saturating_add(k.sequence_timeout));
        }
        if let Some(t) = &s.totp {
            longest = longest.max(s.open_for.saturating_add(t.sequence_timeout));
        }
    }
    longest.saturating_add(MARGIN)
}

impl Link {
    /// Whether Redis answered the last time it was asked.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Until when (unix milliseconds) SPA is held back.
    pub fn spa_hold_until(&self) -> u64 {
        self.spa_hold_until.load(Ordering::Acquire)
    }

    /// A client for the primary, for the recorder's thread (blocking).
    pub(crate) fn thread_client(&self) -> redis::RedisResult<redis::Client> {
        match &self.target {
            Target::Direct(c) => Ok((**c).clone()),
            Target::Sentinel { thread, .. } => thread.lock().expect("sentinel lock is never poisoned").get_client(),
        }
    }

    pub(crate) fn wall_ms(&self) -> u64 {
        unix_ms(self.clock.wall())
    }

    fn set_up(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            self.down_logged.store(false, Ordering::Release);
            metrics::state_store_up(true);
            tracing::info!(replica = %self.replica, "state store up");
        }
    }

    /// Marks the store down (once per outage in the log).
    pub(crate) fn set_down(&self, error: &redis::RedisError) {
        let was_up = self.up.swap(false, Ordering::AcqRel);
        if was_up || !self.down_logged.swap(true, Ordering::AcqRel) {
            metrics::state_store_up(false);
            tracing::error!(
                error = %error,
                replica = %self.replica,
                "state store down: new knocks and spa packets are refused until it is back; grants held keep working until they expire"
            );
        }
    }

    /// After a connect: writes the marker at first use and holds SPA back
    /// when Redis lost what it held; returns the id to read on from.
    async fn check(&self, con: &mut MultiplexedConnection, applied: &str) -> redis::RedisResult<String> {
        let now = self.wall_ms();
        let set: Option<String> = redis::cmd("SET")
            .arg(&self.keys.marker)
            .arg(now)
            .arg("NX")
            .query_async(con)
            .await?;
        let created: Option<u64> = redis::cmd("GET").arg(&self.keys.marker).query_async(con).await?;
        let top: Vec<redis::streams::StreamId> = {
            let reply: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
                .arg(&self.keys.inputs)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(con)
                .await?;
            reply.ids
        };
        let top = top.first().map_or_else(|| "0-0".to_string(), |e| e.id.clone());
        let lost = id_key(applied) > id_key(&top);
        let hold = u64::try_from(self.spa_hold.as_millis()).unwrap_or(u64::MAX);
        let mut until = created.unwrap_or(now).saturating_add(hold);
        if lost {
            until = until.max(now.saturating_add(hold));
        }
        if set.is_some() || lost {
            tracing::warn!(
                replica = %self.replica,
                first_use = set.is_some(),
                lost_entries = lost,
                hold_ms = until.saturating_sub(now),
                "state store holds no record of earlier replay digests (first use, or it lost its data): spa packets are refused as replay_window until every packet it may have seen is stale"
            );
        }
        self.spa_hold_until.fetch_max(until, Ordering::AcqRel);
        Ok(if lost { top } else { applied.to_string() })
    }

    async fn connect(&self) -> redis::RedisResult<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(BLOCK + Duration::from_secs(2)));
        let client = match &self.target {
            Target::Direct(c) => (**c).clone(),
            Target::Sentinel { tasks, .. } => tasks.lock().await.async_get_client().await?,
        };
        client.get_multiplexed_async_connection_with_config(&config).await
    }
}

/// A stream id's (milliseconds, sequence), for ordering.
fn id_key(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What the link tasks hand the log.
#[derive(Debug)]
enum Incoming {
    /// A stream entry, in stream order.
    Entry(redis::streams::StreamId),
    /// A local input the writer could not append.
    Failed { tag: u64, input: Input },
    /// Every entry retained at the time of a (re)connect has been read.
    Synced { entries: usize },
}

/// A local input on its way to the stream.
#[derive(Debug)]
struct Outgoing {
    tag: u64,
    fields: Vec<(&'static str, String)>,
    input: Input,
}

/// The input log through Redis (see the module doc).
#[derive(Debug)]
pub struct RedisLog {
    link: Arc<Link>,
    out: mpsc::Sender<Outgoing>,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    /// Inputs that are this replica's alone (a reload's rules, a revocation
    /// while the store is down).
    local: VecDeque<Entry>,
    /// Replies waiting for their entries to come back, by tag.
    pending: HashMap<u64, Reply>,
    next_tag: u64,
    steps: StepMap,
    /// The rotating sequences' pools, which the step map also matches.
    pools: Vec<Step>,
    /// The gate time of the last entry, so time never runs backwards.
    last_at: Option<Instant>,
    _stop: DropGuard,
}

impl InputLog for RedisLog {
    fn append(&mut self, entry: Entry) {
        let fields = match &entry.input {
            Input::Reconfigure { services, .. } => {
                self.steps = StepMap::new(services, &self.pools);
                self.local.push_back(entry);
                return;
            }
            input => encode(input),
        };
        let Some(fields) = fields else {
            // Nothing another replica could apply: this replica's alone.
            self.local.push_back(entry);
            return;
        };
        if !self.link.is_up() {
            self.refuse(entry);
            return;
        }
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1);
        let Entry { input, reply, .. } = entry;
        match self.out.try_send(Outgoing { tag, fields, input }) {
            Ok(()) => {
                if !matches!(reply, Reply::None) {
                    self.pending.insert(tag, reply);
                }
            }
            Err(e) => {
                let (mpsc::error::TrySendError::Full(o) | mpsc::error::TrySendError::Closed(o)) = e;
                self.refuse(Entry::new(o.input, reply));
            }
        }
    }

    fn rotating(&mut self, pools: &[Step]) {
        self.pools = pools.to_vec();
        self.steps.add(&self.pools);
    }

    fn next(&mut self) -> Pin<Box<dyn Future<Output = Entry> + Send + '_>> {
        Box::pin(async move {
            loop {
                if let Some(entry) = self.local.pop_front() {
                    return entry;
                }
                match self.incoming.recv().await {
                    None => std::future::pending::<()>().await,
                    Some(Incoming::Entry(e)) => {
                        if let Some(entry) = self.decode(&e) {
                            return entry;
                        }
                    }
                    Some(Incoming::Failed { tag, input }) => {
                        let reply = self.pending.remove(&tag).unwrap_or(Reply::None);
                        self.refuse(Entry::new(input, reply));
                    }
                    Some(Incoming::Synced { entries }) => {
                        tracing::info!(replica = %self.link.replica, entries, "state store synced");
                    }
                }
            }
        })
    }
}

impl RedisLog {
    /// An input the stream could not take: a revocation applies here
    /// (refusing more is safe), anything that would open is refused.
    fn refuse(&mut self, entry: Entry) {
        match &entry.input {
            Input::Revoke { .. } => self.local.push_back(entry),
            Input::Knock(k) => {
                metrics::state_store_refused("knock");
                tracing::debug!(source = %k.source, step = %k.step, reason = "state_store_down", "knock refused");
            }
            Input::Authorize { service, source, .. } => {
                metrics::state_store_refused("authorize");
                tracing::info!(%service, %source, reason = "state_store_down", "authorization refused");
            }
            _ => self.local.push_back(entry),
        }
    }

    /// A stream entry as this replica's gate input, with its gate time.
    fn decode(&mut self, e: &redis::streams::StreamId) -> Option<Entry> {
        let get = |k: &str| e.get::<String>(k);
        let input = match get("k")?.as_str() {
            "knock" => {
                let step = self.steps.resolve(
                    get("proto")?.parse().ok()?,
                    get("port")?.parse().ok()?,
                    get("addr")?.parse().ok()?,
                );
                Input::Knock(Knock {
                    source: get("src")?.parse().ok()?,
                    step,
                })
            }
            "authorize" => Input::Authorize {
                service: get("svc")?.into(),
                source: get("src")?.parse().ok()?,
                method: match get("m")?.as_str() {
                    "knock" => Method::Knock,
                    "spa" => Method::Spa {
                        user: get("user")?.into(),
                    },
                    "manual" => Method::Manual { by: get("by")?.into() },
                    _ => return None,
                },
                duration: Duration::from_millis(get("ms")?.parse().ok()?),
            },
            "revoke" => Input::Revoke {
                service: get("svc")?.into(),
                source: get("src")?.parse().ok()?,
            },
            "unlock" => Input::Unlock {
                source: get("src")?.parse().ok()?,
                by: get("by")?.into(),
            },
            _ => return None,
        };
        let origin: Arc<str> = get("r")?.into();
        let ours = *origin == *self.link.replica;
        let reply = match get("t").and_then(|t| t.parse::<u64>().ok()) {
            Some(tag) if ours => self.pending.remove(&tag).unwrap_or(Reply::None),
            _ => Reply::None,
        };
        let ms = id_key(&e.id).0;
        let at = self.gate_time(ms);
        *self.link.origin.lock().expect("origin lock is never poisoned") = origin;
        Some(Entry::new(input, reply).at(at).stamped(ms / 1000))
    }

    /// The local instant of a stream timestamp (unix milliseconds).
    fn gate_time(&mut self, ms: u64) -> Instant {
        let clock = &self.link.clock;
        let now = clock.now();
        let ago = Duration::from_millis(unix_ms(clock.wall()).saturating_sub(ms));
        let mut at = now.checked_sub(ago).unwrap_or(now);
        if let Some(last) = self.last_at {
            at = at.max(last);
        }
        self.last_at = Some(at);
        at
    }
}

/// The fields of an input as the stream carries it; `None` for inputs
/// that are this replica's alone.
fn encode(input: &Input) -> Option<Vec<(&'static str, String)>> {
    Some(match input {
        Input::Knock(k) => vec![
            ("k", "knock".into()),
            ("src", k.source.to_string()),
            ("proto", k.step.proto.as_str().into()),
            ("port", k.step.addr.port().to_string()),
            ("addr", k.step.addr.to_string()),
        ],
        Input::Authorize {
            service,
            source,
            method,
            duration,
        } => {
            let mut f = vec![
                ("k", "authorize".into()),
                ("svc", service.to_string()),
                ("src", source.to_string()),
                ("ms", duration.as_millis().to_string()),
            ];
            match method {
                Method::Knock => f.push(("m", "knock".into())),
                Method::Spa { user } => {
                    f.push(("m", "spa".into()));
                    f.push(("user", user.to_string()));
                }
                Method::Manual { by } => {
                    f.push(("m", "manual".into()));
                    f.push(("by", by.to_string()));
                }
            }
            f
        }
        Input::Revoke { service, source } => vec![
            ("k", "revoke".into()),
            ("svc", service.to_string()),
            ("src", source.to_string()),
        ],
        Input::Unlock { source, by } => vec![
            ("k", "unlock".into()),
            ("src", source.to_string()),
            ("by", by.to_string()),
        ],
        Input::Reconfigure { .. } => return None,
    })
}

/// This replica's knock endpoints by protocol and port: replicas listen on
/// different addresses, so a step is carried by port and taken here as the
/// endpoint of this replica with that port.
#[derive(Debug, Default)]
struct StepMap {
    by_port: HashMap<(Proto, u16), Vec<Step>>,
}

impl StepMap {
    /// The steps of the gate's `rules` and the rotating sequences' `pools`.
    fn new(rules: &[ServiceRule], pools: &[Step]) -> Self {
        let mut map = Self::default();
        for rule in rules {
            if let Some(k) = &rule.knock {
                map.add(k.sequence.iter().chain(&k.trap));
            }
        }
        map.add(pools);
        map
    }

    fn add<'a>(&mut self, steps: impl IntoIterator<Item = &'a Step>) {
        for step in steps {
            let list = self.by_port.entry((step.proto, step.addr.port())).or_default();
            if !list.contains(step) {
                list.push(*step);
            }
        }
    }

    fn resolve(&self, proto: Proto, port: u16, addr: std::net::SocketAddr) -> Step {
        let given = Step { proto, addr };
        match self.by_port.get(&(proto, port)).map(Vec::as_slice) {
            Some(list) if list.contains(&given) => given,
            Some([only]) => *only,
            _ => given,
        }
    }
}

/// Reads the stream into the log: from the start on the first connect,
/// from the last entry read after a reconnect.
async fn read_loop(link: Arc<Link>, tx: mpsc::UnboundedSender<Incoming>, stop: CancellationToken) {
    let mut last = "0-0".to_string();
    let mut backoff = BACKOFF_MIN;
    loop {
        let outcome = async {
            let mut con = link.connect().await?;
            last = link.check(&mut con, &last).await?;
            let mut synced = false;
            let mut count = 0usize;
            loop {
                let reply: Option<StreamReadReply> = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(BATCH)
                    .arg("BLOCK")
                    .arg(u64::try_from(BLOCK.as_millis()).unwrap_or(1000))
                    .arg("STREAMS")
                    .arg(&link.keys.inputs)
                    .arg(&last)
                    .query_async(&mut con)
                    .await?;
                link.set_up();
                let mut read = 0;
                for key in reply.map(|r| r.keys).unwrap_or_default() {
                    for entry in key.ids {
                        last.clone_from(&entry.id);
                        read += 1;
                        if tx.send(Incoming::Entry(entry)).is_err() {
                            return Ok(());
                        }
                    }
                }
                count += read;
                if !synced && read < BATCH {
                    synced = true;
                    let _ = tx.send(Incoming::Synced { entries: count });
                }
            }
        };
        let result: redis::RedisResult<()> = tokio::select! {
            _ = stop.cancelled() => return,
            r = outcome => r,
        };
        match result {
            Ok(()) => return,
            Err(e) => {
                link.set_down(&e);
                tracing::debug!(error = %e, backoff_s = backoff.as_secs_f64(), "state store: reconnecting");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = backoff.saturating_mul(2).min(BACKOFF_MAX);
        if link.is_up() {
            backoff = BACKOFF_MIN;
        }
    }
}

/// One round trip: every input of `batch` appended to the stream, which
/// is trimmed to what can still matter on the way.
async fn append(
    link: &Link,
    con: &mut Option<MultiplexedConnection>,
    batch: &[Outgoing],
) -> redis::RedisResult<Vec<String>> {
    if con.is_none() {
        *con = Some(link.connect().await?);
    }
    let c = con.as_mut().expect("connected just above");
    let min_id = link
        .wall_ms()
        .saturating_sub(u64::try_from(link.retain.as_millis()).unwrap_or(u64::MAX));
    let mut pipe = redis::pipe();
    for o in batch {
        let cmd = pipe
            .cmd("XADD")
            .arg(&link.keys.inputs)
            .arg("MINID")
            .arg("~")
            .arg(min_id)
            .arg("*")
            .arg("r")
            .arg(&*link.replica)
            .arg("t")
            .arg(o.tag);
        for (k, v) in &o.fields {
            cmd.arg(*k).arg(v);
        }
    }
    pipe.query_async::<Vec<String>>(c).await
}

/// Appends local inputs to the stream, a batch per round trip; what
/// cannot be appended goes back to the log as failed.
async fn write_loop(
    link: Arc<Link>,
    mut rx: mpsc::Receiver<Outgoing>,
    tx: mpsc::UnboundedSender<Incoming>,
    stop: CancellationToken,
) {
    let mut con: Option<MultiplexedConnection> = None;
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            o = rx.recv() => match o { Some(o) => o, None => return },
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        // A connection kept from before an outage fails on first use:
        // one more try on a fresh one before the batch is refused.
        let mut written = Err(redis::RedisError::from((redis::ErrorKind::Io, "not tried")));
        for _ in 0..2 {
            written = append(&link, &mut con, &batch).await;
            if written.is_ok() {
                break;
            }
            con = None;
        }
        if let Err(e) = written {
            con = None;
            link.set_down(&e);
            for o in batch {
                let _ = tx.send(Incoming::Failed {
                    tag: o.tag,
                    input: o.input,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::KnockRule;

    fn udp(ip: [u8; 4], port: u16) -> Step {
        Step {
            proto: Proto::Udp,
            addr: (ip, port).into(),
        }
    }

    #[test]
    fn a_step_taken_on_another_replica_is_this_replicas_endpoint_with_that_port() {
        let rules = vec![ServiceRule {
            name: "pg".into(),
            open_for: Duration::from_secs(30),
            knock: Some(KnockRule {
                sequence: vec![
                    udp([127, 0, 0, 12], 7001),
                    udp([127, 0, 0, 12], 7002),
                    udp([127, 0, 0, 12], 7003),
                ],
                trap: vec![],
                trap_lockout: true,
                step_timeout: Duration::from_secs(5),
                sequence_timeout: Duration::from_secs(15),
            }),
        }];
        let map = StepMap::new(&rules, &[]);
        let theirs = udp([127, 0, 0, 11], 7002);
        assert_eq!(map.resolve(Proto::Udp, 7002, theirs.addr), udp([127, 0, 0, 12], 7002));
        let ours = udp([127, 0, 0, 12], 7003);
        assert_eq!(map.resolve(Proto::Udp, 7003, ours.addr), ours);
        let unknown = udp([127, 0, 0, 11], 9999);
        assert_eq!(
            map.resolve(Proto::Udp, 9999, unknown.addr),
            unknown,
            "not a step here either"
        );
    }

    #[test]
    fn every_shared_input_round_trips_through_its_fields() {
        let inputs = [
            Input::Knock(Knock {
                source: "10.0.0.1".parse().unwrap(),
                step: udp([127, 0, 0, 1], 7001),
            }),
            Input::Authorize {
                service: "pg".into(),
                source: "::1".parse().unwrap(),
                method: Method::Spa { user: "alice".into() },
                duration: Duration::from_millis(30_500),
            },
            Input::Revoke {
                service: "pg".into(),
                source: "10.0.0.2".parse().unwrap(),
            },
            Input::Authorize {
                service: "pg".into(),
                source: "10.0.0.3".parse().unwrap(),
                method: Method::Manual { by: "token".into() },
                duration: Duration::from_secs(600),
            },
            Input::Unlock {
                source: "10.0.0.4".parse().unwrap(),
                by: "loopback 127.0.0.1:4000".into(),
            },
        ];
        for input in inputs {
            let fields = encode(&input).unwrap();
            let mut map: HashMap<String, redis::Value> = fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), redis::Value::BulkString(v.into_bytes())))
                .collect();
            map.insert("r".into(), redis::Value::BulkString(b"b".to_vec()));
            let id = redis::streams::StreamId {
                id: "1-0".into(),
                map,
                milliseconds_elapsed_from_delivery: None,
                delivered_count: None,
            };
            let mut log = test_log();
            assert_eq!(log.decode(&id).map(|e| e.input), Some(input));
        }
    }

    fn test_log() -> RedisLog {
        let (out, _) = mpsc::channel(1);
        let (_, incoming) = mpsc::unbounded_channel();
        RedisLog {
            link: Arc::new(Link {
                target: Target::Direct(Box::new(redis::Client::open("redis://127.0.0.1:1/").unwrap())),
                keys: Keys {
                    inputs: "t:inputs".into(),
                    marker: "t:marker".into(),
                    spa: "t:spa:".into(),
                },
                replica: "a".into(),
                up: AtomicBool::new(true),
                down_logged: AtomicBool::new(false),
                spa_hold_until: AtomicU64::new(0),
                spa_hold: Duration::ZERO,
                retain: Duration::ZERO,
                clock: Arc::new(crate::clock::ManualClock::new()),
                origin: Arc::new(Mutex::new("a".into())),
            }),
            out,
            incoming,
            local: VecDeque::new(),
            pending: HashMap::new(),
            next_tag: 0,
            steps: StepMap::default(),
            pools: Vec::new(),
            last_at: None,
            _stop: CancellationToken::new().drop_guard(),
        }
    }

    #[test]
    fn stream_ids_order_by_milliseconds_then_sequence() {
        assert!(id_key("1700000000001-0") > id_key("1700000000000-5"));
        assert!(id_key("5-2") > id_key("5-1"));
        assert!(id_key("0-0") < id_key("1-0"));
    }
}
