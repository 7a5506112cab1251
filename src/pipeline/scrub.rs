//! Our token out of every answer the app sees: WeChat never sends it back,
//! but an echoing or misbehaving upstream (or one an attacker stands up
//! behind `upstream.url`) might, in a header, a buffered body, or a body
//! streamed through in pieces.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;

use crate::lease::Lease;

/// Logs a header removed for carrying the token: by name, unless the name
/// is what carries it.
pub(crate) fn removed(token: &Lease, name: &[u8]) {
    match name_carries(token, name) {
        false => {
            tracing::warn!(header = %String::from_utf8_lossy(name), "an upstream answer header carried our token; removed")
        }
        true => tracing::warn!("an upstream answer header name carried our token; removed"),
    }
}

/// Whether a header (name or value) holds the token.
pub(crate) fn carries(token: &Lease, name: &[u8], value: &[u8]) -> bool {
    token.find_in(value).is_some() || name_carries(token, name)
}

/// Whether a header name holds the token, in any case (names are
/// case-insensitive and may be sent as written). Names are shorter than a
/// token: nothing is compared, or copied, for any real one.
fn name_carries(token: &Lease, name: &[u8]) -> bool {
    let t = token.value.as_bytes();
    name.len() >= t.len() && name.windows(t.len()).any(|w| w.eq_ignore_ascii_case(t))
}

/// A buffered answer with our token masked wherever it appears: itself
/// when clean (the usual case).
pub(crate) fn scrubbed<'a>(answer: &'a [u8], token: Option<&Lease>) -> Cow<'a, [u8]> {
    let Some(t) = token else {
        return answer.into();
    };
    let Some(first) = t.find_in(answer) else {
        return answer.into();
    };
    tracing::warn!("an upstream answer carried our token; masked");
    let mut out = Vec::with_capacity(answer.len());
    let mut rest = answer;
    let mut at = Some(first);
    while let Some(span) = at {
        out.extend_from_slice(&rest[..span.start]);
        out.extend_from_slice(b"***");
        rest = &rest[span.end..];
        at = t.find_in(rest);
    }
    out.extend_from_slice(rest);
    out.into()
}

/// Masks our token in an answer that goes to the app piece by piece (over
/// the buffered limit, media): a token split across pieces, plain or
/// percent-encoded (`%54OK…`), is caught by holding back a piece's tail
/// while it could begin a spelling of the token. The
/// mask keeps the length (a `*` per byte), so a declared `Content-Length`
/// stays true. A piece with neither the token nor such a tail (every real
/// one: a token is 100+ random characters) goes on as it is, uncopied.
pub(crate) struct Scrubber {
    token: Option<Arc<Lease>>,
    /// The last piece's tail that could begin the token.
    held: Vec<u8>,
    warned: bool,
}

impl Scrubber {
    pub fn new(token: Option<Arc<Lease>>) -> Self {
        Scrubber {
            token: token.filter(|t| !t.value.is_empty()),
            held: Vec::new(),
            warned: false,
        }
    }

    /// The token it masks.
    pub fn token(&self) -> Option<Arc<Lease>> {
        self.token.clone()
    }

    /// What can go to the app now of what was held and `piece`.
    pub fn piece(&mut self, piece: Bytes) -> Bytes {
        let Some(t) = self.token.as_ref().map(|t| t.value.as_bytes()) else {
            return piece;
        };
        if self.held.is_empty() && crate::secret::find_spelled(&piece, t).is_none() {
            return match crate::secret::spelled_start(&piece, t) {
                None => piece,
                Some(p) => {
                    self.held.extend_from_slice(&piece[p..]);
                    piece.slice(..p)
                }
            };
        }
        let mut all = std::mem::take(&mut self.held);
        all.extend_from_slice(&piece);
        let mut from = 0;
        while let Some(span) = crate::secret::find_spelled(&all[from..], t) {
            if !self.warned {
                tracing::warn!("an upstream answer carried our token; masked");
                self.warned = true;
            }
            all[from + span.start..from + span.end].fill(b'*');
            from += span.end;
        }
        if let Some(p) = crate::secret::spelled_start(&all, t) {
            self.held = all.split_off(p);
        }
        Bytes::from(all)
    }

    /// The held tail at the answer's end: it is not a whole spelling of the
    /// token, so it goes as it is.
    pub fn finish(self) -> Bytes {
        Bytes::from(self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(value: &str) -> std::sync::Arc<Lease> {
        let cell = crate::lease::LeaseCell::default();
        cell.store_for_bench(value, std::time::Duration::from_secs(7200));
        cell.valid().unwrap()
    }

    /// Every split of an answer into pieces: the token never comes out
    /// whole, the length never changes, nothing else changes.
    #[test]
    fn a_token_split_across_pieces_is_masked() {
        let t = lease("TOKEN_abc-123");
        let answer = b"{\"url\":\"x?access_token=TOKEN_abc-123&TOKEN_abTOKEN_abc-123&t=%54OKEN%5fabc%2D123\"}TOKEN_a%";
        let expect = b"{\"url\":\"x?access_token=*************&TOKEN_ab*************&t=*******************\"}TOKEN_a%";
        for a in 0..answer.len() {
            for b in a..answer.len() {
                let mut s = Scrubber::new(Some(t.clone()));
                let mut out = Vec::new();
                for piece in [&answer[..a], &answer[a..b], &answer[b..]] {
                    out.extend_from_slice(&s.piece(Bytes::copy_from_slice(piece)));
                }
                out.extend_from_slice(&s.finish());
                assert_eq!(out, expect, "split at {a}, {b}");
            }
        }
    }

    #[test]
    fn a_buffered_answer_has_every_spelling_masked() {
        let t = lease("TOKEN_abc-123");
        let answer = b"a=TOKEN_abc-123&b=%54OKEN_abc%2d123&c=TOKEN%5Fabc-12";
        assert_eq!(
            &*scrubbed(answer, Some(&t)),
            b"a=***&b=***&c=TOKEN%5Fabc-12".as_slice()
        );
    }

    #[test]
    fn a_clean_piece_goes_uncopied() {
        let t = lease("TOKEN_abc-123");
        let mut s = Scrubber::new(Some(t.clone()));
        let piece = Bytes::from_static(b"{\"errcode\":0,\"data\":\"...\"}");
        let out = s.piece(piece.clone());
        assert_eq!(out.as_ptr(), piece.as_ptr());
        assert!(s.finish().is_empty());
        let mut none = Scrubber::new(None);
        assert_eq!(none.piece(piece.clone()), piece);
    }

    #[test]
    fn headers_carrying_the_token_are_found() {
        let t = lease("TOKEN_abc-123");
        let headers: [(&[u8], &[u8]); 4] = [
            (b"Location", b"https://x/?access_token=TOKEN_abc-123"),
            (b"X-TOKEN_abc-123", b"1"),
            (b"Link", b"<https://x/?t=%54%4fKEN_abc-123>"),
            (b"Content-Type", b"application/json"),
        ];
        let kept: Vec<_> = headers
            .iter()
            .filter(|(n, v)| !carries(&t, n, v))
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(kept, [b"Content-Type".as_slice()]);
    }
}
