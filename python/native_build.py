"""setup.py's build of the native extension flowcut_kernels._C: C++ CPU kernels, and CUDA kernels where torch has
CUDA and a CUDA toolkit is found.

FLOWCUT_BUILD_NATIVE chooses: ``0`` skips the extension, ``1`` makes any failure an error (torch not importable,
a CUDA torch without a toolkit, a failed compile), unset ("auto") builds what it can: when the CUDA part fails it
builds the C++ CPU kernels alone, and when that fails too the package installs without the extension. What was
skipped and why goes to ``flowcut_kernels/_build_status.json`` next to ``_C`` (read by
``flowcut_kernels.ops.native``: ``build_info()["cuda_skipped"]``, ``UNAVAILABLE_REASON``).

The toolkit is, in order: ``CUDA_HOME`` or ``CUDA_PATH`` (taken as given: a folder that is not a toolkit means no
CUDA kernels, not another toolkit), the toolkit of ``nvcc`` on PATH (its real location, symlinks resolved, else
the root nvcc itself reports, which also sees through a wrapper script), ``/usr/local/cuda``. A toolkit is a
folder with ``bin/nvcc`` and ``include/cuda_runtime.h``.

FLOWCUT_CUDA_ARCHS lists the compute capabilities (default ``80;90+PTX``): machine code for each, PTX too for those
marked ``+PTX``. They reach ``_C.build_info()`` through a generated header (``python/build_info.h.in``), not a
``-D`` flag: nvcc splits a ``-D`` value at its commas.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

EXTENSION = "flowcut_kernels._C"
STATUS_FILE = "_build_status.json"  # {"native": why _C is not built, "cuda": why _C has no CUDA kernels}, or None
REBUILD = "pip install --no-build-isolation -e ."
SET_CUDA_HOME = (
    "set CUDA_HOME to the toolkit's root, the folder holding bin/nvcc and include/cuda_runtime.h "
    f"(e.g. `CUDA_HOME=/usr/local/cuda-13.0 {REBUILD}`)"
)
CPU_SOURCES = ["python/flowcut_module.cpp", "csrc/ops.cpp", "csrc/flowcut_cpu.cpp", "csrc/primitives_cpu.cpp"]
TEMPLATE = Path(__file__).with_name("build_info.h.in")
DEFAULT_TOOLKIT = Path("/usr/local/cuda")


def _say(message: str) -> None:
    print(f"flowcut-kernels: {message}", flush=True)


def native_mode() -> str:
    """FLOWCUT_BUILD_NATIVE as "0" (skip), "1" (required) or "auto"."""
    value = os.environ.get("FLOWCUT_BUILD_NATIVE", "").strip().lower()
    spellings_of = (("0", ("0", "false", "no", "off")), ("1", ("1", "true", "yes", "on")), ("auto", ("", "auto")))
    for mode, spellings in spellings_of:
        if value in spellings:
            return mode
    raise ValueError(f"FLOWCUT_BUILD_NATIVE={value!r} is not a choice: use 0 (skip the native extension), "
                     "1 (require it) or leave it unset (build what can be built)")


def cuda_targets(archs: str) -> tuple[list[str], list[str]]:
    """nvcc -gencode flags and target names for FLOWCUT_CUDA_ARCHS, e.g. "80;90+PTX" -> sm_80, sm_90 machine code
    and compute_90 PTX."""
    gencode, targets = [], []
    for arch in re.split(r"[;,\s]+", archs.strip()):
        match = re.fullmatch(r"(\d+[a-z]?)(\+PTX)?", arch)
        if match is None:
            raise ValueError(f"FLOWCUT_CUDA_ARCHS={archs!r}: {arch!r} is not a compute capability; give numbers "
                             "separated by ';', each optionally with '+PTX', e.g. FLOWCUT_CUDA_ARCHS='80;90+PTX'")
        number = match.group(1)
        gencode.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        targets.append(f"sm_{number}")
        if match.group(2):
            gencode.append(f"-gencode=arch=compute_{number},code=compute_{number}")
            targets.append(f"compute_{number}")
    return gencode, targets


def is_toolkit(root: Path) -> bool:
    return (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file()


def _nvcc_top(nvcc: str) -> Path | None:
    """The toolkit root nvcc reports under --dryrun (its TOP), which a wrapper script passes through."""
    try:
        run = subprocess.run([nvcc, "--dryrun", "-E", "-x", "c++", os.devnull], capture_output=True, text=True,
                             timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", run.stderr + run.stdout, re.MULTILINE)
    return Path(match.group(1).strip()).resolve() if match else None


def find_cuda_toolkit() -> tuple[Path | None, str]:
    """(the CUDA toolkit's root, where it was found), or (None, why none was found and how to set CUDA_HOME)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            root = Path(os.environ[var])
            if is_toolkit(root):
                return root, var
            return None, f"{var}={root} is not a CUDA toolkit (no bin/nvcc and include/cuda_runtime.h there); " \
                         + SET_CUDA_HOME
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        for root in (Path(nvcc).resolve().parent.parent, _nvcc_top(nvcc)):
            if root is not None and is_toolkit(root):
                return root, f"nvcc on PATH ({nvcc})"
    if is_toolkit(DEFAULT_TOOLKIT):
        return DEFAULT_TOOLKIT, str(DEFAULT_TOOLKIT)
    where = f"nvcc on PATH ({nvcc}) is in no toolkit" if nvcc else "no nvcc on PATH"
    return None, f"no CUDA toolkit found (CUDA_HOME and CUDA_PATH unset, {where}, none at {DEFAULT_TOOLKIT}); " \
                 + SET_CUDA_HOME


def write_build_info(folder: Path, version: str, targets: list[str]) -> None:
    """folder/build_info.h from python/build_info.h.in: the version and the CUDA targets (none: no CUDA)."""
    text = TEMPLATE.read_text()
    for key, value in (("FLOWCUT_VERSION", version), ("FLOWCUT_WITH_CUDA", str(int(bool(targets)))),
                       ("FLOWCUT_CUDA_TARGETS", ",".join(targets))):
        text = text.replace(f"@{key}@", value)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "build_info.h").write_text(text)


