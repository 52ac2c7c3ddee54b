"""Stop strings on decoded text, kept free of torch so they are unit-testable on their own.

Example:
    >>> trim_at_stop("Paris.\\nUser: and Rome?", ["\\nUser:", "###"])
    ('Paris.', True)
"""

from __future__ import annotations

from collections.abc import Sequence


def first_stop(text: str, stops: Sequence[str]) -> int:
    """Index where the earliest stop string in `text` begins, or -1 if none occurs.

    Earliest by position, not by order in `stops`: the answer ends where any stop first shows.
    """
    hits = [i for i in (text.find(stop) for stop in stops if stop) if i >= 0]
    return min(hits, default=-1)


def trim_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` before its earliest stop string.

    Args:
        text: decoded completion.
        stops: stop strings; empty strings are ignored.

    Returns:
        The text before the first stop, and whether a stop was found.
    """
    cut = first_stop(text, stops)
    return (text, False) if cut < 0 else (text[:cut], True)
