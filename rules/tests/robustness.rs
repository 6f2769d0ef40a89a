//! Garbage in, diagnostics out: random rule files and expressions never make
//! `compile`, `evaluate`, `tick` or saving and restoring state panic, whatever the
//! readings' times. Deterministic (a fixed-seed xorshift), so a failure reproduces;
//! `fuzz/` takes this further with cargo-fuzz.
//!
//! The engine catches panics (the compiler's, the CEL parser's and interpreter's) and
//! turns them into a diagnostic or an evaluation error, so that a bug never takes the
//! agent down. Caught or not, a panic is a bug: these tests fail on one.

use ferry_rules::{CheckOptions, Diagnostic, Outcome, Reading, RuleSet, SourceFile};
use serde_json::json;

/// xorshift64*: small, deterministic, good enough to shuffle test input.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const VALID: &str = r#"# a rule file
[[rule]]
id = "freezer-warm"
description = "é ü"
match = { device = "freezer-*", source = "local" }
when = "temperature > -15 && door == 'open'"
emit = { type = "com.acme.freezer.warm", severity = "critical", to = ["cloud"] }

[[rule]]
id = "bp"
when = '''
  bp.systolic > 140 ||
  bp["diastolic"] > 90.5
'''
[rule.emit]
type = "com.clinic.bp.high"
"#;

/// A rule of every kind, for mutating.
const EVERY_KIND: &str = r#"[[rule]]
id = "warm"
match = { device = "freezer-*" }
when = "temperature > -15"
for = "10m"
clear_when = "temperature < -18"
emit = { type = "com.acme.warm", severity = "critical", to = ["cloud"] }
action = { mqtt_publish = { topic = "a/{device}/fan", payload = "on", clear_payload = "off", qos = 1 } }

[[rule]]
id = "changes"
forward = { deadband = { temperature = 0.5, "bp.systolic" = 2 }, at_least_every = "15m" }

[[rule]]
id = "drop"
when = "door == 'open'"
forward = false

[[rule]]
id = "rate"
rate = { field = "temperature", per = "1m", above = 2.0, below = -2.0 }
emit = { type = "com.acme.rate" }

[[rule]]
id = "stale"
stale = "15m"
emit = { type = "com.acme.stale" }

[[rule]]
id = "count"
when = "door == 'open'"
count = { at_least = 2, within = "1h" }
emit = { type = "com.acme.count" }

[[rule]]
id = "agg"
aggregate = { every = "5m", fields = ["temperature", "bp.systolic"], functions = ["avg", "max"] }
emit = { type = "com.acme.agg", every_reading = false }
"#;

/// Tokens that make up plausible (and implausible) CEL.
const CEL: &[&str] = &[
    "temperature",
    "door",
    "bp",
    ".systolic",
    "['diastolic']",
    "device",
    "source",
    "zones",
    "missing",
    " ",
    "1",
    "-15",
    "30.5",
    "2u",
    "'open'",
    "\"x\"",
    "r'\\d'",
    "b'\\x00'",
    "'''a'''",
    "true",
    "null",
    ">",
    "<",
    "==",
    "!=",
    ">=",
    "&&",
    "||",
    "!",
    "-",
    "+",
    "*",
    "/",
    "%",
    "?",
    ":",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    ".",
    "in",
    "has(",
    "size(",
    ".exists(z, ",
    "z",
    ".map(z, ",
    ".all(z, ",
    "int(",
    "double(",
    "string(",
    "//",
    "\n",
    "é",
    "`",
    "\\",
    "'",
    "\"",
    ".?",
    "[?",
    "optional.of(",
    ".orValue(",
    "0x7fffffffffffffff",
    "1e308",
    "9223372036854775808",
];

/// Half token soup, half grammatical expressions (so that many compile and get
/// evaluated).
fn random_expression(rng: &mut Rng) -> String {
    if rng.below(2) == 0 {
        let len = rng.below(40);
        (0..len).map(|_| rng.pick(CEL)).collect()
    } else {
        grammatical(rng, 6)
    }
}

fn grammatical(rng: &mut Rng, depth: usize) -> String {
    const ATOMS: &[&str] = &[
        "temperature",
        "door",
        "bp",
        "bp.systolic",
        "bp['diastolic']",
        "device",
        "zones",
        "missing",
        "1",
        "-15",
        "30.5",
        "2u",
        "'open'",
        "true",
        "null",
        "[1, 2.5]",
        "{'a': 1}",
    ];
    if depth == 0 || rng.below(3) == 0 {
        return rng.pick(ATOMS).to_owned();
    }
    let a = grammatical(rng, depth - 1);
    let b = grammatical(rng, depth - 1);
    match rng.below(8) {
        0 => format!("({a})"),
        1 => format!("!{a}"),
        2 => format!("-{a}"),
        3 => format!("{a} ? {b} : {a}"),
        4 => format!("size({a})"),
        5 => format!("{a}.exists(z, z {} {b})", rng.pick(&[">", "==", "in"])),
        6 => format!("{a} in {b}"),
        _ => {
            let ops = [
                "<", ">", "==", "!=", ">=", "&&", "||", "+", "-", "*", "/", "%",
            ];
            format!("{a} {} {b}", rng.pick(&ops))
        }
    }
}

