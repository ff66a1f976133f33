"""The study of one checkpoint: pure compiled functions of (params, tokens) that wire a
model's capture sites into the `analysis` kernels (`checkpoint`): activations for CKA,
weight spectra, gradient statistics, loss. No files, no loops over checkpoints."""
