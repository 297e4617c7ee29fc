//! What verify needs to know besides the key row — the settings (`last_used_resolution`,
//! the key format), the oids of `keypal.keys`, its hash index and `keypal.verify_result`,
//! and the attnums of the columns it reads — cached per backend.
//!
//! The cache is dropped whenever `keypal.settings`, `keypal.keys` or its hash index is
//! invalidated in the relation cache (DDL, REINDEX, VACUUM's statistics, …). For settings, a
//! statement trigger on `keypal.settings` (fired by `keypal_configure`, a restore, any DML)
//! sends that invalidation, and DROP EXTENSION sends it too. Other backends receive it when
//! verify next runs (it reads the invalidation queue first), so a committed change is seen by
//! the next verify everywhere, inside an open transaction too, and the reload reads under a
//! fresh snapshot; in the changing transaction it is seen from the next command on.

use crate::keys;
use crate::scan::Index;
use crate::spi::{Connection, Stmt};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// The columns of keypal.keys verify reads, by name (their attnums are looked up, so a
/// later ALTER TABLE cannot shift them under us).
pub const KEY_COLUMNS: [&str; 23] = [
    "id",
    "owner_id",
    "org_id",
    "env",
    "name",
    "scopes",
    "resources",
    "tags",
    "metadata",
    "expires_at",
    "key_hash",
    "enabled",
    "revoked_at",
    "parent_id",
    "allowed_ips",
    "blocked_ips",
    "allowed_regions",
    "blocked_regions",
    "rate_limit",
    "quota",
    "policy",
    "disable_at",
    "revoke_at",
];
/// The index of key_hash in KEY_COLUMNS.
pub const KEY_HASH: usize = 10;

pub struct Catalog {
    pub settings_relid: pg_sys::Oid,
    /// keypal.keys by its unique key_hash index, and by its primary key (id).
    pub keys_by_hash: Index,
    pub keys_by_id: Index,
    /// keypal.quota_usage by key_id, and the attnums of its period_start and used.
    pub quota_by_key: Index,
    pub quota_attnums: [i16; 2],
    /// attnum (1-based) of each of KEY_COLUMNS in keypal.keys.
    pub attnums: [i16; KEY_COLUMNS.len()],
    pub result_type: pg_sys::Oid,
    pub last_used_resolution_us: i64,
    pub length: usize,
    pub alphabet: Vec<u8>,
    /// The alphabet as configured (ranges not expanded), the hash algorithm of new keys and
    /// the default environment: what keypal.create_keys makes a key with.
    pub alphabet_spec: String,
    pub algorithm: String,
    pub default_env: Option<String>,
    /// The INSERT trigger on keypal.keys runs WHEN NOT keypal.audit_written() (0.6.0 on):
    /// keypal.create_keys records its keys itself. An older schema's trigger records them.
    pub audited_by_create: bool,
    /// keypal.keys has no BEFORE INSERT row trigger (a key's row is written as given, so its
    /// audit row and event can be built from the same values) and no INSERT rule (which
    /// PostgreSQL refuses in a WITH's INSERT): one key can be one statement.
    pub inserted_as_given: bool,
    pub prefixes: Vec<String>,
    /// keypal_configure(checksum => true): new keys end in a checksum.
    pub checksum: bool,
    /// The shapes keys were issued in (settings.issued and the current one): verify refuses
    /// a key without a lookup only when it can be none of them (keys::refuse_unlooked).
    /// Empty when that check is off: no shape had a checksum, or keys were imported.
    pub unlooked_shapes: Vec<keys::Shape>,
    /// keypal_configure(rate_limit => …), environments, and the policies' rate limits
    /// ({"name": limit}).
    pub default_rate_limit: Option<serde_json::Value>,
    pub environments: Option<serde_json::Value>,
    pub policy_rate_limits: Option<serde_json::Value>,
    pub policies_relid: pg_sys::Oid,
    /// keypal_configure(limit_split => n): the servers sharing each limit (1: not shared).
    pub limit_split: i64,
}

