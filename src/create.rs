//! `keypal.create_keys`: the one place keys are made (keypal_create and its forms,
//! keypal_create_many, templates, rotation).
//!
//! Every spec's options are checked here, in order (the first bad one raises, naming itself,
//! before anything is made); then, 10 000 specs at a time, each key is generated and hashed, the
//! rows written by one prepared INSERT (a one-key call by a simpler one), and their audit
//! rows, events and timers by src/audit.rs, a statement each for the chunk. A chunk's memory
//! is freed before the next is read: the specs are read from their array as they are made.
//! A spec that fails only as its key is made (a bad time, an unknown environment, a parent's
//! or a policy's rule) raises after the chunks before it were written: the call fails all the
//! same, and the statement's rollback takes them with it. What needs PostgreSQL's own input rules or
//! other rows — a timestamp, an interval in the long form, a parent's or a policy's rules, a
//! signing secret's prerequisite — goes to the SQL helpers, and only for a spec that has it.
//! `keypal_create` itself is Rust too (`keypal_create_c_wrapper`): its arguments become one spec.

use crate::errors::{bad_argument, refuse_option};
use crate::spi::{column, Connection, Stmt};
use crate::{api, audit, duration, gucs, keys, options};
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::{pg_sys, Array, JsonB, PgMemoryContexts, Uuid};
use serde_json::{Map, Value};

