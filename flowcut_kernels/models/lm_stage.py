"""FlowCut's language-model stage: a second, text-guided prune inside a Llama-family decoder, during prefill.

A family patch (``llava.py``, ``qwen2_vl.py``) hands :func:`prefill` one prompt batch in two layouts:

- **short** (B, L): the prompt as ``generate`` sees it, K = ``target_num`` placeholders per image;
- **long** (B, L_long): the same rows with each image's K placeholders replaced by its W tower-stage features (2K for
  LLaVA-1.5; W ≥ K may differ between images) (:func:`expand`; rows left-padded to a common length, the extra padding
  masked).

Decoder layers 0 … ℓp (ℓp = :data:`PRUNE_LAYER` = 1) run on the long layout, positions counted from its mask (or
the family's own, e.g. Qwen2-VL's (3, B, L_long) M-RoPE positions, which go to the rotary embedding only). At
layer ℓp the relay — the last position, the prompt's last token under left padding — scores each image's W tokens
with that layer's own q, k, v after RoPE (``ops.text_guided_scores``), and each image's K best tokens (ascending)
take its placeholders' places: the later layers run on the short layout, with its mask and positions (LLaVA: counted
from its mask; M-RoPE: each token keeps its long position).

The cache ends with every layer at the short length L, so decode steps run the stock model on it: layers 0 … ℓp keep
the k/v rows of the tokens that stay (their keys keep the rotary phase of their long positions), the later layers
cache what they computed on the short layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..checks import require
from . import seams
from .attention import capturing

#: The decoder layer (0-based) whose q, k, v score the visual tokens; the layers after it run without the dropped ones.
PRUNE_LAYER = 1
#: The ops the stage runs.
STAGE_OPS = ("text_guided_scores", "topk_select")


def check_decoder(text_model: nn.Module, backend: str) -> None:
    """``text_model`` must be a decoder the stage can run: Llama-family layers (a ``self_attn`` that calls the
    attention interface, full attention), a ``rotary_emb`` and a final ``norm``, at least ``PRUNE_LAYER + 1`` layers;
    and ``backend`` must have the stage's ops (:data:`STAGE_OPS`) for its device and dtype."""
    config = getattr(text_model, "config", None)
    layers = getattr(text_model, "layers", None)
    supported = (
        getattr(text_model, "_supports_attention_backend", False)
        and hasattr(text_model, "rotary_emb")
        and hasattr(text_model, "norm")
        and isinstance(layers, nn.ModuleList)
        and len(layers) > PRUNE_LAYER
        and all(hasattr(layer, "self_attn") for layer in layers)
        and not getattr(config, "sliding_window", None)
        and set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"}
    )
    require(
        supported,
        f"llm_stage=True needs a Llama-family language model (full-attention decoder layers whose self_attn uses "
        f"transformers' attention interface, a rotary_emb, at least {PRUNE_LAYER + 1} layers); this model's is a "
        f"{type(text_model).__name__}: leave llm_stage unset (tower stage only)",
    )
    ops.resolve_backend(backend, text_model.device, text_model.dtype, STAGE_OPS)


