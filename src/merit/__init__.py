"""merit: decentralized instruction tuning by conflict-aware splitting and weight merging (MERIT)."""

__version__ = "0.1.0"
