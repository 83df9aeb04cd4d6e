"""The PNG of :mod:`flowcut_kernels.bench` (``--plot``), drawn to be read at a glance.

Every method looks the same in every plot (:data:`STYLES`: a colour and a marker; the baselines grey and
red, the FlowCut backends blues and purple, the other methods — VisionZip, FastV, downsampling — green, orange and
pink). The title names the run, the device, the dtype and the date.

- A model run at one (batch, target): horizontal bars of the median time per method, whiskers from the
  20th to the 80th percentile, and the median and the speed-up over ``unpruned`` written at each bar (with
  the 20th–80th percentile of the per-round ratios, see below).
- A model run sweeping batches or targets: the swept value on x (the batch when several, else the target),
  one column per value of the other. Top: the median time with its p20–p80 band. Bottom: the speed-up over
  ``unpruned`` (×), its band the 20th–80th percentile of the per-round ratios (the calls are interleaved,
  so round i of every method ran under the same load), and a dashed line at 1.
- A kernel preset: per case, bars of each backend's speed-up over its reference — ``torch`` for the prune step,
  the plain-PyTorch composition for the primitives (whiskers: its p20–p80 time; the median µs written) — and of
  its share of the copy bandwidth (GB/s written).
"""

from __future__ import annotations

from .timing import quantile

#: method -> (colour, marker), the same in every plot; other methods get :data:`OTHER`.
STYLES = {
    "unpruned": ("#7f7f7f", "s"),
    "original": ("#d62728", "^"),
    "flowcut-torch": ("#6baed6", "o"),
    "flowcut-native": ("#08519c", "D"),
    "flowcut-triton": ("#6a3d9a", "P"),
    "visionzip": ("#2ca02c", "v"),
    "fastv": ("#ff7f0e", "<"),
    "downsample": ("#e377c2", ">"),
}
OTHER = ("#8c564b", "X")
#: Other method families (``<family>-<backend>``): a colour per family and backend; the marker is the backend's.
FAMILY_COLOURS = {
    "per-image": {"torch": "#74c476", "native": "#006d2c", "triton": "#31a354"},
    "serial": {"torch": "#fdae6b", "native": "#d94801", "triton": "#a63603"},
    "stage": {"torch": "#c994c7", "native": "#980043", "triton": "#dd1c77"},
    "composition": {"": "#7f7f7f"},
}
BAND_ALPHA = 0.2


def style(method: str) -> tuple[str, str]:
    """(colour, marker) of ``method``."""
    if method in STYLES:
        return STYLES[method]
    for family, colours in FAMILY_COLOURS.items():
        if method.startswith(family + "-"):
            backend = method.removeprefix(family + "-")
            if backend in colours:
                return colours[backend], STYLES.get(f"flowcut-{backend}", OTHER)[1]
    if method == "composition":
        return "#7f7f7f", "s"
    return OTHER


def _ordered(methods) -> list[str]:
    """Methods in plotting order: unpruned, original, the FlowCut backends as they came, then the other families
    (serial before per-image, so each per-image bar sits under the serial one it is compared with)."""
    rank = {"unpruned": 0, "original": 1}
    families = {"serial": 3, "per-image": 3, "stage": 4}

    def key(m):
        if m in rank:
            return rank[m], "", 0
        for head, r in families.items():
            if m.startswith(head + "-"):
                return r, m.removeprefix(head + "-"), int(head != "serial")
        return 2, "", 0  # the FlowCut backends, as they came (the sort is stable)

    return sorted(dict.fromkeys(methods), key=key)


def _ms(value: float) -> str:
    return f"{value:.0f} ms" if value >= 100 else f"{value:.1f} ms" if value >= 10 else f"{value:.2f} ms"


