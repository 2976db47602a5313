"""DPO's three claims against RLHF, measured with error bars: reward at a given KL (Rafailov et al. 2023, arXiv
2305.18290, Fig. 2), stability over seeds and settings, and compute.

Every run starts from the demo world's SFT model π_ref (:mod:`preftune.demo.pipeline`). Each family's
representatives run a small sweep — the learning rate × the method's one main coefficient (β, PPO's target KL,
SPPO's η = 1/β) — the same number of settings for every method, each setting at every seed. The seed moves what
a run draws (data order, its samples, the initialisation of a new head, the evaluation's samples), never the SFT
model or the held-out prompts.

Every ``eval_every`` steps the policy samples ``eval_samples`` completions of each held-out prompt. The prompts are
split once into a validation half, on which a family's setting is chosen, and a test half, on which it is reported
(:func:`preftune.experiments.intervals.select`); the KL(π‖π_ref) of a checkpoint is pooled over both halves, so both
rewards are read at the same KL. A run's reward at a KL budget is interpolated along its checkpoints, and a
setting's value is the mean over seeds with its 95% interval (:mod:`preftune.experiments.intervals`).

Compute: each checkpoint records the CPU seconds the run has spent training (evaluations excluded). Best-of-n,
the ceiling that needs no training, is evaluated on the same prompts at its analytic KL.

Results (``runs.json``) are rewritten after every run; ``resume`` keeps the runs of an earlier invocation under the
same settings and adds the missing ones (more seeds, more methods) without rerunning the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from preftune.demo.pipeline import DemoSettings, World, build_world
from preftune.errors import ConfigError, RunDirError
from preftune.evaluation.metrics import evaluate_policy
from preftune.experiments.frontier import (
    BEST_OF_N_SIZES,
    LEARNED_REWARD,
    PPO_CONFIG,
    best_of_n_scores,
    reward_model_on_world,
    rounds_steps,
    train_on_world,
)
from preftune.experiments.intervals import (
    Interval,
    Selection,
    evaluation_interval,
    interval,
    reward_at,
    select,
    separated,
    spent_at,
)
from preftune.methods.registry import get_method
from preftune.methods.rl import best_of_n_kl
from preftune.rollout.judges import GoldSentimentJudge
from preftune.rollout.sampling import SamplingParams, generate

log = logging.getLogger("preftune")


@dataclass(frozen=True)
class Sweep:
    """A method's runs: its base config and the values of its one main coefficient (with the learning rates of the
    experiment, every pair is a setting)."""

    config: dict
    coefficient: str
    values: tuple[float, ...]


# The families' representatives. Coefficient values bracket the registry default on this world's rewards in (0, 1).
ONLINE_BATCH = {"per_device_train_batch_size": 16}  # 16 prompts per step, sampled from the current policy
FAMILIES: dict[str, dict[str, Sweep]] = {
    "offline (DPO family)": {
        "DPO": Sweep({"method": "dpo"}, "beta", (0.1, 0.5)),
        "IPO": Sweep({"method": "ipo"}, "beta", (0.1, 0.5)),
        "SimPO": Sweep({"method": "simpo"}, "beta", (2.0, 5.0)),
        "KTO": Sweep({"method": "kto"}, "beta", (0.1, 0.5)),
    },
    "online": {
        "Online DPO": Sweep({"method": "online_dpo"} | ONLINE_BATCH, "beta", (0.1, 0.5)),
        "RLOO": Sweep({"method": "rloo", "num_generations": 4} | ONLINE_BATCH, "beta", (0.02, 0.05)),
        "GRPO": Sweep({"method": "grpo", "num_generations": 4} | ONLINE_BATCH, "beta", (0.04, 0.1)),
    },
    "rounds": {
        "SPPO": Sweep({"method": "sppo", "num_rounds": 3}, "beta", (0.02, 0.05)),  # η = 1/β = 50, 20
        "iterative DPO": Sweep({"method": "iterative_dpo", "num_rounds": 3}, "beta", (0.1, 0.5)),
        "RSO": Sweep({"method": "rso", "num_generations": 16, "rso_samples": 4, "rso_beta": 0.5}, "beta",
                     (0.1, 0.5)),
    },
    "PPO (RLHF)": {
        "PPO": Sweep(PPO_CONFIG | {"judge": LEARNED_REWARD}, "target_kl", (3.0, 9.0)),
        "PPO-GT": Sweep(PPO_CONFIG, "target_kl", (3.0, 9.0)),
    },
}
BEST_OF_N = "best-of-n"
KL_BUDGETS = (1.0, 2.0, 3.0, 5.0, 8.0)
DEFAULT_OUTPUT_DIR = "runs/claims"
MARKER = ".preftune-claims"


@dataclass
class ClaimsSettings:
    """Sizes of the experiment; :meth:`quick` shrinks them for the test suite."""

    # 2,048 held-out prompts, 1,024 per half, 2 samples each: π_ref's point has a 95% interval of ±0.018 (±0.026
    # with 512 per half; 4 samples of 512 gave ±0.022 for 1.7× the evaluation time).
    world: DemoSettings = field(default_factory=lambda: DemoSettings(output_dir=f"{DEFAULT_OUTPUT_DIR}/work",
                                                                     eval_prompts=2048))
    methods: list[str] = field(default_factory=lambda: [m for family in FAMILIES.values() for m in family])
    learning_rates: tuple[float, ...] = (1.5e-4, 6e-4)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 128
    eval_every: int = 32
    batch_size: int = 64
    eval_samples: int = 2  # per held-out prompt; the world's eval_prompts are split in half, validation and test
    best_of_n: bool = True
    output_dir: str = DEFAULT_OUTPUT_DIR
    resume: bool = False  # keep runs.json's runs (same settings) and add the missing ones
    overwrite: bool = False  # start again over an earlier runs.json

    @classmethod
    def full(cls, output_dir: str = DEFAULT_OUTPUT_DIR) -> ClaimsSettings:
        """The full size, its demo world in ``output_dir/work``."""
        settings = cls(output_dir=output_dir)
        settings.world.output_dir = str(Path(output_dir) / "work")
        return settings

    @classmethod
    def quick(cls, output_dir: str) -> ClaimsSettings:
        world = DemoSettings.quick(str(Path(output_dir) / "work"))
        world.eval_prompts = 64
        return cls(world=world, methods=["DPO", "Online DPO"], learning_rates=(6e-4,), seeds=(0, 1, 2), steps=12,
                   eval_every=6, batch_size=32, eval_samples=2, output_dir=output_dir)


@dataclass(frozen=True)
class PlannedRun:
    method: str
    setting: str  # "lr=…, coefficient=…"
    seed: int
    config: dict

    @property
    def key(self) -> str:
        return f"{self.method} | {self.setting} | seed {self.seed}"


def method_family(method: str) -> str:
    return next(name for name, members in FAMILIES.items() if method in members)


def plan(settings: ClaimsSettings) -> list[PlannedRun]:
    """Every run of the experiment: method × learning rate × coefficient value × seed, seed-major within a method so
    that an interrupted experiment has whole settings before it has more seeds."""
    sweeps = {m: s for family in FAMILIES.values() for m, s in family.items()}
    unknown = [m for m in settings.methods if m not in sweeps]
    if unknown:
        raise ConfigError(f"claims: unknown methods {unknown}; the representatives are {', '.join(sweeps)}")
    runs = []
    for method in settings.methods:
        sweep = sweeps[method]
        for seed in settings.seeds:
            for lr in settings.learning_rates:
                for value in sweep.values:
                    setting = f"lr={lr:g}, {sweep.coefficient}={value:g}"
                    runs.append(PlannedRun(method, setting, seed, sweep.config | {sweep.coefficient: value,
                                                                                   "learning_rate": lr}))
    return runs


# ---------------------------------------------------------------------------------------------- running
def claim_folder(settings: ClaimsSettings) -> Path:
    """The experiment's folder, marked as its own; any other folder that holds anything is refused."""
    out = Path(settings.output_dir).expanduser()
    settings.output_dir, settings.world.output_dir = str(out), str(Path(settings.world.output_dir).expanduser())
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--output-dir {out} is a file; give the experiment a new or empty folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and MARKER not in entries:
        raise RunDirError(f"{out} is not this experiment's folder (it holds {', '.join(entries[:4])}): give it an "
                          "empty or new --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `preftune experiment claims`: runs.json here is rewritten by it\n")
    return out


