"""Strict JSON for the records dyndepth writes (metrics.jsonl, results.json, study.json, rows.json, ...).

Python's `json` writes a NaN or infinite float as the bare word `NaN` / `Infinity`, which is not JSON: jq,
JavaScript's JSON.parse and most strict parsers refuse the whole file. A diverged loss (NaN) or an overflowed
perplexity (inf) is written as `null` instead, as JavaScript's JSON.stringify and pandas' to_json write it: in a
numeric field of these files, null means "not a finite number". Our own readers take such a null back as NaN
(`number`, `numbers`), so a plot draws a gap and arithmetic stays NaN, as it was before the file was written.
"""

from __future__ import annotations

import json
import math


def finite(obj):
    """`obj` with every non-finite float, in any nested dict / list / tuple, replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """json.dumps, strict: non-finite floats as null (allow_nan=False then proves none is left)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def number(value) -> float:
    """A numeric field as read back: null (a non-finite value when written) as NaN."""
    return math.nan if value is None else value


def numbers(record: dict, keys) -> dict:
    """`record` with each of `keys` it holds read by `number` (the others, e.g. a legitimately null field, kept)."""
    return {k: number(v) if k in keys else v for k, v in record.items()}
