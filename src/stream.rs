//! The byte stream of a pooled connection, which turns the transactions the code under
//! test opens inside a test's transaction into savepoints.
//!
//! tokio-postgres's `Client::transaction()` (and its `TransactionBuilder`, and
//! deadpool's wrapper of both) sends `START TRANSACTION`, then `COMMIT` or `ROLLBACK`,
//! as simple queries. Inside a test's transaction, PostgreSQL would take that `COMMIT`
//! as the end of the test's own transaction. This stream sees each simple query the
//! client writes and, while the connection holds a test's transaction, rewrites those
//! three into `SAVEPOINT`, `RELEASE SAVEPOINT` and `ROLLBACK TO SAVEPOINT`, as sqlx's
//! transaction manager does by itself. So a `&mut Client` can be handed to code that
//! opens its own transactions, and the test's transaction is kept.
//!
//! It knows when a test's transaction begins and ends by the queries pgfixture itself
//! sends ([`crate::driver::BEGIN`], [`crate::driver::END`]); connections of a worker
//! pool never send them and pass through unchanged. Only whole simple queries are
//! rewritten: a `COMMIT` inside a batch of several statements, or through the extended
//! protocol (`execute("COMMIT", &[])`), is a real commit, which pgfixture detects when
//! the test ends.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes buffered towards the server before a write waits for the server to take some.
const HIGH_WATER: usize = 256 * 1024;
/// Protocol codes of the untagged requests that come before the startup message.
const SSL_REQUEST: u32 = 80877103;
const GSSENC_REQUEST: u32 = 80877104;

/// A connection's stream with the rewriting described in the module's documentation.
#[derive(Debug)]
pub(crate) struct TestStream<S> {
    inner: S,
    /// Untagged messages (the startup phase) come first.
    started: bool,
    /// Written by the client, not yet a whole message.
    input: Vec<u8>,
    /// Whole messages, rewritten, not yet taken by `inner`.
    output: Vec<u8>,
    written: usize,
    rewriter: Rewriter,
}

impl<S> TestStream<S> {
    pub(crate) fn new(inner: S) -> Self {
        TestStream {
            inner,
            started: false,
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            rewriter: Rewriter::default(),
        }
    }

    /// Moves the whole messages of `input` to `output`, rewriting queries.
    fn take_messages(&mut self) {
        let mut at = 0;
        loop {
            let rest = &self.input[at..];
            if !self.started {
                let Some(len) = rest.get(..4).map(|b| be_u32(b) as usize) else {
                    break;
                };
                if len < 8 {
                    // A short length cannot be a request: passed on for the server to
                    // refuse, and nothing is rewritten from here.
                    self.output.extend_from_slice(rest);
                    self.started = true;
                    at = self.input.len();
                    break;
                }
                if rest.len() < len {
                    break;
                }
                let code = be_u32(&rest[4..8]);
                self.started = code != SSL_REQUEST && code != GSSENC_REQUEST;
                self.output.extend_from_slice(&rest[..len]);
                at += len;
                continue;
            }
            let Some(len) = rest.get(1..5).map(|b| be_u32(b) as usize) else {
                break;
            };
            if len < 4 {
                // Not the protocol: pass everything on untouched from here.
                self.output.extend_from_slice(rest);
                at = self.input.len();
                break;
            }
            if rest.len() < 1 + len {
                break;
            }
            let message = &rest[..1 + len];
            let rewritten = (message[0] == b'Q')
                .then(|| message[5..].strip_suffix(&[0]))
                .flatten()
                .and_then(|query| std::str::from_utf8(query).ok())
                .and_then(|query| self.rewriter.rewrite(query));
            match rewritten {
                Some(query) => {
                    self.output.push(b'Q');
                    let len = u32::try_from(4 + query.len() + 1).unwrap_or(u32::MAX);
                    self.output.extend_from_slice(&len.to_be_bytes());
                    self.output.extend_from_slice(query.as_bytes());
                    self.output.push(0);
                }
                None => self.output.extend_from_slice(message),
            }
            at += 1 + len;
        }
        self.input.drain(..at);
    }
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

impl<S: AsyncWrite + Unpin> TestStream<S> {
    /// Writes buffered output to `inner` until it is all taken or `inner` waits.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.output.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.output[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.output.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TestStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.output.len() - this.written >= HIGH_WATER {
            ready!(this.poll_drain(cx))?;
        }
        this.input.extend_from_slice(buf);
        this.take_messages();
        // Sent now if the socket takes it; else by the flush that follows every write.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TestStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// Which transaction commands of the code under test become savepoints.
#[derive(Debug, Default)]
struct Rewriter {
    /// The connection holds a test's transaction.
    in_test: bool,
    /// Transactions of the code under test, now savepoints, still open.
    depth: u32,
}

/// What a simple query is, as far as transactions go.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    /// `BEGIN` or `START TRANSACTION`, with its modes (isolation level, read only).
    Begin(String),
    Commit,
    Rollback,
    Other,
}

