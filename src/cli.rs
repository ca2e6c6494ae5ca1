//! Command-line interface.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::logging::Format;
use crate::step::StepSpec;

#[derive(Debug, Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Hide TCP services behind port knocking, without a firewall or root"
)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "PORTCULLIS_LOG_FORMAT"
    )]
    pub log_format: Format,
    /// Log level or filter (RUST_LOG takes precedence).
    #[arg(long, global = true, default_value = "info", env = "PORTCULLIS_LOG_LEVEL")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway in the foreground.
    Serve(ConfigArgs),
    /// Validate a config and print every problem with its key path.
    Check(ConfigArgs),
    /// Print the effective config (file, then PORTCULLIS__* environment).
    Config(ConfigArgs),
    /// Send a knock sequence.
    Knock(KnockArgs),
}

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// Config file.
    #[arg(short, long, default_value = "proxy.toml", env = "PORTCULLIS_CONFIG")]
    pub config: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct KnockArgs {
    /// Host to knock on.
    pub host: String,
    /// Steps: 7000/udp, 7000:udp, udp/7000, or a bare port (tcp unless -u).
    #[arg(required = true, num_args = 1..)]
    pub steps: Vec<String>,
    /// Delay between steps, e.g. 100ms.
    #[arg(short, long, default_value = "0ms", value_parser = parse_delay)]
    pub delay: Duration,
    /// Bare ports are UDP (as the stock knock client's -u).
    #[arg(short, long)]
    pub udp: bool,
    /// Local address to send from.
    #[arg(short, long)]
    pub bind: Option<IpAddr>,
    /// Print each step as it is sent.
    #[arg(short, long)]
    pub verbose: bool,
}

impl KnockArgs {
    /// The steps, with bare ports taking UDP under `-u`.
    pub fn parse_steps(&self) -> Result<Vec<StepSpec>, String> {
        self.steps
            .iter()
            .map(|s| {
                let mut spec: StepSpec = s.parse().map_err(|e| format!("step {s:?}: {e}"))?;
                let bare = s.trim().parse::<u16>().is_ok();
                if self.udp && bare {
                    spec.proto = crate::step::Proto::Udp;
                }
                Ok(spec)
            })
            .collect()
    }
}

fn parse_delay(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s)
}
