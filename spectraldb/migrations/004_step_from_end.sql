-- 004: ranks.from_end = 1 for a run's final measured step, 2 for the one before, …
-- Stored once when the run is written, so "the last K measured steps" is a plain filter
-- rather than a window over millions of rows (queries on 10 M rank rows stay under a second).
ALTER TABLE ranks ADD COLUMN from_end INTEGER;
UPDATE ranks SET from_end = s.from_end
FROM (SELECT run_id, step, row_number() OVER (PARTITION BY run_id ORDER BY step DESC) AS from_end
      FROM (SELECT DISTINCT run_id, step FROM ranks)) s
WHERE ranks.run_id = s.run_id AND ranks.step = s.step;
