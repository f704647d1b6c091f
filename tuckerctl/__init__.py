"""tuckerctl: measure and compress transformer attention weights with Tucker decompositions.

Library entry points: :func:`tuckerctl.analysis.analyze`, :func:`load` (compressed
checkpoints), :func:`patch` (run one inside a transformers model) and
:class:`tuckerctl.nn.TuckerAttention`.
"""

__version__ = "0.1.0"


def load(path):
    """Open a compressed Tucker checkpoint written by ``tuckerctl compress``."""
    from .tucker_format import load as _load

    return _load(path)


def patch(model, path, layers=None):
    """Run a compressed checkpoint inside a loaded transformers model (see :mod:`tuckerctl.patching`)."""
    from .patching import patch as _patch

    return _patch(model, path, layers=layers)


def __getattr__(name):
    # ``tuckerctl.nn`` without importing torch.nn machinery at package import.
    if name == "nn":
        import importlib

        return importlib.import_module(".nn", __name__)
    raise AttributeError(name)
