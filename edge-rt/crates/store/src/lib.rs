//! The node's one database (SQLite through `rusqlite`): everything the node
//! was told (objects by kind / namespace / name / uid, with resourceVersion
//! and body), the per-kind sync cursor, link state, and the outbox of status
//! and events it must still report.
//!
//! Rules the rest of edge-rt keeps: nothing acts on an object before
//! [`Store::apply`] returned (committed); nothing is reported that is not in
//! the outbox first ([`Store::report`]); an outbox row goes only when the
//! cloud acks it ([`Store::ack`]).
//!
//! Durability: WAL with `synchronous=FULL`. A gateway loses power rather than
//! shutting down, and what edge-rt acked to the cloud or acted on must still
//! be there after the cut; FULL syncs the WAL at every commit, and every
//! writer batches (the sync link per message batch, the reporter once a
//! second), so the cost is one fsync per batch, not per object. NORMAL
//! would lose the last commits on a power cut: harmless for objects (the
//! delta sync resends them) but not for events reported offline.

pub mod churn;
pub mod crypt;
mod schema;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The `[store]` section of the configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Default: `store.db` in the node's data directory.
    pub path: Option<PathBuf>,
    /// The key that seals Secrets at rest. Default: `store.key` in the data
    /// directory, created on first start.
    pub key_file: Option<PathBuf>,
    /// Below this much free space new objects are refused, so status and
    /// events still have room.
    pub min_free_bytes: u64,
    /// Unsent events kept at most; older ones are dropped (and counted).
    pub events_max: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: None,
            key_file: None,
            min_free_bytes: 4 << 20,
            events_max: 5000,
        }
    }
}

impl StoreConfig {
    pub fn db_path(&self, data_dir: &Path) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| data_dir.join("store.db"))
    }

    pub fn key_path(&self, data_dir: &Path) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| data_dir.join("store.key"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store's disk is full ({free} bytes free, {reserve} kept for status and events): new objects are refused until space returns")]
    Full { free: u64, reserve: u64 },
    #[error("store database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store schema: {0}")]
    Schema(#[from] rusqlite_migration::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store key {0}")]
    Key(String),
    #[error("sealed secret: {0}")]
    Crypt(String),
    #[error("invalid object: {0}")]
    Invalid(String),
    #[error("{0} is not a kind the store keeps (pods, configmaps, secrets)")]
    UnknownKind(String),
}

impl StoreError {
    /// The disk (or our reserve on it) is full: try again when space returns.
    pub fn is_full(&self) -> bool {
        match self {
            StoreError::Full { .. } => true,
            StoreError::Sqlite(e) => e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull),
            _ => false,
        }
    }

    fn is_corruption(&self) -> bool {
        match self {
            StoreError::Sqlite(e) => matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
            ),
            StoreError::Schema(rusqlite_migration::Error::RusqliteError { err, .. }) => matches!(
                err.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
            ),
            _ => false,
        }
    }
}

/// The kinds the node keeps: the link's (one definition for both sides).
pub use outrigger_proto::kinds::Kind;

/// A kind as a user spells it: `Pod`, `pod`, `pods`, `po` (kubectl's
/// spellings).
pub fn parse_kind(s: &str) -> Result<Kind, StoreError> {
    match s.to_ascii_lowercase().as_str() {
        "pod" | "pods" | "po" => Ok(Kind::Pod),
        "configmap" | "configmaps" | "cm" => Ok(Kind::ConfigMap),
        "secret" | "secrets" => Ok(Kind::Secret),
        "serviceaccounttoken" | "serviceaccounttokens" | "tokens" => Ok(Kind::ServiceAccountToken),
        "device" | "devices" | "dev" => Ok(Kind::Device),
        "devicemodel" | "devicemodels" | "devmodel" => Ok(Kind::DeviceModel),
        "node" | "nodes" | "no" => Ok(Kind::Node),
        "service" | "services" | "svc" => Ok(Kind::Service),
        "endpointslice" | "endpointslices" => Ok(Kind::EndpointSlice),
        _ => Err(StoreError::UnknownKind(s.to_string())),
    }
}

/// Where an object came from: the cloud (synced; it may change or delete
/// it) or this node's own CLI (`edge-rt apply`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Cloud,
    Local,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Cloud => "cloud",
            Source::Local => "local",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: String,
    pub source: Source,
    /// The object as the API server sent it (JSON).
    pub body: serde_json::Value,
}

