"""Other formats: interop/snapshot.py reads local Hugging Face snapshots (T5, Llama, Qwen2) into the
handwritten models, interop/export.py writes them back, interop/configs/ holds published configs for the dry-run."""
