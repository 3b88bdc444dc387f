"""Progressive Low-Rank Decomposition (PLRD) for the Megatron / NeMo training stack."""

__version__ = "0.1.0"
