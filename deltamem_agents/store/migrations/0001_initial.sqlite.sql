-- deltamem session store, schema version 1 (SQLite).
-- Applied once, inside one transaction, by deltamem_agents.store.migrate.upgrade.
-- Statements are separated by semicolons; keep semicolons out of comments and literals.

CREATE TABLE sessions (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    session_id VARCHAR(128) NOT NULL,
    namespace VARCHAR(128) NOT NULL,
    model_fingerprint TEXT NOT NULL,
    adapter_fingerprint TEXT NOT NULL,
    version BIGINT NOT NULL,
    turn INTEGER NOT NULL,
    created_at DATETIME NOT NULL,
    updated_at DATETIME NOT NULL,
    metadata JSON NOT NULL,
    CONSTRAINT uq_sessions_namespace_session_id UNIQUE (namespace, session_id)
);

CREATE INDEX ix_sessions_namespace_updated_at ON sessions (namespace, updated_at);

CREATE INDEX ix_sessions_updated_at ON sessions (updated_at);

CREATE TABLE snapshots (
    session_pk INTEGER NOT NULL,
    turn INTEGER NOT NULL,
    created_at DATETIME NOT NULL,
    written_count INTEGER NOT NULL,
    tensor_count INTEGER NOT NULL,
    state_bytes BIGINT NOT NULL,
    window_count INTEGER NOT NULL,
    PRIMARY KEY (session_pk, turn),
    FOREIGN KEY (session_pk) REFERENCES sessions (id) ON DELETE CASCADE
);

CREATE TABLE written_messages (
    session_pk INTEGER NOT NULL,
    turn INTEGER NOT NULL,
    message_index INTEGER NOT NULL,
    role VARCHAR(64) NOT NULL,
    digest VARCHAR(128) NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (session_pk, turn, message_index),
    FOREIGN KEY (session_pk) REFERENCES sessions (id) ON DELETE CASCADE
);

CREATE TABLE state_tensors (
    session_pk INTEGER NOT NULL,
    turn INTEGER NOT NULL,
    position INTEGER NOT NULL,
    name VARCHAR(256) NOT NULL,
    dtype VARCHAR(16) NOT NULL,
    shape JSON NOT NULL,
    data BLOB NOT NULL,
    checksum VARCHAR(64) NOT NULL,
    PRIMARY KEY (session_pk, turn, position),
    CONSTRAINT fk_state_tensors_snapshot FOREIGN KEY (session_pk, turn)
        REFERENCES snapshots (session_pk, turn) ON DELETE CASCADE,
    CONSTRAINT uq_state_tensors_name UNIQUE (session_pk, turn, name)
);

CREATE TABLE window_messages (
    session_pk INTEGER NOT NULL,
    turn INTEGER NOT NULL,
    position INTEGER NOT NULL,
    message_index INTEGER NOT NULL,
    role VARCHAR(64) NOT NULL,
    content TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (session_pk, turn, position),
    CONSTRAINT fk_window_messages_snapshot FOREIGN KEY (session_pk, turn)
        REFERENCES snapshots (session_pk, turn) ON DELETE CASCADE
);
