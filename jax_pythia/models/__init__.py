"""Models: one seam for every architecture (`family`: config, forward with capture sites,
loss and gradients, the per-layer study factors, the parameter-layout table), the
families behind it (`gpt_neox`, `llama`: Llama, OLMo, OLMo-2, pico-decoder), the generic
entry points (`model`), and conversion from and to Hugging Face checkpoints (`weights`:
`formats` for the files, `convert` for the table-driven layout)."""
