//! Any text as a `when` (and `clear_when`) expression of a few kinds of rule: the
//! expression compiler must refuse it with a diagnostic or compile it into a
//! condition that evaluates (to a result or an error) without panicking, on any
//! reading.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(
    init: common::quiet_cel_panics(),
    |data: &[u8]| {
        let Ok(expression) = std::str::from_utf8(data) else {
            return;
        };
        // A JSON string is a valid TOML basic string.
        let Ok(quoted) = serde_json::to_string(expression) else {
            return;
        };
        let text = format!(
            "[[rule]]\nid = \"a\"\nwhen = {quoted}\nfor = \"5m\"\nclear_when = {quoted}\n\
             emit = {{ type = \"x.a\" }}\n\n\
             [[rule]]\nid = \"b\"\nwhen = {quoted}\ncount = {{ at_least = 2, within = \"1h\" }}\n\
             emit = {{ type = \"x.b\" }}\n\n\
             [[rule]]\nid = \"c\"\nwhen = {quoted}\nemit = {{ type = \"x.c\", every_reading = true }}\n"
        );
        if let Ok(mut rules) = common::compile(&text) {
            common::exercise(&mut rules);
        }
    }
);
