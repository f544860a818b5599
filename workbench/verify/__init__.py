"""Serving engines as subprocesses: specs (data), launch lifecycle, and OpenAI-API probes."""