static PARSE_TIMESTAMP: Stmt = Stmt::new(
    c"SELECT keypal.parse_timestamp($1, $2)",
    &[pg_sys::TEXTOID, pg_sys::TEXTOID],
);
static PARSE_DURATION: Stmt = Stmt::new(
    c"SELECT keypal.parse_duration($1, $2)",
    &[pg_sys::TEXTOID, pg_sys::TEXTOID],
);
static FROM_NOW: Stmt = Stmt::new(
    c"SELECT now() + keypal.parse_duration($1, $2)",
    &[pg_sys::TEXTOID, pg_sys::TEXTOID],
);
static CHECK_ENV: Stmt = Stmt::new(
    c"SELECT keypal.check_env($1, $2, $3)",
    &[pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::JSONBOID],
);
static KEY_EXPIRY: Stmt = Stmt::new(
    c"SELECT keypal.key_expiry($1, $2, $3, $4, $5, $6)",
    &[
        pg_sys::JSONBOID,
        pg_sys::TEXTOID,
        pg_sys::TIMESTAMPTZOID,
        pg_sys::TEXTARRAYOID,
        pg_sys::JSONBOID,
        pg_sys::TEXTARRAYOID,
    ],
);
/// The INSERT of new keys into these columns from `$select` (without what it returns).
macro_rules! insert_keys_only {
    ($($select:expr),+) => {
        concat!(
            "INSERT INTO keypal.keys (id, key_hash, algorithm, owner_id, org_id, env, name, description, scopes,
                              resources, tags, metadata, enabled, expires_at, parent_id, policy,
                              rate_limit, quota, allowed_ips, blocked_ips, allowed_regions,
                              blocked_regions, disable_at, revoke_at, notify_before, rotated_from, signing) ",
            $($select),+
        )
    };
}
/// The same, returning what `audit::NewKey::read` reads.
macro_rules! insert_keys {
    ($($select:expr),+) => {
        sql!(
            insert_keys_only!($($select),+),
            "
      RETURNING id, owner_id, org_id, env, name, enabled, expires_at, disable_at, revoke_at, notify_before"
        )
    };
}
/// Many keys: the columns come as arrays, a relation u(o, id, hash, env, exp, dis, rev, nb,
/// enabled, signing, i) of one row per spec (i: its place): `o` holds the spec's key options
/// that jsonb_populate_record maps onto columns as they are (text, uuid, arrays, jsonb); the
/// rest come computed. The rows are written, and returned, in spec order. Generic plan: the
/// arrays' sizes do not change its shape, and a custom plan for 100 000 rows would be
/// compiled by JIT.
static INSERT: Stmt = Stmt::generic(
    insert_keys!(
        "SELECT u.id, u.hash, $11, c.owner_id, c.org_id, u.env, c.name, c.description,
             coalesce(c.scopes, '{}'), coalesce(c.resources, '{}'), coalesce(c.tags, '{}'),
             coalesce(u.o OPERATOR(pg_catalog.->) 'metadata', '{}'), u.enabled, u.exp, c.parent_id,
             c.policy, u.o OPERATOR(pg_catalog.->) 'rate_limit',
             CASE WHEN u.o OPERATOR(pg_catalog.->) 'quota' OPERATOR(pg_catalog.<>) 'null'
                  THEN u.o OPERATOR(pg_catalog.->) 'quota' END, coalesce(c.allowed_ips, '{}'),
             coalesce(c.blocked_ips, '{}'), coalesce(c.allowed_regions, '{}'),
             coalesce(c.blocked_regions, '{}'), u.dis, u.rev, u.nb, $12, u.signing
        FROM unnest($1::jsonb[], $2::uuid[], $3::bytea[], $4::text[], $5::timestamptz[],
                    $6::timestamptz[], $7::timestamptz[], $8::interval[], $9::boolean[], $10::boolean[])
             WITH ORDINALITY AS u(o, id, hash, env, exp, dis, rev, nb, enabled, signing, i)
       CROSS JOIN LATERAL pg_catalog.jsonb_populate_record(NULL::keypal.keys, u.o) AS c
       ORDER BY u.i"
    ),
    &[
        pg_sys::JSONBARRAYOID,
        pg_sys::UUIDARRAYOID,
        pg_sys::BYTEAARRAYOID,
        pg_sys::TEXTARRAYOID,
        pg_sys::TIMESTAMPTZARRAYOID,
        pg_sys::TIMESTAMPTZARRAYOID,
        pg_sys::TIMESTAMPTZARRAYOID,
        pg_sys::INTERVALARRAYOID,
        pg_sys::BOOLARRAYOID,
        pg_sys::BOOLARRAYOID,
        pg_sys::TEXTOID,
        pg_sys::UUIDOID,
    ],
);
/// One key's row of values: the spec's options each a parameter of its column's type
/// (`spec_columns`), so that nothing is left to plan or set up but the INSERT itself
/// (jsonb_populate_record's scan was a tenth of creating one key); $1, $26 and $27 are the
/// JSON columns (metadata, rate_limit, quota) as `INSERT` reads them from the spec. No
/// function is called: each one's set-up (its lookup and privilege check) is paid again by
/// every statement.
macro_rules! one_key_values {
    () => {
        "VALUES ($2, $3, $11, $13, $14, $4, $15, $16, coalesce($17, '{}'), coalesce($18, '{}'),
                 coalesce($19, '{}'), coalesce($1, '{}'), $9, $5, $20, $21, $26, $27,
                 coalesce($22, '{}'), coalesce($23, '{}'), coalesce($24, '{}'), coalesce($25, '{}'),
                 $6, $7, $8, $12, $10)"
    };
}
/// The parameters of one key's row ($1–$27).
macro_rules! one_key_types {
    ($($more:expr),*) => {
        [
            pg_sys::JSONBOID,
            pg_sys::UUIDOID,
            pg_sys::BYTEAOID,
            pg_sys::TEXTOID,
            pg_sys::TIMESTAMPTZOID,
            pg_sys::TIMESTAMPTZOID,
            pg_sys::TIMESTAMPTZOID,
            pg_sys::INTERVALOID,
            pg_sys::BOOLOID,
            pg_sys::BOOLOID,
            pg_sys::TEXTOID,
            pg_sys::UUIDOID,
            // the spec's options, as jsonb_populate_record would read them (see `spec_columns`)
            pg_sys::TEXTOID,
            pg_sys::TEXTOID,
            pg_sys::TEXTOID,
            pg_sys::TEXTOID,
            pg_sys::TEXTARRAYOID,
            pg_sys::JSONBOID,
            pg_sys::TEXTARRAYOID,
            pg_sys::UUIDOID,
            pg_sys::TEXTOID,
            pg_sys::TEXTARRAYOID,
            pg_sys::TEXTARRAYOID,
            pg_sys::TEXTARRAYOID,
            pg_sys::TEXTARRAYOID,
            pg_sys::JSONBOID,
            pg_sys::JSONBOID,
            $($more),*
        ]
    };
}
/// One key, returning its row (an older schema's path: `write`).
static INSERT_ONE: Stmt = Stmt::generic(insert_keys!(one_key_values!()), &one_key_types!());
/// One new key (keypal_create, one spec of keypal_create_many), its audit row and its
/// `key.created` event in one statement: one executor run, not two (each statement's start —
/// its plan's checks, its tables' indexes opened, triggers and constraints set up — was about
/// a third of creating a key). $28–$30: the audit row's actor and context (NULL for none),
/// the event's data (`audit::NewKey::event_data`, made here: jsonb_build_object in the
/// statement cost more); what it returns, `events::queued` reads. Everything the audit
/// row and the event hold is the key's row as given here: keypal.keys has no BEFORE INSERT
/// trigger.
static CREATE_ONE: Stmt = Stmt::generic(
    sql!(
        "WITH k AS (",
        insert_keys_only!(one_key_values!()),
        "), a AS (",
        audit::audit_row!(
            "'created'",
            "$2",
            "$13",
            "$14",
            "$28",
            "coalesce($29, '{}')"
        ),
        ") INSERT INTO keypal.events (event, key_id, payload) VALUES ('key.created', $2, ",
        crate::events::payload!("'key.created'::pg_catalog.text", "$30"),
        ") RETURNING id, ",
        crate::events::any_webhook!()
    ),
    &one_key_types!(pg_sys::TEXTOID, pg_sys::JSONBOID, pg_sys::JSONBOID),
);

/// Options that are not columns as given: computed (times, env, enabled, signing) or not
/// the row's at all (actor).
const COMPUTED: [&str; 9] = [
    "expires_in",
    "expires_at",
    "disable_at",
    "revoke_at",
    "notify_before",
    "enabled",
    "signing",
    "env",
    "actor",
];

struct Config {
    prefix: String,
    length: i32,
    alphabet: Vec<u8>,
    algorithm: keys::Algorithm,
    algorithm_name: String,
    checksum: bool,
    environments: Option<Value>,
    default_env: Option<String>,
    /// The schema's INSERT trigger leaves keys made here to `audit::record` (0.6.0 on).
    audited_here: bool,
    /// One key's row, audit row and event in one statement (`CREATE_ONE`): when audited
    /// here, and no BEFORE INSERT row trigger can change the row on its way in.
    one_statement: bool,
}

