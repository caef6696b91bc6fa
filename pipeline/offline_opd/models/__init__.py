"""Loading and saving models and tokenizers (Hugging Face folders, GGUF)."""