def _settings_record(settings: ClaimsSettings) -> dict:
    """The settings a result depends on (not which methods or seeds run, nor where)."""
    record = asdict(settings)
    for key in ("methods", "seeds", "output_dir", "resume", "overwrite", "best_of_n"):
        record.pop(key)
    record["world"].pop("output_dir")
    return json.loads(json.dumps(record))  # tuples as lists, as read back


def _earlier(settings: ClaimsSettings, path: Path) -> tuple[dict[str, dict], dict, float]:
    """The runs, shared stages and wall seconds so far that ``runs.json`` holds, with ``resume``; without it, an
    earlier record is replaced only with ``overwrite`` (hours of runs are never dropped by a repeated command)."""
    if not path.is_file():
        return {}, {}, 0.0
    earlier = json.loads(path.read_text())
    if not settings.resume:
        if earlier.get("runs") and not settings.overwrite:
            raise RunDirError(f"{path} holds {len(earlier['runs'])} runs of an earlier invocation: pass --resume to "
                              "continue it, or --overwrite to start again (its runs are then replaced)")
        return {}, {}, 0.0
    if earlier.get("settings") != _settings_record(settings):
        theirs, mine = earlier.get("settings", {}), _settings_record(settings)
        changed = sorted(k for k in theirs.keys() | mine.keys() if theirs.get(k) != mine.get(k))
        raise ConfigError(f"{path} was written under other settings ({', '.join(changed)} differ): resume in another "
                          "--output-dir, or rerun without --resume")
    return earlier["runs"], earlier.get("stages", {}), earlier.get("seconds", 0.0)


