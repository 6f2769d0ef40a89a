//! The rules stage, agent side: reads the rule files of the rules directory and
//! compiles them with `ferry_rules`. Evaluation itself is pure and lives in that
//! crate; the pipeline calls it inline for each reading.

use std::path::Path;

use ferry_rules::{CheckOptions, Diagnostic, RuleSet, SourceFile};

/// Reads every `*.toml` file in `dir` (sorted, so rule order is stable) and compiles
/// them. `Err` carries every problem in every file.
pub fn load_dir(dir: &Path, sinks: &[String]) -> Result<RuleSet, Vec<Diagnostic>> {
    let files = read_dir(dir)?;
    let opts = CheckOptions {
        known_sinks: Some(sinks.to_vec()),
    };
    RuleSet::compile(&files, &opts)
}

fn read_dir(dir: &Path) -> Result<Vec<SourceFile>, Vec<Diagnostic>> {
    let io_err = |path: &Path, e: std::io::Error| Diagnostic {
        file: path.display().to_string(),
        line: 0,
        col: 0,
        message: format!("cannot read: {e}"),
        snippet: String::new(),
    };
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| vec![io_err(dir, e)])?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml") && p.is_file())
        .collect();
    paths.sort();
    let mut files = Vec::with_capacity(paths.len());
    let mut errors = Vec::new();
    for p in paths {
        match std::fs::read_to_string(&p) {
            Ok(text) => files.push(SourceFile {
                name: p.display().to_string(),
                text,
            }),
            Err(e) => errors.push(io_err(&p, e)),
        }
    }
    if errors.is_empty() {
        Ok(files)
    } else {
        Err(errors)
    }
}
