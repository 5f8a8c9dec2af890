"""`warmserve bench`: replay a real trace against any OpenAI-compatible endpoint.

Each trace stream becomes one served model name; every request is a streamed
`/v1/completions` call whose prompt has about the trace's input length (random common words,
seeded: unique to the request, or after a per-model shared prefix with
`--shared-prefix-tokens`) and whose output is
the trace's output length (`ignore_eos`, a vLLM extension WarmServe also takes; servers that
ignore it may stop early, and usage then reports what they produced). TTFT is measured from
the request's scheduled arrival, so a slow client or server never hides queueing.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from warmserve.traces import TraceError, load_csv_trace
from warmserve.workload.builders import (
    AzureSpec,
    ServeGenSpec,
    Workload,
    build_azure,
    build_servegen,
    from_trace,
)
from warmserve.workload.records import (
    RequestLog,
    RequestRow,
    summarize_requests,
    write_request_rows,
)
from warmserve.workload.trace_name import TRACE_NAMES, parse_trace_name

# 256 common English words, each one token (with or without a leading space) in SmolLM2's
# vocabulary (tests/test_bench_prompts.py); common words are single tokens in most BPE
# vocabularies.
# Prompts draw them at random, so two prompts share a 16-token KV block with probability
# 256^-16: no prefix-cache hits unless a shared prefix is asked for.
_WORDS = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on",
          "be", "at", "by", "this", "had", "not", "are", "but", "from", "or", "have", "an",
          "they", "which", "one", "you", "were", "her", "all", "she", "there", "would", "their",
          "we", "him", "been", "has", "when", "who", "will", "more", "no", "if", "out", "so",
          "said", "what", "up", "its", "about", "into", "than", "them", "can", "only", "other",
          "new", "some", "could", "time", "these", "two", "may", "then", "do", "first", "any",
          "my", "now", "such", "like", "our", "over", "man", "me", "even", "most", "made",
          "after", "also", "did", "many", "before", "must", "through", "back", "years", "where",
          "much", "your", "way", "well", "down", "should", "because", "each", "just", "those",
          "people", "how", "too", "little", "state", "good", "very", "make", "world", "still",
          "own", "see", "men", "work", "long", "get", "here", "between", "both", "life", "being",
          "under", "never", "day", "same", "another", "know", "while", "last", "might", "us",
          "great", "old", "year", "off", "come", "since", "against", "go", "came", "right",
          "used", "take", "three", "states", "few", "house", "use", "during", "without", "again",
          "place", "around", "however", "home", "small", "found", "thought", "went", "say",
          "part", "once", "general", "high", "upon", "school", "every", "does", "got", "left",
          "number", "course", "war", "until", "always", "away", "something", "fact", "though",
          "water", "less", "public", "put", "think", "almost", "hand", "enough", "far", "head",
          "yet", "government", "system", "better", "set", "nothing", "night", "end", "why",
          "called", "find", "going", "look", "later", "point", "next", "city", "give", "group",
          "young", "let", "room", "president", "side", "social", "given", "present", "several",
          "order", "national", "possible", "rather", "second", "face", "per", "among", "form",
          "important", "often", "things", "early", "white", "case", "large", "big", "need",
          "four", "within", "felt", "along", "best", "church", "ever", "least", "power",
          "development", "light", "thing", "family", "interest", "want", "members", "mind",
          "country", "area", "others")  # fmt: skip


class BenchError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class BenchConfig:
    endpoint: str
    trace: str  # azure-conv | azure-code | servegen:MODEL | FILE.csv
    models: tuple[str, ...]
    rps: float = 1.0  # mean rate in trace time (Azure and ServeGen)
    time_scale: float = 1.0  # replay S times faster than the trace
    duration_s: float = 60.0  # of trace time
    start_hour: float = 12.0
    alpha: float = 2.0
    max_input_tokens: int = 512
    max_output_tokens: int = 128
    min_output_tokens: int = 1
    max_requests: int = 10_000
    seed: int = 0
    api_key: str | None = None
    ignore_eos: bool = True
    request_timeout_s: float = 300.0
    slo_ttft_s: float = 5.0
    slo_tpot_s: float = 0.5
    label: str = "endpoint"
    # 0: every prompt is unique. N > 0: every prompt of a model longer than N tokens starts
    # with the same N-token prefix (a shared system prompt), as a prefix cache would see.
    shared_prefix_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.models:
            raise BenchError("--models: give at least one model name")
        if self.time_scale <= 0 or self.duration_s <= 0 or self.rps <= 0:
            raise BenchError("--time-scale, --duration and --rps must be > 0")
        if self.max_requests < 1:
            raise BenchError("--max-requests must be >= 1")
        if self.shared_prefix_tokens < 0:
            raise BenchError("--shared-prefix-tokens must be >= 0")
        if not self.endpoint.startswith(("http://", "https://")):
            raise BenchError(f"--endpoint {self.endpoint!r} is not an http(s) URL")


def build_workload(cfg: BenchConfig) -> Workload:
    names = list(cfg.models)
    lens = [cfg.max_input_tokens + cfg.max_output_tokens] * len(names)
    times = [lambda i, o: 0.05 * o] * len(names)  # only for forecast history, unused here
    trace = parse_trace_name(cfg.trace)
    if trace is None:
        raise BenchError(f"--trace {cfg.trace!r}: use {TRACE_NAMES}")
    if trace.kind == "azure":
        spec = AzureSpec(trace.arg, cfg.rps, cfg.alpha, cfg.start_hour,
                         None, cfg.duration_s, cfg.max_input_tokens, cfg.min_output_tokens,
                         cfg.max_output_tokens)  # fmt: skip
        return build_azure(spec, names, lens, times, 300.0, "day", cfg.seed)
    if trace.kind == "servegen":
        sg = ServeGenSpec(trace.arg, cfg.rps, 13, cfg.start_hour,
                          cfg.duration_s, cfg.max_input_tokens, cfg.min_output_tokens,
                          cfg.max_output_tokens)  # fmt: skip
        try:
            return build_servegen(sg, names, lens, times, 300.0, cfg.seed)
        except (ValueError, OSError) as e:
            raise BenchError(str(e)) from None
    csv = load_csv_trace(Path(trace.arg))
    # Trace streams, busiest first, map onto the given names in order (cycling).
    streams, counts = np.unique(np.array(csv.model), return_counts=True)
    order = [str(s) for s in streams[np.argsort(-counts, kind="stable")]]
    mapping = {s: names[k % len(names)] for k, s in enumerate(order)}
    inp = np.minimum(csv.input_tokens, cfg.max_input_tokens)
    out = np.clip(csv.output_tokens, cfg.min_output_tokens, cfg.max_output_tokens)
    return from_trace(names, csv.arrival_s, [mapping[x] for x in csv.model], inp, out,
                      cfg.duration_s)  # fmt: skip


def _words(rng: np.random.Generator, n: int) -> list[str]:
    return [_WORDS[i] for i in rng.integers(0, len(_WORDS), size=n)]


def prompt_text(num_tokens: int, k: int, seed: int = 0, prefix: str = "",
                prefix_tokens: int = 0) -> str:  # fmt: skip
    """Request `k`'s prompt: about `num_tokens` tokens of plain words drawn from a generator
    seeded by (seed, k), so every request's prompt is its own and a rerun sends the same
    ones. With `prefix` (of `prefix_tokens` words), the prompt starts with it and the
    request's own words fill the rest."""
    n = max(1, num_tokens)
    own = _words(np.random.default_rng((seed, k)), n - prefix_tokens if prefix else n)
    return " ".join(([prefix] if prefix else []) + own)


