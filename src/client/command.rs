//! The client subcommands, from parsed arguments to an [`Outcome`]. The
//! binary prints a failure as one `error: ...` line and exits with its code.

use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context as _};

use super::profile::{self, AllowIp, Open, Profile};
use super::session;
use super::spa::{self, SpaPlan};
use super::{Failure, Outcome};
use crate::cli::{ConnectArgs, ExecArgs, ForwardArgs, KeygenArgs, KnockArgs, OpenArgs, SpaArgs};
use crate::clock::SystemClock;
use crate::spa::keyfile::{self, KeyFile};
use crate::spa::Fields;
use crate::step::StepSpec;

fn load(name: &str, profiles: &crate::cli::ProfileFile) -> Result<Profile, Failure> {
    profile::find(name, &profiles.sources()).map_err(Failure::profile)
}

pub async fn knock(args: KnockArgs) -> Outcome {
    let mut steps = args.parse_steps().map_err(|e| Failure::usage(anyhow!(e)))?;
    if let Some(key) = &args.totp {
        if !steps.is_empty() {
            return Err(Failure::usage(anyhow!("give STEPS or --totp, not both")));
        }
        let offset = args.time_offset_minus.unwrap_or_default();
        let unix = crate::spa::desk::unix_secs(&SystemClock).saturating_sub(offset.as_secs());
        let wanted = TotpWanted {
            ports: args.ports.clone(),
            steps: args.totp_steps,
            period: args.period,
        };
        steps = totp_steps(key, &wanted, unix)?;
    }
    let (mut host, mut delay, mut bind) = (args.host.clone(), args.delay, args.bind);
    if let Some(name) = &args.profile {
        let p = load(name, &args.profiles)?;
        let (ps, pd) = match &p.open {
            Open::Knock { steps, delay } => (steps.clone(), *delay),
            Open::Totp(t) => (session::totp_now(t)?, None),
            Open::Spa(_) => {
                return Err(Failure::profile(anyhow!(
                    "profile {name} opens with SPA, not a knock sequence: use portcullis spa -n {name} or open {name}"
                )))
            }
        };
        host = host.or(Some(p.host));
        if steps.is_empty() {
            steps = ps;
        }
        delay = delay.or(pd);
        bind = bind.or(p.bind);
    }
    let host = host.ok_or_else(|| Failure::usage(anyhow!("give HOST and STEPS, or -n PROFILE")))?;
    if steps.is_empty() {
        return Err(Failure::usage(anyhow!("no knock steps given")));
    }
    let plan = super::KnockPlan {
        host,
        steps,
        delay,
        bind,
    };
    session::run_knock(&plan, args.verbose).await?;
    Ok(0)
}

/// A rotating sequence's settings as the client was given them; what is
/// missing comes from the key file, then from the defaults.
#[derive(Debug, Clone, Default)]
pub(crate) struct TotpWanted {
    pub ports: Option<String>,
    pub steps: Option<usize>,
    pub period: Option<Duration>,
}

