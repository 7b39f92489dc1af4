"""More than one process: torch.distributed set-up, data parallelism's helpers, and context
parallelism (ring attention over zigzag shards) applied to a model from outside.
"""