static LOAD: Stmt = Stmt::new(
    c"SELECT 'keypal.settings'::pg_catalog.regclass::pg_catalog.oid,
             'keypal.verify_result'::pg_catalog.regtype::pg_catalog.oid,
             (EXTRACT(epoch FROM c.last_used_resolution) * 1000000)::pg_catalog.int8,
             c.length, c.alphabet,
             ARRAY[c.prefix] OPERATOR(pg_catalog.||) coalesce(
                 (SELECT pg_catalog.array_agg(coalesce(e.value OPERATOR(pg_catalog.->>) 'prefix', c.prefix))
                    FROM pg_catalog.jsonb_each(c.environments) e), '{}'),
             'keypal.keys'::pg_catalog.regclass::pg_catalog.oid,
             (SELECT i.indexrelid FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a
                  ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid AND a.attname OPERATOR(pg_catalog.=) 'key_hash'
               WHERE i.indrelid OPERATOR(pg_catalog.=) 'keypal.keys'::pg_catalog.regclass
                 AND i.indisunique AND i.indisvalid AND i.indnatts OPERATOR(pg_catalog.=) 1
                 AND i.indkey[0] OPERATOR(pg_catalog.=) a.attnum
               LIMIT 1),
             (SELECT pg_catalog.array_agg(a.attnum ORDER BY u.n)
                FROM pg_catalog.unnest($1) WITH ORDINALITY AS u(name, n)
                LEFT JOIN pg_catalog.pg_attribute a
                  ON a.attrelid OPERATOR(pg_catalog.=) 'keypal.keys'::pg_catalog.regclass
                 AND a.attname OPERATOR(pg_catalog.=) u.name AND NOT a.attisdropped),
             c.rate_limit, c.environments,
             (SELECT pg_catalog.jsonb_object_agg(p.name, p.rate_limit) FROM keypal.policies p
               WHERE p.rate_limit IS NOT NULL),
             'keypal.policies'::pg_catalog.regclass::pg_catalog.oid,
             'keypal.quota_usage'::pg_catalog.regclass::pg_catalog.oid,
             (SELECT i.indexrelid FROM pg_catalog.pg_index i
               WHERE i.indrelid OPERATOR(pg_catalog.=) 'keypal.quota_usage'::pg_catalog.regclass
                 AND i.indisprimary),
             (SELECT pg_catalog.array_agg(a.attnum ORDER BY u.n)
                FROM pg_catalog.unnest('{key_id,period_start,used}'::pg_catalog.text[])
                     WITH ORDINALITY AS u(name, n)
                LEFT JOIN pg_catalog.pg_attribute a
                  ON a.attrelid OPERATOR(pg_catalog.=) 'keypal.quota_usage'::pg_catalog.regclass
                 AND a.attname OPERATOR(pg_catalog.=) u.name AND NOT a.attisdropped),
             (SELECT i.indexrelid FROM pg_catalog.pg_index i
               WHERE i.indrelid OPERATOR(pg_catalog.=) 'keypal.keys'::pg_catalog.regclass
                 AND i.indisprimary),
             -- (read by name: a schema not yet updated to one with the columns has none)
             coalesce((pg_catalog.to_jsonb(c) OPERATOR(pg_catalog.->>) 'checksum')::pg_catalog.bool, false),
             pg_catalog.to_jsonb(c) OPERATOR(pg_catalog.->) 'issued',
             coalesce((pg_catalog.to_jsonb(c) OPERATOR(pg_catalog.->>) 'limit_split')::pg_catalog.int4, 1),
             c.algorithm, c.default_env,
             -- (0.6.0 on: the INSERT trigger leaves keypal.create_keys' keys to it)
             EXISTS (SELECT FROM pg_catalog.pg_trigger t
                      WHERE t.tgrelid OPERATOR(pg_catalog.=) 'keypal.keys'::pg_catalog.regclass
                        AND t.tgname OPERATOR(pg_catalog.=) 'keys_audit' AND t.tgqual IS NOT NULL),
             -- (no BEFORE INSERT row trigger, enabled or not: TRIGGER_TYPE_ROW | BEFORE | INSERT;
             -- and no INSERT rule: a DO ALSO or INSTEAD rule is refused in a WITH's INSERT)
             NOT EXISTS (SELECT FROM pg_catalog.pg_trigger t
                          WHERE t.tgrelid OPERATOR(pg_catalog.=) 'keypal.keys'::pg_catalog.regclass
                            AND (t.tgtype::pg_catalog.int4 OPERATOR(pg_catalog.&) 7) OPERATOR(pg_catalog.=) 7)
             AND NOT EXISTS (SELECT FROM pg_catalog.pg_rewrite r
                              WHERE r.ev_class OPERATOR(pg_catalog.=) 'keypal.keys'::pg_catalog.regclass
                                AND r.ev_type OPERATOR(pg_catalog.=) '3')
        FROM keypal.config() c",
    &[pg_sys::TEXTARRAYOID],
);

thread_local! {
    static CACHE: RefCell<Option<Rc<Catalog>>> = const { RefCell::new(None) };
    /// Bumped by every invalidation: a load that an invalidation overtook is used once,
    /// not kept.
    static GENERATION: Cell<u64> = const { Cell::new(0) };
    /// Set while loading: the relations to watch are not known yet, so any invalidation
    /// then counts.
    static LOADING: Cell<bool> = const { Cell::new(false) };
    /// The relations whose invalidation drops the cache: settings, keys, its two indexes,
    /// policies, quota_usage.
    static WATCHED: Cell<[pg_sys::Oid; 6]> = const { Cell::new([pg_sys::InvalidOid; 6]) };
}

/// The cached catalog, loaded (through SPI) when missing.
pub fn get() -> Rc<Catalog> {
    // A transaction that already holds its locks would not read the invalidation queue
    // again until it ends: read it here, so a settings change committed elsewhere reaches
    // verify inside an open transaction too (cheap when the queue is empty).
    // SAFETY: processes pending invalidations at a point where no cache entry is in use.
    unsafe { pg_sys::AcceptInvalidationMessages() };
    if let Some(c) = CACHE.with(|c| c.borrow().clone()) {
        return c;
    }
    let generation = GENERATION.get();
    let c = loading(|| as_owner(|| Connection::with(load_fresh)));
    keep_unless_overtaken(Rc::new(c), generation)
}

/// Runs `f` — the load's queries — as the owner of keypal's schema with search_path pinned
/// to `pg_catalog, pg_temp`: what SECURITY DEFINER with SET search_path would give the whole
/// verify call, here only on this rare path (verify itself reads its tables without the
/// executor, which checks no privileges). An error inside leaves both to the transaction's
/// (or subtransaction's) abort to restore, as PostgreSQL does for SECURITY DEFINER.
fn as_owner<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: a syscache lookup of keypal's schema, then the same user and setting switch
    // fmgr makes for a SECURITY DEFINER function with a SET clause, undone in reverse.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"keypal".as_ptr(), false);
        let tup = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
            pg_sys::Datum::from(nsp),
        );
        if tup.is_null() {
            pgrx::error!("keypal: schema keypal not found");
        }
        let owner = (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_namespace>(tup)).nspowner;
        pg_sys::ReleaseSysCache(tup);
        let (mut user, mut context) = (pg_sys::InvalidOid, 0);
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            context
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
        let nest = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        let r = f();
        pg_sys::AtEOXact_GUC(true, nest);
        pg_sys::SetUserIdAndSecContext(user, context);
        r
    }
}

