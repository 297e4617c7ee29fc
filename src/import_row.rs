//! `keypal.import_row(rec text, index int, OUT source text, OUT notify text, OUT limits
//! jsonb, OUT k keypal.keys)`: one record of keypal_import's data, checked
//! (`import::record_text`: every error names the record and field) and turned into a
//! `keypal.keys` row, as `jsonb_populate_record(NULL::keypal.keys, …)` would make it of the
//! record's columns as JSON: a string goes through its column type's input function, an
//! array of strings into text[], a JSON value into a jsonb column as it is, JSON null into
//! SQL NULL. Besides the row: which kind of record it was, its notify_before as written
//! (keypal_import parses it with keypal.parse_duration's words), and its rate_limit with a
//! JSON null kept (no limit, over any default; SQL NULL is the default).
//!
//! Building the row here rather than a jsonb for jsonb_populate_record saves writing every
//! record as JSON text, parsing it again into jsonb, and reading it back column by column:
//! two fifths of an import's time. Declared in transfer.sql.

use crate::errors::refuse_option;
use crate::import::{self, Source};
use pgrx::prelude::*;
use pgrx::{pg_sys, JsonB, PgMemoryContexts};
use serde_json::{Map, Value};
use std::ffi::CString;

/// How a column of keypal.keys takes a JSON value.
enum Conv {
    Jsonb,
    TextArray,
    /// Its type's input function.
    Input {
        func: pg_sys::Oid,
        ioparam: pg_sys::Oid,
        typmod: i32,
    },
}

/// Per call site (fn_extra): the result's row types and each column's conversion.
struct Shape {
    outer: pg_sys::TupleDesc,
    keys: pg_sys::TupleDesc,
    /// (column name, conversion) in attribute order; None for a dropped column.
    cols: Vec<Option<(String, Conv)>>,
}

/// The Shape of this call site, made on its first call.
///
/// # Safety
/// `fcinfo` is a call of keypal.import_row as declared.
unsafe fn shape(fcinfo: pg_sys::FunctionCallInfo) -> &'static Shape {
    let flinfo = (*fcinfo).flinfo;
    if !(*flinfo).fn_extra.is_null() {
        return &*((*flinfo).fn_extra as *const Shape);
    }
    let mut mcx = PgMemoryContexts::For((*flinfo).fn_mcxt);
    let made = mcx.switch_to(|_| {
        let mut outer: pg_sys::TupleDesc = std::ptr::null_mut();
        if pg_sys::get_call_result_type(fcinfo, std::ptr::null_mut(), &mut outer)
            != pg_sys::TypeFuncClass::TYPEFUNC_COMPOSITE
        {
            pgrx::error!("keypal.import_row must return a row");
        }
        let outer = pg_sys::BlessTupleDesc(pg_sys::CreateTupleDescCopy(outer));
        let natts = (*outer).natts as usize;
        let keys_type = (*(*outer).attrs.as_ptr().add(natts - 1)).atttypid;
        let cached = pg_sys::lookup_rowtype_tupdesc(keys_type, -1);
        let keys = pg_sys::BlessTupleDesc(pg_sys::CreateTupleDescCopy(cached));
        pg_sys::DecrTupleDescRefCount(cached);
        let mut cols = Vec::with_capacity((*keys).natts as usize);
        for i in 0..(*keys).natts as usize {
            let att = &*(*keys).attrs.as_ptr().add(i);
            if att.attisdropped {
                cols.push(None);
                continue;
            }
            let name = std::ffi::CStr::from_ptr(att.attname.data.as_ptr())
                .to_string_lossy()
                .into_owned();
            let conv = if att.atttypid == pg_sys::JSONBOID {
                Conv::Jsonb
            } else if att.atttypid == pg_sys::TEXTARRAYOID {
                Conv::TextArray
            } else {
                let (mut func, mut ioparam) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
                pg_sys::getTypeInputInfo(att.atttypid, &mut func, &mut ioparam);
                Conv::Input {
                    func,
                    ioparam,
                    typmod: att.atttypmod,
                }
            };
            cols.push(Some((name, conv)));
        }
        (outer, keys, cols)
    });
    let (outer, keys, cols) = made;
    let ptr = mcx.leak_and_drop_on_delete(Shape { outer, keys, cols });
    (*flinfo).fn_extra = ptr.cast();
    &*ptr
}

