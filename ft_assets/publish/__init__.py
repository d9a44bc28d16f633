"""Models out: GGUF export with llama.cpp (gguf.py) and Hugging Face model cards (card.py)."""
