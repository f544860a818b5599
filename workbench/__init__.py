"""workbench: take a fine-tuned LLM from training output to a release artifact that is proven to serve."""

__version__ = "0.1.0"
