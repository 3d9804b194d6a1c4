-- 007: `betas` groups by every runs factor (not by optimizer alone, which pooled runs of
-- different n_head, steps, pos, … into one fit) and applies the same 3-width floor as
-- `specdb query beta`: one row per group × site × stratum × metric, over finished runs, with
-- points averaged over seeds first. Runs of different protocols are different groups.
DROP VIEW betas;
CREATE VIEW betas AS
WITH pts AS (
    SELECT r.optimizer, r.optimizer_name, r.lr, r.d_model, r.n_layer, r.n_head, r.context, r.vocab_size,
           r.corpus, r.steps, r.batch_size, r.measure_source, r.pos, r.norm, r.postln_frac, r.activation,
           coalesce(r.protocol, 1) AS protocol, p.site, p.stratum, p.metric, r.ffn_width,
           avg(p.value) AS value, count(*) AS n_seeds
    FROM run_points p JOIN runs r USING (run_id)
    WHERE r.status = 'done' AND p.value > 0
    GROUP BY ALL
), fit AS (
    SELECT * EXCLUDE (ffn_width, value, n_seeds),
           regr_slope(ln(value), ln(ffn_width)) AS beta,
           regr_intercept(ln(value), ln(ffn_width)) AS intercept,
           regr_r2(ln(value), ln(ffn_width)) AS r2,
           regr_sxx(ln(value), ln(ffn_width)) AS sxx,
           regr_syy(ln(value), ln(ffn_width)) AS syy,
           count(*) AS n_widths, max(n_seeds) AS n_seeds
    FROM pts
    GROUP BY ALL
)
SELECT * EXCLUDE (sxx, syy),
       sqrt(greatest(0, (1 - r2) * syy / (n_widths - 2)) / sxx) AS stderr
FROM fit
WHERE n_widths >= 3;
