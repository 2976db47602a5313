"""The config keys that belong to methods: each family's fields, defaults, ranges and checks, in one place.

A method's registry entry names the sections it reads besides its loss's hyper-parameters (``Method.reads``, keys of
:data:`SECTIONS`); :class:`preftune.config.TrainConfig` is the run's common sections plus these, one flat set of keys
(TRL's names). A loss hyper-parameter left at None takes the method's registry default (``Method.defaults``). Checks
are methods of the sections called on the whole config (a ``TrainConfig``): a method's keys are checked together with
the run's keys they depend on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from preftune.errors import AT_LEAST_1, NON_NEGATIVE, POSITIVE, ConfigError, Range, config_error, shown
from preftune.methods.registry import METHODS, get_method, run_data


@dataclass
class LossKeys:
    """The method(s) of the run and their loss hyper-parameters; None takes the method's registry default."""

    method: str | list[str] = "dpo"
    loss_weights: list[float] | None = None
    beta: float | None = None
    label_smoothing: float | None = None
    simpo_gamma: float | None = None
    cpo_alpha: float | None = None
    rpo_alpha: float | None = None
    dpop_lambda: float | None = None
    slic_lambda: float | None = None
    center_rewards_coefficient: float | None = None  # reward modelling
    unlikelihood_alpha: float | None = None
    desirable_weight: float | None = None
    undesirable_weight: float | None = None
    ld_alpha: float | None = None  # LD-DPO: weight of tokens past the shorter completion
    use_weighting: bool = False  # WPO
    epsilon: float | None = None  # GRPO/RLOO: clip range of the policy ratio
    epsilon_high: float | None = None  # GRPO: upper clip range (DAPO's clip-higher); 0 or unset: epsilon
    scale_rewards: Literal["group", "batch", "none"] | None = None  # GRPO: advantage scaling (none: Dr. GRPO)
    grpo_loss_type: Literal["grpo", "dr_grpo", "dapo"] | None = None  # GRPO: how token losses are averaged
    # GRPO: weigh the k3 KL by the policy ratio (DeepSeek-V3.2, arXiv 2512.02556): the unbiased reverse-KL
    # gradient, TRL's default; None: the registry's (true)
    use_bias_correction_kl: bool | None = None

    RANGES: ClassVar[dict[str, Range]] = {
        "beta": Range(POSITIVE, hint="; β is the KL temperature (IPO's target margin is 1/(2β)): typical values are "
                      "0.05–0.5, or leave beta unset for the method's default"),
        "label_smoothing": Range(NON_NEGATIVE, (0.5, False), "; ε is the assumed rate of flipped labels (robust DPO "
                                 "divides by 1 − 2ε, and at ε = 0.5 the labels carry no preference)"),
        **{key: Range(NON_NEGATIVE) for key in (
            "simpo_gamma", "cpo_alpha", "rpo_alpha", "dpop_lambda", "slic_lambda", "center_rewards_coefficient",
            "unlikelihood_alpha", "desirable_weight", "undesirable_weight")},
        "ld_alpha": Range(NON_NEGATIVE, (1, True)),
        "epsilon": Range(POSITIVE, (1, False), "; the clip range of the policy ratio (0.2 is usual)"),
        "epsilon_high": Range(NON_NEGATIVE, hint="; 0 or unset: the same as epsilon"),
    }

    @property
    def methods(self) -> list[str]:
        return [self.method] if isinstance(self.method, str) else list(self.method)

    def loss_hparams(self) -> dict[str, float]:
        """Hyper-parameters given by the user (method defaults fill the rest in the registry)."""
        names = {n for m in self.methods for n in get_method(m).hparams}
        return {n: getattr(self, n) for n in sorted(names) if getattr(self, n) is not None}

    def check_methods(self) -> None:
        """The methods exist, train on one kind of data and one kind of model."""
        if not self.methods:
            raise config_error("method", "method is an empty list; name at least one method (`preftune methods`)")
        for name in self.methods:
            try:
                get_method(name)
            except ConfigError as err:
                message = str(err) if len(str(err)) < 1000 else f"unknown method {shown(name)} (`preftune methods`)"
                raise config_error("method", message) from None
        try:
            run_data(self.methods)
        except ConfigError as err:
            raise config_error("method", str(err)) from None
        if len({get_method(m).model for m in self.methods}) > 1:
            raise config_error("method", f"methods {self.methods} train different models (a reward head and a "
                               "causal LM)")

    def check_loss_weights(self) -> None:
        """One finite, non-negative weight per method, not all zero."""
        weights = self.loss_weights
        if weights is None:
            return
        if len(weights) != len(self.methods):
            raise config_error(("loss_weights", "method"), f"loss_weights has {len(weights)} entries but method "
                               f"lists {len(self.methods)} ({self.methods}); give one weight per method")
        if any(not Range(NON_NEGATIVE).holds(w) for w in weights):
            raise config_error("loss_weights", f"loss_weights must be finite and >= 0, got {weights}; a negative "
                               "weight would maximise its loss term")
        if not any(weights):
            raise config_error("loss_weights", f"loss_weights are all zero ({weights}): nothing would be trained")

    def check_unused_hparams(self) -> None:
        """A method's own hyper-parameter given while no method of the run takes it would be ignored: refused (β is
        left out: every config may carry it)."""
        used = {n for m in self.methods for n in get_method(m).hparams}
        for key in sorted({n for m in METHODS.values() for n in m.hparams} - used - {"beta"}):
            if getattr(self, key, None) is None:
                continue
            takers = sorted(m.name for m in METHODS.values() if key in m.hparams)
            hint = (" (TRL's legacy rpo_alpha: method: rpo is DPO + rpo_alpha·NLL of the chosen, or method: [dpo, "
                    "sft] with loss_weights: [1, α])") if key == "rpo_alpha" else ""
            raise config_error(key, f"{key} is a hyper-parameter of {', '.join(takers)}, not of {self.methods}: it "
                               f"would be ignored; choose one of those methods or remove {key}{hint}")


