-- 005: run_points, each run's aggregated value per site × stratum × metric (median over its last
-- `last_k` measured steps, then over layers), written with the run. The default fits read this
-- small table instead of aggregating millions of rank rows per query; `points` now reads it too.
CREATE TABLE run_points (
    run_id   VARCHAR NOT NULL,
    site     VARCHAR NOT NULL,
    stratum  VARCHAR NOT NULL,
    metric   VARCHAR NOT NULL,
    value    DOUBLE,
    n_layers INTEGER NOT NULL,
    n_tokens BIGINT,
    PRIMARY KEY (run_id, site, stratum, metric)
);

INSERT INTO run_points
SELECT run_id, site, stratum, metric, median(value), count(*), min(n_tokens)
FROM layer_points GROUP BY run_id, site, stratum, metric;

DROP VIEW points;
CREATE VIEW points AS
SELECT a.run_id, r.optimizer, r.ffn_mult, r.ffn_width, r.d_model, r.n_head, r.pos, r.norm,
       r.postln_frac, r.activation, r.seed, r.steps, r.status, r.final_val_ppl AS val_ppl,
       a.site, a.stratum, a.metric, a.value, a.n_layers, a.n_tokens,
       a.n_tokens / r.ffn_width AS n_over_d, a.n_tokens / r.ffn_width < 4 AS low_n
FROM run_points a JOIN runs r USING (run_id);
