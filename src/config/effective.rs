//! The effective config for `portcullis config`: the raw form as loaded
//! (file, then environment), with every default the validation applied
//! filled in, and counts the environment gave as text turned back into
//! integers. It stays a config: fed back in, it means the same.
//!
//! Secrets never appear: the raw form holds only where they are (a key
//! file's path, an environment variable's name, a token file's path).

use std::time::Duration;

use super::raw::{RawConfig, RawCount};
use super::Config;

/// `raw` with the defaults `config` (its validated form) took filled in.
pub fn effective(raw: &RawConfig, config: &Config) -> RawConfig {
    let mut out = raw.clone();
    let g = &config.gateway;
    let rg = &mut out.gateway;
    fill_duration(&mut rg.shutdown_grace, g.shutdown_grace);
    fill_duration(&mut rg.connect_timeout, g.connect_timeout);
    fill_duration(&mut rg.blackhole_hold, g.blackhole_hold);
    fill_count(&mut rg.max_connections, g.max_connections);
    fill_count(&mut rg.max_blackholed, g.max_blackholed);
    fill_count(&mut rg.max_knock_attempts, g.max_knock_attempts);
    rg.sensor.get_or_insert_with(|| g.sensor.as_str().to_owned());

    let l = &config.limits;
    let rl = &mut out.limits;
    fill_count(&mut rl.per_source_rate, l.per_source_rate as usize);
    fill_count(&mut rl.per_source_burst, l.per_source_burst as usize);
    fill_count(&mut rl.lockout_after, l.lockout_after as usize);
    fill_duration(&mut rl.lockout_for, l.lockout_for);
    fill_count(&mut rl.max_tracked_sources, l.max_tracked_sources);
    fill_count(&mut rl.ipv6_prefix, usize::from(l.ipv6_prefix));

    let st = &mut out.state;
    st.dir.get_or_insert_with(|| config.state.dir.display().to_string());
    st.replica.get_or_insert_with(|| config.state.replica.to_string());
    match config.state.redis() {
        None => {
            st.backend.get_or_insert_with(|| "memory".to_owned());
        }
        Some(redis) => {
            st.backend.get_or_insert_with(|| "redis".to_owned());
            st.key_prefix.get_or_insert_with(|| redis.key_prefix.clone());
        }
    }

    if let (Some(rs), Some(s)) = (out.spa.as_mut(), config.spa.as_ref()) {
        rs.listen.get_or_insert_with(|| s.listen.to_string());
        fill_duration(&mut rs.max_age, s.max_age);
    }
    if let (Some(ra), Some(a)) = (out.admin.as_mut(), config.admin.as_ref()) {
        ra.listen.get_or_insert_with(|| a.listen.to_string());
        ra.allow_loopback_mutations.get_or_insert(a.allow_loopback_mutations);
        ra.require_token_for_reads.get_or_insert(a.require_token_for_reads);
    }

    for (name, rs) in &mut out.service {
        let Some(s) = config.services.iter().find(|s| &*s.name == name.as_str()) else {
            continue;
        };
        rs.protocol.get_or_insert_with(|| s.protocol.as_str().to_owned());
        rs.unauthorized
            .get_or_insert_with(|| s.unauthorized.as_str().to_owned());
        fill_duration(&mut rs.open_for, s.open_for);
        match s.protocol {
            crate::step::Proto::Tcp => {
                fill_count(&mut rs.max_connections, s.max_connections);
                rs.keepalive.get_or_insert_with(|| match s.tcp.keepalive {
                    Some(idle) => humantime::format_duration(idle).to_string(),
                    None => "off".to_owned(),
                });
            }
            crate::step::Proto::Udp => {
                fill_duration(&mut rs.idle_timeout, s.udp.idle_timeout);
                fill_count(&mut rs.max_sessions, s.udp.max_sessions);
                fill_count(&mut rs.max_sessions_per_source, s.udp.max_sessions_per_source);
                fill_count(&mut rs.session_open_rate, s.udp.session_open_rate as usize);
            }
        }
        if !rs.spa_users.is_empty() {
            fill_duration(&mut rs.max_open_for, s.spa.max_open_for);
        }
        if let Some(rk) = rs.knock.as_mut() {
            let timing = match (&s.knock, &s.totp) {
                (Some(k), _) => Some((k.trap_lockout, k.step_timeout, k.sequence_timeout)),
                (None, Some(t)) => Some((t.trap_lockout, t.step_timeout, t.sequence_timeout)),
                (None, None) => None,
            };
            if let Some((trap_lockout, step, sequence)) = timing {
                rk.trap_lockout.get_or_insert(trap_lockout);
                fill_duration(&mut rk.step_timeout, step);
                fill_duration(&mut rk.sequence_timeout, sequence);
            }
            if let (Some(rt), Some(t)) = (rk.totp.as_mut(), s.totp.as_ref()) {
                rt.steps.get_or_insert(i64::try_from(t.steps).unwrap_or(i64::MAX));
                fill_duration(&mut rt.period, t.period);
            }
        }
    }

    for (name, ru) in &mut out.user {
        let Some(u) = config.users.iter().find(|u| &*u.name == name.as_str()) else {
            continue;
        };
        ru.require_source_match.get_or_insert(u.require_source_match);
        ru.require_source_address.get_or_insert(u.require_source_address);
    }
    out
}

