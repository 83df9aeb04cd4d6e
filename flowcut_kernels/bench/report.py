"""Text output of :mod:`flowcut_kernels.bench`: the stdout table, markdown and JSON rows (the plot: :mod:`.plots`).

Every row is a dict with at least ``method, preset`` (the checkpoint of a ``--model`` run), ``batch, target,
tokens_out, median_ms, p20_ms, p80_ms, peak_mem_mb, device, versions``; model runs add ``speedup_vs_unpruned``
and ``speedup_vs_original`` (None where that method was not measured), the raw ``times_ms``, ``images_per_s``
(batch / median time), ``measured`` (what the time covers: ``ttft`` — the prefill and one decode step —,
``prefill`` or ``vision``) and ``settings`` (the method's own: target, backend, schedule; VisionZip's dominant and
contextual counts; FastV's layer; the downsampled grid and image size) (``per-image-*`` rows also
``speedup_vs_serial``), kernel presets ``median_us``, ``gbps``, ``bw_share``, ``speedup_vs_torch`` and,
for the primitives, ``op``, ``variant`` and ``speedup_vs_composition``.
"""

from __future__ import annotations

import json
import os


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def model_table(rows: list[dict]) -> list[list[str]]:
    """Header + one line per row of a model preset."""
    serial = any("speedup_vs_serial" in r for r in rows)  # per-image rows: one pass vs B serial passes
    flops = any("flop_limit_vs_unpruned" in r for r in rows)  # a scenario with a FLOP model
    time = "TTFT ms" if rows and rows[0].get("measured") == "ttft" else "median ms"
    lines = [["method", "batch", "target", "tokens", time, "p20 ms", "p80 ms", "images/s", "peak MiB",
              "vs unpruned", "vs original"] + (["vs serial"] if serial else [])
             + (["GFLOP", "FLOP limit", "% of limit"] if flops else [])]
    for r in rows:
        limit = r.get("flop_limit_vs_unpruned")
        share = r["speedup_vs_unpruned"] / limit if limit and r.get("speedup_vs_unpruned") else None
        lines.append([
            r["method"], str(r["batch"]), str(r["target"]), str(r["tokens_out"]), f"{r['median_ms']:.1f}",
            f"{r['p20_ms']:.1f}", f"{r['p80_ms']:.1f}", f"{r['images_per_s']:.1f}", _fmt(r["peak_mem_mb"], ".0f"),
            _ratio(r.get("speedup_vs_unpruned")), _ratio(r.get("speedup_vs_original")),
        ] + ([_ratio(r.get("speedup_vs_serial"))] if serial else [])
          + ([_fmt(r.get("gflops"), ".0f"), _ratio(limit), _fmt(share and 100 * share, ".0f")] if flops else []))
    return lines


def kernel_table(rows: list[dict]) -> list[list[str]]:
    """Header + one line per row of a kernel preset."""
    lines = [["backend", "case", "B", "S", "H", "D", "keep", "median us", "p20 us", "p80 us", "MB moved",
              "GB/s", "copy share", "vs torch", "vs plain"]]
    for r in rows:
        heads = str(r["heads"]) if r.get("kv_heads", r["heads"]) == r["heads"] else f"{r['heads']}/{r['kv_heads']}"
        lines.append([
            r["method"], r["case"], str(r["batch"]), str(r["seq"]), heads, str(r["head_dim"]),
            str(r["keep"]), f"{r['median_us']:.1f}", f"{r['p20_us']:.1f}", f"{r['p80_us']:.1f}",
            f"{r['bytes'] / 1e6:.2f}", f"{r['gbps']:.1f}", f"{r['bw_share'] * 100:.1f}%",
            _ratio(r.get("speedup_vs_torch")), _ratio(r.get("speedup_vs_composition")),
        ])
    return lines


def as_text(lines: list[list[str]]) -> str:
    """Aligned columns: the first left-aligned, the rest right-aligned."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    )


def as_markdown(lines: list[list[str]]) -> str:
    head, *body = lines
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(out)


def write_json(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)
        f.write("\n")


def write_markdown(path: str, title: str, header: list[str], lines: list[list[str]], notes: list[str]) -> None:
    """A results file: title, the run's facts (device, versions, date, command), the table, then notes."""
    text = [f"# {title}", "", *[f"- {h}" for h in header], "", as_markdown(lines), ""]
    if notes:
        text += [*notes, ""]
    with open(path, "w") as f:
        f.write("\n".join(text))


def parent_writable(path: str) -> bool:
    return os.access(os.path.dirname(os.path.abspath(path)) or ".", os.W_OK)
