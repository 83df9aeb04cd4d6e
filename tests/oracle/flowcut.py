"""Naive, independent test oracle for FlowCut (see docs/semantics.md).

Deliberately plain: float64 everywhere for the scores, explicit loops over batch and heads,
one formula per line. Nothing here is shared with the `flowcut_kernels` package.

Shapes: B images, S tokens (relay first in the CLS variant), N candidates (S-1 with CLS, S without),
H heads, D head dim, C = H*D hidden size.
"""
import copy
import math

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# 1. per-layer signals
# ----------------------------------------------------------------------------------------------
def _entropy_normalised(p):
    """p: list of N floats summing to 1 -> (-sum p ln p) / ln N, 0 ln 0 = 0, and 0 when N == 1.

    The largest p_m may lie within rounding of 1 (a near-one-hot row): its ln p_m is taken as
    log1p(-(sum of the others)), the mass it lacks, not as ln of its rounded value.
    """
    n = len(p)
    if n <= 1:
        return 0.0
    m = max(range(n), key=lambda j: p[j])
    rest = math.fsum(x for j, x in enumerate(p) if j != m)
    h = -p[m] * (math.log1p(-rest) if rest < 1.0 else math.log(p[m]))
    for j, x in enumerate(p):
        if j != m and x > 0.0:
            h -= x * math.log(x)
    return h / math.log(n)


def _log_head_mean_softmax(logits_per_head):
    """logits_per_head: (H, S) float64 -> log of the head-mean softmax, (S,), exact where the mean underflows."""
    log_probs = torch.log_softmax(logits_per_head, dim=1)                # (H, S)
    return torch.logsumexp(log_probs, dim=0) - math.log(logits_per_head.shape[0])


def _normalised(log_x):
    """log_x: (N,) logs of non-negative values -> x / sum(x), computed from the logs (no 0/0)."""
    return torch.exp(log_x - torch.logsumexp(log_x, dim=0))


def naive_flow_scores(q_relay, k, v, prev, scale, has_cls=True, semantic=True):
    """FlowCut layer signals.

    q_relay (B,H,D); k, v (B,H,S,D); prev (B,N) or None.
    Returns float64 (cum (B,N), hn (B,), attn (B,N)); attn = A, the head-mean relay attention on candidates.
    The normalised A / sum(A) and Sm / sum(Sm) come from logs, so they stay exact when the relay row takes
    almost all the attention (A itself may then underflow to 0).
    """
    q_relay, k, v = q_relay.double(), k.double(), v.double()
    B, H, S, D = k.shape
    first = 1 if has_cls else 0
    N = S - first
    cum = torch.zeros(B, N, dtype=torch.float64)
    hn = torch.zeros(B, dtype=torch.float64)
    attn = torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):
        # A: mean over heads of softmax over all S tokens of scale * r_h . k_h[j]
        logits = torch.stack([
            torch.stack([scale * torch.dot(q_relay[b, h], k[b, h, j]) for j in range(S)]) for h in range(H)
        ])
        log_A = _log_head_mean_softmax(logits)[first:]
        A = torch.exp(log_A)
        p_attn = _normalised(log_A)                        # A / sum A over the candidates
        # rho: L1 norm over d of the head-averaged value
        v_mean = v[b].mean(dim=0)                          # (S, D)
        rho = v_mean.abs().sum(dim=1)[first:]              # (N,)
        if has_cls:
            if semantic:
                # Sm: mean over heads of softmax over all S tokens of v_h[0] . v_h[j]  (no scale)
                sims = torch.stack([
                    torch.stack([torch.dot(v[b, h, 0], v[b, h, j]) for j in range(S)]) for h in range(H)
                ])
                p_sem = _normalised(_log_head_mean_softmax(sims)[first:])
                I = (p_attn + p_sem) * rho
            else:
                I = p_attn * rho
        else:
            I = A * rho
        cum[b] = I if prev is None else 0.5 * prev[b].double() + 0.5 * I
        hn[b] = _entropy_normalised(p_attn.tolist())
        attn[b] = A
    return cum, hn, attn


