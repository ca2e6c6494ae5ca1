//! Command-line interface.

pub mod inspect;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::logging::Format;
use crate::step::StepSpec;

/// The client's exit codes, shown under `--help` (README says the same).
const EXIT_CODES: &str = "\
Client exit codes (knock, spa, keygen, open, exec, connect, forward):
  0    done
  1    sending failed, a TCP knock step's handshake failed, or the service
       could not be reached after opening
  2    the command line is wrong
  3    a profile, profile file or key file cannot be used
  126  exec: the command may not be run (not executable)
  127  exec: the command was not found
  exec otherwise becomes its command: its status is the exit status.
Every client error is one line on stderr: error: ...";

#[derive(Debug, Parser)]
#[command(
    name = "portcullis",
    version = crate::version::LONG,
    about = "Hide TCP services behind port knocking, without a firewall or root",
    after_help = EXIT_CODES
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
    /// Log level: error, warn (or warning), info, debug, trace or off; or a
    /// filter such as warn,portcullis::audit=info (RUST_LOG takes precedence).
    #[arg(
        long,
        global = true,
        default_value = "info",
        env = "PORTCULLIS_LOG_LEVEL",
        value_parser = crate::logging::parse_level
    )]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway in the foreground.
    Serve(ConfigArgs),
    /// Validate a config and print every problem with its key path.
    Check(CheckArgs),
    /// Print the effective config (file, then PORTCULLIS__* environment),
    /// every default filled in.
    Config(ShowConfigArgs),
    /// Print a shell completion script (e.g. `portcullis completions bash
    /// > /etc/bash_completion.d/portcullis`).
    Completions(CompletionsArgs),
    /// Print the manual page (roff) on stdout (`portcullis man | man -l -`).
    Man,
    /// Send a knock sequence.
    #[command(after_help = EXIT_CODES)]
    Knock(KnockArgs),
    /// Send one Single Packet Authorization packet.
    #[command(after_help = EXIT_CODES)]
    Spa(SpaArgs),
    /// Make a new key file (native, fwknop or both).
    #[command(after_help = EXIT_CODES)]
    Keygen(KeygenArgs),
    /// Open a profile's service: send its knock sequence or SPA packet.
    #[command(after_help = EXIT_CODES)]
    Open(OpenArgs),
    /// End the grant an SPA profile opened, early (a native close request).
    #[command(after_help = EXIT_CODES)]
    Close(OpenArgs),
    /// Open a profile's service, then run a command; exit with its status.
    #[command(after_help = EXIT_CODES)]
    Exec(ExecArgs),
    /// Open a profile's service, connect, and relay stdin/stdout
    /// (ssh -o ProxyCommand='portcullis connect NAME %h %p').
    #[command(after_help = EXIT_CODES)]
    Connect(ConnectArgs),
    /// Open a profile's service for each connection to a local listener,
    /// and relay it.
    #[command(after_help = EXIT_CODES)]
    Forward(ForwardArgs),
    /// Print a proxy.toml made from a knockd or fwknopd config, with a
    /// comment on every setting to change (key files go to -o DIR).
    #[command(subcommand)]
    Import(ImportCommand),
}

#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// knockd.conf: each section becomes a service; commands are listed,
    /// not carried over.
    Knockd(ImportArgs),
    /// fwknopd's access.conf (and fwknopd.conf beside it), or the
    /// directory holding them: stanzas become users, OPEN_PORTS services.
    Fwknopd(ImportArgs),
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The file (or, for fwknopd, the directory) to import.
    pub path: PathBuf,
    /// Directory for the key files the source holds (created; each file
    /// mode 0600). Keys are never printed.
    #[arg(short, long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Replace key files that exist in DIR.
    #[arg(long, requires = "output")]
    pub force: bool,
}

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// Config file.
    #[arg(short, long, default_value = "proxy.toml", env = "PORTCULLIS_CONFIG")]
    pub config: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Output: text for people, or one JSON object (ok, errors, warnings,
    /// each error and warning a {key, message}).
    #[arg(long, value_enum, default_value = "text")]
    pub format: CheckFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct ShowConfigArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "toml")]
    pub format: ConfigFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConfigFormat {
    Toml,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    pub shell: clap_complete::Shell,
}

/// Where profiles come from.
#[derive(Debug, Clone, clap::Args)]
pub struct ProfileFile {
    /// Profile file [default: $XDG_CONFIG_HOME/portcullis/client.toml, then
    /// ~/.fwknoprc stanzas].
    #[arg(long = "profiles", env = "PORTCULLIS_PROFILES", value_name = "FILE")]
    pub file: Option<PathBuf>,
}

