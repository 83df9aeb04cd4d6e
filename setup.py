"""Build of flowcut_kernels, with its optional native extension ``flowcut_kernels._C``.

torch is deliberately not a build requirement: an isolated build would pull a CUDA torch. The
extension is built against the torch already installed, so build with
``pip install --no-build-isolation -e .`` (torch and ninja installed first). FLOWCUT_BUILD_NATIVE
chooses: ``0`` skips the extension, ``1`` requires it (a failed build fails the install), unset
builds it when torch is importable and only warns when that fails. The CUDA kernels are built too
where torch has CUDA and nvcc is found (CUDA_HOME), for the archs in FLOWCUT_CUDA_ARCHS: machine code
for each, and PTX as well for those marked ``+PTX`` (default ``80;90+PTX``: sm_80 and sm_90 machine code,
and compute_90 PTX, which the driver compiles for newer GPUs). Without the extension the package works;
its "native" backend is unavailable, and says why at run time.
"""

import os
import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "(.+)"', Path("flowcut_kernels/__init__.py").read_text()).group(1)
NATIVE = os.environ.get("FLOWCUT_BUILD_NATIVE", "auto").strip().lower()
HOW_TO = "build it with `pip install --no-build-isolation -e .` with torch and ninja installed"


def _say(message: str) -> None:
    print(f"flowcut-kernels: {message}", flush=True)


def cuda_targets(archs: str) -> tuple[list[str], list[str]]:
    """nvcc -gencode flags and target names for FLOWCUT_CUDA_ARCHS, e.g. "80;90+PTX" ->
    sm_80, sm_90 machine code and compute_90 PTX."""
    gencode, targets = [], []
    for arch in filter(None, archs.replace(",", ";").split(";")):
        arch, ptx = arch.removesuffix("+PTX"), arch.endswith("+PTX")
        gencode.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        targets.append(f"sm_{arch}")
        if ptx:
            gencode.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
            targets.append(f"compute_{arch}")
    return gencode, targets


def native_build() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for flowcut_kernels._C, or ([], {}) after saying why it is skipped."""
    if NATIVE in ("0", "false", "no", "off"):
        _say("FLOWCUT_BUILD_NATIVE=0: skipping the native extension (the 'native' backend will be unavailable)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as error:
        if NATIVE in ("1", "true", "yes", "on"):
            raise RuntimeError(f"FLOWCUT_BUILD_NATIVE=1 but torch cannot be imported ({error}); {HOW_TO}") from error
        _say(f"torch is not importable in the build environment ({error}; an isolated build?): skipping the "
             f"native extension, so the 'native' backend will be unavailable; {HOW_TO}")
        return [], {}

    required = NATIVE in ("1", "true", "yes", "on")
    with_cuda = bool(torch.version.cuda) and CUDA_HOME is not None
    gencode, targets = cuda_targets(os.environ.get("FLOWCUT_CUDA_ARCHS", "80;90+PTX"))
    sources = ["python/flowcut_module.cpp", "csrc/ops.cpp", "csrc/flowcut_cpu.cpp", "csrc/primitives_cpu.cpp"]
    macros = [("FLOWCUT_VERSION", VERSION), ("FLOWCUT_WITH_CUDA", "1" if with_cuda else "0"),
              ("FLOWCUT_CUDA_ARCHS", ",".join(targets) if with_cuda else "")]
    cxx = ["-O3"]  # the C++ standard is torch's (its headers need theirs)
    if with_cuda:
        ext = CUDAExtension(
            "flowcut_kernels._C",
            sources + ["csrc/cuda_binding.cpp"] + sorted(str(cu) for cu in Path("csrc").glob("*.cu")),
            include_dirs=[str(Path("csrc").resolve())],
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", *gencode]},
        )
        _say(f"building the native extension: C++ CPU kernels and CUDA kernels for {', '.join(targets)}")
    else:
        ext = CppExtension(
            "flowcut_kernels._C",
            sources,
            include_dirs=[str(Path("csrc").resolve())],
            define_macros=macros,
            extra_compile_args={"cxx": cxx},
        )
        why = "torch has no CUDA" if not torch.version.cuda else "nvcc/CUDA_HOME not found"
        _say(f"building the native extension: C++ CPU kernels only ({why})")

    class BuildNative(BuildExtension):
        """BuildExtension (ninja) that, unless FLOWCUT_BUILD_NATIVE=1, survives a failed native build."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as error:  # noqa: BLE001 - the package stays usable without the extension
                if required:
                    raise
                _say(f"building the native extension failed ({type(error).__name__}: {error}); the package "
                     "installs without it and the 'native' backend will be unavailable "
                     "(set FLOWCUT_BUILD_NATIVE=1 to make this an error)")

    return [ext], {"build_ext": BuildNative.with_options(use_ninja=True)}


ext_modules, cmdclass = native_build()

setup(
    name="flowcut-kernels",
    version=VERSION,
    description="FlowCut visual-token pruning for vision-language models: fused ops and HF model patches",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["flowcut_kernels", "flowcut_kernels.*"]),
    py_modules=["flowcut_lmms_eval"],  # the lmms-eval entry point: a module apart, so loading it imports no torch
    install_requires=["torch>=2.4", "transformers>=5.0,<5.26"],  # the tested releases: models/seams.py
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "triton>=3.2", "pillow", "matplotlib"],
        "bench": ["matplotlib"],
        # lmms-eval 0.7.3 imports filelock._api (gone in filelock 4) and decord (its LLaVA / Qwen2-VL models)
        "eval": ["lmms-eval>=0.7.3,<0.8", "filelock<4", "decord"],
    },
    entry_points={
        "console_scripts": ["flowcut-bench=flowcut_kernels.bench.cli:main"],
        "lmms_eval.models": ["flowcut=flowcut_lmms_eval:manifests"],  # lmms-eval's --model flowcut
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