impl Object {
    /// Take kind-independent identity from a body's metadata.
    pub fn from_body(
        kind: Kind,
        source: Source,
        body: serde_json::Value,
    ) -> Result<Object, StoreError> {
        let meta = &body["metadata"];
        let field = |f: &str| meta[f].as_str().map(str::to_string);
        let name = field("name").filter(|n| !n.is_empty()).ok_or_else(|| {
            StoreError::Invalid(format!("{} without metadata.name", kind.as_str()))
        })?;
        let uid = field("uid").filter(|u| !u.is_empty()).ok_or_else(|| {
            StoreError::Invalid(format!("{} {name} without metadata.uid", kind.as_str()))
        })?;
        Ok(Object {
            kind,
            namespace: field("namespace").unwrap_or_else(|| "default".into()),
            name,
            uid,
            resource_version: field("resourceVersion").unwrap_or_default(),
            source,
            body,
        })
    }

    fn aad(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.kind.as_str(),
            self.namespace,
            self.name,
            self.uid
        )
    }
}

#[derive(Debug, Clone)]
pub enum Change {
    Put(Object),
    Delete { kind: Kind, uid: String },
}

/// How the outbox keeps a row (the link's classes).
pub use outrigger_proto::report::Class;

/// One row for the outbox. The node's own reports are made from the link's
/// typed ones (`From<&outrigger_proto::report::Report>`); the store itself
/// keeps any (class, key, body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub class: Class,
    pub key: String,
    pub body: serde_json::Value,
}

impl From<&outrigger_proto::report::Report> for Report {
    fn from(r: &outrigger_proto::report::Report) -> Report {
        Report {
            class: r.class(),
            key: r.key(),
            body: r.body(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxRow {
    pub seq: i64,
    pub class: Class,
    pub key: String,
    pub body: serde_json::Value,
    pub created_ms: i64,
}

/// A desired value set at the node over the spec's (see
/// `outrigger_proto::device::LocalDesired`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalDesired {
    /// The device's uid.
    pub uid: String,
    pub property: String,
    pub value: String,
    /// The spec's desired value it was set over.
    pub base: Option<String>,
    pub set_ms: i64,
}

/// An accelerator slot given to one container of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// The resource name (`nvidia.com/gpu`).
    pub resource: String,
    /// The device's id within its resource.
    pub device: String,
    /// Which of the device's shares (0 for an exclusive device).
    pub slot: u32,
    pub pod_uid: String,
    pub container: String,
}

/// The link to the cloud as the node last knew it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkState {
    pub connected: bool,
    /// When it last changed (ms since the epoch; 0: never).
    pub since_ms: i64,
    /// Never connected since the store was created.
    pub ever_connected: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    pub path: PathBuf,
    pub schema_version: usize,
    pub file_bytes: u64,
    pub wal_bytes: u64,
    pub free_pages: u64,
    pub page_size: u64,
    pub objects: BTreeMap<String, u64>,
    pub object_bytes: BTreeMap<String, u64>,
    pub cursors: BTreeMap<String, String>,
    pub outbox_status: u64,
    pub outbox_events: u64,
    pub outbox_bytes: u64,
    pub oldest_unsent_ms: Option<i64>,
    pub events_dropped: u64,
    pub link: LinkState,
}

pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
    key: Option<crypt::Key>,
    cfg: StoreConfig,
    changed: watch::Sender<u64>,
    /// Bumped when the link state changes.
    link_generation: std::sync::atomic::AtomicU64,
    /// Bumped when rows go into the outbox.
    outbox_generation: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// A random version-4 UUID, for objects this node creates itself.
pub fn new_uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Reading the mode touches the header: a file that is not a database
    // fails here, as NotADatabase.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(mode, "the store could not switch to WAL");
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // After a checkpoint the WAL is truncated to this, so a burst does not
    // leave a large file behind on a small flash partition.
    conn.pragma_update(None, "journal_size_limit", 4 << 20)?;
    // A node's store is a few MB, read in full only at start and on change,
    // and the kernel caches its file: 256 KiB of page cache (the default is
    // 2 MB) keeps edge-rt small (a hundred devices' status rows fill it).
    conn.pragma_update(None, "cache_size", -256)?;
    Ok(())
}

