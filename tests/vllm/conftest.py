"""tests/vllm run in vLLM's own environment (shared/vllm-cpu/setup_venv.sh, .ci/vllm); elsewhere they are skipped."""

import importlib.util
import subprocess
import sys

import pytest

_AVX512 = ("avx512f", "avx512bw", "avx512vl")


def _skip_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed: run tests/vllm in the environment of shared/vllm-cpu/setup_venv.sh (.ci/vllm)"
    with open("/proc/cpuinfo") as info:
        flags = set(info.read().split())
    missing = [flag for flag in _AVX512 if flag not in flags]
    if missing:
        return f"vllm-cpu: this CPU lacks {missing[0]}; the vLLM CPU wheel cannot run here"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _skip_reason()
    if reason is None:
        return
    for item in items:
        if "tests/vllm/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.skip(reason=reason))


def run_engine(folder, overrides: dict | None, images, plugins: bool = True, timeout: int = 400):
    """tests/vllm/engine.py in its own process: (return code, output, its JSON result or None)."""
    import json
    import os
    from pathlib import Path

    env = dict(os.environ)
    if not plugins:
        env["VLLM_PLUGINS"] = ""  # no plug-in loads: stock vLLM
    script = Path(__file__).with_name("engine.py")
    done = subprocess.run([sys.executable, str(script), str(folder), json.dumps(overrides or {}), json.dumps(images)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    output = done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return done.returncode, output, json.loads(lines[-1][7:]) if lines else None
