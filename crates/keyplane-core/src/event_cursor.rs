//! Where an event watch stands: a position in each site's event log.
//!
//! Each site numbers its events in commit order (`site_seq`, no global sequence), so
//! a watch over several sites resumes from one position per site. The token is
//! opaque to clients: hex of a version byte, the scope (every site of the dealer, or
//! one site) and `(site, position)` pairs. A site absent from an all-sites token is
//! read from its start: it had no event when the watch began.

use std::collections::BTreeMap;
use uuid::Uuid;

const VERSION: u8 = 1;
const SCOPE_ALL: u8 = 0;
const SCOPE_SITE: u8 = 1;

/// A watch's position in each site's event log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WatchCursor {
    /// The one site watched, or None for every site of the dealer.
    pub site: Option<Uuid>,
    /// Last position delivered, per site (absent: nothing delivered).
    pub positions: BTreeMap<Uuid, i64>,
}

/// Why a resume token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    /// Not a token this server issued.
    #[error("resume_token is malformed: pass back an Event.resume_token unchanged")]
    Malformed,
    /// A one-site token used to watch every site.
    #[error(
        "resume_token is of a watch of sites/{0} only: resume it with parent sites/{0}, or start a sites/- watch without a token"
    )]
    OtherScope(Uuid),
}

impl WatchCursor {
    /// A cursor for a watch of `site` (None: every site), from these positions.
    pub fn new(site: Option<Uuid>, positions: impl IntoIterator<Item = (Uuid, i64)>) -> Self {
        let positions = positions
            .into_iter()
            .filter(|(s, _)| site.is_none_or(|only| only == *s))
            .collect();
        WatchCursor { site, positions }
    }

    /// Records that `site`'s event at `seq` was delivered (positions never go back).
    pub fn advance(&mut self, site: Uuid, seq: i64) {
        let at = self.positions.entry(site).or_insert(0);
        *at = (*at).max(seq);
    }

    /// The position of each site, as the store reads them.
    pub fn pairs(&self) -> Vec<(Uuid, i64)> {
        self.positions.iter().map(|(s, p)| (*s, *p)).collect()
    }

    /// The opaque token.
    pub fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(2 + self.positions.len() * 24);
        bytes.push(VERSION);
        bytes.push(if self.site.is_some() {
            SCOPE_SITE
        } else {
            SCOPE_ALL
        });
        for (site, at) in &self.positions {
            bytes.extend_from_slice(site.as_bytes());
            bytes.extend_from_slice(&at.to_be_bytes());
        }
        let mut out = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        out
    }

    /// Reads a token for a watch of `site` (None: every site). A token of every site
    /// resumes any one of them; a one-site token resumes only its site.
    pub fn decode(token: &str, site: Option<Uuid>) -> Result<WatchCursor, CursorError> {
        let bytes = unhex(token).ok_or(CursorError::Malformed)?;
        let [VERSION, scope, rest @ ..] = bytes.as_slice() else {
            return Err(CursorError::Malformed);
        };
        if !rest.len().is_multiple_of(24) {
            return Err(CursorError::Malformed);
        }
        let mut positions = BTreeMap::new();
        for chunk in rest.chunks_exact(24) {
            let (id, at) = chunk.split_at(16);
            let id = Uuid::from_slice(id).map_err(|_| CursorError::Malformed)?;
            let at = i64::from_be_bytes(at.try_into().map_err(|_| CursorError::Malformed)?);
            if at < 0 || positions.insert(id, at).is_some() {
                return Err(CursorError::Malformed);
            }
        }
        match (*scope, site) {
            (SCOPE_ALL, _) => {}
            (SCOPE_SITE, Some(only)) if positions.keys().all(|s| *s == only) => {}
            (SCOPE_SITE, Some(_)) => {
                // Another site's token: nothing of it applies to this one.
                return Err(CursorError::Malformed);
            }
            (SCOPE_SITE, None) => {
                let only = positions.keys().next().copied().unwrap_or_default();
                return Err(CursorError::OtherScope(only));
            }
            _ => return Err(CursorError::Malformed),
        }
        Ok(WatchCursor::new(site, positions))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    s.chunks_exact(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    #[test]
    fn tokens_round_trip_and_keep_their_scope() {
        let mut all = WatchCursor::new(None, [(id(1), 3), (id(2), 9)]);
        all.advance(id(3), 1);
        all.advance(id(1), 2); // never backwards
        let token = all.encode();
        assert_eq!(WatchCursor::decode(&token, None), Ok(all.clone()));
        // An all-sites token resumes one of its sites, and only that site.
        assert_eq!(
            WatchCursor::decode(&token, Some(id(2))),
            Ok(WatchCursor::new(Some(id(2)), [(id(2), 9)]))
        );
        assert_eq!(
            WatchCursor::decode(&token, Some(id(7))),
            Ok(WatchCursor::new(Some(id(7)), []))
        );

        let one = WatchCursor::new(Some(id(2)), [(id(2), 4), (id(1), 5)]);
        assert_eq!(one.pairs(), vec![(id(2), 4)], "other sites are dropped");
        let token = one.encode();
        assert_eq!(WatchCursor::decode(&token, Some(id(2))), Ok(one));
        assert_eq!(
            WatchCursor::decode(&token, None),
            Err(CursorError::OtherScope(id(2)))
        );
        assert_eq!(
            WatchCursor::decode(&token, Some(id(1))),
            Err(CursorError::Malformed)
        );
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let good = WatchCursor::new(None, [(id(1), 3)]).encode();
        let cases = [
            "".to_owned(),
            "zz".to_owned(),
            "0".to_owned(),
            "0200".to_owned(),                                    // unknown version
            "0105".to_owned(),                                    // unknown scope
            good[..good.len() - 2].to_owned(),                    // truncated
            format!("{good}{}", &good[4..]),                      // a site twice
            format!("0100{}{}", "11".repeat(16), "ff".repeat(8)), // negative
        ];
        for token in cases {
            assert_eq!(
                WatchCursor::decode(&token, None),
                Err(CursorError::Malformed),
                "{token:?}"
            );
        }
        assert!(WatchCursor::decode("0100", None).is_ok(), "no positions");
    }
}
