"""A faithful Megatron-core module tree (megatron-core is not installed here): `decoder.layers.N.mlp`
with `linear_fc1` (column-parallel: `output_size` the whole width, a local weight of 1/tp of the
rows, returning (output, bias) with the bias not yet added) and `linear_fc2` (row-parallel:
`input_size` the whole width, partial products summed across the group), the MLP's
`config.gated_linear_unit`, gate and up fused *per rank* (each rank's local fc1 output is
[gate_r | up_r], chunked locally), and sequence-first activations [s, b, h].

`megatron_model(tp_rank, tp_size, group)` builds the same seeded weights on every rank and keeps
rank `tp_rank`'s slice, so tp_size 1 is the unsharded model the sharded ones must equal."""

import torch
from torch import nn
from torch.nn import functional as F

D_MODEL, FFN, V = 16, 24, 64


class Config:
    def __init__(self, gated):
        self.gated_linear_unit = gated


class ColumnParallelLinear(nn.Module):
    def __init__(self, weight, bias, output_size, input_size):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)
        self.output_size, self.input_size = output_size, input_size

    def forward(self, x):  # skip_bias_add: Megatron fuses the bias into the activation
        return x @ self.weight.T, self.bias


class RowParallelLinear(nn.Module):
    def __init__(self, weight, output_size, input_size, group):
        super().__init__()
        self.weight, self.group = nn.Parameter(weight), group
        self.output_size, self.input_size = output_size, input_size

    def forward(self, x):
        out = x @ self.weight.T
        if self.group is not None:
            import torch.distributed as dist

            dist.all_reduce(out, group=self.group)
        return out, None


class MLP(nn.Module):
    def __init__(self, gen, gated, tp_rank, tp_size, group):
        super().__init__()
        self.config = Config(gated)
        rows = 2 * FFN if gated else FFN
        w1, b1 = torch.randn(rows, D_MODEL, generator=gen) / 4, torch.randn(rows, generator=gen) / 4
        w2 = torch.randn(D_MODEL, FFN, generator=gen) / 5
        part = slice(tp_rank * FFN // tp_size, (tp_rank + 1) * FFN // tp_size)
        if gated:  # each rank's rows: its slice of the gate, then its slice of up
            local = lambda t: torch.cat([t[:FFN][part], t[FFN:][part]])  # noqa: E731
        else:
            local = lambda t: t[part]  # noqa: E731
        self.linear_fc1 = ColumnParallelLinear(local(w1), local(b1), rows, D_MODEL)
        self.linear_fc2 = RowParallelLinear(w2[:, part].contiguous(), D_MODEL, FFN, group if tp_size > 1 else None)

    def forward(self, x):
        out, bias = self.linear_fc1(x)
        out = out + bias
        if self.config.gated_linear_unit:
            gate, up = torch.chunk(out, 2, dim=-1)
            out = F.silu(gate) * up
        else:
            out = F.gelu(out)
        return self.linear_fc2(out)


class Layer(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, h):
        out, _ = self.mlp(h)
        return h + out


class Decoder(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class MegatronGPT(nn.Module):
    def __init__(self, gated=True, tp_rank=0, tp_size=1, group=None, n_layer=2):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embedding = nn.Embedding(V, D_MODEL)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.randn(V, D_MODEL, generator=gen))
        self.decoder = Decoder([Layer(MLP(gen, gated, tp_rank, tp_size, group)) for _ in range(n_layer)])

    def forward(self, input_ids):
        h = self.embedding(input_ids).transpose(0, 1)  # [s, b, h]: Megatron is sequence-first throughout
        for layer in self.decoder.layers:
            h = layer(h)
        return h
