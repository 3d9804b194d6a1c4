-- 010: data-parallel runs (protocol 3). How many ranks trained a run and how its measurement was
-- reduced across them (`study`: strata on rank 0's share, `all` on every rank's; `global`: every
-- stratum may reach every rank's share). Each spectrum's token count is spectra.n_tokens. Runs
-- stored before this migration trained in one process.
ALTER TABLE runs ADD COLUMN workers INTEGER;
ALTER TABLE runs ADD COLUMN reduction VARCHAR;
UPDATE runs SET workers = 1 WHERE source = 'specdb';
