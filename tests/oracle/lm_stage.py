"""Naive, independent oracle for FlowCut's language-model stage on a LLaVA with a Llama decoder (docs/semantics.md).

Float64 and eager, one prompt at a time (its real tokens only, so positions are 0, 1, … with no padding), the
decoder written out from its weights — RMSNorm, rotary embedding, grouped-query causal attention, SiLU-gated MLP —
and nothing shared with the `flowcut_kernels` package. The tower stage's features (2·K per image) come from
oracle/llava.py.

The recipe, per prompt:
1. long prompt: each image's K placeholders replaced by its 2·K features; decoder layers 0 … lp (lp = 1) run on it;
2. at layer lp, for each image: rel_h[j] = softmax_j(q_h[t]·k_h[j] / √D), sem_h[j] = softmax_j(v_h[t]·v_h[j] / √D)
   over that image's tokens j, t the last token, key/value heads repeated to the query heads; rel, sem the means over
   heads; rho[j] = Σ_d |mean_h v_h[j, d]|; score = (rel + sem)·rho; the K best (ties: lower index) stay, ascending;
3. short prompt: the text tokens and each image's kept tokens in its placeholders' places, numbered 0 … L' − 1;
   the remaining layers run on it;
4. cache: layers 0 … lp keep their long k/v at the kept rows (with their long positions' rotary phase), the later
   layers their short k/v; a decode step's token sits at position L'.
"""
import math

import torch

PRUNE_LAYER = 1


def _linear(x, module):
    out = x @ module.weight.double().T
    return out if module.bias is None else out + module.bias.double()


def _rms_norm(x, module, eps):
    return module.weight.double() * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _rotate(x, positions, theta):
    """x (heads, L, D) at positions (L,) → the rotary embedding applied (pairs i and i + D/2 rotate together)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos(), angles.cos()], -1), torch.cat([angles.sin(), angles.sin()], -1)
    rotated = torch.cat([-x[..., dim // 2:], x[..., : dim // 2]], -1)
    return x * cos + rotated * sin


class Decoder:
    """A HF Llama decoder's weights, run in float64."""

    def __init__(self, llava):
        self.text = llava.model.language_model
        self.config = config = self.text.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
        self.theta = rope["rope_theta"]
        self.eps = config.rms_norm_eps
        self.embed = self.text.embed_tokens.weight.double()
        self.lm_head = llava.lm_head.weight.double()

    def rotate(self, x, positions):
        """x (H, L, D) rotated to positions (L,) (RoPE)."""
        return _rotate(x, positions, self.theta)

    def layer(self, i, x, positions, past=None):
        """Layer i on x (L, C) at positions (L,), after past = (k, v) (Hkv, P, D) or None.

        Returns the output (L, C) and this x's q (H, L, D), k, v (Hkv, L, D) after the rotary embedding."""
        layer = self.text.layers[i]
        attn = layer.self_attn
        length = x.shape[0]
        h = _rms_norm(x, layer.input_layernorm, self.eps)
        q = _linear(h, attn.q_proj).view(length, self.heads, self.dim).transpose(0, 1)
        k = _linear(h, attn.k_proj).view(length, self.kv_heads, self.dim).transpose(0, 1)
        v = _linear(h, attn.v_proj).view(length, self.kv_heads, self.dim).transpose(0, 1)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head's q and k, before the rotary embedding
            q, k = _rms_norm(q, attn.q_norm, self.eps), _rms_norm(k, attn.k_norm, self.eps)
        q, k = self.rotate(q, positions), self.rotate(k, positions)
        keys = k if past is None else torch.cat([past[0], k], 1)
        values = v if past is None else torch.cat([past[1], v], 1)
        before = keys.shape[1] - length
        visible = torch.arange(keys.shape[1])[None, :] <= before + torch.arange(length)[:, None]  # causal
        group = self.heads // self.kv_heads
        out = torch.zeros(self.heads, length, self.dim, dtype=torch.float64)
        for head in range(self.heads):
            logits = q[head] @ keys[head // group].T / math.sqrt(self.dim)
            weights = torch.softmax(logits.masked_fill(~visible, -math.inf), -1)
            out[head] = weights @ values[head // group]
        x = x + _linear(out.transpose(0, 1).reshape(length, -1), attn.o_proj)
        h = _rms_norm(x, layer.post_attention_layernorm, self.eps)
        mlp = layer.mlp
        x = x + _linear(torch.nn.functional.silu(_linear(h, mlp.gate_proj)) * _linear(h, mlp.up_proj), mlp.down_proj)
        return x, q, k, v

    def logits(self, x):
        """Logits (V,) of the last row of x (L, C) after the final norm."""
        return _rms_norm(x[-1], self.text.norm, self.eps) @ self.lm_head.T


def stage_scores(q_t, v_t, k, v):
    """The stage's score of one image's W tokens: q_t (H, D), v_t (Hkv, D) the relay's; k, v (Hkv, W, D)."""
    heads, kv_heads, dim = q_t.shape[0], k.shape[0], k.shape[-1]
    group = heads // kv_heads
    width = k.shape[1]
    rel = torch.zeros(width, dtype=torch.float64)
    sem = torch.zeros(width, dtype=torch.float64)
    v_mean = torch.zeros(width, dim, dtype=torch.float64)
    for head in range(heads):
        g = head // group
        rel += torch.softmax(k[g] @ q_t[head] / math.sqrt(dim), 0) / heads
        sem += torch.softmax(v[g] @ v_t[g] / math.sqrt(dim), 0) / heads
        v_mean += v[g] / heads
    rho = v_mean.abs().sum(-1)
    return (rel + sem) * rho


def _top(scores, keep):
    """The keep best indices (ties: lower index first), ascending."""
    return sorted(sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))[:keep])


