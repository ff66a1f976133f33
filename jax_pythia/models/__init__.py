"""Models: the config dataclass that refuses what it does not implement, the Flax modules
with their capture sites (`gpt_neox`), and the one parameter-layout table that drives
conversion from and to Hugging Face checkpoints (`weights`)."""
