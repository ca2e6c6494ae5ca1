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
    /// Send one Single Packet Authorization packet.
    Spa(SpaArgs),
    /// Print a new key file (native, fwknop or both).
    Keygen(KeygenArgs),
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
    /// Delay between steps, e.g. 100ms [default: none after a UDP step,
    /// 10ms after a TCP step].
    #[arg(short, long, value_parser = parse_delay)]
    pub delay: Option<Duration>,
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

#[derive(Debug, clap::Args)]
pub struct SpaArgs {
    /// Gateway to send to.
    #[arg(short = 'D', long = "destination")]
    pub host: String,
    /// SPA port of the gateway.
    #[arg(short, long, default_value_t = crate::spa::fwknop::DEFAULT_PORT)]
    pub port: u16,
    /// What to open, as PROTO/PORT (e.g. tcp/5432); repeat for several.
    #[arg(short = 'A', long = "access", required = true)]
    pub access: Vec<String>,
    /// Address to grant instead of the packet's source (behind NAT).
    #[arg(short = 'a', long = "allow-ip")]
    pub allow_ip: Option<IpAddr>,
    /// User name carried in fwknop packets (native packets are identified
    /// by their key).
    #[arg(short, long, env = "USER", default_value = "portcullis")]
    pub user: String,
    /// Key file from `portcullis keygen` or `fwknop --key-gen`.
    #[arg(long, required_unless_present = "key_env")]
    pub key_file: Option<PathBuf>,
    /// Environment variable holding the key file's text.
    #[arg(long, conflicts_with = "key_file")]
    pub key_env: Option<String>,
    /// Send the stock fwknop client's format instead of the native one.
    #[arg(long)]
    pub fwknop: bool,
    /// Ask for the grant to last this long (the gateway caps it).
    #[arg(long, value_parser = parse_delay)]
    pub duration: Option<Duration>,
    /// Also write the exact bytes sent to this file.
    #[arg(long)]
    pub save_packet: Option<PathBuf>,
    /// Local address to send from.
    #[arg(short, long)]
    pub bind: Option<IpAddr>,
}

#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// native, fwknop (the two lines `fwknop --key-gen` prints) or both.
    #[arg(long, default_value = "native")]
    pub kind: crate::spa::keyfile::KeyKind,
}
