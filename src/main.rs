//! The `portcullis` binary: parses the command line, starts logging, calls
//! into the library, and maps errors to exit codes.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use portcullis::cli::{Cli, Command};
use portcullis::{client, config, logging, metrics, reload, server};
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
                if let Err(e) = config::validate_in(&raw, &config::base_dir(&args.config)) {
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
                // Only a scrape reads the recorder, so without an admin
                // endpoint metrics are not recorded at all.
                if config.admin.is_some() {
                    metrics::install(&config)?;
                }
                let bound = server::bind(config)?;
                let shutdown = CancellationToken::new();
                let trigger = shutdown.clone();
                tokio::spawn(async move {
                    if let Err(e) = portcullis::drain::shutdown_signal().await {
                        tracing::error!("{e:#}");
                    }
                    trigger.cancel();
                });
                let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
                tokio::spawn(reload::watch(args.config.clone(), reload_tx, shutdown.clone()));
                bound.run(shutdown, reload_rx).await
            })
        }
        Command::Keygen(args) => {
            let keys = portcullis::spa::keyfile::generate(args.kind, &mut rand::rng());
            print!("{}", &*portcullis::spa::keyfile::render(&keys));
            ExitCode::SUCCESS
        }
        Command::Spa(args) => match spa_plan(&args) {
            Ok(plan) => run(async move {
                let packet = client::build_spa(&plan)?;
                if let Some(path) = &args.save_packet {
                    std::fs::write(path, &packet).with_context(|| format!("cannot write {}", path.display()))?;
                }
                client::send_spa(&plan, &packet).await?;
                Ok(())
            }),
            Err(e) => {
                eprintln!("{e:#}");
                ExitCode::from(2)
            }
        },
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

fn spa_plan(args: &portcullis::cli::SpaArgs) -> anyhow::Result<client::SpaPlan> {
    let text = match (&args.key_file, &args.key_env) {
        (Some(path), _) => std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
        (None, Some(var)) => std::env::var(var).with_context(|| format!("environment variable {var} is not set"))?,
        (None, None) => anyhow::bail!("give --key-file or --key-env"),
    };
    let keys = portcullis::spa::keyfile::parse(&text).context("key file")?;
    let mut access = Vec::new();
    for a in &args.access {
        let spec: portcullis::step::StepSpec = a.parse().with_context(|| format!("-A {a}"))?;
        access.push((spec.proto, spec.port));
    }
    let timestamp = portcullis::spa::desk::unix_secs(&portcullis::clock::SystemClock);
    Ok(client::SpaPlan {
        host: args.host.clone(),
        port: args.port,
        fields: portcullis::spa::Fields {
            timestamp,
            access,
            allow_ip: args.allow_ip,
            duration: args.duration,
        },
        keys,
        fwknop_user: args.fwknop.then(|| args.user.clone()),
        bind: args.bind,
    })
}