/// `valid` with a few bytes deleted, duplicated or replaced (at char boundaries).
fn mutated(rng: &mut Rng, valid: &str) -> String {
    let mut chars: Vec<char> = valid.chars().collect();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(chars.len());
        match rng.below(3) {
            0 => {
                chars.remove(at);
            }
            1 => {
                let c = chars[at];
                chars.insert(at, c);
            }
            _ => {
                let junk = [
                    '"', '\'', '[', ']', '{', '}', '=', '\n', ',', '#', '\\', 'x', '.', '0', '-',
                    'm',
                ];
                chars[at] = junk[rng.below(junk.len())];
            }
        }
    }
    chars.into_iter().collect()
}

/// What the engine says when it caught a panic while compiling.
const CAUGHT_AT_COMPILE: [&str; 2] = ["internal error", "the CEL parser failed on this expression"];

/// Compiles `files`, failing on a caught panic, and checks every diagnostic points
/// inside its file (`lines` long) or at the file as a whole.
fn compile(files: &[SourceFile], lines: usize) -> Result<RuleSet, Vec<Diagnostic>> {
    let result = RuleSet::compile(files, &CheckOptions::default());
    if let Err(diagnostics) = &result {
        for d in diagnostics {
            assert!(
                !CAUGHT_AT_COMPILE.iter().any(|m| d.message.starts_with(m)),
                "a panic was caught: {d}\n---\n{}",
                files.iter().map(|f| f.text.as_str()).collect::<String>()
            );
            let whole_file = (d.line, d.col, d.snippet.as_str()) == (0, 0, "");
            assert!(
                whole_file || (1..=lines + 1).contains(&d.line),
                "{d}\n---\n{}",
                files.iter().map(|f| f.text.as_str()).collect::<String>()
            );
            assert!(
                whole_file || (1..=d.snippet.chars().count() + 1).contains(&d.col),
                "{d}"
            );
        }
    }
    result
}

/// Fails if evaluating caught a panic of the CEL interpreter.
fn no_caught_panic(outcome: &Outcome) {
    for e in &outcome.errors {
        assert!(
            !e.message.starts_with("the CEL interpreter failed"),
            "a panic was caught: {e}"
        );
    }
}

fn evaluate_all(rules: &mut RuleSet) {
    let readings = [
        json!({"temperature": 31, "door": "open", "bp": {"systolic": 150, "diastolic": 80}}),
        json!({"temperature": -20.5, "zones": [1, 2.5, "x", null], "device": 3}),
        json!({"bp": [], "door": {"a": {"b": true}}}),
        json!({}),
    ];
    let times = [
        chrono::DateTime::UNIX_EPOCH,
        chrono::DateTime::<chrono::Utc>::MAX_UTC,
        chrono::DateTime::<chrono::Utc>::MIN_UTC,
        chrono::DateTime::UNIX_EPOCH + chrono::TimeDelta::hours(1),
    ];
    for (i, fields) in readings.iter().enumerate() {
        let Some(fields) = fields.as_object() else {
            continue;
        };
        for device in ["freezer-1", "", "é", "a+#"] {
            no_caught_panic(&rules.evaluate(&Reading {
                source: "local",
                device,
                time: times[i % times.len()],
                fields,
            }));
        }
    }
    for now in times {
        no_caught_panic(&rules.tick(now));
    }
    let saved = rules.alert_state();
    let _ = rules.restore_alert_state(&saved);
}

#[test]
fn random_expressions_never_panic_compile_or_evaluate() {
    let mut rng = Rng(0x5eed_f00d_dead_beef);
    let mut compiled = 0;
    for _ in 0..40 {
        let mut text = String::new();
        for i in 0..25 {
            let expr = random_expression(&mut rng);
            let quoted = format!("{expr:?}");
            text.push_str(&format!(
                "[[rule]]\nid = \"r{i}\"\nwhen = {quoted}\nemit = {{ type = \"t\" }}\n\n"
            ));
        }
        let lines = text.lines().count();
        let files = [SourceFile {
            name: "random.toml".into(),
            text,
        }];
        if let Ok(mut rules) = compile(&files, lines) {
            evaluate_all(&mut rules);
        }
        // Each expression alone, so the ones that compile get evaluated.
        for i in 0..25 {
            let expr = random_expression(&mut rng);
            let text =
                format!("[[rule]]\nid = \"r{i}\"\nwhen = {expr:?}\nemit = {{ type = \"t\" }}\n");
            let lines = text.lines().count();
            let files = [SourceFile {
                name: "one.toml".into(),
                text,
            }];
            if let Ok(mut rules) = compile(&files, lines) {
                evaluate_all(&mut rules);
                compiled += 1;
            }
        }
    }
    // Enough of them were valid for evaluation to have been exercised.
    assert!(compiled > 200, "only {compiled} of 1000 compiled");
}

#[test]
fn mutated_rule_files_never_panic_and_point_inside_the_file() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut compiled = [0, 0];
    for i in 0..600 {
        let text = mutated(&mut rng, if i % 2 == 0 { VALID } else { EVERY_KIND });
        let lines = text.lines().count().max(1);
        let files = [
            SourceFile {
                name: "mutated.toml".into(),
                text: text.clone(),
            },
            SourceFile {
                name: "valid.toml".into(),
                text: VALID
                    .replace("freezer-warm", "other")
                    .replace("\"bp\"", "\"bp2\""),
            },
        ];
        if let Ok(mut rules) = compile(&files, lines) {
            compiled[i % 2] += 1;
            evaluate_all(&mut rules);
        }
    }
    // Both kinds of file got evaluated after some mutations, not only refused.
    assert!(compiled.iter().all(|&n| n >= 20), "{compiled:?}");
}
