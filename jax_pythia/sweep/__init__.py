"""The run over checkpoints: the resumable, prefetching sweep (`run`), what `--out` records
and checks (`outdir`), the per-checkpoint and finished tables (`results`), the report and
figures (`report`, with the published evaluations in `evals`), and the stall watchdog
(`watchdog`)."""
