//! The Grafana dashboard and the Prometheus alert rules against the real
//! binary: every PromQL expression parses (promtool), every metric they
//! name is exported by a running gateway, the rules pass their unit tests,
//! and the dashboard works both imported and provisioned.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeSet;

const DASHBOARD: &str = "dashboards/portcullis.json";
const ALERTS: &str = "deploy/prometheus/alerts.yaml";
const ALERT_TESTS: &str = "deploy/prometheus/alerts_test.yaml";

fn dashboard() -> Value {
    let text = std::fs::read_to_string(repo_path(DASHBOARD)).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"))
}

/// Every panel, rows' nested panels included.
fn panels(dash: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        out.push(p.clone());
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested.iter().cloned());
        }
    }
    out
}

/// (where, PromQL) for every query of the dashboard: panel targets, and
/// the series selectors of `label_values(...)` template queries.
fn dashboard_exprs() -> Vec<(String, String)> {
    let dash = dashboard();
    let mut out = Vec::new();
    for p in panels(&dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("every target has an expr");
            out.push((format!("panel {:?}", p["title"]), expr.to_string()));
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if v["type"] != "query" {
            continue;
        }
        let query = v["query"]["query"].as_str().or(v["query"].as_str()).unwrap();
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(','))
            .map(|(selector, _label)| selector.trim())
            .unwrap_or_else(|| panic!("template query {query:?} is not label_values(SELECTOR, LABEL)"));
        out.push((format!("variable {}", v["name"]), inner.to_string()));
    }
    out
}

/// (alert, PromQL) for every rule of the alerts file. A small reader for
/// the `expr:` keys (single line or `|` / `>` block), since promtool
/// checks the YAML itself.
fn alert_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_path(ALERTS)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut alert = String::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim_start();
        if let Some(name) = line.strip_prefix("- alert:") {
            alert = name.trim().to_string();
        } else if let Some(value) = line.strip_prefix("expr:") {
            let value = value.trim();
            if value.starts_with('|') || value.starts_with('>') {
                let indent = lines[i].len() - line.len();
                let mut block = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    let next_indent = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && next_indent <= indent {
                        break;
                    }
                    block.push(next.trim());
                    i += 1;
                }
                out.push((alert.clone(), block.join(" ").trim().to_string()));
            } else {
                out.push((alert.clone(), value.trim_matches(['\'', '"']).to_string()));
            }
        }
        i += 1;
    }
    let alerts = lines.iter().filter(|l| l.trim_start().starts_with("- alert:")).count();
    assert_eq!(out.len(), alerts, "one expr per alert in {ALERTS}");
    out
}

/// Grafana's variables replaced by values PromQL accepts.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("${instance}", ".*")
        .replace("$instance", ".*")
        .replace("${service}", ".*")
        .replace("$service", ".*")
}

/// Removes every `open ... close` span (outside strings, which `strip`
/// has already removed), nesting included.
fn remove_spans(s: &str, open: char, close: char) -> String {
    let mut out = String::new();
    let mut depth = 0;
    for c in s.chars() {
        if c == open {
            depth += 1;
        } else if c == close && depth > 0 {
            depth -= 1;
            out.push(' ');
        } else if depth == 0 {
            out.push(c);
        }
    }
    out
}

const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "atan2",
];

/// The metric-name-like word starting at `i` in `chars`: the word, where it
/// ends, and where the next non-blank character is.
fn word_at(chars: &[char], i: usize) -> (String, usize, usize) {
    let mut end = i;
    while end < chars.len() && (chars[end].is_ascii_alphanumeric() || chars[end] == '_' || chars[end] == ':') {
        end += 1;
    }
    let mut next = end;
    while next < chars.len() && chars[next].is_whitespace() {
        next += 1;
    }
    (chars[i..end].iter().collect(), end, next)
}

