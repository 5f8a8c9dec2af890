"""`warmserve serve`: models prepared, worker processes up, the gateway listening."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvicorn

from warmserve.clock import unix_time
from warmserve.gateway.app import build_app
from warmserve.gateway.http import FLUSH_S, DrainingServer, header_timeout_protocol
from warmserve.gateway.serving import ModelCard, OpenAIServing
from warmserve.model_spec import read_hf_config
from warmserve.runtime.runtime import RuntimeModel, ServingRuntime
from warmserve.serve_config import PACKAGED_PATHS, ServeConfig, ServeConfigError, model_max_len

log = logging.getLogger("warmserve.server")


def resolve_models(
    cfg: ServeConfig, prepare: Callable[[str], Path] | None = None
) -> tuple[list[RuntimeModel], list[ModelCard]]:
    """Each served model's folder, context length, KV size and tokenizer. A model the engine
    does not run exactly is refused here, before any worker starts. `prepare` gives a
    packaged model's folder from its path name (e.g. "smollm2")."""
    from transformers import AutoTokenizer

    from warmserve.engine.arch import UnsupportedModel, check_model_dir

    if prepare is None:
        from warmserve.models import prepare as prepare_packaged

        def prepare(key: str) -> Path:
            return prepare_packaged(key, dtype="float32")

    prepared = {p: prepare(p) for p in dict.fromkeys(m.path for m in cfg.models)
                if p in PACKAGED_PATHS}  # fmt: skip
    runtime_models, cards = [], []
    tokenizers: dict[Path, object] = {}
    now = unix_time()
    for m in cfg.models:
        path = cfg.model_path(m, prepared.get(m.path))
        try:
            check_model_dir(m.name, path)
        except UnsupportedModel as e:
            raise ServeConfigError(str(e)) from None
        hf = read_hf_config(path)
        try:
            heads = int(hf["num_attention_heads"])
            head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // heads)
            kv_heads = int(hf.get("num_key_value_heads") or heads)
            layers = int(hf["num_hidden_layers"])
        except (KeyError, ValueError) as e:
            raise ServeConfigError(f"model {m.name!r}: {path}/config.json lacks {e}") from None
        item = 2 if str(hf.get("torch_dtype", hf.get("dtype", "float32"))) in (
            "bfloat16", "float16") else 4  # fmt: skip
        max_len = model_max_len(path, m.max_model_len)
        if path not in tokenizers:
            try:
                tokenizers[path] = AutoTokenizer.from_pretrained(path)
            except Exception as e:
                raise ServeConfigError(
                    f"model {m.name!r}: cannot load its tokenizer: {e}"
                ) from None
        runtime_models.append(
            RuntimeModel(m.name, path, max_len, 2 * layers * kv_heads * head_dim * item, m.priority)
        )
        cards.append(ModelCard.build(m.name, tokenizers[path], max_len, now))
    return runtime_models, cards


class Server:
    """The runtime and the ASGI app, wired; `uvicorn` or a test drives `app`."""

    def __init__(self, cfg: ServeConfig, prepare: Callable[[str], Path] | None = None) -> None:
        self.cfg = cfg
        models, cards = resolve_models(cfg, prepare)
        try:
            self.runtime = ServingRuntime(cfg, models)
        except ValueError as e:
            raise ServeConfigError(str(e)) from None
        self.serving = OpenAIServing(self.runtime, cards, cfg.limits.default_max_tokens)
        self.app = build_app(
            self.serving,
            self.runtime.metrics_text,
            cfg.api_keys,
            cfg.limits.max_request_bytes,
            on_startup=self.runtime.start,
            on_shutdown=self._stop,
            body_timeout_s=cfg.limits.body_timeout_s,
        )

    async def _stop(self) -> None:
        await self.runtime.shutdown(0)
        self.serving.close()

    def drain(self) -> Awaitable[None]:
        """SIGINT/SIGTERM: in-flight requests get `limits.shutdown_grace_s`, the rest fail."""
        return self.runtime.drain(self.cfg.limits.shutdown_grace_s)

    def uvicorn_config(self, log_level: str) -> uvicorn.Config:
        lim = self.cfg.limits
        return uvicorn.Config(
            self.app,
            host=self.cfg.listen.host,
            port=self.cfg.listen.port,
            log_level=log_level,
            http=header_timeout_protocol(lim.header_timeout_s),
            timeout_keep_alive=max(1, round(lim.keep_alive_s)),
            limit_concurrency=lim.max_connections,
            timeout_graceful_shutdown=FLUSH_S,
            access_log=False,
        )


def run_server(cfg: ServeConfig, prepare: Callable[[str], Path] | None = None) -> None:
    class _Uvicorn(DrainingServer):
        """uvicorn re-raises SIGINT/SIGTERM after a graceful shutdown, so the process would
        die by the signal; a shutdown we completed on request exits with status 0."""

        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[no-untyped-def]
            with super().capture_signals():
                try:
                    yield
                finally:
                    self._captured_signals.clear()  # the parent re-raises what is left here

    server = Server(cfg, prepare)
    log.info(
        "serving %s on %d %s worker(s), policy %s%s",
        ", ".join(m.name for m in cfg.models),
        cfg.workers.count,
        cfg.workers.device,
        cfg.policy,
        ", API keys required" if cfg.api_keys else "",
    )
    _Uvicorn(server.uvicorn_config("info"), server.drain).run()


class BackgroundServer:
    """A whole server (runtime, workers, app) on a uvicorn thread of this process, for
    benchmarks and tests: `with BackgroundServer(cfg) as s: ... s.url ...`.

    Workers are spawned processes, which re-import the main module: a script using this
    needs the usual `if __name__ == "__main__":` guard."""

    def __init__(self, cfg: ServeConfig, prepare: Callable[[str], Path] | None = None) -> None:
        import threading

        self.server = Server(cfg, prepare)
        self.url = f"http://{cfg.listen.host}:{cfg.listen.port}"
        self._uv = DrainingServer(self.server.uvicorn_config("warning"), self.server.drain)
        self._thread = threading.Thread(target=self._uv.run, daemon=True, name="uvicorn")

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.perf_counter() + self.server.cfg.workers.startup_timeout_s + 30
        while not self._uv.started:
            if not self._thread.is_alive() or time.perf_counter() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._uv.should_exit = True
        self._thread.join(120)
