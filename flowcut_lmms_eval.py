"""lmms-eval entry point of flowcut-kernels: registers the model ``flowcut`` (``--model flowcut``).

lmms-eval imports this module for every command (entry-point group ``lmms_eval.models``, see setup.py), so it
imports neither torch nor transformers nor ``flowcut_kernels`` (whose ``__init__`` imports torch): it only
names the classes, :mod:`flowcut_kernels.eval.lmms`, which lmms-eval imports when ``--model flowcut`` is run.
It lives outside the ``flowcut_kernels`` package for that reason.
"""

from __future__ import annotations

MODEL_NAME = "flowcut"


def manifests():
    """The ``flowcut`` model: a chat class, and a simple one for ``--force_simple``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_NAME,
        simple_class_path="flowcut_kernels.eval.lmms.FlowCutSimple",
        chat_class_path="flowcut_kernels.eval.lmms.FlowCutChat",
    )
