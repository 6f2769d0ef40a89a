//! Where a character of a TOML string value was written in the file.
//!
//! A `when` expression reaches the CEL parser decoded: quotes stripped, escapes
//! (`\"`, `\n`, `\u00e9`, ...) replaced, and in multi-line strings the first newline
//! and line-ending backslashes removed. CEL reports its errors against that decoded
//! text, so to point into the file we walk the raw string token again, decoding it
//! the way TOML does and remembering where each decoded character came from.

use std::ops::Range;

/// Maps byte offsets in a decoded TOML string to byte offsets in the file.
#[derive(Debug, Clone)]
pub(crate) struct StringMap {
    /// `(decoded offset, file offset)` for every decoded character, in order.
    points: Vec<(usize, usize)>,
    /// File offset of the first byte after the string's content (its closing quote).
    content_end: usize,
    /// File offset of the first byte of the string's content (after its opening quote).
    content_start: usize,
    /// Whether decoding the token reproduced the value; if not, every offset maps
    /// to the start of the content, which is still the right line in most cases.
    exact: bool,
}

impl StringMap {
    /// Builds the map for the string token at `span` in `text`, whose decoded value
    /// is `value` (as the TOML parser produced it).
    pub(crate) fn new(text: &str, span: Range<usize>, value: &str) -> StringMap {
        let fallback = StringMap {
            points: Vec::new(),
            content_start: span.start,
            content_end: span.start,
            exact: false,
        };
        let Some(token) = text.get(span.clone()) else {
            return fallback;
        };
        let kind = if token.starts_with("\"\"\"") {
            Kind::MultiLineBasic
        } else if token.starts_with("'''") {
            Kind::MultiLineLiteral
        } else if token.starts_with('"') {
            Kind::Basic
        } else if token.starts_with('\'') {
            Kind::Literal
        } else {
            return fallback;
        };
        let delimiter = kind.delimiter_len();
        if token.len() < 2 * delimiter {
            return fallback;
        }
        let content_start = span.start + delimiter;
        let content_end = span.end - delimiter;
        let Some(content) = text.get(content_start..content_end) else {
            return fallback;
        };
        let (decoded, points) = decode(content, content_start, kind);
        StringMap {
            exact: decoded == value,
            points,
            content_start,
            content_end,
        }
    }

