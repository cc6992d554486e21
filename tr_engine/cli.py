"""Console entry points: `tr-serve` (the OpenAI-compatible server) and `tr-bench` (its
benchmarks, in tr_engine/bench/).

`tr-serve` turns flags and an optional YAML file into an EngineConfig and a ServerSettings
(flags win over the file), then: backend, engine, HTTP server. Nothing past this module sees
the argparse namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import logging
import os
import signal
import sys
import time
import types

from .config import DEVICES, DTYPES, KV_CACHE_DTYPES, LOAD_FORMATS, EngineConfig

log = logging.getLogger("tr_engine.serve")


class ConfigError(Exception):
    """A bad flag value or config file: reported in one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tr-serve",
        description="Serve a model over an OpenAI-compatible HTTP API, the sequence sharded "
        "over all cards. Settings come from the defaults, then --config FILE, then the flags.",
        epilog="Endpoints: /v1/models, /v1/completions, /v1/chat/completions, /health, "
        "/metrics, /version, /tokenize, /detokenize. See docs/serving.md.",
        argument_default=argparse.SUPPRESS,  # only flags given on the command line override
    )
    p.add_argument("--config", metavar="FILE",
                   help="YAML file of EngineConfig and server fields (see configs/)")

    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PATH",
                   help="local Hugging Face checkpoint folder (default: the embedded "
                   "SmolLM2-135M-Instruct)")
    g.add_argument("--load-format", choices=LOAD_FORMATS,
                   help="auto: read the folder's safetensors weights; dummy: read only its "
                   "config.json (and tokenizer) and use seeded random weights made on the "
                   "device, for benchmarks (default: auto)")
    g.add_argument("--served-model-name", metavar="NAME",
                   help="the model name clients send and /v1/models lists "
                   "(default: derived from the model)")
    g.add_argument("--dtype", choices=DTYPES,
                   help="weight and activation dtype (default: auto, the checkpoint's own)")
    g.add_argument("--max-model-len", type=int, metavar="N",
                   help="longest prompt + output in tokens (default: the model's limit)")
    g.add_argument("--generation-config", metavar="auto|vllm|FOLDER",
                   help="sampling defaults of requests that leave them unset: auto, the "
                   "model's generation_config.json (temperature, top_p, top_k, min_p, "
                   "repetition_penalty, max_new_tokens); vllm, the plain defaults; or a "
                   "folder with a generation_config.json (default: auto)")

    g = p.add_argument_group("devices and parallelism")
    g.add_argument("--device", choices=DEVICES,
                   help="platform backend (default: auto = npu, else cuda, else cpu)")
    g.add_argument("--world-size", type=int, metavar="N",
                   help="ranks (cards) in all (default: 1; under torchrun: WORLD_SIZE)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, metavar="T",
                   help="consecutive ranks that split the weights between them (default: "
                   "1); the sequence is sharded over world-size / T groups of them")
    g.add_argument("--attention-strategy", choices=("auto", "tokenring", "ring", "allgather_kv"),
                   help="prefill attention across ranks (default: auto, chosen per request "
                   "by a cost model)")

    g = p.add_argument_group("memory and scheduling")
    g.add_argument("--kv-cache-fraction", type=float, metavar="F",
                   help="share of the memory left after weights and prefill workspace that "
                   "the KV cache takes (default: 0.9)")
    g.add_argument("--kv-cache-tokens", type=int, metavar="N",
                   help="fix the KV cache capacity per rank in tokens instead")
    g.add_argument("--kv-offloading-size", type=float, metavar="GiB",
                   help="host memory (GiB, over all ranks) for KV blocks evicted from the "
                   "cards: a later prompt on them copies them back instead of computing "
                   "them again (default: 0, no host tier)")
    g.add_argument("--prefill-chunk", type=int, metavar="N",
                   help="prefill longer prompts in pieces of N tokens (default: 32768)")
    g.add_argument("--max-num-batched-tokens", type=int, metavar="N",
                   help="token budget of a step per rank while requests decode: their "
                   "tokens plus prefill work cut to the rest, a token's attention over a "
                   "long prefix counted too, so streams keep flowing during long prefills "
                   "(default: 4096)")
    g.add_argument("--shard-min-tokens", type=int, metavar="N",
                   help="prompts shorter than N tokens are not sharded: each lives on one "
                   "rank and the ranks serve different short requests side by side; 0 "
                   "shards every prompt (default: 8192)")
    g.add_argument("--token-chunk", type=int, metavar="N",
                   help="tokens per slice of token-wise work (projections, MLP) in a prefill "
                   "(default: 8192)")
    g.add_argument("--max-num-seqs", type=int, metavar="N",
                   help="sequences decoded together in one step (default: 64)")
    g.add_argument("--max-waiting", type=int, metavar="N",
                   help="queued requests before new ones get 503 (default: 256)")
    g.add_argument("--seed", type=int, metavar="N",
                   help="seed of requests that give none, and of dummy weights "
                   "(default: 0)")
    g.add_argument("--block-size", type=int, metavar="N",
                   help="tokens per KV block, a power of two up to 256; the prefix cache "
                   "reuses whole blocks (default: 16)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   help="reuse the KV of prompt prefixes already on the ranks (default: on)")
    g.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                   help="how the KV cache stores K and V: auto (the model's dtype), fp8 = "
                   "fp8_e4m3 or fp8_e5m2 (CUDA, CPU), int8 (Ascend, CPU), each with a scale "
                   "per token and head: about twice the tokens (default: auto)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="launch decode steps kernel by kernel instead of replaying device "
                   "graphs recorded at start-up (CUDA)")
    g.add_argument("--skip-kernel-self-check", action="store_true",
                   help="use the fused attention and merge kernels without first checking "
                   "them against the portable math at start-up (the check disables any that "
                   "disagree or raise; it takes under 2 s)")

    g = p.add_argument_group("HTTP server")
    g.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    g.add_argument("--port", type=int, help="port to listen on (default: 8000)")
    g.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and "
                   "/detokenize (default: none)")
    g.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"),
                   help="log level of the engine and the server (default: info)")
    g.add_argument("--graceful-shutdown-s", type=float, metavar="S",
                   help="on Ctrl-C / SIGTERM, seconds open requests get to finish "
                   "(default: 2)")
    g.add_argument("--default-max-tokens", type=int, metavar="N",
                   help="most tokens a request without max_tokens generates; it gets the room "
                   "left in the context up to this (default: 4096)")
    g.add_argument("--retry-after-s", type=int, metavar="S",
                   help="Retry-After header of a 503 when the queue is full (default: 1)")
    g.add_argument("--allowed-origins", type=_names, metavar="ORIGINS",
                   help="origins browsers may call the API from (CORS), as a JSON list or "
                   "comma-separated, '*' for any (default: none, CORS off)")
    g.add_argument("--allowed-methods", type=_names, metavar="METHODS",
                   help="HTTP methods a CORS request may use (default: *)")
    g.add_argument("--allowed-headers", type=_names, metavar="HEADERS",
                   help="request headers a CORS request may send (default: *)")
    g.add_argument("--allow-credentials", action="store_true",
                   help="let CORS requests carry cookies and Authorization")
    g.add_argument("--max-request-bytes", type=int, metavar="N",
                   help="largest request body; a larger one gets 413 before it is read "
                   "(default: room for a prompt of the whole context, as text or token ids)")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='tool_choice "auto": tool calls read out of the text with '
                   "--tool-call-parser")
    g.add_argument("--tool-call-parser", choices=("hermes", "llama3_json", "mistral"),
                   help="how the model writes tool calls: hermes (Hermes, Qwen2.5, Qwen3), "
                   "llama3_json (Llama 3.1/3.2), mistral")
    return p


