-- 006: the protocol each run was measured under, and the study's window: a run's value for a
-- layer × site × stratum is the median of that series' own last `last_k` measured values
-- (a step where the stratum was skipped no longer takes a place in the window).
ALTER TABLE runs ADD COLUMN protocol INTEGER;
UPDATE runs SET protocol = 1;   -- every run stored before this migration

UPDATE ranks SET from_end = s.from_end
FROM (SELECT run_id, step, layer, site, stratum,
             row_number() OVER (PARTITION BY run_id, layer, site, stratum ORDER BY step DESC) AS from_end
      FROM ranks) s
WHERE ranks.run_id = s.run_id AND ranks.step = s.step AND ranks.layer = s.layer
  AND ranks.site = s.site AND ranks.stratum = s.stratum;

DELETE FROM run_points;
INSERT INTO run_points
SELECT k.run_id, k.site, k.stratum, k.metric, median(k.value), count(*), min(k.n_tokens)
FROM (SELECT m.run_id, m.layer, m.site, m.stratum, m.metric, median(m.value) AS value,
             min(m.n_tokens) AS n_tokens
      FROM rank_metrics m JOIN runs r USING (run_id)
      WHERE m.from_end <= r.last_k
      GROUP BY m.run_id, m.layer, m.site, m.stratum, m.metric) k
GROUP BY k.run_id, k.site, k.stratum, k.metric;

DROP VIEW layer_points;
CREATE VIEW layer_points AS
SELECT m.run_id, m.layer, m.site, m.stratum, m.metric,
       median(m.value) AS value, min(m.n_tokens) AS n_tokens, count(*) AS n_steps
FROM rank_metrics m JOIN runs r USING (run_id)
WHERE m.from_end <= r.last_k
GROUP BY m.run_id, m.layer, m.site, m.stratum, m.metric;
