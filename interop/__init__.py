"""Other formats: snapshot.py reads local Hugging Face snapshots (T5, Llama, Qwen2) into the
handwritten models, gguf.py reads llama.cpp GGUF files (Llama, Qwen2), export.py writes a policy
back as a snapshot, configs/ holds published configs for the dry-run."""