def shared_prefix(model_index: int, num_tokens: int, seed: int = 0) -> str:
    """The prefix every request of one model starts with in a shared-prefix workload (a
    system prompt, say): `num_tokens` words, seeded by (seed, model)."""
    # The 2**32 keeps these streams apart from the per-request ones (k < 2**32).
    return " ".join(_words(np.random.default_rng((seed, 2**32, model_index)), num_tokens))


def request_prompts(cfg: BenchConfig, wl: Workload, n: int) -> list[str]:
    """The first `n` requests' prompts, of the trace's input lengths."""
    p = cfg.shared_prefix_tokens
    prefixes = [shared_prefix(m, p, cfg.seed) for m in range(len(wl.model_names))] if p else []
    out = []
    for k in range(n):
        num = int(wl.input_tokens[k])
        if p and num > p:
            out.append(prompt_text(num, k, cfg.seed, prefixes[int(wl.model_idx[k])], p))
        else:  # no longer than the prefix: the request's own words only
            out.append(prompt_text(num, k, cfg.seed))
    return out


@dataclass(slots=True)
class _Result:
    first_s: float = float("nan")
    finish_s: float = float("nan")
    tokens: int = 0
    error: str | None = None


async def _one(client: httpx.AsyncClient, cfg: BenchConfig, model: str, prompt: str,
               max_tokens: int, t0: float, res: _Result) -> None:  # fmt: skip
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                            "stream": True, "temperature": 0.0,
                            "stream_options": {"include_usage": True}}  # fmt: skip
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    chunks = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                res.error = f"HTTP {r.status_code}: {text[:200]}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"].get("message"))
                    return
                if obj.get("usage"):
                    res.tokens = int(obj["usage"].get("completion_tokens") or chunks)
                for ch in obj.get("choices") or []:
                    if ch.get("text"):
                        chunks += 1
                        if np.isnan(res.first_s):
                            res.first_s = time.perf_counter() - t0
        res.finish_s = time.perf_counter() - t0
        res.tokens = res.tokens or chunks
        if np.isnan(res.first_s):
            res.first_s = res.finish_s  # no text at all (e.g. an immediate stop)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"


