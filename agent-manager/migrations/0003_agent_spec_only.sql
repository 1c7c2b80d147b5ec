-- An agent's kind, image and restart policy live in its spec (the JSON column) only:
-- the columns that copied them are dropped.
ALTER TABLE agents DROP COLUMN kind;
ALTER TABLE agents DROP COLUMN image;
ALTER TABLE agents DROP COLUMN restart_policy;
