"""The study's GPT (docs/design.md §2), nanoGPT-style in one file.

Decoder-only; RoPE on q/k followed by parameter-free QK RMSNorm; parameter-free RMSNorm
pre-norm blocks; ReLU² FFN `c_fc (d→D) → act → c_proj (D→d)`; no biases; untied embedding
and LM head. Linear init has variance 1/fan_in · min(1, fan_out/fan_in) (the "spectral" init).
The measured sites are the output of `mlp.c_fc` (pre) and the input of `mlp.c_proj` (post).

Architecture factors: `pos` rope | nope | learned (a `wpe` table added to the embedding);
`norm` pre | post, with the first ⌊n_layer·postln_frac⌋ blocks post-norm (the final norm is
always kept); `activation` relu2 | gelu; `n_head` changes attention rank, not parameter count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from contract.config import RunConfig
from contract.sizes import ffn_width, n_post_norm
from contract.vocabulary import BASELINE_ARCHITECTURE


@dataclass
class GPTConfig:
    """The model's shape; a run's comes from its spec (`from_run`), which holds every default."""
    vocab_size: int
    context: int
    n_layer: int
    d_model: int
    n_head: int
    ffn_mult: float
    pos: str = BASELINE_ARCHITECTURE["pos"]
    norm: str = BASELINE_ARCHITECTURE["norm"]
    postln_frac: float | None = BASELINE_ARCHITECTURE["postln_frac"]  # with norm 'post': None means every block
    activation: str = BASELINE_ARCHITECTURE["activation"]

    @classmethod
    def from_run(cls, config: RunConfig, vocab_size: int) -> "GPTConfig":
        """The model of a run's typed config (`RunSpec.worker_config()`)."""
        m = config.model
        return cls(vocab_size=vocab_size, context=config.data.context, n_layer=m.n_layer, d_model=m.d_model,
                   n_head=m.n_head, ffn_mult=m.ffn_mult, pos=m.pos, norm=m.norm, postln_frac=m.postln_frac,
                   activation=m.activation)

    @property
    def ffn_width(self) -> int:
        return ffn_width(self.ffn_mult, self.d_model)

    @property
    def n_post_norm(self) -> int:
        """How many leading blocks are post-norm."""
        return n_post_norm(self.norm, self.n_layer, self.postln_frac)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, context: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(context, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (T, hd/2)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, nh, T, hd); rotate the two halves of each head
        T = x.size(-2)
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.c_q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.c_k = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.c_v = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rotary = Rotary(self.head_dim, cfg.context) if cfg.pos == "rope" else None
        self.causal = True  # tests switch it off to check NoPE's permutation equivariance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (m(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
                   for m in (self.c_q, self.c_k, self.c_v))  # (B, nh, T, hd)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        q, k = rms_norm(q), rms_norm(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.ffn_width, bias=False)
        self.c_proj = nn.Linear(cfg.ffn_width, cfg.d_model, bias=False)
        self.act = (lambda h: F.relu(h).square()) if cfg.activation == "relu2" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, post_norm: bool = False):
        super().__init__()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.post_norm = post_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:  # normalise the residual stream after each sub-block
            x = rms_norm(x + self.attn(x))
            return rms_norm(x + self.mlp(x))
        x = x + self.attn(rms_norm(x))
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.d_model),
            h=nn.ModuleList(Block(cfg, post_norm=i < cfg.n_post_norm) for i in range(cfg.n_layer)),
        ))
        if cfg.pos == "learned":
            self.transformer["wpe"] = nn.Embedding(cfg.context, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            fan_out, fan_in = m.weight.shape
            std = math.sqrt(min(1.0, fan_out / fan_in) / fan_in)
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=1.0)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.transformer.wte(idx)  # (B, T, d)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.transformer.h:
            x = block(x)
        return rms_norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.lm_head(self.hidden(idx)).float()  # (B, T, V)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
