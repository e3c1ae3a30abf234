//! Receiving a message after `DATA`: finding its end, undoing dot-stuffing,
//! and making every line end CRLF. Pure; bytes in, a message out.
//!
//! The end of the data is `CRLF . CRLF` and nothing else (RFC 5321
//! §4.1.1.4): `LF . LF`, `LF . CRLF`, `CR . CRLF` and the like are content,
//! so nothing a client sends can end a message early here. What then goes
//! upstream must not end early there either, whatever the upstream thinks
//! a line end is:
//!
//! - a bare LF is turned into CRLF (it is a Unix line end that the client
//!   failed to convert; every receiver reads it as a line end), and the
//!   line after it is a line like any other (dot-stuffing applies);
//! - a bare CR makes the message refused ([`Received::bare_cr`]): no mail
//!   program writes one on purpose, receivers disagree about what it is,
//!   and it is the raw material of `CR . CR LF` smuggling.
//!
//! After this, the message holds only CRLF line ends, and the upstream
//! writer's dot-stuffing makes every `.` line content for any receiver.
//! docs/relay.md explains the choice.

use super::message::MAX_LINE_OCTETS;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the start of a line; `after_bare_lf` when the line before ended
    /// with a bare LF (so a `.` line here cannot end the data).
    LineStart {
        after_bare_lf: bool,
    },
    /// A `.` at the start of a line.
    Dot {
        after_bare_lf: bool,
    },
    /// `.` CR at the start of a line.
    DotCr {
        after_bare_lf: bool,
    },
    InLine,
    /// A CR inside a line: a line end if LF follows.
    Cr,
}

/// What the receiver found in the message, besides its content.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Bare LFs turned into CRLF.
    pub bare_lf: usize,
    /// Whether a CR not followed by LF was seen.
    pub bare_cr: bool,
    /// Whether a line was longer than SMTP allows.
    pub line_too_long: bool,
    /// Whether the message grew past the size limit (its content was
    /// dropped from there on).
    pub too_big: bool,
}

/// The receiver of one message.
#[derive(Debug)]
pub struct DataReceiver {
    state: State,
    message: Vec<u8>,
    max_bytes: usize,
    line_length: usize,
    /// Bytes read from the client, dot-stuffing included.
    pub bytes_read: usize,
    pub found: Received,
}

impl DataReceiver {
    /// A receiver for at most `max_bytes`; `declared` is the size the client
    /// announced, if any, to allocate once.
    pub fn new(max_bytes: usize, declared: Option<u64>) -> Self {
        let expected = declared
            .and_then(|size| usize::try_from(size).ok())
            .unwrap_or(16 * 1024);
        Self {
            state: State::LineStart {
                after_bare_lf: false,
            },
            message: Vec::with_capacity(max_bytes.min(expected)),
            max_bytes,
            line_length: 0,
            bytes_read: 0,
            found: Received::default(),
        }
    }

    /// The message received so far.
    pub fn len(&self) -> usize {
        self.message.len()
    }

    pub fn is_empty(&self) -> bool {
        self.message.is_empty()
    }

    /// Stops storing content (the message is refused anyway); the end of
    /// the data is still looked for.
    pub fn discard(&mut self) {
        self.found.too_big = true;
        self.message = Vec::new();
    }

    /// The message, once [`Self::feed`] said it is complete.
    pub fn into_message(self) -> (Vec<u8>, Received) {
        (self.message, self.found)
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.found.too_big {
            return;
        }
        if self.message.len() + bytes.len() > self.max_bytes {
            self.discard();
            return;
        }
        self.message.extend_from_slice(bytes);
    }

    fn line_content(&mut self, count: usize) {
        self.line_length += count;
        if self.line_length > MAX_LINE_OCTETS {
            self.found.line_too_long = true;
        }
    }

    fn line_end(&mut self) {
        self.push(b"\r\n");
        self.line_length = 0;
    }

    /// Consumes `input` up to the end of the data. Returns how many bytes
    /// were used and whether the message is complete; bytes after the end
    /// belong to the next command.
    pub fn feed(&mut self, input: &[u8]) -> (usize, bool) {
        let mut index = 0;
        while index < input.len() {
            match self.state {
                State::InLine => {
                    // The common case: copy up to the next CR or LF at once.
                    let rest = &input[index..];
                    let run = memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
                    if run > 0 {
                        self.line_content(run);
                        self.push(&rest[..run]);
                        index += run;
                        continue;
                    }
                    let byte = input[index];
                    index += 1;
                    if byte == b'\r' {
                        self.state = State::Cr;
                    } else {
                        self.bare_lf();
                    }
                }
                State::LineStart { after_bare_lf } => {
                    let byte = input[index];
                    index += 1;
                    match byte {
                        b'.' => self.state = State::Dot { after_bare_lf },
                        b'\r' => self.state = State::Cr,
                        b'\n' => self.bare_lf(),
                        other => {
                            self.line_content(1);
                            self.push(&[other]);
                            self.state = State::InLine;
                        }
                    }
                }
                State::Dot { after_bare_lf } => match input[index] {
                    b'\r' => {
                        index += 1;
                        self.state = State::DotCr { after_bare_lf };
                    }
                    b'\n' => {
                        // A line of one `.` ended by a bare LF: content.
                        index += 1;
                        self.line_content(1);
                        self.push(b".");
                        self.bare_lf();
                    }
                    _ => {
                        // Dot-stuffing: the first `.` of a longer line goes.
                        self.line_content(1);
                        self.state = State::InLine;
                    }
                },
                State::DotCr { after_bare_lf } => {
                    if input[index] == b'\n' {
                        index += 1;
                        if !after_bare_lf {
                            return (self.consumed(index), true);
                        }
                        // `LF . CRLF`: a line of one `.`, content.
                        self.line_content(1);
                        self.push(b".");
                        self.line_end();
                        self.state = State::LineStart {
                            after_bare_lf: false,
                        };
                    } else {
                        // `.` then a bare CR: the dot was stuffing.
                        self.found.bare_cr = true;
                        self.line_content(2);
                        self.push(b"\r");
                        self.state = State::InLine;
                    }
                }
                State::Cr => match input[index] {
                    b'\n' => {
                        index += 1;
                        self.line_end();
                        self.state = State::LineStart {
                            after_bare_lf: false,
                        };
                    }
                    _ => {
                        // The CR before this byte was bare; this byte is
                        // read again in the line.
                        self.found.bare_cr = true;
                        self.line_content(1);
                        self.push(b"\r");
                        self.state = State::InLine;
                    }
                },
            }
        }
        (self.consumed(index), false)
    }