def figure(rows: list[dict], title: str, subtitle: str):
    """The matplotlib figure for ``rows`` (a model or a kernel run, see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "gbps" in rows[0]:
        fig = _kernels(plt, rows)
    elif len({(r["batch"], r["target"]) for r in rows}) == 1:
        fig = _bars(plt, rows)
    else:
        fig = _sweep(plt, rows)
    fig.suptitle(f"{title}\n{subtitle}", fontsize=11)
    return fig


def write_plot(path: str, rows: list[dict], title: str, subtitle: str) -> None:
    """Write :func:`figure` as a PNG to ``path``."""
    fig = figure(rows, title, subtitle)
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _bars(plt, rows: list[dict]):
    """One (batch, target): a bar per method, median time with p20–p80 whiskers, the speed-up written."""
    by_method = {r["method"]: r for r in rows}
    methods = _ordered(by_method)
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.75 * len(methods)), layout="constrained")
    medians = [by_method[m]["median_ms"] for m in methods]
    whiskers = [[by_method[m]["median_ms"] - by_method[m]["p20_ms"] for m in methods],
                [by_method[m]["p80_ms"] - by_method[m]["median_ms"] for m in methods]]
    ax.barh(range(len(methods)), medians, xerr=whiskers, color=[style(m)[0] for m in methods], height=0.6,
            capsize=4, error_kw=dict(ecolor="black", elinewidth=1))
    right = max(by_method[m]["p80_ms"] for m in methods)
    for i, method in enumerate(methods):
        row = by_method[method]
        speedup = row.get("speedup_vs_unpruned")
        text = _ms(row["median_ms"])
        if method == "unpruned":
            text += "  (the baseline)"
        elif speedup is not None:
            low, high = _ratio_band(row, by_method["unpruned"])
            text += f"  ·  {speedup:.2f}× vs unpruned (p20–p80 {low:.2f}–{high:.2f}×)"
        serial = method.replace("per-image-", "serial-", 1)
        if row.get("speedup_vs_serial") is not None and serial in by_method:
            low, high = _ratio_band(row, by_method[serial])
            text += f"  ·  {row['speedup_vs_serial']:.2f}× vs {serial} (p20–p80 {low:.2f}–{high:.2f}×)"
        ax.text(row["p80_ms"] + 0.015 * right, i, text, va="center", fontsize=10)
    ax.set_yticks(range(len(methods)), [f"{m}\n{by_method[m]['tokens_out']} tokens out" for m in methods])
    ax.invert_yaxis()
    ax.set_xlim(0, right * (2.4 if any("speedup_vs_serial" in r for r in rows) else 1.8))
    what = "time to first token" if rows[0].get("measured") == "ttft" else "time per call"
    ax.set_xlabel(f"median {what} (ms); whiskers: 20th–80th percentile")
    first = rows[0]
    ax.set_title(f"batch {first['batch']}, target {first['target']}; {len(first['times_ms'])} timed calls per "
                 "method, interleaved", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


def _ratio_band(row: dict, base: dict) -> tuple[float, float]:
    """20th and 80th percentile of base / row time over the interleaved rounds."""
    ratios = [b / t for b, t in zip(base["times_ms"], row["times_ms"])]
    return quantile(ratios, 0.2), quantile(ratios, 0.8)


def _sweep(plt, rows: list[dict]):
    """Several batches or targets: time (top) and speed-up vs unpruned (bottom) against the swept value."""
    x_key, column_key = ("batch", "target") if len({r["batch"] for r in rows}) > 1 else ("target", "batch")
    columns = sorted({r[column_key] for r in rows})
    methods = _ordered(r["method"] for r in rows)
    has_base = "unpruned" in methods
    n_rows = 2 if has_base else 1
    fig, axes = plt.subplots(n_rows, len(columns), figsize=(1.5 + 4.3 * len(columns), 1.2 + 3.3 * n_rows),
                             sharex="col", squeeze=False, layout="constrained")
    for c, column in enumerate(columns):
        cell = [r for r in rows if r[column_key] == column]
        base = {r[x_key]: r for r in cell if r["method"] == "unpruned"}
        for method in methods:
            points = sorted((r for r in cell if r["method"] == method), key=lambda r: r[x_key])
            xs = [r[x_key] for r in points]
            colour, marker = style(method)
            top = axes[0][c]
            top.plot(xs, [r["median_ms"] for r in points], color=colour, marker=marker, label=method)
            top.fill_between(xs, [r["p20_ms"] for r in points], [r["p80_ms"] for r in points], color=colour,
                             alpha=BAND_ALPHA, lw=0)
            if has_base and method != "unpruned":
                bands = [_ratio_band(r, base[r[x_key]]) for r in points]
                axes[1][c].plot(xs, [r["speedup_vs_unpruned"] for r in points], color=colour, marker=marker)
                axes[1][c].fill_between(xs, [b[0] for b in bands], [b[1] for b in bands], color=colour,
                                        alpha=BAND_ALPHA, lw=0)
        axes[0][c].set_title(f"{column_key} {column}", fontsize=10)
        values = sorted({r[x_key] for r in cell})
        for ax in (row[c] for row in axes):
            if x_key == "batch" and len(values) > 2:
                ax.set_xscale("log", base=2)
            ax.set_xticks(values, [str(v) for v in values])
            ax.grid(alpha=0.3)
        if x_key == "batch":
            axes[0][c].set_yscale("log")
        axes[-1][c].set_xlabel(x_key if x_key == "batch" else "target (patches kept)")
        if has_base:
            axes[1][c].axhline(1.0, color=style("unpruned")[0], ls="--", lw=1)
    what = "time to first token" if rows[0].get("measured") == "ttft" else "time per call"
    axes[0][0].set_ylabel(f"median {what} (ms)\nband: p20–p80")
    if has_base:
        axes[1][0].set_ylabel("speed-up vs unpruned (×)\nband: p20–p80 per round")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(methods), frameon=False)
    return fig


def _shape(row: dict) -> str:
    """The shape of a kernel case, as its operation reads it."""
    op = row.get("op", "prune_step")
    if op == "topk_select":
        return f"N={row['seq']}, keep {row['keep']}"
    if op == "merge_nearest":
        return f"N={row['seq']}, C={row['head_dim']}, keep {row['keep']}"
    heads = row["heads"] if row.get("kv_heads", row["heads"]) == row["heads"] else f"{row['heads']}/{row['kv_heads']}"
    queries = f", Q={row['queries']}" if row.get("queries", 1) > 1 else ""
    return f"S={row['seq']}, H={heads}, D={row['head_dim']}{queries}"


def _kernels(plt, rows: list[dict]):
    """Kernel cases: speed-up over torch (whiskers p20–p80, median µs written) and share of the copy bandwidth."""
    cases = list(dict.fromkeys((r["case"], r["batch"]) for r in rows))
    backends = sorted(dict.fromkeys(r["method"] for r in rows),
                      key=lambda m: (m != "composition", m != "flowcut-torch"))
    found = {(r["case"], r["batch"], r["method"]): r for r in rows}
    height = 0.8 / len(backends)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 1.8 + 0.55 * len(cases) * len(backends)), sharey=True,
                                      layout="constrained")
    labelled = set()
    low, high = 1.0, 1.0
    for j, method in enumerate(backends):
        colour = style(method)[0]
        for i, (case, batch) in enumerate(cases):
            row = found.get((case, batch, method))
            if row is None:
                continue
            y = i + (j - (len(backends) - 1) / 2) * height
            reference = found[(case, batch, row.get("ref_method", "flowcut-torch"))]["median_us"]
            speedup = reference / row["median_us"]
            low, high = min(low, reference / row["p80_us"]), max(high, reference / row["p20_us"])
            left.barh(y, speedup, height * 0.9, color=colour, label=None if method in labelled else method,
                      xerr=[[speedup - reference / row["p80_us"]], [reference / row["p20_us"] - speedup]],
                      capsize=3, error_kw=dict(ecolor="black", elinewidth=1))
            labelled.add(method)
            left.text(reference / row["p20_us"], y, f"  {speedup:.2f}×  ({row['median_us']:,.0f} µs)",
                      va="center", fontsize=9)
            share = 100 * row["bw_share"]
            right.barh(y, share, height * 0.9, color=colour)
            right.text(share, y, f"  {share:.0f}%  ({row['gbps']:.1f} GB/s)", va="center", fontsize=9)
    first = {(r["case"], r["batch"]): r for r in rows}
    left.set_yticks(range(len(cases)), [f"{c} B={b}\n{_shape(first[(c, b)])}" for c, b in cases])
    left.invert_yaxis()
    left.axvline(1.0, color="black", lw=0.8, ls="--")
    if high / low > 20:  # speed-ups over orders of magnitude: a log axis keeps the small ones readable
        left.set_xscale("log", base=2)
        left.set_xlim(low / 1.5, high * 6)
    else:
        left.set_xlim(0, left.get_xlim()[1] * 1.45)
    left.set_xlabel("speed-up over the reference (×): torch for the prune step,\nthe plain-PyTorch composition "
                    "for a primitive; whiskers: p20–p80 time")
    right.set_xlim(0, right.get_xlim()[1] * 1.45)
    right.set_xlabel(f"share of the copy bandwidth ({rows[0]['copy_gbps']:.1f} GB/s) (%)")
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False)
    return fig
