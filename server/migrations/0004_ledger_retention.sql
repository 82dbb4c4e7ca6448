-- The ledger is pruned: rows older than --ledger-days go, once an hour. Batches are applied in
-- time order, so a BRIN index of a few kB finds the old rows without a scan of the table and
-- costs each flush's insert next to nothing.
CREATE INDEX flush_batches_applied_brin ON flush_batches USING brin (applied_at);

-- How far back the ledger has been pruned: a spooled batch written before then may have been
-- applied, its row pruned since, so it is not applied again blindly. One row.
CREATE TABLE ledger_horizon (pruned_before timestamptz NOT NULL);
INSERT INTO ledger_horizon VALUES ('-infinity');