# ----------------------------------------------------------------------------------------------
# 2. select + gather
# ----------------------------------------------------------------------------------------------
def naive_select_gather(hidden, cum, index_map, keep, has_cls=True):
    """Keep the relay row (CLS variant) and the best candidates by cum, in ascending original order.

    hidden (B,S,C), cum (B,N), index_map (B,N) int64; keep counts the relay row when has_cls.
    Returns hidden_out (B,keep,C), cum_out (B,n_keep), index_out (B,n_keep), n_keep = keep-1 or keep.
    Ties: equal cum -> lower candidate index first.
    """
    first = 1 if has_cls else 0
    n_keep = keep - first
    B, N = cum.shape
    assert 0 <= n_keep <= N
    hid_rows, cum_rows, idx_rows = [], [], []
    for b in range(B):
        values = cum[b].tolist()
        order = sorted(range(N), key=lambda j: (-values[j], j))
        chosen = sorted(order[:n_keep])
        rows = ([0] if has_cls else []) + [j + first for j in chosen]
        hid_rows.append(hidden[b, rows])
        cum_rows.append(cum[b, chosen])
        idx_rows.append(index_map[b, chosen])
    return torch.stack(hid_rows), torch.stack(cum_rows), torch.stack(idx_rows)


# ----------------------------------------------------------------------------------------------
# 3. prune count
# ----------------------------------------------------------------------------------------------
def naive_prune_count(hn, n_candidates, target, steps_left):
    """Number of tokens to drop. hn (B,) or list; target = T (relay included in the CLS variant)."""
    excess = n_candidates - (target - 1)
    if steps_left == 0:
        return excess
    best = max(float(excess) / math.sqrt(steps_left) * (1.0 - float(h) ** 2) for h in list(hn))
    return max(0, round(best))  # Python round = round half to even


def naive_group_prune(q, k, v, cum, scale, groups, target, steps_left):
    """One layer of a tower that prunes whole groups (Gemma 3's pooling windows, Qwen's 2×2 merges; mean-query relay,
    no CLS) with ``groups`` left of which it keeps ``target``: the S_cum after the layer (unscored once ``groups`` <=
    ``target``) and how many groups it keeps, None where it does not prune (nothing to prune, odd ``steps_left``)."""
    if groups <= target:
        return cum, None
    cum, hn, _ = naive_flow_scores(q.mean(dim=2), k, v, cum, scale, has_cls=False)
    if steps_left % 2:
        return cum, None
    return cum, target if steps_left == 0 else max(groups - naive_prune_count(hn, groups, target + 1, steps_left),
                                                   target)


# ----------------------------------------------------------------------------------------------
# 4. whole FlowCut encoder on an HF CLIP vision model (CLS variant)
# ----------------------------------------------------------------------------------------------
def find_vision_tower(model):
    """The module holding `embeddings`, `pre_layrnorm` and `encoder` (the model itself or .vision_model)."""
    for m in (model, getattr(model, "vision_model", None)):
        if m is not None and all(hasattr(m, a) for a in ("embeddings", "pre_layrnorm", "encoder")):
            return m
    raise ValueError("no CLIP vision tower found")


def eager_clip_layer(layer, x):
    """One CLIPEncoderLayer written out. x (B,S,C) in the layer's dtype.

    Returns (out (B,S,C), q, k, v (B,H,S,D) float64, probs (B,H,S,S) float64, scale).
    The attention probabilities are built in float64; the rest runs in x's dtype.
    """
    attn = layer.self_attn
    B, S, C = x.shape
    H = attn.num_heads
    D = C // H
    scale = D ** -0.5
    residual = x
    h = layer.layer_norm1(x)
    q = F.linear(h, attn.q_proj.weight, attn.q_proj.bias).view(B, S, H, D).transpose(1, 2)
    k = F.linear(h, attn.k_proj.weight, attn.k_proj.bias).view(B, S, H, D).transpose(1, 2)
    v = F.linear(h, attn.v_proj.weight, attn.v_proj.bias).view(B, S, H, D).transpose(1, 2)
    q64, k64, v64 = q.double(), k.double(), v.double()
    probs = torch.softmax(scale * (q64 @ k64.transpose(-1, -2)), dim=-1)       # (B,H,S,S)
    ctx = probs.to(x.dtype) @ v                                                 # (B,H,S,D)
    ctx = ctx.transpose(1, 2).reshape(B, S, C)
    x = residual + F.linear(ctx, attn.out_proj.weight, attn.out_proj.bias)
    x = x + layer.mlp(layer.layer_norm2(x))
    return x, q64, k64, v64, probs, scale


