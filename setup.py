"""Build of flowcut_kernels (pure Python for now; the native extension arrives with csrc/).

torch is deliberately not a build requirement: an isolated build would pull a CUDA torch.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="flowcut-kernels",
    version=re.search(r'__version__ = "(.+)"', Path("flowcut_kernels/__init__.py").read_text()).group(1),
    description="FlowCut visual-token pruning for vision-language models: fused ops and HF model patches",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["flowcut_kernels", "flowcut_kernels.*"]),
    install_requires=["torch>=2.4", "transformers>=5.0,<6"],
    extras_require={"test": ["pytest>=7", "triton>=3.2"]},
    entry_points={"console_scripts": ["flowcut-bench=flowcut_kernels.bench:main"]},
)
