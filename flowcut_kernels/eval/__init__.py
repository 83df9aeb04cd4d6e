"""Evaluation integrations: :mod:`.lmms` is the lmms-eval model ``flowcut`` (``pip install flowcut-kernels[eval]``;
its entry point is the top-level module ``flowcut_lmms_eval``)."""
