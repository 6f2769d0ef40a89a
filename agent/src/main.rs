//! The `ferry` command: `run` the agent, or `check` a config and its rule files.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_agent::config::Loaded;
use ferry_agent::telemetry::{init_logs, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Edge/IoT gateway agent: sensor readings in, CloudEvents out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until SIGTERM or SIGINT.
    Run {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Store directory, overriding `agent.data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Log format on stderr.
        #[arg(long, value_enum, default_value_t)]
        log_format: LogFormat,
    },
    /// Check a config file and the rule files it names; print every problem.
    Check {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    // Exactly one rustls crypto provider is compiled in (ring); install it before any
    // TLS config is built, as rustls requires. An Err means one is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run {
            config,
            data_dir,
            log_format,
        } => {
            init_logs(log_format);
            match run(config, data_dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("ferry: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let (loaded, mut problems) = Loaded::check_file(path);
    let mut summary = String::new();
    if let Some(loaded) = loaded {
        let c = &loaded.config;
        let rules = match loaded.rules_dir() {
            Some(dir) => match ferry_agent::rules::load_dir(&dir, &c.sink.names()) {
                Ok(set) => set.len(),
                Err(d) => {
                    problems.extend(d);
                    0
                }
            },
            None => 0,
        };
        summary = format!(
            "{}: ok ({} sources, {} sinks, {} rules)",
            path.display(),
            c.source.mqtt.len() + c.source.simulator.len(),
            c.sink.names().len(),
            rules
        );
    }
    if problems.is_empty() {
        println!("{summary}");
        return ExitCode::SUCCESS;
    }
    for p in &problems {
        eprintln!("{p}");
    }
    eprintln!(
        "{} error{} found",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    ExitCode::FAILURE
}

fn run(config: PathBuf, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let loaded = Loaded::from_file(&config).map_err(|d| {
        anyhow::anyhow!(
            "invalid config:\n{}",
            d.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    let data_dir = data_dir.unwrap_or_else(|| loaded.data_dir());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signal(shutdown.clone()));
        ferry_agent::pipeline::run(loaded, data_dir, shutdown).await?;
        anyhow::Ok(())
    })
}

/// Cancels `shutdown` on SIGTERM or SIGINT. A second SIGINT (Ctrl-C twice) exits at
/// once; repeated SIGTERMs are ignored, because process managers may send more than
/// one and the shutdown is already bounded.
async fn on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop ferry with SIGKILL");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = name, "stopping");
    shutdown.cancel();
    int.recv().await;
    tracing::warn!("second SIGINT: exiting now; uncommitted input stays with its producers");
    std::process::exit(130);
}
