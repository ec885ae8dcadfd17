"""Figure labels that are wrapped, never cut (the report's figures and ``meddino viz`` share them)."""

from __future__ import annotations

import re

__all__ = ["wrap_label"]


def wrap_label(label: str, width: int = 28) -> str:
    """A label on as many lines of at most ``width`` characters as it needs, never cut, so that two runs
    whose names share a long prefix stay told apart: lines break after a separator (space / _ -) where
    one is, inside a longer piece otherwise."""
    pieces = [p for p in re.split(r"(?<=[ /_\-])", label) if p]
    lines, line = [], ""
    for piece in pieces:
        while len(piece) > width:  # a piece longer than a line: break it
            if line:
                lines.append(line.rstrip())
                line = ""
            lines.append(piece[:width])
            piece = piece[width:]
        if len(line) + len(piece.rstrip()) > width and line:
            lines.append(line.rstrip())
            line = ""
        line += piece
    if line:
        lines.append(line.rstrip())
    return "\n".join(lines) or label
