"""Naive, independent float64 oracle for FlowCut on Qwen2-VL and Qwen2.5-VL (docs/semantics.md, the Qwen2-VL
recipe).

Built on oracle/flowcut.py and the model's weights only: each image alone, the vision blocks written out (LayerNorm,
or Qwen2.5-VL's RMSNorm; fused qkv, the 2-D rotary embedding computed from each patch's (h, w), softmax attention,
MLP or Qwen2.5-VL's gated MLP), FlowCut's mean-query scores per patch, pruning in whole 2×2 merge groups (group
score = sum of its 4 members' S_cum), the merger, and the M-RoPE positions of the kept tokens. Nothing is shared with
the `flowcut_kernels` package.

Qwen2.5-VL's window attention is a mask, not a reorder: the patches stay in the processor's order and a windowed
layer lets a patch attend only to the (kept) patches of its own window, the window of merge block (bh, bw) being
(bh // n, bw // n), n = window_size // patch_size // 2; the other layers attend over the image.
"""
import copy

import torch
import torch.nn.functional as F

from oracle.flowcut import naive_group_prune
from oracle.lm_stage import Decoder


def patch_coordinates(t, h, w, merge=2):
    """(t·h·w, 2) (row, column) of each patch in the processor's order: merge blocks row-major, each block row-major."""
    rows = []
    for _ in range(t):
        for bh in range(h // merge):
            for bw in range(w // merge):
                for dh in range(merge):
                    for dw in range(merge):
                        rows.append((bh * merge + dh, bw * merge + dw))
    return torch.tensor(rows, dtype=torch.float64)


def _rotary(coords, head_dim, theta=10000.0):
    """cos, sin (S, head_dim): angles h·f and w·f (f = theta^(−2i/(head_dim/2))), each half repeated."""
    half = head_dim // 2
    inv = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float64) / half)
    angles = torch.cat([coords[:, :1] * inv, coords[:, 1:] * inv], dim=1)
    angles = torch.cat([angles, angles], dim=1)
    return angles.cos(), angles.sin()