def _names(text: str) -> tuple[str, ...]:
    """A flag's list of names: a JSON list (vLLM's form) or comma-separated."""
    import json

    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON list: {e}") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise argparse.ArgumentTypeError("expected a JSON list of strings")
    else:
        names = text.split(",")
    return tuple(n.strip() for n in names if n.strip())


def load_settings(argv: list[str] | None = None):
    """(EngineConfig, ServerSettings) from the defaults, --config and the flags.

    Raises ConfigError for unknown or ill-typed YAML keys and values the dataclasses refuse;
    argparse itself exits with status 2 on malformed flags.
    """
    from .server.settings import ServerSettings

    args = vars(build_parser().parse_args(argv))
    path = args.pop("config", None)
    fields = _read_yaml(path, EngineConfig, ServerSettings) if path else {}
    fields.update(args)
    server_fields = {f.name for f in dataclasses.fields(ServerSettings)}
    engine = {k: v for k, v in fields.items() if k not in server_fields}
    server = {k: v for k, v in fields.items() if k in server_fields}
    from . import envs

    started = envs.torchrun()
    if started is not None and "world_size" not in engine:  # torchrun's, unless given
        engine["world_size"] = started[1]
    try:
        return EngineConfig(**engine), ServerSettings(**server)
    except (TypeError, ValueError) as e:
        where = f" (in {path} or the flags)" if path else ""
        raise ConfigError(f"{e}{where}") from None