@dataclass
class SamplingKeys:
    """Sampling from the policy and judging the samples: online methods, PPO and the methods trained in rounds.

    Online DPO (``method: online_dpo``, or any paired method with ``online: true``), RLOO and GRPO read prompts
    (a prompt-only dataset, or the prompts of a preference dataset) and need a judge."""

    online: bool = False  # paired methods: train on pairs sampled from the current policy (Online DPO)
    # a reward-model folder (reward_model_path is another name), 'module:function' / 'file.py:function', or 'gold'
    judge: str | None = None
    num_generations: int | None = None  # completions per prompt (None: the method's default; Online DPO: 2)
    temperature: float = 1.0  # sampling temperature of online generation
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    missing_eos_penalty: float | None = None  # subtracted from the score of a completion that never ended
    # The precision samples are drawn in: bfloat16 autocast (as vLLM samples from bf16 weights: ≈2.4× faster small
    # matmuls where bf16 is native), float32 (autocast off), or None: the run's precision. Training's log-probs stay
    # in the run's precision.
    generation_dtype: Literal["float32", "bfloat16"] | None = None

    RANGES: ClassVar[dict[str, Range]] = {
        "num_generations": Range((2, True), hint="; the methods compare completions of one prompt"),
        "temperature": Range(POSITIVE, hint="; online methods sample (greedy decoding would give equal completions)"),
        "top_p": Range(POSITIVE, (1, True)),
        "top_k": Range(NON_NEGATIVE, hint="; 0 turns it off"),
        "missing_eos_penalty": Range(NON_NEGATIVE),
    }

    @property
    def is_online(self) -> bool:
        """Whether training samples its data from the current policy (Online DPO, RLOO, GRPO, PPO)."""
        return self.online or any(get_method(m).online for m in self.methods)

    def check_sampling(self) -> None:
        if self.online and run_data(self.methods) != "paired":
            raise config_error(("online", "method"), f"online=true samples pairs for paired methods; {self.methods} "
                               "are not paired (RLOO and GRPO are online by themselves)")
        if not self.is_online:
            return
        if self.precompute_ref_log_probs:
            raise config_error("precompute_ref_log_probs", "online methods score completions sampled during "
                               "training; their reference log-probs cannot be computed beforehand")
        if run_data(self.methods) == "paired" and self.num_generations not in (None, 2):
            raise config_error("num_generations", "Online DPO compares two completions of each prompt: "
                               "num_generations must be 2 (or unset)")