/// Runs a load with LOADING set, cleared again even if the load raises (a guard, since an
/// ERROR unwinds through here).
fn loading<R>(f: impl FnOnce() -> R) -> R {
    crate::scoped::while_set(&LOADING, f)
}

/// Loads under a snapshot taken now, not the caller's (an old REPEATABLE READ snapshot
/// would cache settings that changed since, for the life of the backend). Inside a
/// parallel operation no new snapshot may be taken: the caller's is used.
fn load_fresh(conn: &Connection) -> Catalog {
    // SAFETY: the pushed snapshot is popped after the load; if the load raises, the
    // transaction's abort unwinds the active snapshot stack.
    unsafe {
        if pg_sys::IsInParallelMode() {
            return load(conn);
        }
        pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot());
        let c = load(conn);
        pg_sys::PopActiveSnapshot();
        c
    }
}

/// Caches `c` — loaded while GENERATION was `generation` — unless an invalidation was
/// processed meanwhile (SPI takes locks, which reads the invalidation queue): then the load
/// may predate the change, so it serves this call only and the next one loads again.
fn keep_unless_overtaken(c: Rc<Catalog>, generation: u64) -> Rc<Catalog> {
    WATCHED.set([
        c.settings_relid,
        c.keys_by_hash.table,
        c.keys_by_hash.index,
        c.keys_by_id.index,
        c.policies_relid,
        c.quota_by_key.table,
    ]);
    // (a load inside a parallel operation read the caller's snapshot, maybe an old one:
    // it serves this call only)
    // SAFETY: reads a backend-local flag.
    if GENERATION.get() == generation && !unsafe { pg_sys::IsInParallelMode() } {
        CACHE.with(|cell| *cell.borrow_mut() = Some(c.clone()));
    }
    c
}

