//! The `ferry` command: `run` the agent, `check` a config and its rule files, work
//! with rule files, and look at, replay or purge dead letters.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_agent::config::Loaded;
use ferry_agent::replay;
use ferry_agent::telemetry::{init_logs, LogFormat};
use ferry_rules::RuleSet;
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
    /// Work with rule files.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Events an upstream refused for good, or too large for a sink, kept in the
    /// store: list, show, replay or purge them, on a running agent (through its
    /// `[admin] listen` endpoint) or a stopped one (opening its store).
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
}

/// Which agent's store.
#[derive(clap::Args)]
struct StoreArgs {
    /// The agent's config file.
    #[arg(long, short)]
    config: PathBuf,
    /// Store directory, overriding `agent.data_dir` (as for `ferry run`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum DeadLettersCommand {
    /// List the dead letters, oldest first.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print one dead letter, its record included, as JSON.
    Show {
        /// The dead letter's id, as `list` shows it.
        id: u64,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Send dead letters again, each to its sink only and with the CloudEvents id
    /// it was first sent with, and remove them.
    Replay {
        /// The dead letter's id, as `list` shows it.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<u64>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove dead letters for good.
    Purge {
        /// The dead letter's id, as `list` shows it.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<u64>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Check every rule file in DIR; print every problem as file:line:col.
    Check {
        /// The rules directory.
        dir: PathBuf,
        /// A config file whose sink and serial source names `emit.to` and
        /// `action.serial_write.port` must use.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Replay recorded readings (JSON lines) through the rules in DIR and print
    /// every event they would emit.
    Test {
        /// The rules directory.
        dir: PathBuf,
        /// One JSON object per line; `device`, `source` and `time` (RFC 3339) are
        /// recognised, other keys are fields.
        #[arg(long)]
        readings: PathBuf,
        /// Print each would-be CloudEvent as one JSON line instead.
        #[arg(long)]
        json: bool,
        /// A config file whose sink and serial source names `emit.to` and
        /// `action.serial_write.port` must use.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    // Exactly one rustls crypto provider is compiled in (ring); install it before any
    // TLS config is built, as rustls requires. An Err means one is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Rules(RulesCommand::Check { dir, config }) => {
            match load_rules(&dir, config.as_deref()) {
                Ok(set) => {
                    println!("{}: ok ({} rules)", dir.display(), set.len());
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        Command::Rules(RulesCommand::Test {
            dir,
            readings,
            json,
            config,
        }) => rules_test(&dir, &readings, json, config.as_deref()),
        Command::DeadLetters(cmd) => {
            use ferry_agent::dead_letters::Action;
            let (store, action) = match cmd {
                DeadLettersCommand::List { store } => (store, Action::List),
                DeadLettersCommand::Show { id, store } => (store, Action::Show(id)),
                DeadLettersCommand::Replay { id, store, .. } => (store, Action::Replay(id)),
                DeadLettersCommand::Purge { id, store, .. } => (store, Action::Purge(id)),
            };
            dead_letters(&store, action)
        }
        Command::Run {
            config,
            data_dir,
            log_format,
        } => {
            // The store holds readings and the rule state: readable by the agent's
            // user only, also when the data dir is created outside systemd
            // (`StateDirectory=` already makes the directory 0700).
            rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
            tune_allocator();
            init_logs(log_format);
            match run(config, data_dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // Logs go to stderr, so this is the one place the reason appears.
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// glibc keeps freed memory in per-thread arenas, and once a large block is freed
/// it raises its mmap threshold, so later large blocks come from those arenas too:
/// after a burst of large readings the agent kept hundreds of MiB it no longer
/// used (docs/BENCHMARKS.md). A fixed threshold (large blocks are mapped and
/// unmapped on their own) and two arenas give that memory back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only sets allocator parameters; it is called before any
    // other thread exists. A refusal (0) leaves glibc's defaults, which work.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

/// Freed memory glibc keeps inside its arenas (between blocks still in use) counts
/// in the resident set until it is handed back: under load that was as much again
/// as the heap in use (docs/BENCHMARKS.md). `malloc_trim` hands it back; every
/// 10 s is rare enough to cost nothing measurable and to leave an idle agent idle.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
async fn trim_allocator() {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(10));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        // SAFETY: malloc_trim only walks glibc's own arenas under their locks.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
async fn trim_allocator() {}

fn check(path: &std::path::Path) -> ExitCode {
    let (loaded, mut problems) = Loaded::check_file(path);
    let mut summary = String::new();
    if let Some(loaded) = loaded {
        let c = &loaded.config;
        let rules = match loaded.rules_dir().filter(|d| d.is_dir()) {
            Some(dir) => match ferry_agent::rules::load_dir(&dir, &c.check_options()) {
                Ok(set) => {
                    warn_about(&set);
                    set.len()
                }
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
            c.source.mqtt.len()
                + c.source.serial.len()
                + c.source.modbus.len()
                + c.source.simulator.len(),
            c.sink.names().len(),
            rules
        );
    }
    if problems.is_empty() {
        println!("{summary}");
        return ExitCode::SUCCESS;
    }
    report(&problems)
}

/// Compiles the rules in `dir`, printing every problem; `Err` is the exit code.
fn load_rules(
    dir: &std::path::Path,
    config: Option<&std::path::Path>,
) -> Result<RuleSet, ExitCode> {
    let result = match config {
        Some(c) => match Loaded::from_file(c) {
            Ok(loaded) => ferry_agent::rules::load_dir(dir, &loaded.config.check_options()),
            Err(problems) => Err(problems),
        },
        None => ferry_agent::rules::load_dir(dir, &Default::default()),
    };
    let set = result.map_err(|problems| report(&problems))?;
    warn_about(&set);
    Ok(set)
}

/// Prints the rule set's warnings. They do not change the exit code: the rules work,
/// the installer decides.
fn warn_about(set: &RuleSet) {
    for w in set.warnings() {
        eprintln!("{w}");
    }
}

fn report(problems: &[ferry_rules::Diagnostic]) -> ExitCode {
    for p in problems {
        eprintln!("{p}");
    }
    let n = problems.len();
    eprintln!("{n} error{} found", if n == 1 { "" } else { "s" });
    ExitCode::FAILURE
}

fn rules_test(
    dir: &std::path::Path,
    readings: &std::path::Path,
    json: bool,
    config: Option<&std::path::Path>,
) -> ExitCode {
    let mut rules = match load_rules(dir, config) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let text = match std::fs::read_to_string(readings) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", readings.display());
            return ExitCode::FAILURE;
        }
    };
    let out = replay::replay(&mut rules, &text);
    // Written with `writeln!`, not `println!`: `ferry rules test ... | head` closes
    // the pipe early, which must end the output, not panic.
    let mut stdout = std::io::stdout().lock();
    let mut events = 0u64;
    for line in &out.lines {
        let text = match line {
            replay::Line::Alert(a) => {
                events += 1;
                if json {
                    replay::as_cloudevent(a, events - 1)
                } else {
                    Some(replay::describe(a))
                }
            }
            replay::Line::Action {
                time,
                action:
                    ferry_rules::Action::MqttPublish {
                        rule,
                        topic,
                        payload,
                        ..
                    },
            } if !json => Some(format!(
                "{}  {rule}: publish {payload:?} to {topic}",
                time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )),
            replay::Line::Action {
                time,
                action: ferry_rules::Action::SerialWrite { rule, port, line },
            } if !json => Some(format!(
                "{}  {rule}: write {line:?} to serial port {port}",
                time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )),
            replay::Line::Dropped { line, device } if !json => Some(format!(
                "  line {line}: reading from {device} not forwarded"
            )),
            replay::Line::Error { line, error } => {
                eprintln!("{}:{line}: {error}", readings.display());
                None
            }
            _ => None,
        };
        if let Some(t) = text {
            if writeln!(stdout, "{t}").is_err() {
                return ExitCode::SUCCESS;
            }
        }
    }
    for bad in &out.bad {
        eprintln!("{}:{}: {}", readings.display(), bad.line, bad.message);
    }
    if !json {
        let _ = writeln!(
            stdout,
            "{} readings, {} forwarded, {} events",
            out.readings, out.forwarded, events
        );
    }
    if out.bad.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn dead_letters(args: &StoreArgs, action: ferry_agent::dead_letters::Action) -> ExitCode {
    use ferry_agent::dead_letters::{render, Outcome};
    match dead_letter_outcome(args, action) {
        Ok(outcome) => {
            let _ = std::io::stdout()
                .lock()
                .write_all(render(&outcome).as_bytes());
            if matches!(outcome, Outcome::NotFound(_)) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("ferry dead-letters: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Asks the running agent, if the config names its admin endpoint and it answers;
/// else opens the store, which only works while no agent has it open.
fn dead_letter_outcome(
    args: &StoreArgs,
    action: ferry_agent::dead_letters::Action,
) -> anyhow::Result<ferry_agent::dead_letters::Outcome> {
    use ferry_agent::dead_letters::{admin_addr, perform, via_admin, ClientError};
    use ferry_agent::store::StoreError;
    let loaded = Loaded::from_file(&args.config).map_err(|problems| {
        for p in &problems {
            eprintln!("{p}");
        }
        anyhow::anyhow!(
            "invalid config: {} problem(s); `ferry check` lists them too",
            problems.len()
        )
    })?;
    let cfg = &loaded.config;
    let mut unanswered = None;
    if let Some(admin) = &cfg.admin {
        let addr = admin_addr(admin.listen);
        match via_admin(addr, action) {
            Ok(outcome) => return Ok(outcome),
            Err(ClientError::Unreachable { .. }) => unanswered = Some(addr),
            Err(e) => return Err(e.into()),
        }
    }
    let dir = args.data_dir.clone().unwrap_or_else(|| loaded.data_dir());
    let has_store = dir.join(ferry_agent::store::redb::FILE).exists() || dir.join("conf").exists();
    if !has_store {
        anyhow::bail!(
            "no store in {} (set --data-dir, or agent.data_dir in the config)",
            dir.display()
        );
    }
    // As `ferry run`: what the store creates stays private.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    // As it is: a damaged store is the agent's to quarantine (and report) at its
    // next start, not this command's.
    let store = match ferry_agent::store::open_as_is(&dir, &cfg.store, &cfg.sink.names()) {
        Ok(store) => store,
        Err(StoreError::Damaged(why)) => anyhow::bail!(
            "the store in {} is damaged ({why}); `ferry run` moves it aside into {}/ \
             and starts on a fresh store",
            dir.display(),
            ferry_agent::store::quarantine::DIR
        ),
        Err(StoreError::InUse(why)) => anyhow::bail!(
            "{why}, and {}",
            match unanswered {
                Some(addr) => format!(
                    "its admin endpoint at {addr} does not answer: is [admin] listen the running agent's?"
                ),
                None => "the config has no [admin] listen to ask it through: add \
                         `[admin] listen = \"127.0.0.1:9464\"` and restart the agent, \
                         or stop the agent"
                    .to_string(),
            }
        ),
        Err(e) => {
            return Err(anyhow::Error::new(e))
                .with_context(|| format!("cannot open the store in {}", dir.display()))
        }
    };
    Ok(perform(&store, action)?)
}

fn run(config: PathBuf, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let loaded = Loaded::from_file(&config).map_err(|problems| {
        // One log line per problem, like rule file errors: a diagnostic's snippet
        // and caret lines would only show as escaped line breaks.
        for p in &problems {
            let at = format!("{}:{}:{}", p.file, p.line, p.col);
            tracing::error!(%at, message = %p.message, "config error");
        }
        anyhow::anyhow!(
            "invalid config: {} problem(s); `ferry check` lists them too",
            problems.len()
        )
    })?;
    let data_dir = data_dir.unwrap_or_else(|| loaded.data_dir());
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    // One thread runs every task; store calls run on tokio's blocking threads.
    // At 2,000 readings/s a second worker cost 12-20 % more CPU per reading in
    // cross-thread wake-ups and did not raise the full-speed rate
    // (docs/BENCHMARKS.md). TOKIO_WORKER_THREADS still sets another count.
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        runtime.worker_threads(1);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signal(shutdown.clone()));
        tokio::spawn(trim_allocator());
        match ferry_agent::pipeline::run(loaded, data_dir, shutdown).await {
            Err(ferry_agent::pipeline::StartError::Rules(diagnostics)) => {
                // One log line per mistake, as for the config.
                for d in &diagnostics {
                    let at = format!("{}:{}:{}", d.file, d.line, d.col);
                    tracing::error!(%at, message = %d.message, "rule file error");
                }
                anyhow::bail!(
                    "the rule files have {} error(s); `ferry check` lists them too",
                    diagnostics.len()
                )
            }
            other => other?,
        }
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
