"""The DPO paper's reward–KL frontier (Rafailov et al. 2023, Fig. 2 left) in miniature, on the demo world.

Every run starts from the same SFT model π_ref. Offline methods train on the same on-policy pairs (sampled
from π_ref, labelled by the gold VADER reward); online methods (Online DPO, RLOO, GRPO) sample their own
completions of the same training prompts from the current policy and ask the same gold judge; the methods
trained in rounds (RSO, SPPO, iterative DPO) sample, judge and pair a round's completions of the same prompts,
then train on them. Best-of-n needs no training: the best of n samples of π_ref by the gold reward, at the
analytic KL log n − (n−1)/n (Gao et al. 2022, arXiv 2210.10760, §2). Every
``eval_every`` optimizer steps the policy samples the held-out prompts; each checkpoint gives one point
(sequence-level KL(π‖π_ref) on its own samples, mean gold reward). The frontier of a method is the upper
envelope of its points. Each run's cost is measured too: wall time (evaluations excluded), the process's peak
resident memory above what it held before the run, and the tokens the run generated.

Methods are data: :data:`RUNS` maps a label to a config of the run driver (any registered method: offline,
online or in rounds). Methods that train outside it (PPO) join the same plot through :func:`register_runner`: a
function ``(world, settings, evaluate) -> list[point]``. Each run belongs to a family (:func:`family`), one
colour on the plot. Points, plot and tables are rewritten after every run, so an interrupted experiment keeps
what it measured.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import AutoModelForCausalLM

from preftune.demo.pipeline import DemoSettings, World, build_world, sample_record, train_stage
from preftune.errors import ConfigError, RunDirError
from preftune.evaluation.metrics import evaluate_policy
from preftune.evaluation.report import plot_frontier
from preftune.methods.registry import get_method
from preftune.methods.rl import best_of_n_kl
from preftune.metric_names import EVAL_PREFIX, KL, LENGTH, REWARD, REWARDS_ACCURACIES
from preftune.rollout.judges import GoldSentimentJudge, RewardModelJudge, score_rollout
from preftune.rollout.sampling import SamplingParams, generate

log = logging.getLogger("preftune")

# label → config of the run driver. The paper sweeps DPO's β and compares the baselines that need no RL; every
# other loss that trains on the same pairs runs at its registry defaults (the frontier's learning rate and steps).
RUNS: dict[str, dict] = {
    **{f"DPO β={beta:g}": {"method": "dpo", "beta": beta} for beta in (0.05, 0.1, 0.5, 1.0, 5.0)},
    # Rounds: the frontier's step budget split over 3 rounds (RSO: one round), each on pairs of every training
    # prompt sampled from the current iterate (RSO: from π_ref) and judged by the gold reward. Scaled to this
    # world's rewards in (0, 1):
    # SPPO's η = 1/β = 50 keeps its log-ratio targets η(P̂ − ½) within a few nats per round (P̂ = mean σ(s_i − s_j)
    # stays within ≈ ½ ± 0.1 for scores in (0, 1); the paper's η = 1000 is for PairRM scores and a learning rate of
    # 5e-7; on the reduced world η = 20 hardly moved the policy, η = 100 reached KL 4 in 2 rounds); RSO samples 16
    # candidates (the paper: 64) and accepts 4, γ = 0.5 as DPO's β here.
    "Iterative DPO β=0.5": {"method": "iterative_dpo", "beta": 0.5, "num_rounds": 3},
    "SPPO η=50": {"method": "sppo", "beta": 0.02, "num_rounds": 3},
    **{f"RSO γ=0.5 β_rso={b:g}": {"method": "rso", "beta": 0.5, "num_generations": 16, "rso_samples": 4,
                                   "rso_beta": b} for b in (0.1, 0.5)},  # 0.5: the paper's; on the reduced world
    # β_rso = 0.5 raised the gold reward more than 0.1 (tests/demo/test_rounds_world.py), its pairs spread wider
    # Online: per step 16 training prompts, completions sampled from the current policy and judged by the gold
    # reward (the offline runs see 64 pairs per step, sampled once from π_ref).
    **{f"Online DPO β={beta:g}": {"method": "online_dpo", "beta": beta, "per_device_train_batch_size": 16}
       for beta in (0.1, 0.5)},
    "RLOO k=4": {"method": "rloo", "num_generations": 4, "per_device_train_batch_size": 16},
    "GRPO G=4 β=0.04": {"method": "grpo", "num_generations": 4, "beta": 0.04, "per_device_train_batch_size": 16},
    # The rest of the offline family, on the same pairs.
    **{label: {"method": name} for label, name in (
        ("cDPO ε=0.1", "cdpo"), ("robust DPO ε=0.1", "robust"), ("IPO β=0.1", "ipo"), ("hinge β=0.1", "hinge"),
        ("SimPO", "simpo"), ("ORPO", "orpo"), ("CPO", "cpo"), ("SLiC", "slic"), ("KTO", "kto"), ("DPOP", "dpop"),
        ("RPO", "rpo"), ("NCA", "nca_pair"), ("BCO", "bco_pair"), ("SPPO-hard", "sppo_hard"),
        ("APO-zero", "apo_zero"), ("APO-down", "apo_down"))},
    "Preferred-FT": {"method": "sft"},  # SFT on the chosen completions
    **{f"Unlikelihood α={a:g}": {"method": "unlikelihood", "unlikelihood_alpha": a} for a in (0.1, 1.0)},
}

# PPO, the RLHF pipeline DPO replaces (its own algorithm, through the same entry point), on the same training prompts.
# Per update 32 prompts, one completion each, 2 passes (a run of N updates makes half the sequence forward-backward
# passes of a DPO run of N steps of 64 pairs). Scores normalised by their running mean and deviation, as the DPO
# paper's own PPO; the adaptive KL controller toward each target KL(π‖π_ref) per completion (the paper sweeps 3, 6,
# 9, 12 nats), its horizon 10 updates' samples (≤ ±2% of the coefficient per update, as the paper's 1024 samples per
# step against TRL's horizon of 10,000). "PPO" optimises the Bradley–Terry reward model trained on the same pairs
# (LEARNED_REWARD: trained once, before the first run that needs it); "PPO-GT" the gold reward itself.
LEARNED_REWARD = "learned"
REWARD_MODEL = "reward model (for PPO)"
PPO_TARGET_KLS = (3.0, 6.0, 9.0)
PPO_CONFIG = {"method": "ppo", "per_device_train_batch_size": 32, "num_ppo_epochs": 2, "kl_coef": 0.1,
              "kl_horizon": 320, "missing_eos_penalty": 0.5, "use_score_scaling": True, "use_score_norm": True}
RUNS |= {f"PPO target KL={kl:g}": PPO_CONFIG | {"target_kl": kl, "judge": LEARNED_REWARD} for kl in PPO_TARGET_KLS}
RUNS |= {f"PPO-GT target KL={kl:g}": PPO_CONFIG | {"target_kl": kl} for kl in PPO_TARGET_KLS}

BEST_OF_N = "Best-of-n"
BEST_OF_N_SIZES = (1, 2, 4, 8, 16, 32, 64)

Point = dict  # {"method", "kl", "reward", "step"}
Runner = Callable[[World, "FrontierSettings", Callable[[object], dict]], list[Point]]
RUNNERS: dict[str, Runner] = {}


def register_runner(label: str, runner: Runner) -> None:
    """Add a method that samples while it trains (PPO, online methods) to the frontier."""
    RUNNERS[label] = runner


def family(label: str) -> str:
    """The family a run is drawn in (one colour each): read from its method's registry entry for the runs of
    :data:`RUNS`; best-of-n; a runner's own label's first word (``PPO …`` → ``PPO``)."""
    if label == BEST_OF_N:
        return "best-of-n (no training)"
    if label not in RUNS:
        return label.split()[0]
    method = get_method(RUNS[label]["method"])
    if method.algorithm == "ppo":
        return "PPO (RLHF)"
    if method.rounds is not None:
        return "rounds (RSO, SPPO, iterative DPO)"
    if method.online:
        return "online (Online DPO, RLOO, GRPO)"
    if method.name == "dpo":
        return "DPO β sweep"
    if method.name in ("sft", "unlikelihood"):
        return "SFT baselines"
    return "other offline losses"


def best_of_n_scores(world: World, prompts: list[str], max_new_tokens: int, seed: int, sizes: tuple[int, ...],
                     ) -> tuple[dict[int, list[float]], int]:
    """Best-of-n from π_ref: max(sizes) samples per prompt judged by the gold reward; for each n, the best score of
    each prompt's first n samples (its KL to π_ref is log n − (n−1)/n, :func:`preftune.methods.rl.best_of_n_kl`);
    also the tokens generated."""
    n_max = max(sizes)
    params = SamplingParams(max_new_tokens=max_new_tokens, n=n_max, seed=seed, batch_size=max(256, n_max))
    rollout = score_rollout(GoldSentimentJudge(), generate(world.sft, world.tokenizer, prompts, params))
    scores = rollout.grouped(rollout.scores)  # [P, n_max]
    return {n: scores[:, :n].max(dim=1).values.tolist() for n in sizes}, sum(rollout.lengths)


def best_of_n(world: World, settings: FrontierSettings, sizes: tuple[int, ...] = BEST_OF_N_SIZES,
              ) -> tuple[list[Point], int]:
    """Best-of-n on the frontier's held-out prompts: one point per n, the mean over prompts of the best of the
    first n samples, at its analytic KL; also the tokens generated."""
    best, tokens = best_of_n_scores(world, world.eval_prompts[: settings.eval_prompts],
                                    settings.world.max_new_tokens, settings.world.seed + 3, sizes)
    points = [{"method": BEST_OF_N, "step": n, "n": n, "kl": best_of_n_kl(n), "reward": sum(b) / len(b)}
              for n, b in best.items()]
    return points, tokens


# A run folder (ignored by git): the committed results in experiments/frontier are replaced only on purpose.
DEFAULT_OUTPUT_DIR = "runs/frontier"


@dataclass
class FrontierSettings:
    world: DemoSettings = field(default_factory=lambda: DemoSettings(output_dir=f"{DEFAULT_OUTPUT_DIR}/work"))
    steps: int = 200
    eval_every: int = 20
    batch_size: int = 64
    learning_rate: float = 3e-4
    eval_prompts: int = 128
    output_dir: str = DEFAULT_OUTPUT_DIR
    runs: list[str] = field(default_factory=lambda: [*RUNS, BEST_OF_N, *RUNNERS])
    # Keep the runs an earlier invocation wrote to points.json under the same settings, and run only the others (an
    # interrupted frontier continues; a new method joins without rerunning the rest).
    resume: bool = False

    @classmethod
    def full(cls, output_dir: str = DEFAULT_OUTPUT_DIR) -> FrontierSettings:
        """The full size, its demo world in ``output_dir/work``."""
        return cls(world=DemoSettings(output_dir=str(Path(output_dir) / "work")), output_dir=output_dir)

    @classmethod
    def quick(cls, output_dir: str) -> FrontierSettings:
        world = DemoSettings.quick(str(Path(output_dir) / "work"))
        return cls(world=world, steps=12, eval_every=6, batch_size=32, eval_prompts=world.eval_prompts,
                   output_dir=output_dir, runs=["DPO β=0.5", "Preferred-FT", "Unlikelihood α=1", "Online DPO β=0.1",
                                                "GRPO G=4 β=0.04", "Iterative DPO β=0.5", BEST_OF_N])


FRONTIER_MARKER = ".preftune-frontier"
RESULTS = ("points.json", "frontier.md", "frontier.png")


def claim_frontier_folder(settings: FrontierSettings) -> Path:
    """The frontier's output folder (``~`` expanded once, into ``settings``, as the demo's claim does), marked as
    the frontier's. A folder is the frontier's when it holds the marker or a ``points.json`` the frontier wrote
    (results from before the marker); any other folder that holds anything is refused, so a user's
    ``frontier.md`` or ``points.json`` is never replaced."""
    out = Path(settings.output_dir).expanduser()
    settings.output_dir = str(out)
    settings.world.output_dir = str(Path(settings.world.output_dir).expanduser())
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--output-dir {out} is a file; give the frontier a new or empty folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and FRONTIER_MARKER not in entries and not _is_frontier_record(out / "points.json"):
        shown = ", ".join(entries[:4]) + (", …" if len(entries) > 4 else "")
        raise RunDirError(f"{out} is not a frontier folder (it holds {shown}); the frontier writes "
                          f"{', '.join(RESULTS)} and work/ there, so give it an empty or new --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    (out / FRONTIER_MARKER).write_text("written by `preftune experiment frontier`: its results here may be "
                                       "rewritten by the next frontier\n")
    return out


def _is_frontier_record(path: Path) -> bool:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(record, dict) and isinstance(record.get("settings"), dict)
            and isinstance(record.get("points"), list) and isinstance(record.get("costs"), dict))


def run_frontier(settings: FrontierSettings) -> list[Point]:
    """Train every run with periodic evaluation; write points, plot and table under ``output_dir`` (claimed first:
    :func:`claim_frontier_folder`)."""
    started = time.perf_counter()
    claim_frontier_folder(settings)
    points, costs = _earlier_results(settings) if settings.resume else ([], {})
    world = build_world(settings.world)
    judge = GoldSentimentJudge()
    prompts = world.eval_prompts[: settings.eval_prompts]
    sampling = SamplingParams(max_new_tokens=settings.world.max_new_tokens, n=1, seed=settings.world.seed + 2)
    reference_rollout = generate(world.sft, world.tokenizer, prompts, sampling)

    def evaluate(model) -> dict:
        return evaluate_policy(model.eval(), world.sft, world.tokenizer, prompts, judge, sampling,
                               reference_rollout=reference_rollout)

    start = evaluate(world.sft)
    learned = None
    if REWARD_MODEL in costs:  # kept from the earlier points.json, its folder in place
        learned = Path(settings.world.output_dir) / "runs/reward_model/final"
    elif any(RUNS.get(label, {}).get("judge") == LEARNED_REWARD for label in settings.runs if label not in costs):
        began, cpu = time.perf_counter(), time.process_time()
        with PeakMemory() as memory:
            learned, summary = train_reward_model(world, settings)
        costs[REWARD_MODEL] = _cost(summary, {}, time.perf_counter() - began, time.process_time() - cpu, memory) | {
            "eval_accuracy": summary["eval"].get(EVAL_PREFIX + REWARDS_ACCURACIES)}
    for label in settings.runs:
        if label in costs:
            log.info("frontier: %s kept from the earlier points.json", label)
            continue
        run_points = [{"method": label, "step": 0, "kl": 0.0, "reward": start[REWARD]}]
        evaluating = {"seconds": 0.0, "cpu": 0.0}

        def checkpoint(step: int, model, label=label, run_points=run_points, evaluating=evaluating) -> dict | None:
            if step % settings.eval_every:
                return None
            began, cpu = time.perf_counter(), time.process_time()
            metrics = evaluate(model)
            evaluating["seconds"] += time.perf_counter() - began
            evaluating["cpu"] += time.process_time() - cpu
            run_points.append({"method": label, "step": step, "kl": metrics[KL], "reward": metrics[REWARD],
                               "length": metrics[LENGTH]})
            return sample_record(metrics, reference_rollout)  # what `preftune report` reads

        began, cpu = time.perf_counter(), time.process_time()
        with PeakMemory() as memory:
            if label == BEST_OF_N:
                run_points, tokens = best_of_n(world, settings)
                summary, generated = {}, {"generated_tokens": tokens}
            elif label in RUNNERS:
                run_points += RUNNERS[label](world, settings, evaluate)
                summary, generated = {}, {}
            else:
                summary = _train_run(world, settings, label, checkpoint, learned)
                generated = summary.get("online") or summary.get("sampling") or {}
        costs[label] = _cost(summary, generated,
                             time.perf_counter() - began - evaluating["seconds"],
                             time.process_time() - cpu - evaluating["cpu"], memory)
        log.info("frontier: %s → %s (%s)", label, [(round(p["kl"], 2), round(p["reward"], 3)) for p in run_points],
                 costs[label])
        points += [{**p, "family": p.get("family", family(label))} for p in run_points]
        _write_results(settings, points, costs, start[REWARD], judge.name, time.perf_counter() - started)
    return points


def check_runs(labels: list[str]) -> None:
    """Refuse a label that names no run, listing the ones there are."""
    known = [*RUNS, BEST_OF_N, *RUNNERS]
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise ConfigError(f"frontier runs {unknown} do not exist; the runs are: {', '.join(known)}")


def _earlier_results(settings: FrontierSettings) -> tuple[list[Point], dict[str, dict]]:
    """The points and costs of the runs in ``output_dir/points.json``, if it was written under the same settings
    (apart from which runs); a PPO run's reward model is reused only with its folder in place."""
    path = Path(settings.output_dir) / "points.json"
    if not path.is_file():
        return [], {}
    if not _is_frontier_record(path):
        raise ConfigError(f"{path} is not the points.json the frontier writes (a JSON object with settings, points "
                          "and costs), so --resume cannot continue from it: move it away, or resume in another "
                          "--output-dir")
    earlier = json.loads(path.read_text())
    ignored = ("runs", "resume", "output_dir")  # where the results are is not how they were measured
    mine = {k: v for k, v in _settings_dict(settings).items() if k not in ignored}
    theirs = {k: v for k, v in earlier["settings"].items() if k not in ignored}
    for world in (mine.get("world"), theirs.get("world")):
        if isinstance(world, dict):
            world.pop("output_dir", None)
    if mine != theirs:
        changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        raise ConfigError(f"{path} was written under other settings ({', '.join(changed)} differ): resume in "
                          "another --output-dir, or rerun without --resume")
    costs = earlier["costs"]
    if REWARD_MODEL in costs and not (Path(settings.world.output_dir) / "runs/reward_model/final").is_dir():
        costs = {k: v for k, v in costs.items() if k != REWARD_MODEL}
    return earlier["points"], costs


