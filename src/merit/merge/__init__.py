"""Stage 4: merge operators (pure per-tensor functions) and streaming checkpoint IO."""