/// Metric names in a PromQL expression: identifiers that are not function
/// or aggregation names (followed by `(`), keywords, label names (inside
/// `{}` or grouping clauses) or numbers and durations.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // String literals first: they may hold any character.
    let mut s = String::new();
    let mut quote = None;
    for c in substitute(expr).chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if matches!(c, '"' | '\'' | '`') => quote = Some(c),
            None => s.push(c),
        }
    }
    let s = remove_spans(&remove_spans(&s, '{', '}'), '[', ']');
    // Grouping clauses: `by (a, b)`, `on (a)`, `group_left (a)`...
    let chars: Vec<char> = s.chars().collect();
    let mut cleaned = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_alphabetic() || chars[i] == '_' {
            let (word, end, mut j) = word_at(&chars, i);
            i = end;
            let grouping = ["by", "without", "on", "ignoring", "group_left", "group_right"].contains(&word.as_str());
            if grouping && j < chars.len() && chars[j] == '(' {
                // The clause goes whole, so `sum by (x) (...)` reads as a call.
                while j < chars.len() && chars[j] != ')' {
                    j += 1;
                }
                i = j + 1;
                cleaned.push(' ');
            } else {
                cleaned.push_str(&word);
            }
        } else {
            cleaned.push(chars[i]);
            i += 1;
        }
    }
    let chars: Vec<char> = cleaned.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() || c == '.' {
            // Numbers, exponents and durations: 1e9, 0.99, 5m.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.' || chars[i] == '_') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let (word, end, j) = word_at(&chars, i);
            i = end;
            let called = j < chars.len() && chars[j] == '(';
            if !called && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn metric_names_are_told_apart_from_functions_labels_and_numbers() {
    let cases: &[(&str, &[&str])] = &[
        (
            r#"histogram_quantile(0.99, sum by (le, service) (rate(a_bucket{service=~"$service", x="by(y)"}[$__rate_interval])))"#,
            &["a_bucket"],
        ),
        (
            "max by (instance) ((b / c) and on (instance, job) d_info) > 0.8",
            &["b", "c", "d_info"],
        ),
        ("time() - max(e{i=\"1\"}) offset 5m", &["e"]),
        ("sum(rate(f[5m])) by (g) > 1e3 unless h", &["f", "h"]),
        ("x * on (a) group_left (b) y", &["x", "y"]),
    ];
    for (expr, want) in cases {
        let got: Vec<String> = metric_names(expr).into_iter().collect();
        assert_eq!(got, *want, "{expr}");
    }
}

#[test]
fn every_dashboard_expression_parses() {
    // promtool checks PromQL in rule files, so each query becomes a
    // recording rule of a throwaway file.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 20, "only {} queries in the dashboard", exprs.len());
    for (i, (_, expr)) in exprs.iter().enumerate() {
        let quoted = serde_json::to_string(&substitute(expr)).unwrap();
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {quoted}\n"
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard_rules.yaml");
    std::fs::write(&file, &rules).unwrap();
    let (ok, out) = promtool(&["check", "rules", file.to_str().unwrap()], None);
    assert!(ok, "a dashboard query does not parse:\n{out}\n{rules}");
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let (ok, out) = promtool(&["check", "rules", repo_path(ALERTS).to_str().unwrap()], None);
    assert!(ok, "promtool check rules {ALERTS}:\n{out}");
    let (ok, out) = promtool(&["test", "rules", repo_path(ALERT_TESTS).to_str().unwrap()], None);
    assert!(ok, "promtool test rules {ALERT_TESTS}:\n{out}");
}

/// Metric names in a scrape: every sample's name, and each histogram's
/// `_bucket`, `_sum` and `_count` (listed under the base name's `# TYPE`).
fn exported_names(scrape: &str) -> BTreeSet<String> {
    let mut exported = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exported.insert(format!("{name}{suffix}"));
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap();
            exported.insert(name.to_string());
        }
    }
    exported
}

/// (name, value of the `service` label, value) of every sample of a scrape.
fn samples(scrape: &str) -> Vec<(String, Option<String>, f64)> {
    let mut out = Vec::new();
    for line in scrape.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let service = labels
            .trim_end_matches('}')
            .split(',')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim() == "service")
            .map(|(_, v)| v.trim().trim_matches('"').to_string());
        out.push((name.to_string(), service, value.parse().unwrap()));
    }
    out
}