def _write_results(settings: FrontierSettings, points: list[Point], costs: dict[str, dict], sft_reward: float,
                   judge: str, seconds: float) -> None:
    """points.json, frontier.png and frontier.md under ``output_dir``, for every run so far."""
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "points.json").write_text(json.dumps({"settings": _settings_dict(settings), "judge": judge,
                                                  "points": points, "costs": costs, "sft_reward": sft_reward,
                                                  "seconds": round(seconds, 1)}, indent=2))
    plot_frontier(points, out / "frontier.png", title="Reward–KL frontier on the demo world (gold VADER reward)",
                  max_kl=2 * max(KL_BUDGETS))
    (out / "frontier.md").write_text(frontier_table(points, judge, costs) + "\n\n" + cost_table(costs) + "\n")


def _cost(summary: dict, generated: dict, seconds: float, cpu_seconds: float, memory: PeakMemory) -> dict:
    """A run's cost: wall time, the process's CPU time (all its threads; unlike wall time, not inflated by other
    processes on the machine), peak RSS, generation, and the models it held with their weights, gradients and
    optimizer state (summary.json's memory report)."""
    held = summary.get("memory", {})
    return {"wall_s": round(seconds, 1), "cpu_s": round(cpu_seconds, 1), "peak_rss_gib": round(memory.peak_gib, 3),
            "generated_tokens": generated.get("generated_tokens", 0),
            "generation_s": generated.get("generation_s", 0.0),
            "models_held": held.get("models_held"), "model_state_bytes": held.get("total", {}).get("all")}


