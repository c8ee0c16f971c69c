"""`pcm <command> ...`: the command line over pcm.stages and pcm.config."""

import argparse
import json
import logging
import sys

from pcm.config import ConfigError, config_to_yaml, load_config


def _add_params(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides of params keys, e.g. distill.num_phases=2")


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

        kwargs = {k: getattr(args, k) for k in ("resume", "overwrite", "processes") if getattr(args, k, None)}
        result = getattr(stages, name)(load_config(args.params, args.overrides), **kwargs)
        table = result.pop("table", None)  # a markdown step table reads better as itself than inside JSON
        summary = {k: v for k, v in result.items() if not isinstance(v, list) or len(v) <= 8}
        print(json.dumps(summary, indent=2))
        if table:
            print(table, end="")
        return 0

    return run


STAGES = {  # command -> (stages function, help)
    "demo-data": ("demo_data", "write the shapes demo world as input shards (demo.*)"),
    "prepare": ("prepare", "input shards -> filtered, resized, cropped prepared shards + stats.json (data.*)"),
    "demo-teacher": ("demo_teacher", "train the tiny demo teacher on the prepared shapes (demo_teacher.*)"),
    "precompute": ("precompute", "the teacher's VAE latents of the prepared samples, so distill loads no VAE "
                                 "(teacher.*, data.*)"),
    "distill": ("distill", "distill the teacher into a PCM/LCM LoRA (teacher.*, lora.*, distill.*, train.*); "
                           "uses precomputed latents when present"),
    "evaluate": ("evaluate", "score the teacher's DDIM and every LoRA at several step counts; writes metrics.json, "
                             "steps.csv, plots and report.html (eval.*)"),
    "register": ("register", "register the LoRA in the MLflow model registry: candidate alias, champion when the gate "
                             "passes (register.*, tracking.*)"),
}


def _sample(args) -> int:
    from pcm import stages

    result = stages.sample(load_config(args.params, args.overrides), args.prompt, args.out, model=args.model or "",
                           lora=args.lora or "", negative_prompt=args.negative_prompt, steps=args.steps,
                           guidance_scale=args.guidance_scale, seed=args.seed)
    print(json.dumps(result, indent=2))
    return 0


def _add_sample(commands) -> None:
    sample = commands.add_parser("sample", help="images from a registered model or a LoRA folder (the base model "
                                 "from teacher.*), sampled over the LoRA's trained edges")
    _add_params(sample)
    source = sample.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a registered model URI, e.g. models:/pcm-demo-sd15-4phase@champion")
    source.add_argument("--lora", help="an exported LoRA folder, e.g. models/pcm/lora")
    sample.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several images)")
    sample.add_argument("--negative-prompt", default="", help="replaces the empty condition of CFG")
    sample.add_argument("--steps", type=int, help="sampling steps (default: the LoRA's recommended, M)")
    sample.add_argument("--guidance-scale", type=float, help="inference CFG (default: the LoRA's recommended)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    sample.add_argument("--out", default="sample.png", help="output PNG; several prompts give OUT-0.png, ...")
    sample.set_defaults(func=_sample)


def _convert_inception(args) -> int:
    from pcm.eval.inception import convert_weights

    print(convert_weights(args.source, args.target))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pcm", description="Phased Consistency Model distillation pipelines")
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="show or check the resolved config")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="print the resolved config (params file + overrides)")
    _add_params(show)
    show.set_defaults(func=_config_show)
    check = config_commands.add_parser("check", help="validate the config; exit 2 with the reason on error")
    _add_params(check)
    check.set_defaults(func=_config_check)
    for command, (function, help_text) in STAGES.items():
        stage = commands.add_parser(command, help=help_text)
        _add_params(stage)
        if command == "distill":
            run = stage.add_mutually_exclusive_group()
            run.add_argument("--resume", metavar="latest|PATH", help="continue from the newest checkpoint "
                               "under train.output_dir/checkpoints (latest) or from a checkpoint folder; refused "
                               "when the folder's run manifest differs from this config, data or teacher")
            run.add_argument("--overwrite", action="store_true", help="replace the run already in "
                               "train.output_dir (its checkpoints, LoRA, samples, metrics) instead of refusing")
            stage.add_argument("--processes", type=int, default=1, metavar="N", help="ranks on this machine "
                               "(accelerate launch --multi_gpu); a SIGTERM to this process reaches them all")
        stage.set_defaults(func=_stage(function))
    _add_sample(commands)
    convert = commands.add_parser("convert-inception", help="pytorch-fid's FID Inception .pth -> safetensors "
                                  "(for eval.inception_weights; read with weights_only, no pickled code runs)")
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
