"""Accounting of a config: FLOPs per training sample, model-state memory, `imagen-ds info`."""