def _failure(error: BaseException) -> str:
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0]}" if first else type(error).__name__


def native_build(version: str) -> tuple[list, dict]:
    """setup()'s (ext_modules, cmdclass) for flowcut_kernels._C, or ([], {}) after saying why it is skipped."""
    mode = native_mode()
    if mode == "0":
        _say("FLOWCUT_BUILD_NATIVE=0: skipping the native extension (the 'native' backend will be unavailable)")
        return [], {}
    try:
        import torch
    except ImportError as error:
        why = f"torch is not importable in the build environment ({error}; an isolated build?)"
        if mode == "1":
            raise RuntimeError(
                f"FLOWCUT_BUILD_NATIVE=1 but {why}; install torch and ninja, then `{REBUILD}`"
            ) from error
        _say(f"{why}: skipping the native extension, so the 'native' backend will be unavailable; install torch and "
             f"ninja, then `{REBUILD}`")
        return [], {}

    gencode, targets = cuda_targets(os.environ.get("FLOWCUT_CUDA_ARCHS", "80;90+PTX"))
    toolkit, found = find_cuda_toolkit() if torch.version.cuda else (None, "")
    if not torch.version.cuda:
        cuda_skipped = f"torch {torch.__version__} has no CUDA"
    elif toolkit is None:
        cuda_skipped = found
        if mode == "1":
            raise RuntimeError(f"FLOWCUT_BUILD_NATIVE=1 but torch {torch.__version__} has CUDA and {found}")
    else:
        cuda_skipped = None
        os.environ["CUDA_HOME"] = str(toolkit)  # read by torch.utils.cpp_extension when it is imported, just below
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    def extension(with_cuda: bool):
        """_C with the CUDA kernels, or the C++ CPU kernels alone."""
        # no debug information in the shared object (the compiler's -g from Python's flags made it ~10 MB); the CUDA
        # kernels keep -lineinfo for profilers
        kwargs = {"include_dirs": [str(Path("csrc").resolve())], "extra_compile_args": {"cxx": ["-O3", "-g0"]},
                  "extra_link_args": ["-Wl,--strip-debug"]}
        if sys.platform.startswith("linux"):
            # at::parallel_for runs its body on one thread unless the caller is compiled with OpenMP (ATen's OpenMP
            # backend inlines the parallel region); the soname libgomp.so.1 is the runtime torch already loaded
            kwargs["extra_compile_args"]["cxx"].append("-fopenmp")
            kwargs["extra_link_args"].append("-fopenmp")
        if not with_cuda:
            return CppExtension(EXTENSION, CPU_SOURCES, **kwargs)
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo", *gencode]
        cuda_sources = ["csrc/cuda_binding.cpp", *sorted(str(cu) for cu in Path("csrc").glob("*.cu"))]
        return CUDAExtension(EXTENSION, CPU_SOURCES + cuda_sources, **kwargs)

    class BuildNative(BuildExtension):
        """BuildExtension (ninja) that, unless FLOWCUT_BUILD_NATIVE=1, falls back to the C++ CPU kernels when the
        CUDA part fails and to no extension when that fails too, and records what it skipped and why."""

        def build_extension(self, ext):
            with_cuda = any(source.endswith(".cu") for source in ext.sources)
            generated = Path(self.build_temp).resolve() / "generated"
            write_build_info(generated, version, targets if with_cuda else [])
            ext.include_dirs.append(str(generated))
            super().build_extension(ext)

        def build_extensions(self):
            try:
                return super().build_extensions()
            except Exception as error:  # auto mode keeps the package installable
                if mode == "1":
                    raise
                failure = _failure(error)
            rerun = "`pip install -v` shows the compiler's errors"
            if self.status["cuda"] is None:
                self.status["cuda"] = f"the CUDA part of the build failed ({failure}; {rerun})"
                _say(f"{self.status['cuda']}; building the C++ CPU kernels alone")
                cpu = extension(with_cuda=False)  # its fields, into the extension setuptools has prepared
                for ext in self.extensions:
                    for field in ("sources", "include_dirs", "library_dirs", "libraries", "extra_compile_args",
                                  "extra_link_args"):
                        setattr(ext, field, getattr(cpu, field))
                try:
                    return super().build_extensions()
                except Exception as error:
                    failure = _failure(error)
            self.status["native"] = f"its build failed ({failure}; {rerun})"
            _say(f"building the native extension failed ({failure}); the package installs without it and the "
                 "'native' backend will be unavailable (set FLOWCUT_BUILD_NATIVE=1 to make this an error)")
            self.extensions = []  # nothing to copy into the source tree (editable install) or to install

        def run(self):
            self.status = {"native": None, "cuda": cuda_skipped}
            super().run()
            built = Path(self.get_ext_fullpath(EXTENSION))
            if self.status["native"] is not None:
                built.unlink(missing_ok=True)  # an earlier build's _C, which the record would contradict
            status = built.with_name(STATUS_FILE)
            status.parent.mkdir(parents=True, exist_ok=True)
            status.write_text(json.dumps(self.status, indent=1) + "\n")

    if cuda_skipped is None:
        _say(f"building the native extension: C++ CPU kernels and CUDA kernels for {', '.join(targets)} (CUDA "
             f"toolkit {toolkit}, from {found})")
    else:
        _say(f"building the native extension: C++ CPU kernels only, no CUDA kernels: {cuda_skipped}")
    return [extension(with_cuda=cuda_skipped is None)], {"build_ext": BuildNative.with_options(use_ninja=True)}