/// The settings a new key's shape comes from, as the catalog cache holds them (read under
/// the latest snapshot, reloaded when keypal.settings changes: see catalog.rs).
fn config() -> Config {
    let mut cat = crate::catalog::get();
    // The INSERT's lock on keypal.keys, taken now: a trigger created before it is granted
    // (CREATE TRIGGER waits for it after) is in the catalog read next, which `one_statement`
    // must know of. Taking a lock reads the invalidations that arrived meanwhile.
    // SAFETY: a lock on a table that exists (its oid from the catalog cache, which is
    // dropped when it is), held to the end of the transaction as the INSERT's would be.
    unsafe {
        pg_sys::LockRelationOid(cat.keys_by_id.table, pg_sys::RowExclusiveLock as i32);
    }
    cat = crate::catalog::get();
    let algorithm = keys::Algorithm::parse(&cat.algorithm)
        .unwrap_or_else(|| bad_argument("algorithm", "must be sha256 or sha512"));
    Config {
        prefix: cat.prefixes.first().cloned().unwrap_or_default(),
        alphabet: api::key_alphabet(cat.length as i32, &cat.alphabet_spec),
        length: cat.length as i32,
        algorithm,
        algorithm_name: cat.algorithm.clone(),
        checksum: cat.checksum,
        environments: cat.environments.clone(),
        default_env: cat.default_env.clone(),
        audited_here: cat.audited_by_create,
        one_statement: cat.audited_by_create && cat.inserted_as_given,
    }
}

/// A statement's one value (timestamptz or interval), or None for NULL.
/// (T is a by-value type or copied out: the result's tuple table is freed here, so a call
/// with 100 000 specs does not keep 100 000 of them until SPI_finish.)
fn one<T: FromDatum>(conn: &Connection, stmt: &Stmt, args: &[Option<pg_sys::Datum>]) -> Option<T> {
    stmt.exec(conn, args, false, 1);
    // SAFETY: the statement's one column is a T; the tuple table is the last statement's.
    unsafe {
        let v = conn.get(0, 1).and_then(|d| T::from_datum(d, false));
        pg_sys::SPI_freetuptable(pg_sys::SPI_tuptable);
        v
    }
}

fn text(s: &str) -> Option<pg_sys::Datum> {
    s.into_datum()
}

/// now() + a short duration ("30d") exactly, in Rust; a long one ("1 day 2 hours"), or one
/// that is not positive (to be refused with parse_duration's words), by the SQL helper.
fn from_now(conn: &Connection, value: &str, arg: &str) -> Option<TimestampWithTimeZone> {
    if let Some(Ok(span)) = duration::parse_short(value) {
        if span.days >= 0 && span.micros >= 0 && (span.days > 0 || span.micros > 0) {
            if let Ok(iv) = Interval::new(0, span.days, span.micros) {
                // SAFETY: timestamptz + interval, both valid datums.
                return unsafe {
                    pgrx::direct_function_call::<TimestampWithTimeZone>(
                        pg_sys::timestamptz_pl_interval,
                        &[
                            pg_sys::GetCurrentTransactionStartTimestamp().into_datum(),
                            iv.into_datum(),
                        ],
                    )
                };
            }
        }
    }
    one(conn, &FROM_NOW, &[text(value), text(arg)])
}

fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Who acts (keypal.actor): the spec's actor, else the keypal.actor setting, else the role
/// that called keypal.
fn actor(given: &str) -> String {
    if !given.is_empty() {
        return given.to_owned();
    }
    let set = gucs::current_setting("keypal.actor").filter(|s| !s.is_empty());
    set.unwrap_or_else(api::invoking_user_name)
}

/// A new key's id: a version 7 uuid (the time now, then 74 random bits), so that new keys'
/// entries in the id index and the audit log's key index go to the same few pages rather
/// than each to a random one (at a million keys, most of an insert's cost was reading and
/// logging those pages).
fn new_key_id() -> Uuid {
    let mut b = [0u8; 16];
    keys::fill_random(&mut b);
    // SAFETY: reads the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    // (PostgreSQL counts microseconds from 2000-01-01; 946 684 800 s after 1970-01-01)
    let unix_ms = (now / 1000 + 946_684_800_000).max(0) as u64;
    Uuid::from_bytes(keys::uuid_v7(unix_ms, b))
}

/// The columns of the rows one INSERT writes.
#[derive(Default)]
struct Rows {
    spec: Vec<Option<JsonB>>,
    id: Vec<Option<Uuid>>,
    hash: Vec<Option<Vec<u8>>>,
    env: Vec<Option<String>>,
    exp: Vec<Option<TimestampWithTimeZone>>,
    dis: Vec<Option<TimestampWithTimeZone>>,
    rev: Vec<Option<TimestampWithTimeZone>>,
    nb: Vec<Option<Interval>>,
    enabled: Vec<Option<bool>>,
    signing: Vec<Option<bool>>,
}