def _read_yaml(path: str, *classes) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    types_ = {f.name: f.type for cls in classes for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in types_:
            raise ConfigError(f"{path}: unknown key {key!r}; known keys: {', '.join(types_)}")
        if not _type_ok(value, types_[name]):
            raise ConfigError(f"{path}: {key} must be of type {types_[name]}; got {value!r}")
        out[name] = value
    return out


def _type_ok(value, annotation: str) -> bool:
    """`value` fits a simple field annotation such as 'int', 'float' or 'str | None'."""
    allowed = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
               "None": (types.NoneType,)}
    ok = tuple(t for part in annotation.split("|") for t in allowed.get(part.strip(), (object,)))
    if isinstance(value, bool) and bool not in ok:
        return False  # YAML's `yes` is not a number
    return isinstance(value, ok)


def serve_main(argv: list[str] | None = None) -> int:
    try:
        config, settings = load_settings(argv)
    except ConfigError as e:
        print(f"tr-serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()

    from tr_engine.backends import BackendUnavailable, get_backend

    try:
        backend = get_backend(config.device)
    except BackendUnavailable as e:
        print(f"tr-serve: {e.what}\n{e.fix}", file=sys.stderr)
        return 2
    config = config.replace(device=backend.name)
    log.info("backend %s in %.2f s", backend.name, time.perf_counter() - t0)

    from tr_engine import envs
    from tr_engine.worker.cluster import run_worker

    env = envs.torchrun()
    if env is not None:
        rank, world_size, _ = env
        if config.world_size not in (1, world_size):
            print(f"tr-serve: --world-size {config.world_size} but torchrun started "
                  f"{world_size} ranks", file=sys.stderr)
            return 2
        try:
            config = config.replace(world_size=world_size)
        except ValueError as e:
            print(f"tr-serve: {e}", file=sys.stderr)
            return 2
        if rank != 0:
            _stop_on_signals(signal.SIGTERM)
            with contextlib.suppress(KeyboardInterrupt):
                run_worker(config)
            return 0
    return _serve(config, settings, t0)


def _serve(config: EngineConfig, settings, t0: float) -> int:
    from tr_engine.backends import BackendUnavailable
    from tr_engine.engine.async_engine import AsyncEngine

    # SIGTERM during start-up unwinds like Ctrl-C and stops the ranks; SIGINT does so too
    # where the process was started with it ignored (a job started in the background by a
    # script), as it does once the server runs (uvicorn takes both then)
    _stop_on_signals(signal.SIGTERM, signal.SIGINT)
    engine = None
    try:
        try:
            engine = AsyncEngine.start(config)
        except BackendUnavailable as e:
            print(f"tr-serve: {e.what}\n{e.fix}", file=sys.stderr)
            return 2
        except (ValueError, FileNotFoundError) as e:  # a bad setting or model folder
            print(f"tr-serve: {e}", file=sys.stderr)
            return 2
        log.info("engine ready in %.1f s", time.perf_counter() - t0)
        _run_http(engine, settings, t0)
    except KeyboardInterrupt:
        pass
    finally:
        if engine is not None:
            # A second Ctrl-C while the ranks stop means: stop now.
            force = functools.partial(_force_exit, engine)
            signal.signal(signal.SIGINT, force)
            signal.signal(signal.SIGTERM, force)
            log.info("shutting down")
            t = time.perf_counter()
            ended = engine.shutdown()
            log.info("stopped in %.1f s", time.perf_counter() - t)
            if not ended:
                # The engine thread sits in a collective of ranks that were killed; do not
                # wait at interpreter exit for what will never return.
                logging.shutdown()
                os._exit(0)
    return 0


def _run_http(engine, settings, t0: float) -> None:
    import uvicorn

    from tr_engine.server import build_app

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own version re-raises the signal once drained; from inside the event
            # loop that cancels every task with a traceback. Here run() just returns.
            previous = {sig: signal.signal(sig, self.on_signal)
                        for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def on_signal(self, signum, frame) -> None:
            if self.should_exit:  # the second Ctrl-C: stop now, without draining
                _force_exit(engine, signum, frame)
            self.handle_exit(signum, frame)

        async def shutdown(self, sockets=None) -> None:
            app.state.stopping = True
            await super().shutdown(sockets)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                port = self.servers[0].sockets[0].getsockname()[1] if self.servers \
                    else settings.port
                url = dataclasses.replace(settings, port=port).url
                log.info("serving %s at %s/v1 (up in %.1f s)", engine.model_name, url,
                         time.perf_counter() - t0)

    app = build_app(engine, settings)
    # what start-up made (modules, the engine, the app) lives as long as the server: out of
    # the cyclic collector's reach, so that a full collection, which walks every tracked
    # object, costs a step tens of milliseconds no more (a stream's gap while a prompt
    # prefills)
    gc.collect()
    gc.freeze()
    server = Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                   log_level=settings.log_level,
                                   timeout_graceful_shutdown=settings.graceful_shutdown_s))
    server.run()  # returns after SIGINT / SIGTERM, once open requests drained or timed out


def _stop_on_signals(*signals: int) -> None:
    for sig in signals:
        signal.signal(sig, _interrupt)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _force_exit(engine, signum, frame) -> None:
    print("tr-serve: forced exit", file=sys.stderr)
    engine.kill()  # the other ranks go first: nothing is left behind
    os._exit(128 + signum)


def bench_main(argv: list[str] | None = None) -> int:
    """`tr-bench serve` and `tr-bench latency`: load and latency of any OpenAI-compatible
    server (tr_engine/bench/)."""
    from .bench import latency, serve

    parser = argparse.ArgumentParser(
        prog="tr-bench", description="Benchmarks of an OpenAI-compatible server over HTTP.",
        epilog="See docs/serving.md (tr-bench).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,latency}")
    serve.add_arguments(sub.add_parser(
        "serve", help="throughput and latencies of a data set sent at a request rate",
        description=serve.__doc__.split("\n\n")[0]))
    latency.add_arguments(sub.add_parser(
        "latency", help="one request of given lengths, timed, repeated",
        description=latency.__doc__))
    args = parser.parse_args(argv)
    return serve.main(args) if args.command == "serve" else latency.main(args)
