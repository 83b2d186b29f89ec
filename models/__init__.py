"""What to compute: the quantized graph IR, its importers and builders, and the runtimes that execute it."""
