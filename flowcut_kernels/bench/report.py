"""Output of :mod:`flowcut_kernels.bench`: the stdout table, markdown, JSON rows and the plot.

Every row is a dict with at least ``method, preset, batch, target, tokens_out, median_ms, p20_ms, p80_ms,
peak_mem_mb, device, versions``; model presets add ``speedup_vs_unpruned`` and ``speedup_vs_original``
(None where that method was not measured), kernel presets ``median_us``, ``gbps``, ``bw_share`` and
``speedup_vs_torch``.
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
    lines = [["method", "batch", "target", "tokens", "median ms", "p20 ms", "p80 ms", "peak MiB",
              "vs unpruned", "vs original"]]
    for r in rows:
        lines.append([
            r["method"], str(r["batch"]), str(r["target"]), str(r["tokens_out"]), f"{r['median_ms']:.1f}",
            f"{r['p20_ms']:.1f}", f"{r['p80_ms']:.1f}", _fmt(r["peak_mem_mb"], ".0f"),
            _ratio(r.get("speedup_vs_unpruned")), _ratio(r.get("speedup_vs_original")),
        ])
    return lines


def kernel_table(rows: list[dict]) -> list[list[str]]:
    """Header + one line per row of a kernel preset."""
    lines = [["backend", "case", "B", "S", "H", "D", "keep", "median us", "p20 us", "p80 us", "MB moved",
              "GB/s", "copy share", "vs torch"]]
    for r in rows:
        lines.append([
            r["method"], r["case"], str(r["batch"]), str(r["seq"]), str(r["heads"]), str(r["head_dim"]),
            str(r["keep"]), f"{r['median_us']:.1f}", f"{r['p20_us']:.1f}", f"{r['p80_us']:.1f}",
            f"{r['bytes'] / 1e6:.2f}", f"{r['gbps']:.1f}", f"{r['bw_share'] * 100:.1f}%",
            _ratio(r.get("speedup_vs_torch")),
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


def write_plot(path: str, rows: list[dict], title: str) -> None:
    """A PNG: model presets — speed-up over unpruned against batch and against target, one line per method
    (and target / batch); kernel presets — speed-up over the torch backend and share of the copy bandwidth
    per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    if rows and "gbps" in rows[0]:
        cases = sorted({(r["case"], r["batch"]) for r in rows}, key=lambda c: (c[0], c[1]))
        labels = [f"{c} B={b}" for c, b in cases]
        backends = sorted({r["method"] for r in rows})
        width = 0.8 / max(len(backends), 1)
        for j, method in enumerate(backends):
            by_case = {(r["case"], r["batch"]): r for r in rows if r["method"] == method}
            xs = [i + j * width for i in range(len(cases))]
            axes[0].bar(xs, [(by_case[c].get("speedup_vs_torch") or 0) if c in by_case else 0 for c in cases],
                        width, label=method)
            axes[1].bar(xs, [100 * by_case[c]["bw_share"] if c in by_case else 0 for c in cases], width,
                        label=method)
        for ax, ylabel in zip(axes, ("speed-up over torch (x)", "share of copy bandwidth (%)")):
            ax.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(cases))], labels, rotation=20)
            ax.set_ylabel(ylabel)
            ax.legend()
    else:
        measured = [r for r in rows if r.get("speedup_vs_unpruned") is not None and r["method"] != "unpruned"]
        for ax, x_key, group_key in ((axes[0], "batch", "target"), (axes[1], "target", "batch")):
            for key in sorted({(r["method"], r[group_key]) for r in measured}):
                points = sorted((r[x_key], r["speedup_vs_unpruned"]) for r in measured
                                if (r["method"], r[group_key]) == key)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                        label=f"{key[0]}, {group_key} {key[1]}")
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xlabel(x_key)
            ax.set_ylabel("speed-up over unpruned (x)")
            ax.legend(fontsize=7)
        for ax, key in ((axes[0], "batch"), (axes[1], "target")):
            values = sorted({r[key] for r in measured})
            if values:
                ax.set_xticks(values, [str(v) for v in values])
        if len({r["batch"] for r in measured}) > 2:
            axes[0].set_xscale("log", base=2)
            axes[0].set_xticks(sorted({r["batch"] for r in measured}),
                               [str(v) for v in sorted({r["batch"] for r in measured})])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parent_writable(path: str) -> bool:
    return os.access(os.path.dirname(os.path.abspath(path)) or ".", os.W_OK)