impl Rows {
    /// One Rows per row.
    fn each(self) -> Vec<Rows> {
        let n = self.id.len();
        let mut out: Vec<Rows> = (0..n).map(|_| Rows::default()).collect();
        for (i, r) in out.iter_mut().enumerate() {
            r.spec
                .push(self.spec[i].as_ref().map(|j| JsonB(j.0.clone())));
            r.id.push(self.id[i]);
            r.hash.push(self.hash[i].clone());
            r.env.push(self.env[i].clone());
            r.exp.push(self.exp[i]);
            r.dis.push(self.dis[i]);
            r.rev.push(self.rev[i]);
            r.nb.push(self.nb[i]);
            r.enabled.push(self.enabled[i]);
            r.signing.push(self.signing[i]);
        }
        out
    }
}

/// Writes `rows` (one INSERT; a single row by the simpler one); returns how many, their
/// RETURNING columns in the last result.
fn insert(conn: &Connection, rows: Rows, algorithm: &str, rotated_from: Option<Uuid>) -> u64 {
    let one = rows.id.len() == 1;
    let args = insert_args(rows, algorithm, rotated_from);
    (if one { &INSERT_ONE } else { &INSERT }).exec(conn, &args, false, 0)
}

/// The parameters of `INSERT` (several rows) or `INSERT_ONE` (one) for `rows`.
fn insert_args(
    rows: Rows,
    algorithm: &str,
    rotated_from: Option<Uuid>,
) -> Vec<Option<pg_sys::Datum>> {
    let one = rows.id.len() == 1;
    let (spec, options) = if one {
        let spec = rows.spec[0]
            .as_ref()
            .expect("make() gives every row its spec");
        (json_column(&spec.0, "metadata"), spec_columns(&spec.0))
    } else {
        (column(rows.spec, false), Vec::new())
    };
    let mut args = vec![
        spec,
        column(rows.id, one),
        column(rows.hash, one),
        column(rows.env, one),
        column(rows.exp, one),
        column(rows.dis, one),
        column(rows.rev, one),
        column(rows.nb, one),
        column(rows.enabled, one),
        column(rows.signing, one),
        text(algorithm),
        rotated_from.into_datum(),
    ];
    args.extend(options);
    args
}

/// One new key as `audit` records it: what its row holds, from its spec and computed values
/// (the row `CREATE_ONE` writes from the same).
fn new_key(rows: &Rows) -> audit::NewKey {
    let spec = rows.spec[0].as_ref().map(|j| &j.0);
    let text = |k: &str| spec.and_then(|s| s.get(k)?.as_str().map(str::to_owned));
    audit::NewKey {
        id: rows.id[0].expect("make() gives every row its id"),
        owner_id: text("owner_id"),
        org_id: text("org_id"),
        env: rows.env[0].clone(),
        name: text("name"),
        enabled: rows.enabled[0].unwrap_or(true),
        expires_at: rows.exp[0],
        disable_at: rows.dis[0],
        revoke_at: rows.rev[0],
        notify_before: rows.nb[0],
    }
}

/// INSERT_ONE's $1: the spec's metadata, as given (NULL when not: most keys; nothing to
/// parse).
fn json_column(spec: &Value, name: &str) -> Option<pg_sys::Datum> {
    spec.get(name).map(|v| JsonB(v.clone())).into_datum()
}

/// A checked spec's options as INSERT_ONE's $13–$27, each as jsonb_populate_record reads
/// its column from the spec (INSERT's way): a string as text or uuid, a list as text[], an
/// object as jsonb, and JSON null or a missing option as NULL; but the rate limit and quota as
/// `INSERT` reads them (a rate limit of JSON null is kept: no limit, over any default).
fn spec_columns(spec: &Value) -> Vec<Option<pg_sys::Datum>> {
    let get = |k: &str| spec.get(k).filter(|v| !v.is_null());
    let text = |k: &str| get(k).and_then(Value::as_str).into_datum();
    let list = |k: &str| get(k).map(|v| string_list(Some(v))).into_datum();
    let parent = get("parent_id").and_then(Value::as_str).map(|s| {
        parse_uuid(s).unwrap_or_else(|| bad_argument("parent_id", &format!("{s:?} is not a uuid")))
    });
    vec![
        text("owner_id"),
        text("org_id"),
        text("name"),
        text("description"),
        list("scopes"),
        get("resources").map(|v| JsonB(v.clone())).into_datum(),
        list("tags"),
        parent.into_datum(),
        text("policy"),
        list("allowed_ips"),
        list("blocked_ips"),
        list("allowed_regions"),
        list("blocked_regions"),
        json_column(spec, "rate_limit"),
        get("quota").map(|v| JsonB(v.clone())).into_datum(),
    ]
}

/// Sets the transaction-local settings an older schema's INSERT trigger reads
/// (keypal.begin_change's).
fn set_change(actor: &str, action: &str, context: &str) {
    for (name, value) in [
        (c"keypal._actor", actor),
        (c"keypal._action", action),
        (c"keypal._context", context),
    ] {
        let value = std::ffi::CString::new(value)
            .unwrap_or_else(|_| bad_argument("actor", "must not contain a NUL character"));
        // SAFETY: valid C strings; a transaction-local USERSET change, as set_config does.
        unsafe {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_LOCAL,
                true,
                0,
                false,
            );
        }
    }
}

type Made = (
    String,
    Uuid,
    Option<TimestampWithTimeZone>,
    Option<String>,
    Option<String>,
);