    /// The file offset of the decoded byte `offset`; the end of the content for an
    /// offset at or past the end of the value.
    pub(crate) fn file_offset(&self, offset: usize) -> usize {
        if !self.exact {
            return self.content_start;
        }
        match self
            .points
            .binary_search_by_key(&offset, |&(decoded, _)| decoded)
        {
            Ok(i) => self.points[i].1,
            // Inside a multi-byte character: the character it belongs to.
            Err(i) if i < self.points.len() && i > 0 => self.points[i - 1].1,
            Err(_) => self.content_end,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Basic,
    Literal,
    MultiLineBasic,
    MultiLineLiteral,
}

impl Kind {
    fn delimiter_len(self) -> usize {
        match self {
            Kind::Basic | Kind::Literal => 1,
            Kind::MultiLineBasic | Kind::MultiLineLiteral => 3,
        }
    }

    fn multi_line(self) -> bool {
        matches!(self, Kind::MultiLineBasic | Kind::MultiLineLiteral)
    }

    fn escapes(self) -> bool {
        matches!(self, Kind::Basic | Kind::MultiLineBasic)
    }
}

/// Decodes `content` (which starts at file offset `base`) the way TOML does,
/// returning the decoded string and where each of its characters came from.
fn decode(content: &str, base: usize, kind: Kind) -> (String, Vec<(usize, usize)>) {
    let mut decoded = String::with_capacity(content.len());
    let mut points = Vec::with_capacity(content.len());
    let mut chars = content.char_indices().peekable();
    if kind.multi_line() {
        // A newline right after the opening delimiter is trimmed.
        if content.starts_with("\r\n") {
            chars.next();
            chars.next();
        } else if content.starts_with('\n') {
            chars.next();
        }
    }
    let mut push = |decoded: &mut String, c: char, at: usize| {
        points.push((decoded.len(), base + at));
        decoded.push(c);
    };
    while let Some((at, c)) = chars.next() {
        if kind.multi_line() && c == '\r' && chars.peek().map(|&(_, n)| n) == Some('\n') {
            // CRLF inside a multi-line string decodes to LF.
            chars.next();
            push(&mut decoded, '\n', at);
            continue;
        }
        if c != '\\' || !kind.escapes() {
            push(&mut decoded, c, at);
            continue;
        }
        let Some((_, escape)) = chars.next() else {
            break;
        };
        let simple = match escape {
            'b' => Some('\u{8}'),
            't' => Some('\t'),
            'n' => Some('\n'),
            'f' => Some('\u{c}'),
            'r' => Some('\r'),
            'e' => Some('\u{1b}'),
            '"' => Some('"'),
            '\\' => Some('\\'),
            _ => None,
        };
        if let Some(simple) = simple {
            push(&mut decoded, simple, at);
            continue;
        }
        let hex_digits = match escape {
            'x' => 2,
            'u' => 4,
            'U' => 8,
            _ => 0,
        };
        if hex_digits > 0 {
            let mut code = 0u32;
            for _ in 0..hex_digits {
                let digit = chars.next().and_then(|(_, d)| d.to_digit(16));
                code = code.saturating_mul(16).saturating_add(digit.unwrap_or(0));
            }
            push(&mut decoded, char::from_u32(code).unwrap_or('\u{fffd}'), at);
            continue;
        }
        if kind == Kind::MultiLineBasic && (escape.is_whitespace()) {
            // A line-ending backslash: it, and all whitespace and newlines after
            // it, are removed.
            while chars.peek().is_some_and(|&(_, n)| n.is_whitespace()) {
                chars.next();
            }
            continue;
        }
        // Not valid TOML; the parser would have refused it, so just keep going.
        push(&mut decoded, escape, at);
    }
    (decoded, points)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file offset of decoded offset `at` of `value`, the string at `span`.
    fn map(text: &str, value: &str, at: usize) -> usize {
        let start = text.find(['"', '\'']).unwrap_or_default();
        let end = text.rfind(['"', '\'']).unwrap_or_default() + 1;
        StringMap::new(text, start..end, value).file_offset(at)
    }

    #[test]
    fn a_plain_basic_string_maps_one_to_one() {
        let text = "when = \"a > 1\"";
        assert_eq!(map(text, "a > 1", 2), text.find('>').unwrap_or_default());
    }

    #[test]
    fn escapes_in_a_basic_string_are_skipped_over() {
        let text = r#"when = "s == \"x\" && \u00e9 >""#;
        let value = "s == \"x\" && é >";
        let gt = value.find('>').unwrap_or_default();
        assert_eq!(map(text, value, gt), text.rfind('>').unwrap_or_default());
    }

    #[test]
    fn a_literal_string_has_no_escapes() {
        let text = r"when = 'a\n > 1'";
        assert_eq!(map(text, r"a\n > 1", 4), text.find('>').unwrap_or_default());
    }

    #[test]
    fn a_multi_line_string_drops_its_first_newline() {
        let text = "when = '''\r\nx >\r\n 1'''";
        let value = "x >\n 1";
        assert_eq!(map(text, value, 0), text.find('x').unwrap_or_default());
        assert_eq!(map(text, value, 5), text.find('1').unwrap_or_default());
    }

    #[test]
    fn a_line_ending_backslash_swallows_the_following_whitespace() {
        let text = "when = \"\"\"\n  x > \\\n     1\"\"\"";
        let value = "  x > 1";
        assert_eq!(map(text, value, 6), text.find('1').unwrap_or_default());
    }

    #[test]
    fn the_end_of_the_value_maps_to_the_closing_quote() {
        let text = "when = \"a >\"";
        assert_eq!(map(text, "a >", 3), text.len() - 1);
    }

    #[test]
    fn a_value_that_does_not_match_the_token_maps_to_the_content_start() {
        let text = "when = \"a > 1\"";
        assert_eq!(map(text, "something else", 3), 8);
    }
}
