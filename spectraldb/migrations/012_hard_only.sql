-- 012: `measure.metrics: hard_only` stores the hard rank alone, from tr(C)²/‖C‖_F² without an
-- eigendecomposition: those ranks rows hold hard_rank, and NULL for the metrics that need the
-- eigenvalues (the spectra row has no eigenvalues and is not skipped). Points are built from
-- non-NULL values only (UNPIVOT leaves NULLs out), so such a run has hard points alone.
ALTER TABLE ranks ALTER COLUMN soft_rank DROP NOT NULL;
ALTER TABLE ranks ALTER COLUMN spectral_entropy DROP NOT NULL;