def train_reward_model(world: World, settings: FrontierSettings) -> tuple[Path, dict]:
    """The Bradley–Terry reward model PPO optimises: :func:`reward_model_on_world` at the frontier's sizes."""
    return reward_model_on_world(world, settings.world, settings.steps, settings.batch_size, settings.learning_rate)


def reward_model_on_world(world: World, world_settings: DemoSettings, steps: int, batch_size: int,
                          learning_rate: float) -> tuple[Path, dict]:
    """The Bradley–Terry reward model PPO optimises: the SFT model with a score head, trained by the run driver on
    the world's pairs (5% held out for its accuracy); returns its ``final/`` folder and summary.json."""
    final = train_stage(world_settings, "runs/reward_model", method="reward", eval_split_size=0.05,
                        max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
                        tokenizer=world.tokenizer, train_dataset=world.pairs,
                        model=AutoModelForCausalLM.from_pretrained(world.sft_dir))
    return final, json.loads((final.parent / "summary.json").read_text())


def _train_run(world: World, settings: FrontierSettings, label: str, checkpoint, learned: Path | None = None) -> dict:
    """One run of :data:`RUNS` through the run driver at the frontier's steps, batch and learning rate."""
    defaults = dict(max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
                    learning_rate=settings.learning_rate)
    return train_on_world(world, settings.world, defaults | RUNS[label], label, checkpoint, learned)


