//! `portcullis import knockd FILE`: knockd.conf into services.
//!
//! knockd runs a command (an iptables rule, usually) when a sequence
//! completes; portcullis opens a service itself. So each section becomes a
//! `[service.NAME]` whose port is guessed from `--dport N` (or a helper's
//! `-d N`) in its command, and a section whose command only deletes a rule
//! (the stock `closeSSH`) has no equivalent: grants end on their own.
//! Commands are listed in comments, never run or carried over.

use std::path::Path;

use super::{advise, at, knock_value, list, note, one_in, quote, table_name, todo, Doc, Table};
use crate::config::{self, RANDOM_PASS_WARN};
use crate::step::{Proto, StepSpec};

/// knockd's `seq_timeout` and `cmd_timeout` when a section sets none.
const DEFAULT_SEQ_TIMEOUT: u64 = 25;
const DEFAULT_CMD_TIMEOUT: u64 = 10;

/// One `[name]` section as written.
#[derive(Debug, Default)]
struct Section {
    name: String,
    line: usize,
    /// Lowercased key, value, line; flags (`UseSyslog`) have an empty value.
    settings: Vec<(String, String, usize)>,
}

impl Section {
    fn get(&self, key: &str) -> Option<(&str, usize)> {
        self.settings
            .iter()
            .rev()
            .find(|(k, _, _)| k == key)
            .map(|(_, v, l)| (v.as_str(), *l))
    }
}

fn parse(text: &str) -> (Vec<Section>, Vec<usize>) {
    let mut sections: Vec<Section> = Vec::new();
    let mut stray = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let t = raw.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if let Some(name) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            sections.push(Section {
                name: name.trim().to_string(),
                line,
                settings: Vec::new(),
            });
            continue;
        }
        let (key, value) = match t.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            None => (t, ""),
        };
        match sections.last_mut() {
            Some(s) => s.settings.push((key.to_ascii_lowercase(), value.to_string(), line)),
            None => stray.push(line),
        }
    }
    (sections, stray)
}

/// What a knockd command does to the firewall, as far as it can be told.
#[derive(Debug, Default, PartialEq)]
struct Rule {
    port: Option<u16>,
    proto: Option<Proto>,
    deletes: bool,
    /// `--dport 1000:2000`, `--dports 22,80`: more than one port.
    many: Option<String>,
}

fn read_rule(command: &str) -> Rule {
    let words: Vec<&str> = command.split_whitespace().collect();
    let helper = words
        .first()
        .is_some_and(|w| w.contains("knock_add") || w.contains("knock_helper"));
    let mut rule = Rule::default();
    let mut i = 0;
    while i < words.len() {
        let (flag, inline) = match words[i].split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v)),
            _ => (words[i], None),
        };
        let value = inline.or_else(|| words.get(i + 1).copied());
        match flag {
            "--dport" | "--destination-port" | "dport" | "--dstport" | "--dports" => {
                port(&mut rule, value);
            }
            "-d" if helper => port(&mut rule, value),
            "-p" | "--protocol" | "--proto" => match value.map(str::to_ascii_lowercase).as_deref() {
                Some("tcp") => rule.proto = Some(Proto::Tcp),
                Some("udp") => rule.proto = Some(Proto::Udp),
                _ => {}
            },
            "-D" | "--delete" | "delete" => rule.deletes = true,
            "-x" if helper => rule.deletes = true,
            _ => {}
        }
        i += 1;
    }
    rule
}

fn port(rule: &mut Rule, value: Option<&str>) {
    let Some(v) = value else { return };
    match v.parse::<u16>() {
        Ok(p) if p != 0 && rule.port.is_none() => rule.port = Some(p),
        Ok(_) => {}
        Err(_) => rule.many = Some(v.to_string()),
    }
}

/// Well-known names for the ports knockd examples guard.
fn service_name(port: u16) -> Option<&'static str> {
    Some(match port {
        22 => "ssh",
        25 => "smtp",
        80 => "http",
        443 => "https",
        3306 => "mysql",
        5432 => "postgres",
        6379 => "redis",
        _ => return None,
    })
}

