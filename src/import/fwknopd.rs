//! `portcullis import fwknopd DIR_OR_FILE`: access.conf (and fwknopd.conf
//! beside it) into `[spa]`, users and services.
//!
//! Each access.conf stanza becomes a `[user.NAME]` whose keys go to a key
//! file of its own; each `OPEN_PORTS` entry becomes a service that lists
//! the stanzas allowed to open it. fwknopd opens whatever a packet asks
//! for when a stanza names no ports, and portcullis guards named services
//! only, so such a stanza gets every imported service, or a guessed ssh
//! service with a TODO.
//!
//! Keys: Debian's access.conf holds the placeholder `__CHANGEME__`, with
//! which fwknopd refuses to start. The import never carries a placeholder
//! into a key file: it generates fresh keys (as `fwknop --key-gen` does)
//! and says so in a TODO, since clients need them. Real keys are copied
//! into the key file as they are.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use zeroize::Zeroizing;

use super::{at, list, note, quote, table_name, todo, Doc, KeyOut, Output, Table};
use crate::config::MIN_FWKNOP_KEY_LEN;
use crate::spa::fwknop::{DigestType, EncryptionMode};
use crate::spa::keyfile::{self, KeyKind};
use crate::step::Proto;

/// The placeholder in Debian's access.conf.
pub const PLACEHOLDER: &str = "__CHANGEME__";

/// fwknopd's defaults.
const DEFAULT_SPA_PORT: u16 = 62201;
const DEFAULT_ACCESS_TIMEOUT: u64 = 30;

/// `KEYWORD value` lines: upper-cased keyword, value, line.
type Lines = Vec<(String, String, usize)>;

fn parse(text: &str) -> Lines {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let t = raw.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let (k, v) = t.split_once(char::is_whitespace).unwrap_or((t, ""));
        let v = v.trim().trim_end_matches(';').trim();
        out.push((k.trim_end_matches(':').to_ascii_uppercase(), v.to_string(), i + 1));
    }
    out
}

/// The files to read for `path`: access.conf, and fwknopd.conf if present.
pub fn files(path: &Path) -> (PathBuf, Option<PathBuf>) {
    let (dir, access) = if path.is_dir() {
        (path.to_path_buf(), path.join("access.conf"))
    } else if path.file_name().is_some_and(|n| n == "fwknopd.conf") {
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        (dir.clone(), dir.join("access.conf"))
    } else {
        (
            path.parent().map(Path::to_path_buf).unwrap_or_default(),
            path.to_path_buf(),
        )
    };
    let daemon = dir.join("fwknopd.conf");
    (access, daemon.is_file().then_some(daemon))
}

/// Reads `path` (see [`files`]) and imports it.
pub fn import_path(path: &Path, out: &Output) -> anyhow::Result<Doc> {
    let (access, daemon) = files(path);
    let access_text = std::fs::read_to_string(&access).with_context(|| format!("cannot read {}", access.display()))?;
    let daemon_text = match &daemon {
        Some(d) => Some((
            d.clone(),
            std::fs::read_to_string(d).with_context(|| format!("cannot read {}", d.display()))?,
        )),
        None => None,
    };
    import(
        &access,
        &access_text,
        daemon_text.as_ref().map(|(p, t)| (p.as_path(), t.as_str())),
        out,
    )
}

#[derive(Default)]
struct Svc {
    users: Vec<String>,
    /// Each stanza's FW_ACCESS_TIMEOUT (or fwknopd's default).
    open_for: Vec<u64>,
    max_open_for: Option<u64>,
    guessed: bool,
}

