"""Merge-readiness and merge-gain diagnostics (``merit diagnose RUN``).

``landscape`` holds the pure math (interpolation, barriers, parallel-axis identity, Hessian-vector
products, flatness); ``cli`` reads a run folder, evaluates, and writes ``RUN/diagnose/``.
"""
