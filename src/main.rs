//! The `portcullis` binary: parses the command line, starts logging, calls
//! into the library, and maps errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use portcullis::cli::{Cli, Command};
use portcullis::{client, config, logging, server};
use tokio_util::sync::CancellationToken;

/// Exit code for a config that does not validate (EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format, &cli.log_level);
    match cli.command {
        Command::Check(args) => match config::from_file(&args.config) {
            Ok(c) => {
                println!("{}: ok ({} service(s))", args.config.display(), c.services.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", args.config.display());
                ExitCode::FAILURE
            }
        },
        Command::Config(args) => match config::load(&args.config) {
            Ok(raw) => {
                print!("{}", config::render(&raw));
                if let Err(e) = config::validate(&raw) {
                    eprintln!("{}: {e}", args.config.display());
                    return ExitCode::FAILURE;
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", args.config.display());
                ExitCode::FAILURE
            }
        },
        Command::Serve(args) => {
            let config = match config::from_file(&args.config) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("{}: {e}", args.config.display());
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            run(async move {
                let bound = server::bind(config)?;
                let shutdown = CancellationToken::new();
                let trigger = shutdown.clone();
                tokio::spawn(async move {
                    if let Err(e) = server::shutdown_signal().await {
                        tracing::error!("{e:#}");
                    }
                    trigger.cancel();
                });
                bound.run(shutdown).await
            })
        }
        Command::Knock(args) => {
            let steps = match args.parse_steps() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let plan = client::KnockPlan {
                host: args.host.clone(),
                steps,
                delay: args.delay,
                bind: args.bind,
            };
            let verbose = args.verbose;
            run(async move {
                let sent = client::knock(&plan).await?;
                if verbose {
                    for (target, step) in sent.iter().zip(&plan.steps) {
                        println!("knocked {target}/{}", step.proto);
                    }
                }
                Ok(())
            })
        }
    }
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
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
