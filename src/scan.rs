//! Reading one row through a unique index without the executor: what verify does for the
//! key row, its ancestors and, on a key's first quota'd verify, its quota use.
//!
//! Rows are read as they are *now*: under a snapshot taken at the moment of the read
//! (`Fresh`: the latest committed state plus this transaction's own changes so far),
//! whatever the caller's isolation level or however old its transaction snapshot. Verify
//! is an authority check: a revoke committed before it began must be seen, even inside an
//! older REPEATABLE READ transaction. Being an MVCC snapshot, it shows exactly one version
//! of each row, even while another session updates it.

use pgrx::pg_sys;

/// A snapshot of the latest committed state plus this transaction's changes so far
/// (earlier commands included: the command counter is advanced first, as SPI does for a
/// volatile function's query), for the duration of one `Fresh::with`.
pub struct Fresh(pg_sys::Snapshot);

impl Fresh {
    /// Runs `f` with a snapshot taken now.
    ///
    /// The snapshot is PostgreSQL's static one, not registered (a copy and a resource-owner
    /// entry per verify measured a few per cent of its cost): `f` must not take another
    /// transaction or latest snapshot — it only scans indexes and heap tuples. Its xmin is
    /// no older than the one this backend already advertises for the running statement, so
    /// nothing it sees can be pruned away meanwhile.
    pub fn with<R>(f: impl FnOnce(&Fresh) -> R) -> R {
        // SAFETY: as above; the snapshot stays valid until the next GetTransactionSnapshot
        // or GetLatestSnapshot call, which nothing inside `f` makes.
        unsafe {
            // No new snapshot (nor command) may be taken inside a parallel operation: reached
            // only through a wrapper wrongly labelled parallel safe or restricted.
            if pg_sys::IsInParallelMode() {
                crate::errors::raise(
                    pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    "keypal: verify cannot run inside a parallel operation (mark the calling function PARALLEL UNSAFE)".into(),
                );
            }
            pg_sys::CommandCounterIncrement();
            // READ COMMITTED: the transaction snapshot is taken afresh by this very call
            // (and PostgreSQL can often reuse the statement's, when no transaction ended
            // since). REPEATABLE READ and SERIALIZABLE keep an old one: take the latest.
            let fresh = if pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32 {
                pg_sys::GetLatestSnapshot()
            } else {
                pg_sys::GetTransactionSnapshot()
            };
            f(&Fresh(fresh))
        }
    }
}

/// Where to look: a table, an index on it (a unique one for `lookup`), and the equality
/// test on the index's first column.
#[derive(Clone, Copy)]
pub struct Index {
    pub table: pg_sys::Oid,
    pub index: pg_sys::Oid,
    /// attnum (in the table) of the indexed column.
    pub column: i16,
    /// The equality function of the column's type (e.g. F_BYTEAEQ).
    pub eq: u32,
}

impl Index {
    /// The columns `want` (attnums, 1-based) of the row whose indexed column equals `value`,
    /// as `snapshot` sees it, copied into the current memory context; None when there is no
    /// such row.
    pub fn lookup<const N: usize>(
        &self,
        snapshot: &Fresh,
        value: pg_sys::Datum,
        want: &[i16; N],
    ) -> Option<[Option<pg_sys::Datum>; N]> {
        // SAFETY: opens the table (AccessShareLock, held to transaction end as the executor
        // would) and scans the unique index with one equality key; the found tuple is copied
        // before the scan releases its buffer, and `want` holds attnums of the table.
        unsafe {
            let rel = pg_sys::table_open(self.table, pg_sys::AccessShareLock as i32);
            let scan = self.begin(rel, snapshot.0, value);
            let found = pg_sys::systable_getnext(scan);
            let row = (!found.is_null()).then(|| {
                let tuple = pg_sys::heap_copytuple(found);
                let desc = (*rel).rd_att;
                let natts = (*desc).natts as usize;
                let mut values = vec![pg_sys::Datum::from(0usize); natts];
                let mut nulls = vec![true; natts];
                pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
                std::array::from_fn(|i| {
                    let at = want[i] as usize - 1;
                    (!nulls[at]).then_some(values[at])
                })
            });
            pg_sys::systable_endscan(scan);
            pg_sys::table_close(rel, pg_sys::NoLock as i32);
            row
        }
    }

