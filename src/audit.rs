//! What making keys leaves besides their rows: one audit row per key, one `key.created`
//! event per key (when the action is `created`) and the keys' timers.
//!
//! `keypal.create_keys` writes them here, right after its INSERT of several keys, from the
//! rows that INSERT returned; one new key's audit row and event it writes in its INSERT's own
//! statement (`audit_row!`, `created`). Its INSERT does not fire the INSERT trigger (`keys_audit` runs only `WHEN NOT
//! keypal.audit_written()`, which is true only while such an INSERT runs); every other
//! INSERT into keypal.keys (keypal_import, a restore) is still recorded by that trigger, from
//! its transition table. The two write the same rows: `tests/sql/05_audit.sql` and
//! `10_webhooks.sql` check the content, `16_bulk.sql` the counts.
//!
//! Writing them here rather than in the trigger saves, on every call, the trigger's call
//! and its transition table; the audit rows and events of new keys are one statement (and
//! the timers, when any, a second), prepared once per backend.

use crate::events;
use crate::spi::{column, Connection, Stmt};
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::{pg_sys, JsonB, Uuid};
use serde_json::{json, Map, Value};
use std::cell::Cell;

thread_local! {
    /// Set while keypal.create_keys' INSERT runs: its rows are recorded here, not by the
    /// trigger.
    static WRITING: Cell<bool> = const { Cell::new(false) };
}

/// A key as it was inserted.
pub struct NewKey {
    pub id: Uuid,
    pub owner_id: Option<String>,
    pub org_id: Option<String>,
    pub env: Option<String>,
    pub name: Option<String>,
    pub enabled: bool,
    pub expires_at: Option<TimestampWithTimeZone>,
    pub disable_at: Option<TimestampWithTimeZone>,
    pub revoke_at: Option<TimestampWithTimeZone>,
    pub notify_before: Option<Interval>,
}

impl NewKey {
    /// Row `row` of the last statement's result, whose columns are `id, owner_id, org_id,
    /// env, name, enabled, expires_at, disable_at, revoke_at, notify_before` (what
    /// keypal.create_keys' INSERT returns).
    pub fn read(conn: &Connection, row: usize) -> NewKey {
        // SAFETY: each column is read with the type RETURNING gives it.
        unsafe {
            let text = |c| conn.get(row, c).and_then(|d| String::from_datum(d, false));
            let time = |c| {
                conn.get(row, c)
                    .and_then(|d| TimestampWithTimeZone::from_datum(d, false))
            };
            NewKey {
                id: conn
                    .get(row, 1)
                    .and_then(|d| Uuid::from_datum(d, false))
                    .expect("a key's id is not null"),
                owner_id: text(2),
                org_id: text(3),
                env: text(4),
                name: text(5),
                enabled: conn.get_bool(row, 6),
                expires_at: time(7),
                disable_at: time(8),
                revoke_at: time(9),
                notify_before: conn
                    .get(row, 10)
                    .and_then(|d| Interval::from_datum(d, false)),
            }
        }
    }

    /// The webhook body's "data" of its key.created event (keypal.event_data).
    pub fn event_data(&self, actor: &str) -> Value {
        let mut m = Map::new();
        m.insert("keyId".into(), json!(self.id.to_string()));
        for (k, v) in [
            ("ownerId", &self.owner_id),
            ("orgId", &self.org_id),
            ("env", &self.env),
            ("name", &self.name),
        ] {
            if let Some(v) = v {
                m.insert(k.into(), json!(v));
            }
        }
        m.insert("actor".into(), json!(actor));
        Value::Object(m)
    }

    /// Its timers as keypal.timer_to_arm arms a new key's: (kind, moment).
    fn timers(&self) -> impl Iterator<Item = (&'static str, TimestampWithTimeZone)> {
        let expiring = match (self.expires_at, self.notify_before) {
            // SAFETY: timestamptz - interval, both valid datums (calendar arithmetic in the
            // session's time zone, as SQL's).
            (Some(t), Some(nb)) => unsafe {
                pgrx::direct_function_call::<TimestampWithTimeZone>(
                    pg_sys::timestamptz_mi_interval,
                    &[t.into_datum(), nb.into_datum()],
                )
            },
            _ => None,
        };
        [
            ("disable", self.disable_at.filter(|_| self.enabled)),
            ("revoke", self.revoke_at),
            ("expiring", expiring),
            ("expired", self.expires_at),
        ]
        .into_iter()
        .filter_map(|(kind, due)| due.map(|d| (kind, d)))
    }
}

/// Whether keypal.create_keys' INSERT is running (its rows are recorded by it, not by the
/// INSERT trigger, whose WHEN clause asks this).
#[pg_schema]
mod keypal {
    use pgrx::prelude::*;

    #[pg_extern(volatile, parallel_unsafe)]
    fn audit_written() -> bool {
        super::WRITING.get()
    }
}

/// Runs `f` (the INSERT) with the INSERT trigger off for it; on, again, however `f` ends.
pub fn writing<R>(f: impl FnOnce() -> R) -> R {
    crate::scoped::while_set(&WRITING, f)
}

