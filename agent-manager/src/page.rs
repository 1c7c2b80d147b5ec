//! Pages of the agent list: a keyset cursor over the list's order (creation time, then
//! id), so that a page costs its own size whatever the number of agents, and an agent
//! created or removed between two pages neither shifts nor repeats the others.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use time::OffsetDateTime;

/// Agents in a page of `GET /v1/agents` when the request gives no `limit`.
pub const DEFAULT_AGENT_PAGE: usize = 500;
/// The largest `limit` of a page of agents.
pub const MAX_AGENT_PAGE: usize = 1000;

/// Where a page of agents ends: the position of its last agent. Shown to clients as an
/// opaque string (`Display`), read back with `FromStr`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AgentCursor {
    pub(crate) created_at: OffsetDateTime,
    pub(crate) id: String,
}

impl AgentCursor {
    pub(crate) fn after(created_at: OffsetDateTime, id: &str) -> Self {
        Self { created_at, id: id.to_owned() }
    }
}

impl fmt::Display for AgentCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let raw = format!("{}:{}", self.created_at.unix_timestamp_nanos(), self.id);
        f.write_str(&URL_SAFE_NO_PAD.encode(raw))
    }
}

/// A cursor that this daemon did not give out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a cursor this daemon gave out: pass the X-Next-Cursor of the previous page as is, or leave cursor out to start from the first page")]
pub struct BadCursor(pub String);

impl FromStr for AgentCursor {
    type Err = BadCursor;

    fn from_str(s: &str) -> Result<Self, BadCursor> {
        let bad = || BadCursor(s.chars().take(64).collect());
        let raw = URL_SAFE_NO_PAD.decode(s).map_err(|_| bad())?;
        let raw = String::from_utf8(raw).map_err(|_| bad())?;
        let (nanos, id) = raw.split_once(':').ok_or_else(bad)?;
        let nanos: i128 = nanos.parse().map_err(|_| bad())?;
        let created_at = OffsetDateTime::from_unix_timestamp_nanos(nanos).map_err(|_| bad())?;
        if id.is_empty() {
            return Err(bad());
        }
        Ok(Self { created_at, id: id.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_the_same_and_a_made_up_one_is_refused() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_790_000_000_123_456_789).expect("time");
        let cursor = AgentCursor::after(at, "c91051f8-1723-4602-9123-3e03425216cf");
        let text = cursor.to_string();
        assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{text}");
        assert_eq!(text.parse::<AgentCursor>(), Ok(cursor));
        for bad in ["", "nope!", "bm9jb2xvbg", "OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk6aWQ"] {
            let e = bad.parse::<AgentCursor>().expect_err(bad);
            assert!(e.to_string().contains("not a cursor this daemon gave out"), "{e}");
        }
    }
}