/// `PRAGMA quick_check`: the structure of every page and index, in time
/// proportional to the file (milliseconds for a node's store).
fn quick_check(conn: &Connection) -> Result<(), StoreError> {
    let mut stmt = conn.prepare("PRAGMA quick_check")?;
    let problems: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<_, _>>()?;
    if problems.len() == 1 && problems[0] == "ok" {
        return Ok(());
    }
    Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
        Some(problems.join("; ")),
    )))
}

fn open_rw(path: &Path) -> Result<Connection, StoreError> {
    let mut conn = Connection::open(path)?;
    configure(&conn)?;
    quick_check(&conn)?;
    schema::migrations().to_latest(&mut conn)?;
    Ok(conn)
}

/// Move a corrupt store and its WAL aside, so the node starts empty rather
/// than failing at every start.
fn move_aside(path: &Path) -> Result<PathBuf, StoreError> {
    let stamp = jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ");
    let aside = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
    std::fs::rename(path, &aside).map_err(io_err(path))?;
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        if side.exists() {
            let to = PathBuf::from(format!("{}{suffix}", aside.display()));
            std::fs::rename(&side, &to).map_err(io_err(&side))?;
        }
    }
    Ok(aside)
}

fn free_bytes(dir: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(s.blocks_available() as u64 * s.fragment_size() as u64)
}

impl Store {
    /// Open (or create) the store of a node: WAL, FULL sync, foreign keys,
    /// migrations forward. A corrupt file is moved aside with a loud error
    /// and the node starts with an empty store.
    pub fn open(cfg: &StoreConfig, data_dir: &Path) -> Result<Store, StoreError> {
        let path = cfg.db_path(data_dir);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let key = crypt::Key::load_or_create(&cfg.key_path(data_dir))?;
        let conn = match open_rw(&path) {
            Ok(c) => c,
            Err(e) if e.is_corruption() => {
                let aside = move_aside(&path)?;
                tracing::error!(
                    store = %path.display(),
                    moved_to = %aside.display(),
                    error = %e,
                    "THE STORE IS CORRUPT: moved aside, starting with an empty store; \
                     pods come back as the cloud resends them"
                );
                open_rw(&path)?
            }
            Err(e) => return Err(e),
        };
        Ok(Store {
            conn: Mutex::new(conn),
            path,
            key: Some(key),
            cfg: cfg.clone(),
            changed: watch::channel(0).0,
            link_generation: Default::default(),
            outbox_generation: Default::default(),
        })
    }