/// Imports access.conf text (and fwknopd.conf's, if any).
pub fn import(access: &Path, text: &str, daemon: Option<(&Path, &str)>, out: &Output) -> anyhow::Result<Doc> {
    let mut doc = Doc::new("fwknopd", access);
    let mut spa = Table::new("spa");
    daemon_conf(daemon, &mut doc, &mut spa);
    doc.tables.push(spa);

    // Stanzas start at SOURCE.
    let mut stanzas: Vec<Lines> = Vec::new();
    for line in parse(text) {
        if line.0 == "SOURCE" || stanzas.is_empty() {
            if line.0 != "SOURCE" && !line.0.starts_with('%') {
                doc.header.push(note(&format!(
                    "{}: {} before any SOURCE line, which fwknopd refuses: not carried over",
                    at(access, line.2),
                    line.0
                )));
                continue;
            }
            if line.0 == "SOURCE" {
                stanzas.push(Vec::new());
            }
        }
        if line.0.starts_with('%') {
            doc.header.push(note(&format!(
                "{}: {} {} is not followed: import the included files on their own",
                at(access, line.2),
                line.0,
                line.1
            )));
            continue;
        }
        if let Some(s) = stanzas.last_mut() {
            s.push(line);
        }
    }

    let mut services: BTreeMap<(Proto, u16), Svc> = BTreeMap::new();
    let mut any_port_users = Vec::new();
    let mut users: Vec<Table> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for (i, stanza) in stanzas.iter().enumerate() {
        let get = |k: &str| {
            stanza
                .iter()
                .rev()
                .find(|(key, _, _)| key == k)
                .map(|(_, v, l)| (v.as_str(), *l))
        };
        let source_line = stanza.first().map_or(0, |s| s.2);
        let wanted = get("REQUIRE_USERNAME").map(|(v, _)| v.to_string());
        let name = table_name(wanted.as_deref().unwrap_or(""), &format!("user{}", i + 1), &names);
        names.push(name.clone());
        let base = format!("user.{name}");
        let mut t = Table::new(base.clone());
        t.comments
            .push(format!("From the stanza at {}.", at(access, source_line)));
        let seconds = |k: &str| get(k).and_then(|(v, _)| v.parse::<u64>().ok());
        let open_for = seconds("FW_ACCESS_TIMEOUT");
        let max_open_for = seconds("MAX_FW_TIMEOUT");
        // Ports first, so the user's table follows its services' names.
        match get("OPEN_PORTS") {
            Some((ports, l)) => {
                for item in ports.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    match item
                        .split_once('/')
                        .and_then(|(p, n)| Some((p.parse::<Proto>().ok()?, n.trim().parse::<u16>().ok()?)))
                    {
                        Some((proto, port)) if port != 0 => {
                            let s = services.entry((proto, port)).or_default();
                            s.users.push(name.clone());
                            s.open_for.push(open_for.unwrap_or(DEFAULT_ACCESS_TIMEOUT));
                            s.max_open_for = s.max_open_for.max(max_open_for);
                        }
                        _ => t.comments.push(note(&format!(
                            "OPEN_PORTS entry {item:?} ({}) is not PROTO/PORT: left out",
                            at(access, l)
                        ))),
                    }
                }
            }
            None => any_port_users.push((name.clone(), open_for, max_open_for)),
        }
        user_settings(access, stanza, &name, &base, &mut t, &mut doc, out)?;
        users.push(t);
    }
    if !any_port_users.is_empty() {
        if services.is_empty() {
            services.insert(
                (Proto::Tcp, 22),
                Svc {
                    guessed: true,
                    ..Svc::default()
                },
            );
        }
        for s in services.values_mut() {
            for (name, open_for, max) in &any_port_users {
                s.users.push(name.clone());
                s.open_for.push(open_for.unwrap_or(DEFAULT_ACCESS_TIMEOUT));
                s.max_open_for = s.max_open_for.max(*max);
            }
        }
    }

    let mut service_names = Vec::new();
    for ((proto, port), s) in &services {
        let well_known = match (proto, port) {
            (Proto::Tcp, 22) => "ssh".to_string(),
            (Proto::Tcp, 80) => "http".to_string(),
            (Proto::Tcp, 443) => "https".to_string(),
            (Proto::Tcp, 5432) => "postgres".to_string(),
            (Proto::Tcp, 3306) => "mysql".to_string(),
            (Proto::Tcp, 6379) => "redis".to_string(),
            (Proto::Udp, 53) => "dns".to_string(),
            _ => format!("{proto}-{port}"),
        };
        let name = table_name(&well_known, "service", &service_names);
        service_names.push(name.clone());
        let base = format!("service.{name}");
        let mut t = Table::new(base.clone());
        let mut listen_notes = Vec::new();
        if s.guessed {
            listen_notes.push(todo(
                &format!("{base}.listen"),
                "access.conf names no OPEN_PORTS, so fwknopd opened whatever port a packet asked for; \
                 portcullis guards named services only. This one (tcp/22, what fwknop is most often \
                 used for) is a guess: add a [service.NAME] for each port clients ask for (fwknop -A)",
            ));
        } else if !any_port_users.is_empty() {
            listen_notes.push(note(
                "stanzas without OPEN_PORTS may open every service imported here (fwknopd: any port)",
            ));
        }
        t.set("listen", quote(&format!("0.0.0.0:{port}")), listen_notes);
        super::set_upstream(&mut t, &base, *port);
        t.set("protocol", quote(proto.as_str()), Vec::new());
        let open_for = s.open_for.iter().copied().max().unwrap_or(DEFAULT_ACCESS_TIMEOUT);
        let mut c = vec![note(
            "FW_ACCESS_TIMEOUT (default 30): fwknopd's rule lived that long; here new connections are \
             let in for open_for, and connections opened stay up",
        )];
        if s.open_for.iter().any(|t| *t != open_for) {
            c.push(note(
                "the stanzas that open this service differ in FW_ACCESS_TIMEOUT: a service has one open_for, \
                 so the longest is taken (a client asks for less with fwknop -f)",
            ));
        }
        t.set("open_for", quote(&format!("{open_for}s")), c);
        if let Some(max) = s.max_open_for {
            t.set(
                "max_open_for",
                quote(&format!("{}s", max.max(open_for))),
                vec![note("MAX_FW_TIMEOUT")],
            );
        }
        t.set("spa_users", list(&s.users), Vec::new());
        doc.tables.push(t);
    }
    doc.tables.extend(users);
    if stanzas.is_empty() {
        doc.header.push(todo(
            "service",
            "access.conf has no stanza (SOURCE ...): nobody could open anything; add [user.NAME] and a service",
        ));
    }
    Ok(doc)
}

