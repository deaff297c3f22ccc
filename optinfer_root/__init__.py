"""optinfer: verifiable LLM inference with optimistic fraud proofs."""

__version__ = "0.1.0"
