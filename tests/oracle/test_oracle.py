"""Sanity tests of the naive FlowCut oracle (tests/oracle/flowcut.py) itself."""
import copy
import math
import os
import sys

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

sys.path.insert(0, os.path.dirname(__file__))
from oracle.flowcut import (  # noqa: E402
    eager_clip_layer,
    find_vision_tower,
    naive_encode,
    naive_flow_scores,
    naive_prune_count,
    naive_select_gather,
    scores_from_attention,
)

E = math.e


def tiny_model(sharpen=1.0):
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, image_size=32, patch_size=8)
    model = CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        for layer in find_vision_tower(model).encoder.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(sharpen)
                proj.bias.mul_(sharpen)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, pixels


def _close(a, b, tol=1e-12):
    assert torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=tol, rtol=0), (a, b)


# ---------------------------------------------------------------- eager layer == HF layer
@torch.no_grad()
def test_eager_layer_matches_hf():
    model, pixels = tiny_model()
    hs = model(pixels, output_hidden_states=True).hidden_states
    tower = find_vision_tower(model)
    x = tower.pre_layrnorm(tower.embeddings(pixels)).double()
    assert torch.allclose(x, hs[0].double(), atol=1e-6)
    for i, layer in enumerate(tower.encoder.layers):
        layer64 = copy.deepcopy(layer).double()
        one_step = eager_clip_layer(layer64, hs[i].double())[0]          # from HF's own input
        x = eager_clip_layer(layer64, x)[0]                              # chained from the start
        assert (one_step - hs[i + 1].double()).abs().max() < 1e-5
        assert (x - hs[i + 1].double()).abs().max() < 1e-5


@torch.no_grad()
def test_scores_from_attention_match_naive_flow_scores():
    model, pixels = tiny_model(sharpen=4.0)
    tower = find_vision_tower(model)
    x = tower.pre_layrnorm(tower.embeddings(pixels)).double()
    prev = None
    for layer in tower.encoder.layers:
        x, q, k, v, probs, scale = eager_clip_layer(copy.deepcopy(layer).double(), x)
        got = scores_from_attention(probs, v, prev)
        want = naive_flow_scores(q[:, :, 0], k, v, prev, scale)
        for g, w in zip(got, want):
            _close(g, w, 1e-12)
        prev = got[0]


# ---------------------------------------------------------------- flow scores by hand
def _hand_inputs():
    # B=1, H=1, S=3, D=1, scale=1: relay logits = k = [0, 1, 2]; semantic logits = v0*v = [1, 2, -1]
    q = torch.tensor([[[1.0]]])
    k = torch.tensor([[[[0.0], [1.0], [2.0]]]])
    v = torch.tensor([[[[1.0], [2.0], [-1.0]]]])
    return q, k, v


def _h2(p0, p1):
    return -(p0 * math.log(p0) + p1 * math.log(p1)) / math.log(2)


@pytest.mark.parametrize("semantic", [True, False])
@pytest.mark.parametrize("with_prev", [False, True])
def test_flow_scores_cls_by_hand(semantic, with_prev):
    q, k, v = _hand_inputs()
    z = 1 + E + E ** 2
    A = [E / z, E ** 2 / z]
    pA = [1 / (1 + E), E / (1 + E)]
    pS = [E ** 2 / (E ** 2 + E ** -1), E ** -1 / (E ** 2 + E ** -1)]
    rho = [2.0, 1.0]
    I = [(pA[j] + (pS[j] if semantic else 0.0)) * rho[j] for j in range(2)]
    prev = torch.tensor([[4.0, -2.0]]) if with_prev else None
    want = [0.5 * p + 0.5 * i for p, i in zip([4.0, -2.0], I)] if with_prev else I
    cum, hn, attn = naive_flow_scores(q, k, v, prev, 1.0, has_cls=True, semantic=semantic)
    assert cum.dtype == hn.dtype == attn.dtype == torch.float64
    assert cum.shape == attn.shape == (1, 2) and hn.shape == (1,)
    _close(cum[0], want)
    _close(attn[0], A)
    _close(hn[0], _h2(*pA))


