"""Readers and writers for the weight formats `vit_jax.weights.convert` understands, one file each.

Every reader returns `(params, metadata)` with `params` a flat dict `{'a/b/c': np.ndarray}` in
the vit_jax parameter layout (the published names; per-layer or scanned as the file holds them),
and every writer takes the same flat dict. `vit_jax.weights.convert` picks the format and checks the
result against a model.
"""
