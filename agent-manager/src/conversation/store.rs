//! The conversation tables: `conversation` (every line) and `sessions` (each agent's
//! session state and output cursor).

use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use super::approvals::{approval_from_row, Approval, ApprovalChange};
use super::{ConversationEntry, Delivery, LastResult, SessionRecord};
use crate::store::{from_millis, millis, Store, StoreError};

type Result<T, E = StoreError> = std::result::Result<T, E>;

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

impl Store {
    /// The agent's session record, if one was stored.
    pub(crate) async fn load_session(&self, agent_id: &str) -> Result<Option<SessionRecord>> {
        let row =
            sqlx::query("SELECT * FROM sessions WHERE agent_id = ?").bind(agent_id).fetch_optional(self.pool()).await?;
        row.as_ref().map(session_from_row).transpose()
    }

    /// Writes the agent's session record.
    pub(crate) async fn save_session(&self, record: &SessionRecord) -> Result<()> {
        upsert_session(record)?.execute(self.pool()).await?;
        Ok(())
    }

    /// The highest seq stored for the agent, 0 when none.
    pub(crate) async fn max_seq(&self, agent_id: &str) -> Result<i64> {
        let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS seq FROM conversation WHERE agent_id = ?")
            .bind(agent_id)
            .fetch_one(self.pool())
            .await?;
        Ok(row.try_get("seq")?)
    }

