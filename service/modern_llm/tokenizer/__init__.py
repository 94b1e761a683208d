"""Tokenizers that need no files."""

from modern_llm.tokenizer.byte_tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer"]
