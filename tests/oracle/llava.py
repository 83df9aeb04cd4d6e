"""Naive, independent oracle for FlowCut on SigLIP towers and LLaVA (see docs/semantics.md).

Built only on oracle/flowcut.py (the per-formula oracle) and the models' weights: float64, eager
attention written out, nothing shared with the `flowcut_kernels` package.

- naive_siglip_encode: the mean-query variant of docs/semantics.md on a HF SigLIP vision tower (no CLS row:
  relay r_h = mean over the image's S tokens of q_h, layer score I = A * rho, T = target_num).
- naive_llava_features: the features a LLaVA model's projector must receive (the feature layer's raw output
  for the kept patches, CLS row dropped for a CLIP tower) and their projection.
- naive_llava_embeds: the language model's input embeddings with those projected features in place of the
  image placeholders, so that a stock (unpatched) model run on them is an independent end-to-end reference.
"""
import copy

import torch

from oracle.flowcut import (
    eager_clip_layer,
    naive_encode,
    naive_flow_scores,
    naive_prune_count,
    naive_select_gather,
)


def find_siglip_tower(model):
    """The module holding `embeddings`, `encoder` and `post_layernorm` (the model itself or .vision_model)."""
    for m in (model, getattr(model, "vision_model", None)):
        if m is not None and all(hasattr(m, a) for a in ("embeddings", "encoder", "post_layernorm")):
            return m
    raise ValueError("no SigLIP vision tower found")


@torch.no_grad()
def naive_siglip_encode(vision_model, pixel_values, target_num, feature_layer=-1, compute_dtype=torch.float64):
    """FlowCut (mean-query variant) on a SigLIP vision tower.

    pixel_values (B,3,H,W). Returns features (B,target_num,C) in compute_dtype (layer F's raw output, no
    post-layernorm), keep_indices (B,target_num) int64 ascending in 0..N0-1, tokens_per_layer (len F+1).
    """
    tower = find_siglip_tower(vision_model)
    layers = tower.encoder.layers
    L = len(layers)
    Fl = L + feature_layer
    T = target_num
    embeddings = copy.deepcopy(tower.embeddings).to(compute_dtype)
    x = embeddings(pixel_values.to(compute_dtype))  # no CLS row, no pre-layernorm
    B, S, C = x.shape
    index_map = torch.arange(S, dtype=torch.int64).repeat(B, 1)
    cum = None
    tokens_per_layer = []
    for l in range(Fl):
        layer = copy.deepcopy(layers[l]).to(compute_dtype)
        S = x.shape[1]
        tokens_per_layer.append(S)
        x, q, k, v, _, scale = eager_clip_layer(layer, x)   # same layer structure as CLIP's
        rpl = Fl - l - 1
        if S > T:
            q_relay = q.mean(dim=2)                          # (B,H,D): mean over the S tokens
            cum, hn, _ = naive_flow_scores(q_relay, k, v, cum, scale, has_cls=False)
            if rpl % 2 == 0:
                if rpl == 0:
                    keep = T
                else:
                    keep = max(S - naive_prune_count(hn, S, T, rpl), T)
                x, cum, index_map = naive_select_gather(x, cum, index_map, keep, has_cls=False)
    layer = copy.deepcopy(layers[Fl]).to(compute_dtype)
    tokens_per_layer.append(x.shape[1])
    x = eager_clip_layer(layer, x)[0]
    return x, index_map, tokens_per_layer


@torch.no_grad()
def naive_llava_features(llava, pixel_values, target_num):
    """What a FlowCut LLaVA feeds its projector, and the projection.

    Each image is pruned on its own (docs/semantics.md's schedule with a batch of one image), so that a prompt's result
    does not depend on the other prompts of its batch.
    llava: LlavaForConditionalGeneration (CLIP or SigLIP tower, int vision_feature_layer).
    Returns features (B,K,C_vision) float64, projected (B,K,C_text) float64, keep_indices (B,K),
    tokens_per_layer (one list per image).
    """
    core = llava.model
    tower = core.vision_tower
    num_layers = tower.config.num_hidden_layers
    layer = core.config.vision_feature_layer
    feature_layer = layer if layer < 0 else layer - (num_layers + 1)   # hidden_states[k] = output of layer k-1
    encode_one = naive_encode if tower.config.model_type == "clip_vision_model" else naive_siglip_encode
    runs = [encode_one(tower, pixel_values[b:b + 1], target_num, feature_layer) for b in range(len(pixel_values))]
    features = torch.cat([run[0] for run in runs])
    keep = torch.cat([run[1] for run in runs])
    tokens = [run[2] for run in runs]
    projector = copy.deepcopy(core.multi_modal_projector).double()
    return features, projector(features), keep, tokens


@torch.no_grad()
def naive_llava_embeds(llava, input_ids, projected):
    """inputs_embeds (B,seq,C_text) in the model's dtype: token embeddings, image placeholders replaced in order by
    the rows of `projected` (B_images,K,C_text)."""
    embeds = llava.get_input_embeddings()(input_ids).clone()
    rows = projected.reshape(-1, projected.shape[-1]).to(embeds.dtype)
    positions = (input_ids == llava.config.image_token_id).nonzero().tolist()
    assert len(positions) == rows.shape[0], (len(positions), rows.shape)
    for n, (b, s) in enumerate(positions):
        embeds[b, s] = rows[n]
    return embeds
