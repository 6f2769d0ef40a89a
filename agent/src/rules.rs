//! The rules stage, agent side: reads the rule files of the rules directory, compiles
//! them with `ferry_rules`, and reloads them when they change.
//!
//! Evaluation itself is pure and lives in that crate; the commit task owns the
//! running [`RuleSet`] and calls it inline for each reading and on a one-second tick.
//!
//! # Reload
//! The directory is watched (debounced, so an editor's write-rename-delete dance is
//! one reload) and SIGHUP forces a reload. Every file is parsed and checked first;
//! only a set with no errors replaces the running one, which adopts the state of
//! every unchanged rule. On any error the running rules stay, every problem is
//! logged with `file:line:col`, and `ferry_rules_reloads_total{result="failed"}`
//! counts it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_rules::{CheckOptions, Diagnostic, RuleSet, SourceFile};
use notify_debouncer_full::notify::{EventKind, RecursiveMode};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// The largest rule file read. Rule files are a few kilobytes; this keeps a stray
/// log file or a symlink to something huge from being read into memory.
pub const MAX_RULE_FILE_BYTES: u64 = 1 << 20;

/// Reads every `*.toml` file in `dir` (sorted, so rule order is stable) and compiles
/// them, checking the sink and serial port names they use against `known` (from
/// [`Config::check_options`](crate::config::Config::check_options); the default
/// checks no names, for `ferry rules check DIR` without a config). `Err` carries every
/// problem in every file: a file that cannot be read as a rule file is reported by
/// name, and the others are still compiled and their problems reported too.
pub fn load_dir(dir: &Path, known: &CheckOptions) -> Result<RuleSet, Vec<Diagnostic>> {
    load_dir_files(dir, known).map(|(set, _)| set)
}

/// [`load_dir`], also giving the files the set was compiled from, to be saved as
/// the last valid rule set ([`encode_files`]).
pub fn load_dir_files(
    dir: &Path,
    known: &CheckOptions,
) -> Result<(RuleSet, Vec<SourceFile>), Vec<Diagnostic>> {
    let (files, mut problems) = read_dir(dir)?;
    let result = RuleSet::compile(&files, known);
    let set = match result {
        Ok(set) if problems.is_empty() => set,
        Ok(_) => return Err(problems),
        Err(found) => {
            problems.extend(found);
            // Stable: each file's problems stay in the order of their places.
            problems.sort_by(|a, b| a.file.cmp(&b.file));
            return Err(problems);
        }
    };
    for w in set.warnings() {
        let at = format!("{}:{}:{}", w.file, w.line, w.col);
        warn!(%at, message = %w.message, "rule file warning");
    }
    Ok((set, files))
}

/// One rule file as the store keeps it, for the last valid rule set.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedFile {
    name: String,
    text: String,
}

/// The files of a valid rule set, as the store keeps them: what the agent starts
/// with when the rule files are broken after a reboot.
pub fn encode_files(files: &[SourceFile]) -> Vec<u8> {
    let saved: Vec<SavedFile> = files
        .iter()
        .map(|f| SavedFile {
            name: f.name.clone(),
            text: f.text.clone(),
        })
        .collect();
    // A Vec of two strings each always serialises.
    serde_json::to_vec(&saved).unwrap_or_default()
}

/// Compiles a rule set saved by [`encode_files`] with today's checks.
pub fn compile_saved(bytes: &[u8], known: &CheckOptions) -> Result<RuleSet, String> {
    let saved: Vec<SavedFile> =
        serde_json::from_slice(bytes).map_err(|e| format!("unreadable: {e}"))?;
    let files: Vec<SourceFile> = saved
        .into_iter()
        .map(|f| SourceFile {
            name: f.name,
            text: f.text,
        })
        .collect();
    RuleSet::compile(&files, known).map_err(|problems| {
        format!(
            "it no longer compiles ({} problems, e.g. {})",
            problems.len(),
            problems.first().map(|p| p.message.as_str()).unwrap_or("")
        )
    })
}

/// Logs each problem of a rule load on its own line, with `file:line:col`.
pub fn log_problems(problems: &[Diagnostic]) {
    for p in problems {
        let at = if p.line == 0 {
            p.file.clone()
        } else {
            format!("{}:{}:{}", p.file, p.line, p.col)
        };
        error!(%at, message = %p.message, "rule file error");
    }
}

/// A rule set a reload compiled, with its files encoded for the store.
pub struct Reloaded {
    pub set: RuleSet,
    pub files: Vec<u8>,
}

