-- deltamem session store, schema version 2: digests that seal every row a load reads, and the written-record
-- summary a turn needs without reading the record (see deltamem_agents/store/digests.py).
-- Existing rows are backfilled in the same transaction by deltamem_agents.store.upgrade_steps (version 2):
-- each turn is checked as schema 1 could check it and sealed if it passes, left unsealed (digest '') if not.
-- Statements are separated by semicolons; keep semicolons out of comments and literals.

ALTER TABLE sessions ADD COLUMN header_digest VARCHAR(64) NOT NULL DEFAULT '';

ALTER TABLE snapshots ADD COLUMN written_tokens BIGINT NOT NULL DEFAULT 0;

ALTER TABLE snapshots ADD COLUMN first_digest VARCHAR(128) NOT NULL DEFAULT '';

ALTER TABLE snapshots ADD COLUMN history_digest VARCHAR(64) NOT NULL DEFAULT '';

ALTER TABLE snapshots ADD COLUMN record_digest VARCHAR(64) NOT NULL DEFAULT '';

ALTER TABLE snapshots ADD COLUMN tensors_digest VARCHAR(64) NOT NULL DEFAULT '';

ALTER TABLE snapshots ADD COLUMN window_digest VARCHAR(64) NOT NULL DEFAULT '';

ALTER TABLE snapshots ADD COLUMN digest VARCHAR(64) NOT NULL DEFAULT ''