/// The steps of a rotating sequence at wall-clock second `unix`: the
/// secret from `key` (a private file), settings from `wanted` or the file.
pub(crate) fn totp_steps(key: &Path, wanted: &TotpWanted, unix: u64) -> Result<Vec<StepSpec>, Failure> {
    let file = crate::secret::read_private(key).map_err(|e| Failure::profile(anyhow!(e)))?;
    if let Some(w) = &file.warning {
        eprintln!("warning: {w}");
    }
    let text =
        std::str::from_utf8(&file.bytes).map_err(|_| Failure::profile(anyhow!("{} is not text", key.display())))?;
    let in_file = |e: String| Failure::profile(anyhow!("{}: {e}", key.display()));
    let secret = crate::totp::parse_key(text).map_err(in_file)?;
    let saved = crate::totp::key_settings(text).map_err(in_file)?;
    let ports = wanted.ports.clone().or(saved.ports).ok_or_else(|| {
        Failure::usage(anyhow!(
            "give --ports FIRST-LAST/PROTO (the gateway's totp.ports), or a TOTP_PORTS line in {}",
            key.display()
        ))
    })?;
    let (proto, pool) = crate::totp::parse_pool(&ports).map_err(|e| Failure::usage(anyhow!("ports {e}")))?;
    let steps = wanted.steps.or(saved.steps).unwrap_or(4);
    if steps < 1 || steps > pool.len() {
        return Err(Failure::usage(anyhow!(
            "{steps} steps: the pool has {} port(s)",
            pool.len()
        )));
    }
    let period = match (wanted.period, &saved.period) {
        (Some(p), _) => p,
        (None, Some(text)) => crate::config::parse_duration(text).map_err(|e| in_file(format!("TOTP_PERIOD: {e}")))?,
        (None, None) => Duration::from_secs(30),
    };
    let counter = crate::totp::counter(unix, period);
    Ok(crate::totp::sequence(secret.expose(), counter, pool.len(), steps)
        .into_iter()
        .map(|i| StepSpec {
            proto,
            ip: None,
            port: pool[i],
        })
        .collect())
}

/// Reads a key file, `-` meaning stdin.
fn read_keys(path: &Path) -> Result<KeyFile, Failure> {
    let text = zeroize::Zeroizing::new(if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read the key file from stdin")
            .map_err(Failure::profile)?;
        s
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))
            .map_err(Failure::profile)?
    });
    keyfile::parse(&text)
        .with_context(|| format!("key file {}", path.display()))
        .map_err(Failure::profile)
}

async fn spa_plan(args: &SpaArgs) -> Result<SpaPlan, Failure> {
    let from_profile = match &args.profile {
        Some(name) => {
            let p = load(name, &args.profiles)?;
            match p.open {
                Open::Spa(spa) => Some((p.host, p.bind, spa)),
                Open::Knock { .. } | Open::Totp(_) => {
                    return Err(Failure::profile(anyhow!(
                        "profile {name} opens with a knock sequence, not SPA: use portcullis knock -n {name} or open {name}"
                    )))
                }
            }
        }
        None => None,
    };
    let keys = match (&args.key_file, &args.key_env, &from_profile) {
        (Some(path), _, _) => read_keys(path)?,
        (None, Some(var), _) => {
            let text = zeroize::Zeroizing::new(
                std::env::var(var)
                    .with_context(|| format!("environment variable {var} is not set"))
                    .map_err(Failure::profile)?,
            );
            keyfile::parse(&text).context("key file").map_err(Failure::profile)?
        }
        (None, None, Some((_, _, spa))) => spa.keys.clone(),
        (None, None, None) => return Err(Failure::usage(anyhow!("give --key-file, --key-env or -n PROFILE"))),
    };
    let host = args
        .host
        .clone()
        .or_else(|| from_profile.as_ref().map(|(h, _, _)| h.clone()))
        .ok_or_else(|| Failure::usage(anyhow!("give -D HOST or -n PROFILE")))?;
    let bind = args.bind.or(from_profile.as_ref().and_then(|(_, b, _)| *b));
    let port = args
        .port
        .or(from_profile.as_ref().map(|(_, _, s)| s.port))
        .unwrap_or(crate::spa::fwknop::DEFAULT_PORT);
    let access = if args.access.is_empty() {
        match &from_profile {
            Some((_, _, s)) => s.access.clone(),
            None => {
                return Err(Failure::usage(anyhow!(
                    "give -A PROTO/PORT (e.g. tcp/5432) or -n PROFILE"
                )))
            }
        }
    } else {
        profile::parse_access(&args.access).map_err(|e| Failure::usage(anyhow!("-A {e}")))?
    };
    let allow = match &args.allow_ip {
        Some(a) => a.parse::<AllowIp>().map_err(|e| Failure::usage(anyhow!("-a {e}")))?,
        None => from_profile.as_ref().map_or(AllowIp::Source, |(_, _, s)| s.allow_ip),
    };
    let allow_ip = match allow {
        AllowIp::Source => None,
        AllowIp::Addr(ip) => Some(ip),
        AllowIp::Resolve => Some(spa::route_source(&host, port, bind).await.map_err(Failure::failed)?),
    };
    let fwknop = args.fwknop || from_profile.as_ref().is_some_and(|(_, _, s)| s.fwknop_user.is_some());
    let user = args
        .user
        .clone()
        .or_else(|| from_profile.as_ref().and_then(|(_, _, s)| s.fwknop_user.clone()))
        .unwrap_or_else(profile::default_user);
    Ok(SpaPlan {
        host,
        port,
        fields: Fields {
            timestamp: crate::spa::desk::unix_secs(&SystemClock),
            access,
            allow_ip,
            duration: args
                .duration
                .or(from_profile.as_ref().and_then(|(_, _, s)| s.duration))
                .filter(|_| !args.close),
            close: args.close,
        },
        keys,
        fwknop_user: fwknop.then_some(user),
        bind,
    })
}