/// The parameters of the two statements below, over arrays: $1 the action, $2 the context,
/// $3–$6 each key's id, owner_id, org_id and actor, $7 its `key.created` event's data (read
/// only by the statement that writes events). (One new key's are written with its row:
/// create.rs's `CREATE_ONE`.)
static ROWS: [pg_sys::Oid; 7] = [
    pg_sys::TEXTOID,
    pg_sys::JSONBOID,
    pg_sys::UUIDARRAYOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::JSONBARRAYOID,
];
/// The audit rows' INSERT, as a statement's own and as the first part of `CREATED`'s.
macro_rules! audit_rows {
    () => {
        "INSERT INTO keypal.audit_log (action, key_id, owner_id, org_id, actor, role, context)
         SELECT $1, u.id, u.owner_id, u.org_id, u.actor, session_user, $2
           FROM unnest($3::pg_catalog.uuid[], $4::pg_catalog.text[], $5::pg_catalog.text[],
                       $6::pg_catalog.text[]) AS u(id, owner_id, org_id, actor)"
    };
}
/// One audit row of these values (action, key_id, owner_id, org_id, actor, context): a new
/// key's, written with its row (create.rs's `CREATE_ONE`).
macro_rules! audit_row {
    ($action:literal, $id:literal, $owner:literal, $org:literal, $actor:literal, $ctx:literal) => {
        concat!(
            "INSERT INTO keypal.audit_log (action, key_id, owner_id, org_id, actor, role, context)
         VALUES (",
            $action,
            ", ",
            $id,
            ", ",
            $owner,
            ", ",
            $org,
            ", ",
            $actor,
            ", session_user, ",
            $ctx,
            ")"
        )
    };
}
pub(crate) use audit_row;
static AUDIT: Stmt = Stmt::generic(sql!(audit_rows!()), &ROWS);
/// New keys' audit rows and `key.created` events, in one statement (one executor run, not
/// two: a twentieth of creating one key). The events are in the keys' order and return
/// what `events::queued` reads. (PostgreSQL runs the CTE's INSERT, which nothing reads,
/// as the statement finishes: the audit rows are written after the events, and their `at`
/// is the later. Neither table has an INSERT trigger; nothing depends on the order.)
static CREATED: Stmt = Stmt::generic(
    sql!(
        "WITH a AS (",
        audit_rows!(),
        ") INSERT INTO keypal.events (event, key_id, payload)
           SELECT 'key.created', e.key_id, ",
        events::payload!("'key.created'::pg_catalog.text", "e.data"),
        " FROM unnest($3::pg_catalog.uuid[], $7::pg_catalog.jsonb[])
               WITH ORDINALITY AS e(key_id, data, n)
          ORDER BY e.n
         RETURNING id, ",
        events::any_webhook!()
    ),
    &ROWS,
);
static TIMERS: Stmt = Stmt::generic(
    c"WITH set AS (
          INSERT INTO keypal.key_timers AS t (key_id, kind, due_at)
          SELECT * FROM unnest($1::uuid[], $2::text[], $3::timestamptz[])
              ON CONFLICT (key_id, kind) DO UPDATE SET due_at = EXCLUDED.due_at
          RETURNING 1)
      SELECT keypal.timers_armed(count(*)) FROM set",
    &[
        pg_sys::UUIDARRAYOID,
        pg_sys::TEXTARRAYOID,
        pg_sys::TIMESTAMPTZARRAYOID,
    ],
);

/// The audit action of keys made with `action` ("" for created).
pub fn action_name(action: &str) -> &str {
    if action.is_empty() {
        "created"
    } else {
        action
    }
}

/// Records `keys`, made by one statement, `actors[i]` acting on `keys[i]`: `action` (audit;
/// "" for created) and `context` as keypal.audit_inserted_keys records them. Returns the
/// highest event id written, for the caller to `events::notify` once it has written all.
pub fn record(
    conn: &Connection,
    keys: &[NewKey],
    actors: &[String],
    action: &str,
    context: Option<&Value>,
) -> Option<i64> {
    if keys.is_empty() {
        return None;
    }
    let act = action_name(action);
    let ctx = context
        .cloned()
        .unwrap_or_else(|| Value::Object(Map::new()));
    let created = act == "created";
    // (the event data: read only by the statements that write events)
    let data = created.then(|| {
        let data: Vec<Option<JsonB>> = keys
            .iter()
            .zip(actors)
            .map(|(k, a)| Some(JsonB(k.event_data(a))))
            .collect();
        column(data, false)
    });
    let args = [
        act.into_datum(),
        JsonB(ctx).into_datum(),
        column(keys.iter().map(|k| Some(k.id)).collect(), false),
        column(keys.iter().map(|k| k.owner_id.clone()).collect(), false),
        column(keys.iter().map(|k| k.org_id.clone()).collect(), false),
        column(actors.iter().cloned().map(Some).collect(), false),
        data.flatten(),
    ];
    (if created { &CREATED } else { &AUDIT }).exec(conn, &args, false, 0);
    let last = if created { events::queued(conn) } else { None };
    arm_timers(conn, keys);
    last
}

/// After such a statement (returning its event's id, as the events' INSERTs here do): the
/// event's deliveries queued and the key's timers armed; the event's id, for `events::notify`.
pub fn created(conn: &Connection, key: &NewKey) -> Option<i64> {
    let last = events::queued(conn);
    arm_timers(conn, std::slice::from_ref(key));
    last
}

/// The new keys' timers (one statement, when any has one).
fn arm_timers(conn: &Connection, keys: &[NewKey]) {
    let (mut tid, mut kind, mut due) = (Vec::new(), Vec::new(), Vec::new());
    for k in keys {
        for (w, d) in k.timers() {
            tid.push(Some(k.id));
            kind.push(Some(w.to_owned()));
            due.push(Some(d));
        }
    }
    if !tid.is_empty() {
        TIMERS.exec(
            conn,
            &[tid.into_datum(), kind.into_datum(), due.into_datum()],
            false,
            0,
        );
    }
}
