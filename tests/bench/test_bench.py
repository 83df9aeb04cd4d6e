"""The benchmark harness (python -m flowcut_kernels.bench) at tiny sizes, and the original-style baseline."""

import io
import json
import re

import pytest
import torch

from flowcut_kernels import bench, encode
from flowcut_kernels.bench.random_models import random_pixels
from flowcut_kernels.bench import kernels as bench_kernels
from flowcut_kernels.bench import plots
from flowcut_kernels.bench import presets as bench_models
from flowcut_kernels.bench import timing as bench_timing
from flowcut_kernels.models.registry import find_tower

REQUIRED = {"method", "preset", "batch", "target", "tokens_out", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb",
            "device", "versions"}
FAST = ["--device", "cpu", "--repeats", "1", "--warmup", "1", "--no-progress"]


def cpu_backends():
    return bench_kernels.measurable_backends("cpu")[0]


@pytest.fixture(scope="module")
def original():
    from flowcut_kernels.bench import original

    return original


def test_encoder_preset_rows(tmp_path, capsys):
    path = tmp_path / "rows.json"
    rows = bench.run(["--preset", "clip-tiny", "--batch", "1", "2", "--target", "8", "12", *FAST,
                       "--json", str(path), "--markdown", str(tmp_path / "rows.md")])
    printed = capsys.readouterr().out
    assert json.loads(path.read_text()) == json.loads(json.dumps(rows))
    methods = ["unpruned", "original"] + [f"{f}-{b}" for f in ("flowcut", "static") for b in cpu_backends()]
    assert len(rows) == 2 * 2 * len(methods)
    for row in rows:
        assert REQUIRED <= set(row)
        assert row["method"] in methods and row["preset"] == "clip-tiny"
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert {"torch", "transformers", "python", "flowcut_kernels"} <= set(row["versions"])
        assert row["speedup_vs_unpruned"] > 0 and row["speedup_vs_original"] > 0
        if row["method"] == "unpruned":
            assert row["tokens_out"] == 64 and row["tokens_per_layer"] == [65] * 6
        else:
            assert row["tokens_out"] == row["target"]
            assert row["tokens_per_layer"][0] == 65 and row["tokens_per_layer"][4] == row["target"] + 1
        if row["method"].startswith("flowcut"):
            assert len(row["tokens_per_layer"]) == 5  # layers 0 … F = 4; layer 5 is not run
            assert row["agreement_with_original"] == 1.0  # float32: the same patches as the original
        if row["method"].startswith("static"):
            assert 0 < row["agreement_with_adaptive"] <= 1
            assert row["tokens_per_layer"] == sorted(row["tokens_per_layer"], reverse=True)
    assert {(r["batch"], r["target"]) for r in rows} == {(1, 8), (1, 12), (2, 8), (2, 12)}
    assert "tokens per layer 65 " in printed and "keeps 100.0% of the patches original keeps" in printed
    assert "of the patches the adaptive schedule keeps" in printed
    markdown = (tmp_path / "rows.md").read_text()
    assert "| method | batch | target |" in markdown and "Versions: " in markdown and "Tokens per layer" in markdown


def test_compiled_rows_keep_what_the_static_encode_keeps():
    rows = bench.run(["--preset", "clip-tiny", "--batch", "2", "--target", "8", "--backends", "torch",
                      "--methods", "flowcut", "static", "compiled", *FAST])
    by_method = {r["method"]: r for r in rows}
    compiled, static = by_method["compiled-torch"], by_method["static-torch"]
    assert compiled["tokens_per_layer"] == static["tokens_per_layer"] and compiled["tokens_out"] == 8
    assert compiled["agreement_with_adaptive"] == static["agreement_with_adaptive"]
    assert compiled["settings"]["compile"] == "fullgraph, mode=None"


def test_llava_preset_prefills_the_language_model():
    rows = bench.run(["--preset", "llava-tiny", "--target", "8", *FAST])
    by_method = {r["method"]: r for r in rows}
    assert by_method["unpruned"]["lm_tokens"] == 12 + 64
    for name, row in by_method.items():
        if name != "unpruned":
            assert row["tokens_out"] == 8 and row["lm_tokens"] == 12 + 8


