"""Build of flowcut_kernels, with its optional native extension ``flowcut_kernels._C`` (python/native_build.py).

torch is deliberately not a build requirement: an isolated build would pull a CUDA torch. The
extension is built against the torch already installed, so build with
``pip install --no-build-isolation -e .`` (torch and ninja installed first). FLOWCUT_BUILD_NATIVE
chooses: ``0`` skips the extension, ``1`` makes any failure an error, unset builds what it can (with a CUDA
torch and a CUDA toolkit: the C++ CPU and CUDA kernels; when the CUDA part fails, the CPU kernels alone) and
records what it skipped and why. FLOWCUT_CUDA_ARCHS picks the CUDA targets (default ``80;90+PTX``: sm_80 and
sm_90 machine code, and compute_90 PTX, which the driver compiles for newer GPUs). Without the extension the
package works; its "native" backend is unavailable, and says why at run time.
"""

import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

sys.path.insert(0, str(Path(__file__).resolve().with_name("python")))
from native_build import native_build  # found through the line above
from package_readme import readme



VERSION = re.search(r'__version__ = "(.+)"', Path("flowcut_kernels/__init__.py").read_text()).group(1)
ext_modules, cmdclass = native_build(VERSION)

setup(
    name="flowcut-kernels",
    version=VERSION,
    description="FlowCut visual-token pruning for vision-language models: fused ops and HF model patches",
    long_description=readme(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["flowcut_kernels", "flowcut_kernels.*"]),
    py_modules=["flowcut_lmms_eval"],  # the lmms-eval entry point: a module apart, so loading it imports no torch
    install_requires=["torch>=2.13", "transformers>=5.0,<5.26"],  # the tested releases (models/seams.py, .ci/run)
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "triton>=3.2", "pillow", "matplotlib"],
        "bench": ["matplotlib"],
        # lmms-eval 0.7.3 imports filelock._api (gone in filelock 4) and decord (its LLaVA / Qwen2-VL models)
        "eval": ["lmms-eval>=0.7.3,<0.8", "filelock<4", "decord"],
        "vllm": ["vllm>=0.33,<0.34"],  # the tested releases (flowcut_kernels/vllm/seams.py, .ci/vllm)
    },
    entry_points={
        "console_scripts": ["flowcut-bench=flowcut_kernels.bench.cli:main"],
        "lmms_eval.models": ["flowcut=flowcut_lmms_eval:manifests"],  # lmms-eval's --model flowcut
        "vllm.general_plugins": ["flowcut=flowcut_kernels.vllm:register"],  # FlowCut in vLLM (docs/vllm.md)
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
