"""The README's main job (python -m flowcut_kernels.demo) at a tiny size."""

import json

from flowcut_kernels import demo


def test_demo_runs_and_writes_json(tmp_path, capsys):
    path = tmp_path / "demo.json"
    demo.main(["--preset", "tiny", "--target", "8", "--feature-layer", "-1", "--repeats", "1",
               "--device", "cpu", "--json", str(path)])
    printed = capsys.readouterr().out
    assert "tokens per layer: 65 " in printed and "x faster" in printed
    row = json.loads(path.read_text())
    assert row["tokens_per_layer"][0] == 65 and row["tokens_per_layer"][-1] == 9
    assert row["unpruned_ms"] > 0 and row["flowcut_ms"] > 0
    assert row["speedup"] == row["unpruned_ms"] / row["flowcut_ms"]
    assert set(row["versions"]) >= {"torch", "transformers", "flowcut_kernels"}
