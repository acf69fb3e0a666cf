"""Kestrel partitioning: hardware catalog, meshes, logical-axis rules, cost model and planner."""