/// fwknopd.conf into `[spa]` (and notes for everything else).
fn daemon_conf(daemon: Option<(&Path, &str)>, doc: &mut Doc, spa: &mut Table) {
    let mut port = DEFAULT_SPA_PORT;
    let mut spa_notes = Vec::new();
    let mut other = Vec::new();
    // ENABLE_TCP_SERVER (and its TCPSERV_PORT), ENABLE_SPA_OVER_HTTP.
    let mut tcp: Option<String> = None;
    let mut tcp_port = DEFAULT_SPA_PORT;
    let mut http: Option<String> = None;
    match daemon {
        None => spa_notes.push(note(
            "no fwknopd.conf beside access.conf: fwknopd's defaults (UDP port 62201)",
        )),
        Some((file, text)) => {
            let lines = parse(text);
            if lines.is_empty() {
                spa_notes.push(note(&format!(
                    "{} sets nothing (every line is a comment): fwknopd's defaults (UDP port 62201)",
                    file.display()
                )));
            }
            for (k, v, l) in lines {
                let here = at(file, l);
                match k.as_str() {
                    "UDPSERV_PORT" | "NFQ_PORT" => match v.parse::<u16>() {
                        Ok(p) => {
                            port = p;
                            spa_notes.push(note(&format!("{k} {v} ({here})")));
                        }
                        Err(_) => spa_notes.push(note(&format!("{k} {v:?} ({here}) is not a port: ignored"))),
                    },
                    "PCAP_FILTER" => {
                        let words: Vec<&str> = v.split_whitespace().collect();
                        let found = words
                            .windows(2)
                            .find(|w| w[0] == "port")
                            .and_then(|w| w[1].parse::<u16>().ok());
                        match found {
                            Some(p) => {
                                port = p;
                                spa_notes.push(note(&format!(
                                    "PCAP_FILTER {v:?} ({here}): its port; the rest of the filter has no equivalent"
                                )));
                            }
                            None => spa_notes.push(note(&format!(
                                "PCAP_FILTER {v:?} ({here}) names no `port N`: fwknop's default port"
                            ))),
                        }
                    }
                    "MAX_SPA_PACKET_AGE" => match v.parse::<u64>() {
                        Ok(n) => spa.set(
                            "max_age",
                            quote(&format!("{n}s")),
                            vec![note(&format!("MAX_SPA_PACKET_AGE ({here})"))],
                        ),
                        Err(_) => spa_notes.push(note(&format!(
                            "MAX_SPA_PACKET_AGE {v:?} ({here}) is not seconds: ignored"
                        ))),
                    },
                    // What portcullis does anyway.
                    "ENABLE_TCP_SERVER" | "ENABLE_SPA_OVER_HTTP" | "ENABLE_X_FORWARDED_FOR" if !is_yes(&v) => {}
                    "ENABLE_SPA_PACKET_AGING" | "ENABLE_UDP_SERVER" if is_yes(&v) => {}
                    "ENABLE_TCP_SERVER" => tcp = Some(format!("{k} {v} ({here})")),
                    "TCPSERV_PORT" => match v.parse::<u16>() {
                        Ok(p) => tcp_port = p,
                        Err(_) => spa_notes.push(note(&format!("{k} {v:?} ({here}) is not a port: ignored"))),
                    },
                    "ENABLE_SPA_OVER_HTTP" => http = Some(format!("{k} {v} ({here})")),
                    "ENABLE_SPA_PACKET_AGING" if !is_yes(&v) => spa_notes.push(note(&format!(
                        "{k} {v} ({here}): packets are always aged here (spa.max_age, at most 24h)"
                    ))),
                    "ENABLE_DIGEST_PERSISTENCE" => spa_notes.push(note(&format!(
                        "{k} {v} ({here}): the replay cache always persists here (state.dir)"
                    ))),
                    "PCAP_INTF" | "NFQ_INTERFACE" => spa_notes.push(note(&format!(
                        "{k} {v} ({here}): portcullis binds an address, not an interface: put {v}'s address in listen"
                    ))),
                    _ => other.push(format!("{k} ({here})")),
                }
            }
        }
    }
    if !other.is_empty() {
        doc.header.push(note(&format!(
            "not carried over from fwknopd.conf (firewall and daemon settings: portcullis sets no firewall rules): {}",
            other.join(", ")
        )));
    }
    spa.set("listen", quote(&format!("0.0.0.0:{port}")), spa_notes);
    if let Some(from) = tcp {
        spa.set(
            "tcp_listen",
            quote(&format!("0.0.0.0:{tcp_port}")),
            vec![note(&format!(
                "{from}: fwknop -P tcp; a scan sees this port open (the handshake answers), as with fwknopd"
            ))],
        );
    }
    if let Some(from) = http {
        spa.set(
            "http_listen",
            quote("0.0.0.0:80"),
            vec![note(&format!(
                "{from}: fwknop -P http sends to port 80, which needs CAP_NET_BIND_SERVICE; a scan sees it open"
            ))],
        );
    }
}