def scores_from_attention(probs, v, prev):
    """CLS-variant FlowCut scores from a layer's full attention probabilities and values.

    probs (B,H,S,S), v (B,H,S,D), prev (B,S-1) or None -> float64 (cum (B,S-1), hn (B,), A (B,S-1)).
    """
    probs, v = probs.double(), v.double()
    B, H, S, _ = probs.shape
    A = probs[:, :, 0, :].mean(dim=1)[:, 1:]                                    # row 0 = relay query
    Sm = torch.softmax(v[:, :, :1, :] @ v.transpose(-1, -2), dim=-1)[:, :, 0, :].mean(dim=1)[:, 1:]
    rho = v.mean(dim=1).abs().sum(dim=-1)[:, 1:]
    I = (A / A.sum(-1, keepdim=True) + Sm / Sm.sum(-1, keepdim=True)) * rho
    cum = I if prev is None else 0.5 * prev.double() + 0.5 * I
    hn = torch.tensor([_entropy_normalised((A[b] / A[b].sum()).tolist()) for b in range(B)],
                      dtype=torch.float64)
    return cum, hn, A


@torch.no_grad()
def naive_encode(vision_model, pixel_values, target_num, feature_layer=-1, compute_dtype=torch.float64):
    """FlowCut on a CLIP vision tower.

    pixel_values (B,3,H,W). Returns features (B,target_num,C) in compute_dtype,
    keep_indices (B,target_num) int64 ascending in 0..N0-1, tokens_per_layer (list, len F+1).
    """
    cast = lambda module: copy.deepcopy(module).to(compute_dtype)  # noqa: E731
    return _clip_flowcut(vision_model, pixel_values.to(compute_dtype), target_num, feature_layer, cast)


def naive_encode_with_grad(vision_model, pixel_values, target_num, feature_layer=-1):
    """The same pruned forward on the model's own modules (no copies), differentiable in its weights.

    The scores are computed without gradient (they only choose the tokens); the kept rows carry it.
    """
    return _clip_flowcut(vision_model, pixel_values, target_num, feature_layer, lambda module: module)


def _clip_flowcut(vision_model, pixel_values, target_num, feature_layer, module_of):
    tower = find_vision_tower(vision_model)
    layers = tower.encoder.layers
    L = len(layers)
    Fl = L + feature_layer
    T = target_num + 1
    x = module_of(tower.pre_layrnorm)(module_of(tower.embeddings)(pixel_values))
    B, S, C = x.shape
    index_map = torch.arange(S - 1, dtype=torch.int64).repeat(B, 1)
    cum = None
    tokens_per_layer = []
    for l in range(Fl):
        layer = module_of(layers[l])
        S = x.shape[1]
        tokens_per_layer.append(S)
        x, _, _, v, probs, _ = eager_clip_layer(layer, x)
        rpl = Fl - l - 1
        if S > T:
            cum, hn, _ = scores_from_attention(probs.detach(), v.detach(), cum)
            if rpl % 2 == 0:
                if rpl == 0:
                    keep = T
                else:
                    keep = max(S - naive_prune_count(hn, S - 1, T, rpl), T)
                x, cum, index_map = naive_select_gather(x, cum, index_map, keep, has_cls=True)
    layer = module_of(layers[Fl])
    tokens_per_layer.append(x.shape[1])
    x = eager_clip_layer(layer, x)[0]
    return x[:, 1:], index_map, tokens_per_layer
