"""Other formats: snapshot.py reads local Hugging Face snapshots (T5, Llama, Qwen2) into the
handwritten models, export.py writes them back, configs/ holds published configs for the
dry-run."""
