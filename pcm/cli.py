"""`pcm <command> ...`: the command line over pcm.stages and pcm.config."""

import argparse
import json
import logging
import sys
from pathlib import Path

from pcm import __version__
from pcm.config import ConfigError, config_to_yaml, load_config

DEFAULT_PARAMS = "params.yaml"


def _add_params(parser: argparse.ArgumentParser, override: str, default: str | None = DEFAULT_PARAMS,
                default_help: str = "params.yaml") -> None:
    parser.add_argument("--params", default=default, help=f"params file (default: {default_help}); commands run "
                        "from the repository root, where params.yaml is")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"overrides of params keys, values as YAML, e.g. {override}")


def _command(commands, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    """A subcommand whose --help says what it does and shows one command line of its own."""
    return commands.add_parser(name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
                               formatter_class=argparse.RawDescriptionHelpFormatter)


def _config_show(args) -> int:
    print(config_to_yaml(load_config(args.params, args.overrides)), end="")
    return 0


def _config_check(args) -> int:
    load_config(args.params, args.overrides)
    print(f"{args.params}: ok")
    return 0


def _stage(name: str):
    def run(args) -> int:
        from pcm import stages  # heavy imports (torch, PIL) only for the commands that need them
        from pcm.tracking import use_params_file

        kwargs = {k: getattr(args, k) for k in ("resume", "overwrite", "processes") if getattr(args, k, None)}
        cfg = load_config(args.params, args.overrides)
        katib = getattr(args, "katib_metric", None)
        if katib and katib[1] not in cfg.eval.steps:  # before the evaluation, not after an hour of it
            raise ValueError(f"--katib-metric {katib[0]}@{katib[1]}: {katib[1]} steps is not among "
                             f"eval.steps={list(cfg.eval.steps)}")
        use_params_file(args.params)  # the default MLflow store is the params file's project's, wherever pcm runs
        result = getattr(stages, name)(cfg, **kwargs)
        table = result.pop("table", None)  # a markdown step table reads better as itself than inside JSON
        summary = {k: v for k, v in result.items() if not isinstance(v, list) or len(v) <= 8}
        print(json.dumps(summary, indent=2))
        if table:
            print(table, end="")
        if katib:
            print(_katib_line(Path(result["metrics"]), *katib))
        return 0

    return run


EXAMPLES = {  # command -> (an override of the keys it reads, a whole command line); what its --help shows
    "config show": ("distill.num_phases=2", "pcm config show --params configs/quick.yaml distill.num_phases=2"),
    "config check": ("train.max_steps=5000", "pcm config check --params configs/sdxl-cc3m.yaml train.max_steps=5000"),
    "demo-data": ("demo.num_images=400", "pcm demo-data demo.num_images=400 demo.output_dir=data/shapes-small"),
    "prepare": ("data.resolution=64", "pcm prepare 'data.inputs=[\"data/shapes/shard-{00000..00003}.tar\"]' "
                "data.num_workers=2"),
    "demo-teacher": ("demo_teacher.unet_steps=600", "pcm demo-teacher demo_teacher.unet_steps=600"),
    "precompute": ("teacher.dtype=float16", "pcm precompute --params configs/sdxl-cc3m.yaml teacher.dtype=float16"),
    "distill": ("train.max_steps=200", "pcm distill --resume latest distill.num_phases=2 train.max_steps=200"),
    "evaluate": ("eval.num_prompts=50", "pcm evaluate 'eval.steps=[1, 2, 4]' eval.num_prompts=50"),
    "register": ("register.gate_threshold=50", "pcm register register.model_name=pcm-demo-sd15-4phase "
                 "register.gate_threshold=50"),
    "sample": ("sample.gamma=0.2", "pcm sample --model models:/pcm-demo-sd15-4phase@champion "
               "--prompt 'a red circle in the center on a gray background' --out red.png"),
    "convert-inception": ("", "pcm convert-inception pt_inception-2015-12-05-6726825d.pth "
                          "models/inception.safetensors"),
}

STAGES = {  # command -> (stages function, help)
    "demo-data": ("demo_data", "write the shapes demo world as input shards (demo.*)"),
    "prepare": ("prepare", "input shards -> filtered, resized, cropped prepared shards + stats.json (data.*)"),
    "demo-teacher": ("demo_teacher", "train the tiny demo teacher on the prepared shapes (demo_teacher.*)"),
    "precompute": ("precompute", "the teacher's VAE latents and text embeddings of the prepared samples, so "
                                 "distill loads no VAE and no text encoder (teacher.*, data.*)"),
    "distill": ("distill", "distill the teacher into a PCM/LCM LoRA (teacher.*, lora.*, distill.*, train.*); "
                           "uses precomputed latents and text when present"),
    "evaluate": ("evaluate", "score the teacher's DDIM (a flow teacher's Euler) and every LoRA at several step "
                             "counts; writes metrics.json, steps.csv, plots and report.html (eval.*)"),
    "register": ("register", "register the LoRA in the MLflow model registry: candidate alias, champion when the gate "
                             "passes (register.*, tracking.*)"),
}


def _katib_metric(text: str) -> tuple[str, int]:
    metric, sep, steps = text.partition("@")
    if not (metric and sep and steps.isdigit() and int(steps) >= 1):
        raise argparse.ArgumentTypeError(f"{text!r}: expected METRIC@STEPS, e.g. fid_teacher@4")
    return metric, int(steps)


def _katib_line(metrics_file: Path, metric: str, steps: int) -> str:
    """`metric=value` of the one distilled model at `steps` (metrics.json's <model>/k<steps>/<metric>), the line
    Katib's StdOut metrics collector reads. A trial evaluates one LoRA: more, or none, is an error naming them."""
    suffix = f"/k{steps}/{metric}"
    found = {key[:-len(suffix)]: value for key, value in json.loads(metrics_file.read_text()).items()
             if key.endswith(suffix) and not key.startswith(("teacher-ddim/", "teacher-euler/"))}
    if len(found) != 1:
        raise ValueError(f"--katib-metric {metric}@{steps}: expected one distilled model with {metric} at {steps} "
                         f"steps in {metrics_file}, found {sorted(found) or 'none'} (a trial evaluates one LoRA, "
                         "at one guidance scale and gamma)")
    return f"{metric}={next(iter(found.values()))}"


def _sample(args) -> int:
    from pcm import stages

    params = args.params
    if params is None:  # a registered model carries its base and sampling: a params file is optional then
        params = DEFAULT_PARAMS if Path(DEFAULT_PARAMS).is_file() or not args.model else None
    cfg = load_config(params, args.overrides)
    if params is not None:
        from pcm.tracking import use_params_file

        use_params_file(params)  # the default MLflow store is the params file's project's, wherever pcm runs
    result = stages.sample(cfg, args.prompt, args.out, model=args.model or "",
                           lora=args.lora or "", negative_prompt=args.negative_prompt, steps=args.steps,
                           guidance_scale=args.guidance_scale, gamma=args.gamma, seed=args.seed,
                           teacher_from=args.teacher_from)
    print(json.dumps(result, indent=2))
    return 0


def _add_sample(commands) -> None:
    sample = _command(commands, "sample", "images from a registered model or a LoRA folder (the base model from "
                      "teacher.*), sampled over the LoRA's trained edges", EXAMPLES["sample"][1])
    _add_params(sample, EXAMPLES["sample"][0], default=None,
                default_help="params.yaml; with --model and no params.yaml here, the built-in defaults")
    source = sample.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a registered model URI, e.g. models:/pcm-demo-sd15-4phase@champion")
    source.add_argument("--lora", help="an exported LoRA folder, e.g. models/pcm/lora")
    sample.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several images)")
    sample.add_argument("--negative-prompt", default="", help="replaces the empty condition of CFG")
    sample.add_argument("--steps", type=int, help="sampling steps (default: sample.num_steps, else the LoRA's "
                        "recommended, M)")
    sample.add_argument("--guidance-scale", type=float, help="inference CFG; FLUX.1-dev: true CFG, over the embedded "
                        "guidance the LoRA's card records (default: sample.guidance_scale, else the LoRA's "
                        "recommended)")
    sample.add_argument("--gamma", type=float, help="stochasticity in [0, 1], TCD's rule: 0 deterministic PCM, 1 fully "
                        "re-noised (default: sample.gamma, else 0; a registered model: its registered default)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    sample.add_argument("--teacher-from", choices=("lora", "config"), default="lora",
                        help="--lora: sample on the base model its pcm_config.json records (lora, the default) or on "
                             "teacher.* of the params file (config, e.g. a fine-tune of that base)")
    sample.add_argument("--out", default="sample.png",
                        help="output PNG (a video LoRA: GIF, or an H.264 clip with .mp4); several prompts give "
                             "OUT-0.png, ...")
    sample.set_defaults(func=_sample)


