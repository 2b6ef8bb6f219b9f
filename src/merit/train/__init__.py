"""Stage 3: one branch (and the joint baseline) on transformers' Trainer; no hand-written training loop."""