@pytest.mark.parametrize("with_prev", [False, True])
def test_flow_scores_mean_variant_by_hand(with_prev):
    q, k, v = _hand_inputs()
    z = 1 + E + E ** 2
    A = [1 / z, E / z, E ** 2 / z]
    I = [A[0] * 1.0, A[1] * 2.0, A[2] * 1.0]
    prev = torch.tensor([[1.0, 2.0, 3.0]]) if with_prev else None
    want = [0.5 * p + 0.5 * i for p, i in zip([1.0, 2.0, 3.0], I)] if with_prev else I
    for semantic in (True, False):  # ignored in the mean variant
        cum, hn, attn = naive_flow_scores(q, k, v, prev, 1.0, has_cls=False, semantic=semantic)
        _close(cum[0], want)
        _close(attn[0], A)
        _close(hn[0], -sum(a * math.log(a) for a in A) / math.log(3))


def test_flow_scores_heads_and_rho():
    # Two heads with opposite values: the head-averaged value is 0, so rho = 0 and I = 0.
    # Identical relay attention on both heads -> A equals the one-head A; uniform keys -> hn = 1.
    q = torch.tensor([[[1.0], [1.0]]])
    k = torch.zeros(1, 2, 4, 1)
    v1 = torch.tensor([[1.0], [2.0], [-1.0], [0.5]])
    v = torch.stack([v1, -v1])[None]
    cum, hn, attn = naive_flow_scores(q, k, v, None, 0.7)
    _close(cum[0], [0.0, 0.0, 0.0])
    _close(attn[0], [0.25, 0.25, 0.25])
    _close(hn[0], 1.0)
    # one candidate: hn defined as 0; a one-hot attention also has hn = 0 (0 ln 0 = 0)
    _, hn1, _ = naive_flow_scores(q[:, :1], k[:, :1, :2], v[:, :1, :2], None, 1.0)
    _close(hn1[0], 0.0)
    k_hot = torch.tensor([[[[0.0], [1000.0], [0.0], [0.0]]]])
    _, hn0, _ = naive_flow_scores(q[:, :1], k_hot, v[:, :1], None, 1.0)
    _close(hn0[0], 0.0)


