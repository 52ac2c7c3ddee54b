"""The `rayft` command line.

    rayft validate CONFIG.yaml [key=value ...]   check a config; exit 1 listing every problem
    rayft preprocess CONFIG.yaml --output DIR    tokenize once with Ray Data → parquet
    rayft train    CONFIG.yaml [key=value ...]   fine-tune through Ray Train
    rayft tune     CONFIG.yaml [key=value ...] [--resume]   sweep `tune:` with Ray Tune
    rayft export   CONFIG.yaml [key=value ...]   merge the adapter into the base model
    rayft serve    CONFIG.yaml [key=value ...]   OpenAI API on Ray Serve (127.0.0.1 by default)
    rayft chat     CONFIG.yaml [key=value ...] [--prompt TEXT]
    rayft prepare-model [--cache-dir DIR]        write the bundled Gemma 3 270M as safetensors
    rayft expand-model MODEL --num-expand N --output DIR   LLaMA Pro block expansion
    rayft demo                                   train, merge, serve and answer, end to end
    rayft k8s render CONFIG.yaml [--kind job|tune|service] [--image IMAGE] [--output DIR]
    rayft submit   CONFIG.yaml [--address ADDR] [--no-wait] [key=value ...]   run as a Ray job
    rayft jobs list | logs ID [--follow] | stop ID [--address ADDR]

Overrides use LLaMA-Factory's `key=value` form (dotted for sections: `ray.num_workers=2`).
Every config problem is reported before Ray starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from cluster import jobs_cmd, k8s, submit
from configs import ConfigError, RayftConfig

DEFAULT_CACHE = Path(".cache/models")


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (LLaMA-Factory keys work as they are)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")


def cmd_validate(args: argparse.Namespace) -> int:
    """Run every training pre-flight check and print the verdict."""
    from jobs.preflight import load_run_config

    config = load_run_config(args.config, args.overrides)
    print(
        f"{args.config}: OK (stage {config.stage}, {config.finetuning_type}, "
        f"datasets {', '.join(config.dataset_names)}, template {config.template})"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train on a private local Ray, or on `ray.address`."""
    from jobs.train import main as train_main

    train_main([args.config, *args.overrides])
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    """Tokenize once with Ray Data and write parquet to --output (train from it with
    `tokenized_path`)."""
    from jobs.preflight import load_run_config
    from jobs.registry import get_stage
    from jobs.resources import plan_resources
    from jobs.runtime import local_ray

    overrides = [*args.overrides, f"tokenized_path={args.output.resolve()}", "overwrite_cache=true"]
    config = load_run_config(args.config, overrides)
    with local_ray(config.ray.address, runtime_env=config.ray.runtime_env) as total_cpus:
        plan = plan_resources(total_cpus, num_workers=config.ray.num_workers)
        data = get_stage(config.stage).prepare_data(config, plan.cpus_per_data_task, load=False)
    print(f"{data.report.summary()}; written to {args.output.resolve()}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Sweep the `tune:` search space with Ray Tune; the best trial goes to output_dir/best."""
    from jobs.tune import main as tune_main

    tune_main([args.config, *args.overrides, *(["--resume"] if args.resume else [])])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Merge the adapter and write `export_dir`."""
    from jobs.export import main as export_main

    export_main([args.config, *args.overrides])
    return 0


# LLaMA-Factory's serving keys -> (the `serve:` field they set, how their value maps).
LF_SERVE_KEYS: dict[str, str] = {
    "infer_backend": "engine",
    "vllm_maxlen": "max_model_len",
    "vllm_gpu_util": "gpu_memory_utilization",
    "vllm_enforce_eager": "enforce_eager",
}
_LF_BACKENDS = {"huggingface": "transformers", "vllm": "vllm"}


def serve_args_from_config(config: RayftConfig, *, num_cpus_per_replica: float = 1.0):  # noqa: ANN201
    """The serving settings a config implies: model, adapters, template, sampling, address.

    LLaMA-Factory's ``infer_backend`` (huggingface → transformers, vllm), ``vllm_maxlen``,
    ``vllm_gpu_util`` and ``vllm_enforce_eager`` map onto the engine settings; a value that
    contradicts the ``serve:`` section is an error naming both keys.

    Raises:
        ConfigError: an LF key contradicts its ``serve:`` counterpart.
    """
    from configs import ConfigProblem
    from data_pipelines.templates import configure_template, get_template
    from serve import ServeArgs

    template = (
        configure_template(
            get_template(config.template),
            default_system=config.default_system,
            tool_format=config.tool_format,
            enable_thinking=config.enable_thinking,
        )
        if config.template
        else None
    )
    optional = {
        key: value
        for key, value in config.serve.model_dump().items()
        if key not in ("host", "port", "model_name") and value is not None
    }
    from_lf = {
        "engine": _LF_BACKENDS[config.infer_backend] if config.infer_backend else None,
        "max_model_len": config.vllm_maxlen,
        "gpu_memory_utilization": config.vllm_gpu_util,
        "enforce_eager": config.vllm_enforce_eager or None,
    }
    problems = []
    for lf_key, field in LF_SERVE_KEYS.items():
        value = from_lf[field]
        if value is None:
            continue
        given = optional.get(field)
        if given is not None and given != value and not (field == "engine" and given == "auto"):
            problems.append(
                ConfigProblem(
                    lf_key, f"contradicts `serve.{field}: {given}`; give only one of them"
                )
            )
        optional[field] = value
    if problems:
        raise ConfigError("serving keys", problems)
    return ServeArgs(
        model_path=config.model_name_or_path,
        adapter_path=config.adapter_name_or_path,
        model_name=config.serve.model_name or "",
        chat_template=template.to_jinja() if template else None,
        tool_format=template.tools.name if template else None,
        stop_words=list(template.stop_words) if template else [],
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        host=config.serve.host,
        port=config.serve.port,
        num_cpus_per_replica=num_cpus_per_replica,
        trust_remote_code=config.trust_remote_code,
        **optional,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the configured model until interrupted."""
    from jobs.preflight import load_infer_config
    from jobs.resources import plan_resources
    from jobs.runtime import local_ray
    from serve import run_server

    config = load_infer_config(args.config, args.overrides)
    with local_ray(config.ray.address, runtime_env=config.ray.runtime_env) as total_cpus:
        plan = plan_resources(total_cpus, num_workers=1)
        run_server(
            serve_args_from_config(config, num_cpus_per_replica=plan.cpus_per_replica),
            blocking=True,
        )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Talk to the model in this process (no Ray needed), streaming each answer as it grows."""
    from jobs.preflight import load_infer_config
    from serve.engines import close_engine, load_engine

    config = load_infer_config(args.config, args.overrides)
    # vLLM logs to stdout, between the answers (INFO lines, and warnings about this machine's
    # setup that a chat cannot act on): a terminal chat shows its errors only.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    engine = load_engine(serve_args_from_config(config))
    try:
        if args.prompt is not None:
            _stream_answer(engine, [{"role": "user", "content": args.prompt}], prefix="")
            return 0
        return _chat_loop(engine)
    finally:
        close_engine(engine)


def _chat_loop(engine: object) -> int:
    """Read messages until `exit` or end of input, streaming each answer; `clear` forgets."""
    history: list[dict[str, str]] = []
    print("rayft chat: type a message; `clear` forgets the conversation, `exit` quits.")
    while True:
        try:
            line = input("User: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line == "exit":
            return 0
        if line == "clear":
            history = []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        answer = _stream_answer(engine, history, prefix="Assistant: ")
        history.append({"role": "assistant", "content": answer})


def _stream_answer(engine: object, history: list[dict[str, str]], *, prefix: str) -> str:
    """Print the answer to `history` token by token (as the engine yields it); return it."""
    print(prefix, end="", flush=True)
    pieces = []
    for step in engine.stream(engine.prepare_chat(history)):  # type: ignore[attr-defined]
        print(step.text, end="", flush=True)
        pieces.append(step.text)
    print(flush=True)
    return "".join(pieces)


def cmd_prepare_model(args: argparse.Namespace) -> int:
    """Write the bundled Gemma 3 270M as a safetensors model directory (once)."""
    from jobs.model import prepare_bundled_model

    print(prepare_bundled_model(args.cache_dir))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole path on the bundled model; see `cluster.demo`."""
    from cluster.demo import run_demo

    run_demo(cache_dir=args.cache_dir, workdir=args.workdir)
    return 0


def cmd_expand_model(args: argparse.Namespace) -> int:
    """Write a LLaMA Pro expanded copy of a model (then train it with `use_llama_pro`)."""
    from jobs.llama_pro import expand_model

    out = expand_model(args.model, args.output, num_expand=args.num_expand)
    print(
        f"wrote {out}; train it with finetuning_type: freeze, use_llama_pro: true, "
        f"freeze_trainable_layers: {args.num_expand}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per verb."""
    parser = argparse.ArgumentParser(
        prog="rayft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
        "validate": (cmd_validate, "check a config and list every problem"),
        "train": (cmd_train, "fine-tune through Ray Train"),
        "preprocess": (cmd_preprocess, "tokenize once and write parquet"),
        "tune": (cmd_tune, "hyperparameter sweep with Ray Tune"),
        "export": (cmd_export, "merge the adapter into the base model"),
        "serve": (cmd_serve, "OpenAI-compatible API on Ray Serve"),
        "chat": (cmd_chat, "talk to the model in the terminal"),
    }
    for name, (handler, help_text) in commands.items():
        command = sub.add_parser(name, help=help_text)
        _config_args(command)
        if name == "chat":
            command.add_argument("--prompt", help="answer one prompt and exit")
        if name == "tune":
            command.add_argument("--resume", action="store_true", help="continue a sweep")
        if name == "preprocess":
            command.add_argument("--output", type=Path, required=True, help="parquet folder")
        command.set_defaults(handler=handler)
    prepare = sub.add_parser("prepare-model", help="convert the bundled Gemma 3 270M once")
    prepare.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    prepare.set_defaults(handler=cmd_prepare_model)
    expand = sub.add_parser("expand-model", help="LLaMA Pro: insert identity blocks to train")
    expand.add_argument("model", help="model directory or hub id")
    expand.add_argument("--num-expand", type=int, required=True, help="blocks to insert")
    expand.add_argument("--output", type=Path, required=True, help="where the model goes")
    expand.set_defaults(handler=cmd_expand_model)
    demo = sub.add_parser("demo", help="train, merge, serve and answer on the bundled model")
    demo.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    demo.add_argument("--workdir", type=Path, default=Path("saves/demo"))
    demo.set_defaults(handler=cmd_demo)
    k8s.add_parser(sub)
    submit.add_parser(sub)
    jobs_cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `rayft` console script; config problems exit with status 1."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as err:
        print(f"rayft: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
