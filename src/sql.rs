//! SQL text split into statements the way PostgreSQL's parser and psql see them:
//! semicolons inside strings, quoted identifiers, dollar quotes, comments and the
//! `BEGIN ATOMIC ... END` bodies of SQL-standard routines do not end a statement.

/// One statement of a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Statement<'a> {
    /// From its first character that is not blank or a comment through its `;`.
    pub(crate) text: &'a str,
    /// Byte offset of `text` in the whole text.
    pub(crate) offset: usize,
    /// 1-based line of its first character.
    pub(crate) line: usize,
}

impl Statement<'_> {
    /// Its leading words, upper-cased (comments skipped, quoted identifiers
    /// excluded), for classifying it.
    pub(crate) fn words(&self, n: usize) -> Vec<String> {
        let mut words = Vec::new();
        let mut lexer = Lexer::new(self.text);
        while words.len() < n {
            match lexer.next_token() {
                Some(Token::Word(w)) => words.push(w.to_ascii_uppercase()),
                Some(Token::Other) => {}
                Some(Token::Semicolon) | None => break,
            }
        }
        words
    }

    /// The statement for a message: its text on one line, shortened.
    pub(crate) fn excerpt(&self) -> String {
        const MAX: usize = 160;
        let flat = self.text.split_whitespace().collect::<Vec<_>>().join(" ");
        if flat.chars().count() <= MAX {
            flat
        } else {
            let cut: String = flat.chars().take(MAX).collect();
            format!("{cut}...")
        }
    }
}

/// Splits `sql` into its statements; blanks and comments between them are dropped,
/// and a last statement without `;` counts.
pub(crate) fn split(sql: &str) -> Vec<Statement<'_>> {
    let mut statements = Vec::new();
    let mut lexer = Lexer::new(sql);
    let mut start: Option<usize> = None;
    let mut words = 0usize;
    let mut head: Vec<String> = Vec::new();
    let mut depth = 0usize;
    let statement = |start: usize, end: usize| Statement {
        text: &sql[start..end],
        offset: start,
        line: 1 + sql[..start].bytes().filter(|&b| b == b'\n').count(),
    };
    loop {
        let before = lexer.skip_blanks();
        let Some(token) = lexer.next_token() else {
            break;
        };
        if start.is_none() && matches!(token, Token::Semicolon) {
            // An empty statement.
            continue;
        }
        let begun = *start.get_or_insert(before);
        match token {
            Token::Semicolon if depth == 0 => {
                statements.push(statement(begun, lexer.pos));
                start = None;
                words = 0;
                head.clear();
            }
            Token::Word(word) => {
                words += 1;
                if head.len() < 4 {
                    head.push(word.to_ascii_uppercase());
                }
                // A SQL-standard routine body (`BEGIN ATOMIC ... END`) holds
                // semicolons; psql counts BEGIN and CASE against END the same way.
                if is_routine(&head) {
                    if (word.eq_ignore_ascii_case("begin") || word.eq_ignore_ascii_case("case"))
                        && words > 1
                    {
                        depth += 1;
                    } else if word.eq_ignore_ascii_case("end") && depth > 0 {
                        depth -= 1;
                    }
                }
            }
            Token::Semicolon | Token::Other => {}
        }
    }
    if let Some(begun) = start {
        statements.push(statement(begun, sql.len()));
    }
    statements
}

/// Whether a statement starting with `head` creates a function or procedure.
fn is_routine(head: &[String]) -> bool {
    let routine = |w: Option<&String>| w.is_some_and(|w| w == "FUNCTION" || w == "PROCEDURE");
    head.first().is_some_and(|w| w == "CREATE")
        && (routine(head.get(1))
            || (head.get(1).is_some_and(|w| w == "OR")
                && head.get(2).is_some_and(|w| w == "REPLACE")
                && routine(head.get(3))))
}

enum Token<'a> {
    /// A bare word (keyword or identifier).
    Word(&'a str),
    Semicolon,
    /// A string, quoted identifier, number, operator or punctuation.
    Other,
}

struct Lexer<'a> {
    sql: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

fn word_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn word_char(b: u8) -> bool {
    word_start(b) || b.is_ascii_digit() || b == b'$'
}

impl<'a> Lexer<'a> {
    fn new(sql: &'a str) -> Self {
        Lexer {
            sql,
            bytes: sql.as_bytes(),
            pos: 0,
        }
    }

    fn peek(&self, ahead: usize) -> Option<u8> {
        self.bytes.get(self.pos + ahead).copied()
    }

    /// Skips blanks and comments; returns where the next token starts.
    fn skip_blanks(&mut self) -> usize {
        loop {
            match (self.peek(0), self.peek(1)) {
                (Some(b), _) if b.is_ascii_whitespace() => self.pos += 1,
                (Some(b'-'), Some(b'-')) => {
                    while self.peek(0).is_some_and(|b| b != b'\n') {
                        self.pos += 1;
                    }
                }
                (Some(b'/'), Some(b'*')) => {
                    // Block comments nest.
                    self.pos += 2;
                    let mut nesting = 1;
                    while nesting > 0 {
                        match (self.peek(0), self.peek(1)) {
                            (None, _) => break,
                            (Some(b'/'), Some(b'*')) => {
                                nesting += 1;
                                self.pos += 2;
                            }
                            (Some(b'*'), Some(b'/')) => {
                                nesting -= 1;
                                self.pos += 2;
                            }
                            _ => self.pos += 1,
                        }
                    }
                }
                _ => return self.pos,
            }
        }
    }

