//! `*` and `?` globs for `match.device` and `match.source`.

use wildmatch::WildMatch;

/// A checked glob: `*` matches any run of characters (also none), `?` exactly one
/// character, anything else itself. Matching is case-sensitive and covers the whole
/// name: `freezer-*` matches `freezer-1` but not `old-freezer-1`.
#[derive(Debug, Clone)]
pub(crate) struct Glob {
    matcher: WildMatch,
}

/// Characters refused in globs, so that character classes (`[0-9]`), alternatives
/// (`{a,b}`) and escapes can be added later without changing what an existing rule
/// file means.
const RESERVED: &[char] = &['[', ']', '{', '}', '\\'];

impl Glob {
    /// Checks and compiles `pattern`. `Err` is `(byte offset into the pattern, message)`,
    /// with no offset when the pattern as a whole is wrong.
    pub(crate) fn new(pattern: &str) -> Result<Glob, (Option<usize>, String)> {
        if pattern.is_empty() {
            return Err((
                None,
                "empty glob; leave the key out to match everything".into(),
            ));
        }
        if let Some(at) = pattern.find(RESERVED) {
            let c = pattern[at..].chars().next().unwrap_or('?');
            return Err((
                Some(at),
                format!("`{c}` is not allowed in a glob (only `*` and `?` are special)"),
            ));
        }
        Ok(Glob {
            matcher: WildMatch::new(pattern),
        })
    }

    pub(crate) fn matches(&self, name: &str) -> bool {
        self.matcher.matches(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, name: &str) -> bool {
        Glob::new(pattern).is_ok_and(|glob| glob.matches(name))
    }

    #[test]
    fn a_star_matches_any_run_of_characters() {
        assert!(matches("freezer-*", "freezer-1"));
        assert!(matches("freezer-*", "freezer-"));
        assert!(matches("*-1", "freezer-1"));
        assert!(matches("f*r-*", "freezer-12"));
        assert!(!matches("freezer-*", "old-freezer-1"));
    }

    #[test]
    fn a_question_mark_matches_exactly_one_character() {
        assert!(matches("fz-?", "fz-1"));
        assert!(matches("fz-?", "fz-é"));
        assert!(!matches("fz-?", "fz-12"));
        assert!(!matches("fz-?", "fz-"));
    }

    #[test]
    fn a_glob_without_wildcards_matches_only_itself() {
        assert!(matches("local", "local"));
        assert!(!matches("local", "Local"));
        assert!(!matches("local", "local2"));
    }

    #[test]
    fn reserved_characters_are_refused_with_their_position() {
        let Err((at, message)) = Glob::new("dev[0-9]") else {
            panic!("accepted a reserved character");
        };
        assert_eq!(at, Some(3));
        assert_eq!(
            message,
            "`[` is not allowed in a glob (only `*` and `?` are special)"
        );
        assert_eq!(
            Glob::new("a{b,c}").err(),
            Some((
                Some(1),
                "`{` is not allowed in a glob (only `*` and `?` are special)".into()
            ))
        );
        assert_eq!(
            Glob::new("a\\*").err(),
            Some((
                Some(1),
                "`\\` is not allowed in a glob (only `*` and `?` are special)".into()
            ))
        );
    }

    #[test]
    fn an_empty_glob_is_refused() {
        assert_eq!(
            Glob::new("").err(),
            Some((
                None,
                "empty glob; leave the key out to match everything".into()
            ))
        );
    }
}
