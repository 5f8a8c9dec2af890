"""`warmserve` command line: `serve`, `bench`, `simulate`, `calibrate`, `models prepare` and
`models check`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from warmserve.bench import BenchError
from warmserve.control.registry import POLICIES
from warmserve.experiment import ExperimentError
from warmserve.models import PACKAGED, ModelPrepError
from warmserve.traces import TraceError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="warmserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="replay a workload on a simulated cluster")
    sim.add_argument("experiment", type=Path, help="experiment YAML file")
    sim.add_argument("--policies", help=f"comma-separated, from: {', '.join(POLICIES)}")
    sim.add_argument("--out", type=Path, help="output folder (default: results/<name>)")
    sim.add_argument("--seed", type=int, help="override the experiment's seed")
    sim.add_argument(
        "--seeds",
        metavar="SEEDS",
        help="run every cell with each seed (1-5 or 1,2,3) and report mean and min-max",
    )
    sim.add_argument(
        "--sweep",
        metavar="KEY=V1,V2,...",
        help="run every policy at each value of one setting: rps, alpha, burstiness_cv, or "
        "a dotted key (costs.serverless_engine_init_s, control.keep_alive_s, workload.X, ...)",
    )
    sim.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        help="override one setting of the experiment, as its YAML would (repeatable), e.g. "
        "costs.engine_attach_s=0.1",
    )
    sim.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="N",
        help="rate sweeps: N bisections per policy between its highest passing rate and the "
        "next swept rate (adaptive grid near the knee)",
    )
    sim.add_argument(
        "--check", action="store_true", help="check page conservation after every event (slow)"
    )
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    serve = sub.add_parser("serve", help="run the OpenAI-compatible multi-model server")
    serve.add_argument("config", type=Path, nargs="?",
                       help="serve YAML file (default: the embedded one, see README)")  # fmt: skip
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8000)")
    serve.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run the workers as Ray actors on the cluster at ADDRESS "
                       "(e.g. auto), or on a private single-node Ray without one")  # fmt: skip
    serve.add_argument("--print-default-config", action="store_true",
                       help="print the embedded default configuration and exit")  # fmt: skip
    bench = sub.add_parser("bench", help="replay a real trace against an OpenAI-compatible server")
    bench.add_argument("--endpoint", default="http://127.0.0.1:8000", help="server base URL")
    bench.add_argument("--trace", default="azure-conv",
                       help="azure-conv, azure-code, servegen:MODEL (e.g. servegen:m-mid) or a "
                            "CSV file (timestamp_s,model,input_tokens,output_tokens)")  # fmt: skip
    bench.add_argument("--models", required=True, help="comma-separated served model names")
    bench.add_argument("--rps", type=float, default=1.0, help="mean rate in trace time")
    bench.add_argument("--time-scale", type=float, default=1.0,
                       help="replay this many times faster than the trace")  # fmt: skip
    bench.add_argument("--duration", type=float, default=60.0, help="trace seconds to replay")
    bench.add_argument("--start-hour", type=float, default=12.0, help="trace time of day")
    bench.add_argument("--max-input-tokens", type=int, default=512)
    bench.add_argument("--max-output-tokens", type=int, default=128)
    bench.add_argument("--max-requests", type=int, default=10_000, help="a hard cap")
    bench.add_argument("--seed", type=int, default=0, help="seeds the trace and the prompts")
    bench.add_argument("--shared-prefix-tokens", type=int, default=0, metavar="N",
                       help="every prompt of a model starts with the same N tokens (default 0: "
                            "every prompt is unique)")  # fmt: skip
    bench.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    bench.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="do not ask the server to generate exactly the trace's output length",
    )
    bench.add_argument("--slo-ttft", type=float, default=5.0, help="TTFT bound for SLO (s)")
    bench.add_argument("--slo-tpot", type=float, default=0.5, help="TPOT bound for SLO (s)")
    bench.add_argument("--timeout", type=float, default=300.0, help="per-request timeout (s)")
    bench.add_argument("--out", type=Path, help="write summary.json and ttft_cdf.png here")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    cal = sub.add_parser(
        "calibrate",
        help="measure a device profile for the simulator with the real worker and engine",
    )
    cal.add_argument("--out", type=Path, required=True, help="profile file to write (YAML)")
    cal.add_argument("--device", default="cpu", help="cpu, or cuda[:N] (needs a GPU)")
    cal.add_argument("--models", default="smollm2,random-2l,random-8l",
                     help="comma-separated: smollm2, random-2l, random-8l (random Llama-style "
                          "models of 2 and 8 layers, ~0.5 and ~1.2 GB)")  # fmt: skip
    cal.add_argument("--steps-all", action="store_true",
                     help="fit step times on every model (default: the first, the one served; "
                          "the others give load and activation times by size)")  # fmt: skip
    cal.add_argument("--name", help="the profile's name (default: the file's stem)")
    cal.add_argument("--quick", action="store_true",
                     help="fewer points and one repeat (~1 minute); noisier")  # fmt: skip
    cal.add_argument(
        "--threads", type=int, help="torch threads (default: what one serve worker gets)"
    )
    cal.add_argument("--pool-mib", type=int, default=1536, help="the page pool (CPU: the "
                     "profile's memory)")  # fmt: skip
    cal.add_argument("--drop-caches", action="store_true",
                     help="also time loads from disk by dropping the page cache (root; slows "
                          "everything else on the machine)")  # fmt: skip
    cal.add_argument(
        "--note", help="a line for the profile's header (e.g. how noisy the machine was)"
    )
    cal.add_argument("--step-clock", choices=("auto", "cpu", "wall"), default="auto",
                     help="time engine steps by the stepping thread's CPU time (cpu: what a "
                          "step takes on a core of its own, whatever else runs on the host) "
                          "or elapsed time (wall); auto: cpu on a CPU with one torch thread, "
                          "else wall")  # fmt: skip
    cal.add_argument("--quiet", action="store_true", help="no progress bar")
    models = sub.add_parser("models", help="prepare the packaged real models; check a folder")
    msub = models.add_subparsers(dest="models_command", required=True)
    prep = msub.add_parser("prepare", help="convert a packaged model once into an HF folder")
    prep.add_argument("model", nargs="?", default="smollm2", choices=tuple(PACKAGED),
                      help="smollm2 (SmolLM2-135M-Instruct, the default) or gemma3-270m "
                           "(needs the optional gemma extra)")  # fmt: skip
    prep.add_argument("--dir", type=Path, help="cache folder (default ~/.cache/warmserve/models)")
    prep.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32",
                      help="weights dtype (float32, the default, is what serve uses)")  # fmt: skip
    check = msub.add_parser("check", help="whether the engine runs an HF model folder exactly")
    check.add_argument("path", type=Path, help="a folder with config.json and *.safetensors")
    return p


def _bench(args: argparse.Namespace) -> int:
    from warmserve.bench import BenchConfig, run_bench, table

    cfg = BenchConfig(
        endpoint=args.endpoint,
        trace=args.trace,
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
        rps=args.rps,
        time_scale=args.time_scale,
        duration_s=args.duration,
        start_hour=args.start_hour,
        max_input_tokens=args.max_input_tokens,
        max_output_tokens=args.max_output_tokens,
        max_requests=args.max_requests,
        seed=args.seed,
        shared_prefix_tokens=args.shared_prefix_tokens,
        api_key=args.api_key,
        ignore_eos=not args.no_ignore_eos,
        request_timeout_s=args.timeout,
        slo_ttft_s=args.slo_ttft,
        slo_tpot_s=args.slo_tpot,
    )
    summary = run_bench(cfg, args.out, args.quiet)
    print(table(summary))
    if summary["errors"]:
        print(f"{summary['failed']} failed; first error: {summary['errors'][0]}")
    if args.out:
        print(f"wrote {args.out}/summary.json, requests.csv and ttft_cdf.png")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from warmserve.serve_config import (
        DEFAULT_YAML,
        PACKAGED_PATHS,
        default_config,
        load_serve_config,
        with_overrides,
    )

    if args.print_default_config:
        print(DEFAULT_YAML.strip())
        return 0
    cfg = load_serve_config(args.config) if args.config else default_config()
    cfg = with_overrides(cfg, args.host, args.port, args.ray)
    from warmserve.server import run_server

    def prepare(key: str) -> Path:
        return _prepare_packaged(key, None, "float32", " (first run)")

    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    needs = any(m.path in PACKAGED_PATHS for m in cfg.models)
    run_server(cfg, prepare if needs else None)
    return 0


def _prepare_packaged(key: str, cache_dir: Path | None, dtype: str, first: str = "") -> Path:
    """A packaged model's folder, converted (with a progress bar) if it is not yet."""
    from warmserve.models import is_prepared, model_dir, prepare

    if is_prepared(model_dir(key, cache_dir, dtype)):
        return model_dir(key, cache_dir, dtype)
    model = PACKAGED[key]
    with tqdm(total=len(model.steps), desc=model.title + first, unit="step") as bar:
        path = prepare(
            key, cache_dir, lambda name: (bar.set_postfix_str(name), bar.update()), dtype=dtype
        )
        bar.update(bar.total - bar.n)
    return path


