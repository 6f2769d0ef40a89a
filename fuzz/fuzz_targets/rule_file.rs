//! Any text as a rule file: the parser, the checker and the expression compiler
//! must answer with rules or with diagnostics inside the file, never panic or hang;
//! rules that compile must evaluate, tick and save their state without panicking.
//!
//! Seed it with the fixtures: `cargo +nightly fuzz run rule_file corpus/rule_file
//! ../rules/tests/fixtures`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(
    init: common::quiet_cel_panics(),
    |data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        if let Ok(mut rules) = common::compile(text) {
            common::exercise(&mut rules);
        }
    }
);
