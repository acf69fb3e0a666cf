"""Kestrel kernels: one folder per op, each with a jnp reference, Pallas paths and a dispatcher.

A kernel never knows about models. Every public op takes ``impl`` (``"auto"``, ``"reference"``,
``"xla"``, and where they exist ``"pallas_tpu"``, ``"pallas_gpu"``, ``"cudnn"``) and
``interpret``.
"""
