//! The gateway's state: an SQLite database on disk.
//!
//! WAL journal with `synchronous=FULL`: a commit that returned is on disk (WAL with NORMAL can
//! lose an acknowledged commit on power loss), and a crash or SIGKILL at any point leaves a
//! database that opens with every committed transaction. The schema is versioned with
//! `PRAGMA user_version` and forward-only migrations; a database from a newer gateway is refused.
//!
//! One connection behind a mutex serialises the gateway's writes (the admin CLI is another
//! process; `busy_timeout` makes the two wait for each other instead of failing).
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zerospice_ca::fsutil;

use crate::totp::{FailureState, TotpSecret};

pub const DB_FILE: &str = "state.db";

const MIGRATIONS: &[&str] = &[
    // 1: users, certificates, revocations, failure counters, audit trail.
    r#"
    CREATE TABLE users (
        name             TEXT PRIMARY KEY,
        totp_secret      BLOB NOT NULL,
        vms              TEXT NOT NULL DEFAULT '[]',
        pools            TEXT NOT NULL DEFAULT '[]',
        tags             TEXT NOT NULL DEFAULT '[]',
        power            INTEGER NOT NULL DEFAULT 0,
        require_hardware INTEGER NOT NULL DEFAULT 0,
        key_rules        TEXT NOT NULL DEFAULT '{}',
        last_totp_step   INTEGER,
        created_at       INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE certificates (
        serial           TEXT PRIMARY KEY,
        user             TEXT NOT NULL,
        device           TEXT NOT NULL,
        fingerprint      TEXT NOT NULL UNIQUE,
        key_fingerprint  TEXT NOT NULL,
        key_kind         TEXT NOT NULL,
        hardware_serial  INTEGER,
        not_before       INTEGER NOT NULL,
        not_after        INTEGER NOT NULL,
        issued_at        INTEGER NOT NULL,
        der              BLOB NOT NULL
    ) STRICT;
    CREATE INDEX certificates_user ON certificates(user);
    CREATE TABLE revocations (
        serial     TEXT PRIMARY KEY REFERENCES certificates(serial),
        revoked_at INTEGER NOT NULL,
        reason     TEXT NOT NULL
    ) STRICT;
    CREATE TABLE failures (
        scope        TEXT NOT NULL,
        key          TEXT NOT NULL,
        count        INTEGER NOT NULL,
        locked_until INTEGER NOT NULL,
        last_at      INTEGER NOT NULL,
        PRIMARY KEY (scope, key)
    ) STRICT;
    CREATE TABLE audit (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        at      INTEGER NOT NULL,
        event   TEXT NOT NULL,
        user    TEXT,
        device  TEXT,
        serial  TEXT,
        peer    TEXT,
        detail  TEXT NOT NULL DEFAULT '{}'
    ) STRICT;
    CREATE INDEX audit_at ON audit(at);
    "#,
    // 2: the attested PIN and touch policies of a certificate's hardware key (`never`, `once`,
    //    `always` / `never`, `cached`, `always`), so renewal can check the user's current key
    //    rules. NULL for software keys and for certificates issued before this migration.
    r#"
    ALTER TABLE certificates ADD COLUMN pin_policy TEXT;
    ALTER TABLE certificates ADD COLUMN touch_policy TEXT;
    "#,
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("user {0:?} already exists")]
    UserExists(String),
    #[error("no user named {0:?}")]
    NoSuchUser(String),
    #[error("no certificate with serial {0}")]
    NoSuchCertificate(String),
    #[error("the database {path} has schema version {found}, newer than this gateway knows ({known}): upgrade zerospice-gateway")]
    SchemaTooNew {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("the database {0} does not exist: run `zerospice-gateway init` first")]
    Missing(String),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Perm(#[from] fsutil::PermError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Per-user access rules and key requirements.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserPolicy {
    pub vms: Vec<u32>,
    pub pools: Vec<String>,
    pub tags: Vec<String>,
    /// May start and shut down the VMs they may use.
    pub power: bool,
    /// Must enroll with an attested hardware key.
    pub require_hardware: bool,
    /// Further rules on hardware keys.
    pub key_rules: KeyRules,
}

/// Rules on attested hardware keys (checked at enrollment).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRules {
    /// Minimum PIN policy: `once` or `always`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_pin_policy: Option<String>,
    /// Minimum touch policy: `cached` or `always`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_touch_policy: Option<String>,
    /// Only these YubiKey serials (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_serials: Vec<u32>,
}