    /// Open for inspection while a daemon may be running: read-only, no
    /// migrations, and the key only if it is there (Secrets stay sealed
    /// without it).
    pub fn open_read_only(path: &Path, key_file: Option<&Path>) -> Result<Store, StoreError> {
        if !path.exists() {
            return Err(StoreError::Io {
                path: path.into(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no store here"),
            });
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let key = match key_file {
            Some(k) => Some(crypt::Key::load(k)?),
            None => None,
        };
        Ok(Store {
            conn: Mutex::new(conn),
            path: path.into(),
            key,
            cfg: StoreConfig::default(),
            changed: watch::channel(0).0,
            link_generation: Default::default(),
            outbox_generation: Default::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bumped after every commit that changed objects.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Commit a batch of changes (and the cursors they bring the sync to)
    /// in one transaction. A put replaces the object of that uid, and any
    /// other object of the same kind with the same namespace and name (the
    /// API server says the new one is it).
    pub fn apply(&self, changes: &[Change], cursors: &[(Kind, String)]) -> Result<(), StoreError> {
        if changes.iter().any(|c| matches!(c, Change::Put(_))) {
            let dir = self.path.parent().unwrap_or(Path::new("/"));
            if let Some(free) = free_bytes(dir) {
                if free < self.cfg.min_free_bytes {
                    return Err(StoreError::Full {
                        free,
                        reserve: self.cfg.min_free_bytes,
                    });
                }
            }
        }
        let now = now_ms();
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut put = tx.prepare_cached(
                "INSERT OR REPLACE INTO objects
                 (kind, uid, namespace, name, resource_version, source, sealed, body, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            let mut del = tx.prepare_cached("DELETE FROM objects WHERE kind = ?1 AND uid = ?2")?;
            for c in changes {
                match c {
                    Change::Put(o) => {
                        let json = serde_json::to_vec(&o.body)
                            .map_err(|e| StoreError::Invalid(e.to_string()))?;
                        let (sealed, body) = if o.kind.sealed() {
                            let key = self.key.as_ref().ok_or_else(|| {
                                StoreError::Key("not loaded: the store is open read-only".into())
                            })?;
                            (true, key.seal(&o.aad(), &json)?)
                        } else {
                            (false, json)
                        };
                        put.execute(params![
                            o.kind.as_str(),
                            o.uid,
                            o.namespace,
                            o.name,
                            o.resource_version,
                            o.source.as_str(),
                            sealed,
                            body,
                            now
                        ])?;
                    }
                    Change::Delete { kind, uid } => {
                        del.execute(params![kind.as_str(), uid])?;
                    }
                }
            }
            let mut cur = tx.prepare_cached(
                "INSERT OR REPLACE INTO cursors (kind, resource_version, updated_ms) VALUES (?1, ?2, ?3)",
            )?;
            for (kind, rv) in cursors {
                cur.execute(params![kind.as_str(), rv, now])?;
            }
        }
        tx.commit()?;
        drop(conn);
        if !changes.is_empty() {
            self.changed.send_modify(|g| *g += 1);
        }
        Ok(())
    }

    fn row_to_object(&self, r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Object, StoreError>> {
        let kind: String = r.get(0)?;
        let source: String = r.get(5)?;
        let sealed: bool = r.get(6)?;
        let body: Vec<u8> = r.get(7)?;
        let kind = match Kind::from_name(&kind).ok_or(StoreError::UnknownKind(kind)) {
            Ok(k) => k,
            Err(e) => return Ok(Err(e)),
        };
        let mut o = Object {
            kind,
            uid: r.get(1)?,
            namespace: r.get(2)?,
            name: r.get(3)?,
            resource_version: r.get(4)?,
            source: if source == "local" {
                Source::Local
            } else {
                Source::Cloud
            },
            body: serde_json::Value::Null,
        };
        let plain = if sealed {
            match &self.key {
                Some(k) => match k.open(&o.aad(), &body) {
                    Ok(p) => p,
                    Err(e) => return Ok(Err(e)),
                },
                None => {
                    o.body = serde_json::json!({"sealed": true});
                    return Ok(Ok(o));
                }
            }
        } else {
            body
        };
        Ok(match serde_json::from_slice(&plain) {
            Ok(v) => {
                o.body = v;
                Ok(o)
            }
            Err(e) => Err(StoreError::Invalid(format!(
                "{} {}/{}: stored body is not JSON: {e}",
                o.kind.as_str(),
                o.namespace,
                o.name
            ))),
        })
    }

    /// Every object of a kind. One that cannot be read (a Secret sealed with
    /// another key) is logged and left out; the rest still load.
    pub fn objects(&self, kind: Kind) -> Result<Vec<Object>, StoreError> {
        let mut out = Vec::new();
        self.each_object(kind, |o| out.push(o))?;
        Ok(out)
    }

    /// The same, one at a time: a caller that turns each into its own
    /// type never holds every body's JSON tree at once (200 devices' were
    /// the daemon's high-water mark).
    pub fn each_object(&self, kind: Kind, mut f: impl FnMut(Object)) -> Result<(), StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT kind, uid, namespace, name, resource_version, source, sealed, body
             FROM objects WHERE kind = ?1 ORDER BY namespace, name",
        )?;
        for r in stmt.query_map([kind.as_str()], |r| self.row_to_object(r))? {
            match r? {
                Ok(o) => f(o),
                Err(e) => {
                    tracing::error!(kind = kind.as_str(), error = %e, "a stored object cannot be read; skipped")
                }
            }
        }
        Ok(())
    }

    pub fn object(&self, kind: Kind, uid: &str) -> Result<Option<Object>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT kind, uid, namespace, name, resource_version, source, sealed, body
             FROM objects WHERE kind = ?1 AND uid = ?2",
        )?;
        match stmt
            .query_row(params![kind.as_str(), uid], |r| self.row_to_object(r))
            .optional()?
        {
            Some(r) => r.map(Some),
            None => Ok(None),
        }
    }

    pub fn find(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Object>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT kind, uid, namespace, name, resource_version, source, sealed, body
             FROM objects WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
        )?;
        match stmt
            .query_row(params![kind.as_str(), namespace, name], |r| {
                self.row_to_object(r)
            })
            .optional()?
        {
            Some(r) => r.map(Some),
            None => Ok(None),
        }
    }

    /// uid -> resourceVersion of a kind's objects from the cloud: what the
    /// node tells the cloud it has, on every (re)connect.
    pub fn inventory(&self, kind: Kind) -> Result<BTreeMap<String, String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT uid, resource_version FROM objects WHERE kind = ?1 AND source = 'cloud'",
        )?;
        let rows = stmt.query_map([kind.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn cursor(&self, kind: Kind) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT resource_version FROM cursors WHERE kind = ?1",
                [kind.as_str()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Put reports in the outbox, in one transaction. Each (class, key)
    /// keeps only its newest row; past `events_max` events the oldest go.
    /// Returns the rows' sequence numbers, in order.
    pub fn report(&self, reports: &[Report], now_ms: i64) -> Result<Vec<i64>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut seqs = Vec::with_capacity(reports.len());
        let mut events = false;
        {
            let mut del = tx.prepare_cached("DELETE FROM outbox WHERE class = ?1 AND key = ?2")?;
            let mut ins = tx.prepare_cached(
                "INSERT INTO outbox (class, key, body, created_ms) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for r in reports {
                let body =
                    serde_json::to_vec(&r.body).map_err(|e| StoreError::Invalid(e.to_string()))?;
                del.execute(params![r.class.as_str(), r.key])?;
                ins.execute(params![r.class.as_str(), r.key, body, now_ms])?;
                seqs.push(tx.last_insert_rowid());
                events |= r.class == Class::Event;
            }
        }
        if events {
            let over: i64 = tx.query_row(
                "SELECT count(*) - ?1 FROM outbox WHERE class = 'event'",
                [self.cfg.events_max as i64],
                |r| r.get(0),
            )?;
            if over > 0 {
                tx.execute(
                    "DELETE FROM outbox WHERE seq IN
                     (SELECT seq FROM outbox WHERE class = 'event' ORDER BY seq LIMIT ?1)",
                    [over],
                )?;
                tx.execute(
                    "INSERT INTO node_state (key, value) VALUES ('events_dropped', ?1)
                     ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + ?1",
                    [over],
                )?;
            }
        }
        tx.commit()?;
        self.outbox_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(seqs)
    }

    /// Unsent rows after `after_seq`, oldest first.
    pub fn pending(&self, after_seq: i64, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT seq, class, key, body, created_ms FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after_seq, limit as i64], |r| {
            let class: String = r.get(1)?;
            let body: Vec<u8> = r.get(3)?;
            Ok(OutboxRow {
                seq: r.get(0)?,
                class: Class::from_name(&class).unwrap_or(Class::Status),
                key: r.get(2)?,
                body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
                created_ms: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The cloud applied these rows: drop them. Unknown sequence numbers
    /// (replaced by a newer status, or acked twice after a cut) are fine.
    pub fn ack(&self, seqs: &[i64]) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut n = 0;
        {
            let mut del = tx.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?;
            for s in seqs {
                n += del.execute([s])?;
            }
        }
        tx.commit()?;
        Ok(n)
    }

    /// Set desired values at the node (`put`, replacing any set before for
    /// the same property) and drop others (`drop`: (uid, property)), in one
    /// transaction.
    pub fn set_local_desired(
        &self,
        put: &[LocalDesired],
        drop: &[(String, String)],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut ins = tx.prepare_cached(
                "INSERT OR REPLACE INTO device_desired (uid, property, value, base, set_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for d in put {
                ins.execute(params![d.uid, d.property, d.value, d.base, d.set_ms])?;
            }
            let mut del =
                tx.prepare_cached("DELETE FROM device_desired WHERE uid = ?1 AND property = ?2")?;
            for (uid, property) in drop {
                del.execute(params![uid, property])?;
            }
        }
        tx.commit()?;
        std::mem::drop(conn);
        self.changed.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Every desired value set at the node.
    pub fn local_desired(&self) -> Result<Vec<LocalDesired>, StoreError> {
        let conn = self.conn();
        let mut q = conn.prepare_cached(
            "SELECT uid, property, value, base, set_ms FROM device_desired ORDER BY uid, property",
        )?;
        let rows = q.query_map([], |r| {
            Ok(LocalDesired {
                uid: r.get(0)?,
                property: r.get(1)?,
                value: r.get(2)?,
                base: r.get(3)?,
                set_ms: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every accelerator slot given to a container.
    pub fn allocations(&self) -> Result<Vec<Allocation>, StoreError> {
        let conn = self.conn();
        let mut q = conn.prepare_cached(
            "SELECT resource, device, slot, pod_uid, container FROM allocations
             ORDER BY pod_uid, container, resource, device, slot",
        )?;
        let rows = q.query_map([], |r| {
            Ok(Allocation {
                resource: r.get(0)?,
                device: r.get(1)?,
                slot: r.get(2)?,
                pod_uid: r.get(3)?,
                container: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Record slots given (all or none: a slot another container holds
    /// fails the whole transaction) and free every slot of the pods in
    /// `release`, in one transaction. Nothing the node runs follows from
    /// these rows, so no reconcile is woken.
    pub fn set_allocations(
        &self,
        give: &[Allocation],
        release: &[String],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut del = tx.prepare_cached("DELETE FROM allocations WHERE pod_uid = ?1")?;
            for uid in release {
                del.execute([uid])?;
            }
            let mut ins = tx.prepare_cached(
                "INSERT INTO allocations (resource, device, slot, pod_uid, container)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for a in give {
                ins.execute(params![
                    a.resource,
                    a.device,
                    a.slot,
                    a.pod_uid,
                    a.container
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn state<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let v: Option<String> = self
            .conn()
            .query_row("SELECT value FROM node_state WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(v.and_then(|s| serde_json::from_str(&s).ok()))
    }

    fn set_state<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let v = serde_json::to_string(value).map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.conn().execute(
            "INSERT OR REPLACE INTO node_state (key, value) VALUES (?1, ?2)",
            params![key, v],
        )?;
        Ok(())
    }

    /// Changes whenever rows go into the outbox.
    pub fn outbox_generation(&self) -> u64 {
        self.outbox_generation
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Changes whenever the link state does.
    pub fn link_generation(&self) -> u64 {
        self.link_generation
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn link(&self) -> Result<LinkState, StoreError> {
        Ok(self.state("link")?.unwrap_or_default())
    }

    /// Record that the link is up or down. Only a change moves `since_ms`,
    /// so after a reboot the node still knows when it lost the cloud.
    pub fn set_link(&self, connected: bool, at_ms: i64) -> Result<LinkState, StoreError> {
        let cur = self.link()?;
        if cur.connected == connected && cur.since_ms != 0 {
            return Ok(cur);
        }
        let next = LinkState {
            connected,
            since_ms: at_ms,
            ever_connected: cur.ever_connected || connected,
        };
        self.set_state("link", &next)?;
        self.link_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(next)
    }

    pub fn stats(&self) -> Result<Stats, StoreError> {
        let conn = self.conn();
        let pragma = |p: &str| -> Result<u64, StoreError> {
            Ok(conn.query_row(&format!("PRAGMA {p}"), [], |r| r.get::<_, i64>(0))? as u64)
        };
        let schema_version = pragma("user_version")? as usize;
        let page_size = pragma("page_size")?;
        let free_pages = pragma("freelist_count")?;
        let mut objects = BTreeMap::new();
        let mut object_bytes = BTreeMap::new();
        {
            let mut stmt = conn.prepare(
                "SELECT kind, count(*), coalesce(sum(length(body)), 0) FROM objects GROUP BY kind",
            )?;
            for r in stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })? {
                let (k, n, b) = r?;
                objects.insert(k.clone(), n as u64);
                object_bytes.insert(k, b as u64);
            }
        }
        let cursors = {
            let mut stmt = conn.prepare("SELECT kind, resource_version FROM cursors")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let (outbox_status, outbox_events, outbox_bytes, oldest): (i64, i64, i64, Option<i64>) =
            conn.query_row(
                "SELECT count(*) FILTER (WHERE class = 'status'),
                        count(*) FILTER (WHERE class = 'event'),
                        coalesce(sum(length(body)), 0), min(created_ms) FROM outbox",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )?;
        drop(conn);
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        Ok(Stats {
            path: self.path.clone(),
            schema_version,
            file_bytes: size(&self.path),
            wal_bytes: size(Path::new(&format!("{}-wal", self.path.display()))),
            free_pages,
            page_size,
            objects,
            object_bytes,
            cursors,
            outbox_status: outbox_status as u64,
            outbox_events: outbox_events as u64,
            outbox_bytes: outbox_bytes as u64,
            oldest_unsent_ms: oldest,
            events_dropped: self
                .state::<serde_json::Value>("events_dropped")?
                .and_then(|v| v.as_u64())
                .unwrap_or(0),
            link: self.link()?,
        })
    }

    /// `PRAGMA integrity_check` and `foreign_key_check`: every problem found
    /// (empty: none).
    pub fn integrity_check(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("PRAGMA integrity_check")?;
        let mut out: Vec<String> = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|s| s != "ok")
            .collect();
        let mut fk = conn.prepare("PRAGMA foreign_key_check")?;
        for r in fk.query_map([], |r| {
            Ok(format!(
                "foreign key: {} row {:?} refers to a missing {}",
                r.get::<_, String>(0)?,
                r.get::<_, Option<i64>>(1)?,
                r.get::<_, String>(2)?
            ))
        })? {
            out.push(r?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn open(dir: &Path) -> Store {
        Store::open(&StoreConfig::default(), dir).unwrap()
    }

    fn obj(kind: Kind, name: &str, uid: &str, rv: &str, extra: serde_json::Value) -> Object {
        let mut body = json!({"metadata": {"name": name, "namespace": "default", "uid": uid, "resourceVersion": rv}});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        Object::from_body(kind, Source::Cloud, body).unwrap()
    }

    #[test]
    fn objects_round_trip_and_secrets_are_sealed_on_disk() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path());
        let secret = obj(
            Kind::Secret,
            "db",
            "u1",
            "5",
            json!({"data": {"password": "c2VjcmV0LXZhbHVlLTQyNDI="}}),
        );
        s.apply(
            &[
                Change::Put(secret.clone()),
                Change::Put(obj(Kind::Pod, "web", "p1", "7", json!({}))),
            ],
            &[(Kind::Secret, "5".into()), (Kind::Pod, "7".into())],
        )
        .unwrap();
        assert_eq!(s.objects(Kind::Secret).unwrap(), vec![secret]);
        assert_eq!(s.cursor(Kind::Pod).unwrap().as_deref(), Some("7"));
        assert_eq!(
            s.inventory(Kind::Pod)
                .unwrap()
                .get("p1")
                .map(String::as_str),
            Some("7")
        );
        drop(s);
        let raw = std::fs::read(d.path().join("store.db")).unwrap();
        let wal = std::fs::read(d.path().join("store.db-wal")).unwrap_or_default();
        for b in [raw, wal] {
            assert!(!b.windows(12).any(|w| w == b"c2VjcmV0LXZh"));
        }
        // A new name for the same namespace/name replaces the old object.
        let s = open(d.path());
        s.apply(
            &[Change::Put(obj(Kind::Pod, "web", "p2", "9", json!({})))],
            &[],
        )
        .unwrap();
        let pods = s.objects(Kind::Pod).unwrap();
        assert_eq!(pods.len(), 1);
        assert_eq!(pods[0].uid, "p2");
        s.apply(
            &[Change::Delete {
                kind: Kind::Pod,
                uid: "p2".into(),
            }],
            &[],
        )
        .unwrap();
        assert!(s.objects(Kind::Pod).unwrap().is_empty());
        assert!(s.integrity_check().unwrap().is_empty());
    }

    #[test]
    fn local_desired_values_are_replaced_dropped_and_kept_across_opens() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path());
        let mut rx = s.subscribe();
        let v = |p: &str, value: &str, base: Option<&str>| LocalDesired {
            uid: "u1".into(),
            property: p.into(),
            value: value.into(),
            base: base.map(str::to_string),
            set_ms: 5,
        };
        s.set_local_desired(
            &[v("setpoint", "25", Some("21")), v("mode", "1", None)],
            &[],
        )
        .unwrap();
        assert!(rx.has_changed().unwrap(), "a set must wake the daemon");
        rx.mark_unchanged();
        s.set_local_desired(
            &[v("setpoint", "26", Some("21"))],
            &[("u1".into(), "mode".into())],
        )
        .unwrap();
        assert!(rx.has_changed().unwrap());
        drop(s);
        let s = open(d.path());
        assert_eq!(
            s.local_desired().unwrap(),
            vec![v("setpoint", "26", Some("21"))]
        );
    }

    #[test]
    fn status_coalesces_events_ring_and_acks_remove_exactly() {
        let d = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            events_max: 3,
            ..Default::default()
        };
        let s = Store::open(&cfg, d.path()).unwrap();
        let st = |k: &str, v: i32| Report {
            class: Class::Status,
            key: k.into(),
            body: json!({"v": v}),
        };
        let ev = |k: &str| Report {
            class: Class::Event,
            key: k.into(),
            body: json!({}),
        };
        let a = s.report(&[st("pod/a", 1), st("pod/b", 1)], 10).unwrap();
        let b = s.report(&[st("pod/a", 2)], 20).unwrap();
        assert!(b[0] > a[1]);
        let rows = s.pending(0, 100).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].body, json!({"v": 2}));
        s.report(&[ev("e1"), ev("e2"), ev("e3"), ev("e4"), ev("e5")], 30)
            .unwrap();
        let st = s.stats().unwrap();
        assert_eq!(
            (st.outbox_status, st.outbox_events, st.events_dropped),
            (2, 3, 2)
        );
        assert_eq!(st.oldest_unsent_ms, Some(10));
        assert_eq!(s.ack(&[a[0], a[1], b[0]]).unwrap(), 2);
        let keys: Vec<String> = s
            .pending(0, 100)
            .unwrap()
            .into_iter()
            .map(|r| r.key)
            .collect();
        assert_eq!(keys, ["e3", "e4", "e5"]);
    }

    #[test]
    fn link_state_keeps_the_time_of_the_change() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path());
        assert_eq!(s.set_link(false, 100).unwrap().since_ms, 100);
        assert_eq!(s.set_link(false, 200).unwrap().since_ms, 100);
        let up = s.set_link(true, 300).unwrap();
        assert!(up.connected && up.ever_connected);
        assert_eq!(s.set_link(false, 400).unwrap().since_ms, 400);
    }

    #[test]
    fn corrupt_file_is_moved_aside_and_the_store_starts_empty() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = open(d.path());
            s.apply(
                &[Change::Put(obj(Kind::Pod, "web", "p1", "1", json!({})))],
                &[],
            )
            .unwrap();
        }
        let p = d.path().join("store.db");
        // Bytes overwritten over the header and the first pages.
        let mut b = std::fs::read(&p).unwrap();
        for x in b.iter_mut().take(8192) {
            *x = 0x5a;
        }
        std::fs::write(&p, b).unwrap();
        let _ = std::fs::remove_file(d.path().join("store.db-wal"));
        let s = open(d.path());
        assert!(s.objects(Kind::Pod).unwrap().is_empty());
        let aside: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("store.db.corrupt-")
            })
            .collect();
        assert_eq!(aside.len(), 1);
    }

    #[test]
    fn a_newer_schema_is_refused_not_moved_aside() {
        let d = tempfile::tempdir().unwrap();
        drop(open(d.path()));
        let c = Connection::open(d.path().join("store.db")).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let e = Store::open(&StoreConfig::default(), d.path()).unwrap_err();
        assert!(!e.is_corruption(), "{e}");
        assert!(d.path().join("store.db").exists());
    }

    #[test]
    fn a_device_slot_has_one_holder_and_a_failed_grant_gives_nothing() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path());
        let a = |dev: &str, pod: &str| Allocation {
            resource: "nvidia.com/gpu".into(),
            device: dev.into(),
            slot: 0,
            pod_uid: pod.into(),
            container: "c".into(),
        };
        s.set_allocations(&[a("0", "p1")], &[]).unwrap();
        // p2 asks for 1 and 0: 0 is held, so 1 is not given either.
        assert!(s
            .set_allocations(&[a("1", "p2"), a("0", "p2")], &[])
            .is_err());
        assert_eq!(s.allocations().unwrap(), [a("0", "p1")]);
        // Freeing p1 and giving its device to p2 in one step.
        s.set_allocations(&[a("0", "p2")], &["p1".into()]).unwrap();
        drop(s);
        let s = open(d.path());
        assert_eq!(s.allocations().unwrap(), [a("0", "p2")]);
    }
}
