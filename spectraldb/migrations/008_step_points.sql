-- 008: step_points, each run's point at every measured step (median over layers of the value at
-- that step) per site × stratum × metric, written with the run like run_points. `query dynamics`
-- (β over training) reads this small table instead of aggregating every rank row per request.
CREATE TABLE step_points (
    run_id   VARCHAR NOT NULL,
    site     VARCHAR NOT NULL,
    stratum  VARCHAR NOT NULL,
    metric   VARCHAR NOT NULL,
    step     INTEGER NOT NULL,
    value    DOUBLE,
    n_layers INTEGER NOT NULL,
    n_tokens BIGINT,
    PRIMARY KEY (run_id, site, stratum, metric, step)
);

INSERT INTO step_points
SELECT run_id, site, stratum, metric, step, median(value), count(*), min(n_tokens)
FROM rank_metrics
GROUP BY run_id, site, stratum, metric, step;