#[derive(Debug)]
pub struct UserRecord {
    pub name: String,
    pub totp_secret: TotpSecret,
    pub policy: UserPolicy,
    pub last_totp_step: Option<i64>,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertRecord {
    pub serial: String,
    pub user: String,
    pub device: String,
    pub fingerprint: String,
    pub key_fingerprint: String,
    pub key_kind: String,
    pub hardware_serial: Option<u32>,
    /// The attested PIN policy of a hardware key (`None`: software key, or not recorded).
    pub pin_policy: Option<String>,
    /// The attested touch policy of a hardware key (`None`: software key, or not recorded).
    pub touch_policy: Option<String>,
    pub not_before: i64,
    pub not_after: i64,
    pub issued_at: i64,
    pub revoked_at: Option<i64>,
    pub revoke_reason: Option<String>,
    /// Whether the certificate's user still exists.
    pub user_exists: bool,
}

/// What the access endpoint needs to know about a presented certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertStatus {
    /// Not issued by this gateway's database (e.g. a restored CA with another database).
    Unknown,
    Revoked {
        at: i64,
        reason: String,
    },
    UserRemoved,
    Active,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    User,
    Address,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Scope::User => "user",
            Scope::Address => "addr",
        }
    }
}

/// One audit record to write.
#[derive(Debug, Clone, Default)]
pub struct AuditEvent {
    pub event: &'static str,
    pub user: Option<String>,
    pub device: Option<String>,
    pub serial: Option<String>,
    pub peer: Option<String>,
    pub detail: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    pub id: i64,
    pub at: i64,
    pub event: String,
    pub user: Option<String>,
    pub device: Option<String>,
    pub serial: Option<String>,
    pub peer: Option<String>,
    pub detail: serde_json::Value,
}

#[derive(Debug, Clone)]
pub struct NewCertificate {
    pub serial: String,
    pub user: String,
    pub device: String,
    pub fingerprint: String,
    pub key_fingerprint: String,
    pub key_kind: String,
    pub hardware_serial: Option<u32>,
    /// The attested PIN policy of a hardware key (`None` for software keys).
    pub pin_policy: Option<String>,
    /// The attested touch policy of a hardware key (`None` for software keys).
    pub touch_policy: Option<String>,
    pub not_before: i64,
    pub not_after: i64,
    pub issued_at: i64,
    pub der: Vec<u8>,
}

pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.path.display())
    }
}

/// A write transaction (`BEGIN IMMEDIATE`): everything in it commits together or not at all.
pub struct Tx<'a>(rusqlite::Transaction<'a>);

impl Store {
    /// Creates the database file (0600) if needed and opens it.
    pub fn create(path: &Path) -> Result<Self, StoreError> {
        fsutil::touch_private(path)?;
        Self::open_inner(path)
    }