/// Every feature a metric needs: a TCP service and a UDP service, both
/// knocked open, SPA, and the admin endpoint; `extra` is appended.
fn every_feature_config(upstream: std::net::SocketAddr, p: &[u16], key_file: &str, extra: &str) -> String {
    format!(
        r#"{tcp}
spa_users = ["alice"]

[service.dns]
listen = "127.0.0.1:0"
upstream = "127.0.0.1:{dns_upstream}"
protocol = "udp"
open_for = "10s"
knock = {{ sequence = ["{d1}/udp", "{d2}/udp", "{d3}/udp"] }}

[spa]
listen = "127.0.0.1:0"

[user.alice]
key_file = "{key_file}"

[admin]
listen = "127.0.0.1:0"
{extra}
"#,
        tcp = echo_config(upstream, &[p[1], p[5], p[3]], ""),
        dns_upstream = p[0],
        d1 = p[7],
        d2 = p[9],
        d3 = p[8],
    )
}

#[test]
fn every_metric_of_the_dashboard_and_the_alerts_is_exported_at_zero_from_start_and_after_a_reload() {
    let upstream = echo_server("127.0.0.1:0");
    let (code, key, err) = run_bin(&["keygen"], &[]);
    assert_eq!(code, 0, "{err}");
    // The shared state store too: its series exist only with it.
    let redis = Redis::start();
    let state = format!("\n[state]\nbackend = \"redis\"\nurl = \"{}\"\n", redis.url());
    let (mut gw, p) = Gateway::builder()
        .file("alice.key", key.as_bytes())
        .on_free_ports(14, |p| every_feature_config(upstream, p, "alice.key", &state))
        .start_on_ports();
    // Nothing has happened yet: every series is there because it was
    // zeroed, not because an event made it.
    let scrape = gw.scrape();
    let exported = exported_names(&scrape);

    let mut used = BTreeSet::new();
    let mut missing = Vec::new();
    for (place, expr) in dashboard_exprs().into_iter().chain(alert_exprs()) {
        for name in metric_names(&expr) {
            if !exported.contains(&name) {
                missing.push(format!("{name} (in {place}: {expr})"));
            }
            used.insert(name);
        }
    }
    assert!(
        missing.is_empty(),
        "not exported by a gateway that has seen no traffic yet:\n  {}\nscrape:\n{scrape}",
        missing.join("\n  ")
    );
    for name in [
        "portcullis_grants_active",
        "portcullis_knocks_total",
        "portcullis_connections_total",
        "portcullis_proxied_bytes_total",
        "portcullis_upstream_connect_duration_seconds_bucket",
        "portcullis_connection_duration_seconds_bucket",
        "portcullis_upstream_connect_errors_total",
        "portcullis_accept_errors_total",
        "portcullis_knocks_dropped_total",
        "portcullis_config_reloads_total",
        "portcullis_spa_packets_total",
        "portcullis_lockouts_total",
        "portcullis_lockouts_active",
        "portcullis_source_refusals_total",
        "portcullis_udp_sessions_active",
        "portcullis_udp_sessions_total",
        "portcullis_udp_sessions_ended_total",
        "portcullis_udp_datagrams_dropped_total",
        "portcullis_udp_kernel_filter",
        "portcullis_udp_kernel_filter_fallbacks_total",
        "portcullis_unauthorized_mode",
        "portcullis_state_store_up",
        "portcullis_state_store_refused_total",
        "process_cpu_seconds_total",
    ] {
        assert!(used.contains(name), "neither the dashboard nor the alerts use {name}");
    }
    // The label sets the alerts select on are there too.
    for (name, labels) in [
        (
            "portcullis_spa_packets_total",
            &[("format", "native"), ("result", "bad_mac")][..],
        ),
        (
            "portcullis_spa_packets_total",
            &[("format", "fwknop"), ("result", "replay")],
        ),
        (
            "portcullis_spa_packets_total",
            &[("format", "native"), ("result", "accepted")],
        ),
        (
            "portcullis_spa_packets_total",
            &[("format", "native"), ("result", "replay_log_failed")],
        ),
        ("portcullis_state_store_refused_total", &[("input", "knock")]),
        ("portcullis_lockouts_total", &[("reason", "trap")]),
        ("portcullis_lockouts_total", &[("reason", "strikes")]),
        (
            "portcullis_source_refusals_total",
            &[("listener", "knock"), ("reason", "locked_out")],
        ),
        (
            "portcullis_udp_datagrams_dropped_total",
            &[("service", "dns"), ("reason", "no_grant")],
        ),
        (
            "portcullis_udp_sessions_ended_total",
            &[("service", "dns"), ("reason", "idle")],
        ),
    ] {
        assert_eq!(metric(&scrape, name, labels), Some(0.0), "{name}{labels:?}");
    }

    // A reload that adds a TCP and a UDP service: their series start at
    // zero, like those of the services they resemble.
    let per_service = |scrape: &str, service: &str| -> BTreeSet<String> {
        samples(scrape)
            .into_iter()
            .filter(|(name, s, _)| s.as_deref() == Some(service) && used.contains(name))
            .map(|(name, _, _)| name)
            .collect()
    };
    let (tcp_names, udp_names) = (per_service(&scrape, "echo"), per_service(&scrape, "dns"));
    assert!(tcp_names.contains("portcullis_connections_total"), "{tcp_names:?}");
    assert!(udp_names.contains("portcullis_udp_sessions_active"), "{udp_names:?}");
    let added = format!(
        r#"
[service.late]
listen = "127.0.0.1:0"
upstream = "{upstream}"
open_for = "10s"
knock = {{ sequence = ["{}/udp", "{}/udp", "{}/udp"] }}

[service.late_udp]
listen = "127.0.0.1:0"
upstream = "127.0.0.1:{}"
protocol = "udp"
open_for = "10s"
knock = {{ sequence = ["{}/udp", "{}/udp", "{}/udp"] }}
"#,
        p[10], p[12], p[11], p[0], p[13], p[2], p[6]
    );
    let text = every_feature_config(upstream, &p, "alice.key", &(state.clone() + &added));
    let tmp = gw.dir.path().join("proxy.toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &gw.config_path).unwrap();
    gw.signal(nix::sys::signal::Signal::SIGHUP);
    gw.wait_for(|l| msg(l) == "config reloaded");
    let reloaded = gw.scrape();
    assert_eq!(
        per_service(&reloaded, "late"),
        tcp_names,
        "the added TCP service's series"
    );
    assert_eq!(
        per_service(&reloaded, "late_udp"),
        udp_names,
        "the added UDP service's series"
    );
    // States, not counts: which mode and which filter are in effect.
    let states = ["portcullis_unauthorized_mode", "portcullis_udp_kernel_filter"];
    for (name, service, value) in samples(&reloaded) {
        if matches!(service.as_deref(), Some("late" | "late_udp")) && !states.contains(&name.as_str()) {
            assert_eq!(value, 0.0, "{name} of {service:?}");
        }
    }
    assert_eq!(
        metric(&reloaded, "portcullis_config_reloads_total", &[("result", "success")]),
        Some(1.0)
    );
    let (ok, out) = promtool(&["check", "metrics"], Some(&reloaded));
    assert!(ok, "promtool check metrics:\n{out}");
    drop(gw.wait_for(|l| msg(l) == "ready"));
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(gw.wait_exit().success());
}

#[test]
fn the_dashboard_works_imported_and_provisioned() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "portcullis");
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    // `__inputs` only works through the import dialog; provisioning needs
    // the datasource variable instead.
    assert!(dash.get("__inputs").is_none(), "__inputs breaks provisioning");
    let vars = dash["templating"]["list"].as_array().unwrap();
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");

    let want = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    let mut ids = BTreeSet::new();
    for p in panels(&dash) {
        let title = p["title"].as_str().unwrap_or_default().to_string();
        assert!(!title.is_empty(), "a panel without a title: {p}");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "panel id repeated: {title}"
        );
        let pos = &p["gridPos"];
        for k in ["h", "w", "x", "y"] {
            assert!(pos[k].is_u64(), "{title}: gridPos.{k}");
        }
        assert!(
            pos["x"].as_u64().unwrap() + pos["w"].as_u64().unwrap() <= 24,
            "{title} is wider than the grid"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"], want, "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            assert_eq!(t["datasource"], want, "{title}");
        }
    }
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(v["datasource"], want, "variable {}", v["name"]);
    }
}