/// The rule files of `dir` that could be read, and a problem for each that could
/// not. `Err` if `dir` itself cannot be listed.
fn read_dir(dir: &Path) -> Result<(Vec<SourceFile>, Vec<Diagnostic>), Vec<Diagnostic>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| {
            vec![Diagnostic::whole_file(
                &dir.display().to_string(),
                format!("cannot read: {e}"),
            )]
        })?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    let mut files = Vec::with_capacity(paths.len());
    let mut problems = Vec::new();
    for p in paths {
        let name = p.display().to_string();
        match read_rule_file(&p) {
            Ok(Some(text)) => files.push(SourceFile { name, text }),
            Ok(None) => {}
            Err(why) => problems.push(Diagnostic::whole_file(&name, why)),
        }
    }
    Ok((files, problems))
}

/// The text of the rule file at `path`, following symlinks (Kubernetes mounts a
/// ConfigMap's files as symlinks); `None` for a symlink to nothing (an editor's lock
/// file, such as Emacs's `.#rules.toml`). `Err` says why it is not read, in words
/// that quote nothing from it.
fn read_rule_file(path: &Path) -> Result<Option<String>, String> {
    use std::io::Read;

    let not = |why: &str| format!("cannot read as a rule file: {why}");
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.is_symlink() => return Ok(None),
        Err(e) => return Err(format!("cannot read: {e}")),
    };
    // A FIFO or a device would block the read or never end.
    if !meta.is_file() {
        return Err(not("it is not a regular file"));
    }
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_RULE_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_RULE_FILE_BYTES {
        return Err(not(&format!(
            "it is larger than {} KiB",
            MAX_RULE_FILE_BYTES / 1024
        )));
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| not("it is not UTF-8 text"))
}

/// Listens for SIGHUP and, if `watch_files`, watches `dir`; sends every successfully
/// compiled rule set to the commit task. Runs until `cancel`. Without a rules
/// directory it still owns SIGHUP, so the signal never terminates the agent.
pub async fn watch(
    dir: Option<PathBuf>,
    watch_files: bool,
    known: CheckOptions,
    reloaded: mpsc::Sender<Reloaded>,
    cancel: CancellationToken,
) {
    // Capacity 1: changes that arrive during a reload coalesce into one more reload.
    let (trigger_tx, mut trigger) = mpsc::channel::<&'static str>(1);
    let fs_trigger = trigger_tx.clone();
    let debouncer = notify_debouncer_full::new_debouncer(
        Duration::from_millis(300),
        None,
        move |result: notify_debouncer_full::DebounceEventResult| {
            // Only changes count: reading the files for a reload is an access event
            // too, and reloading on it would reload forever.
            let changed = result.is_ok_and(|events| {
                events
                    .iter()
                    .any(|e| !matches!(e.kind, EventKind::Access(_) | EventKind::Other))
            });
            if changed {
                let _ = fs_trigger.try_send("file change");
            }
        },
    );
    // Kept alive for as long as we watch.
    let _debouncer = match (debouncer, &dir) {
        (Ok(_), _) if !watch_files => None,
        (Ok(_), None) => None,
        (Ok(mut d), Some(dir)) => match d.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => Some(d),
            Err(error) => {
                warn!(dir = %dir.display(), %error, "cannot watch the rules directory; reload with SIGHUP");
                None
            }
        },
        (Err(error), _) => {
            warn!(%error, "cannot watch files; reload rules with SIGHUP");
            None
        }
    };
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(error) => {
            warn!(%error, "cannot listen for SIGHUP");
            None
        }
    };

    loop {
        let why = tokio::select! {
            _ = cancel.cancelled() => return,
            Some(why) = trigger.recv() => why,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => "SIGHUP",
        };
        let Some(d) = dir.clone() else {
            info!(
                reason = why,
                "no rules directory configured; nothing to reload"
            );
            continue;
        };
        let k = known.clone();
        let result = match tokio::task::spawn_blocking(move || load_dir_files(&d, &k)).await {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "rule loading failed");
                continue;
            }
        };
        match result {
            Ok((set, files)) => {
                info!(reason = why, rules = set.len(), "rules reloaded");
                metrics::counter!("ferry_rules_reloads_total", "result" => "ok").increment(1);
                let files = encode_files(&files);
                if reloaded.send(Reloaded { set, files }).await.is_err() {
                    return;
                }
            }
            Err(problems) => {
                metrics::counter!("ferry_rules_reloads_total", "result" => "failed").increment(1);
                log_problems(&problems);
                warn!(
                    reason = why,
                    errors = problems.len(),
                    "rule reload refused; the running rules stay in force"
                );
            }
        }
    }
}
