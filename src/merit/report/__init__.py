"""Stage 6: the comparison table and plots."""
