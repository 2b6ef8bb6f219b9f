"""The report as blocks (headings, paragraphs, tables, pictures), written as report.md and report.html.

report.html is one self-contained page: pictures are embedded as data URIs, the style is inline, so
the file can be mailed, attached to a CI run or opened from any folder.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

from merit.report.table import Table


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Picture:
    path: Path  # relative to the run folder
    alt: str


Block = Heading | Paragraph | Table | Picture

STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:.6em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px}
th{background:#f3f3f3}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}p.note{font-size:12px;
color:#555;margin:.2em 0}img{max-width:100%;border:1px solid #eee;margin:.5em 0}h1{font-size:24px}h2{font-size:19px;
border-bottom:1px solid #ddd;padding-bottom:3px}"""


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Paragraph):
            out.append(b.text)
        elif isinstance(b, Table):
            out.append(f"**{b.title}**\n\n{b.markdown()}" if b.title else b.markdown())
        else:
            out.append(f"![{b.alt}]({b.path.as_posix()})")
        out.append("")
    return "\n".join(out)


def to_html(blocks: list[Block], root: Path, title: str) -> str:
    """One page; pictures under ``root`` embedded as base64 PNG (missing ones are left out)."""
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            parts.append(f"<p>{html.escape(b.text).replace(chr(10), '<br>')}</p>")
        elif isinstance(b, Table):
            parts.append((f"<h3>{html.escape(b.title)}</h3>" if b.title else "") + b.html())
        else:
            png = Path(root) / b.path
            if png.is_file():
                data = base64.b64encode(png.read_bytes()).decode()
                parts.append(f"<figure><img alt=\"{html.escape(b.alt)}\" src=\"data:image/png;base64,{data}\">"
                             f"<figcaption>{html.escape(b.alt)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