/// One spec, checked, into `rows`; returns what the caller gets back. The checks run in
/// the order a spec's fields were always checked: environment, expiry, disable_at,
/// revoke_at, notify_before, then the parent and policy rules, then the signing secret.
fn make(
    conn: &Connection,
    cfg: &Config,
    mut o: Map<String, Value>,
    arg: &str,
    rows: &mut Rows,
) -> Made {
    let id = new_key_id();
    let env = o
        .get("env")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| cfg.default_env.clone());
    if let (Some(e), Some(envs @ Value::Object(map))) = (&env, &cfg.environments) {
        if !map.contains_key(e) {
            // The SQL helper words the refusal, naming the configured environments.
            let envs = JsonB(envs.clone()).into_datum();
            CHECK_ENV.exec(conn, &[text(e), text(&format!("{arg}env")), envs], false, 1);
            // (it raised: an environment not configured)
            bad_argument(&format!("{arg}env"), "no such environment");
        }
    }
    let field = |k: &str| o.get(k).and_then(Value::as_str);
    let timestamp = |k: &str| -> Option<TimestampWithTimeZone> {
        let t = field(k)?;
        one(
            conn,
            &PARSE_TIMESTAMP,
            &[text(t), text(&format!("{arg}{k}"))],
        )
    };
    let mut exp = match field("expires_in") {
        Some(d) => from_now(conn, d, &format!("{arg}expires_in")),
        None => timestamp("expires_at"),
    };
    let dis = timestamp("disable_at");
    let rev = timestamp("revoke_at");
    let nb: Option<Interval> = field("notify_before").and_then(|d| {
        one(
            conn,
            &PARSE_DURATION,
            &[text(d), text(&format!("{arg}notify_before"))],
        )
    });
    // SAFETY: always valid inside a transaction.
    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let passed = exp.is_some_and(|t| pg_sys::TimestampTz::from(t) <= now);
    if o.contains_key("policy") || o.contains_key("parent_id") || passed {
        let scopes = string_list(o.get("scopes"));
        let ips = string_list(o.get("allowed_ips"));
        let res = o
            .get("resources")
            .cloned()
            .unwrap_or_else(|| Value::Object(Map::new()));
        exp = one(
            conn,
            &KEY_EXPIRY,
            &[
                JsonB(Value::Object(o.clone())).into_datum(),
                text(arg),
                exp.into_datum(),
                scopes.into_datum(),
                JsonB(res).into_datum(),
                ips.into_datum(),
            ],
        );
    }
    let signing = o.get("signing").and_then(Value::as_bool).unwrap_or(false);
    let secret = signing.then(|| api::signing_secret(id));
    let prefix = env
        .as_ref()
        .and_then(|e| cfg.environments.as_ref()?.get(e)?.get("prefix")?.as_str())
        .unwrap_or(&cfg.prefix);
    keys::check_prefix(prefix).unwrap_or_else(|e| bad_argument("prefix", &e));
    let mut key = keys::generate(prefix, cfg.length as usize, &cfg.alphabet);
    if cfg.checksum {
        let sum = keys::checksum(&key, &cfg.alphabet);
        key.push_str(&sum);
    }
    let hash = gucs::with_salt_suffix(|s| keys::hash_key(&key, s, cfg.algorithm));
    let enabled = o.get("enabled").and_then(Value::as_bool).unwrap_or(true);
    for k in COMPUTED {
        o.remove(k);
    }
    rows.spec.push(Some(JsonB(Value::Object(o))));
    rows.id.push(Some(id));
    rows.hash.push(Some(hash));
    rows.env.push(env.clone());
    rows.exp.push(exp);
    rows.dis.push(dis);
    rows.rev.push(rev);
    rows.nb.push(nb);
    rows.enabled.push(Some(enabled));
    rows.signing.push(Some(signing));
    (key, id, exp, env, secret)
}

/// How many specs a call makes at a time: each chunk's rows, arrays, audit rows and events are
/// written and their memory freed before the next is read (a call of a million specs held
/// all of it at once: 3.3 GB).
const CHUNK: usize = 10_000;

/// A call's specs, each with the name it goes by in messages (`specs[3].`; "" for one key's
/// own arguments), readable more than once: all are checked first, then made a chunk at a
/// time.
pub type Specs<'a> = dyn Fn() -> Box<dyn Iterator<Item = (Value, String)> + 'a> + 'a;

/// A spec's options, checked (the first bad one raises).
fn normalized((v, arg): (Value, String)) -> (Map<String, Value>, String) {
    match options::normalize(&v, &arg, true) {
        Ok(m) => (m, arg),
        Err(e) => refuse_option(e),
    }
}