async def replay(cfg: BenchConfig, wl: Workload, quiet: bool = False) -> list[_Result]:
    n = min(wl.num_requests, cfg.max_requests)
    results = [_Result() for _ in range(n)]
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=10.0)
    async with httpx.AsyncClient(base_url=cfg.endpoint.rstrip("/"), headers=headers,
                                 limits=limits, timeout=timeout) as client:  # fmt: skip
        bar = tqdm(total=n, unit="req", desc="bench", disable=quiet)
        tasks = []
        prompts = request_prompts(cfg, wl, n)
        t0 = time.perf_counter()
        for k in range(n):
            at = float(wl.arrival_s[k]) / cfg.time_scale
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            model = wl.model_names[int(wl.model_idx[k])]
            prompt = prompts[k]
            out = int(wl.output_tokens[k])

            async def run(k: int = k, model: str = model, prompt: str = prompt, out: int = out,
                          start: float = t0 + at) -> None:  # fmt: skip
                await _one(client, cfg, model, prompt, out, start, results[k])
                bar.update()

            tasks.append(asyncio.create_task(run()))
        await asyncio.gather(*tasks)
        bar.close()
    return results


def summarize(cfg: BenchConfig, wl: Workload, results: list[_Result]) -> dict[str, Any]:
    n = len(results)
    arrival = wl.arrival_s[:n] / cfg.time_scale
    log = RequestLog.create(arrival, wl.model_idx[:n],
                            np.array([max(r.tokens, 1) for r in results]),
                            np.full(n, cfg.slo_ttft_s), np.full(n, cfg.slo_tpot_s))  # fmt: skip
    ok = np.array([r.error is None for r in results])
    log.first_token_s[:] = np.where(ok, arrival + [r.first_s for r in results], np.nan)
    log.finish_s[:] = np.where(ok, arrival + [r.finish_s for r in results], np.nan)
    failed_ttft = cfg.request_timeout_s

    def one(mask: np.ndarray) -> dict[str, Any]:
        s = summarize_requests(log, mask, [], [], failed_ttft)
        for key in ("cold_starts", "prewarm_hits", "inprogress_hits", "forecast_peak_rel_error"):
            s[key] = None  # not observable from outside the server
        return s

    summary = one(np.ones(n, dtype=bool))
    summary["per_model"] = {
        name: one(wl.model_idx[:n] == k) for k, name in enumerate(wl.model_names)
    }
    errors = [r.error for r in results if r.error]
    summary["errors"] = errors[:20]
    return summary


