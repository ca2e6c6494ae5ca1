//! The `portcullis` binary: parses the command line, starts logging, calls
//! into the library, and maps errors to exit codes.

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser};
use portcullis::cli::{inspect, CheckFormat, Cli, Command};
use portcullis::{client, config, logging, metrics, reload, server};
use tokio_util::sync::CancellationToken;

/// Exit code for a config that does not validate (EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    logging::init(cli.log_format, &cli.log_level);
    match cli.command {
        Command::Check(args) => {
            // As serve does, so the caps fit the limit serve would have.
            let _ = config::budget::raise_descriptor_limit();
            match args.format {
                CheckFormat::Text => inspect::check(&args.config.config),
                CheckFormat::Json => inspect::check_json(&args.config.config),
            }
        }
        Command::Config(args) => {
            // The defaults derived from the descriptor limit are serve's.
            let _ = config::budget::raise_descriptor_limit();
            inspect::show_config(&args.config.config, args.format)
        }
        Command::Completions(args) => {
            let mut cmd = Cli::command();
            clap_complete::generate(args.shell, &mut cmd, "portcullis", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man => {
            let mut out = Vec::new();
            if let Err(e) = clap_mangen::Man::new(Cli::command()).render(&mut out) {
                eprintln!("error: cannot render the manual page: {e}");
                return ExitCode::FAILURE;
            }
            use std::io::Write as _;
            if std::io::stdout().write_all(&out).is_err() {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Command::Serve(args) => {
            tracing::info!(
                version = portcullis::version::VERSION,
                commit = portcullis::version::COMMIT,
                profile = portcullis::version::PROFILE,
                "starting portcullis"
            );
            if let Err(e) = config::budget::raise_descriptor_limit() {
                tracing::warn!(error = %e, "cannot raise the descriptor limit to the hard limit");
            }
            let config = match config::from_file(&args.config) {
                Ok(c) => {
                    c.log_warnings();
                    c
                }
                Err(e) => {
                    if cli.log_format == logging::Format::Json && tracing::enabled!(tracing::Level::ERROR) {
                        // The same shape as a failed reload's line.
                        tracing::error!(
                            config = %args.config.display(),
                            problems = %e.to_json(),
                            "invalid config: not starting"
                        );
                    } else {
                        fatal(&format!("{}: {e}", args.config.display()));
                    }
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            if let Some(d) = &config.descriptors {
                tracing::info!(
                    limit = d.limit,
                    needed = d.needed(),
                    max_connections = config.gateway.max_connections,
                    max_blackholed = config.gateway.max_blackholed,
                    derived = ?d.derived,
                    "descriptor budget"
                );
            }
            // A warning, not a refusal: DNS may come up after the gateway.
            let services = config.services.clone();
            std::thread::spawn(move || {
                for p in config::resolve::unresolvable(&services, config::resolve::DNS_TIMEOUT) {
                    tracing::warn!(key = %p.path, "{}", p.message);
                }
            });
            run(async move {
                // Only a scrape reads the recorder, so without an admin
                // endpoint metrics are not recorded at all.
                if config.admin.is_some() {
                    metrics::install(&config)?;
                }
                // Signals are watched before anything is bound or `ready`
                // is said, so none sent after that meets the default action.
                let mut signals = portcullis::drain::shutdown_signals()?;
                let hup = reload::hangups();
                let baseline = reload::baseline(&args.config);
                let bound = server::bind(config)?;
                let shutdown = CancellationToken::new();
                let trigger = shutdown.clone();
                tokio::spawn(async move {
                    signals.next().await;
                    trigger.cancel();
                    let again = signals.next().await;
                    tracing::warn!(
                        signal = again,
                        exit = portcullis::drain::EXIT_INTERRUPTED,
                        "second signal during the drain: exiting now, cutting every connection still open"
                    );
                    std::process::exit(i32::from(portcullis::drain::EXIT_INTERRUPTED));
                });
                let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
                tokio::spawn(reload::watch(
                    args.config.clone(),
                    baseline,
                    hup,
                    reload_tx,
                    shutdown.clone(),
                ));
                bound.run(shutdown, reload_rx).await
            })
        }
        Command::Keygen(args) => client_exit(client::command::keygen(args)),
        Command::Spa(args) => run_client(client::command::spa(args)),
        Command::Knock(args) => run_client(client::command::knock(args)),
        Command::Open(args) => run_client(client::command::open(args)),
        Command::Close(args) => run_client(client::command::close(args)),
        Command::Exec(args) => run_client(client::command::exec(args)),
        Command::Connect(args) => run_client(client::command::connect(args)),
        Command::Forward(args) => run_client(client::command::forward(args)),
        Command::Import(cmd) => match portcullis::import::run(cmd) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Runs a client command: its failures are one `error: ...` line on
/// stderr and one of the documented exit codes, not log lines.
fn run_client(fut: impl std::future::Future<Output = client::Outcome>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(client::Exit::Failed.code());
        }
    };
    client_exit(runtime.block_on(fut))
}

fn client_exit(outcome: client::Outcome) -> ExitCode {
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("error: {failure}");
            ExitCode::from(failure.exit.code())
        }
    }
}

/// `--help` and `--version` print as clap prints them; a wrong command
/// line is one `error: ...` line and exit 2, like every client error.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(client::Exit::Usage.code()));
    }
    // clap's message runs until its first blank line (usage and tips follow).
    let text = e.to_string();
    let message: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    eprintln!("{} (see --help)", message.join(" "));
    ExitCode::from(client::Exit::Usage.code())
}

fn run(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            fatal(&format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Logs the error that ends the process, or, when the log level hides
/// errors (`off`, or a filter naming other targets only), prints it on
/// stderr: the reason for exiting is never lost.
fn fatal(message: &str) {
    if tracing::enabled!(tracing::Level::ERROR) {
        tracing::error!("{message}");
    } else {
        eprintln!("error: {message}");
    }
}