/// Makes one key per spec (key options, see options.rs), returned in order: `n` specs,
/// read by `specs`. `extra`: `rotated_from`, and the audit `action` and `context`.
pub fn create(n: usize, specs: &Specs<'_>, extra: Value) -> Vec<Made> {
    let action = extra.get("action").and_then(Value::as_str).unwrap_or("");
    let context = extra.get("context").filter(|c| !c.is_null());
    let rotated_from = extra
        .get("rotated_from")
        .and_then(Value::as_str)
        .map(|s| parse_uuid(s).unwrap_or_else(|| bad_argument("rotated_from", "not a uuid")));
    // Every spec checked as options first (the first bad one raises, before anything is
    // made); kept when they make one chunk, read again a chunk at a time when more (each
    // reading's PostgreSQL memory freed as it goes).
    let mut kept = Vec::new();
    {
        let mut scratch = PgMemoryContexts::new("keypal create_keys check");
        let mut all = specs();
        // SAFETY: nothing allocated in scratch outlives its reset (kept is Rust's).
        unsafe {
            while let Some(m) = scratch.switch_to(|_| all.next().map(normalized)) {
                if n <= CHUNK {
                    kept.push(m);
                }
                scratch.reset();
            }
        }
    }
    if n == 0 {
        return Vec::new();
    }
    let mut source: Box<dyn Iterator<Item = (Map<String, Value>, String)> + '_> = if n <= CHUNK {
        Box::new(kept.into_iter())
    } else {
        Box::new(specs().map(normalized))
    };
    // Who acts when a spec names no actor: keypal.actor, else the caller's role.
    let mut anyone = None;
    crate::spi::passing_errors(|| {
        Connection::with(|conn| {
            let cfg = config();
            let mut made = Vec::with_capacity(n);
            let mut last_event = None;
            // Each chunk in a memory context of its own, reset after it; each spec's make in
            // one reset after it (what make returns is Rust's).
            let mut chunk_mem = PgMemoryContexts::new("keypal create_keys chunk");
            let mut scratch = PgMemoryContexts::new("keypal create_keys spec");
            loop {
                // SAFETY: nothing allocated in chunk_mem or scratch outlives their resets:
                // the chunk's rows, arrays and results are written and read within.
                let more = unsafe {
                    let more = chunk_mem.switch_to(|_| {
                        let chunk: Vec<_> = source.by_ref().take(CHUNK).collect();
                        if chunk.is_empty() {
                            return false;
                        }
                        let actors: Vec<String> = chunk
                            .iter()
                            .map(|(m, _)| match m.get("actor").and_then(Value::as_str) {
                                Some(a) if !a.is_empty() => a.to_owned(),
                                _ => anyone.get_or_insert_with(|| actor("")).clone(),
                            })
                            .collect();
                        let mut rows = Rows::default();
                        for (o, arg) in chunk {
                            made.push(scratch.switch_to(|_| make(conn, &cfg, o, &arg, &mut rows)));
                            scratch.reset();
                        }
                        let last = write(conn, &cfg, rows, &actors, action, context, rotated_from);
                        last_event = last.or(last_event);
                        true
                    });
                    chunk_mem.reset();
                    more
                };
                if !more {
                    break;
                }
            }
            // Listeners are told once, after the last chunk's events.
            crate::events::notify(last_event);
            made
        })
    })
}

/// Writes one chunk's rows (made in spec order, `actors[i]` acting on row i) and records
/// them; returns the highest event id written.
fn write(
    conn: &Connection,
    cfg: &Config,
    rows: Rows,
    actors: &[String],
    action: &str,
    context: Option<&Value>,
    rotated_from: Option<Uuid>,
) -> Option<i64> {
    if cfg.one_statement && rows.id.len() == 1 && audit::action_name(action) == "created" {
        // One new key: its row, audit row and event in one statement.
        let key = new_key(&rows);
        let mut args = insert_args(rows, &cfg.algorithm_name, rotated_from);
        args.push(actors[0].as_str().into_datum());
        args.push(context.map(|c| JsonB(c.clone())).into_datum());
        args.push(JsonB(key.event_data(&actors[0])).into_datum());
        audit::writing(|| CREATE_ONE.exec(conn, &args, false, 0));
        audit::created(conn, &key)
    } else if cfg.audited_here {
        let n = audit::writing(|| insert(conn, rows, &cfg.algorithm_name, rotated_from));
        // (RETURNING gives the rows in spec order, as the INSERT wrote them)
        let new: Vec<audit::NewKey> = (0..n as usize)
            .map(|r| audit::NewKey::read(conn, r))
            .collect();
        // SAFETY: the INSERT's result, read above, is not used again.
        unsafe { pg_sys::SPI_freetuptable(pg_sys::SPI_tuptable) };
        audit::record(conn, &new, actors, action, context)
    } else {
        // The schema is older than this library (between a package upgrade and ALTER
        // EXTENSION UPDATE): its INSERT trigger records every INSERT, reading who acts and
        // why from the settings keypal.begin_change sets. One INSERT per key, each with its
        // own actor.
        let context = context.map(Value::to_string).unwrap_or_default();
        for (one, who) in rows.each().into_iter().zip(actors) {
            set_change(who, action, &context);
            insert(conn, one, &cfg.algorithm_name, rotated_from);
        }
        set_change("", "", "");
        None
    }
}

#[pg_schema]
mod keypal {
    use super::*;

