"""The task's guidelines (``preftune annotate serve --guidelines guide.md``): a small Markdown subset, parsed here
into plain data that the page builds with ``textContent`` — never HTML, so a ``<script>`` in the file is shown
as the text it is.

The subset: ``#``/``##``/``###`` headings, paragraphs (lines joined, a blank line between), ``-``/``*`` and
``1.`` lists (one line per entry), fenced code blocks (```` ``` ````), and inline ``**strong**``, ``*em*`` /
``_em_`` and `` `code` ``; a link ``[text](url)`` is shown as ``text (url)``, not made clickable. Anything else
is text.

A block is ``{"kind": "h1" | "h2" | "h3" | "p", "spans": [...]}``, ``{"kind": "ul" | "ol", "items": [[...], …]}``
or ``{"kind": "pre", "text": str}``; a span is ``{"text": str, "style": "" | "strong" | "em" | "code"}``.
"""

from __future__ import annotations

import re
from pathlib import Path

from preftune.errors import DataError

MAX_BYTES = 64 * 1024  # a page of guidelines, not a book

_HEADING = re.compile(r"^(#{1,3})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^\s*[-*+]\s+(.*)$")
_NUMBERED = re.compile(r"^\s*\d{1,9}[.)]\s+(.*)$")
_INLINE = re.compile(r"`([^`]+)`|\*\*(.+?)\*\*|__(.+?)__|\*([^*\s][^*]*?)\*|\b_([^_\s][^_]*?)_\b"
                     r"|\[([^\]]+)\]\(([^)\s]+)\)")


def spans(text: str) -> list[dict]:
    """Inline Markdown of one block as spans (see the module docstring)."""
    found: list[dict] = []
    at = 0
    for match in _INLINE.finditer(text):
        if match.start() > at:
            found.append({"text": text[at:match.start()], "style": ""})
        code, strong, strong_, em, em_, link_text, url = match.groups()
        if code is not None:
            found.append({"text": code, "style": "code"})
        elif strong is not None or strong_ is not None:
            found.append({"text": strong if strong is not None else strong_, "style": "strong"})
        elif em is not None or em_ is not None:
            found.append({"text": em if em is not None else em_, "style": "em"})
        else:
            found.append({"text": f"{link_text} ({url})", "style": ""})
        at = match.end()
    if at < len(text):
        found.append({"text": text[at:], "style": ""})
    return found


def parse(markdown: str) -> list[dict]:
    """The blocks of ``markdown`` (see the module docstring)."""
    blocks: list[dict] = []
    paragraph: list[str] = []
    code: list[str] | None = None

    def end_paragraph() -> None:
        if paragraph:
            blocks.append({"kind": "p", "spans": spans(" ".join(paragraph))})
            paragraph.clear()

    for line in markdown.splitlines():
        if code is not None:  # inside a fence: verbatim until the closing one
            if line.strip().startswith("```"):
                blocks.append({"kind": "pre", "text": "\n".join(code)})
                code = None
            else:
                code.append(line)
            continue
        if line.strip().startswith("```"):
            end_paragraph()
            code = []
        elif not line.strip():
            end_paragraph()
        elif heading := _HEADING.match(line):
            end_paragraph()
            blocks.append({"kind": f"h{len(heading.group(1))}", "spans": spans(heading.group(2))})
        elif (entry := _BULLET.match(line) or _NUMBERED.match(line)) is not None:
            end_paragraph()
            kind = "ul" if _BULLET.match(line) else "ol"
            if not blocks or blocks[-1]["kind"] != kind:
                blocks.append({"kind": kind, "items": []})
            blocks[-1]["items"].append(spans(entry.group(1).strip()))
        else:
            paragraph.append(line.strip())
    end_paragraph()
    if code is not None:  # an unclosed fence: keep what it held
        blocks.append({"kind": "pre", "text": "\n".join(code)})
    return blocks


def read_guidelines(path: str | Path) -> list[dict]:
    """The blocks of a guidelines file: UTF-8 Markdown of at most :data:`MAX_BYTES` bytes; a file that is missing,
    too big or not UTF-8 is a :class:`DataError` naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"--guidelines {path}: no such file; give the Markdown file your annotators should read "
                        "(e.g. --guidelines guide.md)")
    raw = path.read_bytes()
    if len(raw) > MAX_BYTES:
        raise DataError(f"--guidelines {path}: {len(raw)} bytes, at most {MAX_BYTES}; keep the guidelines to a page "
                        "and point to longer documents")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"--guidelines {path}, line {line}: not UTF-8 text; save the file as UTF-8") from e
    return parse(text)
