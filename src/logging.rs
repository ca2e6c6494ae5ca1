//! Log set-up: human-readable by default, one JSON object per line for
//! containers, always on stderr. `RUST_LOG` overrides the level.
//!
//! Colour codes only reach a terminal: in a file, a pipe or journald they
//! are noise (journald stores such lines as blobs), and `NO_COLOR` turns
//! them off everywhere (<https://no-color.org>).

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Human,
    Json,
}

/// Installs the global subscriber, writing to stderr. `level` is one
/// [`parse_level`] accepted.
pub fn init(format: Format, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let ansi = colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        Format::Human => builder.with_target(false).init(),
        Format::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
}

/// Whether to colour: on a terminal, unless `NO_COLOR` is set to
/// anything but the empty string.
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// `--log-level`: a level (`error`, `warn` or `warning`, `info`, `debug`,
/// `trace`, `off`) or a filter of levels and `target=level` directives,
/// such as `warn,portcullis::audit=info`; returned in tracing's spelling.
///
/// A word that is not a level is an error rather than what tracing makes
/// of it (a target name, which silences everything else, fatal errors
/// included).
pub fn parse_level(text: &str) -> Result<String, String> {
    let mut directives = Vec::new();
    for d in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (target, level) = match d.rsplit_once('=') {
            Some((t, l)) => (Some(t.trim()), l.trim()),
            None => (None, d),
        };
        let Some(level) = level_name(level) else {
            return Err(format!(
                "{level:?} is not a log level: use error, warn, info, debug, trace or off, \
                 or a filter such as \"warn,portcullis::audit=info\""
            ));
        };
        directives.push(match target {
            Some(t) => format!("{t}={level}"),
            None => level.to_owned(),
        });
    }
    if directives.is_empty() {
        return Err("empty: use error, warn, info, debug, trace or off".to_owned());
    }
    let filter = directives.join(",");
    EnvFilter::builder()
        .parse(&filter)
        .map_err(|e| format!("{text:?} is not a log filter: {e}"))?;
    Ok(filter)
}

fn level_name(word: &str) -> Option<&'static str> {
    Some(match word.to_ascii_lowercase().as_str() {
        "error" => "error",
        // HAProxy's and syslog's spelling.
        "warn" | "warning" => "warn",
        "info" => "info",
        "debug" => "debug",
        "trace" => "trace",
        "off" => "off",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_filters_are_accepted_in_either_spelling() {
        for (given, want) in [
            ("info", "info"),
            ("warning", "warn"),
            ("WARN", "warn"),
            ("off", "off"),
            ("warning,portcullis::audit=info", "warn,portcullis::audit=info"),
            (" debug , hyper = warning ", "debug,hyper=warn"),
        ] {
            assert_eq!(parse_level(given).as_deref(), Ok(want), "{given}");
        }
    }

    #[test]
    fn a_word_that_is_not_a_level_is_refused() {
        for bad in ["nonsense", "verbose", "portcullis", "info,hyper=loud", "", " , "] {
            let err = parse_level(bad).unwrap_err();
            assert!(err.contains("error, warn, info"), "{bad}: {err}");
        }
    }

    #[test]
    fn colour_only_on_a_terminal_and_never_with_no_color() {
        use std::ffi::OsStr;
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
    }
}