    /// The first of `values` for which the latest committed state holds a row (its indexed
    /// column equal to the value) that the running statement's snapshot does not show: one
    /// inserted, or last changed, by a transaction that committed after that snapshot was
    /// taken. This transaction's own rows never count.
    ///
    /// What a REPEATABLE READ or SERIALIZABLE statement uses to notice that the rows it
    /// reasons about moved under it while it waited for a lock (a lock held, never a row
    /// changed, raises no serialization failure of its own).
    pub fn first_unseen(&self, values: &[pg_sys::Datum]) -> Option<usize> {
        // SAFETY: as `lookup`, scanning every match of each value under one latest snapshot;
        // each tuple's header is read while the scan holds its buffer. The active snapshot
        // is the running statement's, which it holds until it ends; the latest is copied
        // into none, and nothing here takes another.
        unsafe {
            if !pg_sys::get_index_isvalid(self.index) {
                crate::errors::raise(
                    pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!(
                        "keypal: index {} is not valid (REINDEX it)",
                        self.index.to_u32()
                    ),
                );
            }
            let seen = pg_sys::GetActiveSnapshot();
            let latest = pg_sys::GetLatestSnapshot();
            let rel = pg_sys::table_open(self.table, pg_sys::AccessShareLock as i32);
            let unseen = values.iter().position(|value| {
                let scan = self.begin(rel, latest, *value);
                let mut unseen = false;
                loop {
                    let tuple = pg_sys::systable_getnext(scan);
                    if tuple.is_null() {
                        break;
                    }
                    let header = (*tuple).t_data;
                    // (a frozen tuple's xmin is no transaction id any more: older than any
                    // snapshot)
                    let frozen = u32::from((*header).t_infomask) & pg_sys::HEAP_XMIN_FROZEN
                        == pg_sys::HEAP_XMIN_FROZEN;
                    let xmin = (*header).t_choice.t_heap.t_xmin;
                    if !frozen
                        && !pg_sys::TransactionIdIsCurrentTransactionId(xmin)
                        && pg_sys::XidInMVCCSnapshot(xmin, seen)
                    {
                        unseen = true;
                        break;
                    }
                }
                pg_sys::systable_endscan(scan);
                unseen
            });
            pg_sys::table_close(rel, pg_sys::NoLock as i32);
            unseen
        }
    }

    /// A scan of the index for `value` under `snapshot`.
    ///
    /// # Safety
    /// `rel` is this index's table, open; the caller ends the scan.
    #[inline]
    unsafe fn begin(
        &self,
        rel: pg_sys::Relation,
        snapshot: pg_sys::Snapshot,
        value: pg_sys::Datum,
    ) -> *mut pg_sys::SysScanDescData {
        // SAFETY: as the caller promises; one equality key on the indexed column.
        unsafe {
            // With ignore_system_indexes (settable by anyone at connection start) the scan
            // would read the whole table each time: refuse instead.
            if pg_sys::IgnoreSystemIndexes {
                crate::errors::raise(
                    pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    "keypal: verify (and, in REPEATABLE READ, a change to a key with children) does not run with ignore_system_indexes = on".into(),
                );
            }
            let mut scankey: pg_sys::ScanKeyData = std::mem::zeroed();
            pg_sys::ScanKeyInit(
                &mut scankey,
                self.column,
                pg_sys::BTEqualStrategyNumber as u16,
                pg_sys::Oid::from(self.eq),
                value,
            );
            pg_sys::systable_beginscan(rel, self.index, true, snapshot, 1, &mut scankey)
        }
    }
}
