"""Data: reading text, named corpora, tokenizers and batchers."""
