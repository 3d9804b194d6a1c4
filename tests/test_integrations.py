"""Frameworks' own loops measured into a store: HF Trainer and Lightning on tiny models built here."""

import json

import numpy as np
import pytest
import torch

from tests.conftest import query, rows

pytestmark = pytest.mark.slow  # each trains a tiny model through its framework


def hf():
    """transformers, imported when a test runs (collecting this slow module must not import it)."""
    return pytest.importorskip("transformers")

V, T = 64, 16
COUNTS = (np.arange(V, 0, -1) ** 2).astype(float)  # id 0 the most frequent


def tiny_gpt2(n_inner: int):
    torch.manual_seed(0)
    cfg = hf().GPT2Config(vocab_size=V, n_positions=T, n_embd=16, n_layer=2, n_head=2, n_inner=n_inner)
    return hf().GPT2LMHeadModel(cfg)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, pad_every=3):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, V, (n, T), generator=g)
        self.mask = torch.ones_like(self.ids)
        self.mask[::pad_every, -4:] = 0  # some right padding

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}



def test_the_hf_trainer_callback_writes_runs_the_verbs_answer(tmp_path):
    from integrations.hf import SpecdbCallback

    db = tmp_path / "hf.duckdb"
    for n_inner in (32, 64, 128):
        args = hf().TrainingArguments(
            output_dir=str(tmp_path / f"out{n_inner}"), max_steps=6, per_device_train_batch_size=4,
            gradient_accumulation_steps=2, logging_steps=2, report_to=[], use_cpu=True, save_strategy="no",
            disable_tqdm=True, seed=0)
        callback = SpecdbCallback(db, every=2, optimizer="AdamW", token_counts=COUNTS, min_stratum_tokens=4,
                                  last_k=2, factors={"framework": "hf"}, tokens=None if n_inner != 128 else 100)
        hf().Trainer(model=tiny_gpt2(n_inner), args=args, train_dataset=Tokens(),
                             callbacks=[callback]).train()
        assert callback.run.outcome == "committed"
    assert rows(db, "SELECT count(*), min(steps), min(d_model), list(ffn_width ORDER BY ffn_width) FROM runs") == [
        (3, 6, 16, [32, 64, 128])]
    assert rows(db, "SELECT DISTINCT step FROM spectra ORDER BY 1") == [(1,), (2,), (4,), (6,)]  # contract.sizes.is_measured
    # two micro-batches (2 × 4 rows) per measured step merge into one record; pads are left out;
    # a token budget (the widest run: tokens=100) counts across the step's micro-batches
    counts = rows(db, "SELECT DISTINCT n_tokens FROM spectra WHERE stratum = 'all' AND run_id IN "
                      "(SELECT run_id FROM runs WHERE ffn_width < 128)")
    assert all(6 * T <= n <= 8 * T for (n,) in counts) and any(n < 8 * T for (n,) in counts), counts
    assert rows(db, "SELECT DISTINCT n_tokens FROM spectra WHERE stratum = 'all' AND run_id IN "
                    "(SELECT run_id FROM runs WHERE ffn_width = 128)") == [(100,)]
    assert rows(db, "SELECT count(*) FROM evals WHERE train_loss IS NOT NULL") == [(9,)]
    answer, _ = query(db, "beta", "--by", "optimizer,framework")
    assert answer[0]["framework"] == "hf" and answer[0]["n_widths"] == 3 and answer[0]["beta_hard"] is not None


def test_the_lightning_callback_writes_a_run(tmp_path):
    L = pytest.importorskip("lightning")
    from integrations.lightning import SpecdbLightningCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_gpt2(64)

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    db = tmp_path / "pl.duckdb"
    callback = SpecdbLightningCallback(db, every=2, optimizer="AdamW", model_attr="model", token_counts=COUNTS,
                                       min_stratum_tokens=4, last_k=2, factors={"framework": "lightning"}, tokens=80)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=8, accelerator="cpu", logger=False,  # by epochs: 4 steps
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accumulate_grad_batches=2, callbacks=[callback])
    trainer.fit(Module(), torch.utils.data.DataLoader(Tokens(), batch_size=4))
    assert callback.run.outcome == "committed"
    (source, steps, factors, status), = rows(db, "SELECT source, steps, factors, status FROM runs")
    assert (source, steps, json.loads(factors), status) == ("tracked", 4, {"framework": "lightning"}, "done")
    assert rows(db, "SELECT DISTINCT step FROM spectra ORDER BY 1") == [(1,), (2,), (4,)]
    assert rows(db, "SELECT count(*) FROM evals") == [(3,)]  # the training loss of each measured step
    assert rows(db, "SELECT DISTINCT n_tokens FROM spectra WHERE stratum = 'all'") == [(80,)]  # across micro-batches