class Evaluator:
    """One seed's evaluation of a policy on the held-out prompts: ``eval_samples`` samples per prompt drawn with the
    seed, their gold rewards on the validation and the test half (each with its prompt-clustered interval), and the
    KL(π‖π_ref) of all of them."""

    def __init__(self, world: World, settings: ClaimsSettings, seed: int):
        self.world, self.prompts = world, world.eval_prompts
        self.validation = len(self.prompts) // 2
        self.n = settings.eval_samples
        self.sampling = SamplingParams(max_new_tokens=settings.world.max_new_tokens, n=self.n,
                                       seed=1000 + seed, batch_size=256)
        self.reference = generate(world.sft, world.tokenizer, self.prompts, self.sampling)
        self.seconds = 0.0  # CPU seconds spent evaluating
        self.start = self(world.sft, 0, 0.0)  # π_ref itself: every run's first point

    def __call__(self, model, step: int, spent: float) -> dict:
        began = time.process_time()
        metrics = evaluate_policy(model.eval(), self.world.sft, self.world.tokenizer, self.prompts,
                                  GoldSentimentJudge(), self.sampling, reference_rollout=self.reference,
                                  return_per_sample=True)
        rewards, cut = metrics["per_sample"]["rewards"], self.validation * self.n  # prompt-major: n per prompt
        validation, test = evaluation_interval(rewards[:cut], self.n), evaluation_interval(rewards[cut:], self.n)
        self.seconds += time.process_time() - began
        return {"step": step, "kl": metrics["kl"], "validation": validation.mean, "test": test.mean,
                "validation_half": validation.half, "test_half": test.half, "cpu_s": round(spent, 2)}