    /// Makes one key per element of `specs`: see `create`.
    #[pg_extern(volatile, parallel_unsafe)]
    #[allow(clippy::type_complexity)] // (pgrx reads the column names from this signature)
    fn create_keys(
        specs: Array<'_, JsonB>,
        prefixes: default!(Array<'_, String>, "'{}'"),
        extra: default!(Option<JsonB>, "'{}'"),
    ) -> TableIterator<
        'static,
        (
            name!(key, String),
            name!(id, Uuid),
            name!(expires_at, Option<TimestampWithTimeZone>),
            name!(env, Option<String>),
            name!(signing_secret, Option<String>),
        ),
    > {
        // (the arrays are read element by element, each time they are read: a call's
        // specs are never all Rust values at once)
        let read = || -> Box<dyn Iterator<Item = (Value, String)> + '_> {
            let names = prefixes.iter().map(Option::unwrap_or_default);
            Box::new(
                specs
                    .iter()
                    .map(|s| s.map(|j| j.0).unwrap_or(Value::Null))
                    .zip(names.chain(std::iter::repeat_with(String::new))),
            )
        };
        let extra = extra.map(|j| j.0).unwrap_or(Value::Null);
        TableIterator::new(create(specs.len(), &read, extra))
    }
}

finfo_v1!(pg_finfo_keypal_create_c_wrapper);

/// keypal_create, declared in api.sql (SECURITY DEFINER, search_path pinned, RETURNS SETOF
/// keypal.created_key; the arguments in this order): the arguments given (not SQL NULL)
/// become the key's options, as keypal_create_many's spec would give them. Its row is
/// returned in materialize mode: one call per key, where value-per-call mode made two, each
/// through the SECURITY DEFINER entry and its search_path.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn keypal_create_c_wrapper(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    use pgrx::fcinfo::pg_getarg;
    // SAFETY: called by fmgr with the 24 arguments api.sql declares, each read as its type
    // (NULL as None); the result set is `materialized`'s (which refuses a caller that cannot
    // take one), each row copied into it.
    unsafe {
        let text = |n| pg_getarg::<String>(fcinfo, n).map(Value::from);
        let json = |n| pg_getarg::<JsonB>(fcinfo, n).map(|j| j.0);
        let list = |n| {
            pg_getarg::<Vec<Option<String>>>(fcinfo, n)
                .map(|l| Value::from(l.into_iter().map(Value::from).collect::<Vec<_>>()))
        };
        // (a timestamp as to_jsonb writes it, ISO 8601 with its offset, whatever DateStyle:
        // the spec's own parsing reads it back exactly)
        let time = |n| {
            pg_getarg::<TimestampWithTimeZone>(fcinfo, n).map(|t| Value::from(t.to_iso_string()))
        };
        let options: [(&str, Option<Value>); 24] = [
            ("owner_id", text(0)),
            ("name", text(1)),
            ("description", text(2)),
            ("scopes", list(3)),
            ("resources", json(4)),
            ("tags", list(5)),
            ("metadata", json(6)),
            ("expires_in", text(7)),
            ("expires_at", time(8)),
            ("env", text(9)),
            ("org_id", text(10)),
            (
                "parent_id",
                pg_getarg::<Uuid>(fcinfo, 11).map(|u| Value::from(u.to_string())),
            ),
            ("policy", text(12)),
            ("rate_limit", json(13)),
            ("quota", json(14)),
            ("allowed_ips", list(15)),
            ("blocked_ips", list(16)),
            ("allowed_regions", list(17)),
            ("blocked_regions", list(18)),
            ("disable_at", time(19)),
            ("revoke_at", time(20)),
            ("notify_before", text(21)),
            ("signing", pg_getarg::<bool>(fcinfo, 22).map(Value::from)),
            ("actor", text(23)),
        ];
        let o: Map<String, Value> = options
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_owned(), v?)))
            .collect();
        let rsinfo = materialized(
            fcinfo,
            &[
                pg_sys::TEXTOID,
                pg_sys::UUIDOID,
                pg_sys::TIMESTAMPTZOID,
                pg_sys::TEXTOID,
                pg_sys::TEXTOID,
            ],
        );
        // (one spec: read once — `create` reads a call of up to CHUNK specs only once,
        // keeping what it checked; a second read would find nothing, and make no key)
        let spec = std::cell::Cell::new(Some(Value::Object(o)));
        let read = || -> Box<dyn Iterator<Item = (Value, String)>> {
            Box::new(spec.take().map(|v| (v, String::new())).into_iter())
        };
        for (key, id, expires_at, env, secret) in create(1, &read, Value::Null) {
            let row = [
                key.into_datum(),
                id.into_datum(),
                expires_at.into_datum(),
                env.into_datum(),
                secret.into_datum(),
            ];
            let mut nulls = row.map(|d| d.is_none());
            let mut values = row.map(|d| d.unwrap_or(pg_sys::Datum::from(0usize)));
            pg_sys::tuplestore_putvalues(
                (*rsinfo).setResult,
                (*rsinfo).setDesc,
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
            );
        }
        pg_sys::Datum::from(0usize)
    }
}