fn fill_duration(slot: &mut Option<String>, value: Duration) {
    slot.get_or_insert_with(|| humantime::format_duration(value).to_string());
}

/// The validated count where none was given, and a count given as text
/// (the environment's only type) as the integer it is.
fn fill_count(slot: &mut Option<RawCount>, value: usize) {
    *slot = Some(RawCount::Int(i64::try_from(value).unwrap_or(i64::MAX)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn effective_of(text: &str, env: &[(&str, &str)]) -> RawConfig {
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let raw = crate::config::load_str(text, "test", env).unwrap();
        let config = crate::config::validate(&raw).unwrap();
        effective(&raw, &config)
    }

    #[test]
    fn udp_services_get_their_session_defaults_and_env_counts_become_integers() {
        let e = effective_of(
            "[service.dns]\nlisten = \"127.0.0.1:53\"\nupstream = \"127.0.0.1:5353\"\nprotocol = \"udp\"\nknock = { sequence = [\"7/udp\", \"9/udp\", \"8/udp\"] }\n",
            &[("PORTCULLIS__SERVICE__DNS__MAX_SESSIONS", "12")],
        );
        let dns = &e.service["dns"];
        assert_eq!(dns.idle_timeout.as_deref(), Some("1m"));
        assert!(
            matches!(dns.max_sessions, Some(RawCount::Int(12))),
            "{:?}",
            dns.max_sessions
        );
        assert!(matches!(dns.max_sessions_per_source, Some(RawCount::Int(32))));
        assert!(dns.max_connections.is_none(), "a TCP setting on a UDP service");
        assert_eq!(dns.unauthorized.as_deref(), Some("closed"));
        assert_eq!(dns.open_for.as_deref(), Some("30s"));
        assert!(dns.keepalive.is_none(), "a TCP setting on a UDP service");
        let text = toml::to_string(&e).unwrap();
        assert!(text.contains("max_sessions = 12"), "{text}");
    }

    #[test]
    fn tcp_services_show_their_keepalive_and_the_state_its_backend() {
        let e = effective_of(
            "[service.pg]\nlisten = \"127.0.0.1:5432\"\nupstream = \"127.0.0.1:5433\"\nknock = { sequence = [\"7/udp\", \"9/udp\", \"8/udp\"] }\n[service.ssh]\nlisten = \"127.0.0.1:22\"\nupstream = \"127.0.0.1:2222\"\nkeepalive = \"off\"\nknock = { sequence = [\"7/udp\", \"9/udp\", \"6/udp\"] }\n",
            &[],
        );
        assert_eq!(e.service["pg"].keepalive.as_deref(), Some("1m"));
        assert_eq!(e.service["ssh"].keepalive.as_deref(), Some("off"));
        assert_eq!(e.state.backend.as_deref(), Some("memory"));
        assert!(e.state.replica.is_some());
    }
}
