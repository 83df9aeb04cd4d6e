"""Per-instance attributes that FlowCut sets and later restores exactly.

A patch never touches a class: it sets attributes on one object (a bound ``forward`` or
``get_image_features``, a config, a processor's counts) and records, in the object's
``_flowcut_priors``, which names it set and the values they had before. :func:`restore_attrs`
puts those values back (or deletes the names that did not exist), and removes the record, so the
object's ``__dict__`` is what it was before the first patch. :func:`returned` is what a patched method returns, as
the stock one would.
"""

from __future__ import annotations

_PRIORS = "_flowcut_priors"


def is_patched(obj) -> bool:
    """Whether :func:`set_attrs` has patched ``obj`` (and :func:`restore_attrs` has not undone it)."""
    return _PRIORS in vars(obj)


def set_attrs(obj, **attrs) -> None:
    """Set ``attrs`` on ``obj`` itself, recording each name's first prior value for :func:`restore_attrs`."""
    record = vars(obj).get(_PRIORS)
    if record is None:
        record = {"names": [], "prior": {}}
    for name, value in attrs.items():
        if name not in record["names"]:
            record["names"].append(name)
            if name in vars(obj):
                record["prior"][name] = vars(obj)[name]
        setattr(obj, name, value)
    setattr(obj, _PRIORS, record)


def prior_attr(obj, name: str):
    """What ``obj.name`` resolved to before :func:`set_attrs` replaced it (the instance's or the class's)."""
    prior = vars(obj)[_PRIORS]["prior"]
    if name in prior:
        return prior[name]
    return getattr(type(obj), name).__get__(obj, type(obj))


def restore_attrs(obj) -> None:
    """Undo every :func:`set_attrs` on ``obj``; a no-op on an object that was never patched."""
    record = vars(obj).get(_PRIORS)
    if record is None:
        return
    delattr(obj, _PRIORS)
    for name in record["names"]:
        if name in record["prior"]:
            setattr(obj, name, record["prior"][name])
        else:
            delattr(obj, name)


def restore_patch(model, core) -> None:
    """Undo a VLM patch: the processor it recorded on ``core`` (``_flowcut_processor``), ``core``, and ``model``
    when it wraps ``core`` — each object's attributes exactly as before."""
    processor = vars(core).get("_flowcut_processor")
    if processor is not None:
        restore_attrs(processor)
    restore_attrs(core)
    if model is not core:
        restore_attrs(model)


def returned(obj, out, return_dict):
    """What a patched method of ``obj`` returns, as the stock one does: the output ``out``, or ``out.to_tuple()``
    with ``return_dict=False`` (None: ``obj.config.return_dict``, True where the config has none)."""
    if return_dict is None:
        return_dict = getattr(obj.config, "return_dict", True)
    return out if return_dict else out.to_tuple()
