//! Log setup: `tracing` with `RUST_LOG`-style filters, JSON or pretty lines,
//! and a last line of defence: every line is scrubbed of `access_token`,
//! `secret` and `corpsecret` values before it is written, whoever logged it
//! (pingora's own `log` records are bridged into the same output).

use std::borrow::Cow;
use std::io::{IsTerminal, Write};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Quiet by default: our own info lines, pingora's warnings.
const DEFAULT_FILTER: &str = "info,pingora_core=warn,pingora_proxy=warn,pingora=warn";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

impl LogFormat {
    /// JSON for machines, pretty for a person at a terminal.
    pub fn auto() -> Self {
        if std::io::stdout().is_terminal() {
            LogFormat::Pretty
        } else {
            LogFormat::Json
        }
    }
}

/// h2's frame dumps (debug and below) print a GOAWAY's debug data: the
/// server's bytes, which an echoing upstream could fill with our token.
/// Capped at info whatever the filter asks (they are of no use to an
/// operator; our own lines name every HTTP/2 failure).
const H2_CAP: &str = "h2=info";

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
        .add_directive(H2_CAP.parse().expect("a valid directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Scrubbed);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().with_ansi(false).try_init(),
    };
}

/// Where a secret value starts, and the bytes that end it.
const MARKERS: &[(&str, &[u8])] = &[
    ("access_token=", b"& \t\r\n\"',;)\\]}"),
    ("secret=", b"& \t\r\n\"',;)\\]}"),
    ("\"access_token\":\"", b"\"\\"),
    ("\"secret\":\"", b"\"\\"),
    ("\\\"access_token\\\":\\\"", b"\"\\"),
    ("\\\"secret\\\":\\\"", b"\"\\"),
];

/// Masks every token and secret value in `line` (`corpsecret=` and
/// `appsecret=` end in `secret=` and are covered).
pub fn scrub(line: &str) -> Cow<'_, str> {
    if !MARKERS.iter().any(|(m, _)| line.contains(m)) {
        return Cow::Borrowed(line);
    }
    let mut out = line.to_string();
    for (marker, ends) in MARKERS {
        let mut from = 0;
        while let Some(at) = out[from..].find(marker) {
            let start = from + at + marker.len();
            let len = out.as_bytes()[start..]
                .iter()
                .position(|b| ends.contains(b))
                .unwrap_or(out.len() - start);
            let masked = if len == 0 || &out[start..start + len] == "***" {
                ""
            } else {
                "***"
            };
            if !masked.is_empty() {
                out.replace_range(start..start + len, masked);
            }
            from = start + if masked.is_empty() { len } else { masked.len() };
        }
    }
    Cow::Owned(out)
}

/// Writes scrubbed lines to stderr.
struct Scrubbed;

struct ScrubbedWriter;

impl Write for ScrubbedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(scrub(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for Scrubbed {
    type Writer = ScrubbedWriter;

    fn make_writer(&'a self) -> Self::Writer {
        ScrubbedWriter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubs_every_shape() {
        let cases = [
            (
                "GET /cgi-bin/x?a=1&access_token=TOK123&b=2",
                "GET /cgi-bin/x?a=1&access_token=***&b=2",
            ),
            (
                "/cgi-bin/token?grant_type=x&appid=wx1&secret=S3CR3T",
                "/cgi-bin/token?grant_type=x&appid=wx1&secret=***",
            ),
            (
                "gettoken?corpid=ww&corpsecret=CS",
                "gettoken?corpid=ww&corpsecret=***",
            ),
            (
                r#"{"access_token":"TOK","expires_in":7200}"#,
                r#"{"access_token":"***","expires_in":7200}"#,
            ),
            (
                r#"{"msg":"{\"secret\":\"S\"}"}"#,
                r#"{"msg":"{\"secret\":\"***\"}"}"#,
            ),
            (
                "uri: /x?access_token=T1 then /y?access_token=T2",
                "uri: /x?access_token=*** then /y?access_token=***",
            ),
            ("nothing here", "nothing here"),
            ("access_token=", "access_token="),
        ];
        for (input, want) in cases {
            assert_eq!(scrub(input), want, "{input}");
        }
    }
}