@torch.no_grad()
def naive_lm_stage(llava, input_ids, attention_mask, features, target_num, next_tokens=None):
    """The recipe's logits for each prompt.

    input_ids, attention_mask: (B, L) prompts (any padding) with target_num consecutive placeholders per image;
    features: (G, 2·target_num, C) float64 projected tower-stage features of the G images, in prompt order;
    next_tokens: (B,) a token appended to each prompt, or None.
    Returns the logits (B, V) float64 at each prompt's last token, and (with next_tokens) those of the decode step
    that feeds next_tokens[b] on the recipe's cache, and the kept indices of each image (0 … 2K − 1).
    """
    decoder = Decoder(llava)
    image_token, keep = llava.config.image_token_id, target_num
    layers = len(decoder.text.layers)
    prefill, step, kept_all = [], [], []
    image = 0
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][attention_mask[b].bool()].tolist()
        rows, pieces = [], []  # pieces: ("text", long row) or ("image", first long row, image number)
        i = 0
        while i < len(ids):
            if ids[i] == image_token:
                assert ids[i:i + keep] == [image_token] * keep
                pieces.append(("image", len(rows), image))
                rows.extend(features[image].double())
                image += 1
                i += keep
            else:
                pieces.append(("text", len(rows), None))
                rows.append(decoder.embed[ids[i]])
                i += 1
        x = torch.stack(rows)
        cache = []
        for layer in range(PRUNE_LAYER + 1):
            x, q, k, v = decoder.layer(layer, x, torch.arange(x.shape[0]))
            cache.append((k, v))
        short = []
        for kind, first, number in pieces:
            if kind == "text":
                short.append(first)
                continue
            width = features[number].shape[0]
            segment = slice(first, first + width)
            scores = stage_scores(q[:, -1], v[:, -1], k[:, segment], v[:, segment])
            kept = _top(scores, keep)
            kept_all.append(kept)
            short.extend(first + j for j in kept)
        x = x[short]
        cache = [(k[:, short], v[:, short]) for k, v in cache]
        for layer in range(PRUNE_LAYER + 1, layers):
            x, _, k, v = decoder.layer(layer, x, torch.arange(x.shape[0]))
            cache.append((k, v))
        prefill.append(decoder.logits(x))
        if next_tokens is not None:
            x, position = decoder.embed[int(next_tokens[b])][None], torch.tensor([len(short)])
            for layer in range(layers):
                x = decoder.layer(layer, x, position, past=cache[layer])[0]
            step.append(decoder.logits(x))
    return torch.stack(prefill), (torch.stack(step) if step else None), kept_all
