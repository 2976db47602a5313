"""``preftune`` command line: ``preftune train [CONFIG.yaml] [key=value …]`` and friends."""

from __future__ import annotations

import argparse
import logging
import sys

from preftune.config import FIELDS, ConfigError

EPILOG = """examples:
  preftune demo                                    # SFT → on-policy pairs → DPO → evaluation, embedded world
  preftune train                                   # embedded default: tiny Llama, built-in pairs
  preftune train run.yaml                          # your model and data
  preftune train run.yaml beta=0.2 method=ipo      # overrides, same names as the YAML keys
  accelerate launch -m preftune.cli train run.yaml # data-parallel / FSDP / DeepSpeed
  preftune methods                                 # the methods and their defaults
  preftune config                                  # every config key with its default
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preftune", description="Preference tuning of causal LMs.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train with DPO or any registered method",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", nargs="?", help="YAML config file (optional)")
    train.add_argument("overrides", nargs="*", help="key=value overrides of config keys")
    demo = sub.add_parser("demo", help="the whole pipeline on the embedded world: SFT → pairs → DPO → evaluation")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="a reduced size (tests, a first look)")
    demo.add_argument("--seed", type=int, default=0)
    prompts_help = (".txt (one prompt per line) or .jsonl with a 'prompt' per line: a string (newlines allowed) "
                    "or a list of {role, content} messages (generated with the model's chat template)")
    judge_help = ("a reward-model folder (e.g. runs/rm/final), 'module:function' / 'file.py:function' (your scoring "
                  "function of (prompts, completions)), or 'gold' (the demo world's VADER sentiment judge)")
    pairs = sub.add_parser("pairs", help="sample k completions per prompt, judge them, write preference pairs")
    pairs.add_argument("--model", required=True, help="policy checkpoint to sample from")
    pairs.add_argument("--prompts", required=True, help=prompts_help)
    pairs.add_argument("--out", required=True, help="output JSONL of {prompt, chosen, rejected, score_chosen, "
                       "score_rejected}, conversational when the prompts are")
    pairs.add_argument("--judge", required=True, help=judge_help)
    pairs.add_argument("--k", type=int, default=4, help="completions per prompt (>= 2)")
    pairs.add_argument("--mode", choices=["all", "best_vs_worst"], default="all")
    ev = sub.add_parser("eval", help="reward, KL to the reference, win rate, length, EOS rate on held-out prompts")
    ev.add_argument("--model", required=True)
    ev.add_argument("--reference", required=True)
    ev.add_argument("--prompts", required=True, help=prompts_help)
    ev.add_argument("--judge", required=True, help=judge_help)
    ev.add_argument("--pairs", help="held-out pairs (JSONL) for implicit-reward accuracy")
    ev.add_argument("--beta", type=float, default=0.1)
    ev.add_argument("--num-samples", type=int, default=1)
    ev.add_argument("--out", help="write the metrics as JSON here")
    for command in (pairs, ev):
        command.add_argument("--max-new-tokens", type=int, default=64)
        command.add_argument("--temperature", type=float, default=1.0)
        command.add_argument("--top-p", type=float, default=1.0)
        command.add_argument("--top-k", type=int, default=0, help="0 turns it off")
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
    exp = sub.add_parser("experiment", help="reproducible experiments: frontier (the DPO paper's reward–KL plot)")
    exp.add_argument("name", choices=["frontier"])
    exp.add_argument("--output-dir", default="experiments/frontier")
    exp.add_argument("--quick", action="store_true", help="a reduced size (tests, a first look)")
    sub.add_parser("methods", help="list the registered methods")
    sub.add_parser("config", help="list every config key with its default")
    return parser


def _split_config_and_overrides(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    # `preftune train beta=0.2` — the first positional is an override, not a file.
    if config is not None and "=" in config:
        return None, [config, *overrides]
    return config, overrides


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.command == "demo":
        from preftune.demo.pipeline import DemoSettings, run_demo

        settings = DemoSettings.quick(args.output_dir) if args.quick else DemoSettings(output_dir=args.output_dir)
        settings.seed = args.seed
        run_demo(settings)
        return 0
    if args.command == "experiment":
        from preftune.experiments.frontier import FrontierSettings, frontier_table, run_frontier

        settings = FrontierSettings.quick(args.output_dir) if args.quick else FrontierSettings(
            output_dir=args.output_dir)
        print(frontier_table(run_frontier(settings)))
        return 0
    if args.command in ("pairs", "eval"):
        from preftune.evaluation import commands

        options = {k: v for k, v in vars(args).items() if k != "command"}
        print((commands.pairs_command if args.command == "pairs" else commands.eval_command)(**options))
        return 0
    if args.command == "methods":
        from preftune.methods.registry import describe

        print(describe())
        return 0
    if args.command == "config":
        from preftune.config import TrainConfig

        defaults = TrainConfig()
        for name in FIELDS:
            print(f"{name}: {getattr(defaults, name)!r}")
        return 0

    from preftune.config import load_config

    path, overrides = _split_config_and_overrides(args.config, args.overrides)
    try:
        cfg = load_config(path, overrides)
    except ConfigError as err:
        print(f"preftune: config error: {err}", file=sys.stderr)
        return 2
    from preftune.data.formats import DataError
    from preftune.training.loop import train

    try:
        result = train(cfg)
    except (DataError, FileNotFoundError, FileExistsError) as err:
        print(f"preftune: {err}", file=sys.stderr)
        return 2
    print(f"run directory: {result.output_dir}  (final model: {result.final_dir})")
    metrics = result.eval_metrics or result.train_metrics
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    print(f"after {result.global_step} steps: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
