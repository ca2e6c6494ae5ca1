//! Log set-up: human-readable by default, one JSON object per line for
//! containers. `RUST_LOG` overrides the level.

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Human,
    Json,
}

/// Installs the global subscriber, writing to stderr.
pub fn init(format: Format, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        Format::Human => builder.with_target(false).init(),
        Format::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
}