# ---------------------------------------------------------------- select + gather
def test_select_gather_ties_and_order():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    cum = torch.tensor([[3.0, 1.0, 3.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    index_map = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    h, c, i = naive_select_gather(hidden, cum, index_map, keep=3, has_cls=True)
    assert h.shape == (2, 3, 3) and c.shape == i.shape == (2, 2)
    assert i.tolist() == [[10, 12], [20, 21]]
    assert torch.equal(h[0], hidden[0, [0, 1, 3]]) and torch.equal(h[1], hidden[1, [0, 1, 2]])
    assert c.tolist() == [[3.0, 3.0], [1.0, 1.0]]
    # ascending original order even when the best is last
    cum2 = torch.tensor([[0.0, 1.0, 2.0, 9.0], [9.0, 2.0, 1.0, 0.0]])
    _, c2, i2 = naive_select_gather(hidden, cum2, index_map, keep=3, has_cls=True)
    assert i2.tolist() == [[12, 13], [20, 21]] and c2.tolist() == [[2.0, 9.0], [9.0, 2.0]]
    # mean variant: no relay row, candidate j is hidden row j
    hm, cm, im = naive_select_gather(hidden[:, 1:], cum, index_map, keep=2, has_cls=False)
    assert im.tolist() == [[10, 12], [20, 21]] and torch.equal(hm[0], hidden[0, [1, 3]])


def test_select_gather_keep_extremes():
    hidden = torch.randn(2, 5, 3)
    cum = torch.randn(2, 4)
    index_map = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    h, c, i = naive_select_gather(hidden, cum, index_map, keep=1, has_cls=True)
    assert h.shape == (2, 1, 3) and c.shape == i.shape == (2, 0)
    assert torch.equal(h[:, 0], hidden[:, 0])
    h, c, i = naive_select_gather(hidden, cum, index_map, keep=5, has_cls=True)
    assert torch.equal(h, hidden) and torch.equal(c, cum) and torch.equal(i, index_map)
    h, c, i = naive_select_gather(hidden, cum, index_map, keep=1, has_cls=False)
    assert i[:, 0].tolist() == [int(cum[b].argmax()) + 4 * b for b in range(2)]


# ---------------------------------------------------------------- prune count
def test_prune_count():
    assert naive_prune_count(torch.tensor([0.3, 0.9]), 576, 65, 0) == 576 - 64
    # hn = 0.5 -> (1 - hn^2) = 0.75 exactly; steps_left = 1
    assert naive_prune_count(torch.tensor([0.5]), 6 + 4, 5, 1) == 4    # 6 * 0.75 = 4.5 -> 4
    assert naive_prune_count(torch.tensor([0.5]), 10 + 4, 5, 1) == 8   # 10 * 0.75 = 7.5 -> 8
    assert naive_prune_count(torch.tensor([0.5]), 2 + 4, 5, 1) == 2    # 1.5 -> 2
    assert naive_prune_count(torch.tensor([0.5]), 12 + 4, 5, 4) == 4   # 12 / 2 * 0.75 = 4.5 -> 4
    # batch max: the image with the lowest entropy decides
    assert naive_prune_count(torch.tensor([0.9, 0.0]), 20 + 4, 5, 4) == 10
    assert naive_prune_count(torch.tensor([1.0, 1.0]), 20 + 4, 5, 4) == 0
    # worked example of docs/semantics.md: layer 1 of CLIP-L/336 with rpl = 20, hn = 0.5
    assert naive_prune_count([0.5], 576, 65, 20) == round(512 / math.sqrt(20) * 0.75)


# ---------------------------------------------------------------- whole encoder
@pytest.mark.parametrize("feature_layer,target_num", [(-1, 4), (-2, 4), (-1, 1), (-2, 9)])
def test_naive_encode_schedule(feature_layer, target_num):
    model, pixels = tiny_model(sharpen=8.0)
    feats, idx, tpl = naive_encode(model, pixels, target_num, feature_layer)
    Fl = 4 + feature_layer
    assert len(tpl) == Fl + 1
    assert tpl[0] == 17 and tpl[-1] == target_num + 1
    assert all(a >= b for a, b in zip(tpl, tpl[1:]))
    if feature_layer == -1:  # layer 0 has rpl = 2: the entropy-driven (non-final) prune is exercised
        assert tpl[1] < 17
    assert feats.shape == (2, target_num, 32) and feats.dtype == torch.float64
    assert idx.shape == (2, target_num) and idx.dtype == torch.int64
    for row in idx.tolist():
        assert row == sorted(set(row)) and 0 <= row[0] and row[-1] < 16
    # float32 compute keeps the same schedule and nearly the same features
    feats32, idx32, tpl32 = naive_encode(model, pixels, target_num, feature_layer, compute_dtype=torch.float32)
    assert tpl32 == tpl and torch.equal(idx32, idx)
    assert feats32.dtype == torch.float32 and (feats32.double() - feats).abs().max() < 1e-4


@torch.no_grad()
def test_naive_encode_no_pruning_equals_hf():
    model, pixels = tiny_model()
    hs = model(pixels, output_hidden_states=True).hidden_states
    for feature_layer in (-1, -2):
        feats, idx, tpl = naive_encode(model, pixels, 16, feature_layer)
        assert tpl == [17] * (5 + feature_layer)
        assert idx.tolist() == [list(range(16))] * 2
        assert (feats - hs[4 + feature_layer + 1][:, 1:].double()).abs().max() < 1e-5


@torch.no_grad()
def test_naive_encode_features_are_layer_f_on_kept_tokens():
    # F = 1: layer 0 is the only (rpl = 0) prune, so features = layer 1 applied to
    # [CLS] + the kept rows of layer 0's output; redo that by hand from keep_indices.
    model, pixels = tiny_model(sharpen=8.0)
    tower = find_vision_tower(model)
    feats, idx, tpl = naive_encode(model, pixels, 6, feature_layer=-3)   # F = 1: only layer 0 prunes
    assert tpl == [17, 7]
    emb, pre = copy.deepcopy(tower.embeddings).double(), copy.deepcopy(tower.pre_layrnorm).double()
    x = pre(emb(pixels.double()))
    x = eager_clip_layer(copy.deepcopy(tower.encoder.layers[0]).double(), x)[0]
    rows = torch.cat([torch.zeros(2, 1, dtype=torch.int64), idx + 1], dim=1)
    kept = torch.stack([x[b, rows[b]] for b in range(2)])
    want = eager_clip_layer(copy.deepcopy(tower.encoder.layers[1]).double(), kept)[0][:, 1:]
    _close(feats, want, 1e-12)
