"""What happens to a record that cannot be used: a clear error, or a counted skip.

Every reader reports a bad record through `BadRecords.report(source, reason, line)`, where
`source` names the file (or the task and template) and `line` the line, when there is one. With
`on_bad_record="error"` (the default) that raises `BadRecordError`; with `"skip"` it logs a
warning and counts the record, so nothing is dropped silently.

How the count reaches the manifest and the run's metrics: every row of the stream carries
`bad_records_skipped`, the number of records skipped so far in the deterministic stream
(the running total at the end of the row's block of rows).
The largest value a consumer has seen is the count so far (trainers log it as a metric);
`prepare()` writes the final total and the per-file counts into manifest.json.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger(__name__)

POLICIES = ("error", "skip")


class BadRecordError(ValueError):
    """A record the pipeline cannot use. The message names the file and line (or task)."""


class BadRecords:
    """The error-or-skip policy, and the count of what was skipped (per file or task)."""

    def __init__(self, policy: str = "error"):
        if policy not in POLICIES:
            raise ValueError(f"on_bad_record: {policy!r} is not one of {', '.join(POLICIES)}")
        self.policy = policy
        self.by_source: Counter[str] = Counter()

    @property
    def skipped(self) -> int:
        return sum(self.by_source.values())

    def report(self, source: str, reason: str, line: int | None = None) -> None:
        """Raise, or count and warn. `source` is a file, or a task and template."""
        where = source if line is None else f"{source}:{line}"
        if self.policy == "error":
            raise BadRecordError(f"{where}: {reason} (set on_bad_record: skip to skip such records)")
        self.by_source[source] += 1
        log.warning("skipped bad record at %s: %s", where, reason)
