-- The agent channel is gone: an agent's conversation runs over its container's stdin and
-- stdout, so the channel's columns go.
ALTER TABLE agents DROP COLUMN connected_once;
ALTER TABLE agents DROP COLUMN token;

-- Every line of every agent's conversation, in both directions, in order. `seq` counts
-- per agent from 1. `data` is the whole line as written (JSON, or the raw text).
CREATE TABLE conversation (
    agent_id  TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    seq       INTEGER NOT NULL,
    at        INTEGER NOT NULL,
    direction TEXT NOT NULL CHECK (direction IN ('from_agent', 'to_agent')),
    kind      TEXT NOT NULL,
    text      TEXT NOT NULL,
    data      TEXT NOT NULL,
    -- For lines to the agent: 'queued' until written to its stdin, then 'delivered';
    -- 'expired' for a control response queued for a run that ended before it was
    -- written (it answered a request of that run only).
    delivery  TEXT CHECK (delivery IN ('queued', 'delivered', 'expired')),
    PRIMARY KEY (agent_id, seq)
);
CREATE INDEX conversation_queued ON conversation (agent_id, seq) WHERE delivery = 'queued';

-- The state of each agent's conversation: its session, turn, spend, last result, and
-- where in its current container's output reading stopped.
CREATE TABLE sessions (
    agent_id            TEXT PRIMARY KEY NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    session_id          TEXT NOT NULL,
    turn                TEXT NOT NULL CHECK (turn IN ('idle', 'busy', 'awaiting_approval')),
    -- Cost of the runs before the current container's, and the current one's so far.
    cost_before_usd     REAL NOT NULL DEFAULT 0,
    run_cost_usd        REAL NOT NULL DEFAULT 0,
    input_tokens        INTEGER NOT NULL DEFAULT 0,
    output_tokens       INTEGER NOT NULL DEFAULT 0,
    results             INTEGER NOT NULL DEFAULT 0,
    -- Whether the CLI began the session (wrote its system/init): later runs resume it.
    started             INTEGER NOT NULL DEFAULT 0,
    last_result         TEXT,
    container_id        TEXT,
    output_cursor       TEXT,
    handshake_container TEXT
);

-- Tool-permission requests of claude-code agents and their decisions. `decision` is
-- NULL while the request is pending.
CREATE TABLE approvals (
    id           TEXT PRIMARY KEY NOT NULL,
    agent_id     TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    container_id TEXT NOT NULL,
    request_id   TEXT NOT NULL,
    tool         TEXT NOT NULL,
    input        TEXT NOT NULL,
    requested_at INTEGER NOT NULL,
    decision     TEXT CHECK (decision IN ('allow', 'deny')),
    message      TEXT,
    decided_by   TEXT,
    decided_at   INTEGER,
    UNIQUE (agent_id, container_id, request_id)
);
CREATE INDEX approvals_pending ON approvals (agent_id) WHERE decision IS NULL;
