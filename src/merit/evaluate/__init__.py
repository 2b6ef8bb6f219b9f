"""Stage 5: scorers and the held-out evaluation loop."""
