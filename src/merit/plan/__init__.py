"""Before the budget is spent: what a run will do and cost (``merit plan``, and the first lines of
``merit run``)."""
