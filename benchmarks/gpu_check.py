"""The GPU check: one command that builds, proves and times the CUDA side on a lent GPU in under 9 minutes.

    python3 benchmarks/gpu_check.py --out "$OUT"              # on the GPU machine (device tool), from the repo root
    python3 benchmarks/gpu_check.py --out /tmp/c --dry-run    # on a CPU (CI): every phase wired, nothing on CUDA

Phases, each a subprocess with its own time limit (so one hang cannot eat the budget) inside an overall deadline:

1. ``versions``   torch, CUDA, Triton, transformers, driver and GPU name;
2. ``build``      the extension in place for the local GPU's arch only (FLOWCUT_CUDA_ARCHS from the device,
                  MAX_JOBS = cores, FLOWCUT_BUILD_NATIVE=1); no pip: the device image's torch is older than
                  setup.py's floor, and it has no network;
3. ``standalone`` the torch-free CUDA test (csrc/test_kernels.cpp with every csrc/*.cu, plain nvcc), run plain,
                  under ``compute-sanitizer --tool memcheck``, and under racecheck with ``--small`` shapes;
4. ``tests``      pytest on the op and model tests (their CUDA cases run where a GPU is seen);
5. ``bench``      ``kernels``; ``clip-l-336`` at B = 1 and 32 (unpruned, FlowCut, the static schedule, the
                  original-style code); ``llava-1.5-7b`` at B = 1, K = 64: JSON, markdown and PNG each.

Everything goes under ``--out`` as it happens: ``check.log`` (every phase's output), ``check.json`` (versions and
each phase's status, seconds and command), ``check.md`` (the same for a person, with the bench tables) and
``bench.tar.gz`` (the bench files), rewritten after each phase, so a run killed at its limit still returns what
it did (the device tool brings back at most 8 files).

``--dry-run`` (no GPU): the versions; ``build`` and the sanitizer runs skipped with the reason; the standalone test
compiled with nvcc for sm_90 but not run; pytest collecting the same tests; the bench on the tiny presets on CPU
with the same options. CI runs it so the script cannot rot.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 530  # the whole check: under 9 minutes, leaving a rerun of one phase inside the device's 15

VERSIONS = r"""
import json, platform, subprocess, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "capability": "%d%d" % torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None,
        "cores": __import__("os").cpu_count()}
for name in ("triton", "transformers"):
    try:
        info[name] = __import__(name).__version__
    except ImportError as err:
        info[name] = f"not importable: {err}"
try:
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip() or None
except (OSError, subprocess.TimeoutExpired):
    info["driver"] = None
