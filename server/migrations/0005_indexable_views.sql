-- Operators filter the views by hour or day (WHERE day = ...), and no index can serve that
-- unless the views' expression is IMMUTABLE: date_trunc(..., 'UTC') is STABLE in PostgreSQL 15,
-- and date_bin overflows at the far ends of timestamptz. date_trunc of the UTC wall clock, back
-- to timestamptz, is immutable, gives the same UTC hours and days, and holds over all of
-- timestamptz. The index itself is the operator's choice (the README has the statements): on a
-- month of 10 million rows, yesterday's top affiliates from pixel_daily took 1,540 ms reading
-- the whole table, 552 ms with a BRIN index on the day; but each index costs every new row an
-- evaluation of the expression: a flush batch of 20,000 new keys took 48.3 ms with the two,
-- 42.9 ms without (loadtests/explain_report.py, with and without --view-indexes).
--
-- The views keep their columns, so they are replaced in place, and a view of an operator's on
-- top of them stays.
CREATE OR REPLACE VIEW pixel_hourly AS
SELECT date_trunc('hour', bucket AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hour,
       campaign, creative, affiliate, sub_id,
       sum(impressions)::bigint      AS impressions,
       sum(givt_impressions)::bigint AS givt_impressions,
       sum(measurable)::bigint       AS measurable,
       sum(viewable)::bigint         AS viewable,
       sum(clicks)::bigint           AS clicks,
       sum(givt_clicks)::bigint      AS givt_clicks,
       sum(clicks)::double precision / nullif(sum(impressions), 0)    AS ctr,
       sum(viewable)::double precision / nullif(sum(measurable), 0)   AS viewability_rate
FROM pixel_counts
GROUP BY 1, 2, 3, 4, 5;

CREATE OR REPLACE VIEW pixel_daily AS
SELECT date_trunc('day', bucket AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS day,
       campaign, creative, affiliate, sub_id,
       sum(impressions)::bigint      AS impressions,
       sum(givt_impressions)::bigint AS givt_impressions,
       sum(measurable)::bigint       AS measurable,
       sum(viewable)::bigint         AS viewable,
       sum(clicks)::bigint           AS clicks,
       sum(givt_clicks)::bigint      AS givt_clicks,
       sum(clicks)::double precision / nullif(sum(impressions), 0)    AS ctr,
       sum(viewable)::double precision / nullif(sum(measurable), 0)   AS viewability_rate
FROM pixel_counts
GROUP BY 1, 2, 3, 4, 5;
