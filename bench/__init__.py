"""Benchmarks, run from the repository root: `python -m bench.cpu` (speed against Hugging Face T5
on this CPU) and `python -m bench.gpu` (the GPU check)."""
