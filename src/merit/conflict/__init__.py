"""Stage 1: per-source mean gradients at θ(0) (``estimate``), their compression and cosine matrix (pure)."""
