//! The SQLite store: agents, runs and lifecycle events, in one file that survives
//! restarts.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backend_core::{SessionExitInfo, SessionHealth};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use time::OffsetDateTime;

use crate::model::{
    Agent, AgentStatus, Desired, EndedBy, EventKind, ExitView, LifecycleEvent, ModelRequest, ModelUsage, Run,
};
use crate::page::AgentCursor;
use crate::secrets::GatewaySecrets;

/// A database failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or a query failed.
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// The schema could not be migrated.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value could not be read back.
    #[error("corrupt database row: {0}")]
    Corrupt(String),
    /// An agent with this name exists already.
    #[error("an agent named {0:?} already exists")]
    NameTaken(String),
    /// The agent was deleted meanwhile.
    #[error("agent {0} no longer exists")]
    AgentGone(String),
    /// A write that needs a state the row is no longer in.
    #[error("{0}")]
    Conflict(String),
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Agents, runs and events in SQLite (WAL mode, foreign keys on).
///
/// The agents table is also kept in memory (loaded when the store opens, written through
/// on every change), indexed by id, name and session. Every read of an agent, by
/// operations and reconcile passes alike, is served from memory: there is one read path,
/// and no database round trip per agent. The database stays the record: every write
/// reaches it first, and the memory copy changes only after the write succeeded. One
/// `Store` (and its clones) per database file and process.
///
/// Each agent's model usage is kept in memory too: its sums over every recorded request,
/// and its output tokens of the latest UTC day it made requests on (loaded when the store
/// opens, updated after every write of requests).
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    agents: Arc<Mutex<AgentCache>>,
    usage: Arc<Mutex<HashMap<String, UsageState>>>,
    /// The gateway key (`meta.gateway_key`), generated on first open.
    gateway: Arc<GatewaySecrets>,
    /// An in-memory store's own connection, outside the pool: the database lives as
    /// long as one connection to it, and the pool closes its connection when a query's
    /// future is dropped midway (a client that goes away), which would leave an empty
    /// database behind it. `None` for a file.
    _keeper: Option<Arc<std::sync::Mutex<sqlx::SqliteConnection>>>,
}

/// An agent's model usage in memory.
#[derive(Debug, Clone, Copy, Default)]
struct UsageState {
    total: ModelUsage,
    /// The UTC day (days since the epoch) of `day_output_tokens`.
    day: i64,
    day_output_tokens: u64,
}

impl UsageState {
    fn add(&mut self, request: &ModelRequest) {
        self.total.requests = self.total.requests.saturating_add(1);
        self.total.input_tokens = self.total.input_tokens.saturating_add(request.input_tokens);
        self.total.output_tokens = self.total.output_tokens.saturating_add(request.output_tokens);
        let day = utc_day(request.at);
        if day > self.day {
            self.day = day;
            self.day_output_tokens = 0;
        }
        if day == self.day {
            self.day_output_tokens = self.day_output_tokens.saturating_add(request.output_tokens);
        }
    }
}

/// The UTC day of `at`, in days since the epoch.
fn utc_day(at: OffsetDateTime) -> i64 {
    at.unix_timestamp().div_euclid(86_400)
}

const DAY_MILLIS: i64 = 86_400_000;

/// A count for SQLite's signed integers.
fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn uncount(row: &SqliteRow, column: &str) -> Result<u64> {
    Ok(u64::try_from(row.try_get::<i64, _>(column)?).unwrap_or(0))
}

/// The agents in memory, each with the version of its last write, with the id of each
/// name and session (neither changes in an agent's life).
#[derive(Debug, Default)]
struct AgentCache {
    agents: HashMap<String, (Agent, u64)>,
    by_name: HashMap<String, String>,
    by_session: HashMap<String, String>,
    /// Every agent's place in the list (creation time, then id): pages are read from it.
    order: BTreeSet<AgentCursor>,
    next_version: u64,
}

impl AgentCache {
    fn put(&mut self, agent: Agent) {
        self.next_version += 1;
        self.by_name.insert(agent.name.clone(), agent.id.clone());
        self.by_session.insert(agent.session.clone(), agent.id.clone());
        self.order.insert(AgentCursor::after(agent.created_at, &agent.id));
        self.agents.insert(agent.id.clone(), (agent, self.next_version));
    }

