"""Synthetic models and data, built on demand so that nothing binary is committed: random mT5 checkpoints
(checkpoints.py), an mT5-shaped sentencepiece model (spiece.py), generated multilingual corpora (corpus.py)
and real multilingual text from an installed package (real_text.py).

The tests, the offline demo (jobs/demo.py) and the benchmarks build from here. Never imported by model/ or
pipeline/; build_checkpoint imports transformers (a test dependency) inside the function.
"""