def run_claims(settings: ClaimsSettings) -> dict:
    """Train and evaluate every planned run that ``runs.json`` does not hold yet; returns the record."""
    out = claim_folder(settings)
    path = out / "runs.json"
    runs, stages, before = _earlier(settings, path)
    started = time.perf_counter() - before  # the record's wall time adds up over every invocation
    measured = _StageClock()
    world = build_world(settings.world, measured.lap)
    for stage in ("sft", "pairs"):  # kept from the first invocation: a resumed one rebuilds the same world
        stages.setdefault(stage, measured.seconds[stage])
    reference = _weights_digest(world.sft_dir)
    if stages.setdefault("reference_sha256", reference) != reference:
        raise ConfigError(f"{path} was measured from another π_ref (SFT weights {stages['reference_sha256'][:12]}…, "
                          f"rebuilt here as {reference[:12]}…: another CPU or library versions); its runs and new "
                          "ones would not share a starting point: resume on the machine it began on, or start a new "
                          "--output-dir")
    todo = [run for run in plan(settings) if run.key not in runs]
    learned = _reward_model(world, settings, stages, todo)
    evaluators: dict[int, Evaluator] = {}
    if settings.best_of_n:
        for seed in settings.seeds:
            key = f"{BEST_OF_N} | n ≤ {max(BEST_OF_N_SIZES)} | seed {seed}"
            if key not in runs:
                runs[key] = _best_of_n(world, settings, seed)
    bar = tqdm(total=len(todo), desc="claims", unit="run", dynamic_ncols=True)
    for run in todo:
        evaluator = evaluators.get(run.seed) or evaluators.setdefault(run.seed, Evaluator(world, settings, run.seed))
        began_cpu, evaluated = time.process_time(), evaluator.seconds
        trajectory = [evaluator.start]
        config = {"max_steps": settings.steps, "per_device_train_batch_size": settings.batch_size,
                  "seed": run.seed} | run.config  # a method's own batch (online, PPO) wins
        total = rounds_steps(config)[1]

        def checkpoint(step: int, model, trajectory=trajectory, evaluator=evaluator, began_cpu=began_cpu,
                       evaluated=evaluated, total=total):
            if step % settings.eval_every == 0 or step == total:  # and the last step, whatever the cadence
                spent = time.process_time() - began_cpu - (evaluator.seconds - evaluated)
                trajectory.append(evaluator(model, step, spent))

        began = time.perf_counter()
        train_on_world(world, settings.world, config, run.key, checkpoint, learned)
        runs[run.key] = {"method": run.method, "family": method_family(run.method), "setting": run.setting,
                         "seed": run.seed, "config": _shown(run.config), "trajectory": trajectory,
                         "wall_s": round(time.perf_counter() - began, 1), "cpu": cpu_model()}
        _write(path, settings, runs, stages, time.perf_counter() - started)
        bar.update(1)
    bar.close()
    _write(path, settings, runs, stages, time.perf_counter() - started)
    record = json.loads(path.read_text())
    write_results(record, out)
    return record


def write_results(record: dict, out: Path) -> None:
    """``claims.md`` (the tables), ``claims.png`` (the figure) and ``claims.html`` (both, in the health report's
    style) from a ``runs.json`` record."""
    from preftune.evaluation.report import markdown_page

    table = claims_table(record)
    (out / "claims.md").write_text(table + "\n")
    plot(record, out / "claims.png")
    cpus = sorted({run["cpu"] for run in record["runs"].values() if "cpu" in run})
    trained = sum("cpu" in run for run in record["runs"].values())
    meta = (f"{trained} trained runs · CPU: {', '.join(cpus) or '?'} · "
            f"{record['seconds'] / 3600:.1f} h of wall time over its invocations")
    (out / "claims.html").write_text(markdown_page("DPO's claims, measured with error bars", meta, table,
                                                   [(out / "claims.png", "test reward at each KL budget, mean and "
                                                     "95% band over seeds; reward at the middle budget against "
                                                     "CPU seconds")]), encoding="utf-8")