    /// Stores entries, approval changes and, when given, the session record, in one
    /// transaction.
    pub(crate) async fn append_conversation(
        &self,
        entries: &[ConversationEntry],
        record: Option<&SessionRecord>,
        changes: &[ApprovalChange],
    ) -> Result<()> {
        let mut tx = self.pool().begin().await?;
        for change in changes {
            change.apply(&mut tx).await?;
        }
        for e in entries {
            let data = match &e.data {
                serde_json::Value::String(raw) => raw.clone(),
                other => other.to_string(),
            };
            sqlx::query(
                "INSERT INTO conversation (agent_id, seq, at, direction, kind, text, data, delivery) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&e.agent_id)
            .bind(e.seq)
            .bind(millis(e.at))
            .bind(e.direction.as_str())
            .bind(&e.kind)
            .bind(&e.text)
            .bind(data)
            .bind(e.delivery.map(Delivery::as_str))
            .execute(&mut *tx)
            .await
            .map_err(|e| match e {
                sqlx::Error::Database(d) if d.is_foreign_key_violation() => {
                    StoreError::AgentGone(entries[0].agent_id.clone())
                }
                other => other.into(),
            })?;
        }
        if let Some(record) = record {
            upsert_session(record)?.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Expires the control responses and requests still queued for the agent: they were
    /// meant for a run that has ended.
    pub(crate) async fn expire_queued_controls(&self, agent_id: &str) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE conversation SET delivery = 'expired' WHERE agent_id = ? AND delivery = 'queued' \
             AND kind IN ('control_response', 'control_request')",
        )
        .bind(agent_id)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// Approvals, newest first: of one agent (by id) or all, optionally only pending.
    pub(crate) async fn list_approvals(&self, agent_id: Option<&str>, pending: bool) -> Result<Vec<Approval>> {
        let rows = sqlx::query(
            "SELECT * FROM approvals WHERE (?1 IS NULL OR agent_id = ?1) AND (?2 = 0 OR decision IS NULL) \
             ORDER BY requested_at DESC, id LIMIT 10000",
        )
        .bind(agent_id)
        .bind(pending)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(approval_from_row).collect()
    }

    /// The last line the agent wrote on stderr since the latest handshake (so, in its
    /// latest run), if any.
    pub(crate) async fn last_stderr(&self, agent_id: &str) -> Result<Option<String>> {
        let row = sqlx::query(
            "SELECT text FROM conversation WHERE agent_id = ? AND kind = 'stderr' \
             AND seq > COALESCE((SELECT MAX(seq) FROM conversation WHERE agent_id = ? AND kind = 'control_request' \
             AND text = 'initialize'), 0) - 1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(agent_id)
        .bind(agent_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|r| r.try_get("text")).transpose()?)
    }

    /// One approval.
    pub(crate) async fn approval(&self, id: &str) -> Result<Option<Approval>> {
        let row = sqlx::query("SELECT * FROM approvals WHERE id = ?").bind(id).fetch_optional(self.pool()).await?;
        row.as_ref().map(approval_from_row).transpose()
    }

    /// Marks a line to the agent as written.
    pub(crate) async fn mark_delivered(&self, agent_id: &str, seq: i64) -> Result<()> {
        sqlx::query("UPDATE conversation SET delivery = 'delivered' WHERE agent_id = ? AND seq = ?")
            .bind(agent_id)
            .bind(seq)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// The agent's entries after `after`, oldest first, at most `limit`, and at most
    /// [`super::CONVERSATION_PAGE_BYTES`] of them (but at least one): a page of long lines
    /// is shorter, never held whole.
    pub(crate) async fn list_conversation(
        &self,
        agent_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<ConversationEntry>> {
        // The running sum of the entries' sizes, in seq order: a row is in the page while
        // the sum up to it is within the budget; the first row always is.
        let rows = sqlx::query(
            "SELECT * FROM (
                 SELECT *, SUM(length(CAST(data AS BLOB)) + length(CAST(text AS BLOB)))
                     OVER (ORDER BY seq ROWS UNBOUNDED PRECEDING) AS page_bytes,
                     length(CAST(data AS BLOB)) + length(CAST(text AS BLOB)) AS entry_bytes
                 FROM conversation WHERE agent_id = ? AND seq > ? ORDER BY seq LIMIT ?
             ) WHERE page_bytes <= ? OR page_bytes = entry_bytes ORDER BY seq",
        )
        .bind(agent_id)
        .bind(after)
        .bind(limit)
        .bind(super::CONVERSATION_PAGE_BYTES as i64)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(entry_from_row).collect()
    }

    /// The lines queued for the agent and not yet written, oldest first.
    pub(crate) async fn queued_for(&self, agent_id: &str) -> Result<Vec<ConversationEntry>> {
        let rows = sqlx::query("SELECT * FROM conversation WHERE agent_id = ? AND delivery = 'queued' ORDER BY seq")
            .bind(agent_id)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(entry_from_row).collect()
    }
}

fn upsert_session(
    r: &SessionRecord,
) -> Result<sqlx::query::Query<'static, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'static>>> {
    let last_result =
        r.last_result.as_ref().map(serde_json::to_string).transpose().map_err(|e| corrupt("last_result", e))?;
    Ok(sqlx::query(
        "INSERT INTO sessions (agent_id, session_id, turn, cost_before_usd, run_cost_usd, input_tokens, output_tokens, \
         results, started, last_result, container_id, output_cursor, handshake_container) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (agent_id) DO UPDATE SET session_id = excluded.session_id, turn = excluded.turn, \
         cost_before_usd = excluded.cost_before_usd, run_cost_usd = excluded.run_cost_usd, \
         input_tokens = excluded.input_tokens, output_tokens = excluded.output_tokens, results = excluded.results, \
         started = excluded.started, \
         last_result = excluded.last_result, container_id = excluded.container_id, \
         output_cursor = excluded.output_cursor, handshake_container = excluded.handshake_container",
    )
    .bind(r.agent_id.clone())
    .bind(r.session_id.clone())
    .bind(r.turn.as_str())
    .bind(r.cost_before_usd)
    .bind(r.run_cost_usd)
    .bind(i64::try_from(r.input_tokens).unwrap_or(i64::MAX))
    .bind(i64::try_from(r.output_tokens).unwrap_or(i64::MAX))
    .bind(i64::try_from(r.results).unwrap_or(i64::MAX))
    .bind(r.started)
    .bind(last_result)
    .bind(r.container_id.clone())
    .bind(r.output_cursor.map(|c| c.to_string()))
    .bind(r.handshake_container.clone()))
}

fn session_from_row(row: &SqliteRow) -> Result<SessionRecord> {
    let last_result: Option<String> = row.try_get("last_result")?;
    let cursor: Option<String> = row.try_get("output_cursor")?;
    let count = |col: &str| -> Result<u64> { Ok(u64::try_from(row.try_get::<i64, _>(col)?).unwrap_or(0)) };
    Ok(SessionRecord {
        agent_id: row.try_get("agent_id")?,
        session_id: row.try_get("session_id")?,
        turn: row.try_get::<String, _>("turn")?.parse().map_err(|e| corrupt("turn", e))?,
        cost_before_usd: row.try_get("cost_before_usd")?,
        run_cost_usd: row.try_get("run_cost_usd")?,
        input_tokens: count("input_tokens")?,
        output_tokens: count("output_tokens")?,
        results: count("results")?,
        started: row.try_get("started")?,
        last_result: last_result
            .map(|t| serde_json::from_str::<LastResult>(&t))
            .transpose()
            .map_err(|e| corrupt("last_result", e))?,
        container_id: row.try_get("container_id")?,
        output_cursor: cursor.map(|c| c.parse()).transpose().map_err(|e| corrupt("output_cursor", e))?,
        handshake_container: row.try_get("handshake_container")?,
    })
}

fn entry_from_row(row: &SqliteRow) -> Result<ConversationEntry> {
    let data: String = row.try_get("data")?;
    let kind: String = row.try_get("kind")?;
    let data = match kind.as_str() {
        "raw" | "stderr" => serde_json::Value::String(data),
        _ => serde_json::from_str(&data).unwrap_or(serde_json::Value::String(data)),
    };
    let delivery: Option<String> = row.try_get("delivery")?;
    Ok(ConversationEntry {
        agent_id: row.try_get("agent_id")?,
        seq: row.try_get("seq")?,
        at: from_millis(row.try_get("at")?),
        direction: row.try_get::<String, _>("direction")?.parse().map_err(|e| corrupt("direction", e))?,
        kind,
        text: row.try_get("text")?,
        data,
        delivery: delivery.map(|d| d.parse()).transpose().map_err(|e| corrupt("delivery", e))?,
    })
}
