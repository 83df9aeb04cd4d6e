"""The README's main job (python -m flowcut_kernels.demo) at a tiny size."""

import json

import pytest

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


def test_demo_bad_arguments_are_usage_errors(capsys):
    """Checked before the model is built; reported as argparse usage errors (exit 2)."""
    cases = [
        (["--target", "64"], "target_num=64 is out of range"),  # tiny has 64 patches
        (["--target", "0"], "target_num=0 is out of range"),
        (["--feature-layer", "0"], "feature_layer=0 is out of range"),
        (["--backend", "nope"], "backend='nope'"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            demo.main(["--preset", "tiny", "--device", "cpu", "--target", "8", *argv])  # later flags win
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
