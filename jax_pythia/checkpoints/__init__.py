"""Checkpoints: locating and fetching them on the Hub or on disk (`hub`), the models and
suites a sweep reads (`sources`), their content hashes (`integrity`), and the orbax caches
of converted parameters (`converted`)."""
