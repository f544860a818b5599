"""Conversions of a checkpoint to other runtimes' formats (GGUF for llama.cpp)."""