impl ProfileFile {
    pub fn sources(&self) -> crate::client::profile::Sources {
        crate::client::profile::Sources {
            file: self.file.clone(),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct KnockArgs {
    /// Knock with this profile's host and steps (HOST and STEPS, when
    /// given, take their place).
    #[arg(short = 'n', long = "name", value_name = "NAME")]
    pub profile: Option<String>,
    #[command(flatten)]
    pub profiles: ProfileFile,
    /// Host to knock on.
    pub host: Option<String>,
    /// Steps: 7000/udp, 7000:udp, udp/7000, or a bare port (tcp unless -u).
    #[arg(num_args = 0..)]
    pub steps: Vec<String>,
    /// Pause between steps: milliseconds (as knockd's -d) or a duration
    /// such as 100ms [default: none needed; the client keeps the order].
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
    /// Knock the current steps of a rotating sequence whose secret is in
    /// this file (`portcullis keygen --kind totp`), instead of STEPS. The
    /// file may also hold TOTP_PORTS, TOTP_STEPS and TOTP_PERIOD lines.
    #[arg(long, value_name = "KEYFILE")]
    pub totp: Option<PathBuf>,
    /// The rotating sequence's pool, as the gateway's `totp.ports`
    /// [default: the key file's TOTP_PORTS].
    #[arg(long, value_name = "FIRST-LAST/PROTO")]
    pub ports: Option<String>,
    /// Steps of the rotating sequence, as the gateway's `totp.steps`
    /// [default: the key file's TOTP_STEPS, else 4].
    #[arg(long = "steps", value_name = "N")]
    pub totp_steps: Option<usize>,
    /// Period of the rotating sequence, as the gateway's `totp.period`
    /// [default: the key file's TOTP_PERIOD, else 30s].
    #[arg(long, value_parser = parse_duration)]
    pub period: Option<Duration>,
    /// Compute the sequence as if the clock read this much earlier.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub time_offset_minus: Option<Duration>,
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
    crate::client::profile::parse_delay(s)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s)
}

#[derive(Debug, clap::Args)]
pub struct SpaArgs {
    /// Take the gateway, port, access, key and allow-IP from this profile
    /// (flags given here take their place).
    #[arg(short = 'n', long = "name", value_name = "NAME")]
    pub profile: Option<String>,
    #[command(flatten)]
    pub profiles: ProfileFile,
    /// Gateway to send to.
    #[arg(short = 'D', long = "destination")]
    pub host: Option<String>,
    /// SPA port of the gateway [default: 62201].
    #[arg(short, long)]
    pub port: Option<u16>,
    /// What to open, as PROTO/PORT (e.g. tcp/5432); repeat, or list them
    /// comma-separated as fwknop does (tcp/22,udp/53).
    #[arg(short = 'A', long = "access")]
    pub access: Vec<String>,
    /// Address to grant instead of the packet's source (behind NAT):
    /// an address, "source" or "resolve" (the address this host uses
    /// towards the gateway).
    #[arg(short = 'a', long = "allow-ip")]
    pub allow_ip: Option<String>,
    /// User name carried in fwknop packets [default: $USER] (native
    /// packets are identified by their key).
    #[arg(short, long)]
    pub user: Option<String>,
    /// Key file from `portcullis keygen` or `fwknop --key-gen`; - reads stdin.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Environment variable holding the key file's text.
    #[arg(long, conflicts_with = "key_file")]
    pub key_env: Option<String>,
    /// Send the stock fwknop client's format instead of the native one.
    #[arg(long)]
    pub fwknop: bool,
    /// Ask for the grant to last this long (the gateway caps it).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Also write the exact bytes sent to this file.
    #[arg(long)]
    pub save_packet: Option<PathBuf>,
    /// Local address to send from.
    #[arg(short, long)]
    pub bind: Option<IpAddr>,
    /// Print what is sent: user, access, allow-IP, timestamp (never keys).
    #[arg(short, long)]
    pub verbose: bool,
    /// Build and print the packet without sending it.
    #[arg(short = 'T', long = "test")]
    pub test: bool,
    /// Ask the gateway to end the grant early instead (native keys only).
    #[arg(long, conflicts_with = "duration")]
    pub close: bool,
}

#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// native, fwknop (the two lines `fwknop --key-gen` prints), both, or
    /// totp (the secret of a rotating knock sequence).
    #[arg(long, default_value = "native")]
    pub kind: crate::spa::keyfile::KeyKind,
    /// Write the key file here (created with mode 0600) instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Overwrite FILE if it exists.
    #[arg(long, requires = "output")]
    pub force: bool,
}

#[derive(Debug, clap::Args)]
pub struct OpenArgs {
    /// Profile name.
    pub name: String,
    #[command(flatten)]
    pub profiles: ProfileFile,
    /// Print what is sent.
    #[arg(short, long)]
    pub verbose: bool,
}

#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// Profile name.
    pub name: String,
    #[command(flatten)]
    pub profiles: ProfileFile,
    /// Print what is sent.
    #[arg(short, long)]
    pub verbose: bool,
    /// The command to run once the service is open.
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct ConnectArgs {
    /// Profile name.
    pub name: String,
    /// Host to connect to [default: the profile's connect].
    #[arg(requires = "port")]
    pub host: Option<String>,
    /// Port to connect to.
    pub port: Option<u16>,
    #[command(flatten)]
    pub profiles: ProfileFile,
}

#[derive(Debug, clap::Args)]
pub struct ForwardArgs {
    /// Profile name.
    pub name: String,
    /// Local address to listen on (port 0 picks one; the address is printed).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Where to relay to [default: the profile's connect].
    #[arg(long, value_name = "HOST:PORT")]
    pub to: Option<String>,
    #[command(flatten)]
    pub profiles: ProfileFile,
    /// Print what is sent at each open.
    #[arg(short, long)]
    pub verbose: bool,
}
