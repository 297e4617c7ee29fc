//! `keypal.emit_events`: the outbox. Writes events (payload = the webhook body) with their
//! pending webhook deliveries, in the caller's transaction, and notifies listeners once per
//! call with the highest id (they read the outbox from the last id they saw).
//!
//! Rust rather than PL/pgSQL: every statement that changes keys makes one call, and the
//! PL/pgSQL function's entry, its settings and its three statements were a fifth of what
//! creating one key cost. Its one statement is prepared once per backend.

use crate::spi::{Connection, Stmt};
use pgrx::pg_sys;
use pgrx::prelude::*;

/// An event's payload, the webhook body: its name, when, and its data.
macro_rules! payload {
    ($event:expr, $data:expr) => {
        concat!(
            "pg_catalog.jsonb_build_object('event', ",
            $event,
            ", 'timestamp', pg_catalog.to_char(pg_catalog.timezone('UTC', pg_catalog.clock_timestamp()),
                                            'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
             'data', ",
            $data,
            ")"
        )
    };
}
/// Whether any webhook is enabled (most databases have none: then nothing is queued), asked
/// by the events' INSERT as it returns their ids (under its snapshot, taken as it starts: a
/// webhook enabled while a long statement ran is seen).
macro_rules! any_webhook {
    () => {
        "EXISTS (SELECT FROM keypal.webhooks w WHERE w.enabled)"
    };
}
// (for audit.rs's statement that writes created keys' audit rows and events together)
pub(crate) use {any_webhook, payload};
/// The events, in order. Names are qualified (callers pin search_path, but a plan made
/// under theirs may be re-planned under another), but for unnest: with several arrays it is
/// syntax, not a function to qualify.
static EVENTS: Stmt = Stmt::generic(
    sql!(
        "INSERT INTO keypal.events (event, key_id, payload)
         SELECT e.event, e.key_id, ",
        payload!("e.event", "e.data"),
        " FROM unnest($1::pg_catalog.text[], $2::pg_catalog.uuid[], $3::pg_catalog.jsonb[])
               WITH ORDINALITY AS e(event, key_id, data, n)
          ORDER BY e.n
         RETURNING id, ",
        any_webhook!()
    ),
    &[
        pg_sys::TEXTARRAYOID,
        pg_sys::UUIDARRAYOID,
        pg_sys::JSONBARRAYOID,
    ],
);
/// One pending delivery per enabled webhook whose events match each event written (by id);
/// behind a pending delivery of the same key to the same webhook it waits as long (a key's
/// events arrive in order; a statement makes at most one event per key).
static QUEUE: Stmt = Stmt::generic(
    c"INSERT INTO keypal.webhook_queue (webhook_id, event_id, key_id, next_at)
      SELECT w.id, e.id, e.key_id, keypal.queued_behind(w.id, e.key_id, e.id)
        FROM pg_catalog.unnest($1::pg_catalog.int8[]) AS q(id)
        JOIN keypal.events e ON e.id OPERATOR(pg_catalog.=) q.id
        JOIN keypal.webhooks w
          ON w.enabled AND w.events OPERATOR(pg_catalog.&&) ARRAY[e.event, '*',
                 pg_catalog.split_part(e.event, '.', 1) OPERATOR(pg_catalog.||) '.*']",
    &[pg_sys::INT8ARRAYOID],
);

/// Writes the events (`names[i]` of key `key_ids[i]`, its webhook body's "data" `data[i]`:
/// text[], uuid[], jsonb[] datums, taken as they are); returns the highest id written, None
/// when there were none.
fn emit_arrays(
    conn: &Connection,
    names: Option<pg_sys::Datum>,
    key_ids: Option<pg_sys::Datum>,
    data: Option<pg_sys::Datum>,
) -> Option<i64> {
    EVENTS.exec(conn, &[names, key_ids, data], false, 0);
    let last = queued(conn);
    notify(last);
    last
}

/// After the events' INSERT (its RETURNING: `id, any_webhook!()`): their deliveries queued;
/// the highest id, for `notify` (once per call: a call that writes in several statements
/// notifies after the last).
pub fn queued(conn: &Connection) -> Option<i64> {
    // SAFETY: the INSERT returned a bigint column, never NULL, and a boolean; its result is
    // freed once read.
    let (ids, hooks): (Vec<Option<i64>>, bool) = unsafe {
        let n = pg_sys::SPI_processed as usize;
        let ids = (0..n)
            .map(|r| conn.get(r, 1).and_then(|d| i64::from_datum(d, false)))
            .collect();
        let hooks = n > 0 && conn.get_bool(0, 2);
        pg_sys::SPI_freetuptable(pg_sys::SPI_tuptable);
        (ids, hooks)
    };
    let last = ids.iter().flatten().max().copied();
    let queued = if hooks {
        QUEUE.exec(conn, &[ids.into_datum()], false, 0)
    } else {
        0
    };
    if queued > 0 {
        crate::worker::wake_at_commit();
    }
    last
}

/// Tells listeners (at commit) that events up to `last` are in the outbox.
pub fn notify(last: Option<i64>) {
    if let Some(id) = last {
        // SAFETY: pg_notify(text, text) with two text datums.
        unsafe {
            pgrx::direct_function_call::<()>(
                pg_sys::pg_notify,
                &["keypal_events".into_datum(), id.to_string().into_datum()],
            );
        }
    }
}

finfo_v1!(pg_finfo_keypal_emit_events);

/// `keypal.emit_events(events text[], key_ids uuid[], data jsonb[]) RETURNS bigint`
/// (declared in api.sql, strict): the arrays go to the INSERT as they came (no jsonb read
/// and written again); the highest id written, NULL when none.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn keypal_emit_events(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by fmgr with three non-NULL arrays, as declared.
    unsafe {
        let arg = |n| Some(pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, n));
        let (names, key_ids, data) = (arg(0), arg(1), arg(2));
        let last = crate::spi::passing_errors(|| {
            Connection::with(|conn| emit_arrays(conn, names, key_ids, data))
        });
        match last {
            Some(id) => id.into(),
            None => {
                (*fcinfo).isnull = true;
                pg_sys::Datum::from(0usize)
            }
        }
    }
}
