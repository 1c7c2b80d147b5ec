-- Every request an agent made through the model gateway, with its outcome and usage.
-- Times are unix milliseconds (UTC); rows older than store.events_retention_days go.
CREATE TABLE model_requests (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id      TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    at            INTEGER NOT NULL,
    model         TEXT,
    status        INTEGER NOT NULL,
    latency_ms    INTEGER NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL
);
CREATE INDEX model_requests_by_agent ON model_requests (agent_id, at);
CREATE INDEX model_requests_by_time ON model_requests (at);

-- Each agent's requests summed over its whole life (pruning the rows above keeps these).
CREATE TABLE model_usage (
    agent_id      TEXT PRIMARY KEY NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    requests      INTEGER NOT NULL DEFAULT 0,
    input_tokens  INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0
);