class _StageClock:
    """CPU seconds of each stage of :func:`build_world` (its ``lap`` callback)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.process_time()

    def lap(self, name: str) -> None:
        now = time.process_time()
        self.seconds[name], self._last = round(now - self._last, 1), now


def _weights_digest(model_dir: Path) -> str:
    """SHA-256 of a saved model's weight files, in name order."""
    digest = hashlib.sha256()
    for weights in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(weights.read_bytes())
    return digest.hexdigest()


def cpu_model() -> str:
    """The CPU a run's seconds were measured on (they compare only within one model): its name and whether it has
    native bf16 (AVX512-BF16 or AMX)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    return f"{name} ({'AVX512-BF16' if native else 'AVX-512' if 'avx512f' in flags else 'AVX2'})"


def _shown(config: dict) -> dict:
    return {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in config.items()}


def _write(path: Path, settings: ClaimsSettings, runs: dict, stages: dict, seconds: float) -> None:
    """``runs.json``: the settings, the budgets, the shared stages (CPU seconds of the SFT, the offline pairs and the
    reward model; the SHA-256 of π_ref's weights, which a resume must rebuild identically), every run, and the wall
    seconds of every invocation together."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"settings": _settings_record(settings), "kl_budgets": list(KL_BUDGETS),
                               "stages": stages, "runs": runs, "seconds": round(seconds, 1)}, indent=1))
    tmp.replace(path)  # an interrupted write never leaves half a record


def _reward_model(world: World, settings: ClaimsSettings, stages: dict, todo: list[PlannedRun]) -> Path | None:
    """The Bradley–Terry reward model the PPO runs optimise, trained once on the world's pairs (kept with the work
    folder; its CPU seconds are charged to those runs in the analysis). It is trained again where its folder is gone
    or its cost was not recorded in this record (a folder left by an earlier, overwritten experiment): the training
    is seeded, so the model is the same."""
    if not any(run.config.get("judge") == LEARNED_REWARD for run in todo):
        return None
    final = Path(settings.world.output_dir) / "runs/reward_model/final"
    if not final.is_dir() or "reward model" not in stages:
        began = time.process_time()
        reward_model_on_world(world, settings.world, settings.steps, settings.batch_size, learning_rate=3e-4)
        stages.setdefault("reward model", round(time.process_time() - began, 1))
    return final


def _best_of_n(world: World, settings: ClaimsSettings, seed: int) -> dict:
    """Best-of-n from π_ref at KL log n − (n−1)/n, on both halves of the held-out prompts: one trajectory point per n
    (no training: its cost is the sampling, at inference time)."""
    half = len(world.eval_prompts) // 2
    began = time.process_time()
    best, _ = best_of_n_scores(world, world.eval_prompts, settings.world.max_new_tokens, 2000 + seed, BEST_OF_N_SIZES)
    trajectory = []
    for n, scores in best.items():
        validation, test = evaluation_interval(scores[:half], 1), evaluation_interval(scores[half:], 1)
        trajectory.append({"step": n, "kl": best_of_n_kl(n), "validation": validation.mean, "test": test.mean,
                           "validation_half": validation.half, "test_half": test.half, "cpu_s": 0.0})
    return {"method": BEST_OF_N, "family": "best-of-n (no training)", "setting": f"n ≤ {max(BEST_OF_N_SIZES)}",
            "seed": seed, "config": {}, "trajectory": trajectory,
            "sampling_cpu_s": round(time.process_time() - began, 1)}


