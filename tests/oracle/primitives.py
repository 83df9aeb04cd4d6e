"""Naive float64 oracle of the generic primitives (docs/semantics.md; flowcut_kernels.ops.primitives), written
per image and per head with Python loops, sharing nothing with the package."""

import math

import torch


def naive_attention_scores(q, k, scale, key_mask=None, span=None):
    """q (B,Hq,Q,D), k (B,Hkv,S,D) -> (B, span) float64 head- and row-mean softmax attention."""
    q, k = q.double(), k.double()
    B, Hq, Q, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    start, end = span or (0, S)
    out = torch.zeros(B, S, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh = k[b, h // (Hq // Hkv)]
            for r in range(Q):
                logits = [scale * float(q[b, h, r] @ kh[j]) for j in range(S)]
                allowed = [key_mask is None or bool(key_mask[b, j]) for j in range(S)]
                top = max(x for x, a in zip(logits, allowed) if a)
                e = [math.exp(x - top) if a else 0.0 for x, a in zip(logits, allowed)]
                z = sum(e)
                for j in range(S):
                    out[b, j] += e[j] / z / (Hq * Q)
    return out[:, start:end]


def naive_text_guided_scores(q_relay, v_relay, k, v, segments, scale):
    """Packed float64 (rel + sem)·ρ of each (b, start, end) segment (GQA: query head h reads kv head h // g)."""
    q_relay, v_relay, k, v = (x.double() for x in (q_relay, v_relay, k, v))
    Hq, Hkv = q_relay.shape[1], k.shape[1]
    g = Hq // Hkv
    out = []
    for b, start, end in segments:
        n = end - start
        rel = torch.zeros(n, dtype=torch.float64)
        sem = torch.zeros(n, dtype=torch.float64)
        mean_v = torch.zeros(n, k.shape[-1], dtype=torch.float64)
        for h in range(Hq):
            kv = h // g
            rel += torch.softmax(scale * (k[b, kv, start:end] @ q_relay[b, h]), dim=0) / Hq
            sem += torch.softmax(scale * (v[b, kv, start:end] @ v_relay[b, kv]), dim=0) / Hq
            mean_v += v[b, kv, start:end] / Hq
        out.append((rel + sem) * mean_v.abs().sum(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def naive_topk_select(scores, lengths, keep, protect=None):
    """Per image: the keep[b] best unprotected rows (ties: lower index, NaN first) plus protected rows.
    Returns kept and dropped lists of global row indices, image by image, ascending."""
    kept, dropped, start = [], [], 0
    for b, n in enumerate(lengths):
        rows = list(range(start, start + n))
        free = [r for r in rows if protect is None or not bool(protect[r])]

        def rank(r):
            x = float(scores[r])
            return (0, 0.0, r) if math.isnan(x) else (1, -x, r)

        chosen = set(sorted(free, key=rank)[: keep[b]])
        kept += [r for r in rows if r in chosen or (protect is not None and bool(protect[r]))]
        dropped += [r for r in rows if r not in kept]
        start += n
    return kept, dropped


def nearest_kept(keys, kept, dropped):
    """For each dropped row (in order), the position in ``kept`` of its most similar kept row: the largest cosine of
    the keys (each normalised first, its norm taken as at least 1e-12), ties to the lower position; a NaN similarity
    ranks above every number (the first NaN wins)."""
    keys = keys.double()

    def unit(r):
        x = keys[r]
        return x / max(math.sqrt(float(x @ x)), 1e-12)

    targets = []
    for j in dropped:
        best, best_sim = None, None
        for t, i in enumerate(kept):
            sim = float(unit(j) @ unit(i))
            if best is None or (not math.isnan(best_sim) and (math.isnan(sim) or sim > best_sim)):
                best, best_sim = t, sim
        targets.append(best)
    return targets


def naive_merge_nearest(hidden, keys, kept_groups, dropped_groups, sizes=None):
    """kept_groups / dropped_groups: per image, lists of row indices. Returns merged (K, C), sizes (K,) float64:
    each dropped row joins its :func:`nearest_kept` row, size-weighted."""
    hidden = hidden.double()
    size = [1.0] * hidden.shape[0] if sizes is None else [float(s) for s in sizes]
    merged, mass = [], []
    for kept, dropped in zip(kept_groups, dropped_groups):
        totals = [hidden[i] * size[i] for i in kept]
        weights = [size[i] for i in kept]
        for j, best in zip(dropped, nearest_kept(keys, kept, dropped)):
            totals[best] = totals[best] + hidden[j] * size[j]
            weights[best] += size[j]
        merged += [t / w for t, w in zip(totals, weights)]
        mass += weights
    merged = torch.stack(merged) if merged else hidden.new_zeros(0, hidden.shape[1])
    return merged, torch.tensor(mass, dtype=torch.float64)