/// Imports knockd.conf text read from `file`.
pub fn import(file: &Path, text: &str) -> Doc {
    let (sections, stray) = parse(text);
    let mut doc = Doc::new("knockd", file);
    for line in stray {
        doc.header.push(note(&format!(
            "{}: a setting outside any [section], which knockd ignores: not carried over",
            at(file, line)
        )));
    }
    let mut gateway = Table::new("gateway");
    let mut services: Vec<Table> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let mut interface = None;
    let mut any_tcp = false;

    // Guarded ports and every step, so suggested trap ports avoid them.
    let mut taken: Vec<(Proto, u16)> = Vec::new();
    for s in &sections {
        for (k, v, _) in &s.settings {
            if k.ends_with("command") {
                let r = read_rule(v);
                if let Some(p) = r.port {
                    taken.push((r.proto.unwrap_or(Proto::Tcp), p));
                }
            }
        }
        if let Some((seq, _)) = s.get("sequence") {
            taken.extend(steps(seq).0.iter().map(|st| (st.proto, st.port)));
        }
    }

    for s in &sections {
        if s.name.eq_ignore_ascii_case("options") {
            options(file, s, &mut doc, &mut interface);
            continue;
        }
        let here = at(file, s.line);
        let commands: Vec<(&str, &str, usize)> = s
            .settings
            .iter()
            .filter(|(k, _, _)| k.ends_with("command") || k.ends_with("command_6"))
            .map(|(k, v, l)| (k.as_str(), v.as_str(), *l))
            .collect();
        let start: Vec<Rule> = commands
            .iter()
            .filter(|(k, _, _)| !k.starts_with("stop"))
            .map(|(_, v, _)| read_rule(v))
            .collect();
        if !start.is_empty() && start.iter().all(|r| r.deletes) {
            doc.header.push(note(&format!(
                "[{}] ({here}) only removes a firewall rule ({}): not carried over. A grant here ends \
                 by itself after the service's open_for (connections opened stay up); to end one early, \
                 add an [admin] section and DELETE /v1/grants/SERVICE/SOURCE",
                s.name,
                commands.first().map_or("", |c| c.1)
            )));
            continue;
        }
        let rule = start.into_iter().find(|r| r.port.is_some()).unwrap_or_default();
        let guess = rule.port.map(|p| service_name(p).unwrap_or(""));
        let name = table_name(&s.name, guess.filter(|g| !g.is_empty()).unwrap_or("knock"), &names);
        names.push(name.clone());
        let base = format!("service.{name}");
        let mut t = Table::new(base.clone());
        t.comments.push(format!("From [{}] ({here}).", s.name));
        let proto = rule.proto.unwrap_or(Proto::Tcp);
        match rule.port {
            Some(port) => {
                let mut c = Vec::new();
                if let Some(iface) = &interface {
                    c.push(note(&format!(
                        "knockd watched interface {iface}: portcullis binds addresses; to guard only \
                         {iface}, put its address here (knock ports bind on it too)"
                    )));
                }
                if let Some(many) = &rule.many {
                    c.push(todo(
                        &format!("{base}.listen"),
                        &format!("the command names several ports ({many}): one service guards one port; add a service per port"),
                    ));
                }
                t.set("listen", quote(&format!("0.0.0.0:{port}")), c);
                super::set_upstream(&mut t, &base, port);
            }
            None => {
                let why = match &rule.many {
                    Some(many) => format!("the command names several ports ({many}): one service guards one port"),
                    None => "no port found in the command (no --dport N)".to_string(),
                };
                t.suggest(
                    "listen",
                    quote("0.0.0.0:PORT"),
                    vec![todo(
                        &format!("{base}.listen"),
                        &format!("{why}: set the port this sequence opened"),
                    )],
                );
                t.suggest(
                    "upstream",
                    quote("127.0.0.1:PORT"),
                    vec![todo(&format!("{base}.upstream"), "where the service really listens")],
                );
            }
        }
        t.set("protocol", quote(proto.as_str()), Vec::new());
        let stop = s.get("stop_command");
        let open_for = match (stop, s.get("cmd_timeout")) {
            (Some(_), Some((v, l))) => match v.trim().parse::<u64>() {
                Ok(n) => (n, format!("cmd_timeout = {v} ({})", at(file, l))),
                Err(_) => (
                    DEFAULT_CMD_TIMEOUT,
                    format!("cmd_timeout {v:?} is not a number of seconds"),
                ),
            },
            (Some(_), None) => (DEFAULT_CMD_TIMEOUT, "knockd's default cmd_timeout".to_string()),
            (None, _) => (30, String::new()),
        };
        let open_note = if stop.is_some() {
            note(&format!(
                "from {}: knockd ran stop_command that long after start_command; here a grant lets new \
                 connections in for open_for, and connections opened stay up",
                open_for.1
            ))
        } else {
            note(
                "knockd's rule stayed until another sequence removed it; here a grant lets new connections \
                 in for open_for (connections opened stay up): raise it if clients connect later",
            )
        };
        t.set("open_for", quote(&format!("{}s", open_for.0)), vec![open_note]);
        knock(file, s, &base, &taken, &mut t, &mut any_tcp);
        for (k, v, l) in &commands {
            t.comments.push(note(&format!(
                "{k} ({}) is not carried over: portcullis opens the service itself, with no firewall rule: {v}",
                at(file, *l)
            )));
        }
        for (k, v, l) in &s.settings {
            let known = ["sequence", "seq_timeout", "cmd_timeout", "tcpflags"];
            if known.contains(&k.as_str()) || k.ends_with("command") || k.ends_with("command_6") {
                continue;
            }
            let what = match k.as_str() {
                "one_time_sequences" => format!(
                    "one_time_sequences = {v} ({}): not supported; SPA is the replay-proof way in \
                     (`portcullis import fwknopd`, or [user.NAME] and spa_users)",
                    at(file, *l)
                ),
                "target" => format!(
                    "target = {v} ({}): portcullis forwards to upstream instead",
                    at(file, *l)
                ),
                _ => format!("{k} ({}): no equivalent, not carried over", at(file, *l)),
            };
            t.comments.push(note(&what));
        }
        services.push(t);
    }
    if any_tcp {
        gateway.set(
            "sensor",
            quote("auto"),
            vec![note(
                "knockd saw TCP knocks as SYNs on closed ports. The raw sensor does the same (needs \
                 CAP_NET_RAW, as knockd's pcap did); auto falls back to bound sockets without it, which \
                 see a TCP knock only when its handshake completes: the stock `knock` client's do over \
                 loopback, rarely over a real network. UDP steps (knock -u) always arrive",
            )],
        );
        doc.tables.push(gateway);
    }
    if services.is_empty() {
        doc.header.push(todo(
            "service",
            "no section of this file opens a port: add a [service.NAME] with listen, upstream and knock",
        ));
    }
    doc.tables.extend(services);
    doc
}

