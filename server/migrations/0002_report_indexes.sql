-- The report and the operator page read a range of buckets. The primary key starts with the
-- bucket, but it is wide (the four text dimensions follow): for one day of a month-long table
-- the planner scans the whole table rather than it (the README has the plans). Flushes write
-- rows in bucket order, so a BRIN index of a few kB serves a range as a bitmap of page ranges,
-- and costs a flush next to nothing; autosummarize keeps it current as the table grows.
CREATE INDEX pixel_counts_bucket_brin ON pixel_counts USING brin (bucket) WITH (autosummarize = on);