pub async fn spa(args: SpaArgs) -> Outcome {
    let plan = spa_plan(&args).await?;
    spa::check_keys(&plan).map_err(Failure::profile)?;
    let packet = spa::build_spa(&plan).map_err(Failure::usage)?;
    if let Some(path) = &args.save_packet {
        std::fs::write(path, &packet)
            .with_context(|| format!("cannot write {}", path.display()))
            .map_err(Failure::failed)?;
    }
    if args.verbose || args.test {
        print!("{}", spa::describe(&plan, packet.len()));
    }
    if args.test {
        println!("  packet:    {}", spa::printable(&plan, &packet));
        println!("not sent (-T)");
        return Ok(0);
    }
    let to = spa::send_spa(&plan, &packet).await.map_err(Failure::failed)?;
    if args.verbose {
        println!("sent to {to}");
    }
    Ok(0)
}

pub fn keygen(args: KeygenArgs) -> Outcome {
    let text = if args.kind == keyfile::KeyKind::Totp {
        crate::totp::render_key(&mut rand::rng())
    } else {
        keyfile::render(&keyfile::generate(args.kind, &mut rand::rng()))
    };
    let Some(path) = &args.output else {
        print!("{}", &*text);
        return Ok(0);
    };
    write_private(path, text.as_bytes(), args.force).map_err(Failure::failed)?;
    eprintln!("wrote {} (mode 0600)", path.display());
    Ok(0)
}

/// Creates `path` with mode 0600; an existing file only with `force`.
pub(crate) fn write_private(path: &Path, bytes: &[u8], force: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow!("{} exists: not overwritten (--force replaces it)", path.display())
        } else {
            anyhow!(e).context(format!("cannot create {}", path.display()))
        }
    })?;
    // An existing file keeps its mode under create(true): narrow it.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

pub async fn open(args: OpenArgs) -> Outcome {
    let p = load(&args.name, &args.profiles)?;
    session::open(&p, args.verbose).await?;
    Ok(0)
}

pub async fn close(args: OpenArgs) -> Outcome {
    let p = load(&args.name, &args.profiles)?;
    session::close(&p, args.verbose).await?;
    Ok(0)
}

pub async fn exec(args: ExecArgs) -> Outcome {
    let p = load(&args.name, &args.profiles)?;
    session::exec(&p, &args.command, args.verbose).await
}

pub async fn connect(args: ConnectArgs) -> Outcome {
    let p = load(&args.name, &args.profiles)?;
    let host_port = match (&args.host, args.port) {
        (Some(h), Some(port)) => Some((h.as_str(), port)),
        _ => None,
    };
    let target = session::target(&p, host_port)?;
    session::connect(&p, &target, false).await
}

pub async fn forward(args: ForwardArgs) -> Outcome {
    let p = load(&args.name, &args.profiles)?;
    let target = match &args.to {
        Some(t) => t.clone(),
        None => session::target(&p, None)?,
    };
    session::forward(p, target, args.listen, args.verbose).await
}
