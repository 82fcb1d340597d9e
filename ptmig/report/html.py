"""The report page: one self-contained HTML file beside its PNG plots.

`render_page(sections)` only assembles text; the caller (`ptmig.report.write_report`) draws the
plots and decides which sections exist. Every value from a document is escaped.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
pre { background: #f6f8fa; padding: 1em; white-space: pre-wrap; font-size: .85em; }
table { border-collapse: collapse; font-size: .9em; margin: 1em 0; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { background: #e3f5dc; border: 1px solid #7bc46a; padding: .6em 1em; }
.bad { background: #ffe3e3; border: 1px solid #e07070; padding: .6em 1em; }
figure { margin: 1em 0; } figcaption { font-size: .85em; color: #555; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


@dataclass
class Section:
    title: str
    parts: list[str] = field(default_factory=list)

    def para(self, text: str, cls: str | None = None) -> None:
        attr = f' class="{esc(cls)}"' if cls else ""
        self.parts.append(f"<p{attr}>{esc(text)}</p>")

    def pre(self, lines: Sequence[str]) -> None:
        self.parts.append("<pre>" + esc("\n".join(lines)) + "</pre>")

    def figure(self, src: str, alt: str, caption: str) -> None:
        self.parts.append(
            f'<figure><img src="{esc(src)}" alt="{esc(alt)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>"
        )

    def table(
        self, header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()
    ) -> None:
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = []
        for row in rows:
            cells = "".join(
                f'<td class="num">{esc(c)}</td>' if i in numeric else f"<td>{esc(c)}</td>"
                for i, c in enumerate(row)
            )
            body.append(f"<tr>{cells}</tr>")
        self.parts.append(
            f"<table><thead><tr>{head}</tr></thead><tbody>" + "".join(body) + "</tbody></table>"
        )

    def render(self) -> str:
        return f"<section><h2>{esc(self.title)}</h2>\n" + "\n".join(self.parts) + "</section>"


def render_page(title: str, intro: str, sections: Sequence[Section]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{esc(title)}</h1><p>{esc(intro)}</p>\n"
        + "\n".join(s.render() for s in sections)
        + "\n</body></html>\n"
    )


def machine_rows(machine: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(str(k), str(v)) for k, v in machine.items()]
