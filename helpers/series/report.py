"""`outputs/index.html`: one page to open after `python -m helpers run`. Each notebook with its status, seconds, key
numbers and main figure, linking nbconvert's HTML of the executed notebook; a failed notebook shows its failing cell
and the error. Written at the end of every run, an interrupted one too.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import nbformat

HTML_DIR = "html"  # nbconvert's pages of the executed notebooks, inside the outputs folder
INDEX = "index.html"


def notebook_html(executed: Path, out_dir: Path) -> Path | None:
    """nbconvert's HTML of an executed notebook (None when the notebook was never written)."""
    from nbconvert import HTMLExporter

    if not executed.exists():
        return None
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    path = out_dir / HTML_DIR / f"{executed.stem}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    return path


def main_figure(executed: Path, out_dir: Path) -> Path | None:
    """The notebook's main figure: the largest picture among its cell outputs (the grid, the plot), saved beside
    the HTML pages; None when it shows none."""
    if not executed.exists():
        return None
    pictures = [output["data"]["image/png"] for cell in nbformat.read(executed, as_version=4).cells
                if cell.cell_type == "code" for output in cell.get("outputs", [])
                if "image/png" in output.get("data", {})]
    if not pictures:
        return None
    path = out_dir / HTML_DIR / f"{executed.stem}_figure.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(max(pictures, key=len)))
    return path


def failing_cell(executed: Path) -> tuple[str, str]:
    """(source, error) of the cell that raised in an executed notebook; ("", "") when none did."""
    if not executed.exists():
        return "", ""
    for cell in nbformat.read(executed, as_version=4).cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if output.get("output_type") == "error":
                return cell.source, f"{output['ename']}: {output['evalue']}"
    return "", ""


def _section(run, out_dir: Path) -> str:
    executed = out_dir / f"{run.notebook}.ipynb"
    page, figure = notebook_html(executed, out_dir), main_figure(executed, out_dir)
    title = html.escape(run.notebook)
    link = f'<a href="{HTML_DIR}/{page.name}">{title}</a>' if page else title
    parts = [f'<section class="{html.escape(run.status)}"><h2>{link} <small>{html.escape(run.status)} in '
             f"{run.seconds:.0f} s</small></h2>"]
    numbers = run.key_numbers()
    if numbers:
        parts.append(f"<p>{html.escape(numbers)}</p>")
    if run.status != "ok":
        source, error = failing_cell(executed)
        parts.append(f"<p class=error>{html.escape(error or run.error)}</p>")
        if source:
            parts.append(f"<pre>{html.escape(source)}</pre>")
    if figure:
        parts.append(f'<img src="{HTML_DIR}/{figure.name}" alt="main figure of {title}">')
    return "\n".join([*parts, "</section>"])


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}
section{border-left:6px solid #2a2;padding:0 1em;margin:1.5em 0}section.failed{border-color:#c22}
small{color:#666;font-weight:normal}.error{color:#c22;font-weight:bold}img{max-width:100%}
pre{background:#f4f4f4;padding:.5em;overflow:auto;max-height:20em}"""


def write_index(runs: list, out_dir: Path, profile: str, total_seconds: float) -> Path:
    """Write `outputs/index.html` (and the notebooks' HTML pages) for these runs; its path."""
    out_dir = Path(out_dir)
    ok = sum(r.status == "ok" for r in runs)
    body = "\n".join(_section(run, out_dir) for run in runs)
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>Stable Diffusion, dissected: the series</title>"
            f"<style>{STYLE}</style></head><body><h1>Stable Diffusion, dissected</h1>"
            f"<p>Profile <b>{html.escape(profile)}</b>: {ok} of {len(runs)} notebooks passed in "
            f"{total_seconds / 60:.1f} min.</p>{body}</body></html>\n")
    path = out_dir / INDEX
    path.write_text(page, encoding="utf-8")
    return path