def mask_positions(mask: Tensor) -> Tensor:
    """(B, L) attention mask → (B, L) positions: each row's tokens numbered 0, 1, … from its first real one."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Layout:
    """A batch in the stage's long layout, and where its short layout's tokens come from (:func:`expand`).

    embeds: (B, L_long, C) input embeddings; mask: (B, L_long) attention mask, 0 on padding.
    rows: (B, L) the long row of each short token (a placeholder's is replaced by a kept token's at the prune).
    placeholders: (B, L) bool, the short layout's image placeholders.
    segments: one (b, start, end) per image, in order: its W tokens are rows start … end − 1 of sequence b.
    """

    embeds: Tensor
    mask: Tensor
    rows: Tensor
    placeholders: Tensor
    segments: list[tuple[int, int, int]]


def expand(embeds: Tensor, mask: Tensor, placeholders: Tensor, features, counts=None) -> Layout:
    """The long layout of a short batch: embeds (B, L, C), mask (B, L), placeholders (B, L) bool (G·K of them: K
    consecutive per image, images in row-major order; or ``counts[g]`` for image g) with features (G, W, C), or G
    tensors (W_g, C) of any widths.
    Each image's first placeholder becomes its W_g feature rows, its other placeholders and the padding nothing; rows
    are left-padded to the longest. A short padding token maps to the next real token's row (its copy stays masked)."""
    batch, length = placeholders.shape
    images = len(features)
    widths = torch.tensor([len(f) for f in features], device=embeds.device)
    flat = placeholders.flatten().nonzero().squeeze(1)  # flat indices, image by image
    counts = [len(flat) // images] * images if counts is None else list(counts)
    spots = [(s[0], s[-1]) for s in flat.split(counts)]
    first, last = torch.stack([f for f, _ in spots]), torch.stack([e for _, e in spots])
    per_image = torch.tensor(counts, device=flat.device)
    require(
        bool(((last - first == per_image - 1) & (first // length == last // length)).all()),
        f"each image's {counts[0]} placeholder tokens must be consecutive and in one prompt, as the processor writes "
        f"them: write each <image> as {counts[0]} image tokens in a row",
    )
    text = ~placeholders & mask.bool()
    repeats = text.long()
    repeats.view(-1)[first] = widths
    end = repeats.cumsum(1)
    end += (end[:, -1].max() - end[:, -1])[:, None]  # left padding to the longest row
    start = end - repeats
    long_embeds = embeds.new_zeros(batch, int(end[:, -1].max()), embeds.shape[2])
    long_mask = mask.new_zeros(long_embeds.shape[:2])
    sequence = torch.arange(batch, device=embeds.device)[:, None].expand(-1, length)
    long_embeds[sequence[text], start[text]] = embeds[text]
    long_mask[sequence[text], start[text]] = 1
    image_rows, image_starts = first // length, start.view(-1)[first]
    segments = [(b, s, s + w) for b, s, w in zip(image_rows.tolist(), image_starts.tolist(), widths.tolist())]
    slots = torch.cat([torch.arange(s, e, device=embeds.device) for _, s, e in segments])
    long_embeds[image_rows.repeat_interleave(widths), slots] = torch.cat(list(features))
    long_mask[image_rows.repeat_interleave(widths), slots] = 1
    return Layout(long_embeds, long_mask, start, placeholders, segments)


def _take(x: Tensor, rows: Tensor) -> Tensor:
    """Per-head rows: x (B, H, L_long, D), rows (B, L) → (B, H, L, D)."""
    return x.gather(2, rows[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def prefill(
    text_model: nn.Module,
    layout: Layout,
    keep,
    *,
    positions: Tensor | None,
    mask: Tensor | None,
    long_positions: Tensor | None = None,
    cache=None,
    use_cache: bool | None = None,
    backend: str = "auto",
    output_hidden_states: bool | None = None,
    deepstack: list[Tensor] | None = None,
    **kwargs,
):
    """Run ``text_model``'s decoder layers and final norm on one prompt batch with the stage (module docstring).

    Args:
        layout: the batch's long layout (:func:`expand`).
        keep: tokens each image keeps at layer ``PRUNE_LAYER`` (K), or one count per image.
        positions: (B, L) position ids of the short layout (as ``generate`` computes them from ``mask``), or None:
            each short token keeps its long position (M-RoPE models).
        long_positions: position ids of the long layout, (B, L_long) or (3, B, L_long) (M-RoPE, passed to the
            decoder's rotary embedding only); default: counted from its mask.
        mask: (B, L) the short layout's attention mask, or None (no padding).
        cache: an empty ``Cache`` to fill to length L in every layer, or None: a new ``DynamicCache``
            when ``use_cache`` (default: the text model's ``config.use_cache``).
        output_hidden_states: default: the text model's config.
        deepstack: Qwen3-VL's DeepStack features, one (Σ W_g, C) tensor per layer i = 0, 1, …, the images' rows in
            the layout's segment order: added to decoder layer i's output at the images' tokens (its W_g long rows
            through ``PRUNE_LAYER``, then the kept tokens' own rows at their placeholders), as the stock text model
            adds them at its visual positions.
        kwargs: passed to every decoder layer, as the text model's own forward does.

    Returns:
        The text model's output (:func:`.seams.text_output`): last_hidden_state (B, L, C), the cache (None without
        ``use_cache``), and with ``output_hidden_states``
        the embeddings and each layer's output (long through layer ``PRUNE_LAYER``, short after it; the last normed).
    """
    config = text_model.config
    use_cache = config.use_cache if use_cache is None else use_cache
    cache = (cache if cache is not None else seams.new_cache(config)) if use_cache else None
    require(
        cache is None or cache.get_seq_length() == 0,
        f"the language-model stage prunes a prompt's images during its prefill, but the cache already holds "
        f"{0 if cache is None else cache.get_seq_length()} tokens: start from an empty cache (generate() does)",
    )
    if long_positions is None:
        long_positions = mask_positions(layout.mask)
    hidden = layout.embeds
    text_positions = long_positions if long_positions.dim() == 2 else None  # M-RoPE ones go to the rotary only
    long_mask = seams.causal_mask(config, hidden, layout.mask, text_positions)  # before capturing selects "flowcut"
    rotary = text_model.rotary_emb(hidden, long_positions)
    deepstack = [layer.to(hidden.device, hidden.dtype) for layer in deepstack or []]
    images = (  # (sequence, row) of every image token of the long layout
        torch.cat([torch.full((end - start,), b) for b, start, end in layout.segments]).to(hidden.device),
        torch.cat([torch.arange(start, end) for _, start, end in layout.segments]).to(hidden.device),
    ) if deepstack else None
    states, seen = [hidden], []
    with capturing(config) as run:
        for i, layer in enumerate(text_model.layers[: PRUNE_LAYER + 1]):
            run.watch = layer.self_attn
            hidden = seams.layer_hidden(layer(
                hidden, attention_mask=long_mask, position_ids=text_positions, position_embeddings=rotary, **kwargs
            ))
            seen.append(run.seen)
            states.append(hidden)
            if i < len(deepstack):
                hidden = hidden.index_put(images, deepstack[i], accumulate=True)

    q, k, v, scale = seen[-1]
    scores = ops.text_guided_scores(q[:, :, -1], v[:, :, -1], k, v, layout.segments, scale=scale, backend=backend)
    widths = [end - start for _, start, end in layout.segments]
    cu_seqlens = torch.tensor([0, *widths], device=scores.device).cumsum(0)
    kept = ops.topk_select(scores, keep, cu_seqlens=cu_seqlens, backend=backend).kept  # (G·K,) packed, ascending
    rows = layout.rows.clone()
    starts = rows.new_tensor([start for _, start, _ in layout.segments]) - cu_seqlens[:-1]
    rows[layout.placeholders] = starts.repeat_interleave(torch.as_tensor(keep, device=rows.device)) + kept
    hidden = ops.gather_rows(hidden, rows)
    if len(deepstack) > PRUNE_LAYER + 1:  # the kept tokens' own rows, at the placeholders (row-major: image order)
        deepstack = [None] * (PRUNE_LAYER + 1) + [layer[kept] for layer in deepstack[PRUNE_LAYER + 1 :]]
        images = layout.placeholders.nonzero(as_tuple=True)
    if cache is not None:
        for i, (_, key, value, _) in enumerate(seen):
            cache.update(_take(key, rows), _take(value, rows), i)

    if positions is None:
        positions = long_positions.gather(-1, rows.expand(*long_positions.shape[:-1], -1))
    text_positions = positions if positions.dim() == 2 else None
    short_mask = seams.causal_mask(config, hidden, mask, text_positions)
    rotary = text_model.rotary_emb(hidden, positions)
    for i, layer in enumerate(text_model.layers[PRUNE_LAYER + 1 :], start=PRUNE_LAYER + 1):
        hidden = seams.layer_hidden(layer(
            hidden,
            attention_mask=short_mask,
            position_ids=text_positions,
            use_cache=cache is not None,
            **seams.cache_arg(cache),
            position_embeddings=rotary,
            **kwargs,
        ))
        states.append(hidden)
        if i < len(deepstack):
            hidden = hidden.index_put(images, deepstack[i], accumulate=True)
    hidden = text_model.norm(hidden)
    states[-1] = hidden
    if output_hidden_states is None:
        output_hidden_states = config.output_hidden_states
    return seams.text_output(hidden, cache, tuple(states) if output_hidden_states else None)
