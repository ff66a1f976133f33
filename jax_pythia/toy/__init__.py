"""The offline mini-Pythia suite the main job runs on: the corpus and its byte-level
tokenizer (`corpus`), sizes, options and the resumable training loop (`train`), and the
build that writes it as a Hugging Face-format suite (`build`)."""
