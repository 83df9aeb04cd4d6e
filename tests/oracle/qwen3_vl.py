"""Naive, independent float64 oracle for FlowCut on Qwen3-VL (docs/semantics.md, the Qwen3-VL recipe).

The tower is oracle/qwen2_vl.py's (each image alone, its blocks written out, mean-query FlowCut in whole 2×2 merge
groups) with Qwen3-VL's learned, bilinearly resampled position embedding and its DeepStack mergers (naive_tower). The
language model is written out too (oracle/lm_stage.py's decoder with Qwen3's per-head q/k RMSNorm), with interleaved
M-RoPE: rotary frequency i (of D/2) turns with the h position if i % 3 = 1 and i < 3·s_h, with the w position if
i % 3 = 2 and i < 3·s_w, else with the t position ((s_t, s_h, s_w) = mrope_section). After decoder layer i < the
number of DeepStack layers, DeepStack layer i's feature of each image token is added to it — the token's own group's.
With the stage, decoder layer 1's q/k/v choose K of each image's 2K tokens (oracle/lm_stage.py's score) and the later
layers run on the text and the kept tokens, each with its own DeepStack features. Nothing is shared with the
`flowcut_kernels` package.
"""
import copy

import torch

from oracle.lm_stage import PRUNE_LAYER, _top, stage_scores
from oracle.qwen2_vl import QwenDecoder, naive_tower


