-- keypal 0.4.0 -> 0.5.0 (ALTER EXTENSION keypal UPDATE).
-- Counts across servers: a standby's flush worker ships what verify counted there (last
-- uses, hours, quota counts, rate-window admissions) to the primary every flush interval,
-- over libpq (keypal.primary_conninfo, else primary_conninfo), to keypal.replica_counts,
-- which takes each numbered batch once (keypal.replica_batches) and answers with each key's
-- global count; every server then decides on the global count plus its own not yet shipped.
-- keypal.replica_counts is granted to no one: grant EXECUTE to the role standbys ship as.
-- Shared memory: each key's entry grows from 472 to 840 bytes (the other servers' rate-window
-- counts, and a standby's not yet shipped), on a primary with no standby too: the same
-- keypal.shared_memory holds about 0.56 times the keys in use it did. Check
-- SELECT * FROM keypal_stats() WHERE name LIKE 'shared_entr%' and raise it before updating if
-- shared_entries is above half of shared_entries_max.

CREATE TABLE keypal.replica_batches (
    replica text PRIMARY KEY,
    batch   bigint NOT NULL,
    at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE keypal.replica_batches IS 'The last batch number keypal.replica_counts took from each standby worker (rows unheard of for a week are dropped).';
REVOKE ALL ON keypal.replica_batches FROM PUBLIC;

CREATE FUNCTION keypal."replica_counts"(
	"replica" TEXT,
	"batch" bigint,
	"counts" TEXT
) RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'replica_counts_wrapper';
COMMENT ON FUNCTION keypal.replica_counts(text, bigint, text) IS 'On the primary: takes a standby worker''s batch of counts (last uses, hours, quota counts, rate-window admissions) into the shared state, once per batch number, and answers with each key''s global count. Grant EXECUTE only to the role standbys ship as (keypal.primary_conninfo, else primary_conninfo).';
REVOKE ALL ON FUNCTION keypal.replica_counts(text, bigint, text) FROM PUBLIC;