def _rotate(x, cos, sin):
    """x (H, S, D) rotated: x·cos + rotate_half(x)·sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _norm(norm, x):
    """LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL, no bias), float64."""
    if getattr(norm, "bias", None) is not None:
        return F.layer_norm(x, x.shape[-1:], norm.weight.double(), norm.bias.double(), norm.eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.double()


def _linear(layer, x):
    return x @ layer.weight.double().T + layer.bias.double()


def _mlp(mlp, x):
    """Qwen2.5-VL's gated MLP down(silu(gate(x))·up(x)) written out; Qwen2-VL's MLP in float64."""
    if hasattr(mlp, "gate_proj"):
        return _linear(mlp.down_proj, F.silu(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))
    return copy.deepcopy(mlp).double()(x)


def _block(block, x, cos, sin, same_window):
    """One vision block on one image, float64: returns the output and the rotated q, k and v (1, H, S, D).
    same_window: (S, S) bool, which keys each query may attend to."""
    heads = block.attn.num_heads
    S, C = x.shape
    qkv = _linear(block.attn.qkv, _norm(block.norm1, x))
    q, k, v = qkv.view(S, 3, heads, -1).permute(1, 2, 0, 3)  # (H, S, D) each
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    scale = q.shape[-1] ** -0.5
    logits = (q @ k.transpose(1, 2) * scale).masked_fill(~same_window, float("-inf"))
    attention = torch.softmax(logits, dim=-1) @ v  # (H, S, D)
    x = x + _linear(block.attn.proj, attention.transpose(0, 1).reshape(S, C))
    return x + _mlp(block.mlp, _norm(block.norm2, x)), q[None], k[None], v[None], scale


def group_windows(visual, t, h, w, merge=2):
    """(t·h·w/4,) the attention window of each merge group (all 0 without windows: Qwen2-VL)."""
    if not hasattr(visual, "window_size"):
        return torch.zeros(t * h * w // merge**2, dtype=torch.long)
    n = visual.window_size // visual.patch_size // merge
    down, across = -(-(h // merge) // n), -(-(w // merge) // n)  # windows per column and per row of a frame
    return torch.tensor([(f * down + bh // n) * across + bw // n
                         for f in range(t) for bh in range(h // merge) for bw in range(w // merge)])


def _top_groups(scores, keep):
    """The `keep` best groups (ties: lower index), ascending."""
    order = sorted(range(len(scores)), key=lambda g: (-float(scores[g]), g))
    return sorted(order[:keep])


def naive_position_embedding(table, t, h, w):
    """Qwen3-VL's learned positions (t·h·w, C) in the processor's order: the (n, n) table (n² rows) read bilinearly
    at patch (r, c) of an (h, w) grid at (r·(n − 1)/(h − 1), c·(n − 1)/(w − 1)) (corners aligned)."""
    n = int(round(table.shape[0] ** 0.5))
    grid = table.double().view(n, n, -1)
    rows = []
    for r, c in patch_coordinates(t, h, w).tolist():
        y, x = r * (n - 1) / max(h - 1, 1), c * (n - 1) / max(w - 1, 1)
        y0, x0 = int(y), int(x)
        y1, x1 = min(y0 + 1, n - 1), min(x0 + 1, n - 1)
        dy, dx = y - y0, x - x0
        rows.append((1 - dy) * (1 - dx) * grid[y0, x0] + (1 - dy) * dx * grid[y0, x1]
                    + dy * (1 - dx) * grid[y1, x0] + dy * dx * grid[y1, x1])
    return torch.stack(rows)


@torch.no_grad()
def naive_image(visual, pixels, grid, target_groups):
    """One image (pixels (t·h·w, C_in·t·p·p), grid (t, h, w)) → merged tokens (K, C_text) float64, kept groups (K,)."""
    merged, groups, _ = naive_tower(visual, pixels, grid, target_groups)
    return merged, groups


@torch.no_grad()
def naive_tower(visual, pixels, grid, target_groups):
    """:func:`naive_image`, and Qwen3-VL's DeepStack: one (K, C_text) float64 tensor per ``deepstack_visual_indexes``
    layer ℓ, that layer's DeepStack merger on its output, the rows of the groups kept in the end (no DeepStack: [])."""
    t, h, w = grid
    m = 4
    x = copy.deepcopy(visual.patch_embed).double()(pixels.double())
    if hasattr(visual, "pos_embed"):  # Qwen3-VL
        x = x + naive_position_embedding(visual.pos_embed.weight, t, h, w)
    taps = list(getattr(visual, "deepstack_visual_indexes", ()))
    stacks = []
    head_dim = x.shape[1] // visual.blocks[0].attn.num_heads
    cos, sin = _rotary(patch_coordinates(t, h, w), head_dim)
    groups = list(range(t * h * w // m))
    window = group_windows(visual, t, h, w)
    target = min(target_groups, len(groups))
    cum = None
    L = len(visual.blocks)
    for layer, block in enumerate(visual.blocks):
        patch_window = window[groups].repeat_interleave(m)
        if layer in getattr(visual, "fullatt_block_indexes", range(L)):
            patch_window = torch.zeros_like(patch_window)
        x, q, k, v, scale = _block(block, x, cos, sin, patch_window[:, None] == patch_window[None, :])
        if layer in taps:
            stacks.append(copy.deepcopy(visual.deepstack_merger_list[taps.index(layer)]).double()(x))
        cum, keep = naive_group_prune(q, k, v, cum, scale, len(groups), target, L - layer - 1)
        if keep is None:
            continue
        scores = cum[0].view(len(groups), m).sum(1)
        kept = _top_groups(scores, keep)
        rows = [g * m + j for g in kept for j in range(m)]
        x, cum, cos, sin = x[rows], cum[:, rows], cos[rows], sin[rows]
        stacks = [stack[kept] for stack in stacks]
        groups = [groups[g] for g in kept]
    merged = copy.deepcopy(visual.merger).double()(x)
    return merged, torch.tensor(groups), stacks


@torch.no_grad()
def naive_video(visual, pixels, grid, target_num):
    """One video (pixels (t·h·w, C_in·t·p·p), grid (t, h, w)) → merged tokens (K, C_text) float64 and kept groups
    (K,), numbered in the video (frame f's group g is f·h'·w' + g): each frame alone through :func:`naive_image`,
    keeping its share of K = min(target_num, t·h'·w') (K // t each, the first K mod t frames one more)."""
    t, h, w = grid
    total = min(target_num, t * h * w // 4)
    merged, groups = [], []
    for f, frame in enumerate(pixels.split(h * w)):
        tokens, kept = naive_image(visual, frame, (1, h, w), total // t + (f < total % t))
        merged.append(tokens)
        groups.append(kept + f * (h * w // 4))
    return torch.cat(merged), torch.cat(groups)


def naive_positions(input_ids, mask, image_token_id, grids, kept, merge=2, video_token_id=None, videos=()):
    """(3, B, L) M-RoPE positions: text counts on from the unpruned sequence, a kept group (t, h, w) of an image
    starting at p sits at p + (t, h, w); after an image of merged grid (h', w'), text resumes at p + max(h', w').
    ``videos``: (grid, kept groups, seconds between frames' positions) per video, whose placeholders are one run of
    ``video_token_id``: a kept group (f, h, w) at (p + ⌊f·interval⌋, p + h, p + w), text after at p + max(h', w')
    (the grids of the tests keep the last frame's position below that)."""
    B, L = input_ids.shape
    out = torch.zeros(3, B, L, dtype=torch.long)
    image, video = 0, 0
    for b in range(B):
        current, j = 0, 0
        spots = [s for s in range(L) if mask[b, s]]
        while j < len(spots):
            s = spots[j]
            if input_ids[b, s] == video_token_id:
                grid, groups, interval = videos[video]
                video += 1
            elif input_ids[b, s] == image_token_id:
                grid, groups, interval = grids[image], kept[image], 1
                image += 1
            else:
                out[:, b, s] = current
                current, j = current + 1, j + 1
                continue
            _, h, w = (x // merge for x in grid)
            for g in groups.tolist():
                frame = int(g // (h * w) * interval)
                out[:, b, spots[j]] = torch.tensor([current + frame, current + g // w % h, current + g % w])
                j += 1
            current += max(h, w)
    return out


@torch.no_grad()
def naive_logits(model, input_ids, mask, pixel_values, grids, target_num, videos=None):
    """Last-position logits (B, V) float64 of FlowCut on a Qwen2(.5)VLForConditionalGeneration (llm_stage=False): the
    oracle's merged tokens in the placeholders, the oracle's positions, the stock language model in float64.
    ``videos``: (pixels, grids, seconds per temporal patch) of the prompts' videos, or None.
    Also returns the kept groups of each image, and of each video after them."""
    visual = model.model.visual
    sizes = [t * h * w for t, h, w in grids]
    merged, kept = [], []
    for pixels, grid in zip(pixel_values.split(sizes), grids):
        tokens, groups = naive_image(visual, pixels, grid, target_num)
        merged.append(tokens)
        kept.append(groups)
    clips = []
    if videos is not None:
        video_pixels, video_grids, seconds = videos
        per_second = getattr(visual.config, "tokens_per_second", None)  # Qwen2.5-VL's temporal position scale
        for pixels, grid, second in zip(video_pixels.split([t * h * w for t, h, w in video_grids]), video_grids,
                                        seconds):
            tokens, groups = naive_video(visual, pixels, grid, target_num)
            clips.append((grid, groups, tokens, per_second * second if per_second else 1))
    reference = copy.deepcopy(model).double()
    embeds = reference.get_input_embeddings()(input_ids).clone()
    for token, rows in ((model.config.image_token_id, merged), (model.config.video_token_id, [c[2] for c in clips])):
        spots = (input_ids == token).nonzero().tolist()
        rows = torch.cat(rows) if rows else torch.zeros(0)
        assert len(spots) == len(rows), (len(spots), rows.shape)
        for (b, s), row in zip(spots, rows):
            embeds[b, s] = row
    positions = naive_positions(input_ids, mask, model.config.image_token_id, grids, kept,
                                video_token_id=model.config.video_token_id,
                                videos=[(grid, groups, interval) for grid, groups, _, interval in clips])
    out = reference(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    return out.logits[:, -1], kept + [c[1] for c in clips]


def _mrope(x, positions, theta, sections):
    """x (heads, L, D) rotated at M-RoPE positions (3, L): frequency i (of D/2) turns with the t, h or w position,
    ``sections`` of them each in that order; pairs i and i + D/2 rotate together."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    axis = torch.repeat_interleave(torch.arange(3), torch.tensor(sections))
    angles = positions.double()[axis].T * inv_freq  # (L, D/2): frequency i at its axis' position
    cos, sin = torch.cat([angles.cos(), angles.cos()], -1), torch.cat([angles.sin(), angles.sin()], -1)
    return x * cos + torch.cat([-x[..., dim // 2:], x[..., : dim // 2]], -1) * sin


class QwenDecoder(Decoder):
    """A HF Qwen2(.5)-VL text decoder's weights in float64: oracle/lm_stage.py's Llama layer (q/k/v biases) with
    M-RoPE positions (3, L)."""

    def __init__(self, model):
        super().__init__(model)
        self.sections = self.config.rope_parameters["mrope_section"]

    def rotate(self, x, positions):
        return _mrope(x, positions, self.theta, self.sections)


def long_layout(decoder, ids, image_token, images, grids, image, target_num, video_token=None, clips=None):
    """One prompt's long layout (``ids``: its real token ids): text embedded at consecutive positions on the three
    axes; an image (the ``image``-th onward: kept tower tokens and groups in ``images``, (t, h, w) in ``grids``) in
    place of its min(target_num, G₀) placeholders, a group (t, h, w) of an image starting at p at p + (t, h, w), text
    after it from p + max(h', w'). ``clips``: an iterator over the videos (their run of ``video_token``
    placeholders): (grid, seconds between frames' positions, per frame (tokens, groups in the frame, placeholders));
    frame f's group (h, w) at (p + ⌊f·interval⌋, p + h, p + w), text after the video from p + max(h', w').
    Returns rows (L, C), positions (3, L), each image's and frame's (first row, width, image (None: a frame),
    placeholders) and the position text after the prompt takes."""
    rows, positions, segments, current, i = [], [], [], 0, 0
    while i < len(ids):
        if ids[i] == video_token:
            grid, interval, frames = next(clips)
            h, w = grid[1] // 2, grid[2] // 2
            for f, (tokens, groups, count) in enumerate(frames):
                segments.append((len(rows), len(tokens), None, count))
                rows.extend(tokens)
                offset = torch.tensor([int(f * interval), 0, 0])
                positions.extend(torch.stack([groups * 0, groups // w, groups % w], 1) + offset + current)
                i += count
            current += max(h, w)
            continue
        if ids[i] != image_token:
            rows.append(decoder.embed[ids[i]])
            positions.append(torch.full((3,), current))
            current, i = current + 1, i + 1
            continue
        tokens, groups = images[image]
        t, h, w = grids[image][0], grids[image][1] // 2, grids[image][2] // 2
        count = min(target_num, t * h * w)
        assert ids[i:i + count] == [image_token] * count
        segments.append((len(rows), len(tokens), image, count))
        rows.extend(tokens)
        positions.extend(torch.stack([groups // (h * w), groups // w % h, groups % w], 1) + current)
        current, i, image = current + max(h, w), i + count, image + 1
    return torch.stack(rows), torch.stack(positions, 1), segments, current


@torch.no_grad()
def naive_stage_logits(model, input_ids, mask, pixel_values, grids, target_num, videos=None):
    """Last-position logits (B, V) float64 of FlowCut with the language-model stage on a Qwen2(.5)-VL: each image's
    tower keeps min(2·target_num, G₀) groups (naive_image); per prompt (real tokens only), layers 0 … lp run on the
    long sequence, each token at its M-RoPE position (a group (t, h, w) of an image starting at p at p + (t, h, w),
    text after it from p + max(h', w')); at lp each image keeps min(target_num, W) tokens by the stage score
    (oracle/lm_stage.py, relay the last token); the later layers run on the text and kept tokens at their positions.
    ``videos``: (pixels, grids, seconds per temporal patch) of the prompts' videos, or None: each frame alone through
    the tower keeps its share of min(2·target_num, G₀) (K // t each, the first K mod t frames one more) and layer lp
    keeps its share of min(target_num, G₀).
    Also returns the tower's kept groups and the stage's kept indices of each image (and video frame)."""
    from oracle.lm_stage import PRUNE_LAYER, _top, stage_scores

    visual = model.model.visual
    images = [naive_image(visual, p, g, 2 * target_num) for p, g in
              zip(pixel_values.split([t * h * w for t, h, w in grids]), grids)]
    clips = []
    if videos is not None:
        per_second = getattr(visual.config, "tokens_per_second", None)
        for p, (t, h, w), second in zip(videos[0].split([t * h * w for t, h, w in videos[1]]), videos[1], videos[2]):
            wide, short = ([n // t + (f < n % t) for f in range(t)] for n in
                           (min(2 * target_num, t * h * w // 4), min(target_num, t * h * w // 4)))
            frames = [(*naive_image(visual, frame, (1, h, w), wide[f]), short[f]) for f, frame in
                      enumerate(p.split(h * w))]
            clips.append(((t, h, w), per_second * second if per_second else 1, frames))
    clips = iter(clips)
    decoder = QwenDecoder(model)
    image_token = model.config.image_token_id
    out, towers, stages, image = [], [], [], 0
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][mask[b].bool()].tolist()
        x, positions, segments, _ = long_layout(decoder, ids, image_token, images, grids, image, target_num,
                                                model.config.video_token_id, clips)
        towers += [images[n][1] for _, _, n, _ in segments if n is not None]
        image += len([n for _, _, n, _ in segments if n is not None])
        for layer in range(PRUNE_LAYER + 1):
            x, q, k, v = decoder.layer(layer, x, positions)
        short = [j for j in range(len(x)) if not any(s <= j < s + n for s, n, _, _ in segments)]
        for first, width, _, count in segments:
            segment = slice(first, first + width)
            kept = _top(stage_scores(q[:, -1], v[:, -1], k[:, segment], v[:, segment]), count)
            stages.append(torch.tensor(kept))
            short += [first + j for j in kept]
        short.sort()
        x, positions = x[short], positions[:, short]
        for layer in range(PRUNE_LAYER + 1, len(decoder.text.layers)):
            x = decoder.layer(layer, x, positions)[0]
        out.append(decoder.logits(x))
    return torch.stack(out), towers, stages