# ---------------------------------------------------------------------------------------------- analysis
def values_at(record: dict, method: str, budget: float) -> tuple[dict, dict]:
    """Per setting, the per-seed rewards at ``budget`` on the validation and on the test prompts (None where the run
    did not reach it), read along each run's pooled KL."""
    validation: dict[str, list] = {}
    test: dict[str, list] = {}
    for run in record["runs"].values():
        if run.get("method") != method:
            continue
        points = run["trajectory"]
        validation.setdefault(run["setting"], []).append(
            reward_at([(p["kl"], p["validation"]) for p in points], budget))
        test.setdefault(run["setting"], []).append(reward_at([(p["kl"], p["test"]) for p in points], budget))
    return validation, test


def selections(record: dict, budget: float) -> dict[str, Selection | None]:
    """Each method's setting chosen on validation at ``budget``, with its test value over seeds."""
    methods = dict.fromkeys(run["method"] for run in record["runs"].values() if "method" in run)
    return {method: select(*values_at(record, method, budget)) for method in methods}


def cpu_at(record: dict, method: str, setting: str, budget: float) -> list[float | None]:
    """Per seed, the CPU seconds a run had spent training when its KL reached ``budget``."""
    return [spent_at([(p["kl"], p["test"], p["cpu_s"]) for p in run["trajectory"]], budget)
            for run in record["runs"].values() if run.get("method") == method and run["setting"] == setting]


def differences(chosen: dict[str, Selection | None], against: str = "DPO") -> list[tuple[str, str, Selection]]:
    """Each method's standing against ``against`` among one budget's :func:`selections`: ``(method, "above" |
    "below" | "no difference", its selection)``, a difference only where the two 95% intervals do not overlap.
    Methods without a value there are left out."""
    base = chosen.get(against)
    if base is None:
        return []
    verdicts = []
    for method, pick in chosen.items():
        if method == against or pick is None:
            continue
        verdict = ("no difference" if not separated(pick.test, base.test)
                   else "above" if pick.test.mean > base.test.mean else "below")
        verdicts.append((method, verdict, pick))
    return verdicts


