"""Run tests/vllm/engine.py in its own process (vLLM's engine wants a fresh process per configuration)."""

import subprocess
import sys


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