@dataclass
class GenerationBatchKeys:
    """One generation batch (TRL's names): ``steps_per_generation`` micro-batches of prompts per process are sampled
    and judged at once, then trained on in ``num_iterations`` passes of ``gradient_accumulation_steps`` micro-batches
    per optimizer step (PPO: its own ``num_ppo_epochs`` and ``num_mini_batches``)."""

    num_iterations: int = 1  # μ of GRPO (arXiv 2402.03300, Alg. 1): passes over each generation batch
    # micro-batches of prompts per process in one generation batch; None: gradient_accumulation_steps
    steps_per_generation: int | None = None
    generation_batch_size: int | None = None  # or: prompts per generation batch over all processes
    # DAPO's dynamic sampling (arXiv 2503.14476, §3.2): groups whose completions all scored the same are dropped and
    # more prompts sampled until the generation batch is full, at most max_num_gen_batches generation batches
    # (0: no cap); short after that, the batch is filled with dropped groups (counted in the log).
    dynamic_sampling: bool = False
    max_num_gen_batches: int = 4

    RANGES: ClassVar[dict[str, Range]] = {
        "num_iterations": Range(AT_LEAST_1),
        "generation_batch_size": Range(AT_LEAST_1),
        "max_num_gen_batches": Range(NON_NEGATIVE, hint=" (0: no cap)"),
    }

    @staticmethod
    def unread(cfg: Any, changed: list[str]) -> str | None:
        if cfg.is_online:  # PPO
            return (f"{', '.join(changed)}: for the generation batches of GRPO, GSPO, RLOO and Online DPO; PPO passes "
                    "over each rollout num_ppo_epochs times in num_mini_batches optimizer steps: set those")
        return (f"{', '.join(changed)}: for online methods (a generation batch of samples); {cfg.methods} train on a "
                "fixed dataset")

    def check_generation_batch(self) -> None:
        if self.steps_per_generation is not None and self.generation_batch_size is not None:
            raise config_error(("steps_per_generation", "generation_batch_size"), "give steps_per_generation or "
                               "generation_batch_size, not both (one is the other divided by the prompts of a step)")
        steps = self.steps_per_generation
        if steps is not None and (steps < 1 or steps % self.gradient_accumulation_steps):
            raise config_error(("steps_per_generation", "gradient_accumulation_steps"), f"steps_per_generation "
                               f"({steps}) must be a positive multiple of gradient_accumulation_steps "
                               f"({self.gradient_accumulation_steps}): each optimizer step takes that many "
                               "micro-batches")
        if self.dynamic_sampling and run_data(self.methods) != "groups":
            raise config_error(("dynamic_sampling", "method"), "dynamic_sampling drops groups of completions whose "
                               f"rewards are all equal: for GRPO, GSPO and RLOO, not {self.methods}")


@dataclass
class PPOKeys:
    """PPO (``method: ppo``, an algorithm of its own; None: the registry's default, see ``preftune methods``).

    One update: per_device_train_batch_size × gradient_accumulation_steps × num_mini_batches prompts per process,
    one completion each, then num_ppo_epochs passes over them in num_mini_batches optimizer steps."""

    num_ppo_epochs: int | None = None  # passes over each rollout (TRL's name; ppo_epochs is accepted too)
    num_mini_batches: int | None = None  # optimizer steps per pass
    cliprange: float | None = None  # clip range ε of the policy ratio
    cliprange_value: float | None = None  # clip range of the value around its value at rollout time
    vf_coef: float | None = None  # weight of the value loss
    gamma: float | None = None  # discount γ
    lam: float | None = None  # GAE λ
    kl_coef: float | None = None  # c in the per-token reward −c·KL_t (the adaptive controller's starting value)
    target_kl: float | None = None  # adapt kl_coef toward this KL(π‖π_ref) per sequence, nats; None: kl_coef fixed
    kl_horizon: int | None = None  # the adaptive controller's horizon, in samples
    kl_estimator: Literal["k1", "k2", "k3"] | None = None  # per-token KL estimator of the reward (and of objective/kl)
    whiten_rewards: bool | None = None  # scale the per-token rewards to unit variance (mean kept) before GAE
    entropy_coef: float | None = None  # entropy bonus (exact per-token entropy over the vocabulary); 0: off
    use_score_scaling: bool | None = None  # divide scores by their running standard deviation
    use_score_norm: bool | None = None  # with use_score_scaling: also subtract their running mean
    score_clip: float | None = None  # clip (scaled) scores to [−score_clip, score_clip]
    # The critic: None → a copy of the reward model when the judge is one on the policy's tokenizer, else a copy of
    # the policy's body with a new score head ('policy'); 'shared' → a value head on the policy's own trunk; or the
    # folder of a sequence-classification (or causal LM) checkpoint. value_model_path is accepted too.
    value_model: str | None = None

    RANGES: ClassVar[dict[str, Range]] = {
        **{key: Range(AT_LEAST_1) for key in ("num_ppo_epochs", "num_mini_batches")},
        "kl_horizon": Range(AT_LEAST_1, hint="; in samples: the coefficient moves by at most ±20%·samples/horizon per "
                            "update"),
        "cliprange": Range(POSITIVE, (1, False), "; the clip range of the policy ratio (0.2 is usual)"),
        "cliprange_value": Range(POSITIVE, hint="; the clip range of the value (0.2 in TRL, 0.5 in OpenRLHF)"),
        "gamma": Range(NON_NEGATIVE, (1, True)),
        "lam": Range(NON_NEGATIVE, (1, True)),
        "target_kl": Range(POSITIVE, hint="; nats of KL(π‖π_ref) per completion, or null for a fixed kl_coef"),
        "score_clip": Range(POSITIVE, hint="; or null to leave scores unclipped"),
        **{key: Range(NON_NEGATIVE) for key in ("vf_coef", "kl_coef", "entropy_coef")},
    }

    def check_ppo(self) -> None:
        if self.num_generations is not None:
            raise config_error("num_generations", "PPO samples one completion per prompt and learns a value for it: "
                               "leave num_generations unset (RLOO and GRPO compare several completions of a prompt)")
        if self.use_score_norm and not self.use_score_scaling:
            raise config_error(("use_score_norm", "use_score_scaling"), "use_score_norm subtracts the running mean "
                               "of the scores as part of use_score_scaling: set use_score_scaling=true too")
        if self.sync_ref_model:
            raise config_error(("sync_ref_model", "method"), "PPO's KL penalty is to a fixed reference; "
                               "sync_ref_model (TR-DPO) is for the offline methods")


