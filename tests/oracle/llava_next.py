"""Naive, independent float64 oracle of FlowCut's LLaVA-NeXT recipe (docs/semantics.md), nothing shared with the
`flowcut_kernels` package; built on oracle/flowcut.py (tower primitives) and oracle/lm_stage.py (the decoder).

Per image of size (H, W), K = target_num, k = K // 2:
1. its crops (the base image, then the gh × gw grid of its best `image_grid_pinpoints` resolution, row by row) run
   through the CLIP tower as one batch with the batch rule (one schedule for the image's crops), each keeping k
   patches; each kept patch keeps its last S_cum;
2. layout: base patches first (patch order), then the grid patches in raster order of the stitched grid; a grid
   patch is in the margin when stock `unpad_image` cuts its row (image wider than the grid) or column (taller);
3. selection: by (margin last, S_cum descending, layout order): with the stage every unpadded patch and margin ones
   up to K; without it exactly K; the chosen ones in layout order.
"""
import copy

import torch
from transformers.image_processing_utils import select_best_resolution

from oracle.flowcut import eager_clip_layer, naive_prune_count, naive_select_gather, scores_from_attention
from oracle.lm_stage import Decoder


def _tower(tower, pixels, keep_per_crop, feature_layer):
    """The crops of one image, batch rule over them. Returns features (P, k, C), patch numbers (P, k), S_cum (P, k)."""
    layers = tower.encoder.layers
    last = len(layers) + feature_layer
    target = keep_per_crop + 1
    x = copy.deepcopy(tower.pre_layrnorm).double()(copy.deepcopy(tower.embeddings).double()(pixels.double()))
    index = torch.arange(x.shape[1] - 1).repeat(x.shape[0], 1)
    cum = None
    for layer_number in range(last):
        size = x.shape[1]
        x, _, _, v, probs, _ = eager_clip_layer(copy.deepcopy(layers[layer_number]).double(), x)
        steps_left = last - layer_number - 1
        if size > target:
            cum, entropy, _ = scores_from_attention(probs, v, cum)
            if steps_left % 2 == 0:
                keep = target if steps_left == 0 else max(size - naive_prune_count(entropy, size - 1, target,
                                                                                  steps_left), target)
                x, cum, index = naive_select_gather(x, cum, index, keep, has_cls=True)
    x = eager_clip_layer(copy.deepcopy(layers[last]).double(), x)[0]
    return x[:, 1:], index, cum


def _margin(height, width, rows, cols):
    """Stitched-grid positions (rows × cols) that stock unpad_image cuts for an (height, width) image: a set."""
    if width / height > cols / rows:
        pad = (rows - int(round(height * (cols / width), 7))) // 2
        return {(y, x) for y in range(rows) for x in range(cols) if y < pad or y >= rows - pad}
    pad = (cols - int(round(width * (rows / height), 7))) // 2
    return {(y, x) for y in range(rows) for x in range(cols) if x < pad or x >= cols - pad}


def naive_anyres_image(tower_pass, pixels, size, pinpoints, side, per_side, target_num, llm_stage):
    """Steps 1 to 3 for one image of ``size`` (H, W): its crops (``pixels``: the base image, then the grid of its best
    ``pinpoints`` resolution; ``side`` pixels, ``per_side`` patches a side) through ``tower_pass(crops, k)``, which
    returns features (P, k, C), patch numbers (P, k) and S_cum (P, k). Returns the chosen tokens' features (W, C) and
    their (crop, patch) pairs, in layout order."""
    height, width = size
    best_height, best_width = select_best_resolution([height, width], pinpoints)
    grid_rows, grid_cols = best_height // side, best_width // side
    crops = 1 + grid_rows * grid_cols
    k = target_num // 2
    feats, index, cum = tower_pass(pixels[:crops], k)
    margin = _margin(height, width, grid_rows * per_side, grid_cols * per_side)
    tokens = []  # (margin, -S_cum, layout position, crop, slot)
    for crop in range(crops):
        for slot in range(k):
            patch = int(index[crop, slot])
            if crop == 0:
                position, cut = (0, patch), False
            else:
                y = (crop - 1) // grid_cols * per_side + patch // per_side
                x = (crop - 1) % grid_cols * per_side + patch % per_side
                position, cut = (1, y, x), (y, x) in margin
            tokens.append((cut, -float(cum[crop, slot]), position, crop, slot))
    count = max(target_num, sum(not t[0] for t in tokens)) if llm_stage else target_num
    chosen = sorted(sorted(tokens)[:count], key=lambda t: t[2])
    return torch.stack([feats[t[3], t[4]] for t in chosen]), [(t[3], int(index[t[3], t[4]])) for t in chosen]


@torch.no_grad()
def naive_next_features(model, pixel_values, image_sizes, target_num, llm_stage):
    """The projected features each image gives the language model, float64.

    model: LlavaNextForConditionalGeneration (CLIP tower); pixel_values (G, P_max, 3, S, S); image_sizes (G, 2).
    Returns a list of G (W_g, C_text) tensors and a list of G lists of (crop, patch) pairs.
    """
    core = model.model
    tower = core.vision_tower.vision_model if hasattr(core.vision_tower, "vision_model") else core.vision_tower
    side = core.config.vision_config.image_size
    per_side = side // core.config.vision_config.patch_size
    layer = core.config.vision_feature_layer
    feature_layer = layer if layer < 0 else layer - (core.config.vision_config.num_hidden_layers + 1)
    projector = copy.deepcopy(core.multi_modal_projector).double()
    features, sources = [], []
    for pixels, size in zip(pixel_values, image_sizes.tolist()):
        feats, chosen = naive_anyres_image(lambda crops, k: _tower(tower, crops, k, feature_layer), pixels, size,
                                           core.config.image_grid_pinpoints, side, per_side, target_num, llm_stage)
        features.append(projector(feats))
        sources.append(chosen)
    return features, sources


@torch.no_grad()
def naive_logits(model, input_ids, attention_mask, features, target_num):
    """Without the stage: each prompt's real tokens with its images' K features in their placeholders' places, the
    decoder in float64; the logits (B, V) at each prompt's last token."""
    decoder = Decoder(model)
    image_token = model.config.image_token_id
    images = iter(features)
    logits = []
    for ids, mask in zip(input_ids, attention_mask):
        ids = ids[mask.bool()].tolist()
        rows = []
        for i, token in enumerate(ids):
            if token != image_token:
                rows.append(decoder.embed[token])
            elif i == 0 or ids[i - 1] != image_token:
                rows.extend(next(images).double())
        x = torch.stack(rows)
        assert x.shape[0] == len(ids)
        for layer in range(len(decoder.text.layers)):
            x = decoder.layer(layer, x, torch.arange(x.shape[0]))[0]
        logits.append(decoder.logits(x))
    return torch.stack(logits)