    fn remove(&mut self, id: &str) {
        if let Some((agent, _)) = self.agents.remove(id) {
            self.by_name.remove(&agent.name);
            self.by_session.remove(&agent.session);
            self.order.remove(&AgentCursor::after(agent.created_at, &agent.id));
        }
    }

    fn get(&self, id: &str) -> Option<Agent> {
        self.agents.get(id).map(|(agent, _)| agent.clone())
    }
}

pub(crate) fn millis(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}

pub(crate) fn from_millis(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn parse<T: FromStr<Err = String>>(text: &str) -> Result<T> {
    text.parse().map_err(StoreError::Corrupt)
}

/// Reads the gateway key from `meta`, storing a new random one first if there is none.
async fn gateway_key(pool: &SqlitePool) -> Result<GatewaySecrets> {
    let candidate = GatewaySecrets::generate()
        .map_err(|e| StoreError::Corrupt(format!("cannot generate the gateway key: no random source: {e}")))?;
    sqlx::query("INSERT OR IGNORE INTO meta (key, value) VALUES ('gateway_key', ?)")
        .bind(candidate.encoded_key())
        .execute(pool)
        .await?;
    let row = sqlx::query("SELECT value FROM meta WHERE key = 'gateway_key'").fetch_one(pool).await?;
    let text: String = row.try_get("value")?;
    GatewaySecrets::decode_key(&text)
        .ok_or_else(|| StoreError::Corrupt("meta.gateway_key is not 32 bytes of base64url".into()))
}

const AGENT_COLUMNS: &str = "id, name, status, desired, health, session, container_id, spec, restarts, \
     crash_streak, next_restart_at, reason, created_at, updated_at";

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub async fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Sqlx(sqlx::Error::Io(e)))?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        Self::migrated(pool).await
    }

    /// A private in-memory database, for tests.
    pub async fn in_memory() -> Result<Self> {
        // A named, shared-cache in-memory database (what sqlx makes of `:memory:`), so
        // that the keeper and the pool's connection see the same one.
        let options = SqliteConnectOptions::from_str("sqlite::memory:")?.foreign_keys(true);
        let keeper = sqlx::ConnectOptions::connect(&options).await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await?;
        let mut store = Self::migrated(pool).await?;
        store._keeper = Some(Arc::new(std::sync::Mutex::new(keeper)));
        Ok(store)
    }

    async fn migrated(pool: SqlitePool) -> Result<Self> {
        sqlx::migrate!("./migrations").run(&pool).await?;
        let sql = format!("SELECT {AGENT_COLUMNS} FROM agents");
        let rows = sqlx::query(&sql).fetch_all(&pool).await?;
        let mut cache = AgentCache::default();
        for row in &rows {
            cache.put(agent_from_row(row)?);
        }
        let usage = load_usage(&pool).await?;
        let gateway = Arc::new(gateway_key(&pool).await?);
        Ok(Self {
            pool,
            agents: Arc::new(Mutex::new(cache)),
            usage: Arc::new(Mutex::new(usage)),
            gateway,
            _keeper: None,
        })
    }

    /// The daemon's gateway key, which makes and checks every agent's gateway secret. It
    /// is generated on the database's first open and kept in it, so secrets survive restarts.
    pub fn gateway_secrets(&self) -> Arc<GatewaySecrets> {
        self.gateway.clone()
    }

    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    fn remember(&self, agent: &Agent) {
        self.cache().put(agent.clone());
    }

    /// Closes the pool, flushing the WAL.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The id of this daemon instance, generated and stored on first use.
    pub async fn instance_id(&self) -> Result<String> {
        let candidate = format!("i-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        sqlx::query("INSERT OR IGNORE INTO meta (key, value) VALUES ('instance_id', ?)")
            .bind(&candidate)
            .execute(&self.pool)
            .await?;
        let row = sqlx::query("SELECT value FROM meta WHERE key = 'instance_id'").fetch_one(&self.pool).await?;
        Ok(row.try_get("value")?)
    }

    /// Inserts a new agent; a taken name is [`StoreError::NameTaken`].
    pub async fn insert_agent(&self, agent: &Agent) -> Result<()> {
        let spec = serde_json::to_string(&agent.spec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let outcome = sqlx::query(
            "INSERT INTO agents (id, name, status, desired, health, session, container_id, spec, restarts, \
             crash_streak, next_restart_at, reason, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&agent.id)
        .bind(&agent.name)
        .bind(agent.status.as_str())
        .bind(agent.desired.as_str())
        .bind(agent.health.as_str())
        .bind(&agent.session)
        .bind(&agent.container_id)
        .bind(spec)
        .bind(agent.restarts)
        .bind(agent.crash_streak)
        .bind(agent.next_restart_at.map(millis))
        .bind(&agent.reason)
        .bind(millis(agent.created_at))
        .bind(millis(agent.updated_at))
        .execute(&self.pool)
        .await;
        match outcome {
            Ok(_) => {
                self.remember(agent);
                Ok(())
            }
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::NameTaken(agent.name.clone())),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes an agent's mutable fields (status, health, container, counters, reason).
    pub async fn update_agent(&self, agent: &Agent) -> Result<()> {
        let done = update_agent_query(agent).execute(&self.pool).await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::AgentGone(agent.id.clone()));
        }
        self.remember(agent);
        Ok(())
    }

    /// The agent with this id as the store holds it now (no database round trip).
    pub fn cached_agent(&self, id: &str) -> Option<Agent> {
        self.cache().get(id)
    }

    /// The agent with this id, or else this name (from memory).
    pub fn find_agent(&self, id_or_name: &str) -> Option<Agent> {
        let cache = self.cache();
        cache.get(id_or_name).or_else(|| cache.by_name.get(id_or_name).and_then(|id| cache.get(id)))
    }

    /// The agent whose session (container name) this is (from memory).
    pub fn find_agent_by_session(&self, session: &str) -> Option<Agent> {
        let cache = self.cache();
        cache.by_session.get(session).and_then(|id| cache.get(id))
    }

    /// Every agent, optionally only those with `status`, oldest first (from memory).
    pub async fn list_agents(&self, status: Option<AgentStatus>) -> Result<Vec<Agent>> {
        Ok(self.list_agents_versioned(status).into_iter().map(|(agent, _)| agent).collect())
    }

    /// Every agent with the version of its last write, oldest first: a later
    /// [`Store::is_current`] tells whether the agent changed since.
    pub fn list_agents_versioned(&self, status: Option<AgentStatus>) -> Vec<(Agent, u64)> {
        let mut agents: Vec<(Agent, u64)> = {
            let cache = self.cache();
            cache.agents.values().filter(|(a, _)| status.is_none_or(|s| a.status == s)).cloned().collect()
        };
        agents.sort_by(|(a, _), (b, _)| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        agents
    }

    /// At most `limit` agents after `after` in the list's order (oldest first), with
    /// `status` when given, and whether more follow. Walks the ordered index from the
    /// cursor and copies only the page's records, however many agents there are.
    pub fn list_agents_page(
        &self,
        status: Option<AgentStatus>,
        after: Option<&AgentCursor>,
        limit: usize,
    ) -> (Vec<Agent>, bool) {
        use std::ops::Bound;
        let cache = self.cache();
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut page = Vec::with_capacity(limit.min(cache.agents.len()));
        for key in cache.order.range((from, Bound::Unbounded)) {
            let Some((agent, _)) = cache.agents.get(&key.id) else { continue };
            if status.is_some_and(|s| agent.status != s) {
                continue;
            }
            if page.len() == limit {
                return (page, true);
            }
            page.push(agent.clone());
        }
        (page, false)
    }

    /// Every agent's id, status and health (from memory, without copying the records).
    pub(crate) fn agent_states(&self) -> Vec<(String, AgentStatus, SessionHealth)> {
        self.cache().agents.values().map(|(a, _)| (a.id.clone(), a.status, a.health)).collect()
    }

    /// Whether the agent still exists unchanged since `version` was read.
    pub fn is_current(&self, id: &str, version: u64) -> bool {
        self.cache().agents.get(id).is_some_and(|(_, v)| *v == version)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, AgentCache> {
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Deletes an agent and its runs and model requests (its events stay).
    pub async fn delete_agent(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM agents WHERE id = ?").bind(id).execute(&self.pool).await?;
        self.cache().remove(id);
        // After the agent left the cache: a write of requests racing this one sees it gone.
        self.usage_map().remove(id);
        Ok(())
    }

    fn usage_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, UsageState>> {
        self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores model requests in one transaction with each agent's sums, then counts them
    /// in memory. A request of an agent that no longer exists is left out. Returns the sums
    /// of the requests stored.
    pub async fn record_model_requests(&self, requests: &[ModelRequest]) -> Result<ModelUsage> {
        let mut tx = self.pool.begin().await?;
        let mut stored = Vec::with_capacity(requests.len());
        for r in requests {
            let done = sqlx::query(
                "INSERT INTO model_requests (agent_id, at, model, status, latency_ms, input_tokens, output_tokens) \
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7 WHERE EXISTS (SELECT 1 FROM agents WHERE id = ?1)",
            )
            .bind(&r.agent_id)
            .bind(millis(r.at))
            .bind(&r.model)
            .bind(i64::from(r.status))
            .bind(count(r.latency_ms))
            .bind(count(r.input_tokens))
            .bind(count(r.output_tokens))
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                continue;
            }
            sqlx::query(
                "INSERT INTO model_usage (agent_id, requests, input_tokens, output_tokens) VALUES (?1, 1, ?2, ?3) \
                 ON CONFLICT (agent_id) DO UPDATE SET requests = requests + 1, \
                 input_tokens = input_tokens + excluded.input_tokens, \
                 output_tokens = output_tokens + excluded.output_tokens",
            )
            .bind(&r.agent_id)
            .bind(count(r.input_tokens))
            .bind(count(r.output_tokens))
            .execute(&mut *tx)
            .await?;
            stored.push(r);
        }
        tx.commit().await?;
        let mut sums = ModelUsage::default();
        // The usage map first, then the agents: a delete removes the agent from the cache
        // before it takes the usage map, so no request of a deleted agent is counted back.
        let mut usage = self.usage_map();
        for r in stored {
            if !self.cache().agents.contains_key(&r.agent_id) {
                continue;
            }
            usage.entry(r.agent_id.clone()).or_default().add(r);
            sums.requests += 1;
            sums.input_tokens = sums.input_tokens.saturating_add(r.input_tokens);
            sums.output_tokens = sums.output_tokens.saturating_add(r.output_tokens);
        }
        Ok(sums)
    }

    /// The agent's model usage, summed over every recorded request (from memory).
    pub fn model_usage(&self, agent_id: &str) -> ModelUsage {
        self.usage_map().get(agent_id).map(|u| u.total).unwrap_or_default()
    }

    /// The output tokens of the agent's requests recorded on the UTC day of `now`
    /// (from memory).
    pub fn model_output_tokens_on(&self, agent_id: &str, now: OffsetDateTime) -> u64 {
        let day = utc_day(now);
        self.usage_map().get(agent_id).filter(|u| u.day == day).map_or(0, |u| u.day_output_tokens)
    }

    /// The agent's last `limit` model requests, oldest first.
    pub async fn list_model_requests(&self, agent_id: &str, limit: i64) -> Result<Vec<ModelRequest>> {
        let rows = sqlx::query(
            "SELECT * FROM (SELECT * FROM model_requests WHERE agent_id = ? ORDER BY id DESC LIMIT ?) ORDER BY id",
        )
        .bind(agent_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(ModelRequest {
                    agent_id: row.try_get("agent_id")?,
                    at: from_millis(row.try_get("at")?),
                    model: row.try_get("model")?,
                    status: u16::try_from(row.try_get::<i64, _>("status")?).unwrap_or(0),
                    latency_ms: uncount(row, "latency_ms")?,
                    input_tokens: uncount(row, "input_tokens")?,
                    output_tokens: uncount(row, "output_tokens")?,
                })
            })
            .collect()
    }

    /// Deletes the model requests recorded before `before` (the sums stay), in batches,
    /// and returns how many.
    pub async fn prune_model_requests(&self, before: OffsetDateTime) -> Result<u64> {
        self.delete_before("model_requests", before).await
    }

    /// Records the start of a run and returns its id.
    pub async fn start_run(&self, agent: &Agent, started_at: OffsetDateTime) -> Result<i64> {
        let row = sqlx::query(
            "INSERT INTO runs (agent_id, session, container_id, started_at) VALUES (?, ?, ?, ?) RETURNING id",
        )
        .bind(&agent.id)
        .bind(&agent.session)
        .bind(&agent.container_id)
        .bind(millis(started_at))
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("id")?)
    }

    /// The run of this agent that has not finished, if any.
    pub async fn open_run(&self, agent_id: &str) -> Result<Option<Run>> {
        let row = sqlx::query("SELECT * FROM runs WHERE agent_id = ? AND finished_at IS NULL ORDER BY id DESC LIMIT 1")
            .bind(agent_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(run_from_row).transpose()
    }

    /// The agent's runs, oldest first.
    pub async fn list_runs(&self, agent_id: &str) -> Result<Vec<Run>> {
        let rows = sqlx::query("SELECT * FROM runs WHERE agent_id = ? ORDER BY id")
            .bind(agent_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(run_from_row).collect()
    }

    /// The agent's last finished run's exit.
    pub async fn last_exit(&self, agent_id: &str) -> Result<Option<ExitView>> {
        let row =
            sqlx::query("SELECT * FROM runs WHERE agent_id = ? AND finished_at IS NOT NULL ORDER BY id DESC LIMIT 1")
                .bind(agent_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.as_ref().map(run_from_row).transpose()?.and_then(|r| r.exit))
    }

    /// The last exit of each of `ids` that has one: one query for a page of agents.
    pub async fn last_exits_of(&self, ids: &[&str]) -> Result<HashMap<String, ExitView>> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        self.last_exits_where(Some(ids)).await
    }

    /// Every agent's last finished run's exit, in one query.
    pub async fn last_exits(&self) -> Result<HashMap<String, ExitView>> {
        self.last_exits_where(None).await
    }

    /// The last exits of `ids`, or of every agent.
    async fn last_exits_where(&self, ids: Option<&[&str]>) -> Result<HashMap<String, ExitView>> {
        let statement = format!(
            "SELECT r.* FROM runs r JOIN (SELECT agent_id, MAX(id) AS id FROM runs WHERE finished_at IS NOT NULL \
             {} GROUP BY agent_id) last ON r.id = last.id",
            agent_filter(ids)
        );
        let rows = bind_ids(sqlx::query(&statement), ids).fetch_all(&self.pool).await?;
        let mut exits = HashMap::with_capacity(rows.len());
        for row in &rows {
            let run = run_from_row(row)?;
            if let Some(exit) = run.exit {
                exits.insert(run.agent_id, exit);
            }
        }
        Ok(exits)
    }

    /// When the agent's latest run (the current one, or the last if none runs) started.
    pub async fn last_run_started(&self, agent_id: &str) -> Result<Option<OffsetDateTime>> {
        Ok(self.last_runs_started_of(&[agent_id]).await?.remove(agent_id))
    }

    /// When every agent's latest run started, in one query.
    pub async fn last_runs_started(&self) -> Result<HashMap<String, OffsetDateTime>> {
        self.last_runs_started_where(None).await
    }

    /// When the latest run of each of `ids` that has one started: one query for a page.
    pub async fn last_runs_started_of(&self, ids: &[&str]) -> Result<HashMap<String, OffsetDateTime>> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        self.last_runs_started_where(Some(ids)).await
    }

    async fn last_runs_started_where(&self, ids: Option<&[&str]>) -> Result<HashMap<String, OffsetDateTime>> {
        let statement = format!(
            "SELECT agent_id, MAX(started_at) AS started_at FROM runs WHERE 1 = 1 {} GROUP BY agent_id",
            agent_filter(ids)
        );
        let rows = bind_ids(sqlx::query(&statement), ids).fetch_all(&self.pool).await?;
        let mut starts = HashMap::with_capacity(rows.len());
        for row in &rows {
            starts.insert(row.try_get("agent_id")?, from_millis(row.try_get("started_at")?));
        }
        Ok(starts)
    }

    /// Applies one transition atomically: the agent's new fields, the end of its open run
    /// (if `finish` is given), and the event. Returns the stored event.
    pub async fn transition(
        &self,
        agent: &Agent,
        finish: Option<(&SessionExitInfo, EndedBy, OffsetDateTime)>,
        event: &LifecycleEvent,
    ) -> Result<LifecycleEvent> {
        let mut tx = self.pool.begin().await?;
        if update_agent_query(agent).execute(&mut *tx).await?.rows_affected() == 0 {
            return Err(StoreError::AgentGone(agent.id.clone()));
        }
        if let Some((exit, ended_by, finished_at)) = finish {
            sqlx::query(
                "UPDATE runs SET finished_at = ?, exit_code = ?, oom_killed = ?, signal = ?, error = ?, ended_by = ? \
                 WHERE agent_id = ? AND finished_at IS NULL",
            )
            .bind(millis(exit.finished_at.unwrap_or(finished_at)))
            .bind(exit.exit_code)
            .bind(exit.oom_killed)
            .bind(exit.signal)
            .bind(&exit.error)
            .bind(ended_by.as_str())
            .bind(&agent.id)
            .execute(&mut *tx)
            .await?;
        }
        let stored = insert_event_query(event).fetch_one(&mut *tx).await?;
        tx.commit().await?;
        self.remember(agent);
        Ok(LifecycleEvent { id: stored.try_get("id")?, ..event.clone() })
    }

    /// Stores an event that changes no agent and returns it with its id.
    pub async fn insert_event(&self, event: &LifecycleEvent) -> Result<LifecycleEvent> {
        let stored = insert_event_query(event).fetch_one(&self.pool).await?;
        Ok(LifecycleEvent { id: stored.try_get("id")?, ..event.clone() })
    }

    /// Events after id `since`, optionally of one agent (id or name), oldest first, at
    /// most `limit`.
    pub async fn list_events(&self, agent: Option<&str>, since: i64, limit: i64) -> Result<Vec<LifecycleEvent>> {
        let rows = sqlx::query(
            "SELECT * FROM events WHERE id > ?1 AND (?2 IS NULL OR agent_id = ?2 OR agent_name = ?2) ORDER BY id LIMIT ?3",
        )
        .bind(since)
        .bind(agent)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    /// Deletes the events stored before `before`, in batches (so that no write waits
    /// long behind one), and returns how many.
    pub async fn prune_events(&self, before: OffsetDateTime) -> Result<u64> {
        self.delete_before("events", before).await
    }

    /// Deletes the rows of `table` (one with an `id` and an `at` column) stored before
    /// `before`, 10,000 at a time, and returns how many.
    async fn delete_before(&self, table: &'static str, before: OffsetDateTime) -> Result<u64> {
        const BATCH: i64 = 10_000;
        // Oldest first: the scan in id order finds a batch early and stops there.
        let statement = format!("DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE at < ?1 LIMIT ?2)");
        let mut deleted = 0;
        loop {
            let done =
                sqlx::query(&statement).bind(millis(before)).bind(BATCH).execute(&self.pool).await?.rows_affected();
            deleted += done;
            if done < BATCH as u64 {
                return Ok(deleted);
            }
        }
    }
}

/// Every agent's sums, and its output tokens of the latest UTC day it made requests on
/// (looked for in the last two days by the wall clock).
async fn load_usage(pool: &SqlitePool) -> Result<HashMap<String, UsageState>> {
    let mut usage: HashMap<String, UsageState> = HashMap::new();
    let rows =
        sqlx::query("SELECT agent_id, requests, input_tokens, output_tokens FROM model_usage").fetch_all(pool).await?;
    for row in &rows {
        let total = ModelUsage {
            requests: uncount(row, "requests")?,
            input_tokens: uncount(row, "input_tokens")?,
            output_tokens: uncount(row, "output_tokens")?,
        };
        usage.insert(row.try_get("agent_id")?, UsageState { total, ..UsageState::default() });
    }
    let since = (utc_day(OffsetDateTime::now_utc()) - 2) * DAY_MILLIS;
    let rows = sqlx::query(
        "SELECT agent_id, at / ?1 AS day, SUM(output_tokens) AS output FROM model_requests WHERE at >= ?2 \
         GROUP BY agent_id, day ORDER BY day",
    )
    .bind(DAY_MILLIS)
    .bind(since)
    .fetch_all(pool)
    .await?;
    for row in &rows {
        let state = usage.entry(row.try_get("agent_id")?).or_default();
        // Ordered by day: the latest wins.
        state.day = row.try_get("day")?;
        state.day_output_tokens = uncount(row, "output")?;
    }
    Ok(usage)
}

fn update_agent_query(agent: &Agent) -> sqlx::query::Query<'_, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'_>> {
    sqlx::query(
        "UPDATE agents SET status = ?, desired = ?, health = ?, container_id = ?, restarts = ?, crash_streak = ?, \
         next_restart_at = ?, reason = ?, updated_at = ? WHERE id = ?",
    )
    .bind(agent.status.as_str())
    .bind(agent.desired.as_str())
    .bind(agent.health.as_str())
    .bind(&agent.container_id)
    .bind(agent.restarts)
    .bind(agent.crash_streak)
    .bind(agent.next_restart_at.map(millis))
    .bind(&agent.reason)
    .bind(millis(agent.updated_at))
    .bind(&agent.id)
}

fn insert_event_query(
    event: &LifecycleEvent,
) -> sqlx::query::Query<'_, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'_>> {
    sqlx::query(
        "INSERT INTO events (agent_id, agent_name, kind, from_status, to_status, detail, at) \
         VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(&event.agent_id)
    .bind(&event.agent_name)
    .bind(event.kind.as_str())
    .bind(event.from.map(AgentStatus::as_str))
    .bind(event.to.map(AgentStatus::as_str))
    .bind(&event.detail)
    .bind(millis(event.at))
}

fn agent_from_row(row: &SqliteRow) -> Result<Agent> {
    let spec: String = row.try_get("spec")?;
    let health: String = row.try_get("health")?;
    Ok(Agent {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        status: parse(&row.try_get::<String, _>("status")?)?,
        desired: parse(&row.try_get::<String, _>("desired")?)?,
        health: health.parse::<SessionHealth>().map_err(|e| StoreError::Corrupt(e.to_string()))?,
        session: row.try_get("session")?,
        container_id: row.try_get("container_id")?,
        spec: serde_json::from_str(&spec).map_err(|e| StoreError::Corrupt(format!("agent spec: {e}")))?,
        restarts: row.try_get("restarts")?,
        crash_streak: row.try_get("crash_streak")?,
        next_restart_at: row.try_get::<Option<i64>, _>("next_restart_at")?.map(from_millis),
        reason: row.try_get("reason")?,
        created_at: from_millis(row.try_get("created_at")?),
        updated_at: from_millis(row.try_get("updated_at")?),
    })
}

fn run_from_row(row: &SqliteRow) -> Result<Run> {
    let finished_at = row.try_get::<Option<i64>, _>("finished_at")?.map(from_millis);
    let ended_by = row.try_get::<Option<String>, _>("ended_by")?.map(|s| parse::<EndedBy>(&s)).transpose()?;
    let exit = match finished_at {
        Some(at) => Some(ExitView {
            code: row.try_get("exit_code")?,
            oom_killed: row.try_get("oom_killed")?,
            signal: row.try_get("signal")?,
            error: row.try_get("error")?,
            finished_at: Some(at),
        }),
        None => None,
    };
    Ok(Run {
        id: row.try_get("id")?,
        agent_id: row.try_get("agent_id")?,
        session: row.try_get("session")?,
        container_id: row.try_get("container_id")?,
        started_at: from_millis(row.try_get("started_at")?),
        finished_at,
        exit,
        ended_by,
    })
}

fn event_from_row(row: &SqliteRow) -> Result<LifecycleEvent> {
    let status = |col: &str| -> Result<Option<AgentStatus>> {
        row.try_get::<Option<String>, _>(col)?.map(|s| parse(&s)).transpose()
    };
    Ok(LifecycleEvent {
        id: row.try_get("id")?,
        agent_id: row.try_get("agent_id")?,
        agent_name: row.try_get("agent_name")?,
        kind: parse::<EventKind>(&row.try_get::<String, _>("kind")?)?,
        from: status("from_status")?,
        to: status("to_status")?,
        detail: row.try_get("detail")?,
        at: from_millis(row.try_get("at")?),
    })
}

impl Desired {
    /// Whether the agent should run.
    pub fn is_running(self) -> bool {
        self == Desired::Running
    }
}

/// `AND agent_id IN (?, …)` for `ids`, or nothing for every agent.
fn agent_filter(ids: Option<&[&str]>) -> String {
    ids.map_or_else(String::new, |ids| format!("AND agent_id IN ({})", vec!["?"; ids.len()].join(", ")))
}

/// Binds `ids` to the marks [`agent_filter`] wrote.
fn bind_ids<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    ids: Option<&[&'q str]>,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    for id in ids.unwrap_or_default() {
        query = query.bind(*id);
    }
    query
}
