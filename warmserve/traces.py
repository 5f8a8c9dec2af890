"""Real traces shipped with the package (see warmserve/data/*/SOURCE.txt and licences)."""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

WEEK_S = 7 * 86_400
BUCKET_S = 10
AZURE_SERVICES = {"conv": "Conversation", "code": "Coding"}


class TraceError(ValueError):
    pass


def _data_path(*parts: str) -> Any:
    ref: Any = resources.files("warmserve.data")
    for part in parts:
        ref = ref.joinpath(part)
    return ref


def _data_text(*parts: str) -> str:
    with _data_path(*parts).open("rb") as raw, gzip.open(raw, "rt") as text:
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


SERVEGEN_WINDOW_S = 600  # rate windows of the ServeGen client traces
SERVEGEN_LENGTH_WINDOW_S = 21_600  # token-length PMFs per 6 hours


@dataclass(frozen=True, slots=True)
class ServeGenClient:
    client: str
    rate: np.ndarray  # requests/s per 10-minute window, from day 0 00:00
    cv: np.ndarray  # inter-arrival coefficient of variation per window (0: unknown)
    lengths: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    # 6-h window start -> (input values, input probabilities, output values, probabilities)


@cache
def servegen_clients(model: str) -> tuple[ServeGenClient, ...]:
    """The shipped ServeGen clients of `model`, busiest first (see data/servegen/CLIENTS.txt).
    Read once per process (parsing the length distributions takes seconds); do not modify."""
    root = _data_path("servegen")
    if not root.joinpath(model).is_dir():
        raise TraceError(f"no ServeGen data for model {model!r} (shipped: m-mid)")
    lines = root.joinpath("CLIENTS.txt").read_text().splitlines()
    order = next(ln.split() for ln in lines if ln.strip() and ln.replace(" ", "").isdigit())
    out = []
    for client in order:
        text = _data_text("servegen", model, f"chunk-{client}-trace.csv.gz")
        rows = [r for r in csv.reader(io.StringIO(text)) if r]
        rate = np.array([float(r[1]) for r in rows])
        cv = np.array([float(r[2] or 0.0) for r in rows])
        lengths = {}
        ds = root.joinpath(model, f"chunk-{client}-dataset.json.gz")
        if ds.is_file():
            with ds.open("rb") as raw, gzip.open(raw, "rt") as f:
                for start, pmfs in json.load(f).items():
                    inp = ast.literal_eval(pmfs["input_tokens"])
                    out_ = ast.literal_eval(pmfs["output_tokens"])
                    if inp and out_:
                        lengths[int(start)] = (
                            np.array(list(inp), dtype=np.int64),
                            np.array(list(inp.values())) / sum(inp.values()),
                            np.array(list(out_), dtype=np.int64),
                            np.array(list(out_.values())) / sum(out_.values()),
                        )
        out.append(ServeGenClient(client, rate, cv, lengths))
    return tuple(out)