def write_outputs(out: Path, cfg: BenchConfig, wl: Workload, results: list[_Result],
                  summary: dict[str, Any]) -> None:  # fmt: skip
    from warmserve.sim.report import plot_ttft_cdf

    out.mkdir(parents=True, exist_ok=True)
    doc = {"experiment": "bench", "endpoint": cfg.endpoint, "trace": cfg.trace,
           "time_scale": cfg.time_scale, "duration_s": cfg.duration_s, "rps": cfg.rps,
           "requests": len(results), "failed_ttft_s": cfg.request_timeout_s,
           "slo": {"ttft_s": cfg.slo_ttft_s, "tpot_s": cfg.slo_tpot_s},
           "policies": {cfg.label: summary}}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
    rows = (
        RequestRow(
            float(wl.arrival_s[k] / cfg.time_scale),
            wl.model_names[int(wl.model_idx[k])],
            int(wl.input_tokens[k]),
            int(wl.output_tokens[k]),
            r.first_s if r.error is None else None,
            r.finish_s if r.error is None else None,
            r.tokens,
            r.error or "",
            cfg.label,
        )
        for k, r in enumerate(results)
    )
    write_request_rows(out / "requests.csv", rows)  # one row a request, for analysis
    curves = []
    for k, name in enumerate(wl.model_names):
        mine = [r for i, r in enumerate(results) if wl.model_idx[i] == k]
        ttft = np.array([r.first_s for r in mine if r.error is None])
        curves.append((name, ttft, len(mine)))
    plot_ttft_cdf(out / "ttft_cdf.png", curves)


def table(summary: dict[str, Any]) -> str:
    def f(x: Any, fmt: str = ".3f") -> str:
        return "-" if x is None else format(x, fmt)

    rows = [("all", summary), *summary["per_model"].items()]
    lines = [f"{'model':16s} {'done':>9s} {'TTFT p50':>9s} {'p90':>8s} {'p99':>8s} "
             f"{'TPOT mean':>10s} {'p99':>8s} {'req/s':>7s} {'SLO':>6s}"]  # fmt: skip
    for name, s in rows:
        lines.append(
            f"{name:16s} {s['completed']:>4d}/{s['arrived']:<4d} {f(s['ttft_p50_s']):>9s} "
            f"{f(s['ttft_p90_s']):>8s} {f(s['ttft_p99_s']):>8s} {f(s['tpot_mean_s']):>10s} "
            f"{f(s['tpot_p99_s']):>8s} {f(s['throughput_rps'], '.2f'):>7s} "
            f"{f(s['slo_attainment'], '.1%'):>6s}"
        )
    return "\n".join(lines)


def check_endpoint(cfg: BenchConfig) -> None:
    """Fail fast, with one line, when the endpoint is down or lacks a model."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    url = cfg.endpoint.rstrip("/") + "/v1/models"
    try:
        r = httpx.get(url, headers=headers, timeout=10.0)
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach {url}: {e}") from None
    if r.status_code != 200:
        raise BenchError(f"{url} answered HTTP {r.status_code}: {r.text[:200]}")
    served = {m.get("id") for m in r.json().get("data", [])}
    missing = [m for m in cfg.models if m not in served]
    if missing:
        raise BenchError(f"the endpoint does not serve {missing[0]!r} (it serves: "
                         f"{', '.join(sorted(str(x) for x in served))})")  # fmt: skip


def run_bench(cfg: BenchConfig, out: Path | None, quiet: bool = False) -> dict[str, Any]:
    check_endpoint(cfg)
    try:
        wl = build_workload(cfg)
    except TraceError as e:
        raise BenchError(str(e)) from None
    if wl.num_requests == 0:
        raise BenchError("the trace has no requests in that window; raise --duration or --rps")
    results = asyncio.run(replay(cfg, wl, quiet))
    summary = summarize(cfg, wl, results)
    if out is not None:
        write_outputs(out, cfg, wl, results, summary)
    return summary