def rounds_steps(config: dict) -> tuple[int, int]:
    """``(max_steps of one run of the driver, optimizer steps in all)`` for ``config`` (with ``max_steps``): a
    method trained in rounds splits the steps every other run takes over its rounds (their steps count over the
    whole run of rounds)."""
    method = get_method(config["method"])
    if method.rounds is None:
        return config["max_steps"], config["max_steps"]
    per_round = max(1, config["max_steps"] // (config.get("num_rounds") or method.rounds.num_rounds))
    return per_round, per_round * (config.get("num_rounds") or method.rounds.num_rounds)


def train_on_world(world: World, world_settings: DemoSettings, config: dict, name: str, checkpoint,
                   learned: Path | None = None) -> dict:
    """One run of the run driver from the world's SFT model; returns its summary.json. Offline methods train on the
    world's pairs; online and rounds methods sample their own completions of its training prompts and ask the gold
    judge. ``config`` is the run's config (``max_steps`` the optimizer steps of the whole run, split over the rounds
    of a method trained in rounds); a ``judge`` of :data:`LEARNED_REWARD` is the reward model in ``learned``."""
    config = dict(config)
    if config.get("judge") == LEARNED_REWARD:
        config["judge"] = RewardModelJudge.from_pretrained(str(learned))
    method = get_method(config["method"])
    samples = method.online or method.rounds is not None  # these sample their own completions of the prompts
    data = [{"prompt": p} for p in world.train_prompts] if samples else world.pairs
    if samples:
        config = dict(judge=GoldSentimentJudge(), max_completion_length=world_settings.max_new_tokens) | config
    config["max_steps"] = rounds_steps(config)[0]
    slug = name.replace(" ", "_").replace("=", "")
    for letter, word in (("β", "beta"), ("α", "alpha"), ("γ", "gamma"), ("η", "eta"), ("ε", "eps")):
        slug = slug.replace(letter, word)
    slug = "".join(c if c.isalnum() or c in "_.-" else "_" for c in slug)
    # Each run pays for its own tokenization and reference log-probs: a cache shared between runs would charge them
    # to whichever run came first. The cache is the run's own, removed after it (and before: an interrupted run's
    # leftovers would be a cache hit).
    cache = Path(world_settings.output_dir) / "caches" / slug
    shutil.rmtree(cache, ignore_errors=True)
    final = train_stage(world_settings, f"runs/{slug}", callbacks=[checkpoint], **({"cache_dir": str(cache)} | config),
                        model=AutoModelForCausalLM.from_pretrained(world.sft_dir), tokenizer=world.tokenizer,
                        train_dataset=data)
    shutil.rmtree(cache, ignore_errors=True)
    return json.loads((final.parent / "summary.json").read_text())  # a run of rounds: its run folder's summary


class PeakMemory:
    """The process's peak resident memory while the block runs, above what it held when the block began
    (sampled every 20 ms by a thread; a CPU measure — on a GPU, read torch.cuda.max_memory_allocated)."""

    def __enter__(self) -> PeakMemory:
        import psutil

        self._process = psutil.Process()
        self._start = self._peak = self._process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)

    @property
    def peak_gib(self) -> float:
        return (self._peak - self._start) / 2**30


