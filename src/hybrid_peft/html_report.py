"""``report.html``: one self-contained page per run and per bench, readable offline and sent as one file.

The page is the run's (or bench's) Markdown report rendered by Python-Markdown, with every image it references
embedded as a ``data:`` URI, and a small stylesheet inline: no script, no external resource.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from hybrid_peft.fileio import atomic_write_text

IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1d1d1f; }
h1, h2, h3 { line-height: 1.25; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #d0d0d5; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f2f2f5; }
tbody tr:nth-child(even) { background: #fafafc; }
img { max-width: 100%; height: auto; border: 1px solid #eee; margin: 0.5em 0; }
code { background: #f2f2f5; padding: 0 3px; border-radius: 3px; }
"""


def _embed_images(text: str, folder: Path) -> str:
    """Replace ``![alt](relative.png)`` by the same image as a ``data:`` URI; an image that is missing is named."""

    def embed(match: re.Match[str]) -> str:
        alt, target = match.group(1), match.group(2)
        path = folder / target
        mime = MIME.get(path.suffix.lower())
        if mime is None or not path.is_file():
            return f"*({html.escape(alt)}: {html.escape(target)} was not written)*"
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"![{alt}](data:{mime};base64,{data})"

    return IMAGE.sub(embed, text)


def render_html(markdown_text: str, folder: Path, title: str) -> str:
    """The page for ``markdown_text`` whose image paths are relative to ``folder``."""
    import markdown

    body = markdown.markdown(_embed_images(markdown_text, folder), extensions=["tables"], output_format="html")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{html.escape(title)}</title>\n'
        f"<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def write_html_report(folder: Path, markdown_text: str, title: str, name: str = "report.html") -> Path:
    """Write ``folder/name`` (atomically) from ``markdown_text``; returns its path."""
    path = folder / name
    atomic_write_text(path, render_html(markdown_text, folder, title))
    return path