fn load(conn: &Connection) -> Catalog {
    LOAD.exec(conn, &[KEY_COLUMNS.to_vec().into_datum()], true, 1);
    // SAFETY: each column is read with the type LOAD selects for it.
    unsafe {
        let attnums: Vec<Option<i16>> = conn
            .get(0, 9)
            .and_then(|d| Vec::<Option<i16>>::from_datum(d, false))
            .unwrap_or_default();
        let attnums: [i16; KEY_COLUMNS.len()] =
            std::array::from_fn(|i| attnums.get(i).copied().flatten().unwrap_or(0));
        let quota: Vec<Option<i16>> = conn
            .get(0, 16)
            .and_then(|d| Vec::<Option<i16>>::from_datum(d, false))
            .unwrap_or_default();
        let quota: [i16; 3] = std::array::from_fn(|i| quota.get(i).copied().flatten().unwrap_or(0));
        if attnums.contains(&0) || quota.contains(&0) {
            crate::errors::raise(
                pgrx::PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                "keypal.keys or keypal.quota_usage lacks a column verify needs".into(),
            );
        }
        let oid = |c| {
            conn.get(0, c)
                .and_then(|d| pg_sys::Oid::from_datum(d, false))
                .unwrap_or(pg_sys::InvalidOid)
        };
        let json = |c| {
            conn.get(0, c)
                .and_then(|d| pgrx::JsonB::from_datum(d, false))
                .map(|j| j.0)
        };
        let alphabet = conn
            .get(0, 5)
            .and_then(|d| String::from_datum(d, false))
            .unwrap_or_default();
        let checksum = conn
            .get(0, 18)
            .and_then(|d| bool::from_datum(d, false))
            .unwrap_or(false);
        let length = conn
            .get(0, 4)
            .and_then(|d| i32::from_datum(d, false))
            .unwrap_or(keys::DEFAULT_LENGTH) as usize;
        let expanded = keys::expand_alphabet(&alphabet).unwrap_or_default();
        let (shapes, imported) = keys::issued_shapes(
            json(19).as_ref(),
            keys::Shape {
                length,
                alphabet: expanded.clone(),
                checksum,
            },
        );
        let unlooked_shapes = if !imported && shapes.iter().any(|s| s.checksum) {
            shapes
        } else {
            Vec::new()
        };
        Catalog {
            settings_relid: oid(1),
            result_type: oid(2),
            last_used_resolution_us: conn
                .get(0, 3)
                .and_then(|d| i64::from_datum(d, false))
                .unwrap_or(60_000_000),
            length,
            alphabet: expanded,
            alphabet_spec: alphabet,
            algorithm: conn
                .get(0, 21)
                .and_then(|d| String::from_datum(d, false))
                .unwrap_or_default(),
            default_env: conn.get(0, 22).and_then(|d| String::from_datum(d, false)),
            audited_by_create: conn.get_bool(0, 23),
            inserted_as_given: conn.get_bool(0, 24),
            prefixes: conn
                .get(0, 6)
                .and_then(|d| Vec::<String>::from_datum(d, false))
                .unwrap_or_default(),
            checksum,
            unlooked_shapes,
            keys_by_hash: Index {
                table: oid(7),
                index: oid(8),
                column: attnums[KEY_HASH],
                eq: pg_sys::F_BYTEAEQ,
            },
            keys_by_id: Index {
                table: oid(7),
                index: oid(17),
                column: attnums[0],
                eq: pg_sys::F_UUID_EQ,
            },
            quota_by_key: Index {
                table: oid(14),
                index: oid(15),
                column: quota[0],
                eq: pg_sys::F_UUID_EQ,
            },
            quota_attnums: [quota[1], quota[2]],
            attnums,
            default_rate_limit: json(10),
            environments: json(11),
            policy_rate_limits: json(12),
            policies_relid: oid(13),
            limit_split: conn
                .get(0, 20)
                .and_then(|d| i32::from_datum(d, false))
                .unwrap_or(1)
                .max(1) as i64,
        }
    }
}

/// Relcache callback: forget the cache when keypal.settings (or everything) is invalidated.
#[pg_guard]
unsafe extern "C-unwind" fn on_relcache(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    if relid == pg_sys::InvalidOid || LOADING.get() || WATCHED.get().contains(&relid) {
        GENERATION.set(GENERATION.get().wrapping_add(1));
        CACHE.with(|c| c.borrow_mut().take());
    }
}

pub fn init() {
    // SAFETY: registers a backend-lifetime callback once, from _PG_init.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache), pg_sys::Datum::from(0usize)) }
}

/// Whether a catalog is cached (for tests).
#[cfg(any(test, feature = "pg_test"))]
pub fn is_cached() -> bool {
    CACHE.with(|c| c.borrow().is_some())
}

/// Simulates an invalidation that arrives while a catalog loads: it must not be cached.
#[cfg(any(test, feature = "pg_test"))]
pub fn load_overtaken_by(relid: pg_sys::Oid) -> Rc<Catalog> {
    CACHE.with(|c| c.borrow_mut().take());
    let generation = GENERATION.get();
    let c = loading(|| {
        let c = as_owner(|| Connection::with(load_fresh));
        // SAFETY: the callback only touches this module's backend-local state.
        unsafe { on_relcache(pg_sys::Datum::from(0usize), relid) };
        c
    });
    keep_unless_overtaken(Rc::new(c), generation)
}

/// Sends the invalidation that makes every backend reload its cache (called by the
/// statement trigger on keypal.settings).
pub fn invalidate(relid: pg_sys::Oid) {
    // SAFETY: queues a relcache invalidation for an existing relation.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(relid) }
}
