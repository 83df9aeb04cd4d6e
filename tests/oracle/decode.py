"""Naive, independent float64 oracle of decoding after a FlowCut prefill (docs/semantics.md, "The language-model stage"
and the Qwen2-VL recipe), for LLaVA-1.5 and LLaVA-NeXT (Llama decoder) and Qwen2-VL / Qwen2.5-VL (M-RoPE).

Built on oracle/lm_stage.py's float64 decoder (and oracle/qwen2_vl.py's M-RoPE one) and the tower-stage features of
oracle/llava.py, oracle/llava_next.py and oracle/qwen2_vl.py; nothing shared with the `flowcut_kernels` package.
One prompt at a time (its real tokens only), with an explicit cache:

1. the prompt's long layout (each image's W tower-stage tokens in its placeholders' place) runs through decoder
   layers 0 … lp; those layers cache the k/v of the tokens that stay, with the rotary phase of their long positions;
2. at lp each image keeps its K best tokens by the stage score (relay: the prompt's last token); the later layers run
   on the short layout and cache it (without the stage: no image token is dropped, every layer runs on the prompt);
3. decode step i (0-based) feeds the i-th generated token, attending to the whole cache, at the position that follows
   the prompt: LLaVA / NeXT L' + i, L' the short prompt's length (positions counted 0, 1, … from its mask); Qwen
   n + i on the t, h and w axes alike, n the position text after the prompt takes by the recipe's rule (text continues
   from the unpruned sequence: after an image of merged grid (h', w') starting at p, at p + max(h', w')).

Logits of step 0 are the prefill's (the first generated token), of step i ≥ 1 those after feeding tokens 0 … i − 1.
"""
import torch

from oracle.lm_stage import PRUNE_LAYER, Decoder, _top, stage_scores
from oracle.qwen2_vl import QwenDecoder, long_layout, naive_image


def _prefill(decoder, x, positions, segments, keeps, short_positions=None):
    """One prompt's prefill with the stage. x (L_long, C) float64 long layout; positions (L_long,) or (3, L_long);
    segments: (first row, width) of each image's tokens in x; keeps: the tokens each image keeps.
    short_positions: the short layout's positions (default: each kept row keeps its long position).
    Returns the last row's logits (V,), the cache [(k, v)] per layer (Hkv, L', D) and each image's kept indices."""
    cache = []
    for layer in range(PRUNE_LAYER + 1):
        x, q, k, v = decoder.layer(layer, x, positions)
        cache.append((k, v))
    image_rows = {j for first, width in segments for j in range(first, first + width)}
    short, kept_all = [j for j in range(x.shape[0]) if j not in image_rows], []
    for (first, width), keep in zip(segments, keeps):
        part = slice(first, first + width)
        kept = _top(stage_scores(q[:, -1], v[:, -1], k[:, part], v[:, part]), keep)
        kept_all.append(kept)
        short += [first + j for j in kept]
    short.sort()
    x, cache = x[short], [(k[:, short], v[:, short]) for k, v in cache]
    positions = positions[..., short] if short_positions is None else short_positions
    for layer in range(PRUNE_LAYER + 1, len(decoder.text.layers)):
        x, _, k, v = decoder.layer(layer, x, positions)
        cache.append((k, v))
    return decoder.logits(x), cache, kept_all


def _decode(decoder, cache, tokens, position):
    """Decode steps on ``cache`` (extended in place): token i at ``position(i)``. Returns the logits (n, V) after
    each token."""
    out = []
    for i, token in enumerate(tokens):
        x = decoder.embed[int(token)][None]
        for layer in range(len(decoder.text.layers)):
            x, _, k, v = decoder.layer(layer, x, position(i), past=cache[layer])
            cache[layer] = (torch.cat([cache[layer][0], k], 1), torch.cat([cache[layer][1], v], 1))
        out.append(decoder.logits(x))
    return out


@torch.no_grad()
def naive_llava_decode(model, input_ids, attention_mask, features, target_num, generated, llm_stage=True):
    """Logits (n, B, V) float64 of the n steps that generate ``generated`` (B, n) on a LLaVA-1.5 or LLaVA-NeXT.

    input_ids, attention_mask (B, L): left-padded prompts, target_num consecutive placeholders per image; features:
    the G images' projected tower-stage features ((W_g, C) each, prompt order; W_g ≥ target_num with the stage,
    = target_num without). Also returns the kept indices (0 … W_g − 1) of each image."""
    decoder = Decoder(model)
    image_token = model.config.image_token_id
    images = iter(features)
    steps, kept_all = [], []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][attention_mask[b].bool()].tolist()
        rows, segments, i = [], [], 0
        while i < len(ids):
            if ids[i] != image_token:
                rows.append(decoder.embed[ids[i]])
                i += 1
                continue
            assert ids[i:i + target_num] == [image_token] * target_num
            tokens = next(images).double()
            if llm_stage:
                segments.append((len(rows), len(tokens)))
            rows.extend(tokens)
            i += target_num
        x = torch.stack(rows)
        short_length = len(ids)
        logits, cache, kept = _prefill(decoder, x, torch.arange(len(x)), segments, [target_num] * len(segments),
                                       short_positions=torch.arange(short_length))
        kept_all += kept
        later = _decode(decoder, cache, generated[b, :-1], lambda i, n=short_length: torch.tensor([n + i]))
        steps.append(torch.stack([logits, *later]))
    return torch.stack(steps, 1), kept_all


@torch.no_grad()
def naive_qwen_decode(model, input_ids, mask, pixel_values, grids, target_num, generated, llm_stage=True):
    """Logits (n, B, V) float64 of the n steps that generate ``generated`` (B, n) on a Qwen2-VL or Qwen2.5-VL.

    input_ids, mask (B, L): left-padded prompts, min(target_num, G₀) consecutive placeholders per image (G₀ its merged
    tokens); pixel_values: the processor's patches of the images, grids their (t, h, w). Also returns each prompt's
    decode start n_b (the position of the first generated token, on every axis) as a (B,) tensor."""
    decoder = QwenDecoder(model)
    image_token = model.config.image_token_id
    visual = model.model.visual
    width = 2 * target_num if llm_stage else target_num
    images = [naive_image(visual, p, g, width) for p, g in
              zip(pixel_values.split([t * h * w for t, h, w in grids]), grids)]
    steps, starts, image = [], [], 0
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][mask[b].bool()].tolist()
        x, positions, images_here, current = long_layout(decoder, ids, image_token, images, grids, image, target_num)
        image += len(images_here)
        segments = [(first, width) for first, width, _, _ in images_here] if llm_stage else []
        keeps = [count for _, _, _, count in images_here] if llm_stage else []
        logits, cache, _ = _prefill(decoder, x, positions, segments, keeps)
        later = _decode(decoder, cache, generated[b, :-1], lambda i, n=current: torch.full((3, 1), n + i))
        steps.append(torch.stack([logits, *later]))
        starts.append(current)
    return torch.stack(steps, 1), torch.tensor(starts)
