"""The comparison table (rows: base, joint, random-k{K}, merit-r{r}, merit-r{r}-{operator})."""

from __future__ import annotations


def format_table(results: dict, markdown: bool = False) -> str:
    """Macro exact match and mean eval loss per method, in the order the methods were evaluated."""
    rows = [(name, r["macro"], r["loss"]) for name, r in results["methods"].items()]
    width = max([len("method")] + [len(n) for n, _, _ in rows])
    if markdown:
        lines = ["| method | macro exact match | mean eval loss |", "|---|---:|---:|"]
        lines += [f"| {n} | {m:.4f} | {loss:.4f} |" for n, m, loss in rows]
    else:
        lines = [f"{'method':<{width}}  macro EM  eval loss", f"{'-' * width}  --------  ---------"]
        lines += [f"{n:<{width}}  {m:8.4f}  {loss:9.4f}" for n, m, loss in rows]
    if results.get("not_evaluated"):  # sources with no eval split: the averages leave them out
        lines += ["", f"not evaluated (no eval split): {', '.join(results['not_evaluated'])}"]
    return "\n".join(lines)
