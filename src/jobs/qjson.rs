//! JSON text exactly as QEMU's `qobject_to_json_pretty` writes it (qobject/qjson.c), for
//! serde_json: 4-space indents, empty arrays and objects still broken over two lines, and
//! every character outside printable ASCII written as an upper-case `\uXXXX` escape
//! (surrogate pairs beyond the BMP).

use std::io::{self, Write};

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter, Serializer};

/// `value` as QEMU prints it.
pub(crate) fn to_string<T: Serialize + ?Sized>(value: &T) -> String {
    let mut out = Vec::new();
    let mut ser = Serializer::with_formatter(&mut out, QemuFormatter { depth: 0 });
    // Serializing the crate's own types into memory cannot fail: their fields are strings,
    // numbers, booleans and sequences, and a Vec never refuses bytes.
    if value.serialize(&mut ser).is_err() {
        return String::new();
    }
    // Everything written is ASCII (see `write_string_fragment`).
    String::from_utf8(out).unwrap_or_default()
}

struct QemuFormatter {
    depth: usize,
}

impl QemuFormatter {
    fn newline<W: ?Sized + Write>(&self, w: &mut W) -> io::Result<()> {
        w.write_all(b"\n")?;
        for _ in 0..self.depth {
            w.write_all(b"    ")?;
        }
        Ok(())
    }

    fn element<W: ?Sized + Write>(&self, w: &mut W, first: bool) -> io::Result<()> {
        if !first {
            w.write_all(b",")?;
        }
        self.newline(w)
    }

    fn close<W: ?Sized + Write>(&mut self, w: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.depth = self.depth.saturating_sub(1);
        self.newline(w)?;
        w.write_all(bracket)
    }
}

impl Formatter for QemuFormatter {
    fn begin_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.depth = self.depth.saturating_add(1);
        w.write_all(b"[")
    }

    fn end_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"]")
    }

    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.element(w, first)
    }

    fn end_array_value<W: ?Sized + Write>(&mut self, _w: &mut W) -> io::Result<()> {
        Ok(())
    }

    fn begin_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.depth = self.depth.saturating_add(1);
        w.write_all(b"{")
    }

    fn end_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"}")
    }

    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.element(w, first)
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn end_object_value<W: ?Sized + Write>(&mut self, _w: &mut W) -> io::Result<()> {
        Ok(())
    }

    /// serde_json passes everything but `"`, `\` and control characters here: QEMU escapes
    /// DEL and every non-ASCII character too.
    fn write_string_fragment<W: ?Sized + Write>(&mut self, w: &mut W, s: &str) -> io::Result<()> {
        for c in s.chars() {
            if c.is_ascii() && c != '\u{7f}' {
                w.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write!(w, "\\u{unit:04X}")?;
                }
            }
        }
        Ok(())
    }

    fn write_char_escape<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        escape: CharEscape,
    ) -> io::Result<()> {
        match escape {
            CharEscape::Quote => w.write_all(b"\\\""),
            CharEscape::ReverseSolidus => w.write_all(b"\\\\"),
            CharEscape::Solidus => w.write_all(b"/"),
            CharEscape::Backspace => w.write_all(b"\\b"),
            CharEscape::FormFeed => w.write_all(b"\\f"),
            CharEscape::LineFeed => w.write_all(b"\\n"),
            CharEscape::CarriageReturn => w.write_all(b"\\r"),
            CharEscape::Tab => w.write_all(b"\\t"),
            CharEscape::AsciiControl(byte) => write!(w, "\\u{byte:04X}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_escapes_are_qemus() {
        #[derive(Serialize)]
        struct T {
            empty: Vec<u8>,
            list: Vec<u8>,
            name: &'static str,
            nested: Nested,
        }
        #[derive(Serialize)]
        struct Nested {}
        let text = to_string(&T {
            empty: vec![],
            list: vec![1, 2],
            name: "a\"\\/\n\u{1}\u{7f}é😀",
            nested: Nested {},
        });
        let want =
            "{\n    \"empty\": [\n    ],\n    \"list\": [\n        1,\n        2\n    ],\n    \
                    \"name\": \"a\\\"\\\\/\\n\\u0001\\u007F\\u00E9\\uD83D\\uDE00\",\n    \
                    \"nested\": {\n    }\n}";
        assert_eq!(text, want);
    }
}
