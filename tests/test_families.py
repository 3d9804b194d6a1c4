"""FFN families the probe finds by their module names (issue 29, part 4): torchtitan, litgpt and
T5, each on a tiny model built here (faithful module trees for torchtitan and litgpt, which are
not installed; transformers' own T5), layer ids from module names, `gated` with patterns."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from workers.probe import attach, find_sites

D_MODEL, WIDTH, V = 16, 40, 64


class TitanFeedForward(nn.Module):  # torchtitan's Llama: w2(silu(w1(x)) * w3(x))
    def __init__(self):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(D_MODEL, WIDTH, bias=False), nn.Linear(WIDTH, D_MODEL, bias=False), \
            nn.Linear(D_MODEL, WIDTH, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TitanAttention(nn.Module):  # wq/wk/wv/wo: never an FFN
    def __init__(self):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(D_MODEL, D_MODEL, bias=False) for _ in range(4))

    def forward(self, x):
        return self.wo(self.wv(x))


class TitanBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention, self.feed_forward = TitanAttention(), TitanFeedForward()

    def forward(self, x):
        x = x + self.attention(x)
        return x + self.feed_forward(x)


class Titan(nn.Module):
    """torchtitan keeps its blocks in a ModuleDict keyed by layer id; a pipeline stage keeps some."""

    def __init__(self, layer_ids=("0", "1")):
        super().__init__()
        self.tok_embeddings = nn.Embedding(V, D_MODEL)
        self.layers = nn.ModuleDict({i: TitanBlock() for i in layer_ids})

    def forward(self, input_ids):
        h = self.tok_embeddings(input_ids)
        for block in self.layers.values():
            h = block(h)
        return h


class LitLLaMAMLP(nn.Module):  # litgpt: proj(silu(fc_1(x)) * fc_2(x))
    def __init__(self):
        super().__init__()
        self.fc_1, self.fc_2 = nn.Linear(D_MODEL, WIDTH), nn.Linear(D_MODEL, WIDTH)
        self.proj = nn.Linear(WIDTH, D_MODEL)

    def forward(self, x):
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


class LitGptNeoxMLP(nn.Module):  # litgpt: proj(gelu(fc(x)))
    def __init__(self):
        super().__init__()
        self.fc, self.proj = nn.Linear(D_MODEL, WIDTH), nn.Linear(WIDTH, D_MODEL)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class LitAttention(nn.Module):  # litgpt's attention has its own `proj`, and no `fc`
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D_MODEL, 3 * D_MODEL), nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x):
        return self.proj(self.qkv(x)[..., :D_MODEL])


class LitBlock(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.attn, self.mlp = LitAttention(), mlp()

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class Lit(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(V, D_MODEL),
                                          "h": nn.ModuleList([LitBlock(mlp) for _ in range(2)])})

    def forward(self, input_ids):
        h = self.transformer["wte"](input_ids)
        for block in self.transformer["h"]:
            h = block(h)
        return h


def t5(proj):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=V, d_model=D_MODEL, d_kv=8, d_ff=WIDTH, num_layers=2, num_decoder_layers=2,
                                num_heads=2, feed_forward_proj=proj, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg)


MODELS = {  # builder, (pre, post) of the second FFN, gated, layer ids
    "torchtitan": (Titan, ("layers.1.feed_forward.w1", "layers.1.feed_forward.w2"), True, [0, 1]),
    "torchtitan stage": (lambda: Titan(("8", "9")), ("layers.9.feed_forward.w1", "layers.9.feed_forward.w2"), True,
                         [8, 9]),
    "litgpt llama": (lambda: Lit(LitLLaMAMLP), ("transformer.h.1.mlp.fc_1", "transformer.h.1.mlp.proj"), True, [0, 1]),
    "litgpt neox": (lambda: Lit(LitGptNeoxMLP), ("transformer.h.1.mlp.fc", "transformer.h.1.mlp.proj"), False, [0, 1]),
    "t5": (lambda: t5("relu"), ("encoder.block.1.layer.1.DenseReluDense.wi", "encoder.block.1.layer.1.DenseReluDense.wo"),
           False, [0, 1, 2, 3]),
    "t5 v1.1": (lambda: t5("gated-gelu"), ("encoder.block.1.layer.1.DenseReluDense.wi_0",
                                            "encoder.block.1.layer.1.DenseReluDense.wo"), True, [0, 1, 2, 3]),
}


def forward(model, ids):
    if hasattr(model, "encoder"):  # T5: the decoder reads the same positions (labels of its own)
        return model(input_ids=ids, decoder_input_ids=ids)
    return model(ids)


@pytest.mark.parametrize("name", list(MODELS))
def test_each_family_is_found_with_its_sites_gate_and_layer_ids(name):
    build, second, gated, layers = MODELS[name]
    torch.manual_seed(0)
    model = build().eval().double()
    sites = find_sites(model)
    assert [s.layer for s in sites] == layers
    assert (sites[1].pre, sites[1].post) == second and {s.gated for s in sites} == {gated}
    ids = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(1))
    modules, acts = dict(model.named_modules()), {}
    hooks = [modules[sites[1].pre].register_forward_hook(lambda m, i, o: acts.__setitem__("pre", o.detach())),
             modules[sites[1].post].register_forward_pre_hook(lambda m, i: acts.__setitem__("post", i[0].detach()))]
    with torch.no_grad():
        forward(model, ids)
    for h in hooks:
        h.remove()
    probe = attach(model, strata=("all",), min_tokens=2)
    assert probe.gated == gated
    with torch.no_grad(), probe.measuring(ids):
        forward(model, ids)
    got = {(r.layer, r.site): r.eigenvalues for r in probe.compute()}
    for site in ("pre", "post"):
        x = acts[site].reshape(-1, WIDTH).numpy()
        want = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1].clip(1e-12)
        np.testing.assert_allclose(got[(layers[1], site)], want, rtol=1e-9, atol=1e-12 * want.max())


def test_patterns_declare_a_gate_and_numbered_names_give_the_layer_ids():
    model = Titan(("3", "5"))
    sites = find_sites(model, (r"layers\.\d+\.feed_forward\.w1", r"layers\.\d+\.feed_forward\.w2"), gated=True)
    assert [(s.layer, s.gated) for s in sites] == [(3, True), (5, True)]
    probe = attach(model, patterns=(r"layers\.\d+\.feed_forward\.w1", r"layers\.\d+\.feed_forward\.w2"))
    assert not probe.gated and probe.site_definition != attach(model).site_definition


def test_names_without_distinct_numbers_are_numbered_in_order():
    from workers.sites import layer_ids

    assert layer_ids(["a.mlp.c_fc", "b.mlp.c_fc"]) == [0, 1]
    assert layer_ids(["h.2.mlp", "h.2.other"]) == [0, 1]  # two share one: order instead
    assert layer_ids(["h.1²3.mlp", "h.99999999999.mlp"]) == [0, 1]  # not plain, or too long: order
    assert layer_ids(["h.12.mlp", "h.4.mlp"]) == [12, 4]


def test_a_fused_gate_and_up_projection_is_measured_at_its_gate():
    """Phi-3's `gate_up_proj` outputs [gate | up]: `pre` is the gate, the first half, as the model
    chunks it; its width, the run's FFN width, is half the module's."""
    transformers = pytest.importorskip("transformers")
    from workers.sites import model_shape

    torch.manual_seed(0)
    cfg = transformers.Phi3Config(vocab_size=V, hidden_size=D_MODEL, intermediate_size=WIDTH, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                  pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = transformers.Phi3ForCausalLM(cfg).eval().double()
    probe = attach(model, strata=("all",), min_tokens=2)
    site = probe.sites[1]
    assert (site.pre, site.post, site.gated, site.fused) == ("model.layers.1.mlp.gate_up_proj",
                                                             "model.layers.1.mlp.down_proj", True, "whole")
    assert model_shape(model, probe)["ffn_width"] == WIDTH
    ids = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(2))
    acts = {}
    mlp = model.model.layers[1].mlp
    hooks = [mlp.gate_up_proj.register_forward_hook(lambda m, i, o: acts.__setitem__("pre", o.chunk(2, -1)[0])),
             mlp.down_proj.register_forward_pre_hook(lambda m, i: acts.__setitem__("post", i[0]))]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    with torch.no_grad(), probe.measuring(ids):
        model(input_ids=ids)
    got = {(r.layer, r.site): r for r in probe.compute()}
    for name in ("pre", "post"):
        x = acts[name].reshape(-1, WIDTH).detach().numpy()
        want = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1].clip(1e-12)
        assert got[(1, name)].n_dim == WIDTH
        np.testing.assert_allclose(got[(1, name)].eigenvalues, want, rtol=1e-9, atol=1e-12 * want.max())
