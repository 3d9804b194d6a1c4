-- 002: architecture factors on runs, the Rényi family and EEE on ranks, pre→post reinjection,
-- and points/layer_points over every metric.
ALTER TABLE runs ADD COLUMN pos VARCHAR;
ALTER TABLE runs ADD COLUMN norm VARCHAR;
ALTER TABLE runs ADD COLUMN postln_frac DOUBLE;      -- fraction of leading blocks that are post-norm
ALTER TABLE runs ADD COLUMN activation VARCHAR;
ALTER TABLE runs ADD COLUMN keep_eigenvalues VARCHAR;

ALTER TABLE ranks ADD COLUMN renyi_0_5 DOUBLE;
ALTER TABLE ranks ADD COLUMN renyi_1 DOUBLE;          -- = soft_rank
ALTER TABLE ranks ADD COLUMN renyi_1_5 DOUBLE;
ALTER TABLE ranks ADD COLUMN renyi_2 DOUBLE;          -- = hard_rank
ALTER TABLE ranks ADD COLUMN renyi_3 DOUBLE;
ALTER TABLE ranks ADD COLUMN renyi_5 DOUBLE;
ALTER TABLE ranks ADD COLUMN renyi_inf DOUBLE;        -- 1 / max p
ALTER TABLE ranks ADD COLUMN eee DOUBLE;

-- Per layer × stratum × step: how the nonlinearity reshapes the spectrum (pre → post).
CREATE TABLE reinjection (
    run_id        VARCHAR NOT NULL,
    step          INTEGER NOT NULL,
    layer         INTEGER NOT NULL,
    stratum       VARCHAR NOT NULL,
    js_divergence DOUBLE NOT NULL,   -- JS(pre ‖ post), natural log, in [0, ln 2]
    rho_0_5 DOUBLE, rho_1 DOUBLE, rho_1_5 DOUBLE, rho_2 DOUBLE, rho_3 DOUBLE, rho_5 DOUBLE,
    rho_inf DOUBLE,                  -- rho_α = R_α(post) / R_α(pre)
    PRIMARY KEY (run_id, step, layer, stratum)
);

DROP VIEW points;
DROP VIEW layer_points;

-- Long form of ranks: metric is soft, hard, renyi:<α> or eee.
CREATE VIEW rank_metrics AS
UNPIVOT ranks
ON soft_rank AS "soft", hard_rank AS "hard", renyi_0_5 AS "renyi:0.5", renyi_1 AS "renyi:1",
   renyi_1_5 AS "renyi:1.5", renyi_2 AS "renyi:2", renyi_3 AS "renyi:3", renyi_5 AS "renyi:5",
   renyi_inf AS "renyi:inf", eee AS "eee"
INTO NAME metric VALUE value;

-- One value per run × layer × site × stratum × metric: the median over the run's last
-- `last_k` measured steps.
CREATE VIEW layer_points AS
WITH ranked AS (
    SELECT l.*, DENSE_RANK() OVER (PARTITION BY l.run_id ORDER BY l.step DESC) AS from_end
    FROM rank_metrics l
)
SELECT k.run_id, k.layer, k.site, k.stratum, k.metric,
       median(k.value) AS value, min(k.n_tokens) AS n_tokens, count(*) AS n_steps
FROM ranked k JOIN runs r USING (run_id)
WHERE k.from_end <= r.last_k
GROUP BY k.run_id, k.layer, k.site, k.stratum, k.metric;

-- The run's point: the median over layers of layer_points, with the run's factors beside it.
-- low_n flags points with fewer than 4 tokens per dimension (rank is capped by min(D, N-1)).
CREATE VIEW points AS
WITH agg AS (
    SELECT run_id, site, stratum, metric, median(value) AS value, count(*) AS n_layers,
           min(n_tokens) AS n_tokens
    FROM layer_points GROUP BY run_id, site, stratum, metric
)
SELECT a.run_id, r.optimizer, r.ffn_mult, r.ffn_width, r.d_model, r.n_head, r.pos, r.norm,
       r.postln_frac, r.activation, r.seed, r.steps, r.status, r.final_val_ppl AS val_ppl,
       a.site, a.stratum, a.metric, a.value, a.n_layers, a.n_tokens,
       a.n_tokens / r.ffn_width AS n_over_d, a.n_tokens / r.ffn_width < 4 AS low_n
FROM agg a JOIN runs r USING (run_id);