@dataclass
class RoundsKeys:
    """Rounds: RSO, SPPO, iterative DPO (``method: rso | rso_hinge | sppo | iterative_dpo``).

    Each round samples num_generations completions of every prompt (from the current iterate; RSO: from the model the
    run started with), judges them, writes the round's pairs and trains one run of the driver on them (max_steps /
    num_train_epochs are per round). Needs a judge, like the online methods."""

    num_rounds: int | None = None  # None: the method's default (RSO 1, SPPO 3, iterative DPO 3)
    prompts_per_round: int | None = None  # None: every prompt in every round; n: round k takes the k-th n prompts
    accumulate_pairs: bool = False  # train each round on the pairs of every round so far (warm-started)
    refresh_reference: bool = False  # RSO / iterative DPO: the reference is the previous iterate, not the start
    rso_beta: float = 0.5  # RSO: β of the sampled distribution π_sft·exp(r/β) (0: the top rso_samples by score)
    rso_samples: int = 8  # RSO: completions accepted per prompt out of num_generations candidates
    rso_pairing: Literal["first_round", "tournament"] = "first_round"  # RSO: n/2 disjoint pairs, or n − 1 matches

    RANGES: ClassVar[dict[str, Range]] = {
        "num_rounds": Range(AT_LEAST_1, hint="; or null for the method's default"),
        "prompts_per_round": Range(AT_LEAST_1, hint="; or null for every prompt in every round"),
        "rso_beta": Range(NON_NEGATIVE, hint="; RSO's sampling temperature (0: the best candidates; 0.5 in the paper)"),
    }

    @property
    def rounds(self):
        """The run's :class:`~preftune.methods.registry.Rounds` (RSO, SPPO, iterative DPO), or None."""
        return get_method(self.methods[0]).rounds

    @property
    def resolved_num_rounds(self) -> int:
        return self.num_rounds or self.rounds.num_rounds

    @property
    def num_generations_for_rounds(self) -> int:
        """Completions sampled per prompt in each round: ``num_generations``, else the method's default."""
        return self.num_generations or get_method(self.methods[0]).num_generations or 2

    @staticmethod
    def unread(cfg: Any, changed: list[str]) -> str | None:
        return (f"{', '.join(changed)}: only for methods trained in rounds ({_rounds_methods()}); {cfg.methods} train "
                "in one run")

    def check_rounds(self) -> None:
        if self.load_in_4bit or self.load_in_8bit:
            # Each round hands the next one its model merged into full weights, which a quantized base cannot give.
            key = "load_in_4bit" if self.load_in_4bit else "load_in_8bit"
            raise config_error((key, "method"), f"{key}: {self.methods[0]} trains in rounds, each starting from the "
                               "previous round's merged model; a quantized base cannot be merged: train in bf16 "
                               "(use_peft=true is fine)")
        if self.online:
            raise config_error(("online", "method"), f"{self.methods[0]} samples its pairs in rounds; online=true "
                               "samples every batch instead: set one of them")
        if self.resume_from_checkpoint not in (None, True, False):
            raise config_error("resume_from_checkpoint", f"{self.methods[0]} resumes a whole run of rounds: set "
                               "resume_from_checkpoint=true (finished rounds are kept, an interrupted round resumes "
                               "from its latest checkpoint)")
        self._check_rso()
        if self.rounds.reference == "previous" and self.refresh_reference:
            raise config_error("refresh_reference", f"{self.methods[0]}'s reference is always the previous iterate; "
                               "leave refresh_reference unset")
        if self.rounds.reference == "previous" and self.ref_model_name_or_path:
            raise config_error("ref_model_name_or_path", f"{self.methods[0]}'s reference is the previous iterate; "
                               "leave ref_model_name_or_path unset")

    def _check_rso(self) -> None:
        if self.rounds.selection != "rso":
            rso = [k for k in _changed(self, RoundsKeys) if k.startswith("rso_")]
            if rso:
                raise config_error(rso[0], f"{', '.join(rso)}: RSO's keys; {self.methods[0]} pairs the best against "
                                   "the worst completion")
        elif not 2 <= self.rso_samples <= self.num_generations_for_rounds:
            raise config_error(("rso_samples", "num_generations"), f"rso_samples ({self.rso_samples}) must be >= 2 "
                               f"and at most the {self.num_generations_for_rounds} candidates sampled per prompt "
                               "(num_generations)")


