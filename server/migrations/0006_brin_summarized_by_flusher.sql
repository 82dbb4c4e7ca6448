-- The flusher summarizes the BRIN index's new page ranges (server/storage.py,
-- summarize_ranges); autovacuum no longer does, on request: its requests were dropped under
-- a flush's load, each with a line in the server's log (README, "Summaries of new page ranges").
-- The change takes the index's strongest lock, which waits for any open transaction that has
-- used the table: a lock timeout lets the server try again later rather than hold up every
-- flush and report queued behind it.
SET LOCAL lock_timeout = '1s';
ALTER INDEX IF EXISTS pixel_counts_bucket_brin SET (autosummarize = off);
SET LOCAL lock_timeout = DEFAULT;
