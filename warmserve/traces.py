"""Real traces shipped with the package (see warmserve/data/*/SOURCE.txt and licences)."""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

WEEK_S = 7 * 86_400
BUCKET_S = 10
AZURE_SERVICES = {"conv": "Conversation", "code": "Coding"}


class TraceError(ValueError):
    pass


def _data_text(*parts: str) -> str:
    ref = resources.files("warmserve.data")
    for part in parts:
        ref = ref.joinpath(part)
    with ref.open("rb") as raw, gzip.open(raw, "rt") as text:
        return text.read()


@cache
def azure_week_counts(service: str) -> np.ndarray:
    """Azure LLM inference 2024 request counts per 10 s, re-indexed so index 0 is Monday 00:00.

    The trace starts on a Sunday (Conversation) or Friday (Coding); it is rotated, as the
    reference system does, wrapping the days before Monday to the end of the week.
    """
    name = AZURE_SERVICES[service]
    rows = list(
        csv.reader(
            io.StringIO(_data_text("azure_llm_2024_agg", f"invocations_ten_second_{name}.csv.gz"))
        )
    )
    start = datetime.strptime(rows[1][0], "%Y-%m-%d %H:%M:%S")
    counts = np.array([int(r[1]) for r in rows[1:]], dtype=np.int64)
    week = np.zeros(WEEK_S // BUCKET_S, dtype=np.int64)
    offset = (start.weekday() * 86_400 + start.hour * 3600 + start.minute * 60) // BUCKET_S
    np.add.at(week, (offset + np.arange(len(counts))) % len(week), counts)
    return week


@cache
def azure_2023_lengths(service: str) -> tuple[np.ndarray, np.ndarray]:
    """(ContextTokens, GeneratedTokens) per request of the Azure 2023 trace of the service."""
    text = _data_text("azure_llm_2023", f"AzureLLMInferenceTrace_{service}.csv.gz")
    rows = list(csv.reader(io.StringIO(text)))[1:]
    ctx = np.array([int(r[1]) for r in rows], dtype=np.int64)
    gen = np.array([int(r[2]) for r in rows], dtype=np.int64)
    return ctx, gen


@dataclass(frozen=True, slots=True)
class CsvTrace:
    arrival_s: np.ndarray
    model: list[str]
    input_tokens: np.ndarray
    output_tokens: np.ndarray


def load_csv_trace(path: Path) -> CsvTrace:
    """A user trace: header `timestamp_s,model,input_tokens,output_tokens`, one request a row."""
    want = ["timestamp_s", "model", "input_tokens", "output_tokens"]
    try:
        with path.open(newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip() for h in header] != want:
                raise TraceError(f"{path}: header must be {','.join(want)}")
            arr, models, inp, out = [], [], [], []
            for lineno, row in enumerate(reader, start=2):
                if not row:
                    continue
                try:
                    t, m, i, o = row
                    arr.append(float(t))
                    models.append(m.strip())
                    inp.append(int(i))
                    out.append(int(o))
                except ValueError:
                    raise TraceError(f"{path}:{lineno}: bad row {row!r}") from None
                if arr[-1] < 0 or inp[-1] < 1 or out[-1] < 1:
                    raise TraceError(f"{path}:{lineno}: negative time or empty request")
    except OSError as e:
        raise TraceError(f"cannot read trace {path}: {e.strerror}") from None
    if not arr:
        raise TraceError(f"{path}: no requests")
    order = np.argsort(np.array(arr), kind="stable")
    return CsvTrace(
        np.array(arr)[order],
        [models[k] for k in order],
        np.array(inp, dtype=np.int64)[order],
        np.array(out, dtype=np.int64)[order],
    )