    /// Opens an existing database, refusing loose permissions.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing(path.display().to_string()));
        }
        fsutil::check_private_file(path)?;
        Self::open_inner(path)
    }

    fn open_inner(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let store = Self {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        };
        store.migrate()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-written transaction (SQLite rolls
        // back an unfinished transaction), so the connection is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::SchemaTooNew {
                path: self.path.display().to_string(),
                found: version,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Runs `f` in one write transaction; commits if it returns `Ok`.
    pub fn write<T, E>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T, E>) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::from)?;
        let tx = Tx(tx);
        let out = f(&tx)?;
        tx.0.commit().map_err(StoreError::from)?;
        Ok(out)
    }

    /// Runs `f` on the tokio blocking pool (SQLite and fsync block).
    pub async fn run<T, F>(self: &Arc<Self>, f: F) -> T
    where
        F: FnOnce(&Store) -> T + Send + 'static,
        T: Send + 'static,
    {
        let store = Arc::clone(self);
        match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    // ---- users ----

    pub fn add_user(
        &self,
        name: &str,
        secret: &TotpSecret,
        policy: &UserPolicy,
        now: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            if tx.user(name)?.is_some() {
                return Err(StoreError::UserExists(name.to_owned()));
            }
            tx.0.execute(
                "INSERT INTO users (name, totp_secret, vms, pools, tags, power, require_hardware, key_rules, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    name,
                    secret.expose_bytes(),
                    json(&policy.vms),
                    json(&policy.pools),
                    json(&policy.tags),
                    policy.power,
                    policy.require_hardware,
                    json(&policy.key_rules),
                    now
                ],
            )?;
            tx.audit(
                now,
                &AuditEvent {
                    event: "user.added",
                    user: Some(name.to_owned()),
                    detail: serde_json::to_value(policy).unwrap_or_default(),
                    ..Default::default()
                },
            )
        })
    }

    pub fn user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        self.write(|tx| tx.user(name))
    }

    pub fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!("{USER_SELECT} ORDER BY name"))?;
        let rows = stmt.query_map([], user_from_row)?;
        rows.map(|r| r.map_err(StoreError::from).and_then(|r| r))
            .collect()
    }

    /// Removes a user and revokes all their certificates in the same transaction.
    pub fn remove_user(&self, name: &str, now: i64) -> Result<Vec<String>, StoreError> {
        self.write(|tx| {
            if tx.user(name)?.is_none() {
                return Err(StoreError::NoSuchUser(name.to_owned()));
            }
            let revoked = tx.revoke_user(name, "user removed", now)?;
            tx.0.execute("DELETE FROM users WHERE name = ?1", [name])?;
            tx.0.execute(
                "DELETE FROM failures WHERE scope = 'user' AND key = ?1",
                [name],
            )?;
            tx.audit(
                now,
                &AuditEvent {
                    event: "user.removed",
                    user: Some(name.to_owned()),
                    detail: serde_json::json!({ "revoked": revoked }),
                    ..Default::default()
                },
            )?;
            Ok(revoked)
        })
    }

    /// Replaces a user's TOTP secret; the old authenticator entry stops working at once.
    pub fn reset_totp(&self, name: &str, secret: &TotpSecret, now: i64) -> Result<(), StoreError> {
        self.write(|tx| {
            let n = tx.0.execute(
                "UPDATE users SET totp_secret = ?2, last_totp_step = NULL WHERE name = ?1",
                params![name, secret.expose_bytes()],
            )?;
            if n == 0 {
                return Err(StoreError::NoSuchUser(name.to_owned()));
            }
            tx.0.execute(
                "DELETE FROM failures WHERE scope = 'user' AND key = ?1",
                [name],
            )?;
            tx.audit(
                now,
                &AuditEvent {
                    event: "user.totp_reset",
                    user: Some(name.to_owned()),
                    ..Default::default()
                },
            )
        })
    }

    pub fn set_policy(&self, name: &str, policy: &UserPolicy, now: i64) -> Result<(), StoreError> {
        self.write(|tx| {
            let n = tx.0.execute(
                "UPDATE users SET vms = ?2, pools = ?3, tags = ?4, power = ?5, require_hardware = ?6, key_rules = ?7
                 WHERE name = ?1",
                params![
                    name,
                    json(&policy.vms),
                    json(&policy.pools),
                    json(&policy.tags),
                    policy.power,
                    policy.require_hardware,
                    json(&policy.key_rules)
                ],
            )?;
            if n == 0 {
                return Err(StoreError::NoSuchUser(name.to_owned()));
            }
            tx.audit(
                now,
                &AuditEvent {
                    event: "user.updated",
                    user: Some(name.to_owned()),
                    detail: serde_json::to_value(policy).unwrap_or_default(),
                    ..Default::default()
                },
            )
        })
    }

    // ---- certificates ----

    pub fn certificates(&self, user: Option<&str>) -> Result<Vec<CertRecord>, StoreError> {
        let conn = self.lock();
        let sql = format!(
            "{CERT_SELECT} WHERE (?1 IS NULL OR c.user = ?1) ORDER BY c.issued_at, c.serial"
        );
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map([user], cert_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn certificate(&self, serial: &str) -> Result<Option<CertRecord>, StoreError> {
        let conn = self.lock();
        let sql = format!("{CERT_SELECT} WHERE c.serial = ?1");
        Ok(conn.query_row(&sql, [serial], cert_from_row).optional()?)
    }

    /// Whether a presented certificate may be used now (apart from its validity dates, which
    /// the TLS layer and the caller check).
    pub fn cert_status(&self, serial: &str) -> Result<CertStatus, StoreError> {
        Ok(match self.certificate(serial)? {
            None => CertStatus::Unknown,
            Some(c) => match (c.revoked_at, c.revoke_reason) {
                (Some(at), Some(reason)) => CertStatus::Revoked { at, reason },
                _ if !c.user_exists => CertStatus::UserRemoved,
                _ => CertStatus::Active,
            },
        })
    }

    /// Revokes one certificate. Returns false if it was already revoked.
    pub fn revoke(&self, serial: &str, reason: &str, now: i64) -> Result<bool, StoreError> {
        self.write(|tx| {
            let Some(cert) = tx.0.query_row(
                "SELECT user, device FROM certificates WHERE serial = ?1",
                [serial],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
            )
            .optional()?
            else {
                return Err(StoreError::NoSuchCertificate(serial.to_owned()));
            };
            let n = tx.0.execute(
                "INSERT OR IGNORE INTO revocations (serial, revoked_at, reason) VALUES (?1, ?2, ?3)",
                params![serial, now, reason],
            )?;
            if n > 0 {
                tx.audit(
                    now,
                    &AuditEvent {
                        event: "cert.revoked",
                        user: Some(cert.0),
                        device: Some(cert.1),
                        serial: Some(serial.to_owned()),
                        detail: serde_json::json!({ "reason": reason }),
                        ..Default::default()
                    },
                )?;
            }
            Ok(n > 0)
        })
    }

    pub fn revoke_user(
        &self,
        user: &str,
        reason: &str,
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        self.write(|tx| tx.revoke_user(user, reason, now))
    }

    /// Serials revoked at or after `since` (the access endpoint polls this to close connections).
    pub fn revoked_since(&self, since: i64) -> Result<Vec<String>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare("SELECT serial FROM revocations WHERE revoked_at >= ?1")?;
        let rows = stmt.query_map([since], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- audit ----

    pub fn audit(&self, now: i64, event: &AuditEvent) -> Result<(), StoreError> {
        self.write(|tx| tx.audit(now, event))
    }

    /// The newest `limit` audit records, oldest first.
    pub fn audit_log(
        &self,
        limit: u32,
        user: Option<&str>,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT id, at, event, user, device, serial, peer, detail FROM (
                SELECT * FROM audit WHERE (?2 IS NULL OR user = ?2) ORDER BY id DESC LIMIT ?1
             ) ORDER BY id",
        )?;
        let rows = stmt.query_map(params![limit, user], |r| {
            let detail: String = r.get(7)?;
            Ok(AuditRecord {
                id: r.get(0)?,
                at: r.get(1)?,
                event: r.get(2)?,
                user: r.get(3)?,
                device: r.get(4)?,
                serial: r.get(5)?,
                peer: r.get(6)?,
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Runs SQLite's integrity check (used by tests after a crash, and by `check`).
    pub fn integrity_check(&self) -> Result<String, StoreError> {
        let conn = self.lock();
        Ok(conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
    }
}

const USER_SELECT: &str = "SELECT name, totp_secret, vms, pools, tags, power, require_hardware, key_rules, last_totp_step, created_at FROM users";

const CERT_SELECT: &str =
    "SELECT c.serial, c.user, c.device, c.fingerprint, c.key_fingerprint, c.key_kind,
        c.hardware_serial, c.not_before, c.not_after, c.issued_at, r.revoked_at, r.reason,
        EXISTS (SELECT 1 FROM users u WHERE u.name = c.user), c.pin_policy, c.touch_policy
     FROM certificates c LEFT JOIN revocations r ON r.serial = c.serial";

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn parse_json<T: for<'de> Deserialize<'de>>(what: &str, s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn user_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<UserRecord, StoreError>> {
    let name: String = r.get(0)?;
    let secret: Vec<u8> = r.get(1)?;
    let vms: String = r.get(2)?;
    let pools: String = r.get(3)?;
    let tags: String = r.get(4)?;
    let key_rules: String = r.get(7)?;
    let power: bool = r.get(5)?;
    let require_hardware: bool = r.get(6)?;
    let last_totp_step: Option<i64> = r.get(8)?;
    let created_at: i64 = r.get(9)?;
    Ok((|| {
        Ok(UserRecord {
            policy: UserPolicy {
                vms: parse_json("users.vms", &vms)?,
                pools: parse_json("users.pools", &pools)?,
                tags: parse_json("users.tags", &tags)?,
                power,
                require_hardware,
                key_rules: parse_json("users.key_rules", &key_rules)?,
            },
            name,
            totp_secret: TotpSecret::from_bytes(secret),
            last_totp_step,
            created_at,
        })
    })())
}

fn cert_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CertRecord> {
    Ok(CertRecord {
        serial: r.get(0)?,
        user: r.get(1)?,
        device: r.get(2)?,
        fingerprint: r.get(3)?,
        key_fingerprint: r.get(4)?,
        key_kind: r.get(5)?,
        hardware_serial: r.get(6)?,
        not_before: r.get(7)?,
        not_after: r.get(8)?,
        issued_at: r.get(9)?,
        revoked_at: r.get(10)?,
        revoke_reason: r.get(11)?,
        user_exists: r.get(12)?,
        pin_policy: r.get(13)?,
        touch_policy: r.get(14)?,
    })
}

impl Tx<'_> {
    pub fn user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        let sql = format!("{USER_SELECT} WHERE name = ?1");
        self.0
            .query_row(&sql, [name], user_from_row)
            .optional()?
            .transpose()
    }

    pub fn failure(&self, scope: Scope, key: &str) -> Result<FailureState, StoreError> {
        Ok(self
            .0
            .query_row(
                "SELECT count, locked_until FROM failures WHERE scope = ?1 AND key = ?2",
                params![scope.as_str(), key],
                |r| {
                    Ok(FailureState {
                        count: r.get(0)?,
                        locked_until: r.get(1)?,
                    })
                },
            )
            .optional()?
            .unwrap_or_default())
    }

    pub fn set_failure(
        &self,
        scope: Scope,
        key: &str,
        state: FailureState,
        now: i64,
    ) -> Result<(), StoreError> {
        self.0.execute(
            "INSERT INTO failures (scope, key, count, locked_until, last_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (scope, key) DO UPDATE SET count = ?3, locked_until = ?4, last_at = ?5",
            params![scope.as_str(), key, state.count, state.locked_until, now],
        )?;
        Ok(())
    }

    pub fn clear_failures(&self, scope: Scope, key: &str) -> Result<(), StoreError> {
        self.0.execute(
            "DELETE FROM failures WHERE scope = ?1 AND key = ?2",
            params![scope.as_str(), key],
        )?;
        Ok(())
    }

    /// Records that `step` was accepted for `user`; it and older steps can never be used again.
    pub fn consume_step(&self, user: &str, step: i64) -> Result<(), StoreError> {
        self.0.execute(
            "UPDATE users SET last_totp_step = ?2 WHERE name = ?1",
            params![user, step],
        )?;
        Ok(())
    }

    pub fn insert_certificate(&self, c: &NewCertificate) -> Result<(), StoreError> {
        self.0.execute(
            "INSERT INTO certificates (serial, user, device, fingerprint, key_fingerprint, key_kind,
                hardware_serial, not_before, not_after, issued_at, der, pin_policy, touch_policy)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                c.serial,
                c.user,
                c.device,
                c.fingerprint,
                c.key_fingerprint,
                c.key_kind,
                c.hardware_serial,
                c.not_before,
                c.not_after,
                c.issued_at,
                c.der,
                c.pin_policy,
                c.touch_policy
            ],
        )?;
        Ok(())
    }

    fn revoke_user(&self, user: &str, reason: &str, now: i64) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.0.prepare(
            "SELECT c.serial FROM certificates c LEFT JOIN revocations r ON r.serial = c.serial
             WHERE c.user = ?1 AND r.serial IS NULL ORDER BY c.serial",
        )?;
        let serials: Vec<String> = stmt
            .query_map([user], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for s in &serials {
            self.0.execute(
                "INSERT INTO revocations (serial, revoked_at, reason) VALUES (?1, ?2, ?3)",
                params![s, now, reason],
            )?;
            self.audit(
                now,
                &AuditEvent {
                    event: "cert.revoked",
                    user: Some(user.to_owned()),
                    serial: Some(s.clone()),
                    detail: serde_json::json!({ "reason": reason }),
                    ..Default::default()
                },
            )?;
        }
        Ok(serials)
    }

    /// Writes an audit record (and emits it on the `zerospice::audit` tracing target).
    pub fn audit(&self, now: i64, e: &AuditEvent) -> Result<(), StoreError> {
        crate::audit::emit(e);
        self.0.execute(
            "INSERT INTO audit (at, event, user, device, serial, peer, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                now,
                e.event,
                e.user,
                e.device,
                e.serial,
                e.peer,
                serde_json::to_string(&e.detail).unwrap_or_else(|_| "{}".into())
            ],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::create(&d.path().join(DB_FILE)).unwrap();
        (d, s)
    }

    fn cert(serial: &str, user: &str) -> NewCertificate {
        NewCertificate {
            serial: serial.into(),
            user: user.into(),
            device: "d".into(),
            fingerprint: format!("fp-{serial}"),
            key_fingerprint: "k".into(),
            key_kind: "software".into(),
            hardware_serial: None,
            pin_policy: None,
            touch_policy: None,
            not_before: 0,
            not_after: 100,
            issued_at: 1,
            der: vec![1],
        }
    }

    #[test]
    fn users_round_trip_and_names_are_unique() {
        let (_d, s) = store();
        let secret = TotpSecret::from_bytes(vec![7; 20]);
        let policy = UserPolicy {
            vms: vec![100, 101],
            pools: vec!["lab".into()],
            tags: vec!["spice".into()],
            power: true,
            require_hardware: true,
            key_rules: KeyRules {
                min_touch_policy: Some("always".into()),
                ..Default::default()
            },
        };
        s.add_user("alice", &secret, &policy, 10).unwrap();
        assert!(matches!(
            s.add_user("alice", &secret, &policy, 11),
            Err(StoreError::UserExists(_))
        ));
        let u = s.user("alice").unwrap().unwrap();
        assert_eq!(u.policy, policy);
        assert_eq!(u.totp_secret.expose_bytes(), &[7; 20]);
        assert_eq!(u.last_totp_step, None);
        assert!(s.user("bob").unwrap().is_none());
        assert_eq!(s.users().unwrap().len(), 1);
    }

    #[test]
    fn removing_a_user_revokes_their_certificates() {
        let (_d, s) = store();
        s.add_user(
            "alice",
            &TotpSecret::from_bytes(vec![1; 20]),
            &Default::default(),
            0,
        )
        .unwrap();
        s.write(|tx| tx.insert_certificate(&cert("aa", "alice")))
            .unwrap();
        assert_eq!(s.cert_status("aa").unwrap(), CertStatus::Active);
        assert_eq!(s.cert_status("bb").unwrap(), CertStatus::Unknown);
        assert_eq!(s.remove_user("alice", 5).unwrap(), vec!["aa".to_string()]);
        assert!(matches!(
            s.cert_status("aa").unwrap(),
            CertStatus::Revoked { at: 5, .. }
        ));
        assert!(matches!(
            s.remove_user("alice", 6),
            Err(StoreError::NoSuchUser(_))
        ));
        let events: Vec<_> = s
            .audit_log(10, None)
            .unwrap()
            .into_iter()
            .map(|a| a.event)
            .collect();
        assert_eq!(events, ["user.added", "cert.revoked", "user.removed"]);
    }

    #[test]
    fn revocation_is_idempotent() {
        let (_d, s) = store();
        s.add_user(
            "a",
            &TotpSecret::from_bytes(vec![1; 20]),
            &Default::default(),
            0,
        )
        .unwrap();
        s.write(|tx| tx.insert_certificate(&cert("0a", "a")))
            .unwrap();
        assert!(s.revoke("0a", "lost laptop", 3).unwrap());
        assert!(!s.revoke("0a", "again", 4).unwrap());
        assert!(matches!(
            s.revoke("ff", "x", 4),
            Err(StoreError::NoSuchCertificate(_))
        ));
        assert_eq!(s.revoked_since(3).unwrap(), vec!["0a".to_string()]);
        assert!(s.revoked_since(4).unwrap().is_empty());
        let c = s.certificate("0a").unwrap().unwrap();
        assert_eq!(c.revoke_reason.as_deref(), Some("lost laptop"));
    }

    #[test]
    fn failures_persist_and_transactions_roll_back() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(DB_FILE);
        {
            let s = Store::create(&path).unwrap();
            s.write(|tx| {
                tx.set_failure(
                    Scope::User,
                    "alice",
                    FailureState {
                        count: 3,
                        locked_until: 99,
                    },
                    1,
                )
            })
            .unwrap();
            // An error inside the closure rolls everything back.
            let r: Result<(), StoreError> = s.write(|tx| {
                tx.set_failure(Scope::User, "bob", FailureState::default(), 1)?;
                Err(StoreError::Corrupt("boom".into()))
            });
            assert!(r.is_err());
        }
        let s = Store::open(&path).unwrap();
        s.write(|tx| {
            assert_eq!(
                tx.failure(Scope::User, "alice")?,
                FailureState {
                    count: 3,
                    locked_until: 99
                }
            );
            assert_eq!(tx.failure(Scope::User, "bob")?, FailureState::default());
            Ok::<_, StoreError>(())
        })
        .unwrap();
        assert_eq!(s.integrity_check().unwrap(), "ok");
    }

    #[test]
    fn a_version_1_database_gains_the_policy_columns_and_keeps_its_certificates() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(DB_FILE);
        {
            // A database as the first release left it: migration 1 only, one certificate.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO certificates (serial, user, device, fingerprint, key_fingerprint,
                    key_kind, hardware_serial, not_before, not_after, issued_at, der)
                 VALUES ('0a', 'a', 'd', 'fp', 'k', 'yubikey', 7, 0, 100, 1, x'01')",
                [],
            )
            .unwrap();
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = Store::open(&path).unwrap();
        let version: i64 = s
            .lock()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let old = s.certificate("0a").unwrap().unwrap();
        assert_eq!(old.hardware_serial, Some(7));
        assert_eq!((old.pin_policy, old.touch_policy), (None, None));
        // New certificates keep their policies.
        let mut c = cert("0b", "a");
        c.key_kind = "yubikey".into();
        c.hardware_serial = Some(7);
        c.pin_policy = Some("once".into());
        c.touch_policy = Some("cached".into());
        s.write(|tx| tx.insert_certificate(&c)).unwrap();
        let new = s.certificate("0b").unwrap().unwrap();
        assert_eq!(new.pin_policy.as_deref(), Some("once"));
        assert_eq!(new.touch_policy.as_deref(), Some("cached"));
    }

    #[test]
    fn newer_schema_is_refused_and_loose_permissions_too() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(DB_FILE);
        {
            let s = Store::create(&path).unwrap();
            s.lock().pragma_update(None, "user_version", 99).unwrap();
        }
        let e = Store::open(&path).unwrap_err().to_string();
        assert!(e.contains("schema version 99"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Store::open(&path).unwrap_err().to_string();
        assert!(e.contains("mode 0644"), "{e}");
        let e = Store::open(&d.path().join("nope.db"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("zerospice-gateway init"), "{e}");
    }
}