fn options(file: &Path, s: &Section, doc: &mut Doc, interface: &mut Option<String>) {
    for (k, v, l) in &s.settings {
        let here = at(file, *l);
        let text = match k.as_str() {
            "usesyslog" => {
                format!("UseSyslog ({here}): logs go to stderr (journald under systemd); --log-format json for JSON")
            }
            "logfile" => format!("LogFile = {v} ({here}): logs go to stderr; redirect them, or read the journal"),
            "pidfile" => format!("PidFile = {v} ({here}): not needed (systemd Type=notify; see deploy/)"),
            "interface" => {
                *interface = Some(v.clone());
                format!("Interface = {v} ({here}): portcullis binds addresses, not interfaces (see each listen)")
            }
            _ => format!("[options] {k} ({here}): no equivalent, not carried over"),
        };
        doc.header.push(note(&text));
    }
}

/// Parses knockd's `7000,8000:udp,9000:tcp`; returns the steps and the
/// items that are not steps.
fn steps(seq: &str) -> (Vec<StepSpec>, Vec<String>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for item in seq.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        match item.parse::<StepSpec>() {
            Ok(s) if s.port != 0 && s.ip.is_none() => good.push(s),
            _ => bad.push(item.to_string()),
        }
    }
    (good, bad)
}

fn knock(file: &Path, s: &Section, base: &str, taken: &[(Proto, u16)], t: &mut Table, any_tcp: &mut bool) {
    let Some((seq, line)) = s.get("sequence") else {
        t.comments.push(todo(
            base,
            "no sequence: knockd's one_time_sequences are not supported; add knock = { sequence = [...] } \
             or SPA users (spa_users)",
        ));
        return;
    };
    let path = format!("{base}.knock");
    let (seq_steps, bad) = steps(seq);
    *any_tcp |= seq_steps.iter().any(|st| st.proto == Proto::Tcp);
    let mut c = vec![note(&format!(
        "sequence = {seq} ({}); knockd has no per-step timeout, so step_timeout is seq_timeout",
        at(file, line)
    ))];
    let timeout = match s.get("seq_timeout") {
        Some((v, l)) => v.trim().parse::<u64>().ok().filter(|n| *n > 0).unwrap_or_else(|| {
            c.push(note(&format!(
                "seq_timeout = {v} ({}) is not a number of seconds: knockd's default, {DEFAULT_SEQ_TIMEOUT}",
                at(file, l)
            )));
            DEFAULT_SEQ_TIMEOUT
        }),
        None => DEFAULT_SEQ_TIMEOUT,
    };
    let timeout = format!("{timeout}s");
    if let Some((flags, l)) = s.get("tcpflags") {
        c.push(note(&format!(
            "tcpflags = {flags} ({}): no equivalent; a TCP step counts when its SYN is seen (raw sensor) \
             or its handshake completes (socket sensor)",
            at(file, l)
        )));
    }
    if !bad.is_empty() {
        c.push(todo(
            &format!("{path}.sequence"),
            &format!("{} are not steps (PORT or PORT:udp): left out", bad.join(", ")),
        ));
    }
    let value = knock_value(&seq_steps, &[], &timeout, &timeout);
    let advice = advise(&seq_steps, taken);
    let suggestion = knock_value(&advice.sequence, &advice.traps, &timeout, &timeout);
    let refused = check_refuses(&value);
    let texts = |v: &[StepSpec]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    if !refused.is_empty() {
        for (p, m) in &refused {
            let fix = if advice.steps_changed {
                format!(
                    "the knock below uses {} instead, and {} trap port(s) (one random-order scan then \
                     opens it with a chance of {}); clients must knock the new sequence",
                    list(&texts(&advice.sequence)),
                    advice.traps.len(),
                    one_in(advice.suggested_chance)
                )
            } else {
                "change the sequence (clients must follow)".to_string()
            };
            c.push(todo(
                &format!("{base}.{p}"),
                &format!("{m}. Imported as knockd had it; {fix}"),
            ));
        }
    } else if advice.chance > RANDOM_PASS_WARN {
        c.push(todo(
            &path,
            &format!(
                "one random-order scan of these {} step(s) opens the service with a chance of {} (check \
                 warns above {}). Trap ports lock out a source that hits one, and clients need not change: \
                 the knock below adds {} (a chance of {})",
                advice.sequence.len(),
                one_in(advice.chance),
                one_in(RANDOM_PASS_WARN),
                advice.traps.len(),
                one_in(advice.suggested_chance)
            ),
        ));
    }
    t.set("knock", value, c);
    if !refused.is_empty() || advice.chance > RANDOM_PASS_WARN {
        t.suggest("knock", suggestion, Vec::new());
    }
}

