"""Kestrel partitioning: hardware catalog, meshes, logical-axis rules, cost model and planner.

``partitioning.plan(model, hardware, topology, phase=..., batch=..., context=...)`` ranks the
layouts of a slice (``partitioning.planner``); ``python -m partitioning.plan`` is its CLI.
"""


def plan(*args, **kwargs):
    """``partitioning.planner.plan`` (imported on first use: the planner reads model configs,
    and the models import ``partitioning.rules``)."""
    from partitioning.planner import plan as _plan

    return _plan(*args, **kwargs)