print("VERSIONS " + json.dumps(info))
"""

TESTS = ["tests/ops", "tests/models"]

# (name, preset arguments, tiny preset arguments for --dry-run)
BENCH = [
    ("kernels", ["--preset", "kernels"], ["--preset", "kernels-tiny", "--repeats", "1"]),
    ("clip-l-336", ["--preset", "clip-l-336", "--batch", "1", "32", "--target", "64",
                    "--methods", "unpruned", "flowcut", "static", "compiled", "original"],
     ["--preset", "clip-tiny", "--batch", "1", "2", "--methods", "unpruned", "flowcut", "static", "compiled",
      "original", "--repeats", "1"]),
    ("llava-1.5-7b", ["--preset", "llava-1.5-7b", "--batch", "1", "--target", "64"],
     ["--preset", "llava-tiny", "--batch", "1", "--repeats", "1"]),
]


@dataclass
class Phase:
    name: str
    status: str = "pending"  # passed | failed | timeout | skipped
    seconds: float = 0.0
    command: list[str] = field(default_factory=list)
    reason: str = ""


class Check:
    """Runs phases as subprocesses, each logged and limited, and rewrites the output folder after each."""

    def __init__(self, out: Path, dry_run: bool):
        self.out, self.dry_run = out, dry_run
        self.work = Path(tempfile.mkdtemp(prefix="flowcut-gpu-check-"))  # packed into bench.tar.gz (not in out:
        # the device tool brings back at most 8 files)
        self.log = (out / "check.log").open("a", buffering=1)
        self.start = time.monotonic()
        self.phases: list[Phase] = []
        self.versions: dict = {}
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")

    def left(self) -> float:
        return BUDGET_S - (time.monotonic() - self.start)

    def say(self, text: str) -> None:
        line = f"[gpu-check {time.monotonic() - self.start:6.1f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def skip(self, name: str, reason: str) -> Phase:
        phase = Phase(name, "skipped", reason=reason)
        self.phases.append(phase)
        self.say(f"{name}: skipped ({reason})")
        self.write()
        return phase

    def run(self, name: str, command: list[str], limit_s: float, env: dict | None = None) -> tuple[Phase, str]:
        """One phase: `command` with at most `limit_s` seconds (less if the overall budget is nearer)."""
        limit = min(limit_s, self.left())
        if limit < 5:
            return self.skip(name, f"the check's {BUDGET_S} s budget is spent"), ""
        phase = Phase(name, command=command)
        shown = ["-c", "<script>"] if "-c" in command else []  # not a whole inline script per line of the log
        self.say(f"{name}: {' '.join(command[:command.index('-c')] + shown if shown else command)}"
                 f"  (limit {limit:.0f} s)")
        begun = time.monotonic()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env or self.env, capture_output=True, text=True,
                                  timeout=limit)
            output, phase.status = done.stdout + done.stderr, "passed" if done.returncode == 0 else "failed"
            if done.returncode:
                phase.reason = f"exit status {done.returncode}"
        except subprocess.TimeoutExpired as err:
            output = _text(err.stdout) + _text(err.stderr)
            phase.status, phase.reason = "timeout", f"killed after {limit:.0f} s"
        phase.seconds = round(time.monotonic() - begun, 1)
        self.log.write(output if output.endswith("\n") or not output else output + "\n")
        self.phases.append(phase)
        self.say(f"{name}: {phase.status} in {phase.seconds} s {phase.reason}".rstrip())
        self.write()
        return phase, output

    def write(self) -> None:
        """check.json, check.md and bench.tar.gz as they stand now."""
        record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "dry_run": self.dry_run, "versions": self.versions, "budget_s": BUDGET_S,
                  "elapsed_s": round(time.monotonic() - self.start, 1), "phases": [asdict(p) for p in self.phases]}
        (self.out / "check.json").write_text(json.dumps(record, indent=1) + "\n")
        (self.out / "check.md").write_text(self.markdown(record))
        with tarfile.open(self.out / "bench.tar.gz", "w:gz") as tar:
            for path in sorted(self.work.iterdir()):
                tar.add(path, arcname=path.name)

    def markdown(self, record: dict) -> str:
        versions = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        lines = [f"# GPU check{' (dry run on CPU)' if self.dry_run else ''}", "",
                 f"{record['date']}; {versions or 'versions not read'}; {record['elapsed_s']} s of {BUDGET_S}.", "",
                 "| phase | status | s | note |", "|---|---|---|---|"]
        lines += [f"| {p.name} | {p.status} | {p.seconds} | {p.reason} |" for p in self.phases]
        for table in sorted(self.work.glob("*.md")):
            body = table.read_text().strip().replace("\n# ", "\n### ").removeprefix("# ")
            lines += ["", f"## {table.stem}: {body}"]
        return "\n".join(lines) + "\n"


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def versions(check: Check) -> None:
    phase, output = check.run("versions", [sys.executable, "-c", VERSIONS], 60)
    for line in output.splitlines():
        if line.startswith("VERSIONS "):
            check.versions = json.loads(line[len("VERSIONS "):])
    check.write()


def build(check: Check) -> bool:
    if check.dry_run:
        check.skip("build", "dry run: no GPU, the CUDA build is CI's .ci/cuda_build")
        return True
    arch = check.versions.get("capability")
    if not arch:
        check.skip("build", "torch sees no CUDA device")
        return False
    env = dict(check.env, FLOWCUT_CUDA_ARCHS=arch, FLOWCUT_BUILD_NATIVE="1", MAX_JOBS=str(os.cpu_count() or 4))
    phase, _ = check.run("build", [sys.executable, "setup.py", "build_ext", "--inplace"], 240, env)
    if phase.status == "passed":
        check.run("build-info", [sys.executable, "-c", "import json, flowcut_kernels as f; "
                                 "print(json.dumps(f.build_info())); "
                                 "print(f.available_backends('cuda', reasons=True))"], 60)
    return phase.status == "passed"


def standalone(check: Check) -> None:
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc is None:
        check.skip("standalone", "nvcc not found")
        return
    arch = check.versions.get("capability") or "90"
    binary = check.work.parent / f"{check.work.name}-test_kernels"
    sources = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").glob("*.cu"))]
    compiled, _ = check.run("standalone-build", [nvcc, "-std=c++17", "-O3", "-lineinfo", f"-arch=sm_{arch}",
                                                 "-Icsrc", "csrc/test_kernels.cpp", *sources, "-o", str(binary)], 240)
    if compiled.status != "passed":
        return
    if check.dry_run:
        for name in ("standalone", "memcheck", "racecheck"):
            check.skip(name, "dry run: no GPU to run the CUDA test on")
        return
    check.run("standalone", [str(binary)], 60)
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        check.skip("memcheck", "compute-sanitizer not found")
        return
    check.run("memcheck", [sanitizer, "--tool", "memcheck", "--error-exitcode", "1", str(binary)], 120)
    check.run("racecheck", [sanitizer, "--tool", "racecheck", "--error-exitcode", "1", str(binary), "--small"], 90)


def tests(check: Check) -> None:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x" if check.dry_run else "-rfE",
               *TESTS]
    if check.dry_run:
        command.append("--collect-only")
    elif importlib.util.find_spec("xdist"):  # the device image has pytest-xdist and 16 cores
        command[3:3] = ["-n", "8"]
    check.run("tests", command, 170)


def bench(check: Check) -> None:
    device = ["--device", "cpu"] if check.dry_run else ["--device", "cuda"]
    for name, args, tiny in BENCH:
        files = ["--json", f"{check.work / name}.json", "--markdown", f"{check.work / name}.md",
                 "--plot", f"{check.work / name}.png"]
        check.run(f"bench-{name}", [sys.executable, "-m", "flowcut_kernels.bench", *(tiny if check.dry_run else args),
                                    *device, *files, "--no-progress"], 150)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder ($OUT on the device machine)")
    parser.add_argument("--dry-run", action="store_true", help="CPU: wire every phase, skip what needs a GPU")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out.resolve(), args.dry_run)
    versions(check)
    if build(check):
        standalone(check)
        tests(check)
        bench(check)
    check.write()
    failed = [p.name for p in check.phases if p.status in ("failed", "timeout")]
    check.say(f"done in {time.monotonic() - check.start:.0f} s; " + (f"failed: {failed}" if failed else "all passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
