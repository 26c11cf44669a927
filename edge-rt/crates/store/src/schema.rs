//! The schema, as migrations that only ever run forward (the version is
//! SQLite's `user_version`). Add a migration; never edit a released one.

use rusqlite_migration::{Migrations, M};

pub fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(
            r#"
        -- Kinds the node may be told about; objects and cursors must name one.
        CREATE TABLE kinds (name TEXT PRIMARY KEY) WITHOUT ROWID;
        INSERT INTO kinds (name) VALUES ('Pod'), ('ConfigMap'), ('Secret');

        -- Everything the node was told, as the API server sent it. Secrets'
        -- bodies are sealed (sealed = 1).
        CREATE TABLE objects (
            kind             TEXT NOT NULL REFERENCES kinds (name),
            uid              TEXT NOT NULL,
            namespace        TEXT NOT NULL,
            name             TEXT NOT NULL,
            resource_version TEXT NOT NULL,
            source           TEXT NOT NULL CHECK (source IN ('cloud', 'local')),
            sealed           INTEGER NOT NULL DEFAULT 0,
            body             BLOB NOT NULL,
            updated_ms       INTEGER NOT NULL,
            PRIMARY KEY (kind, uid)
        ) WITHOUT ROWID;
        CREATE UNIQUE INDEX objects_by_name ON objects (kind, namespace, name);

        -- How far the sync got, per kind.
        CREATE TABLE cursors (
            kind             TEXT PRIMARY KEY REFERENCES kinds (name),
            resource_version TEXT NOT NULL,
            updated_ms       INTEGER NOT NULL
        ) WITHOUT ROWID;

        -- What must still be reported. A (class, key) has one row: a newer
        -- status replaces the older, unsent one and takes a new sequence
        -- number (AUTOINCREMENT: numbers are never reused, even after acks).
        CREATE TABLE outbox (
            seq        INTEGER PRIMARY KEY AUTOINCREMENT,
            class      TEXT NOT NULL CHECK (class IN ('status', 'event')),
            key        TEXT NOT NULL,
            body       BLOB NOT NULL,
            created_ms INTEGER NOT NULL
        );
        CREATE UNIQUE INDEX outbox_by_key ON outbox (class, key);

        -- Small node facts: link state, counters.
        CREATE TABLE node_state (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
        "#,
        ),
        // Service account tokens for pods' projected volumes (sealed).
        M::up("INSERT INTO kinds (name) VALUES ('ServiceAccountToken');"),
        // Device twins (protocol 1.2).
        M::up("INSERT INTO kinds (name) VALUES ('DeviceModel'), ('Device');"),
        // Desired values set at the node (`edge-rt device set`), each over
        // the spec's desired value it was set over (`base`; NULL: none).
        M::up(
            r#"
        CREATE TABLE device_desired (
            uid      TEXT NOT NULL,
            property TEXT NOT NULL,
            value    TEXT NOT NULL,
            base     TEXT,
            set_ms   INTEGER NOT NULL,
            PRIMARY KEY (uid, property)
        ) WITHOUT ROWID;
        "#,
        ),
        // Accelerators given to pods' containers: a device's slot (0 for an
        // exclusive device; below its share count for a shared one) has
        // one holder, so no device is ever given twice.
        M::up(
            r#"
        CREATE TABLE allocations (
            resource  TEXT NOT NULL,
            device    TEXT NOT NULL,
            slot      INTEGER NOT NULL,
            pod_uid   TEXT NOT NULL,
            container TEXT NOT NULL,
            PRIMARY KEY (resource, device, slot)
        ) WITHOUT ROWID;
        CREATE INDEX allocations_by_pod ON allocations (pod_uid);
        "#,
        ),
        // Services at the edge (protocol 1.4).
        M::up("INSERT INTO kinds (name) VALUES ('Node'), ('Service'), ('EndpointSlice');"),
    ])
}

#[cfg(test)]
mod tests {
    #[test]
    fn migrations_are_valid() {
        assert!(super::migrations().validate().is_ok());
    }
}
