"""``preftune`` command line: ``preftune train [CONFIG.yaml] [key=value …]`` and friends.

A user error ends with one line on stderr, ``preftune: <what is wrong, where, what to do>``, and an exit
code per kind (:data:`EXIT_CODES`); anything else is a bug and keeps its traceback. The log holds preftune's own
lines and other libraries' errors; ``--debug`` (or ``PREFTUNE_DEBUG=1``) adds the libraries' warnings and
information (Accelerate's checkpoint notes, transformers' FutureWarnings, …) and the traceback of user errors.
Nothing heavy is imported before a command
runs, so ``preftune --help`` answers at once.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import textwrap
import traceback
import warnings
from pathlib import Path

from preftune import errors

# Exit codes of the OS errors the CLI explains itself; the PreftuneError classes carry their own.
EXIT_DISK_FULL = 8
EXIT_NOT_WRITABLE = 9  # permission denied, a read-only file system, a file where a folder must be
EXIT_NOT_FOUND = 10
EXIT_INTERRUPTED = 130
EXIT_CODES = {
    "config": errors.ConfigError.exit_code,
    "data": errors.DataError.exit_code,
    "output folder": errors.RunDirError.exit_code,
    "resume": errors.ResumeError.exit_code,
    "model": errors.ModelError.exit_code,
    "training": errors.TrainingError.exit_code,
    "hub": errors.HubError.exit_code,
    "disk full": EXIT_DISK_FULL,
    "not writable": EXIT_NOT_WRITABLE,
    "file not found": EXIT_NOT_FOUND,
    "interrupted": EXIT_INTERRUPTED,
}
DEBUG_HELP = ("show other libraries' warnings and notes, and the Python traceback of user errors too (or set "
              "PREFTUNE_DEBUG=1)")
# Libraries that log through handlers of their own, and the variables that set their level when first imported.
LIBRARY_LOGGERS = {"transformers": "TRANSFORMERS_VERBOSITY", "datasets": "DATASETS_VERBOSITY",
                   "huggingface_hub": "HF_HUB_VERBOSITY"}

EPILOG = """examples:
  preftune demo                                    # SFT → on-policy pairs → DPO → evaluation, embedded world
  preftune train                                   # embedded default: tiny Llama, built-in pairs
  preftune train run.yaml                          # your model and data
  preftune train run.yaml beta=0.2 method=ipo      # overrides, same names as the YAML keys
  accelerate launch -m preftune.cli train run.yaml # data-parallel / FSDP / DeepSpeed
  preftune score --model runs/x/final --reference sft/ --data pairs.jsonl  # implicit-reward accuracy
  preftune report runs/x                           # health report: collapse, verbosity, over-optimisation, …
  preftune methods                                 # the methods and their defaults
  preftune config                                  # every config key with its default
  preftune annotate serve --pairs pairs.jsonl      # people label pairs in a browser; then `annotate export`

