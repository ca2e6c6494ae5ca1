//! Client profiles: named ways to open a service, so no call repeats the
//! host, the steps, the access list, the port or the key path.
//!
//! Profiles come from `$XDG_CONFIG_HOME/portcullis/client.toml` (default
//! `~/.config/portcullis/client.toml`; `--profiles FILE` or
//! `PORTCULLIS_PROFILES` point elsewhere), then from `~/.fwknoprc`, whose
//! stanzas are read as SPA profiles in the fwknop format so fwknop users
//! keep their file:
//!
//! ```toml
//! [profile.db]
//! host = "db.example.com"
//! knock = ["7301/udp", "7305/udp", "7302/udp", "7304/udp"]
//! connect = "db.example.com:15432"
//! open_for = "30s"
//!
//! [profile.db-spa]
//! host = "db.example.com"
//! spa = { port = 62201, access = ["tcp/15432"], key_file = "~/.config/portcullis/alice.key", allow_ip = "source" }
//! connect = "db.example.com:15432"
//! ```
//!
//! A key file named by a profile (or a `.fwknoprc` holding keys) that
//! anyone but its owner can read is refused, as ssh refuses such keys.
//! This module reads files and builds [`Profile`]s; it sends nothing.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde::Deserialize;

use crate::spa::keyfile::{self, KeyFile};
use crate::step::{Proto, StepSpec};

/// The grant window `forward` assumes when a profile names none: the
/// gateway's own default.
pub const DEFAULT_OPEN_FOR: Duration = Duration::from_secs(30);

/// A profile, validated: everything `open` needs is present.
#[derive(Debug)]
pub struct Profile {
    pub name: String,
    /// Where it was read from, for messages.
    pub origin: PathBuf,
    pub host: String,
    /// Local address to send (and connect) from.
    pub bind: Option<IpAddr>,
    pub open: Open,
    /// `host:port` that `exec`, `connect` and `forward` reach afterwards.
    pub connect: Option<String>,
    /// How long a grant lasts at the gateway: `forward` opens again when
    /// its last open is this old.
    pub open_for: Duration,
}

/// How a profile opens its service.
#[derive(Debug)]
pub enum Open {
    Knock {
        steps: Vec<StepSpec>,
        delay: Option<Duration>,
    },
    Spa(Box<SpaProfile>),
    /// A rotating sequence: the steps are computed when it is sent.
    Totp(TotpProfile),
}

/// A profile's rotating sequence, as the gateway's `knock.totp`.
#[derive(Debug, Clone)]
pub struct TotpProfile {
    pub key_file: PathBuf,
    pub ports: String,
    pub steps: usize,
    pub period: Duration,
}

#[derive(Debug)]
pub struct SpaProfile {
    pub port: u16,
    pub access: Vec<(Proto, u16)>,
    pub keys: KeyFile,
    pub allow_ip: AllowIp,
    /// fwknop format with this user name; `None`: native.
    pub fwknop_user: Option<String>,
    pub duration: Option<Duration>,
}

/// Which address a SPA packet asks the gateway to admit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowIp {
    /// Whatever source the packet arrives from.
    Source,
    /// The address this host uses towards the gateway.
    Resolve,
    Addr(IpAddr),
}

impl std::str::FromStr for AllowIp {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "source" | "0.0.0.0" => Ok(AllowIp::Source),
            "resolve" => Ok(AllowIp::Resolve),
            other => other
                .parse()
                .map(AllowIp::Addr)
                .map_err(|_| format!("allow_ip {s:?}: expected an address, \"source\" or \"resolve\"")),
        }
    }
}

/// Where profiles are looked up.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `--profiles` or `PORTCULLIS_PROFILES`; otherwise the XDG default.
    pub file: Option<PathBuf>,
}

impl Sources {
    fn toml_path(&self) -> Option<PathBuf> {
        if let Some(f) = &self.file {
            return Some(f.clone());
        }
        config_dir().map(|d| d.join("client.toml"))
    }
}

