"""The core of training: config → build (model, optimizer, state, jitted steps) → loop →
checkpoints and metrics. `config.py` owns the config; `step.py` holds the train step; `loop.py`
the loop. Nothing here imports `vit_jax.tools`."""
