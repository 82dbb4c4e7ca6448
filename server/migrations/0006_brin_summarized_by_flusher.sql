-- The flusher summarizes the BRIN index's new page ranges, every 10 seconds (server/storage.py,
-- summarize_ranges); autovacuum no longer does, on request. Autovacuum takes at most 256
-- requests between its visits to a database (autovacuum_naptime, a minute by default), one for
-- each range of 128 pages filled, and a flush of a million new keys fills 244 (of the
-- benchmarks' keys). Past that the requests were dropped, each with a line and the flush's
-- statement in the server's log ("request for BRIN range summarization ... was not
-- recorded": 959 in five such flushes), and the ranges stayed unsummarized, so read by every
-- report planned on the index, until a vacuum of the table.
ALTER INDEX pixel_counts_bucket_brin SET (autosummarize = off);
