-- 003: `betas`, the power-law fits in SQL. One row per optimizer × site × stratum × metric
-- over finished runs: OLS of ln(value) on ln(ffn_width) with points averaged over seeds.
-- (The t-interval needs a t quantile, so SQL gives stderr; `specdb query beta` adds the interval.)
CREATE VIEW betas AS
WITH pts AS (
    SELECT optimizer, site, stratum, metric, ffn_width, avg(value) AS value, count(*) AS n_seeds
    FROM points WHERE status = 'done' AND value > 0
    GROUP BY optimizer, site, stratum, metric, ffn_width
), fit AS (
    SELECT optimizer, site, stratum, metric,
           regr_slope(ln(value), ln(ffn_width)) AS beta,
           regr_intercept(ln(value), ln(ffn_width)) AS intercept,
           regr_r2(ln(value), ln(ffn_width)) AS r2,
           regr_sxx(ln(value), ln(ffn_width)) AS sxx,
           regr_syy(ln(value), ln(ffn_width)) AS syy,
           count(*) AS n_widths, max(n_seeds) AS n_seeds
    FROM pts GROUP BY optimizer, site, stratum, metric
)
SELECT optimizer, site, stratum, metric, beta, intercept, r2,
       CASE WHEN n_widths > 2 THEN sqrt(greatest(0, (1 - r2) * syy / (n_widths - 2)) / sxx) END AS stderr,
       n_widths, n_seeds
FROM fit;