/// A JSON value as the text jsonb_populate_record gives a type's input function: a string's
/// own text, any other value's JSON; None for null.
fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// A row of `desc` from its columns (None: NULL), as a composite datum.
///
/// # Safety
/// In a transaction; each datum is of its column's type.
unsafe fn form(desc: pg_sys::TupleDesc, cols: &[Option<pg_sys::Datum>]) -> pg_sys::Datum {
    let mut values: Vec<pg_sys::Datum> = cols
        .iter()
        .map(|d| d.unwrap_or(pg_sys::Datum::from(0usize)))
        .collect();
    let mut nulls: Vec<bool> = cols.iter().map(Option::is_none).collect();
    let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
    pg_sys::HeapTupleHeaderGetDatum((*tuple).t_data)
}

/// A JSON value into a column; None for SQL NULL.
///
/// # Safety
/// In a transaction; `conv` is the column's.
unsafe fn column(conv: &Conv, v: &Value) -> Option<pg_sys::Datum> {
    if v.is_null() {
        return None;
    }
    match conv {
        Conv::Jsonb => JsonB(v.clone()).into_datum(),
        Conv::TextArray => {
            let Value::Array(items) = v else {
                pgrx::error!("keypal.import_row: {v} is not an array");
            };
            let list: Vec<Option<String>> = items.iter().map(scalar_text).collect();
            list.into_datum()
        }
        Conv::Input {
            func,
            ioparam,
            typmod,
        } => {
            let text = CString::new(scalar_text(v).unwrap_or_default())
                .unwrap_or_else(|_| pgrx::error!("keypal.import_row: a NUL in a value"));
            Some(pg_sys::OidInputFunctionCall(
                *func,
                text.as_ptr().cast_mut(),
                *ioparam,
                *typmod,
            ))
        }
    }
}

finfo_v1!(pg_finfo_keypal_import_row);

/// See the module. Strict: a NULL record or index gives NULL.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn keypal_import_row(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by fmgr as declared in transfer.sql (text, integer; strict).
    unsafe {
        let rec = String::from_datum(pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, 0), false)
            .unwrap_or_default();
        let index =
            i32::from_datum(pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, 1), false).unwrap_or(0);
        let (mut m, src): (Map<String, Value>, Source) =
            match import::record_text(&rec, usize::try_from(index).unwrap_or(0)) {
                Ok(r) => r,
                Err(e) => refuse_option(e),
            };
        let shape = shape(fcinfo);
        let notify = m.remove("notify_before");
        let limits = m.get("rate_limit").cloned();
        let cols: Vec<Option<pg_sys::Datum>> = shape
            .cols
            .iter()
            .map(|col| {
                let (name, conv) = col.as_ref()?;
                column(conv, m.get(name.as_str())?)
            })
            .collect();
        let row = form(shape.keys, &cols);
        form(
            shape.outer,
            &[
                src.name().into_datum(),
                notify.as_ref().and_then(scalar_text).into_datum(),
                limits.map(JsonB).into_datum(),
                Some(row),
            ],
        )
    }
}

/// `keypal.import_record(rec, index)` of schemas older than 0.6.0, whose keypal_import calls
/// it until `ALTER EXTENSION keypal UPDATE` (a package upgrade comes first): the record's
/// columns as jsonb, plus `_source`.
#[pg_extern(sql = false, immutable, parallel_safe)]
fn import_record(rec: &str, index: i32) -> JsonB {
    match import::record_text(rec, usize::try_from(index).unwrap_or(0)) {
        Ok((mut m, src)) => {
            m.insert("_source".into(), src.name().into());
            JsonB(Value::Object(m))
        }
        Err(e) => refuse_option(e),
    }
}
