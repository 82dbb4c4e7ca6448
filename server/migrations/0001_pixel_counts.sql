-- Counts per key and time bucket, merged by every flush.
CREATE TABLE pixel_counts (
    bucket           timestamptz NOT NULL,
    campaign         text        NOT NULL,
    creative         text        NOT NULL,
    affiliate        text        NOT NULL,
    sub_id           text        NOT NULL,
    impressions      bigint      NOT NULL DEFAULT 0,
    givt_impressions bigint      NOT NULL DEFAULT 0,
    measurable       bigint      NOT NULL DEFAULT 0,
    viewable         bigint      NOT NULL DEFAULT 0,
    clicks           bigint      NOT NULL DEFAULT 0,
    givt_clicks      bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (bucket, campaign, creative, affiliate, sub_id)
);

-- The ledger: one row per applied flush batch, written in the batch's own transaction.
CREATE TABLE flush_batches (
    batch_id   uuid        PRIMARY KEY,
    row_count  integer     NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

CREATE VIEW pixel_hourly AS
SELECT date_trunc('hour', bucket, 'UTC') AS hour,
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

CREATE VIEW pixel_daily AS
SELECT date_trunc('day', bucket, 'UTC') AS day,
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
