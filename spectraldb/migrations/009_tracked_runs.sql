-- 009: runs measured outside specdb's own loop (a user's training loop, HF Trainer, Lightning,
-- saved checkpoints): where a run came from, how its FFN sites were defined (gated FFNs measure
-- the gate projection), how its strata were pooled across data-parallel ranks, how many tokens
-- it had seen, and the factors its user declared. What such a run may not know (heads, context,
-- batch size, the optimizer's family) may be null.
ALTER TABLE runs ADD COLUMN source VARCHAR;
ALTER TABLE runs ADD COLUMN gated BOOLEAN;
ALTER TABLE runs ADD COLUMN site_definition VARCHAR;
ALTER TABLE runs ADD COLUMN strata_scope VARCHAR;
ALTER TABLE runs ADD COLUMN tokens_seen BIGINT;
ALTER TABLE runs ADD COLUMN factors JSON;
UPDATE runs SET source = 'specdb', gated = false, strata_scope = 'global',
                site_definition = 'pre: first projection output; post: down-projection input';
ALTER TABLE runs ALTER COLUMN optimizer_name DROP NOT NULL;
ALTER TABLE runs ALTER COLUMN n_head DROP NOT NULL;
ALTER TABLE runs ALTER COLUMN context DROP NOT NULL;
ALTER TABLE runs ALTER COLUMN batch_size DROP NOT NULL;
-- a checkpoint that cannot be loaded is stored as failed before its shape is known
ALTER TABLE runs ALTER COLUMN ffn_mult DROP NOT NULL;
ALTER TABLE runs ALTER COLUMN ffn_width DROP NOT NULL;
ALTER TABLE runs ALTER COLUMN d_model DROP NOT NULL;
ALTER TABLE runs ALTER COLUMN n_layer DROP NOT NULL;
