"""Command-line tools built on the core (`python -m vit_jax.tools.<name>`, or the `vit-<name>`
console scripts): benchmark, benchmark_sweep, sweep, tpu_vm, predict, plot, convert, and the
notebook's visualize. Tools import the core; the core never imports a tool."""