/// What `check` says about a knock value alone: (path below `service.`,
/// message) for each problem.
fn check_refuses(knock: &str) -> Vec<(String, String)> {
    let text = format!("[service.x]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\nknock = {knock}\n");
    let problems = match config::load_str(&text, "knock", Default::default()).and_then(|r| config::validate(&r)) {
        Ok(_) => return Vec::new(),
        Err(e) => e.problems,
    };
    problems
        .into_iter()
        .filter_map(|p| {
            let rest = p.path.strip_prefix("service.x.")?;
            Some((rest.to_string(), p.message))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_read_from_commands() {
        let r = read_rule("/sbin/iptables -A INPUT -s %IP% -p tcp --dport 22 -j ACCEPT");
        assert_eq!((r.port, r.proto, r.deletes), (Some(22), Some(Proto::Tcp), false));
        let r = read_rule("/sbin/iptables -D INPUT -s %IP% -p tcp --dport 22 -j ACCEPT");
        assert!(r.deletes);
        let r = read_rule("/usr/local/sbin/knock_add -i -c INPUT -p tcp -d 443 -f %IP%");
        assert_eq!(r.port, Some(443));
        let r = read_rule("/usr/sbin/iptables -A INPUT -s %IP% -d 10.0.0.1 -p udp --dport=53 -j ACCEPT");
        assert_eq!((r.port, r.proto), (Some(53), Some(Proto::Udp)));
        let r = read_rule("/usr/sbin/iptables -A INPUT -s %IP% -p tcp --syn -j ACCEPT");
        assert_eq!(r.port, None);
        let r = read_rule("iptables -A INPUT -m multiport --dports 22,80 -j ACCEPT");
        assert_eq!(r.many.as_deref(), Some("22,80"));
    }

    #[test]
    fn the_stock_sequence_is_refused_with_a_suggestion_and_close_is_a_note() {
        let text = "[options]\n\tUseSyslog\n\n[openSSH]\n\tsequence = 7000,8000,9000\n\tseq_timeout = 5\n\
                    \tcommand = /sbin/iptables -A INPUT -s %IP% -p tcp --dport 22 -j ACCEPT\n\ttcpflags = syn\n\n\
                    [closeSSH]\n\tsequence = 9000,8000,7000\n\tcommand = /sbin/iptables -D INPUT -s %IP% -p tcp --dport 22 -j ACCEPT\n";
        let doc = import(Path::new("knockd.conf"), text);
        let out = doc.render();
        assert!(out.contains("[service.openssh]"), "{out}");
        assert!(!out.contains("[service.closessh]"), "{out}");
        assert!(out.contains("listen = \"0.0.0.0:22\""), "{out}");
        assert!(
            out.contains("sequence = [\"7000/tcp\", \"8000/tcp\", \"9000/tcp\"]"),
            "{out}"
        );
        assert!(
            out.contains("# knock = { sequence = [\"7000/tcp\", \"9000/tcp\", \"8000/tcp\"]"),
            "{out}"
        );
        assert!(
            doc.todo_paths().contains(&"service.openssh.knock.sequence".to_string()),
            "{out}"
        );
        assert!(out.contains("sensor = \"auto\""), "{out}");
    }

    #[test]
    fn sections_without_a_port_or_a_sequence_get_todos_on_the_keys_check_reports() {
        let text = "[otp]\n\tone_time_sequences = /etc/knockd/otp\n\
                    \tcommand = /sbin/iptables -A INPUT -s %IP% -p udp --dport 53 -j ACCEPT\n\n\
                    [noport]\n\tsequence = 2000:udp,1000:udp,3000:udp\n\tcommand = /usr/bin/touch /tmp/x\n\n\
                    [multi]\n\tsequence = 4000:udp,6000:udp,5000:udp,4500:udp\n\
                    \tcommand = iptables -A INPUT -m multiport --dports 80,443 -j ACCEPT\n";
        let doc = import(Path::new("knockd.conf"), text);
        let out = doc.render();
        let todos = doc.todo_paths();
        for want in [
            "service.otp",
            "service.noport.listen",
            "service.multi.listen",
            "service.noport.knock",
        ] {
            assert!(todos.contains(&want.to_string()), "{want}: {todos:?}\n{out}");
        }
        assert!(out.contains("protocol = \"udp\""), "{out}");
        assert!(out.contains("one_time_sequences = /etc/knockd/otp"), "{out}");
        assert!(out.contains("# listen = \"0.0.0.0:PORT\""), "{out}");
        assert!(!out.contains("sensor = "), "UDP steps only: {out}");
    }
}