def cost_table(costs: dict[str, dict]) -> str:
    """Markdown: what each run cost — wall and CPU time without evaluations, peak memory above the start, generation,
    and the models held with the bytes of their weights, gradients and optimizer state."""
    lines = ["| method | wall time (s) | CPU time (s) | of which generating (s) | peak RSS above start (GiB) | "
             "generated tokens | models held | weights + gradients + optimizer state (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, cost in costs.items():
        state = cost.get("model_state_bytes")
        lines.append(f"| {label} | {cost['wall_s']:.1f} | {cost.get('cpu_s', math.nan):.1f} | "
                     f"{cost['generation_s']:.1f} | {cost['peak_rss_gib']:.3f} | "
                     f"{cost['generated_tokens']:,} | {cost.get('models_held') or '–'} | "
                     f"{'–' if state is None else f'{state / 2**20:.1f}'} |")
    return "\n".join(lines)


KL_BUDGETS = (1.0, 2.0, 3.0, 5.0, 8.0, 12.0)


def frontier_table(points: list[Point], judge: str = GoldSentimentJudge.name, costs: dict[str, dict] | None = None
                   ) -> str:
    """Markdown: for each method, the best mean reward by ``judge`` reached within each KL budget (nats); the
    first line names the judge. Methods are grouped by family when the points name one; with ``costs`` each row
    also gives the run's wall time (evaluations excluded) and peak memory above the start."""
    methods = list(dict.fromkeys(p["method"] for p in points))
    families = list(dict.fromkeys(p.get("family") for p in points))
    methods.sort(key=lambda m: families.index(next(p.get("family") for p in points if p["method"] == m)))
    head = "| method | " + " | ".join(f"KL ≤ {b:g}" for b in KL_BUDGETS) + " | max KL reached |"
    rule = "|---|" + "---:|" * (len(KL_BUDGETS) + 1)
    if costs is not None:
        head, rule = head + " wall time (s) | peak RSS (GiB) |", rule + "---:|---:|"
    lines = [f"Mean reward by judge `{judge}` (best within each KL(π‖π_ref) budget, nats):", "", head, rule]
    for method in methods:
        mine = [p for p in points if p["method"] == method]
        cells = []
        for budget in KL_BUDGETS:
            within = [p["reward"] for p in mine if p["kl"] <= budget]
            cells.append(f"{max(within):.3f}" if within else "–")
        row = f"| {method} | " + " | ".join(cells) + f" | {max(p['kl'] for p in mine):.2f} |"
        if costs is not None:
            cost = costs.get(method, {})
            row += f" {cost.get('wall_s', math.nan):.0f} | {cost.get('peak_rss_gib', math.nan):.2f} |"
        lines.append(row)
    return "\n".join(lines)


def _settings_dict(settings: FrontierSettings) -> dict:
    return asdict(settings)