fn command(query: &str) -> Command {
    let query = query.trim().trim_end_matches(';').trim_end();
    if query.len() > 200 || query.contains(';') {
        return Command::Other;
    }
    let words: Vec<String> = query
        .split_whitespace()
        .map(str::to_ascii_uppercase)
        .collect();
    let word = |i: usize| words.get(i).map_or("", String::as_str);
    let tail = |from: usize| words.get(from..).unwrap_or_default().join(" ");
    // WORK or TRANSACTION may follow BEGIN, COMMIT, END, ROLLBACK and ABORT.
    let noise = |i: usize| usize::from(matches!(word(i), "WORK" | "TRANSACTION"));
    match word(0) {
        "BEGIN" => Command::Begin(tail(1 + noise(1))),
        "START" if word(1) == "TRANSACTION" => Command::Begin(tail(2)),
        "COMMIT" | "END"
            if tail(1 + noise(1)).is_empty() || tail(1 + noise(1)) == "AND NO CHAIN" =>
        {
            Command::Commit
        }
        "ROLLBACK" | "ABORT"
            if tail(1 + noise(1)).is_empty() || tail(1 + noise(1)) == "AND NO CHAIN" =>
        {
            Command::Rollback
        }
        _ => Command::Other,
    }
}

impl Rewriter {
    /// The query to send instead of `query`, if any.
    fn rewrite(&mut self, query: &str) -> Option<String> {
        if query.contains(crate::driver::BEGIN) {
            self.in_test = true;
            self.depth = 0;
            return None;
        }
        if query == crate::driver::END {
            self.in_test = false;
            self.depth = 0;
            return None;
        }
        if !self.in_test {
            return None;
        }
        match command(query) {
            Command::Begin(modes) => {
                self.depth += 1;
                let savepoint = format!("SAVEPOINT pgfixture_tx_{}", self.depth);
                Some(if modes.is_empty() {
                    savepoint
                } else {
                    // A savepoint has no isolation level of its own: the modes apply
                    // to the test's transaction, which PostgreSQL allows only before
                    // its first query (and says so otherwise).
                    format!("SET TRANSACTION {modes}; {savepoint}")
                })
            }
            Command::Commit if self.depth > 0 => {
                let name = format!("pgfixture_tx_{}", self.depth);
                self.depth -= 1;
                Some(format!("RELEASE SAVEPOINT {name}"))
            }
            Command::Rollback if self.depth > 0 => {
                let name = format!("pgfixture_tx_{}", self.depth);
                self.depth -= 1;
                Some(format!(
                    "ROLLBACK TO SAVEPOINT {name}; RELEASE SAVEPOINT {name}"
                ))
            }
            // At depth 0 a COMMIT is the test's own: passed on, detected at the end.
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{BEGIN, END};

    #[test]
    fn transaction_commands_are_recognised() {
        assert_eq!(command("BEGIN"), Command::Begin(String::new()));
        assert_eq!(command(" begin work ;"), Command::Begin(String::new()));
        assert_eq!(
            command("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY"),
            Command::Begin("ISOLATION LEVEL SERIALIZABLE, READ ONLY".into())
        );
        assert_eq!(
            command("begin transaction isolation level repeatable read"),
            Command::Begin("ISOLATION LEVEL REPEATABLE READ".into())
        );
        for commit in [
            "COMMIT",
            "commit;",
            "END",
            "COMMIT WORK",
            "end transaction",
            "COMMIT AND NO CHAIN",
        ] {
            assert_eq!(command(commit), Command::Commit, "{commit}");
        }
        for rollback in ["ROLLBACK", "abort", "ROLLBACK TRANSACTION;"] {
            assert_eq!(command(rollback), Command::Rollback, "{rollback}");
        }
        for other in [
            "COMMIT AND CHAIN",
            "ROLLBACK TO SAVEPOINT a",
            "BEGIN; INSERT INTO t VALUES (1); COMMIT",
            "SELECT 'BEGIN'",
            "COMMIT PREPARED 'x'",
        ] {
            assert_eq!(command(other), Command::Other, "{other}");
        }
    }

    #[test]
    fn only_a_test_transaction_turns_transactions_into_savepoints() {
        let mut r = Rewriter::default();
        // A worker pool's connection: nothing is rewritten.
        assert_eq!(r.rewrite("START TRANSACTION"), None);
        assert_eq!(r.rewrite("COMMIT"), None);
        assert_eq!(r.rewrite(BEGIN), None);
        assert_eq!(
            r.rewrite("START TRANSACTION").as_deref(),
            Some("SAVEPOINT pgfixture_tx_1")
        );
        assert_eq!(
            r.rewrite("BEGIN").as_deref(),
            Some("SAVEPOINT pgfixture_tx_2")
        );
        assert_eq!(
            r.rewrite("ROLLBACK").as_deref(),
            Some("ROLLBACK TO SAVEPOINT pgfixture_tx_2; RELEASE SAVEPOINT pgfixture_tx_2")
        );
        assert_eq!(
            r.rewrite("COMMIT").as_deref(),
            Some("RELEASE SAVEPOINT pgfixture_tx_1")
        );
        // The test's own COMMIT: passed on (and detected at the end).
        assert_eq!(r.rewrite("COMMIT"), None);
        assert_eq!(
            r.rewrite("START TRANSACTION ISOLATION LEVEL SERIALIZABLE")
                .as_deref(),
            Some("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; SAVEPOINT pgfixture_tx_1")
        );
        assert_eq!(r.rewrite(END), None);
        assert_eq!(r.rewrite("COMMIT"), None);
        // The first test of a nextest process begins inside the worker's check.
        assert_eq!(r.rewrite(&format!("SHOW x; {BEGIN}")), None);
        assert!(r.rewrite("BEGIN").is_some());
    }

    fn query(text: &str) -> Vec<u8> {
        let mut m = vec![b'Q'];
        m.extend_from_slice(&((4 + text.len() + 1) as u32).to_be_bytes());
        m.extend_from_slice(text.as_bytes());
        m.push(0);
        m
    }

    #[test]
    fn messages_split_across_writes_are_rewritten_whole() {
        let mut s = TestStream::new(());
        let body = b"user\0x\0\0";
        let mut startup = ((8 + body.len()) as u32).to_be_bytes().to_vec();
        startup.extend_from_slice(&196608u32.to_be_bytes());
        startup.extend_from_slice(body);
        let mut wire = startup.clone();
        wire.extend(query(BEGIN));
        wire.extend(query("START TRANSACTION"));
        wire.extend([b'S', 0, 0, 0, 4]); // a Sync: passed on
        wire.extend(query("COMMIT"));
        for chunk in wire.chunks(3) {
            s.input.extend_from_slice(chunk);
            s.take_messages();
        }
        assert!(s.input.is_empty());
        let mut expected = startup;
        expected.extend(query(BEGIN));
        expected.extend(query("SAVEPOINT pgfixture_tx_1"));
        expected.extend([b'S', 0, 0, 0, 4]);
        expected.extend(query("RELEASE SAVEPOINT pgfixture_tx_1"));
        assert_eq!(s.output, expected);
    }
}
