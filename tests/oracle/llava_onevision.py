"""Naive, independent float64 oracle of FlowCut's LLaVA-OneVision recipe (docs/semantics.md), nothing shared with the
`flowcut_kernels` package; built on oracle/flowcut.py (scores, prune count), oracle/gemma3.py (the SigLIP layer
written out) and oracle/llava_next.py (the anyres layout and selection, the decoder run).

Per image of size (H, W), K = target_num:
1. its crops: alone in its prompt, the base image then the gh × gw grid of its best `image_grid_pinpoints`
   resolution, each keeping k = K // 2; in a multi-image prompt, the base image alone, keeping K. The crops run through
   the SigLIP layers as one batch with the batch rule (the largest prune count over the crops), relay = each crop's
   mean query, the mean variant (target k); each kept patch keeps its last S_cum;
2. layout: base patches first (patch order), then grid patches in raster order of the stitched grid; a grid patch is
   in the margin when stock `unpad_image` cuts its row or column;
3. selection: by (margin last, S_cum descending, layout order): exactly K, or with the language-model stage every
   unpadded patch and margin ones up to K (a single crop then keeps 2K); the chosen ones in layout order.
"""
import copy

import torch

from oracle.flowcut import naive_flow_scores, naive_prune_count
from oracle.gemma3 import siglip_layer
from oracle.llava_next import naive_anyres_image


def _tower(tower, pixels, keep, feature_layer):
    """The crops (P, 3, S, S) of one image, batch rule over them, each keeping ``keep``. Returns features
    (P, keep, C), patch numbers (P, keep), S_cum (P, keep)."""
    layers = tower.encoder.layers
    last = len(layers) + feature_layer
    crops = []
    for pixel in pixels:  # each crop alone through the layers, the counts shared
        crops.append(copy.deepcopy(tower.embeddings).double()(pixel[None].double()))
    x = torch.cat(crops)
    index = torch.arange(x.shape[1]).repeat(len(x), 1)
    cum = None
    for i in range(last):
        size = x.shape[1]
        outs = [siglip_layer(layers[i], x[c : c + 1]) for c in range(len(x))]
        x = torch.cat([o[0] for o in outs])
        if size <= keep:
            continue
        q, k, v = (torch.cat([o[j] for o in outs]) for j in (1, 2, 3))
        cum, hn, _ = naive_flow_scores(q.mean(dim=2), k, v, cum, outs[0][4], has_cls=False)
        rpl = last - i - 1
        if rpl % 2:
            continue
        count = keep if rpl == 0 else max(size - naive_prune_count(hn, size, keep, rpl), keep)
        rows = []
        for c in range(len(x)):
            values = cum[c].tolist()
            rows.append(sorted(sorted(range(size), key=lambda j: (-values[j], j))[:count]))
        rows = torch.tensor(rows)
        x = torch.stack([x[c, rows[c]] for c in range(len(x))])
        cum = torch.stack([cum[c, rows[c]] for c in range(len(x))])
        index = torch.stack([index[c, rows[c]] for c in range(len(x))])
    x = torch.cat([siglip_layer(layers[last], x[c : c + 1])[0] for c in range(len(x))])
    return x, index, cum


@torch.no_grad()
def naive_onevision_features(model, pixel_values, image_sizes, batch_num_images, target_num, llm_stage=False):
    """The projected features (W, C_text) float64 each image gives the language model, and its (crop, patch) pairs.
    With the language-model stage a single crop keeps 2K, an anyres image gives every unpadded patch (at least K).

    pixel_values (G, P_max, 3, S, S); image_sizes (G, 2); batch_num_images: images per prompt."""
    core = model.model
    tower = getattr(core.vision_tower, "vision_model", core.vision_tower)
    side = core.config.vision_config.image_size
    per_side = side // core.config.vision_config.patch_size
    layer = core.config.vision_feature_layer
    feature_layer = layer if layer < 0 else layer - (core.config.vision_config.num_hidden_layers + 1)
    projector = copy.deepcopy(core.multi_modal_projector).double()
    alone = [n == 1 for n in batch_num_images for _ in range(n)]
    features, sources = [], []
    for pixels, size, single in zip(pixel_values, image_sizes.tolist(), alone):
        if not single:
            feats, index, _ = _tower(tower, pixels[:1], 2 * target_num if llm_stage else target_num, feature_layer)
            features.append(projector(feats[0]))
            sources.append([(0, int(p)) for p in index[0]])
            continue
        feats, chosen = naive_anyres_image(lambda crops, k: _tower(tower, crops, k, feature_layer), pixels, size,
                                           core.config.image_grid_pinpoints, side, per_side, target_num, llm_stage)
        features.append(projector(feats))
        sources.append(chosen)
    return features, sources
