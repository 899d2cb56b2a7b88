"""CSV input read row by row with its physical line numbers, and what to say when ``csv`` refuses
a row (a shared leaf: the proxy's batch reader and the records importers use it).

``csv.reader`` reports neither where a bad record starts nor how many lines it swallowed, and
its messages are terse ("unexpected end of data", "field larger than field limit (131072)").
Read through :class:`CountedLines` and describe a ``csv.Error`` with :func:`diagnose`: the line
where the record starts, what went wrong in words, and which later lines ran into it. Readers
should use ``strict=True``: without it an unclosed quote (RFC 4180 §2, rule 7) raises nothing
and silently turns every following line into the text of one field. No message holds cell
content.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = ["FIELD_TOO_LARGE", "MALFORMED", "UNCLOSED_QUOTE", "CountedLines", "CsvProblem", "diagnose"]

#: :attr:`CsvProblem.kind` values.
UNCLOSED_QUOTE = "unclosed-quote"
FIELD_TOO_LARGE = "field-too-large"
MALFORMED = "malformed"


class CountedLines:
    """Iterate over text lines (as ``csv.reader`` wants them), counting them in :attr:`n`.

    Before asking the reader for the next record, ``n + 1`` is the line that record starts on;
    after a ``csv.Error``, ``n`` is the last line the reader consumed for it.
    """

    def __init__(self, lines: Iterable[str]):
        self._it = iter(lines)
        self.n = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line = next(self._it)
        self.n += 1
        return line


@dataclass(frozen=True)
class CsvProblem:
    """A record ``csv`` refused.

    Attributes:
        kind: :data:`UNCLOSED_QUOTE` (end of input inside a quoted field), :data:`FIELD_TOO_LARGE`
            (a field over ``csv.field_size_limit()``) or :data:`MALFORMED` (anything else).
        start: the 1-based physical line the record starts on.
        end: the last line the reader consumed for it (``> start`` when later lines ran into it).
        message: ``"CSV line <start>: …"``, naming the lines that ran into it.
    """

    kind: str
    start: int
    end: int
    message: str

    @property
    def swallowed(self) -> range:
        """The later lines (1-based) the reader read into this record's field."""
        return range(self.start + 1, self.end + 1)


def diagnose(error: csv.Error, start: int, end: int) -> CsvProblem:
    """Describe ``error``, raised for the record that starts on line ``start`` after the reader
    consumed lines ``start..end``.

    Returns:
        the :class:`CsvProblem`; ``csv``'s own reason is kept only for :data:`MALFORMED` (it
        never quotes cell content).
    """
    end = max(end, start)
    msg = str(error)
    if "field larger than field limit" in msg:
        text = (f"CSV line {start}: a field is longer than the CSV reader's limit of "
                f"{csv.field_size_limit()} characters (Python csv.field_size_limit)")
        if end > start:
            text += (f" (or a quote opened on line {start} is never closed: lines {start}..{end} "
                     "were read into one field)")
        return CsvProblem(FIELD_TOO_LARGE, start, end, text)
    if "unexpected end of data" in msg or (end > start and "expected after" not in msg):
        swallowed = f"; lines {start + 1}..{end} were read into it" if end > start else ""
        return CsvProblem(UNCLOSED_QUOTE, start, end,
                          f"CSV line {start}: a quoted field is never closed (its closing quote is "
                          f"missing, so the rest of the file runs into it{swallowed})")
    return CsvProblem(MALFORMED, start, end, f"CSV line {start} is malformed: {msg}")