fn is_yes(v: &str) -> bool {
    v.eq_ignore_ascii_case("y") || v.eq_ignore_ascii_case("yes")
}

/// One stanza's keys and limits into its `[user.NAME]` table.
fn user_settings(
    file: &Path,
    stanza: &Lines,
    name: &str,
    base: &str,
    t: &mut Table,
    doc: &mut Doc,
    out: &Output,
) -> anyhow::Result<()> {
    let mut key_lines = Zeroizing::new(String::new());
    let mut placeholder = Vec::new();
    let mut has_key = false;
    for (k, v, l) in stanza {
        let here = at(file, *l);
        match k.as_str() {
            "SOURCE" if v.eq_ignore_ascii_case("any") => {}
            "SOURCE" => {
                let nets: Vec<String> = v
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                t.set("allow_from", list(&nets), vec![note(&format!("SOURCE ({here})"))]);
            }
            "KEY" | "KEY_BASE64" | "HMAC_KEY" | "HMAC_KEY_BASE64" => {
                has_key = true;
                if v == PLACEHOLDER {
                    placeholder.push(format!("{k} ({here})"));
                } else {
                    key_lines.push_str(&format!("{k}: {v}\n"));
                }
            }
            "HMAC_DIGEST_TYPE" => {
                let c = match v.parse::<DigestType>() {
                    Ok(_) => vec![note(&format!("HMAC_DIGEST_TYPE ({here})"))],
                    Err(e) => vec![todo(&format!("{base}.hmac_digest"), &e.to_string())],
                };
                t.set("hmac_digest", quote(&v.to_ascii_lowercase()), c);
            }
            "ENCRYPTION_MODE" => {
                let c = match v.parse::<EncryptionMode>() {
                    Ok(_) => vec![note(&format!("ENCRYPTION_MODE ({here})"))],
                    Err(e) => vec![todo(&format!("{base}.encryption_mode"), &e.to_string())],
                };
                t.set("encryption_mode", quote(&v.to_ascii_lowercase()), c);
            }
            "REQUIRE_USERNAME" => {
                let value = if v == name { "true".to_string() } else { quote(v) };
                t.set(
                    "require_username",
                    value,
                    vec![note(&format!("REQUIRE_USERNAME ({here})"))],
                );
            }
            "REQUIRE_SOURCE_ADDRESS" | "REQUIRE_SOURCE" => {
                t.set(
                    "require_source_address",
                    is_yes(v).to_string(),
                    vec![note(&format!("{k} ({here})"))],
                );
            }
            "ACCESS_EXPIRE" => t.set("expires", quote(v), vec![note(&format!("ACCESS_EXPIRE ({here})"))]),
            "ACCESS_EXPIRE_EPOCH" => {
                let when = v.parse::<u64>().map(|s| {
                    humantime::format_rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s)).to_string()
                });
                match when {
                    Ok(w) => t.set(
                        "expires",
                        quote(&w),
                        vec![note(&format!("ACCESS_EXPIRE_EPOCH ({here})"))],
                    ),
                    Err(_) => t.comments.push(todo(
                        &format!("{base}.expires"),
                        &format!("ACCESS_EXPIRE_EPOCH {v:?} is not a Unix time"),
                    )),
                }
            }
            "USE_HMAC" if !is_yes(v) => t.comments.push(note(&format!(
                "USE_HMAC {v} ({here}): packets without HMAC are refused here; clients send with --use-hmac"
            ))),
            "OPEN_PORTS" | "FW_ACCESS_TIMEOUT" | "MAX_FW_TIMEOUT" | "USE_HMAC" => {}
            _ if k.starts_with("GPG_") => t.comments.push(note(&format!(
                "{k} ({here}): GPG mode is not supported: use HMAC keys (`fwknop --key-gen`, or \
                 `portcullis keygen --kind fwknop`) and clients with --use-hmac"
            ))),
            _ if k.contains("CMD") => t.comments.push(note(&format!(
                "{k} {v} ({here}): commands are not run or carried over: portcullis only opens services"
            ))),
            _ if k.contains("NAT") || k.contains("MASQUERADE") || k == "FORWARD_ALL" => {
                t.comments.push(note(&format!(
                    "{k} ({here}): not supported: portcullis forwards to each service's upstream (for fwknop -N, set \
                 the service's nat_name)"
                )))
            }
            _ => t
                .comments
                .push(note(&format!("{k} ({here}): no equivalent, not carried over"))),
        }
    }
    let key_setting = format!("{base}.key_file");
    if !has_key {
        t.comments.push(todo(
            base,
            "this stanza holds no KEY or HMAC key (GPG only?): not carried over; make keys with `fwknop --key-gen` \
             into a file (mode 0600) and set key_file",
        ));
        return Ok(());
    }
    let file_name = format!("{name}.key");
    let path = out.key_path(&file_name)?;
    let text = if placeholder.is_empty() {
        key_lines
    } else {
        keyfile::render(&keyfile::generate(KeyKind::Fwknop, &mut rand::rng()))
    };
    let mut c = Vec::new();
    if !placeholder.is_empty() {
        c.push(todo(
            &key_setting,
            &format!(
                "{} held the placeholder {PLACEHOLDER}, with which fwknopd refuses to start: this file holds \
                 fresh keys instead (as `fwknop --key-gen` makes). Give them to the client: its ~/.fwknoprc \
                 stanza takes the file's KEY_BASE64 and HMAC_KEY_BASE64 lines, with USE_HMAC Y",
                placeholder.join(", ")
            ),
        ));
    } else {
        match keyfile::parse(&text) {
            Ok(k) if k.fwknop.as_ref().is_some_and(|f| f.hmac().is_none()) => c.push(todo(
                &key_setting,
                "no HMAC key: portcullis refuses fwknop packets without HMAC (anyone could forge them). Make \
                 keys with `fwknop --key-gen`, here and in the client, which then sends with --use-hmac",
            )),
            Ok(k)
                if k.fwknop.as_ref().is_some_and(|f| {
                    f.enc().len() < MIN_FWKNOP_KEY_LEN || f.hmac().is_some_and(|h| h.len() < MIN_FWKNOP_KEY_LEN)
                }) =>
            {
                c.push(todo(
                    &key_setting,
                    &format!(
                        "a key of this stanza is shorter than {MIN_FWKNOP_KEY_LEN} bytes, which falls to a \
                         dictionary and is refused here: make keys with `fwknop --key-gen`, here and in the client"
                    ),
                ))
            }
            Ok(_) => c.push(note("the stanza's keys, as they were")),
            Err(e) => c.push(todo(&key_setting, &format!("the stanza's keys, in the key file: {e}"))),
        }
    }
    t.set("key_file", quote(&path.display().to_string()), c);
    doc.keys.push(KeyOut { file: file_name, text });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(dir: &Path) -> Output {
        Output {
            dir: Some(dir.to_path_buf()),
            force: false,
        }
    }

    #[test]
    fn placeholders_become_fresh_keys_and_no_ports_a_guessed_ssh() {
        let dir = tempfile::tempdir().unwrap();
        let text = "SOURCE ANY\nKEY_BASE64 __CHANGEME__\nHMAC_KEY_BASE64 __CHANGEME__\n";
        let doc = import(Path::new("access.conf"), text, None, &out(dir.path())).unwrap();
        let toml = doc.render();
        assert!(toml.contains("[service.ssh]"), "{toml}");
        assert!(toml.contains("spa_users = [\"user1\"]"), "{toml}");
        assert!(toml.contains("listen = \"0.0.0.0:62201\""), "{toml}");
        assert_eq!(doc.keys.len(), 1);
        assert!(!doc.keys[0].text.contains(PLACEHOLDER));
        assert!(
            !toml.contains(&doc.keys[0].text.lines().next().unwrap()[12..]),
            "key in the config"
        );
        assert!(doc.todo_paths().contains(&"user.user1.key_file".to_string()));
    }

    #[test]
    fn stanzas_map_to_users_and_ports_to_services() {
        let dir = tempfile::tempdir().unwrap();
        let text = "SOURCE 192.0.2.0/24, 198.51.100.7\nOPEN_PORTS tcp/22, udp/53\n\
                    KEY_BASE64 GWn6QLFeR8Ce1tYl//zGRC5rYV2w9dJMz0yUcBOtTAc=\n\
                    HMAC_KEY_BASE64 Wd73/Nyj3iMdI92SoJoZB/deL1Ktsy7lAfmx9cRlA+yicTgdjehaf+BUQN77RLO+7WfZG8wr/Mx5J8gk3Saj6g==\n\
                    HMAC_DIGEST_TYPE SHA512\nFW_ACCESS_TIMEOUT 60\nMAX_FW_TIMEOUT 600\nREQUIRE_USERNAME alice\n\
                    REQUIRE_SOURCE_ADDRESS Y\nACCESS_EXPIRE 01/31/2027\nENABLE_CMD_EXEC Y\nGPG_REMOTE_ID 1234\n";
        let daemon = "PCAP_FILTER   udp port 12345;\nENABLE_TCP_SERVER Y;\nFLUSH_IPT_AT_INIT N;\n";
        let doc = import(
            Path::new("access.conf"),
            text,
            Some((Path::new("fwknopd.conf"), daemon)),
            &out(dir.path()),
        )
        .unwrap();
        let toml = doc.render();
        for want in [
            "[service.ssh]",
            "[service.dns]",
            "spa_users = [\"alice\"]",
            "allow_from = [\"192.0.2.0/24\", \"198.51.100.7\"]",
            "hmac_digest = \"sha512\"",
            "open_for = \"60s\"",
            "max_open_for = \"600s\"",
            "require_username = true",
            "require_source_address = true",
            "expires = \"01/31/2027\"",
            "listen = \"0.0.0.0:12345\"",
            "ENABLE_CMD_EXEC",
            "GPG mode is not supported",
            "ENABLE_TCP_SERVER",
            "tcp_listen = \"0.0.0.0:62201\"",
            "FLUSH_IPT_AT_INIT",
        ] {
            assert!(toml.contains(want), "{want}:\n{toml}");
        }
        assert!(!toml.contains("GWn6"), "key material in the config");
        assert!(doc.keys[0].text.contains("KEY_BASE64: GWn6"));
    }

    #[test]
    fn keys_check_refuses_get_a_todo_on_the_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("KEY short\nHMAC_KEY_BASE64 Wd73/Nyj3iMdI92SoJoZB/deL1Ktsy7lAfmx9cRlA+yicTgdjehaf+BUQN77RLO+7WfZG8wr/Mx5J8gk3Saj6g==\n", "shorter than 16"),
            ("KEY_BASE64 GWn6QLFeR8Ce1tYl//zGRC5rYV2w9dJMz0yUcBOtTAc=\n", "no HMAC key"),
            ("KEY_BASE64 !!!\nHMAC_KEY_BASE64 x\n", "not valid base64"),
            ("GPG_REMOTE_ID 1234\n", "holds no KEY"),
        ];
        for (keys, want) in cases {
            let text = format!("SOURCE ANY\nOPEN_PORTS tcp/22\n{keys}");
            let out = Output {
                dir: Some(dir.path().to_path_buf()),
                force: true,
            };
            let doc = import(Path::new("access.conf"), &text, None, &out).unwrap();
            let toml = doc.render().replace("\n#   ", " ");
            assert!(toml.contains(want), "{want}:\n{toml}");
            assert!(doc.todo_paths().iter().any(|p| p.starts_with("user.user1")), "{toml}");
            assert!(
                !toml.contains("short\n") && !toml.contains("GWn6"),
                "key material: {toml}"
            );
        }
    }

    #[test]
    fn keys_need_an_output_directory() {
        let text = "SOURCE ANY\nKEY_BASE64 __CHANGEME__\nHMAC_KEY_BASE64 __CHANGEME__\n";
        let none = Output {
            dir: None,
            force: false,
        };
        let err = import(Path::new("access.conf"), text, None, &none).unwrap_err();
        assert!(err.to_string().contains("-o DIR"), "{err}");
    }
}
