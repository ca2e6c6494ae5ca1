//! The commands that look at a config without serving it: `check` (in
//! text or JSON) and `config` (the effective config).

use std::path::Path;
use std::process::ExitCode;

use super::ConfigFormat;
use crate::config;

/// `portcullis check`: every problem, or what the config amounts to.
pub fn check(path: &Path) -> ExitCode {
    match config::from_file(path) {
        Ok(c) => {
            println!("{}: ok ({} service(s))", path.display(), c.services.len());
            if let Some(d) = &c.descriptors {
                println!("{}", describe_budget(&c, d));
            }
            println!("gateway.sensor: {}", crate::sensor::raw::describe(c.gateway.sensor));
            for r in config::sequence_report(&c.services) {
                println!(
                        "{}: one random-order scan of its {} step(s) and {} trap port(s) opens it with a chance of 1 in {:.0}",
                        r.path,
                        r.steps,
                        r.traps,
                        1.0 / r.chance
                    );
            }
            for t in c.services.iter().filter_map(|s| s.totp.as_ref()) {
                println!(
                    "service.{}.knock.totp: {} step(s) from {} ports every {}s: {:.0} possible sequences; one random-order scan of the pool opens it with a chance of 1 in {:.0}",
                    t.service,
                    t.steps,
                    t.pool.len(),
                    t.period.as_secs(),
                    t.sequence_space(),
                    1.0 / t.random_pass_chance()
                );
            }
            for w in warnings(&c) {
                eprintln!("warning: {w}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

/// `portcullis config`: the effective config, every default filled in; an
/// invalid one as loaded (no defaults), then its problems.
pub fn show_config(path: &Path, format: ConfigFormat) -> ExitCode {
    let raw = match config::load(path) {
        Ok(raw) => raw,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let (shown, problems) = match config::from_raw(&raw, path) {
        Ok(c) => (config::effective(&raw, &c), None),
        Err(e) => (raw, Some(e)),
    };
    let text = match format {
        ConfigFormat::Toml => config::render(&shown),
        ConfigFormat::Json => serde_json::to_string_pretty(&shown).map_or_else(
            |e| format!("{{\"error\": \"cannot render the config: {e}\"}}\n"),
            |t| t + "\n",
        ),
    };
    print!("{text}");
    match problems {
        None => ExitCode::SUCCESS,
        Some(e) => {
            eprintln!("{}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

/// `check --format json`: one object on stdout, `{"ok", "config",
/// "errors": [{key, message}], "warnings": [{key, message}]}`.
pub fn check_json(path: &Path) -> ExitCode {
    let (errors, warnings) = match config::from_file(path) {
        Ok(c) => (Vec::new(), warnings(&c)),
        Err(e) => (e.problems, Vec::new()),
    };
    let report = serde_json::json!({
        "ok": errors.is_empty(),
        "config": path.display().to_string(),
        "errors": config::problems_json(&errors),
        "warnings": config::problems_json(&warnings),
    });
    println!("{report}");
    if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// What `check` warns about in a valid config: what validation found
/// (key files other users may read), sequences a scan opens too easily,
/// `dark` without CAP_NET_ADMIN, upstreams that do not resolve.
fn warnings(c: &config::Config) -> Vec<config::Problem> {
    let mut found = c.warnings.clone();
    for r in config::sequence_report(&c.services) {
        if let Some((traps, with_a_step)) = r.add_traps {
            found.push(config::Problem {
                path: r.path.clone(),
                message: format!(
                    "above 1 in {:.0}: add {traps} trap port(s), or one step and {with_a_step} trap port(s); or use SPA",
                    1.0 / config::RANDOM_PASS_WARN
                ),
            });
        }
    }
    for s in c
        .services
        .iter()
        .filter(|s| s.unauthorized == config::Unauthorized::Dark)
    {
        if !crate::proxy::dark::has_net_admin() {
            found.push(config::Problem {
                path: format!("service.{}.unauthorized", s.name),
                message: "dark needs CAP_NET_ADMIN, which this process lacks: it would run as closed".to_owned(),
            });
        }
    }
    found.extend(config::resolve::unresolvable(&c.services, config::resolve::DNS_TIMEOUT));
    found
}

/// `check`'s line about the descriptor budget.
fn describe_budget(c: &config::Config, d: &config::budget::Descriptors) -> String {
    let mut line = format!(
        "descriptors: limit {}, the caps need at most {} ({} listeners, runtime and admin; {} pipes; {} proxied connections; {} blackholed; {} udp sessions)",
        d.limit,
        d.needed(),
        d.fixed,
        d.pipes,
        d.connections,
        d.blackholed,
        d.udp_sessions
    );
    for path in &d.derived {
        let value = match path.as_str() {
            "gateway.max_connections" => c.gateway.max_connections,
            "gateway.max_blackholed" => c.gateway.max_blackholed,
            other => c
                .services
                .iter()
                .find(|s| other == format!("service.{}.max_sessions", s.name))
                .map_or(0, |s| s.udp.max_sessions),
        };
        line.push_str(&format!("\n{path}: {value} (derived from the descriptor limit)"));
    }
    line
}