def _models(args: argparse.Namespace) -> int:
    if args.models_command == "check":
        from warmserve.engine.arch import UnsupportedModel, check_model_dir

        try:
            shape = check_model_dir(args.path.name, args.path)
        except (UnsupportedModel, FileNotFoundError) as e:
            raise ModelPrepError(str(e)) from None
        print(f"{args.path}: {shape.architecture}, {shape.num_layers} layers: supported")
        return 0
    print(_prepare_packaged(args.model, args.dir, args.dtype))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import datetime

    from warmserve.calibration.measure import (
        MODEL_CHOICES,
        CalibrationConfig,
        run_calibration,
        total_ticks,
    )
    from warmserve.calibration.report import fit_table, write_outputs
    from warmserve.serve_config import WorkerConfig

    keys = tuple(k.strip() for k in args.models.split(",") if k.strip())
    bad = [k for k in keys if k not in MODEL_CHOICES]
    if bad or not keys:
        raise ExperimentError(f"--models: unknown model {bad[0] if bad else ''!r} "
                              f"(known: {', '.join(MODEL_CHOICES)})")  # fmt: skip
    threads = args.threads or WorkerConfig().torch_threads()
    try:
        cfg = CalibrationConfig(device=args.device, models=keys, quick=args.quick,
                                threads=threads, pool_mib=args.pool_mib,
                                drop_caches=args.drop_caches, steps_all=args.steps_all,
                                step_clock=args.step_clock)  # fmt: skip
    except ValueError as e:
        raise ExperimentError(f"calibrate: {e}") from None
    with tqdm(total=total_ticks(cfg), desc="calibrate", unit="step", disable=args.quiet) as bar:

        def tick(what: str) -> None:
            bar.set_postfix_str(what)
            bar.update()

        try:
            meas = run_calibration(cfg, tick)
        except RuntimeError as e:
            raise ExperimentError(str(e)) from None
    name = args.name or args.out.stem
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"Measured by `warmserve calibrate --device {args.device} --models {','.join(keys)}"
        f"{' --quick' if args.quick else ''}{' --steps-all' if args.steps_all else ''}` on "
        f"{when}:\n{meas.device_name}, {threads} torch thread(s). Step times: the fastest of "
        f"{cfg.repeats} repeat(s), "
        + ("the stepping thread's CPU time" if meas.step_clock == "cpu" else "wall clock")
        + f"; the report is in {args.out.stem}-report/."
        + (f"\n{args.note}" if args.note else "")
    )
    profile, fit, folder = write_outputs(meas, name, args.out, header)
    for label, real, model in fit_table(meas, profile):
        print(f"  {label:42s} measured {real * 1e3:8.1f} ms  model {model * 1e3:8.1f} ms  "
              f"{model / real - 1:+6.1%}")  # fmt: skip
    c = profile.costs
    print(f"step-time fit: mean |error| {fit.mean_abs_rel_error:.1%}, worst "
          f"{fit.max_abs_rel_error:.1%} over {len(meas.steps)} steps")  # fmt: skip
    print(f"activation {c.engine_attach_s + c.kv_initial_map_bytes / c.remap_bandwidth:.3f} s, "
          f"load {profile.device.host_to_device_bandwidth / 1e9:.2f} GB/s, worker start "
          f"{c.cold_engine_init_s:.2f} s")  # fmt: skip
    print(f"wrote {args.out} and {folder}/ (report.md, fit.png, measurements.json)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "simulate":
            from warmserve.cli_simulate import simulate

            return simulate(args)
        if args.command == "models":
            return _models(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "calibrate":
            return _calibrate(args)
    except (ExperimentError, TraceError, ModelPrepError, BenchError) as e:
        print(f"warmserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("warmserve: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
