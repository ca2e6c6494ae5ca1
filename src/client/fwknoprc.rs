//! `~/.fwknoprc` stanzas as profiles, so fwknop users keep their file.
//!
//! ```text
//! [default]
//! USE_HMAC            Y
//!
//! [db]
//! SPA_SERVER          db.example.com
//! ACCESS              tcp/15432
//! KEY_BASE64          ...
//! HMAC_KEY_BASE64     ...
//! ```
//!
//! Each stanza is read with `[default]` beneath it. Only the settings this
//! client can honour are accepted; any other setting, or a value it cannot
//! honour (another protocol, digest or mode), is an error naming it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail};

use super::profile::{check_private, default_user, parse_access, AllowIp, Open, Profile, SpaProfile, DEFAULT_OPEN_FOR};
use crate::spa::keyfile;

/// fwknoprc settings this client understands. Anything else is refused by
/// name, so a stanza never opens something other than what it says.
const FWKNOP_KNOWN: &[&str] = &[
    "SPA_SERVER",
    "SPA_SERVER_PORT",
    "SPA_SERVER_PROTO",
    "ACCESS",
    "ALLOW_IP",
    "KEY_BASE64",
    "KEY",
    "HMAC_KEY_BASE64",
    "HMAC_KEY",
    "HMAC_DIGEST_TYPE",
    "USE_HMAC",
    "DIGEST_TYPE",
    "ENCRYPTION_MODE",
    "SPOOF_USER",
    "FW_TIMEOUT",
    "VERBOSE",
    "RESOLVE_IP_HTTPS",
    "WGET_CMD",
    "RESOLVE_URL",
    "USE_GPG",
    "TIME_OFFSET",
    "SPA_SOURCE_PORT",
];

/// Stanza `name` of `.fwknoprc` text as a profile, with `[default]`
/// settings beneath it; `None` when there is no such stanza.
pub fn profile(text: &str, name: &str, path: &Path) -> anyhow::Result<Option<Profile>> {
    let mut stanzas: BTreeMap<String, Vec<(usize, String, String)>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if let Some(stanza) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            current = Some(stanza.trim().to_string());
            stanzas.entry(stanza.trim().to_string()).or_default();
            continue;
        }
        let Some(stanza) = &current else {
            bail!("{}:{line_no}: a setting before any [stanza]", path.display());
        };
        let (k, v) = t.split_once(|c: char| c.is_whitespace()).unwrap_or((t, ""));
        stanzas
            .entry(stanza.clone())
            .or_default()
            .push((line_no, k.to_ascii_uppercase(), v.trim().to_string()));
    }
    if name == "default" || !stanzas.contains_key(name) {
        return Ok(None);
    }
    let mut settings: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for stanza in ["default", name] {
        for (line, k, v) in stanzas.get(stanza).into_iter().flatten() {
            settings.insert(k.clone(), (*line, v.clone()));
        }
    }
    let at = |k: &str| {
        settings
            .get(k)
            .map_or(format!("{} [{name}]", path.display()), |(l, _)| {
                format!("{}:{l} [{name}] {k}", path.display())
            })
    };
    for (k, (line, _)) in &settings {
        if !FWKNOP_KNOWN.contains(&k.as_str()) {
            bail!("{}:{line} [{name}]: unsupported fwknop setting {k}", path.display());
        }
    }
    let get = |k: &str| settings.get(k).map(|(_, v)| v.as_str());
    let unsupported = |k: &str, ok: &[&str]| -> anyhow::Result<()> {
        if let Some(v) = get(k) {
            if !ok.iter().any(|o| o.eq_ignore_ascii_case(v)) {
                bail!("{}: {v:?} is not supported (supported: {})", at(k), ok.join(", "));
            }
        }
        Ok(())
    };
    unsupported("SPA_SERVER_PROTO", &["udp"])?;
    unsupported("HMAC_DIGEST_TYPE", &["sha256"])?;
    unsupported("DIGEST_TYPE", &["sha256"])?;
    unsupported("ENCRYPTION_MODE", &["cbc"])?;
    unsupported("USE_HMAC", &["y", "yes"])?;
    unsupported("USE_GPG", &["n", "no"])?;
    for k in [
        "RESOLVE_IP_HTTPS",
        "WGET_CMD",
        "RESOLVE_URL",
        "TIME_OFFSET",
        "SPA_SOURCE_PORT",
    ] {
        if get(k).is_some() {
            bail!("{}: not supported by this client", at(k));
        }
    }
    if settings.keys().any(|k| k.contains("KEY")) {
        // Keys inline: the file is a private key file.
        check_private(path)?;
    }
    let host = get("SPA_SERVER").ok_or_else(|| anyhow!("{}: SPA_SERVER is missing", at("SPA_SERVER")))?;
    let port = match get("SPA_SERVER_PORT") {
        Some(p) => p
            .parse()
            .map_err(|_| anyhow!("{}: {p:?} is not a port", at("SPA_SERVER_PORT")))?,
        None => crate::spa::fwknop::DEFAULT_PORT,
    };
    let access =
        parse_access(&[get("ACCESS").unwrap_or_default().to_string()]).map_err(|e| anyhow!("{}: {e}", at("ACCESS")))?;
    // Without ALLOW_IP, the packet's source: right behind NAT, where the
    // address this host sees for itself is not the one the gateway sees.
    let allow_ip = match get("ALLOW_IP") {
        Some(a) => a.parse().map_err(|e: String| anyhow!("{}: {e}", at("ALLOW_IP")))?,
        None => AllowIp::Source,
    };
    let mut key_text = String::new();
    for k in ["KEY_BASE64", "KEY", "HMAC_KEY_BASE64", "HMAC_KEY"] {
        if let Some(v) = get(k) {
            key_text += &format!("{k} {v}\n");
        }
    }
    let key_text = zeroize::Zeroizing::new(key_text);
    let keys = keyfile::parse(&key_text).map_err(|e| anyhow!("{}: {e}", at("KEY_BASE64")))?;
    let duration = get("FW_TIMEOUT")
        .map(|t| {
            t.parse::<u64>()
                .map(Duration::from_secs)
                .map_err(|_| anyhow!("{}: {t:?} is not whole seconds", at("FW_TIMEOUT")))
        })
        .transpose()?;
    Ok(Some(Profile {
        name: name.to_string(),
        origin: path.to_path_buf(),
        host: host.to_string(),
        bind: None,
        open: Open::Spa(Box::new(SpaProfile {
            port,
            access,
            keys,
            allow_ip,
            fwknop_user: Some(get("SPOOF_USER").map_or_else(default_user, str::to_string)),
            duration,
        })),
        connect: None,
        open_for: DEFAULT_OPEN_FOR,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fwknoprc_refuses_what_it_cannot_honour() {
        let base = "[default]\nSPA_SERVER_PORT 62201\n[db]\nSPA_SERVER 127.0.0.1\nACCESS tcp/22\n";
        for (extra, want) in [
            ("SPA_SERVER_PROTO tcp\n", "SPA_SERVER_PROTO"),
            ("HMAC_DIGEST_TYPE sha512\n", "HMAC_DIGEST_TYPE"),
            ("USE_HMAC N\n", "USE_HMAC"),
            ("NAT_ACCESS 10.0.0.1,22\n", "unsupported fwknop setting NAT_ACCESS"),
        ] {
            let text = format!("{base}{extra}");
            let e = profile(&text, "db", Path::new("/nonexistent/.fwknoprc")).unwrap_err();
            assert!(format!("{e:#}").contains(want), "{extra}: {e:#}");
        }
        assert!(profile(base, "other", Path::new("x")).unwrap().is_none());
    }
}
