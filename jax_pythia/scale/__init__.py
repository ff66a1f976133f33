"""Scaling a sweep to the hardware: the device mesh and parameter sharding (`sharding`),
the plan of bytes, FLOPs, memory and time before a run (`plan`), and the XLA:CPU thread
pool and LAPACK threads set at import (`xla_cpu`)."""
