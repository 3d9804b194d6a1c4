"""A plain PyTorch training loop of one's own, measured into a specdb store in a few added lines.

    python examples/own_loop.py own.duckdb        # then: specdb query beta --db own.duckdb

A small nanoGPT-style model (an MLP with `c_fc` and `c_proj`: the probe finds it) is trained on
Zipf-distributed tokens at three FFN widths; every 25 steps the probe measures a fixed held-out
batch and the tracker logs it. The lines marked `# specdb` are all that measuring takes.
"""

import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from spectraldb.track import track  # specdb
from workers.probe import attach  # specdb

V, T, D_MODEL, STEPS = 512, 32, 64, 100


class MLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(D_MODEL, width), nn.Linear(width, D_MODEL)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.ln, self.mlp = nn.LayerNorm(D_MODEL), MLP(width)

    def forward(self, x):
        return x + self.mlp(self.ln(x))


class TinyLM(nn.Module):
    def __init__(self, width, n_layer=2):
        super().__init__()
        self.wte = nn.Embedding(V, D_MODEL)
        self.h = nn.ModuleList(Block(width) for _ in range(n_layer))
        self.lm_head = nn.Linear(D_MODEL, V)

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.h:
            x = block(x)
        return self.lm_head(x)


def batches(seed):
    rng = np.random.default_rng(seed)
    p = 1 / np.arange(1, V + 1)
    p /= p.sum()
    while True:
        yield torch.from_numpy(rng.choice(V, size=(16, T + 1), p=p))


def main(store):
    counts = (1 / np.arange(1, V + 1) * 1e6).round()  # token counts: the strata (head, mid, tail)
    for width in (128, 256, 512):
        torch.manual_seed(0)
        model = TinyLM(width)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        probe = attach(model, token_counts=counts, min_tokens=64)  # specdb
        with track(store, optimizer="AdamW", d_model=D_MODEL, n_layer=2, ffn_width=width, seed=0,  # specdb
                   steps=STEPS, lr=3e-3, factors={"data": "zipf"}, probe=probe, last_k=2) as run:  # specdb
            data, held_out = batches(0), torch.cat([next(batches(1)) for _ in range(8)])[:, :-1]  # 4,096 tokens
            for step in range(1, STEPS + 1):
                batch = next(data)
                x, y = batch[:, :-1], batch[:, 1:]
                loss = F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step % 25 == 0:
                    with torch.no_grad(), probe.measuring(held_out):  # specdb
                        model(held_out)  # specdb
                    run.log(step, probe=probe, train_loss=loss.item())  # specdb
        print(f"width {width}: {run.outcome} as run {run.run_id}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "own.duckdb")
