//! Open, then reach the service: `open` sends a profile's knock or SPA
//! packet; `exec` then runs a command, `connect` relays stdin and stdout
//! (an ssh `ProxyCommand`), `forward` relays each connection to a local
//! listener, opening again whenever the last open is older than the grant
//! window.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use tokio::net::TcpListener;

use super::knock::{self, connect_tcp, KnockPlan};
use super::profile::{AllowIp, Open, Profile, SpaProfile};
use super::spa::{self, SpaPlan};
use super::{Exit, Failure};
use crate::clock::{Clock as _, SystemClock};
use crate::spa::Fields;

/// Pause between an open and the first connection: the gateway's gate
/// and grant store act within microseconds of reading the packet, which
/// the client already waited for when the gateway is on this host.
pub const OPEN_SETTLE: Duration = Duration::from_millis(20);

/// How long a connection after an open retries a refusal: a guarded port
/// in `closed` mode starts listening only once the grant is in place.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(3);

const CONNECT_RETRY: Duration = Duration::from_millis(25);

/// A profile's SPA settings as a plan, with `allow_ip = "resolve"` looked
/// up; with `close`, a request to end the grants instead.
pub async fn spa_plan(host: &str, bind: Option<IpAddr>, spa: &SpaProfile, close: bool) -> anyhow::Result<SpaPlan> {
    let allow_ip = match spa.allow_ip {
        AllowIp::Source => None,
        AllowIp::Addr(ip) => Some(ip),
        AllowIp::Resolve => Some(spa::route_source(host, spa.port, bind).await?),
    };
    Ok(SpaPlan {
        host: host.to_string(),
        port: spa.port,
        fields: Fields {
            timestamp: crate::spa::desk::unix_secs(&SystemClock),
            access: spa.access.clone(),
            allow_ip,
            duration: spa.duration.filter(|_| !close),
            close,
        },
        keys: spa.keys.clone(),
        fwknop_user: spa.fwknop_user.clone(),
        bind,
    })
}

/// Sends the profile's knock sequence or SPA packet.
pub async fn open(profile: &Profile, verbose: bool) -> Result<(), Failure> {
    match &profile.open {
        Open::Knock { steps, delay } => {
            let plan = KnockPlan {
                host: profile.host.clone(),
                steps: steps.clone(),
                delay: *delay,
                bind: profile.bind,
            };
            run_knock(&plan, verbose).await
        }
        Open::Totp(t) => {
            let plan = KnockPlan {
                host: profile.host.clone(),
                steps: totp_now(t)?,
                delay: None,
                bind: profile.bind,
            };
            run_knock(&plan, verbose).await
        }
        Open::Spa(spa) => send_spa_profile(profile, spa, false, verbose).await,
    }
}

/// Builds and sends a profile's SPA packet (with `close`, its close
/// request).
async fn send_spa_profile(profile: &Profile, spa: &SpaProfile, close: bool, verbose: bool) -> Result<(), Failure> {
    let plan = spa_plan(&profile.host, profile.bind, spa, close)
        .await
        .map_err(Failure::failed)?;
    spa::check_keys(&plan).map_err(Failure::profile)?;
    let packet = spa::build_spa(&plan).map_err(Failure::profile)?;
    if verbose {
        print!("{}", spa::describe(&plan, packet.len()));
    }
    spa::send_spa(&plan, &packet).await.map_err(Failure::failed)?;
    Ok(())
}

/// The current steps of a profile's rotating sequence.
pub fn totp_now(t: &super::profile::TotpProfile) -> Result<Vec<crate::step::StepSpec>, Failure> {
    let unix = crate::spa::desk::unix_secs(&SystemClock);
    let wanted = super::command::TotpWanted {
        ports: Some(t.ports.clone()),
        steps: Some(t.steps),
        period: Some(t.period),
    };
    super::command::totp_steps(&t.key_file, &wanted, unix)
}

/// Ends the grant the profile's SPA settings open, early: a native close
/// request for the same access, authenticated like any SPA packet. A
/// knock profile has no way to close.
pub async fn close(profile: &Profile, verbose: bool) -> Result<(), Failure> {
    let Open::Spa(spa) = &profile.open else {
        return Err(Failure::profile(anyhow::anyhow!(
            "profile {}: only an spa profile can close its grant (a knock sequence has no closing sequence here)",
            profile.name
        )));
    };
    send_spa_profile(profile, spa, true, verbose).await
}

/// Sends `plan`; with `verbose` prints each step as it goes. A TCP step
/// whose handshake failed makes the whole knock fail.
pub async fn run_knock(plan: &KnockPlan, verbose: bool) -> Result<(), Failure> {
    let total = plan.steps.len();
    let sent = knock::knock(plan, |i, s| {
        if verbose {
            match &s.failed {
                None => println!("step {}/{total}: {}/{} sent", i + 1, s.target, s.proto),
                Some(e) => println!("step {}/{total}: {}/{} failed: {e}", i + 1, s.target, s.proto),
            }
        }
    })
    .await
    .map_err(Failure::failed)?;
    let failed: Vec<String> = sent
        .iter()
        .filter_map(|s| s.failed.as_ref().map(|e| format!("{}/{} ({e})", s.target, s.proto)))
        .collect();
    if !failed.is_empty() {
        return Err(Failure::failed(anyhow!(
            "tcp knock step did not complete its handshake: {}",
            failed.join(", ")
        )));
    }
    Ok(())
}