# What a registry entry's ``reads`` names: the sections of keys a method reads besides its loss hyper-parameters, each
# with the check run when the run's methods read it. A section with an ``unread`` message refuses its keys in a run
# that does not read them; the others are harmless there (a sampling key in an offline run), or refused by name
# (PPO's keys are its hyper-parameters: LossKeys.check_unused_hparams).
SECTIONS: dict[str, tuple[type, str]] = {
    "sampling": (SamplingKeys, "check_sampling"),
    "generation_batch": (GenerationBatchKeys, "check_generation_batch"),
    "ppo": (PPOKeys, "check_ppo"),
    "rounds": (RoundsKeys, "check_rounds"),
}
# A paired method with online=true reads what Online DPO reads.
_ONLINE_PAIRS = "online_dpo"


def sections_read(cfg: Any) -> list[str]:
    """The sections of :data:`SECTIONS` the run's methods read, in :data:`SECTIONS`' order."""
    names = [*cfg.methods, *([_ONLINE_PAIRS] if cfg.online else [])]
    read = {section for name in names for section in get_method(name).reads}
    return [section for section in SECTIONS if section in read]


def check_method_keys(cfg: Any) -> None:
    """The method sections of a valid config (ranges checked before): a method trained in rounds trains alone; each
    section's checks where the run reads it; its keys refused where the run does not and the section says why."""
    rounds = [m for m in cfg.methods if get_method(m).rounds]
    if rounds and len(cfg.methods) > 1:
        others = [m for m in cfg.methods if m not in rounds] or cfg.methods[1:]
        raise config_error("method", f"methods trained in rounds ({_rounds_methods()}) train alone, not with "
                           f"{others}")
    read = sections_read(cfg)
    for name, (section, check) in SECTIONS.items():
        if name in read:
            getattr(section, check)(cfg)
        elif hasattr(section, "unread") and (changed := _changed(cfg, section)):
            raise config_error(changed[0], section.unread(cfg, changed))


def method_ranges(cfg: Any) -> dict[str, Range]:
    """The range of every numeric key of the method sections (loss hyper-parameters included) for ``cfg``'s methods:
    where every method weighs the KL to the reference by β (GRPO, RLOO), β = 0 is allowed (no reference is loaded)."""
    ranges = {key: limits for section in (LossKeys, *(s for s, _ in SECTIONS.values()))
              for key, limits in section.RANGES.items()}
    if all(get_method(m).reference_weight == "beta" for m in cfg.methods):
        ranges["beta"] = Range(NON_NEGATIVE, hint="; β weighs the KL to the reference (0: no reference is loaded)")
    return ranges


def _changed(cfg: Any, section: type) -> list[str]:
    return [f.name for f in dataclasses.fields(section) if getattr(cfg, f.name) != f.default]


def _rounds_methods() -> str:
    return ", ".join(name for name, m in METHODS.items() if m.rounds is not None)
