"""Names shared by the analysis document's producers and readers.

The schema ids and the tensor/mode names are written by :mod:`tuckerctl.analysis` and
read by ``report``, ``tables``, ``plotting``, ``interactive``, ``pareto`` and
``crosscheck``; they live here once so that a rename cannot leave a reader behind.
"""

SCHEMA = "tuckerctl.analysis/2"
SET_SCHEMA = "tuckerctl.analyses/1"  # several analyses in one document: {"models": [...]}
TENSORS = ("pre", "post")
MODE_NAMES = {"pre": ("head", "query", "key"), "post": ("head", "output", "value")}


def layer_modes(layer: dict, keys=TENSORS):
    """``(tensor, mode, record)`` for each mode record of one layer of an analysis, in table order."""
    for key in keys:
        for mode in MODE_NAMES[key]:
            yield key, mode, layer[key]["modes"][mode]