/// `$XDG_CONFIG_HOME/portcullis`, or `~/.config/portcullis`.
pub fn config_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => home()?.join(".config"),
    };
    Some(base.join("portcullis"))
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// Finds profile `name`: first in the profile file, then in `~/.fwknoprc`.
pub fn find(name: &str, sources: &Sources) -> anyhow::Result<Profile> {
    let mut looked = Vec::new();
    if let Some(path) = sources.toml_path() {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                if let Some(p) = from_toml(&text, name, &path)? {
                    return Ok(p);
                }
                looked.push(path.display().to_string());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && sources.file.is_none() => {}
            Err(e) => return Err(anyhow!(e).context(format!("cannot read {}", path.display()))),
        }
    }
    if let Some(path) = home().map(|h| h.join(".fwknoprc")) {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                if let Some(p) = super::fwknoprc::profile(&text, name, &path)? {
                    return Ok(p);
                }
                looked.push(path.display().to_string());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow!(e).context(format!("cannot read {}", path.display()))),
        }
    }
    if looked.is_empty() {
        bail!(
            "no profile {name:?}: no profile file ({} or ~/.fwknoprc)",
            sources
                .toml_path()
                .map_or("client.toml".into(), |p| p.display().to_string())
        );
    }
    bail!("no profile {name:?} in {}", looked.join(" or "))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    profile: BTreeMap<String, RawProfile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    host: String,
    bind: Option<IpAddr>,
    knock: Option<RawKnock>,
    spa: Option<RawSpa>,
    totp: Option<RawTotp>,
    connect: Option<String>,
    open_for: Option<String>,
    /// Pause between knock steps (`knock -d`).
    delay: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawKnock {
    Steps(Vec<String>),
    Table { totp: RawTotp },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTotp {
    key_file: String,
    ports: String,
    steps: Option<usize>,
    period: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpa {
    port: Option<u16>,
    access: OneOrMany,
    key_file: Option<String>,
    allow_ip: Option<String>,
    user: Option<String>,
    #[serde(default)]
    fwknop: bool,
    duration: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// Profile `name` from `client.toml` text; `None` when it has none.
pub fn from_toml(text: &str, name: &str, path: &Path) -> anyhow::Result<Option<Profile>> {
    let de = toml::Deserializer::new(text);
    let file: RawFile = serde_path_to_error::deserialize(de)
        .map_err(|e| anyhow!("{}: {}: {}", path.display(), e.path(), e.inner().message().trim()))?;
    let Some(raw) = file.profile.get(name) else {
        return Ok(None);
    };
    let key = |field: &str| format!("{}: profile.{name}.{field}", path.display());
    let base = path.parent().unwrap_or(Path::new("."));
    let open = match (&raw.knock, &raw.spa, &raw.totp) {
        (Some(RawKnock::Steps(steps)), None, None) => {
            if steps.is_empty() {
                bail!("{}: no steps", key("knock"));
            }
            let steps = steps
                .iter()
                .map(|s| {
                    s.parse::<StepSpec>()
                        .map_err(|e| anyhow!("{}: {s:?}: {e}", key("knock")))
                })
                .collect::<anyhow::Result<_>>()?;
            let delay = raw
                .delay
                .as_deref()
                .map(|d| parse_delay(d).map_err(|e| anyhow!("{}: {e}", key("delay"))))
                .transpose()?;
            Open::Knock { steps, delay }
        }
        (Some(RawKnock::Table { totp }), None, None) | (None, None, Some(totp)) => {
            let period = match &totp.period {
                Some(d) => crate::config::parse_duration(d).map_err(|e| anyhow!("{}: {e}", key("totp.period")))?,
                None => Duration::from_secs(30),
            };
            crate::totp::parse_pool(&totp.ports).map_err(|e| anyhow!("{}: {e}", key("totp.ports")))?;
            Open::Totp(TotpProfile {
                key_file: expand(&totp.key_file, base),
                ports: totp.ports.clone(),
                steps: totp.steps.unwrap_or(4),
                period,
            })
        }
        (None, Some(spa), None) => Open::Spa(Box::new(spa_profile(spa, name, base, &key)?)),
        (None, None, None) => bail!("{}: the profile needs knock = [...] or spa = {{ ... }}", key("host")),
        _ => bail!("{}: give one of knock, spa or totp", key("knock")),
    };
    let open_for = match &raw.open_for {
        Some(d) => crate::config::parse_duration(d).map_err(|e| anyhow!("{}: {e}", key("open_for")))?,
        None => DEFAULT_OPEN_FOR,
    };
    Ok(Some(Profile {
        name: name.to_string(),
        origin: path.to_path_buf(),
        host: raw.host.clone(),
        bind: raw.bind,
        open,
        connect: raw.connect.clone(),
        open_for,
    }))
}

fn spa_profile(spa: &RawSpa, name: &str, base: &Path, key: &dyn Fn(&str) -> String) -> anyhow::Result<SpaProfile> {
    let access_list: Vec<String> = match &spa.access {
        OneOrMany::One(s) => vec![s.clone()],
        OneOrMany::Many(v) => v.clone(),
    };
    let access = parse_access(&access_list).map_err(|e| anyhow!("{}: {e}", key("spa.access")))?;
    let key_path = match &spa.key_file {
        Some(p) => expand(p, base),
        None => config_dir()
            .map(|d| d.join(format!("{name}.key")))
            .ok_or_else(|| anyhow!("{}: no key_file and no HOME to find a default", key("spa.key_file")))?,
    };
    let keys = read_private_key(&key_path).map_err(|e| anyhow!("{}: {e:#}", key("spa.key_file")))?;
    let allow_ip = match &spa.allow_ip {
        Some(a) => a.parse().map_err(|e: String| anyhow!("{}: {e}", key("spa.allow_ip")))?,
        None => AllowIp::Source,
    };
    let duration = spa
        .duration
        .as_deref()
        .map(|d| crate::config::parse_duration(d).map_err(|e| anyhow!("{}: {e}", key("spa.duration"))))
        .transpose()?;
    Ok(SpaProfile {
        port: spa.port.unwrap_or(crate::spa::fwknop::DEFAULT_PORT),
        access,
        keys,
        allow_ip,
        fwknop_user: spa.fwknop.then(|| spa.user.clone().unwrap_or_else(default_user)),
        duration,
    })
}

/// The login name fwknop packets carry when nothing else is given.
pub fn default_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "portcullis".to_string())
}

/// `~/x` from HOME; relative paths from the profile file's directory.
fn expand(path: &str, base: &Path) -> PathBuf {
    if let (Some(rest), Some(home)) = (path.strip_prefix("~/"), home()) {
        return home.join(rest);
    }
    let p = PathBuf::from(path);
    if p.is_relative() {
        base.join(p)
    } else {
        p
    }
}

/// A key file that only its owner may read (as ssh demands of private keys).
pub fn read_private_key(path: &Path) -> anyhow::Result<KeyFile> {
    check_private(path)?;
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
    );
    keyfile::parse(&text).with_context(|| format!("key file {}", path.display()))
}