def _convert_inception(args) -> int:
    from pcm import stages

    print(stages.convert_inception(args.source, args.target))
    return 0


def _config_usage(args) -> int:
    print("pcm config: say what to do: `pcm config show` prints the resolved config, `pcm config check` validates "
          "it; e.g. pcm config check --params params.yaml", file=sys.stderr)
    return 2


def _add_config(commands) -> None:
    config = commands.add_parser("config", help="show or check the resolved config", description="show or check "
                                 "the resolved config (a params file + overrides)", epilog="example:\n  "
                                 + EXAMPLES["config check"][1], formatter_class=argparse.RawDescriptionHelpFormatter)
    config.set_defaults(func=_config_usage)
    config_commands = config.add_subparsers(dest="config_command", metavar="{show,check}")
    for name, function, help_text in (("show", _config_show, "print the resolved config (params file + overrides)"),
                                      ("check", _config_check, "validate the config; exit 2 with the reason on "
                                                               "error")):
        override, example = EXAMPLES[f"config {name}"]
        command = _command(config_commands, name, help_text, example)
        _add_params(command, override)
        command.set_defaults(func=function)


def _add_distill_options(stage: argparse.ArgumentParser) -> None:
    run = stage.add_mutually_exclusive_group()
    run.add_argument("--resume", metavar="latest|PATH", help="continue from the newest checkpoint under "
                     "train.output_dir/checkpoints (latest) or from a checkpoint folder; refused when the folder's "
                     "run manifest differs from this config, data or teacher")
    run.add_argument("--overwrite", action="store_true", help="replace the run already in train.output_dir (its "
                     "checkpoints, LoRA, samples, metrics) instead of refusing")
    stage.add_argument("--processes", type=int, default=1, metavar="N", help="ranks on this machine (accelerate "
                       "launch --multi_gpu); a SIGTERM to this process reaches them all")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pcm", description="Phased Consistency Model distillation pipelines",
                                     epilog="example:\n  pcm config check --params params.yaml\n"
                                     "`pcm COMMAND --help` shows each command's options and an example",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pcm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_config(commands)
    for command, (function, help_text) in STAGES.items():
        override, example = EXAMPLES[command]
        stage = _command(commands, command, help_text, example)
        _add_params(stage, override)
        if command == "distill":
            _add_distill_options(stage)
        if command == "evaluate":
            stage.add_argument("--katib-metric", type=_katib_metric, metavar="METRIC@STEPS", help="print METRIC of "
                               "the one evaluated LoRA at STEPS as the last line, METRIC=value, for Katib's StdOut "
                               "metrics collector (e.g. fid_teacher@4)")
        stage.set_defaults(func=_stage(function))
    _add_sample(commands)
    convert = _command(commands, "convert-inception", "pytorch-fid's FID Inception .pth -> safetensors (for "
                       "eval.inception_weights; read with weights_only, no pickled code runs)",
                       EXAMPLES["convert-inception"][1])
    convert.add_argument("source", help="pt_inception-2015-12-05-6726825d.pth")
    convert.add_argument("target", help="output .safetensors file")
    convert.set_defaults(func=_convert_inception)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures of input, files, stores and runs that a user fixes: reported in one line, never a traceback."""
    errors: list[type[BaseException]] = [ValueError, RuntimeError, OSError, KeyError]
    for module, name in (("safetensors", "SafetensorError"), ("mlflow.exceptions", "MlflowException")):
        loaded = sys.modules.get(module)  # only what the command imported: nothing heavy loads for an error
        if loaded is not None and hasattr(loaded, name):
            errors.append(getattr(loaded, name))
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    """The command line; argv None (the `pcm` program, python -m pcm.cli) ends the process when the command is
    done, without the interpreter's teardown (_exit_when_done)."""
    code = _main(argv)
    if argv is None:
        _exit_when_done(code)
    return code


def _exit_when_done(code: int) -> None:
    """Ends the process as the interpreter would, less its teardown of every module and object: that teardown costs
    1.5-2 s of CPU once torch, diffusers and MLflow are imported (measured: benchmarks/reference_side_by_side.py) and
    writes nothing. Non-daemon threads are waited for and the atexit handlers run (logging, multiprocessing), as at
    a normal exit; everything a command writes is closed (and fsynced where it matters) before it returns."""
    import atexit
    import os
    import threading

    getattr(threading, "_shutdown", lambda: None)()  # waits for non-daemon threads, as the interpreter's exit does
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"pcm: config error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if not isinstance(err, _expected_errors()):
            raise  # a bug: the traceback is what a report needs
        message = str(err).strip().splitlines() or [repr(err)]
        print(f"pcm {args.command}: {type(err).__name__}: {message[0]}", file=sys.stderr)
        # Preempted (SIGTERM): the checkpoint is saved; 143 (128 + SIGTERM) lets an orchestrator's retry resume
        return 143 if type(err).__name__ == "Preempted" else 2


if __name__ == "__main__":
    sys.exit(main())
