//! Tool-permission requests (`can_use_tool`) as approvals: stored with the line that
//! asked, answered by policy, by a person, or by the timeout, and the answer written to
//! the run that asked.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use time::OffsetDateTime;

use crate::store::{from_millis, millis, StoreError};

/// A decision on a tool-permission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Decision {
    Allow,
    Deny,
}

impl Decision {
    /// The name used in JSON and the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// Who decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum DecidedBy {
    /// A person, through the API.
    User,
    /// The agent's `approvals` policy (`allow` or `deny`).
    Policy,
    /// Nobody decided within `agents.approval_timeout_secs`.
    Timeout,
    /// The agent withdrew the request (an interrupt).
    Agent,
    /// The run that asked ended first.
    RunEnded,
}

impl DecidedBy {
    /// The name used in JSON and the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Policy => "policy",
            Self::Timeout => "timeout",
            Self::Agent => "agent",
            Self::RunEnded => "run_ended",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "user" => Self::User,
            "policy" => Self::Policy,
            "timeout" => Self::Timeout,
            "agent" => Self::Agent,
            "run_ended" => Self::RunEnded,
            _ => return None,
        })
    }
}

/// One tool-permission request (its JSON, read back by the client, has no
/// `container_id`: that one reads as empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Approval {
    pub id: String,
    pub agent_id: String,
    /// The agent's name, filled in by the manager.
    pub agent: Option<String>,
    /// The container of the run that asked; only it can be answered.
    #[serde(skip)]
    pub container_id: String,
    /// The CLI's `request_id`, as in the `control_request` entry that asked.
    pub request_id: String,
    pub tool: String,
    pub input: Value,
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: OffsetDateTime,
    /// `None` while pending.
    pub decision: Option<Decision>,
    pub message: Option<String>,
    pub decided_by: Option<DecidedBy>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub decided_at: Option<OffsetDateTime>,
}

impl Approval {
    /// A pending approval for a `can_use_tool` control request, or `None` when the line
    /// is not one.
    pub(crate) fn from_request(agent_id: &str, container: &str, data: &Value, at: OffsetDateTime) -> Option<Self> {
        let request = &data["request"];
        if data["type"] != "control_request" || request["subtype"] != "can_use_tool" {
            return None;
        }
        Some(Self {
            id: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
            agent_id: agent_id.to_owned(),
            agent: None,
            container_id: container.to_owned(),
            request_id: data["request_id"].as_str()?.to_owned(),
            tool: request["tool_name"].as_str().unwrap_or("?").to_owned(),
            input: request["input"].clone(),
            requested_at: at,
            decision: None,
            message: None,
            decided_by: None,
            decided_at: None,
        })
    }

    /// The control response that carries `decision` to the CLI.
    pub(crate) fn response(&self, decision: Decision, message: Option<&str>) -> Value {
        let answer = match decision {
            Decision::Allow => json!({"behavior": "allow", "updatedInput": self.input}),
            Decision::Deny => json!({"behavior": "deny", "message": message.unwrap_or("denied")}),
        };
        json!({
            "type": "control_response",
            "response": {"subtype": "success", "request_id": self.request_id, "response": answer},
        })
    }
}

/// What a conversation append does to approvals, in the same transaction.
#[derive(Debug, Clone)]
pub(crate) enum ApprovalChange {
    /// A new request.
    Create(Approval),
    /// Decide a pending request; the append fails with [`StoreError::Conflict`] when it
    /// was decided already.
    Decide { id: String, decision: Decision, message: Option<String>, by: DecidedBy, at: OffsetDateTime },
}

impl ApprovalChange {
    pub(crate) async fn apply(&self, tx: &mut sqlx::SqliteConnection) -> Result<(), StoreError> {
        match self {
            Self::Create(a) => {
                sqlx::query(
                    "INSERT INTO approvals (id, agent_id, container_id, request_id, tool, input, requested_at) \
                     VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (agent_id, container_id, request_id) DO NOTHING",
                )
                .bind(&a.id)
                .bind(&a.agent_id)
                .bind(&a.container_id)
                .bind(&a.request_id)
                .bind(&a.tool)
                .bind(a.input.to_string())
                .bind(millis(a.requested_at))
                .execute(&mut *tx)
                .await?;
            }
            Self::Decide { id, decision, message, by, at } => {
                let done = sqlx::query(
                    "UPDATE approvals SET decision = ?, message = ?, decided_by = ?, decided_at = ? \
                     WHERE id = ? AND decision IS NULL",
                )
                .bind(decision.as_str())
                .bind(message)
                .bind(by.as_str())
                .bind(millis(*at))
                .bind(id)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::Conflict(format!("approval {id} is decided already")));
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn approval_from_row(row: &SqliteRow) -> Result<Approval, StoreError> {
    let input: String = row.try_get("input")?;
    let decision: Option<String> = row.try_get("decision")?;
    let decided_by: Option<String> = row.try_get("decided_by")?;
    Ok(Approval {
        id: row.try_get("id")?,
        agent_id: row.try_get("agent_id")?,
        agent: None,
        container_id: row.try_get("container_id")?,
        request_id: row.try_get("request_id")?,
        tool: row.try_get("tool")?,
        input: serde_json::from_str(&input).unwrap_or(Value::String(input)),
        requested_at: from_millis(row.try_get("requested_at")?),
        decision: match decision.as_deref() {
            Some("allow") => Some(Decision::Allow),
            Some("deny") => Some(Decision::Deny),
            _ => None,
        },
        message: row.try_get("message")?,
        decided_by: decided_by.as_deref().and_then(DecidedBy::parse),
        decided_at: row.try_get::<Option<i64>, _>("decided_at")?.map(from_millis),
    })
}