pub(super) fn check_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{} is readable by others (mode {mode:04o}): refused, as ssh refuses unprotected keys; run chmod 600 {}",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

/// `-A` values: each `PROTO/PORT` (or `PORT/PROTO`), several per value
/// when comma-separated as fwknop writes them (`tcp/22,udp/53`).
pub fn parse_access(values: &[String]) -> Result<Vec<(Proto, u16)>, String> {
    let mut access = Vec::new();
    for value in values {
        for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let spec: StepSpec = part.parse().map_err(|e| format!("{part:?}: {e}"))?;
            if spec.ip.is_some() {
                return Err(format!("{part:?}: give PROTO/PORT without an address"));
            }
            access.push((spec.proto, spec.port));
        }
    }
    if access.is_empty() {
        return Err("no PROTO/PORT given".to_string());
    }
    Ok(access)
}

/// A pause: a duration (`100ms`) or, as knockd's `-d`, bare milliseconds.
pub fn parse_delay(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<u64>() {
        Ok(ms) => Ok(Duration::from_millis(ms)),
        Err(_) => crate::config::parse_duration(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lists_and_delays_parse() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_access(&v(&["tcp/22,udp/53", "5432/tcp"])),
            Ok(vec![(Proto::Tcp, 22), (Proto::Udp, 53), (Proto::Tcp, 5432)])
        );
        assert!(parse_access(&v(&[""])).is_err());
        assert!(parse_access(&v(&["tcp/0"])).is_err());
        assert_eq!(parse_delay("500"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_delay("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_delay("soon").is_err());
    }

    #[test]
    fn a_knock_profile_reads() {
        let text = r#"
[profile.db]
host = "db.example.com"
knock = ["7301/udp", "7305/udp", "7302/tcp"]
connect = "db.example.com:15432"
open_for = "2s"
"#;
        let p = from_toml(text, "db", Path::new("/x/client.toml")).unwrap().unwrap();
        assert_eq!(p.host, "db.example.com");
        assert_eq!(p.open_for, Duration::from_secs(2));
        assert!(matches!(&p.open, Open::Knock { steps, .. } if steps.len() == 3));
        assert!(from_toml(text, "other", Path::new("/x/client.toml")).unwrap().is_none());
    }

    #[test]
    fn bad_profiles_name_their_key() {
        let cases = [
            ("[profile.a]\nhost = \"h\"\nknock = [\"x/udp\"]\n", "profile.a.knock"),
            ("[profile.a]\nhost = \"h\"\n", "profile.a"),
            ("[profile.a]\nhost = \"h\"\nknock = [\"1/udp\"]\nfoo = 1\n", "foo"),
            (
                "[profile.a]\nhost = \"h\"\ntotp = { key_file = \"k\", steps = 4 }\n",
                "ports",
            ),
            (
                "[profile.a]\nhost = \"h\"\ntotp = { key_file = \"k\", ports = \"9-1/udp\" }\n",
                "profile.a.totp.ports",
            ),
        ];
        for (text, want) in cases {
            let e = from_toml(text, "a", Path::new("c.toml")).unwrap_err();
            assert!(format!("{e:#}").contains(want), "{text}: {e:#}");
        }
    }
}
