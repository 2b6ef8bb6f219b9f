"""Stage 2: PCA of the conflict matrix and partitioners (pure numpy), and the plan file."""