/// Sets up a set-returning function's result in materialize mode — a tuplestore in the
/// query's memory, and the descriptor of rows of columns of these `types` — as PostgreSQL's
/// InitMaterializedSRF does (which PostgreSQL 15.0 lacks: it came with 15.1). Refuses a
/// caller that cannot take a set so made, and a result type of other columns (an altered
/// keypal.created_key: its values would be read as the wrong types).
///
/// # Safety
/// `fcinfo` is the call's, made by fmgr.
unsafe fn materialized(
    fcinfo: pg_sys::FunctionCallInfo,
    types: &[pg_sys::Oid],
) -> *mut pg_sys::ReturnSetInfo {
    // SAFETY: resultinfo is a node when not NULL; the tuplestore and descriptor copy are made
    // in the query's memory, which outlives the call, as the executor expects of them.
    unsafe {
        let rsinfo = (*fcinfo).resultinfo as *mut pg_sys::ReturnSetInfo;
        if rsinfo.is_null()
            || (*rsinfo).type_ != pg_sys::NodeTag::T_ReturnSetInfo
            || (*rsinfo).allowedModes & pg_sys::SetFunctionReturnMode::SFRM_Materialize as i32 == 0
        {
            crate::errors::raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "set-valued function called in context that cannot accept a set".into(),
            );
        }
        let mut desc = (*rsinfo).expectedDesc;
        if desc.is_null()
            && pg_sys::get_call_result_type(fcinfo, std::ptr::null_mut(), &mut desc)
                != pg_sys::TypeFuncClass::TYPEFUNC_COMPOSITE
        {
            crate::errors::raise(
                PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                "return type must be a row type".into(),
            );
        }
        let attrs = (*desc).attrs.as_slice((*desc).natts as usize);
        if attrs.len() != types.len()
            || attrs
                .iter()
                .zip(types)
                .any(|(a, t)| a.attisdropped || a.atttypid != *t)
        {
            crate::errors::raise(
                PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                format!(
                    "result type has columns ({}), not ({})",
                    type_names(attrs.iter().map(|a| a.atttypid)),
                    type_names(types.iter().copied())
                ),
            );
        }
        let random = (*rsinfo).allowedModes
            & pg_sys::SetFunctionReturnMode::SFRM_Materialize_Random as i32
            != 0;
        let mut query = PgMemoryContexts::For((*(*rsinfo).econtext).ecxt_per_query_memory);
        query.switch_to(|_| {
            (*rsinfo).setResult = pg_sys::tuplestore_begin_heap(random, false, pg_sys::work_mem);
            (*rsinfo).setDesc = pg_sys::CreateTupleDescCopy(desc);
        });
        (*rsinfo).returnMode = pg_sys::SetFunctionReturnMode::SFRM_Materialize;
        rsinfo
    }
}

/// "text, uuid, …": the SQL names of these types.
fn type_names(types: impl Iterator<Item = pg_sys::Oid>) -> String {
    types
        // SAFETY: format_type_be names any oid (an unknown one as "???").
        .map(|t| unsafe { std::ffi::CStr::from_ptr(pg_sys::format_type_be(t)) })
        .map(|n| n.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

finfo_v1!(pg_finfo_keypal_key_row_ok);

/// `keypal.key_row_ok(algorithm, id, parent_id, resources, metadata)`, the one CHECK of
/// keypal.keys: a known hash algorithm, not its own parent, resources and metadata JSON
/// objects (keypal's functions check all of it first; this guards other writers).
///
/// One C function rather than four CHECK expressions: PostgreSQL parses and plans a
/// table's CHECK expressions again for every INSERT or UPDATE statement, and the four cost
/// a twelfth of creating a key; one call to a function costs a fourth of that. Not strict
/// (a NULL must not pass for true); declared in api.sql.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn keypal_key_row_ok(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    use pgrx::fcinfo::{pg_arg_is_null, pg_getarg_datum_raw};
    // SAFETY: called by fmgr with the five arguments api.sql declares (text, uuid, uuid,
    // jsonb, jsonb), each read only when not NULL.
    unsafe {
        let arg = |n| (!pg_arg_is_null(fcinfo, n)).then(|| pg_getarg_datum_raw(fcinfo, n));
        let algorithm = arg(0).and_then(|d| String::from_datum(d, false));
        let id = arg(1).and_then(|d| Uuid::from_datum(d, false));
        let parent = arg(2).and_then(|d| Uuid::from_datum(d, false));
        let object = |d: Option<pg_sys::Datum>| {
            d.and_then(|d| pgrx::direct_function_call::<String>(pg_sys::jsonb_typeof, &[Some(d)]))
                .is_some_and(|t| t == "object")
        };
        let ok = algorithm.is_some_and(|a| a == "sha256" || a == "sha512")
            && (parent.is_none() || parent != id)
            && object(arg(3))
            && object(arg(4));
        ok.into()
    }
}

/// A uuid from its text (as SQL writes it: 32 hex digits, with or without hyphens).
fn parse_uuid(s: &str) -> Option<Uuid> {
    let hex: Vec<u8> = s.bytes().filter(|c| *c != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let bytes: Option<Vec<u8>> = hex
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect();
    Uuid::from_slice(&bytes?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_parse_as_sql_writes_them() {
        let u = parse_uuid("6f9619ff-8b86-d011-b42d-00c04fc964aa").unwrap();
        assert_eq!(u.to_string(), "6f9619ff-8b86-d011-b42d-00c04fc964aa");
        assert_eq!(parse_uuid("6F9619FF8B86D011B42D00C04FC964AA"), Some(u));
        assert_eq!(parse_uuid("6f9619ff-8b86-d011-b42d-00c04fc964a"), None);
        assert_eq!(parse_uuid("zz9619ff-8b86-d011-b42d-00c04fc964aa"), None);
    }
}