/// Where a profile connects: `HOST PORT` when given, else its `connect`.
pub fn target(profile: &Profile, host_port: Option<(&str, u16)>) -> Result<String, Failure> {
    match host_port {
        Some((h, p)) if h.contains(':') && !h.starts_with('[') => Ok(format!("[{h}]:{p}")),
        Some((h, p)) => Ok(format!("{h}:{p}")),
        None => profile.connect.clone().ok_or_else(|| {
            Failure::usage(anyhow!(
                "profile {} has no connect = \"host:port\" ({}); give HOST PORT",
                profile.name,
                profile.origin.display()
            ))
        }),
    }
}

async fn resolve_target(target: &str, bind: Option<IpAddr>) -> anyhow::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(target)
        .await
        .with_context(|| format!("cannot resolve {target}"))?
        .collect();
    addrs
        .iter()
        .find(|a| bind.is_none_or(|b| b.is_ipv4() == a.is_ipv4()))
        .copied()
        .ok_or_else(|| anyhow!("{target} has no address of the family of the bind address"))
}

/// Connects to `target`, retrying refusals for [`CONNECT_PATIENCE`].
async fn connect_after_open(target: SocketAddr, bind: Option<IpAddr>) -> anyhow::Result<tokio::net::TcpStream> {
    let clock = SystemClock;
    let deadline = clock.now() + CONNECT_PATIENCE;
    loop {
        match connect_tcp(target, bind, CONNECT_PATIENCE).await {
            Ok(s) => return Ok(s),
            Err(e) if clock.now() < deadline && refused(&e) => tokio::time::sleep(CONNECT_RETRY).await,
            Err(e) => return Err(e.context(format!("cannot connect to {target}"))),
        }
    }
}

fn refused(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// `exec`: opens, then replaces this process with `command` (as `env`
/// and `ssh -t` callers expect: its exit status and its signals are its
/// own, Ctrl-C reaches it alone). Returns only when it cannot be started.
pub async fn exec(profile: &Profile, command: &[String], verbose: bool) -> Result<u8, Failure> {
    use std::os::unix::process::CommandExt as _;
    let (program, args) = command
        .split_first()
        .ok_or_else(|| Failure::usage(anyhow!("exec needs a command after --")))?;
    open(profile, verbose).await?;
    tokio::time::sleep(OPEN_SETTLE).await;
    // Our sockets are close-on-exec; stdio is inherited as it is.
    let e = std::process::Command::new(program).args(args).exec();
    let exit = match e.kind() {
        std::io::ErrorKind::PermissionDenied => Exit::NotExecutable,
        _ => Exit::NoCommand,
    };
    Err(Failure::new(exit, anyhow!(e).context(format!("cannot run {program}"))))
}

/// `connect`: opens, connects, relays stdin to the service and the
/// service to stdout until the service closes.
pub async fn connect(profile: &Profile, target: &str, verbose: bool) -> Result<u8, Failure> {
    let addr = resolve_target(target, profile.bind).await.map_err(Failure::failed)?;
    open(profile, verbose).await?;
    tokio::time::sleep(OPEN_SETTLE).await;
    let stream = connect_after_open(addr, profile.bind).await.map_err(Failure::failed)?;
    let stream = stream.into_std().map_err(Failure::failed)?;
    stream.set_nonblocking(false).map_err(Failure::failed)?;
    // Blocking threads: stdin and stdout may be pipes, terminals or files.
    let mut up = stream.try_clone().map_err(Failure::failed)?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        let mut stdin = std::io::stdin().lock();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if up.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    let relay = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut down = stream;
        let mut stdout = std::io::stdout().lock();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = down.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            stdout.write_all(&buf[..n])?;
            stdout.flush()?;
        }
    });
    match relay.await {
        Ok(Ok(())) => Ok(0),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        Ok(Err(e)) => Err(Failure::failed(anyhow!(e).context(format!("relaying {target}")))),
        Err(e) => Err(Failure::failed(anyhow!("relay task failed: {e}"))),
    }
}

/// When `forward` opens again: this long before the grant window ends.
fn reopen_margin(open_for: Duration) -> Duration {
    (open_for / 4).min(Duration::from_secs(2))
}

/// `forward`: a local listener; each connection is preceded by an open
/// when the last one is older than the grant window (less a margin), then
/// relayed to the profile's target. Runs until interrupted.
pub async fn forward(profile: Profile, target: String, listen: SocketAddr, verbose: bool) -> Result<u8, Failure> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| Failure::failed(anyhow!(e).context(format!("cannot listen on {listen}"))))?;
    let local = listener.local_addr().map_err(Failure::failed)?;
    let addr = resolve_target(&target, profile.bind).await.map_err(Failure::failed)?;
    eprintln!("forwarding {local} to {target} (profile {})", profile.name);
    let profile = Arc::new(profile);
    let last_open: Arc<tokio::sync::Mutex<Option<Instant>>> = Arc::default();
    loop {
        let (mut client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: accept on {local}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let profile = profile.clone();
        let last_open = last_open.clone();
        tokio::spawn(async move {
            let clock = SystemClock;
            {
                // Held across the open so concurrent connections open once.
                let mut last = last_open.lock().await;
                let due = last.is_none_or(|t| {
                    clock.now().saturating_duration_since(t) + reopen_margin(profile.open_for) >= profile.open_for
                });
                if due {
                    let started = clock.now();
                    if let Err(e) = open(&profile, verbose).await {
                        eprintln!("error: opening {} for {peer}: {e}", profile.name);
                        return;
                    }
                    tokio::time::sleep(OPEN_SETTLE).await;
                    *last = Some(started);
                }
            }
            match connect_after_open(addr, profile.bind).await {
                Ok(mut upstream) => {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
                Err(e) => eprintln!("error: {e:#}"),
            }
        });
    }
}