    fn next_token(&mut self) -> Option<Token<'a>> {
        self.skip_blanks();
        let b = self.peek(0)?;
        match b {
            b';' => {
                self.pos += 1;
                Some(Token::Semicolon)
            }
            b'\'' => {
                self.pos += 1;
                self.quoted(b'\'', false);
                Some(Token::Other)
            }
            b'"' => {
                self.pos += 1;
                self.quoted(b'"', false);
                Some(Token::Other)
            }
            b'$' => {
                self.dollar();
                Some(Token::Other)
            }
            b if word_start(b) => {
                let start = self.pos;
                while self.peek(0).is_some_and(word_char) {
                    self.pos += 1;
                }
                let word = &self.sql[start..self.pos];
                if self.peek(0) == Some(b'\'') {
                    // E'...' strings take backslash escapes; B'', X'', N'' do not.
                    self.pos += 1;
                    self.quoted(b'\'', word.eq_ignore_ascii_case("e"));
                    return Some(Token::Other);
                }
                Some(Token::Word(word))
            }
            _ => {
                // Operators, numbers, punctuation; whole UTF-8 characters.
                self.pos += self.sql[self.pos..]
                    .chars()
                    .next()
                    .map_or(1, char::len_utf8);
                Some(Token::Other)
            }
        }
    }

    /// Skips to after the closing `quote` (doubled quotes stay inside).
    fn quoted(&mut self, quote: u8, backslash: bool) {
        while let Some(b) = self.peek(0) {
            self.pos += 1;
            if backslash && b == b'\\' {
                self.pos += 1;
            } else if b == quote {
                if self.peek(0) == Some(quote) {
                    self.pos += 1;
                } else {
                    return;
                }
            }
        }
        self.pos = self.pos.min(self.bytes.len());
    }

    /// A dollar-quoted string (`$$...$$`, `$tag$...$tag$`), or a lone `$` such as a
    /// parameter's (`$1`).
    fn dollar(&mut self) {
        let start = self.pos;
        let mut end = start + 1;
        if self.bytes.get(end).is_some_and(|&b| word_start(b)) {
            while self
                .bytes
                .get(end)
                .is_some_and(|&b| word_start(b) || b.is_ascii_digit())
            {
                end += 1;
            }
        }
        if self.bytes.get(end) != Some(&b'$') {
            self.pos += 1;
            return;
        }
        let tag = &self.sql[start..=end];
        self.pos = match self.sql[end + 1..].find(tag) {
            Some(i) => end + 1 + i + tag.len(),
            None => self.bytes.len(),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(sql: &str) -> Vec<&str> {
        split(sql).iter().map(|s| s.text).collect()
    }

    #[test]
    fn statements_end_at_semicolons_outside_quotes_and_comments() {
        assert_eq!(
            texts("create table a (x int);\n\ninsert into a values (1) ;  "),
            ["create table a (x int);", "insert into a values (1) ;"]
        );
        assert_eq!(
            texts("select 'a;b', \"c;d\", E'it\\'s;', 'x'';y' ; select 1"),
            ["select 'a;b', \"c;d\", E'it\\'s;', 'x'';y' ;", "select 1"]
        );
        // Standard strings keep backslashes: the string ends at the second quote.
        assert_eq!(
            texts("select 'a\\'; select 2;"),
            ["select 'a\\';", "select 2;"]
        );
        assert_eq!(
            texts("-- a; comment\nselect 1; /* a /* nested; */ comment; */ select 2;"),
            ["select 1;", "select 2;"]
        );
        assert_eq!(texts(";;  -- nothing\n/* here */"), Vec::<&str>::new());
    }

    #[test]
    fn dollar_quotes_and_parameters() {
        let f = "create function f() returns int language plpgsql as $body$\nbegin\n  perform 1; return $1;\nend;\n$body$;";
        assert_eq!(
            texts(&format!("{f}\nselect $$;$$, $x$ $$ ; $x$;")),
            [f, "select $$;$$, $x$ $$ ; $x$;"]
        );
        assert_eq!(
            texts("select $1; select a$b; select 3"),
            ["select $1;", "select a$b;", "select 3"]
        );
    }

    #[test]
    fn sql_standard_routine_bodies_hold_semicolons() {
        let f = "CREATE OR REPLACE FUNCTION f(x int) RETURNS int LANGUAGE sql\nBEGIN ATOMIC\n  SELECT CASE WHEN x > 0 THEN 1 ELSE 0 END;\n  SELECT 2;\nEND;";
        assert_eq!(texts(&format!("{f}\nselect 1;")), [f, "select 1;"]);
        // A transaction's BEGIN and END are statements of their own.
        assert_eq!(
            texts("BEGIN; select case when true then 1 end; END;"),
            ["BEGIN;", "select case when true then 1 end;", "END;"]
        );
    }

    #[test]
    fn lines_offsets_words_and_excerpts() {
        let sql = "-- header\n\ncreate table a();\n  /* c */ CREATE /* x */ extension\nhstore;";
        let s = split(sql);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].line, s[1].line), (3, 4));
        assert_eq!(&sql[s[1].offset..], s[1].text);
        assert_eq!(s[1].words(3), ["CREATE", "EXTENSION", "HSTORE"]);
        assert_eq!(s[1].excerpt(), "CREATE /* x */ extension hstore;");
        let long = format!("select '{}';", "x".repeat(500));
        assert!(split(&long)[0].excerpt().ends_with("..."));
        // Unterminated quotes end the text, never panic.
        for bad in [
            "select 'abc",
            "select \"x",
            "select $a$ b",
            "select e'\\",
            "select e'\\é",
        ] {
            assert_eq!(split(bad).len(), 1, "{bad}");
        }
        assert!(split("/* open").is_empty());
    }
}