    fn consumed(&mut self, count: usize) -> usize {
        self.bytes_read += count;
        count
    }

    fn bare_lf(&mut self) {
        self.found.bare_lf += 1;
        self.line_end();
        self.state = State::LineStart {
            after_bare_lf: true,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in chunks of `chunk` bytes; returns the message, what
    /// was found, and what followed the end.
    fn receive(input: &[u8], chunk: usize) -> Option<(Vec<u8>, Received, Vec<u8>)> {
        let mut receiver = DataReceiver::new(1 << 20, None);
        let mut offset = 0;
        while offset < input.len() {
            let end = (offset + chunk).min(input.len());
            let (used, done) = receiver.feed(&input[offset..end]);
            offset += used;
            if done {
                let (message, found) = receiver.into_message();
                return Some((message, found, input[offset..].to_vec()));
            }
            assert_eq!(offset, end, "a chunk was not consumed whole");
        }
        None
    }

    fn every_chunking(input: &[u8]) -> Option<(Vec<u8>, Received, Vec<u8>)> {
        let whole = receive(input, input.len().max(1));
        for chunk in [1, 2, 3, 7] {
            assert_eq!(receive(input, chunk), whole, "chunks of {chunk}");
        }
        whole
    }

    #[test]
    fn a_message_ends_at_crlf_dot_crlf_and_is_unstuffed() {
        let (message, found, rest) =
            every_chunking(b"Subject: x\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n").unwrap();
        assert_eq!(message, b"Subject: x\r\n\r\n.leading dot\r\n");
        assert_eq!(found, Received::default());
        assert_eq!(rest, b"QUIT\r\n");
    }

    #[test]
    fn an_empty_message_ends_at_once() {
        let (message, _, rest) = every_chunking(b".\r\nNOOP\r\n").unwrap();
        assert!(message.is_empty());
        assert_eq!(rest, b"NOOP\r\n");
    }

    #[test]
    fn lf_only_lines_are_made_crlf_and_their_dots_end_nothing() {
        let (message, found, rest) =
            every_chunking(b"Subject: x\n\nline\n.\nafter\n..stuffed\n.\r\nmore\r\n.\r\n").unwrap();
        assert_eq!(
            message,
            b"Subject: x\r\n\r\nline\r\n.\r\nafter\r\n.stuffed\r\n.\r\nmore\r\n".to_vec()
        );
        assert_eq!(found.bare_lf, 6);
        assert!(!found.bare_cr);
        assert!(rest.is_empty());
    }

    #[test]
    fn a_bare_cr_is_found_and_never_ends_the_data() {
        for input in [
            &b"a\r.\r\nb\r\n.\r\n"[..],
            b"a\r\n.\rb\r\n.\r\n",
            b"a\rb\r\n.\r\n",
            b"a\r\r\n.\r\n",
        ] {
            let (_, found, rest) = every_chunking(input).unwrap();
            assert!(found.bare_cr, "{input:?}");
            assert!(rest.is_empty(), "{input:?} ended early");
        }
    }

    #[test]
    fn no_smuggling_sequence_ends_the_data() {
        // Every way a line end and a dot can be written, but the real one,
        // followed by a command: all of it is content.
        let ends: [&[u8]; 3] = [b"\r\n", b"\n", b"\r"];
        for before in ends {
            for after in ends {
                if before == b"\r\n" && after == b"\r\n" {
                    continue;
                }
                let mut input = b"Subject: s\r\n\r\nbody".to_vec();
                input.extend_from_slice(before);
                input.push(b'.');
                input.extend_from_slice(after);
                input.extend_from_slice(b"MAIL FROM:<x@y.test>\r\n.\r\n");
                let (message, _, rest) = every_chunking(&input).unwrap();
                assert!(rest.is_empty(), "{input:?} ended early");
                assert!(
                    message.windows(4).any(|w| w == b"MAIL"),
                    "{input:?} lost content"
                );
                assert!(
                    !message.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
                    "{input:?} left a bare LF"
                );
            }
        }
    }

    #[test]
    fn limits_are_found_while_reading() {
        let long = format!("{}\r\n.\r\n", "a".repeat(MAX_LINE_OCTETS + 1));
        assert!(every_chunking(long.as_bytes()).unwrap().1.line_too_long);
        let fits = format!("{}\r\n.\r\n", "a".repeat(MAX_LINE_OCTETS));
        assert!(!every_chunking(fits.as_bytes()).unwrap().1.line_too_long);

        let mut receiver = DataReceiver::new(10, None);
        assert_eq!(receiver.feed(b"0123456789abc\r\n"), (15, false));
        assert!(receiver.found.too_big);
        assert!(receiver.is_empty());
        assert_eq!(receiver.feed(b".\r\n"), (3, true));
    }
}
