"""The comparison tables (rows: base, joint, random-k{K}, merit-r{r}, merit-r{r}-{operator}).

Each table is data first (:class:`Table`) and rendered as plain text (the terminal), Markdown
(report.md) or HTML (report.html), so the three never disagree.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

RESOLVED_NOTE = ("Intervals: 95% bootstrap over items (resampled within each source); Δ is paired against "
                 "joint on the same items. n.r.: not resolved (the interval holds 0).")


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    align: list[str] = field(default_factory=list)  # "l" or "r" per column (default: first left, rest right)

    def _align(self) -> list[str]:
        return self.align or ["l"] + ["r"] * (len(self.header) - 1)

    def plain(self) -> str:
        widths = [max(len(str(c)) for c in col) for col in zip(self.header, *self.rows)]
        def line(cells):
            return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w)
                             for c, w, a in zip(cells, widths, self._align())).rstrip()
        out = [line(self.header), "  ".join("-" * w for w in widths)] + [line(r) for r in self.rows]
        return "\n".join(out + ([""] + self.notes if self.notes else []))

    def markdown(self) -> str:
        sep = ["---" if a == "l" else "---:" for a in self._align()]
        out = ["| " + " | ".join(self.header) + " |", "|" + "|".join(sep) + "|"]
        out += ["| " + " | ".join(str(c) for c in r) + " |" for r in self.rows]
        return "\n".join(out + ([""] + self.notes if self.notes else []))

    def html(self) -> str:
        cls = ['' if a == "l" else ' class="num"' for a in self._align()]
        head = "".join(f"<th{c}>{html.escape(h)}</th>" for h, c in zip(self.header, cls))
        body = "".join("<tr>" + "".join(f"<td{c}>{html.escape(str(v))}</td>" for v, c in zip(r, cls)) + "</tr>"
                       for r in self.rows)
        notes = "".join(f"<p class=\"note\">{html.escape(n)}</p>" for n in self.notes)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}"


def _ci(row: dict) -> str:
    if "ci" not in row:
        return f"{row['macro']:.4f}"
    return f"{row['macro']:.4f} [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}]"


def _delta(row: dict, reference: str = "joint") -> str:
    d = row.get(f"vs_{reference}")
    if d is None:
        return "—"
    mark = "" if d["resolved"] else " n.r."
    return f"{d['estimate']:+.4f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]{mark}"


def comparison(results: dict, rows: list[str] | None = None, title: str = "Comparison") -> Table:
    """In-mixture macro score with its interval, Δ vs joint, items and loss; transfer columns when scored."""
    methods = results["methods"]
    names = [n for n in (rows or list(methods)) if n in methods]
    transfer = any("transfer" in methods[n] for n in names)
    header = ["method", "macro (95% CI)", "Δ vs joint", "items", "eval loss"]
    if transfer:
        header += ["transfer (95% CI)", "transfer Δ vs joint", "transfer items"]
    body = []
    for n in names:
        r = methods[n]
        cells = [n, _ci(r), _delta(r), str(r.get("n_items", "")), f"{r['loss']:.4f}"]
        if transfer:
            t = r.get("transfer")
            cells += [_ci(t), _delta(t), str(t.get("n_items", ""))] if t else ["—", "—", ""]
        body.append(cells)
    notes = [RESOLVED_NOTE] if any("ci" in methods[n] for n in names) else []
    if results.get("not_evaluated"):  # sources with no eval split: the averages leave them out
        notes.append(f"not evaluated (no eval split): {', '.join(results['not_evaluated'])}")
    return Table(title, header, body, notes)


def per_source(results: dict, part: str | None = None) -> Table | None:
    """Each source's score per method (``part="transfer"``: the transfer sources)."""
    methods = results["methods"]
    blocks = {n: (r.get(part) if part else r) for n, r in methods.items()}
    blocks = {n: b for n, b in blocks.items() if b}
    if not blocks:
        return None
    sources = list(next(iter(blocks.values()))["per_source"])
    rows = [[s] + [f"{b['per_source'].get(s, float('nan')):.3f}" for b in blocks.values()] for s in sources]
    title = "Transfer sources" if part == "transfer" else "In-mixture sources"
    return Table(title, ["source"] + list(blocks), rows)


def harness(results: dict, part: str = "lm_eval") -> Table | None:
    """The harness's headline metric per task and method (lm-eval's own metric keys)."""
    from merit.evaluate.harness import headline

    methods = {n: headline(r[part]) for n, r in results["methods"].items() if part in r}
    if not methods:
        return None
    tasks = sorted({t for h in methods.values() for t in h})
    rows = []
    for t in tasks:
        metric = next(h[t][0] for h in methods.values() if t in h)
        rows.append([t, metric] + [f"{h[t][1]:.4f}" if t in h else "—" for h in methods.values()])
    name = "lm-evaluation-harness" if part == "lm_eval" else "lmms-eval"
    return Table(name, ["task", "metric"] + list(methods), rows, align=["l", "l"] + ["r"] * len(methods))


def diagnose_checks(report: dict) -> Table:
    """merit diagnose's merge-readiness checks: each number against its threshold (docs/diagnostics.md)."""
    marks = {True: "pass", False: "fail", None: "n/a"}
    rows = [[c["check"], "n/a" if c["value"] is None else f"{c['value']:.4g}", c["threshold"], marks[c["passed"]]]
            for c in report.get("checks", [])]
    gains = report.get("merge_gain", {})
    notes = [f"merge gain {name}: measured {g['measured']:.4g}, Hessian-predicted {g['predicted']:.4g}"
             for name, g in gains.items()]
    notes.append(f"largest LMC barrier {report['lmc']['max_barrier']:.4g} over {len(report['lmc']['paths'])} paths")
    return Table("Merge-readiness checks (merit diagnose)", ["check", "value", "threshold", "result"], rows,
                 notes=notes, align=["l", "r", "l", "l"])


def format_table(results: dict, markdown: bool = False) -> str:
    """The comparison table as plain text (the terminal) or Markdown."""
    t = comparison(results)
    return t.markdown() if markdown else t.plain()
