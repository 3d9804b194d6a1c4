-- 011: the dtype a run's forwards ran in (float32; bfloat16 under CUDA autocast; a checkpoint's
-- stored dtype with `measure.dtype: stored`). The covariances are always folded in float64.
-- Runs stored before this migration ran float32 forwards on the CPU, bfloat16 autocast on CUDA.
ALTER TABLE runs ADD COLUMN forward_dtype VARCHAR;
UPDATE runs SET forward_dtype = CASE WHEN device LIKE 'cuda%' AND source = 'specdb' THEN 'bfloat16' ELSE 'float32' END
WHERE status <> 'failed';