@pytest.fixture(scope="module")
def sweep_rows():
    """Rows of a clip-tiny run over batches 1, 2 and targets 8, 12 (every method, 3 timed calls each)."""
    return bench.run(["--preset", "clip-tiny", "--batch", "1", "2", "--target", "8", "12", *FAST, "--repeats", "3"])


def methods_in_plot_order(rows):
    return sorted(dict.fromkeys(r["method"] for r in rows), key=lambda m: {"unpruned": 0, "original": 1}.get(m, 2))


def test_plot_is_written_with_device_dtype_and_date(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from flowcut_kernels.bench import cli

    titles = []
    monkeypatch.setattr(cli, "write_plot", lambda path, rows, title, subtitle: titles.append(subtitle))
    bench.run(["--preset", "clip-tiny", *FAST, "--plot", str(tmp_path / "p.png")])
    (subtitle,) = titles
    assert subtitle.startswith("cpu ") and " · float32 · " in subtitle
    assert re.search(r"\d{4}-\d\d-\d\d$", subtitle)
    monkeypatch.undo()
    for preset, extra in (("clip-tiny", ["--batch", "1", "2"]), ("kernels-tiny", [])):
        path = tmp_path / f"{preset}.png"
        bench.run(["--preset", preset, *extra, *FAST, "--plot", str(path)])
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_point_plot_is_bars_with_whiskers_and_speedups(sweep_rows):
    """One (batch, target): a bar per method (its own colour) to the median, whiskers p20–p80, speed-up written."""
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_hex
    from matplotlib.container import ErrorbarContainer

    rows = [r for r in sweep_rows if (r["batch"], r["target"]) == (2, 8)]
    fig = plots.figure(rows, "FlowCut prefill benchmark (clip-tiny)", "cpu · float32 · 2026-01-02")
    (ax,) = fig.axes
    by_method = {r["method"]: r for r in rows}
    order = methods_in_plot_order(rows)
    assert [to_hex(bar.get_facecolor()) for bar in ax.patches] == [plots.style(m)[0] for m in order]
    assert [bar.get_width() for bar in ax.patches] == [by_method[m]["median_ms"] for m in order]
    (errorbar,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    whiskers = errorbar.lines[2][0].get_segments()
    for method, segment in zip(order, whiskers):
        assert segment[:, 0].tolist() == pytest.approx([by_method[method]["p20_ms"], by_method[method]["p80_ms"]])
    texts = " | ".join(t.get_text() for t in ax.texts)
    for method in order[1:]:
        assert f"{by_method[method]['speedup_vs_unpruned']:.2f}× vs unpruned (p20–p80 " in texts
    assert fig._suptitle.get_text().endswith("cpu · float32 · 2026-01-02")


def test_sweep_plot_keeps_one_style_per_method_with_bands(sweep_rows):
    """A sweep: one column per target, x = batch; every method the same colour and marker in every panel."""
    pytest.importorskip("matplotlib")
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import to_hex

    fig = plots.figure(sweep_rows, "title", "cpu · float32 · 2026-01-02")
    order = methods_in_plot_order(sweep_rows)
    top, bottom = fig.axes[:2], fig.axes[2:4]  # row-major: 2 rows x 2 target columns
    assert len(fig.axes) == 4 and [ax.get_title() for ax in top] == ["target 8", "target 12"]
    assert bottom[0].get_ylabel().startswith("speed-up vs unpruned (×)")
    for ax in top:
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == order
        assert [(to_hex(line.get_color()), line.get_marker()) for line in lines] == [plots.style(m) for m in order]
        assert list(lines[0].get_xdata()) == [1, 2]
    for ax in bottom:
        lines = [line for line in ax.get_lines() if len(line.get_xdata()) == 2 and line.get_marker() != "None"]
        assert [(to_hex(line.get_color()), line.get_marker()) for line in lines] == [plots.style(m) for m in order[1:]]
    assert [sum(isinstance(c, PolyCollection) for c in ax.collections) for ax in fig.axes] == [len(order)] * 2 + [
        len(order) - 1] * 2  # a p20–p80 band per method (per FlowCut/original method on the speed-up row)


def test_ratio_band_pairs_the_interleaved_rounds():
    base = {"times_ms": [10.0, 20.0, 30.0]}
    row = {"times_ms": [5.0, 10.0, 10.0]}  # ratios 2, 2, 3
    assert plots._ratio_band(row, base) == pytest.approx((2.0, 2.6))


def test_kernel_plot_writes_speedups_and_bandwidth_shares(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_hex

    rows = bench.run(["--preset", "kernels-tiny", *FAST])
    fig = plots.figure(rows, "title", "cpu · float32 · 2026-01-02")
    left, right = fig.axes
    texts = " | ".join(t.get_text() for t in left.texts)
    shares = " | ".join(t.get_text() for t in right.texts)
    ref = {(r["case"], r["batch"], r["method"]): r["median_us"] for r in rows}
    for row in rows:  # the speed-up over the reference: torch (prune step) or the plain composition (primitives)
        speedup = ref[(row["case"], row["batch"], row["ref_method"])] / row["median_us"]
        assert f"{speedup:.2f}×" in texts and f"{100 * row['bw_share']:.0f}%" in shares
    assert {to_hex(bar.get_facecolor()) for bar in left.patches} == {plots.style(r["method"])[0] for r in rows}


def test_kernels_preset_covers_every_cpu_backend_but_the_interpreter(tmp_path):
    rows = bench.run(["--preset", "kernels-tiny", *FAST, "--json", str(tmp_path / "k.json")])
    backends = cpu_backends()
    assert "triton" not in backends  # only the interpreter runs Triton on a CPU
    cases = bench_kernels.cases_for("kernels-tiny", torch.device("cpu"))
    primitives = bench_kernels.PRIMITIVE_CASES["kernels-tiny"]["cpu"]
    assert {r["method"] for r in rows} == {f"flowcut-{b}" for b in backends} | {"composition"}
    assert len(rows) == len(cases) * len(backends) + len(primitives) * (len(backends) + 1)
    for row in rows:
        assert REQUIRED <= set(row) and row["gbps"] > 0 and 0 < row["bw_share"] and row["copy_gbps"] > 0
        assert row["tokens_out"] == row["keep"] and row["median_us"] == pytest.approx(row["median_ms"] * 1e3)
        if row["method"] == "flowcut-torch":
            assert row["speedup_vs_torch"] == 1.0


def test_bytes_moved_counts_the_minimal_traffic():
    case = bench_kernels.KernelCase("x", batch=2, seq=5, heads=3, head_dim=4, has_cls=True)  # N = 4, keep = 3
    q_kv = 2 * 3 * 4 * 2 + 2 * (2 * 3 * 5 * 4 * 2)  # float16 q_relay, k, v
    scores = 2 * 4 * 4 + 2 * (2 * 4 * 4) + 2 * 4  # prev read; cum, attn, entropy written
    select = 2 * 4 * 12 + 2 * (2 * 3 * 12 * 2) + 2 * 2 * 12  # cum + index read, rows read + written, kept out
    assert case.keep == 3 and case.bytes_moved(2) == q_kv + scores + select


def test_original_is_faithful_to_encode(tiny_clip, original):
    """Same features and kept tokens as flowcut_kernels.encode in float32; every layer runs."""
    for seed, batch, target, feature_layer in [(0, 1, 8, -2), (1, 3, 16, -2), (2, 2, 5, -1), (3, 2, 30, -3)]:
        model = tiny_clip(seed=seed, sharpen=16.0)
        pixels = random_pixels(model, batch, seed=seed)
        with torch.inference_mode():
            want = encode(model, pixels, target, feature_layer=feature_layer, backend="torch")
            features, keep, tokens = original.encode_original(model, pixels, target, feature_layer)
        assert torch.equal(keep, want.keep_indices)
        torch.testing.assert_close(features, want.features, rtol=1e-5, atol=1e-5)
        assert len(tokens) == 6 and tokens[: len(want.tokens_per_layer)] == want.tokens_per_layer
        assert len(set(want.tokens_per_layer)) > 2  # the sharpened tower prunes progressively


def test_original_eager_layers_match_the_stock_layers(tiny_clip, original):
    """The eager layers reproduce the model's own (SDPA) layers, and give softmax rows as probabilities."""
    model = tiny_clip(seed=4)
    pixels = random_pixels(model, 2, seed=4)
    with torch.inference_mode():
        stock = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        for i, layer in enumerate(find_tower(model).layers):
            hidden, probs, values = original.eager_layer(layer, stock[i])
            torch.testing.assert_close(hidden, stock[i + 1], rtol=1e-5, atol=1e-5)
            assert probs.shape == (2, 4, 65, 65) and values.shape == (2, 4, 65, 8)
            torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 65))


@pytest.mark.parametrize("argv, message", [
    (["--target", "64"], "--target=64 is out of range"),  # clip-tiny has 64 patches
    (["--target", "8", "0"], "--target=0 is out of range"),
    (["--feature-layer", "0"], "feature_layer=0 is out of range"),
    (["--backends", "nope"], "--backends nope"),
    (["--batch", "0"], "--batch 0"),
    (["--repeats", "0"], "--repeats 0"),
    (["--warmup", "-1"], "--warmup -1"),
    (["--methods", "fast"], "invalid choice: 'fast'"),
    (["--preset", "nope"], "invalid choice: 'nope'"),
    (["--preset", "llava-1.5-7b"], "--preset llava-1.5-7b runs on CUDA only"),
    (["--preset", "kernels-tiny", "--target", "8"], "--target does not apply to --preset kernels-tiny"),
    (["--device", "tpu9"], "--device 'tpu9'"),
    (["--json", "/nonexistent/dir/rows.json"], "--json /nonexistent/dir/rows.json"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys, monkeypatch):
    """Checked before any model is built; reported as argparse usage errors (exit 2)."""
    monkeypatch.setattr(bench_models, "build", lambda *a, **k: pytest.fail("built a model for bad arguments"))
    with pytest.raises(SystemExit) as exit_info:
        bench.run(["--preset", "clip-tiny", "--device", "cpu", *argv])  # later flags win
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.run(["--preset", "clip-tiny", "--device", "cuda"])
    assert exit_info.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


def test_timing_helpers():
    assert bench_timing.quantile([4.0, 1.0, 3.0, 2.0, 5.0], 0.5) == 3.0
    assert bench_timing.quantile([1.0, 2.0], 0.2) == pytest.approx(1.2)
    timing = bench_timing.Timer(torch.device("cpu")).round_robin({"a": lambda: None, "b": lambda: None}, 3)
    assert set(timing) == {"a", "b"} and len(timing["a"].times_ms) == 3
    peak = bench_timing.peak_memory_mb(lambda: torch.ones(2**24).sum(), torch.device("cpu"))
    assert peak is None or peak >= 0


class Log(io.StringIO):
    """A stream that says whether it is a terminal."""

    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_lines_without_a_terminal():
    bar = bench_timing.Progress(20, stream=Log(tty=False))
    for i in range(20):
        bar.running(f"call {i}")
        bar.step()
    lines = bar.stream.getvalue().splitlines()
    assert 10 <= len(lines) <= 12 and lines[0].endswith("0/20    0.0s running call 0")
    assert lines[-1].startswith("[####################] 20/20") and lines[-1].endswith(" done")


@pytest.mark.parametrize("tty", [False, True])
def test_progress_names_the_call_running_now(tty):
    """Each progress line names the call that runs next (which the call then writes right after it), not the
    last method of the round — on a terminal at every call, in a log every ~10%."""
    log = Log(tty)
    calls = {name: (lambda name=name: log.write(f"<{name}>\n")) for name in ("a", "b", "c")}
    bench_timing.Timer(torch.device("cpu")).round_robin(calls, 7, bench_timing.Progress(21, stream=log), "B=1")
    text = log.getvalue()
    named = re.findall(r"running B=1 (\w)\s*<(\w)>", text)
    assert len(named) == (21 if tty else 10)
    assert all(shown == ran for shown, ran in named)
    assert {shown for shown, _ in named} == {"a", "b", "c"}
    assert text.rstrip().endswith("done")


def test_command_line_exits_cleanly(tmp_path):
    """``python -m flowcut_kernels.bench`` (and the flowcut-bench console script, which calls main) exits 0."""
    import subprocess
    import sys

    assert bench.main(["--preset", "kernels-tiny", *FAST, "--backends", "torch"]) is None
    path = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, "-m", "flowcut_kernels.bench", "--preset", "clip-tiny", *FAST,
                           "--methods", "unpruned", "flowcut", "--backends", "torch", "--json", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [r["method"] for r in json.loads(path.read_text())] == ["unpruned", "flowcut-torch"]
    assert "flowcut-torch" in done.stdout