def claims_table(record: dict) -> str:
    """Markdown: per method and KL budget, the test reward (mean ± 95% interval over seeds) of the setting chosen on
    validation; then stability (seed spread at the chosen setting, the sweep's forgiving fraction) and compute (CPU
    seconds to reach the budget) at the middle budget."""
    budgets = record["kl_budgets"]
    chosen = {budget: selections(record, budget) for budget in budgets}
    methods = list(chosen[budgets[0]])
    lines = ["Gold reward on the test prompts at each KL(π‖π_ref) budget (nats): mean ± 95% interval over seeds, "
             "of the setting chosen on the validation prompts (– : no setting reached the budget at every seed).",
             "", "| method | family | " + " | ".join(f"KL {b:g}" for b in budgets) + " |",
             "|---|---|" + "---:|" * len(budgets)]
    family_of = {run["method"]: run["family"] for run in record["runs"].values() if "method" in run}
    for method in methods:
        cells = [str(chosen[b][method].test) if chosen[b][method] else "–" for b in budgets]
        lines.append(f"| {method} | {family_of[method]} | " + " | ".join(cells) + " |")
    lines += ["", "DPO's claims against the RLHF runs:", "", *(verdicts(record) or ["- (no PPO run yet)"])]
    lines += ["", "Against DPO (a difference only where the 95% intervals do not overlap):", ""]
    for budget in budgets:
        found = differences(chosen[budget])
        if found:
            lines.append(f"- KL {budget:g}: " + "; ".join(f"{method} {verdict}" for method, verdict, _ in found))
    middle = budgets[len(budgets) // 2]
    lines += ["", f"Stability and compute at KL {middle:g}: the chosen setting, the spread (standard deviation) of "
              "its test reward over seeds with its 95% interval, the fraction of the sweep within 0.02 of the best "
              "on validation, the CPU seconds of training spent to reach the budget (mean ± 95% interval over "
              "seeds), and the same with the shared stages the method needs (SFT; the pairs for offline losses; "
              "pairs and reward model for PPO).", "",
              "| method | chosen setting | seed spread (95%) | forgiving | CPU s to reach | with SFT, pairs, RM |",
              "|---|---|---:|---:|---:|---:|"]
    for method in methods:
        pick = chosen[middle][method]
        if pick is None:
            lines.append(f"| {method} | – | – | – | – | – |")
            continue
        cost, total = (c.shown(1) if c else "–" for c in costs(record, method, pick.setting, middle))
        lines.append(f"| {method} | {pick.setting} | {_spread(pick)} | "
                     f"{pick.forgiving:.2f} ({pick.settings_reaching}/{pick.settings_total} reach) | {cost} | "
                     f"{total} |")
    return "\n".join(lines)


def costs(record: dict, method: str, setting: str, budget: float) -> tuple[Interval | None, Interval | None]:
    """CPU seconds of training to reach ``budget`` over the seeds of one setting, and the same with the shared
    stages charged (:func:`charged_seconds`); None for best-of-n and where no seed reached it."""
    runs = [r for r in record["runs"].values() if r.get("method") == method and r["setting"] == setting]
    spent_per_seed = cpu_at(record, method, setting, budget)
    reached = [(spent, charged_seconds(record, run)) for run, spent in zip(runs, spent_per_seed)
               if spent is not None and method != BEST_OF_N]
    if not reached:
        return None, None
    return interval([s for s, _ in reached]), interval([s + c for s, c in reached])


def _spread(pick: Selection) -> str:
    """The seed spread with its 95% interval, e.g. ``0.034 (0.018–0.214)``."""
    low, high = pick.spread_interval
    return f"{pick.seed_spread:.3f}" + (f" ({low:.3f}–{high:.3f})" if math.isfinite(high) else " (1 seed)")


def verdicts(record: dict, rlhf: tuple[str, ...] = ("PPO", "PPO-GT")) -> list[str]:
    """The three claims, DPO against the RLHF runs, as markdown bullets from the numbers: reward at each budget
    (a difference only where the intervals separate); at the highest budget both reach, up to the middle one,
    stability (the spread over seeds and the forgiving fraction of the sweep) and compute (CPU seconds to reach it,
    the shared stages charged)."""
    budgets = record["kl_budgets"]
    middle = budgets[len(budgets) // 2]
    chosen = {budget: selections(record, budget) for budget in budgets}
    lines = []
    for other in rlhf:
        standing = []
        for budget in budgets:
            found = {method: (verdict, pick) for method, verdict, pick in differences(chosen[budget])}
            if other in found:  # DPO has a value there too
                verdict, pick = found[other]
                word = {"above": "below", "below": "above"}.get(verdict, "no different from")
                standing.append(f"KL {budget:g}: DPO {chosen[budget]['DPO'].test} {word} {other} {pick.test}")
        if standing:
            lines.append(f"- **Reward at equal KL, DPO against {other}**: " + "; ".join(standing) + ".")
    for other in rlhf:
        # the highest budget both reach at every seed, up to the middle one
        both = [b for b in budgets if b <= middle and chosen[b].get("DPO") and chosen[b].get(other)]
        if not both:
            continue
        budget = max(both)
        dpo, pick = chosen[budget]["DPO"], chosen[budget][other]
        steadier = ("no different" if not separated(dpo.spread_interval, pick.spread_interval)
                    else "more stable" if dpo.seed_spread < pick.seed_spread else "less stable")
        lines.append(f"- **Stability at KL {budget:g}, DPO against {other}**: spread over seeds {_spread(dpo)} "
                     f"against {_spread(pick)}: DPO {steadier}; within 0.02 of the best setting: "
                     f"{dpo.forgiving:.2f} of DPO's sweep against {pick.forgiving:.2f} of {other}'s.")
        dpo_cost = costs(record, "DPO", dpo.setting, budget)[1]
        other_cost = costs(record, other, pick.setting, budget)[1]
        if dpo_cost and other_cost:
            differ = separated(dpo_cost, other_cost)
            word = "no different" if not differ else "lighter" if dpo_cost.mean < other_cost.mean else "heavier"
            lines.append(f"- **Compute to reach KL {budget:g}, DPO against {other}** (SFT, pairs and reward model "
                         f"charged): {dpo_cost.shown(1)} against {other_cost.shown(1)} CPU s, "
                         f"×{other_cost.mean / dpo_cost.mean:.2f}: DPO {word}.")
    return lines


def charged_seconds(record: dict, run: dict) -> float:
    """The CPU seconds of the shared stages a run needs: the SFT model (every trained method), π_ref's labelled pairs
    (the offline losses, and PPO's reward model trained on them), and the reward model (PPO with a learned reward).
    Online and rounds methods sample and judge their own completions inside their run."""
    stages = record.get("stages", {})
    method = get_method(run["config"]["method"])
    learned = run["config"].get("judge") == LEARNED_REWARD
    offline = not method.online and method.rounds is None and method.algorithm is None
    return (stages.get("sft", 0.0) + (stages.get("pairs", 0.0) if offline or learned else 0.0)
            + (stages.get("reward model", 0.0) if learned else 0.0))


def _band(budget: float, chosen: Selection | None) -> tuple[float, float, float, float] | None:
    """``(budget, mean, low, high)``; one seed has no interval, so its band is the line itself (not ``[0, 1]``)."""
    if chosen is None:
        return None
    test = chosen.test
    return (budget, test.mean, test.mean, test.mean) if test.n < 2 else (budget, test.mean, test.low, test.high)


def family_selection(record: dict, family: str, budget: float) -> Selection | None:
    """A family's frontier point at ``budget``: its best method and setting together, chosen on validation."""
    validation: dict[str, list] = {}
    test: dict[str, list] = {}
    for method in dict.fromkeys(r["method"] for r in record["runs"].values() if r.get("family") == family):
        v, t = values_at(record, method, budget)
        validation |= {f"{method}: {setting}": values for setting, values in v.items()}
        test |= {f"{method}: {setting}": values for setting, values in t.items()}
    return select(validation, test) if validation else None


def plot(record: dict, out_png: Path) -> None:
    """``claims.png`` (:func:`preftune.evaluation.report.plot_claims`): a panel per family with best-of-n and the DPO
    sweep as references, the families' frontiers, and reward at the middle budget against total CPU seconds."""
    from preftune.evaluation.report import plot_claims

    budgets = record["kl_budgets"]
    chosen = {budget: selections(record, budget) for budget in budgets}
    family_of = {r["method"]: r["family"] for r in record["runs"].values() if "method" in r}

    def curve(method: str) -> list:
        return [band for b in budgets if (band := _band(b, chosen[b][method])) is not None]

    panels: dict[str, dict[str, list]] = {family: {} for family in FAMILIES if family in family_of.values()}
    for method, family in family_of.items():
        if method != BEST_OF_N:
            panels[family][method] = curve(method)
    references = {name: curve(name) for name in (BEST_OF_N, "DPO") if name in family_of}
    families = list(dict.fromkeys(family_of.values()))
    summary = {family: [band for b in budgets if (band := _band(b, family_selection(record, family, b)))]
               for family in families}
    middle = budgets[len(budgets) // 2]
    compute = {}
    for method, pick in chosen[middle].items():
        if pick is None or method == BEST_OF_N:
            continue
        cost = costs(record, method, pick.setting, middle)[1]
        if cost is None:
            continue
        half = cost.half if cost.n > 1 else 0.0
        compute[method] = ((cost.mean, cost.mean, cost.mean - half, cost.mean + half),
                           (pick.test.mean, pick.test.mean, pick.test.low, pick.test.high))
    plot_claims(panels, references, summary, compute, out_png, compute_budget=middle,
                title="DPO's claims on the demo world: test reward at each KL budget, mean and 95% band over seeds")