""" + textwrap.fill("exit codes: 0 done · " + " · ".join(f"{code} {kind}" for kind, code in EXIT_CODES.items())
                    + " · 1 with a traceback: a bug, please report it (--debug or PREFTUNE_DEBUG=1 shows the "
                    "traceback of user errors too)", width=100, subsequent_indent="  ")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preftune", description="Preference tuning of causal LMs.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train with DPO or any registered method",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", nargs="?", help="YAML config file (optional)")
    train.add_argument("overrides", nargs="*", help="key=value overrides of config keys")
    demo = sub.add_parser("demo", help="the whole pipeline on the embedded world: SFT → pairs → DPO → evaluation")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="a reduced size (tests, a first look)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--overwrite", action="store_true", help="replace a finished demo in --output-dir")
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
    ev.add_argument("--samples-out", help="write the compared samples as JSONL of {prompt, policy, reference, "
                    "policy_score, reference_score, judge} (for `preftune annotate serve --samples`)")
    for command in (pairs, ev):
        command.add_argument("--max-new-tokens", type=int, default=64)
        command.add_argument("--temperature", type=float, default=1.0)
        command.add_argument("--top-p", type=float, default=1.0)
        command.add_argument("--top-k", type=int, default=0, help="0 turns it off")
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
    score = sub.add_parser("score", help="a policy as a reward model: implicit rewards of responses, pairwise accuracy "
                           "on preference data (RewardBench's conventions)")
    score.add_argument("--model", required=True, help="policy (causal LM) or reward model folder / Hub id")
    score.add_argument("--reference", help="reference (SFT) model for the log-ratio variants sum and avg")
    score.add_argument("--data", required=True, help="preference pairs (any paired format; a 'subset' column gives "
                       "per-subset accuracy) or prompt/completion rows: a file, a saved dataset or a Hub id")
    score.add_argument("--split", default="train")
    score.add_argument("--variant", action="append", choices=["sum", "avg", "ref_free_sum", "ref_free_avg",
                                                              "ref_free_norm", "reward"],
                       help="repeatable; default: every variant the models allow")
    score.add_argument("--beta", type=float, default=1.0, help="scales the log-ratio (ranking unchanged)")
    score.add_argument("--batch-size", type=int, default=32, help="pairs (or responses) per forward")
    score.add_argument("--max-length", type=int, help="truncate as training does (default: no truncation)")
    score.add_argument("--max-prompt-length", type=int)
    score.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default="float32")
    score.add_argument("--device", help="default: cuda when available, else cpu")
    score.add_argument("--cache-dir", help="tokenized data and reference log-probs (default $PREFTUNE_CACHE or "
                       "~/.cache/preftune)")
    score.add_argument("--no-reference-cache", action="store_true", help="recompute the reference every time")
    score.add_argument("--skip-invalid-rows", action="store_true", help="skip (and count) invalid rows")
    score.add_argument("--out", help="write the summary (accuracy per variant and subset, pairs/s) as JSON")
    score.add_argument("--scores-out", help="write every row's scores as JSON Lines")
    report = sub.add_parser("report", help="a run's health report: HTML page with plots and a markdown summary")
    report.add_argument("run_dir", help="a run folder (metrics.jsonl, config.yaml)")
    report.add_argument("--out", help="folder for report.html and report.md (default: the run folder)")
    experiments = _experiment_parser(sub)
    annotate_actions = _annotate_parser(sub)
    sub.add_parser("methods", help="list the registered methods")
    sub.add_parser("config", help="list every config key with its default")
    # `preftune train run.yaml --debug` as well as `preftune --debug train …`
    for command in [*sub.choices.values(), *experiments, *annotate_actions]:
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def _experiment_parser(sub) -> list[argparse.ArgumentParser]:
    """``preftune experiment frontier | scorer``, each with its own options. Results go to a run folder (runs/NAME,
    ignored by git), never over the committed ones in experiments/NAME unless --output-dir names them."""
    exp = sub.add_parser("experiment", help="reproducible experiments: frontier (the DPO paper's reward–KL plot), "
                         "scorer (the DPO policy's implicit reward against a reward model, on held-out pairs)")
    names = exp.add_subparsers(dest="name", required=True, metavar="{frontier,claims,scorer}")
    frontier = names.add_parser("frontier", help="the DPO paper's reward–KL frontier (Fig. 2 left) on the demo world, "
                                "for every method, with each run's cost",
                                description="Every run starts from the demo's SFT model; every few steps its policy "
                                "samples held-out prompts and gives one point (KL to the SFT model, mean gold "
                                "reward). Writes points.json, frontier.png and frontier.md.")
    frontier.add_argument("--output-dir", default="runs/frontier",
                          help="where points.json, frontier.png, frontier.md and work/ go (default: runs/frontier)")
    frontier.add_argument("--quick", action="store_true", help="a reduced size (tests, a first look)")
    frontier.add_argument("--runs", nargs="+", metavar="LABEL", help="only these runs (labels as in its table)")
    frontier.add_argument("--resume", action="store_true",
                          help="keep the runs points.json already holds (same settings), run the others")
    claims = names.add_parser("claims", help="DPO's three claims against RLHF with error bars: reward at fixed KL, "
                              "stability over seeds and settings, compute", description="The families' "
                              "representatives, each over a sweep of learning rate × main coefficient at several "
                              "seeds, selected on validation prompts and reported on test prompts with 95% intervals "
                              "over seeds. Writes runs.json, claims.md, claims.png and claims.html.")
    claims.add_argument("--output-dir", default="runs/claims",
                        help="where runs.json, claims.md and work/ go (default: runs/claims)")
    claims.add_argument("--quick", action="store_true", help="a reduced size (tests, a first look)")
    claims.add_argument("--methods", nargs="+", metavar="NAME", help="only these methods (names as in its table)")
    claims.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="the seeds (default: 0 1 2)")
    claims.add_argument("--resume", action="store_true",
                        help="keep the runs runs.json already holds (same settings), add the missing ones")
    claims.add_argument("--overwrite", action="store_true", help="start again over an earlier runs.json")
    scorer = names.add_parser("scorer", help="the DPO policy's implicit reward against a reward model, on held-out "
                              "pairs", description="Ranks held-out demo pairs with the DPO policy's implicit reward, "
                              "the SFT model's log-likelihood and a Bradley–Terry reward model trained on the same "
                              "pairs. Writes results.json and scorer.md.")
    scorer.add_argument("--output-dir", default="runs/scorer",
                        help="where results.json, scorer.md and work/ go (default: runs/scorer)")
    scorer.add_argument("--quick", action="store_true", help="a reduced size (tests, a first look)")
    return [frontier, claims, scorer]


def _annotate_parser(sub) -> list[argparse.ArgumentParser]:
    """``preftune annotate load | serve | export | report``: people label pairs and judge policy against reference."""
    annotate = sub.add_parser("annotate", help="people in the loop: label pairs, blind human evaluation (web app)",
                              description="pairs (preftune pairs) or eval samples (preftune eval --samples-out) → "
                              "a web page where named annotators compare two responses in random order → preference "
                              "JSONL for preftune train, agreement, and the human win rate beside the judge's")
    actions = annotate.add_subparsers(dest="action", required=True)
    db_help = ("annotation database: a SQLite file (created if absent), sqlite:///path, or a shared PostgreSQL "
               "database postgresql://user@host:port/dbname (the annotate-postgres extra)")
    files = []
    for name, help_text in (("load", "load pairs and/or evaluation samples into the database"),
                            ("serve", "serve the annotation page (loads --pairs/--samples first)")):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("--db", default="annotations.sqlite", help=db_help)
        action.add_argument("--pairs", action="append", default=[], metavar="FILE",
                            help="pairs JSONL as `preftune pairs` writes (repeatable)")
        action.add_argument("--samples", action="append", default=[], metavar="FILE",
                            help="policy vs reference samples as `preftune eval --samples-out` writes (repeatable); "
                            "annotated blind")
        files.append(action)
    serve = files[1]
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but loopback needs --token")
    serve.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    serve.add_argument("--token", help="access token (>= 16 characters; or PREFTUNE_ANNOTATE_TOKEN); on loopback a "
                       "random one is made and printed in the page's URL")
    serve.add_argument("--votes-per-item", type=int, default=1,
                       help="labels wanted per item (2 or more gives annotator agreement)")
    serve.add_argument("--guidelines", metavar="FILE", help="the task's guidelines, a Markdown file shown on the page "
                       "(headings, lists, **bold**, *italic*, `code`; HTML is shown as text)")
    serve.add_argument("--admin-token", help="token of the read-only overview page (>= 16 characters; or "
                       "PREFTUNE_ANNOTATE_ADMIN_TOKEN); by default a random one, printed in the overview's URL")
    export = actions.add_parser("export", help="write the labelled pairs as preference JSONL for preftune train")
    export.add_argument("--db", default="annotations.sqlite", help=db_help)
    export.add_argument("--out", required=True, help="output JSONL of {prompt, chosen, rejected, votes}")
    export.add_argument("--task", choices=["pairs", "eval"], default="pairs",
                        help="eval exports the blind comparisons as preferences too")
    export.add_argument("--source", help="only the items loaded from this file (as `report` lists the sources)")
    export.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    report = actions.add_parser("report", help="counts, agreement, position bias, human vs judge win rate")
    report.add_argument("--db", default="annotations.sqlite", help=db_help)
    report.add_argument("--out", help="write the report as JSON here")
    return [*files, export, report]


def _split_config_and_overrides(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    # `preftune train beta=0.2` — the first positional is an override, not a file.
    if config is not None and "=" in config:
        return None, [config, *overrides]
    return config, overrides


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    debug = vars(args).pop("debug") or os.environ.get("PREFTUNE_DEBUG", "") not in ("", "0")
    _configure_logging(debug)
    try:
        return _run(args)
    except errors.PreftuneError as err:
        return _fail(str(err), err.exit_code, debug)
    except OSError as err:
        explained = _explain_os_error(err)
        if explained is None:
            raise
        return _fail(*explained, debug)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED, debug)


class _PreftuneAndErrors(logging.Filter):
    """The default log: preftune's own lines, and other libraries' errors (their warnings and notes are --debug's:
    Accelerate's "Removed shared tensor" on every checkpoint of a tied model, a CPU kernel bitsandbytes lacks)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.partition(".")[0] == "preftune" or record.levelno >= logging.ERROR


def _configure_logging(debug: bool) -> None:
    """One line per thing a user must know at the default level; everything else under ``--debug``. A host that set
    up logging itself (pytest, a notebook calling :func:`main`) keeps its own, as with ``logging.basicConfig``."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "preftune_cli", False)]:  # main() run again in one process
        root.removeHandler(old)
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    handler.preftune_cli = True  # type: ignore[attr-defined]
    if debug:
        warnings.simplefilter("default")  # every warning, once where it is raised
    else:
        handler.addFilter(_PreftuneAndErrors())
        # FutureWarnings and DeprecationWarnings speak to the authors of the code that calls a library, not to its user.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    level = "warning" if debug else "error"
    for name, variable in LIBRARY_LOGGERS.items():
        os.environ[variable] = level  # read when the library is first imported (nothing heavy is yet) …
        logging.getLogger(name).setLevel(level.upper())  # … and here if it already is (a second main())
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("preftune").setLevel(logging.DEBUG if debug else logging.NOTSET)


def _fail(message: str, code: int, debug: bool) -> int:
    """One line on stderr (newlines inside a message are folded), after the traceback under --debug."""
    if debug:
        traceback.print_exc()
    print(f"preftune: {' '.join(message.split())}", file=sys.stderr)
    return code


def _explain_os_error(err: OSError) -> tuple[str, int] | None:
    """A message and an exit code for the OS errors a user can fix (disk full, permissions, paths); None
    for the others, which keep their traceback."""
    path = err.filename
    code = err.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        where = f" while writing {path}" if path else ""
        return (f"no space left on the device{where}; free some space, or point output_dir (and cache_dir) at a "
                "disk with room, then run again", EXIT_DISK_FULL)
    if path is None:
        if isinstance(err, FileNotFoundError):
            return str(err), EXIT_NOT_FOUND
        if isinstance(err, (FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError)):
            return str(err), EXIT_NOT_WRITABLE
        return None
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "the file system is read-only" if code == errno.EROFS else "permission denied"
        return (f"{path}: {reason}; choose a folder you can write to (output_dir=…, cache_dir=…) or change "
                "its permissions", EXIT_NOT_WRITABLE)
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = _file_in_the_way(Path(path))
        if blocker is None:
            return f"{path} already exists; choose another path or move it away", EXIT_NOT_WRITABLE
        what = f"{path} is a file" if blocker == Path(path) else f"cannot create the folder {path}: {blocker} is a file"
        return f"{what}, not a folder; choose another folder (output_dir=…) or move the file", EXIT_NOT_WRITABLE
    if code == errno.EISDIR:
        return f"{path} is a folder where a file is expected; give the path of a file", EXIT_NOT_WRITABLE
    if code == errno.ENOENT:
        return f"{path}: no such file or folder; check the path", EXIT_NOT_FOUND
    return None


def _file_in_the_way(path: Path) -> Path | None:
    """The existing non-folder at ``path`` or above it that stops ``path`` from being a folder, if any."""
    for candidate in (path, *path.parents):
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return None


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from preftune.demo.pipeline import DemoSettings, run_demo

        settings = DemoSettings.quick(args.output_dir) if args.quick else DemoSettings(output_dir=args.output_dir)
        settings.seed, settings.overwrite = args.seed, args.overwrite
        run_demo(settings)
        return 0
    if args.command == "experiment":
        output_dir = args.output_dir
        if args.name == "scorer":
            from preftune.demo.pipeline import DemoSettings
            from preftune.experiments.scorer import ScorerSettings, run_scorer_experiment, scorer_table

            settings = ScorerSettings.quick(output_dir) if args.quick else ScorerSettings(
                world=DemoSettings(output_dir=f"{output_dir}/work"), output_dir=output_dir)
            print(scorer_table(run_scorer_experiment(settings)))
            return 0
        if args.name == "claims":
            from preftune.experiments.claims import ClaimsSettings, claims_table, run_claims

            settings = ClaimsSettings.quick(output_dir) if args.quick else ClaimsSettings.full(output_dir)
            settings.methods = args.methods or settings.methods
            settings.seeds = tuple(args.seeds) if args.seeds else settings.seeds
            settings.resume, settings.overwrite = args.resume, args.overwrite
            print(claims_table(run_claims(settings)))
            return 0
        from preftune.experiments.frontier import FrontierSettings, check_runs, frontier_table, run_frontier

        settings = FrontierSettings.quick(output_dir) if args.quick else FrontierSettings.full(output_dir)
        if args.runs:
            check_runs(args.runs)
            settings.runs = args.runs
        settings.resume = args.resume
        print(frontier_table(run_frontier(settings)))
        return 0
    if args.command == "score":
        from preftune.evaluation.scoring import score_command

        print(score_command(**{k: v for k, v in vars(args).items() if k != "command"}))
        return 0
    if args.command == "report":
        from preftune.evaluation.report import report_command

        print(report_command(args.run_dir, args.out))
        return 0
    if args.command in ("pairs", "eval"):
        from preftune.evaluation import commands

        options = {k: v for k, v in vars(args).items() if k != "command"}
        print((commands.pairs_command if args.command == "pairs" else commands.eval_command)(**options))
        return 0
    if args.command == "annotate":
        from preftune.annotate import commands as annotate

        if args.action == "load":
            print(annotate.load_command(args.db, args.pairs, args.samples))
        elif args.action == "serve":
            from preftune.annotate.server import check_port

            check_port(args.port)  # before the files load: a wrong --port is refused at once
            annotate.serve_command(args.db, args.pairs, args.samples, host=args.host, port=args.port,
                                   token=args.token, votes_per_item=args.votes_per_item,
                                   admin_token=args.admin_token, guidelines=args.guidelines)
        elif args.action == "export":
            print(annotate.export_command(args.db, args.out, args.task, args.source, args.overwrite))
        else:
            print(annotate.report_command(args.db, args.out))
        return 0
    if args.command == "methods":
        from preftune.methods.registry import describe

        print(describe())
        return 0
    if args.command == "config":
        from preftune.config import FIELDS, TrainConfig

        defaults = TrainConfig()
        for name in FIELDS:
            print(f"{name}: {getattr(defaults, name)!r}")
        return 0

    from preftune.config import load_config

    path, overrides = _split_config_and_overrides(args.config, args.overrides)
    cfg = load_config(path, overrides)
    from preftune.training.loop import train

    result = train(cfg)
    print(f"run directory: {result.output_dir}  (final model: {result.final_dir})")
    metrics = result.eval_metrics or result.train_metrics
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    print(f"after {result.global_step} steps: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