def _interleaved_mrope(x, positions, theta, sections):
    """x (heads, L, D) rotated at M-RoPE positions (3, L), frequencies interleaved t, h, w (module docstring)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    axis = torch.zeros(dim // 2, dtype=torch.long)
    for i in range(dim // 2):
        if i % 3 == 1 and i < 3 * sections[1]:
            axis[i] = 1
        elif i % 3 == 2 and i < 3 * sections[2]:
            axis[i] = 2
    angles = positions.double()[axis].T * inv_freq
    cos, sin = torch.cat([angles.cos(), angles.cos()], -1), torch.cat([angles.sin(), angles.sin()], -1)
    return x * cos + torch.cat([-x[..., dim // 2:], x[..., : dim // 2]], -1) * sin


class Qwen3Decoder(QwenDecoder):
    """Qwen3-VL's text decoder in float64: interleaved M-RoPE (the q/k norms are oracle/lm_stage.py's)."""

    def rotate(self, x, positions):
        return _interleaved_mrope(x, positions, self.theta, self.sections)


def _split(total, frames):
    """A video's tokens over its frames: total // t each, the first total mod t one more."""
    return [total // frames + (f < total % frames) for f in range(frames)]


@torch.no_grad()
def naive_qwen3_logits(model, input_ids, mask, pixel_values, grids, target_num, stage, videos=None):
    """Last-position logits (B, V) float64 of FlowCut on a Qwen3VLForConditionalGeneration, with (``stage``) or
    without the language-model stage. Each image's tower keeps min(target_num, G₀) groups (2·target_num with the
    stage); per prompt (real tokens only) every decoder layer runs, each token at its M-RoPE position (group (t, h, w)
    of an image starting at p at p + (t, h, w), text after it from p + max(h', w')), DeepStack added after the first
    layers; with the stage, layer 1 keeps min(target_num, W) tokens per image (module docstring).
    ``videos``: (pixels, grids) of the prompts' videos, or None. A video's frames are images of their own in the prompt
    (each frame's run of video placeholders between its timestamp and vision tokens): frame f alone through the
    tower, keeping its share of the video's min(target_num, G₀) (2·target_num with the stage): K // t each, the first
    K mod t one more; its run holds its share of min(target_num, G₀).
    Returns the logits, the tower's kept groups and each image's DeepStack features (per layer, (W, C)), images then
    video frames (a frame's groups numbered in its frame)."""
    visual = model.model.visual
    factor = 2 if stage else 1
    units = {model.config.image_token_id: [
        (naive_tower(visual, p, g, factor * target_num), min(target_num, g[0] * g[1] * g[2] // 4), g)
        for p, g in zip(pixel_values.split([t * h * w for t, h, w in grids]), grids)
    ]}
    if videos is not None:
        frames = units[model.config.video_token_id] = []
        for p, (t, h, w) in zip(videos[0].split([t * h * w for t, h, w in videos[1]]), videos[1]):
            wide, short = (_split(min(n * target_num, t * h * w // 4), t) for n in (factor, 1))
            frames += [(naive_tower(visual, frame, (1, h, w), wide[f]), short[f], (1, h, w))
                       for f, frame in enumerate(p.split(h * w))]
    towers = [tower for kind in units.values() for tower, _, _ in kind]
    pending = {token: iter(kind) for token, kind in units.items()}
    decoder = Qwen3Decoder(model)
    out = []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][mask[b].bool()].tolist()
        rows, positions, deepstack, current, i = [], [], [], 0, 0
        segments = []  # (first row, width) of each image (video frame) in this prompt
        while i < len(ids):
            if ids[i] not in units:
                rows.append(decoder.embed[ids[i]])
                positions.append(torch.full((3,), current))
                deepstack.append(None)
                current, i = current + 1, i + 1
                continue
            (tokens, groups, stacks), count, grid = next(pending[ids[i]])
            _, h, w = (x // 2 for x in grid)
            segments.append((len(rows), len(tokens), count))
            rows.extend(tokens)
            positions.extend(torch.stack([groups // (h * w), groups // w % h, groups % w], 1) + current)
            deepstack.extend(torch.stack(stacks, 0).unbind(1) if stacks else [None] * len(tokens))
            current += max(h, w)
            i += count
        x, positions = torch.stack(rows), torch.stack(positions, 1)
        for layer in range(len(decoder.text.layers)):
            x, q, k, v = decoder.layer(layer, x, positions)
            for j, extra in enumerate(deepstack):
                if extra is not None and layer < len(extra):
                    x[j] = x[j] + extra[layer]
            if stage and layer == PRUNE_LAYER:
                keep = [j for j in range(len(rows)) if not any(s <= j < s + n for s, n, _ in segments)]
                for first, width, count in segments:
                    segment = slice(first, first + width)
                    kept = _top(stage_scores(q[:, -1], v[:, -1], k[:, segment], v[:, segment]), count)
                    keep += [first + j for j in kept]
                keep.sort()
                x, positions = x[keep], positions[:, keep]
                deepstack = [deepstack[j] for j in keep]
                rows = [rows[j] for j in keep]
                segments = []
        out.append(decoder.logits(x))
    return torch.stack(out), [groups for _, groups, _ in towers], [stacks for _, _, stacks in towers]


@torch.no_grad()
def naive_qwen3_5_logits(model, input_ids, mask, pixel_values, grids, target_num):
    """Last-position logits (B, V) float64 of FlowCut on a Qwen3_5ForConditionalGeneration (tower stage only): the
    oracle tower's min(target_num, G₀) merged tokens in the placeholders at their groups' M-RoPE positions
    (oracle/qwen2_vl.py's naive_positions), the stock hybrid language model in float64, one prompt at a time on its
    real tokens. Also returns each image's kept groups."""
    from oracle.qwen2_vl import naive_positions

    towers = [naive_tower(model.model.visual, p, g, target_num)[:2] for p, g in
              zip(pixel_values.split([t * h * w for t, h, w in grids]), grids)]
    reference = copy.deepcopy(model).double()
    image_token = model.config.image_token_id
    out, image = [], 0
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][mask[b].bool()][None]
        count = int((ids == image_token).sum())
        mine = []
        while count > 0:
            mine.append(image)
            count -= len(towers[image][1])
            image += 1
        embeds = reference.get_input_embeddings()(ids).clone()
        embeds[ids == image_token] = torch.cat([towers[g][0] for g in mine])
        positions = naive_positions(ids, torch.ones_like(ids), image_token, [grids[g] for g in mine],
                                    [towers[g][1] for g in mine])
        out.append(reference(inputs_embeds=embeds, position_ids=positions).logits[0, -1])
    return torch.stack(out), [groups for _, groups in towers]
