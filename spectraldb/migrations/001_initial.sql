-- 001: runs, evals, spectra, ranks, and the per-run aggregation view `points`.
CREATE TABLE runs (
    run_id        VARCHAR PRIMARY KEY,
    spec_name     VARCHAR,
    optimizer     VARCHAR NOT NULL,   -- readable label, e.g. 'Muon'
    optimizer_name VARCHAR NOT NULL,  -- adamw | muon | ...
    lr            DOUBLE,
    ffn_mult      DOUBLE NOT NULL,
    ffn_width     INTEGER NOT NULL,
    d_model       INTEGER NOT NULL,
    n_layer       INTEGER NOT NULL,
    n_head        INTEGER NOT NULL,
    context       INTEGER NOT NULL,
    vocab_size    INTEGER,
    corpus        VARCHAR,
    seed          INTEGER NOT NULL,
    steps         INTEGER NOT NULL,
    batch_size    INTEGER NOT NULL,
    measure_source VARCHAR,
    last_k        INTEGER NOT NULL,
    status        VARCHAR NOT NULL,   -- done | failed | diverged
    error         VARCHAR,
    final_val_loss DOUBLE,
    final_val_ppl DOUBLE,
    config        JSON NOT NULL,
    git_commit    VARCHAR,
    versions      JSON,
    host          VARCHAR,
    device        VARCHAR,
    started_at    TIMESTAMP,
    finished_at   TIMESTAMP,
    duration_s    DOUBLE
);

CREATE TABLE evals (
    run_id     VARCHAR NOT NULL,
    step       INTEGER NOT NULL,
    train_loss DOUBLE,
    val_loss   DOUBLE,
    val_ppl    DOUBLE,
    PRIMARY KEY (run_id, step)
);

CREATE TABLE spectra (
    run_id         VARCHAR NOT NULL,
    step           INTEGER NOT NULL,
    layer          INTEGER NOT NULL,
    site           VARCHAR NOT NULL,   -- pre | post
    stratum        VARCHAR NOT NULL,   -- all | head | mid | tail
    n_tokens       BIGINT NOT NULL,
    n_dim          INTEGER NOT NULL,
    skipped        BOOLEAN NOT NULL,   -- too few tokens: no eigenvalues computed
    min_eigenvalue DOUBLE,             -- most negative raw eigenvalue, before clamping at 1e-12
    eigenvalues    DOUBLE[],           -- descending
    PRIMARY KEY (run_id, step, layer, site, stratum)
);

CREATE TABLE ranks (
    run_id    VARCHAR NOT NULL,
    step      INTEGER NOT NULL,
    layer     INTEGER NOT NULL,
    site      VARCHAR NOT NULL,
    stratum   VARCHAR NOT NULL,
    n_tokens  BIGINT NOT NULL,
    soft_rank DOUBLE NOT NULL,
    hard_rank DOUBLE NOT NULL,
    spectral_entropy DOUBLE NOT NULL,
    PRIMARY KEY (run_id, step, layer, site, stratum)
);

-- One value per run × layer × site × stratum × metric: the median over the run's last
-- `last_k` measured steps.
CREATE VIEW layer_points AS
WITH long AS (
    UNPIVOT ranks ON soft_rank AS soft, hard_rank AS hard INTO NAME metric VALUE value
), ranked AS (
    SELECT l.*, DENSE_RANK() OVER (PARTITION BY l.run_id ORDER BY l.step DESC) AS from_end
    FROM long l
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
SELECT a.run_id, r.optimizer, r.ffn_mult, r.ffn_width, r.d_model, r.n_head, r.seed, r.steps,
       r.status, r.final_val_ppl AS val_ppl, a.site, a.stratum, a.metric, a.value, a.n_layers,
       a.n_tokens, a.n_tokens / r.ffn_width AS n_over_d, a.n_tokens / r.ffn_width < 4 AS low_n
FROM agg a JOIN runs r USING (run_id);
