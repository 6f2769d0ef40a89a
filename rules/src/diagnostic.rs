//! [`Diagnostic`]: one mistake in one file, with the place it was made.

use std::fmt;

/// A mistake in a rule file (or, in the agent, a config file), located by 1-based
/// line and column so an installer can jump straight to it.
///
/// Shown as `file:line:col: message`, then the offending line and a caret under the
/// column:
///
/// ```text
/// rules/freezer.toml:4:21: invalid `when` expression: Syntax error: ...
///   when = "temperature > "
///                       ^
/// ```
///
/// A mistake about a file as a whole (it cannot be read, it is not a rule file) has
/// no place in it: [`Diagnostic::whole_file`], shown as `file: message` alone, so that
/// nothing of a file that is not meant to be read is ever shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file's name as the caller gave it in [`SourceFile::name`](crate::SourceFile::name),
    /// usually its path.
    pub file: String,
    /// 1-based line number; 0 for a mistake about the file as a whole.
    pub line: usize,
    /// 1-based column, counted in characters (not bytes) from the start of the line.
    pub col: usize,
    /// What is wrong, in one line.
    pub message: String,
    /// The whole source line the column points into, without its line ending.
    pub snippet: String,
}

impl Diagnostic {
    /// A diagnostic about `file` as a whole, with no line, column or snippet.
    pub fn whole_file(file: &str, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.to_owned(),
            line: 0,
            col: 0,
            message: message.into(),
            snippet: String::new(),
        }
    }

    /// A diagnostic for the place `byte_offset` bytes into `text`, the contents of `file`.
    ///
    /// Never panics: an offset past the end points just after the last character, and
    /// one inside a multi-byte character points at that character.
    pub fn at(file: &str, text: &str, byte_offset: usize, message: impl Into<String>) -> Self {
        let offset = floor_char_boundary(text, byte_offset);
        let line_start = text[..offset].rfind('\n').map_or(0, |newline| newline + 1);
        let line_end = text[offset..]
            .find('\n')
            .map_or(text.len(), |newline| offset + newline);
        let line = text[..line_start].matches('\n').count() + 1;
        let col = text[line_start..offset].chars().count() + 1;
        let snippet = text[line_start..line_end].trim_end_matches('\r').to_owned();
        Diagnostic {
            file: file.to_owned(),
            line,
            col,
            message: message.into(),
            snippet,
        }
    }
}

/// The largest char boundary of `text` at or before `offset`, clamped to its length.
fn floor_char_boundary(text: &str, offset: usize) -> usize {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        // Offset 0 is always a boundary, so this stops before underflowing.
        offset -= 1;
    }
    offset
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            return write!(f, "{}: {}", self.file, self.message);
        }
        writeln!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )?;
        writeln!(f, "  {}", self.snippet)?;
        // Keep tabs so the caret lines up with the snippet in a terminal.
        let pad: String = self
            .snippet
            .chars()
            .take(self.col.saturating_sub(1))
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        write!(f, "  {pad}^")
    }
}

impl std::error::Error for Diagnostic {}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "[[rule]]\nid = \"a\"\n\twhen = \"é > 1\"\n";

    #[test]
    fn an_offset_on_the_first_line_is_line_one() {
        let d = Diagnostic::at("f.toml", TEXT, 2, "m");
        assert_eq!((d.line, d.col), (1, 3));
        assert_eq!(d.snippet, "[[rule]]");
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let gt = TEXT.find('>').unwrap_or_default();
        let d = Diagnostic::at("f.toml", TEXT, gt, "m");
        assert_eq!((d.line, d.col), (3, 12));
        assert_eq!(d.snippet, "\twhen = \"é > 1\"");
    }

    #[test]
    fn display_shows_the_line_and_a_caret_under_the_column() {
        let gt = TEXT.find('>').unwrap_or_default();
        let d = Diagnostic::at("f.toml", TEXT, gt, "bad");
        assert_eq!(
            d.to_string(),
            "f.toml:3:12: bad\n  \twhen = \"é > 1\"\n  \t          ^"
        );
    }

    #[test]
    fn an_offset_inside_a_multibyte_character_points_at_that_character() {
        let e = TEXT.find('é').unwrap_or_default();
        let d = Diagnostic::at("f.toml", TEXT, e + 1, "m");
        assert_eq!((d.line, d.col), (3, 10));
    }

    #[test]
    fn an_offset_past_the_end_points_after_the_last_line() {
        let d = Diagnostic::at("f.toml", TEXT, 10_000, "m");
        assert_eq!((d.line, d.col), (4, 1));
        assert_eq!(d.snippet, "");
        let d = Diagnostic::at("f.toml", "no newline", 10_000, "m");
        assert_eq!((d.line, d.col), (1, 11));
    }

    #[test]
    fn a_crlf_line_ending_is_not_part_of_the_snippet() {
        let d = Diagnostic::at("f.toml", "a = 1\r\nb = 2\r\n", 7, "m");
        assert_eq!((d.line, d.col), (2, 1));
        assert_eq!(d.snippet, "b = 2");
    }

    #[test]
    fn a_mistake_about_a_whole_file_is_shown_without_a_place_or_a_snippet() {
        let d = Diagnostic::whole_file("f.toml", "cannot read as a rule file: not TOML");
        assert_eq!(
            d.to_string(),
            "f.toml: cannot read as a rule file: not TOML"
        );
    }

    #[test]
    fn an_empty_file_has_a_line_one_column_one() {
        let d = Diagnostic::at("f.toml", "", 0, "m");
        assert_eq!((d.line, d.col, d.snippet.as_str()), (1, 1, ""));
    }
}
