"""A distributed fine-tuning harness for decoder LLMs (DeepSpeed ZeRO-2/3)."""

__version__ = "0.1.0"
