-- Key/value facts about this daemon, such as its instance id.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

-- One row per agent. Times are unix milliseconds (UTC).
CREATE TABLE agents (
    id              TEXT PRIMARY KEY NOT NULL,
    name            TEXT NOT NULL UNIQUE,
    kind            TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'running', 'stopped', 'failed')),
    desired         TEXT NOT NULL CHECK (desired IN ('running', 'stopped')),
    health          TEXT NOT NULL,
    session         TEXT NOT NULL UNIQUE,
    container_id    TEXT,
    image           TEXT NOT NULL,
    spec            TEXT NOT NULL,
    restart_policy  TEXT NOT NULL,
    restarts        INTEGER NOT NULL DEFAULT 0,
    crash_streak    INTEGER NOT NULL DEFAULT 0,
    next_restart_at INTEGER,
    connected_once  INTEGER NOT NULL DEFAULT 0,
    token           TEXT NOT NULL,
    reason          TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);

-- One row per container run of an agent, with how it ended.
CREATE TABLE runs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id     TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    session      TEXT NOT NULL,
    container_id TEXT,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER,
    exit_code    INTEGER,
    oom_killed   INTEGER NOT NULL DEFAULT 0,
    signal       INTEGER,
    error        TEXT,
    ended_by     TEXT
);
CREATE INDEX runs_by_agent ON runs (agent_id, id);

-- Lifecycle events. Kept after their agent is removed.
CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id    TEXT NOT NULL,
    agent_name  TEXT,
    kind        TEXT NOT NULL,
    from_status TEXT,
    to_status   TEXT,
    detail      TEXT NOT NULL DEFAULT '',
    at          INTEGER NOT NULL
);
CREATE INDEX events_by_agent ON events (agent_id, id);
