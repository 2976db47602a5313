"""The registry of methods: a method is data — its loss, its defaults and what it needs.

The training loop asks this registry; it never branches on a method's name. The built-in entries name
their loss functions (``"dpo"`` → :func:`preftune.methods.losses.dpo`), which are imported on first use:
listing the methods or validating a config does not import torch.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from preftune.errors import ConfigError

if TYPE_CHECKING:
    from preftune.methods import losses


class LossByName:
    """A loss function of :mod:`preftune.methods.losses`, named, imported when first called or inspected."""

    def __init__(self, name: str):
        self.name = name

    @functools.cached_property
    def function(self) -> Callable[..., losses.LossOutput]:
        from preftune.methods import losses  # on first use: listing methods or checking a config needs no torch

        return getattr(losses, self.name)

    def __call__(self, *args: Any, **kwargs: Any) -> losses.LossOutput:
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"preftune.methods.losses.{self.name}"


@dataclass(frozen=True)
class Rounds:
    """How a method trained in rounds makes each round's data (``preftune.training.rounds``): sample
    ``num_generations`` completions per prompt, judge them, pair them, train one run of the loop on the pairs.

    ``sampler``: ``"initial"`` — every round samples the model the run started from (RSO's SFT proposal);
    ``"policy"`` — the current iterate (SPPO, iterative DPO). ``selection``: ``"rso"`` — statistical rejection
    sampling down to ``rso_samples`` candidates, paired first-round or by tournament (RSO, arXiv 2309.06657);
    ``"best_vs_worst"`` — the highest- against the lowest-scored completion. ``reference``: ``"initial"`` — the
    model the run started from, fixed (``refresh_reference`` makes it the previous iterate); ``"previous"`` —
    always the previous iterate (SPPO's π_t). ``num_rounds``: the default number of rounds.
    """

    sampler: Literal["initial", "policy"]
    selection: Literal["rso", "best_vs_worst"]
    reference: Literal["initial", "previous"]
    num_rounds: int


@dataclass(frozen=True)
class Method:
    """A preference method as data.

    ``data``: the examples the loss takes (``paired`` → :class:`~losses.PairLogps`, ``unpaired`` →
    :class:`~losses.UnpairedLogps`; ``sft``: SFT rows on their own, or the chosen side of pairs).
    ``needs_reference``: the loop must compute reference log-probs
    (without them a reference-based loss silently uses a uniform reference). ``uses_average_logps``:
    the loss compares length-normalised log-probs (it divides by the token counts itself — always
    pass summed log-probs). ``uses_chosen_nll``: the loss contains an NLL term on the chosen completion.
    ``defaults`` holds a value for every hyper-parameter the loss takes. ``data="groups"``: completions of one
    prompt sampled together (:class:`~losses.GroupLogps`, RLOO and GRPO), always ``online``.
    ``algorithm``: the driver's algorithm that trains it (``"ppo"`` → ``preftune.training.ppo.PPO``), from
    prompts into an experience record (``data="experience"``); it has no loss of log-probs (``loss=None``) and its
    hyper-parameters are the keys of ``defaults``.
    ``extras``: per-example columns the loss reads besides log-probs (``PairLogps.extras``); every training row
    must carry them, the data layer keeps them through tokenization and the collator batches them.
    ``rounds``: the method trains in rounds of sample → judge → pairs → one run of the loop (:class:`Rounds`).
    """

    name: str
    # a function, the name of one in preftune.methods.losses, or None for a method that is its algorithm's (PPO)
    loss: Callable[..., losses.LossOutput] | str | None
    data: Literal["paired", "unpaired", "sft", "groups", "experience"] = "paired"
    needs_reference: bool = True
    # Online: the data is sampled from the current policy and judged during training (prompts in, no pairs).
    online: bool = False
    num_generations: int | None = None  # completions per prompt an online method samples by default
    # The hyper-parameter that weighs the reference term; at 0 no reference is loaded (GRPO's β).
    reference_weight: str | None = None
    uses_average_logps: bool = False
    uses_chosen_nll: bool = False
    model: Literal["causal_lm", "reward"] = "causal_lm"  # reward: a sequence-classification head scores y
    extras: tuple[str, ...] = ()
    rounds: Rounds | None = None
    defaults: Mapping[str, float | str | bool | None] = field(default_factory=dict)
    summary: str = ""
    papers: tuple[str, ...] = ()  # arXiv ids of the papers that define it (each in PAPERS)
    # The algorithm the run driver runs it with (preftune.training.loop.ALGORITHMS): None: "online" for online
    # methods, else "offline"; "ppo": rollouts with a critic.
    algorithm: Literal["offline", "online", "ppo"] | None = None
    # The config sections it reads besides its loss's hyper-parameters (keys of preftune.methods.params.SECTIONS):
    # their checks run for it, and keys of a section no method of a run reads are refused.
    reads: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.loss, str):
            object.__setattr__(self, "loss", LossByName(self.loss))

    @property
    def hparams(self) -> tuple[str, ...]:
        """Names of the hyper-parameters the loss takes (its keyword arguments after the log-probs); for a method with
        its algorithm's, the keys of its defaults."""
        if self.loss is None:
            return tuple(self.defaults)
        function = self.loss.function if isinstance(self.loss, LossByName) else self.loss
        return tuple(list(inspect.signature(function).parameters)[1:])


@dataclass(frozen=True)
class Paper:
    """A paper on arXiv, enough to cite it: model cards list the papers of a run's methods and options."""

    arxiv: str
    title: str
    first_author: str  # "Surname, Given"

    @property
    def year(self) -> int:
        """The year of the arXiv submission, from the id (``YYMM.NNNNN``)."""
        return 2000 + int(self.arxiv[:2])

    def bibtex(self) -> str:
        surname = self.first_author.split(",")[0]
        word = next(w for w in self.title.split() if w[0].isalpha()).lower()
        key = "".join(c for c in f"{surname}{self.year}{word}".lower() if c.isalnum())
        return (f"@misc{{{key},\n  title = {{{self.title}}},\n  author = {{{self.first_author} and others}},\n"
                f"  year = {{{self.year}}},\n  eprint = {{{self.arxiv}}},\n  archivePrefix = {{arXiv}},\n}}")


# One home for citations: every paper a method or a training option stands on, by arXiv id.
PAPERS: dict[str, Paper] = {p.arxiv: p for p in (
    Paper("2305.18290", "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
          "Rafailov, Rafael"),
    Paper("2403.00409", "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
          "Chowdhury, Sayak Ray"),
    Paper("2310.12036", "A General Theoretical Paradigm to Understand Learning from Human Preferences",
          "Azar, Mohammad Gheshlaghi"),
    Paper("2309.06657", "Statistical Rejection Sampling Improves Preference Optimization", "Liu, Tianqi"),
    Paper("2305.10425", "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", "Zhao, Yao"),
    Paper("2402.13228", "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive", "Pal, Arka"),
    Paper("2404.19733", "Iterative Reasoning Preference Optimization", "Pang, Richard Yuanzhe"),
    Paper("2402.05369", "Noise Contrastive Alignment of Language Models with Explicit Rewards", "Chen, Huayu"),
    Paper("2404.04656", "Binary Classifier Optimization for Large Language Model Alignment", "Jung, Seungjae"),
    Paper("2405.00675", "Self-Play Preference Optimization for Language Model Alignment", "Wu, Yue"),
    Paper("2405.07863", "RLHF Workflow: From Reward Modeling to Online RLHF", "Dong, Hanze"),
    Paper("2408.06266", "Anchored Preference Optimization and Contrastive Revisions: Addressing Underspecification "
          "in Alignment", "D'Oosterlinck, Karel"),
    Paper("2405.14734", "SimPO: Simple Preference Optimization with a Reference-Free Reward", "Meng, Yu"),
    Paper("2403.07691", "ORPO: Monolithic Preference Optimization without Reference Model", "Hong, Jiwoo"),
    Paper("2401.08417", "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine "
          "Translation", "Xu, Haoran"),
    Paper("1908.04319", "Neural Text Generation with Unlikelihood Training", "Welleck, Sean"),
    Paper("2203.02155", "Training language models to follow instructions with human feedback", "Ouyang, Long"),
    Paper("2402.01306", "KTO: Model Alignment as Prospect Theoretic Optimization", "Ethayarajh, Kawin"),
    Paper("2402.04792", "Direct Language Model Alignment from Online AI Feedback", "Guo, Shangmin"),
    Paper("2402.14740", "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in "
          "LLMs", "Ahmadian, Arash"),
    Paper("2402.03300", "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
          "Shao, Zhihong"),
    Paper("2507.18071", "Group Sequence Policy Optimization", "Zheng, Chujie"),
    # PPO for RLHF: the algorithm, its advantage estimator, the KL-penalised reward, the implementation details.
    Paper("1909.08593", "Fine-Tuning Language Models from Human Preferences", "Ziegler, Daniel M."),
    Paper("1707.06347", "Proximal Policy Optimization Algorithms", "Schulman, John"),
    Paper("1506.02438", "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
          "Schulman, John"),
    Paper("2403.17031", "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR Summarization",
          "Huang, Shengyi"),
    # Training options (cited when a run uses them).
    Paper("2409.06411", "Length Desensitization in Directed Preference Optimization", "Liu, Wei"),
    Paper("2406.11827", "WPO: Enhancing RLHF with Weighted Preference Optimization", "Zhou, Wenxuan"),
    Paper("2404.09656", "Learn Your Reference Model for Real Good Alignment", "Gorbatovski, Alexey"),
    Paper("2106.09685", "LoRA: Low-Rank Adaptation of Large Language Models", "Hu, Edward J."),
    Paper("2305.14314", "QLoRA: Efficient Finetuning of Quantized LLMs", "Dettmers, Tim"),
    Paper("2110.02861", "8-bit Optimizers via Block-wise Quantization", "Dettmers, Tim"),
)}

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry; its defaults must cover exactly the loss's hyper-parameters.

    A loss given as a function is checked now; a built-in loss given by name is checked by the test
    suite (tests/methods/test_losses.py), so that registering it does not import torch. A method without a loss
    (PPO) is its algorithm's: its ``algorithm`` says so."""
    if (method.loss is None) != (method.algorithm == "ppo"):
        raise ValueError(f"Method '{method.name}': a method without a loss is its algorithm's (algorithm='ppo') "
                         f"(loss={method.loss!r}, algorithm={method.algorithm!r})")
    if not isinstance(method.loss, LossByName):
        check_defaults(method)
    unknown = [p for p in method.papers if p not in PAPERS]
    if unknown:
        raise ValueError(f"Method '{method.name}': papers {unknown} are not in PAPERS; add them there")
    METHODS[method.name] = method
    return method


def check_defaults(method: Method) -> None:
    """Raise ValueError unless ``method.defaults`` names exactly its loss's hyper-parameters."""
    missing = set(method.hparams) - set(method.defaults)
    unknown = set(method.defaults) - set(method.hparams)
    if missing or unknown:
        raise ValueError(
            f"Method '{method.name}': defaults must match the loss's hyper-parameters "
            f"(missing: {sorted(missing)}, unknown: {sorted(unknown)})"
        )


# Reference-based, paired.
register(Method("dpo", "dpo", defaults={"beta": 0.1, "label_smoothing": 0.0},
                summary="DPO, sigmoid loss (Rafailov et al. 2023, arXiv 2305.18290)",
                papers=("2305.18290",)))
register(Method("cdpo", "dpo", defaults={"beta": 0.1, "label_smoothing": 0.1},
                summary="conservative DPO: label smoothing ε, finite optimum (Mitchell 2023)",
                papers=("2305.18290",)))
register(Method("robust", "robust", defaults={"beta": 0.1, "label_smoothing": 0.1},
                summary="robust DPO: unbiased under label flips with rate ε (Chowdhury 2024, 2403.00409)",
                papers=("2403.00409",)))
register(Method("ipo", "ipo", uses_average_logps=True, defaults={"beta": 0.1},
                summary="IPO: squared loss to a 1/(2β) margin, length-normalised log-ratios (Azar 2023)",
                papers=("2310.12036",)))
register(Method("hinge", "hinge", defaults={"beta": 0.1},
                summary="hinge-norm with reference, margin 1/β (RSO, Liu et al. 2023, 2309.06657)",
                papers=("2309.06657",)))
register(Method("dpop", "dpop", defaults={"beta": 0.1, "dpop_lambda": 50.0},
                summary="DPO-Positive: penalise chosen log-prob below the reference (Smaug, 2402.13228)",
                papers=("2402.13228",)))
register(Method("rpo", "rpo", uses_chosen_nll=True, defaults={"beta": 0.1, "rpo_alpha": 1.0},
                summary="DPO + α·per-token NLL of the chosen (Pang et al. 2024, 2404.19733)",
                papers=("2404.19733",)))
register(Method("nca_pair", "nca_pair", defaults={"beta": 0.1},
                summary="NCA, pairwise (Chen et al. 2024, 2402.05369)",
                papers=("2402.05369",)))
register(Method("bco_pair", "bco_pair", defaults={"beta": 0.1},
                summary="BCO, pairwise, no running-mean shift (Jung et al. 2024, 2404.04656)",
                papers=("2404.04656",)))
register(Method("sppo_hard", "sppo_hard", defaults={"beta": 0.1},
                summary="SPPO with hard labels: regress ρ_w → 1/(2β), ρ_l → −1/(2β) (Wu et al. 2024)",
                papers=("2405.00675",)))
register(Method("apo_zero", "apo_zero", defaults={"beta": 0.1},
                summary="APO-zero: raise chosen, lower rejected (D'Oosterlinck et al. 2024, 2408.06266)",
                papers=("2408.06266",)))
register(Method("apo_down", "apo_down", defaults={"beta": 0.1},
                summary="APO-down: lower chosen, keep the gap (D'Oosterlinck et al. 2024, 2408.06266)",
                papers=("2408.06266",)))

# Reference-free, paired.
register(Method("slic", "slic", needs_reference=False, uses_chosen_nll=True,
                defaults={"beta": 1.0, "slic_lambda": 0.1},
                summary="SLiC-HF: hinge on s_w − s_l with margin δ=β, plus λ·NLL (Zhao et al. 2023)",
                papers=("2305.10425",)))
register(Method("simpo", "simpo", needs_reference=False, uses_average_logps=True,
                defaults={"beta": 2.0, "simpo_gamma": 1.0, "label_smoothing": 0.0},
                summary="SimPO: averaged log-probs, absolute margin γ (Meng et al. 2024, 2405.14734)",
                papers=("2405.14734",)))
register(Method("orpo", "orpo", needs_reference=False, uses_average_logps=True, uses_chosen_nll=True,
                defaults={"beta": 0.1},
                summary="ORPO: NLL − β·log σ(log odds ratio) (Hong et al. 2024, 2403.07691)",
                papers=("2403.07691",)))
register(Method("cpo", "cpo", needs_reference=False, uses_chosen_nll=True,
                defaults={"beta": 0.1, "cpo_alpha": 1.0},
                summary="CPO: reference-free DPO + α·NLL (Xu et al. 2024, 2401.08417)",
                papers=("2401.08417",)))
register(Method("sft", "sft", data="sft", needs_reference=False, uses_chosen_nll=True, defaults={"beta": 0.1},
                summary="SFT on the chosen completion (per-token NLL); β only scales logged rewards"))

register(Method("unlikelihood", "unlikelihood", needs_reference=False, uses_average_logps=True,
                uses_chosen_nll=True, defaults={"unlikelihood_alpha": 1.0},
                summary="Unlikelihood baseline of the DPO paper: NLL(y_w) − α·log(1 − p̄(y_l))",
                papers=("1908.04319", "2305.18290")))

# Reward modelling, the RLHF baseline's first stage.
register(Method("reward", "bradley_terry", needs_reference=False, model="reward",
                defaults={"center_rewards_coefficient": 0.0},
                summary="Bradley–Terry reward model on a sequence-classification head (RLHF baseline)",
                papers=("2203.02155",)))

# Unpaired.
register(Method("kto", "kto", data="unpaired",
                defaults={"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
                summary="KTO: unpaired, KL reference point (Ethayarajh et al. 2024, 2402.01306)",
                papers=("2402.01306",)))


# Online: completions sampled from the current policy during training and labelled by a judge.
_ONLINE = ("sampling", "generation_batch")
_ROUNDS = ("sampling", "rounds")
register(Method("online_dpo", "dpo", online=True, num_generations=2, reads=_ONLINE,
                defaults={"beta": 0.1, "label_smoothing": 0.0},
                summary="Online DPO: 2 samples per prompt from the current policy, the judge's preference, a DPO "
                        "step (Guo et al. 2024, 2402.04792); any paired method with online=true",
                papers=("2402.04792",)))
register(Method("rloo", "rloo", data="groups", online=True, num_generations=2, reference_weight="beta", reads=_ONLINE,
                defaults={"beta": 0.05, "epsilon": 0.2},
                summary="RLOO: k samples, leave-one-out baseline, KL in the reward (Ahmadian et al. 2024, 2402.14740)",
                papers=("2402.14740",)))
register(Method("grpo", "grpo", data="groups", online=True, num_generations=8, reference_weight="beta", reads=_ONLINE,
                defaults={"beta": 0.0, "epsilon": 0.2, "epsilon_high": 0.0, "scale_rewards": "group",
                          "grpo_loss_type": "dapo", "use_bias_correction_kl": True},
                summary="GRPO: group-normalised advantages, clipped ratio, β·k3 KL in the loss (β=0: no reference) "
                        "(Shao et al. 2024, 2402.03300)",
                papers=("2402.03300",)))

register(Method("gspo", "gspo", data="groups", online=True, num_generations=8, reference_weight="beta", reads=_ONLINE,
                defaults={"beta": 0.0, "epsilon": 3e-4, "epsilon_high": 4e-4, "scale_rewards": "group"},
                summary="GSPO: GRPO's advantages with a length-normalised sequence-level ratio, clipped per sequence "
                        "(Zheng et al. 2025, 2507.18071)",
                papers=("2507.18071",)))

# The RLHF baseline DPO replaces: PPO with a value model and a KL penalty in the reward, an algorithm of its own
# (preftune.training.ppo). Defaults: TRL's PPOTrainer (num_ppo_epochs 4, cliprange 0.2, vf_coef 0.1, γ 1, λ 0.95,
# kl_coef 0.05, k1), the adaptive controller's horizon of Ziegler et al. 2019 (arXiv 1909.08593, §2.2).
register(Method("ppo", None, data="experience", online=True, num_generations=1, algorithm="ppo",
                reads=("sampling", "ppo"),
                defaults={"num_ppo_epochs": 4, "num_mini_batches": 1, "cliprange": 0.2, "cliprange_value": 0.2,
                          "vf_coef": 0.1, "gamma": 1.0, "lam": 0.95, "kl_coef": 0.05, "target_kl": None,
                          "kl_horizon": 10000, "kl_estimator": "k1", "whiten_rewards": False, "entropy_coef": 0.0,
                          "use_score_scaling": False, "use_score_norm": False, "score_clip": None,
                          "value_model": None},
                summary="PPO (RLHF): value model, GAE, clipped ratio and value, −kl_coef·KL per token in the reward, "
                        "fixed or adaptive KL (target_kl) (Ziegler et al. 2019, 1909.08593; Schulman et al. 2017, "
                        "1707.06347)",
                papers=("1909.08593", "1707.06347", "1506.02438", "2203.02155", "2403.17031")))
# Rounds: each round samples, judges and pairs completions, then trains one run of the loop on the pairs.
register(Method("rso", "dpo", num_generations=64, reads=_ROUNDS,
                rounds=Rounds("initial", "rso", "initial", num_rounds=1),
                defaults={"beta": 0.05, "label_smoothing": 0.0},
                summary="RSO, sigmoid-norm: pairs from π_sft·exp(r/β) by statistical rejection sampling (rso_beta), "
                        "DPO loss at temperature γ = beta (Liu et al. 2023, 2309.06657)",
                papers=("2309.06657", "2305.18290")))
register(Method("rso_hinge", "hinge", num_generations=64, reads=_ROUNDS,
                rounds=Rounds("initial", "rso", "initial", num_rounds=1),
                defaults={"beta": 0.05},
                summary="RSO, hinge-norm: the rejection-sampled pairs, max(0, 1 − γ·h) with γ = beta "
                        "(Liu et al. 2023, 2309.06657)",
                papers=("2309.06657",)))
register(Method("sppo", "sppo", num_generations=5, extras=("chosen_win_prob", "rejected_win_prob"), reads=_ROUNDS,
                rounds=Rounds("policy", "best_vs_worst", "previous", num_rounds=3), defaults={"beta": 1e-3},
                summary="SPPO: K samples of the current iterate, P̂(y ≻ π_t) from the judge, log π/π_t regressed "
                        "to η(P̂ − ½), η = 1/beta (Wu et al. 2024, 2405.00675)",
                papers=("2405.00675",)))
register(Method("iterative_dpo", "dpo", num_generations=8, reads=_ROUNDS,
                rounds=Rounds("policy", "best_vs_worst", "initial", num_rounds=3),
                defaults={"beta": 0.1, "label_smoothing": 0.0},
                summary="iterative DPO: rounds of best-of-n vs worst-of-n on-policy pairs, fixed SFT reference "
                        "(refresh_reference: the previous iterate) (Dong et al. 2024, 2405.07863)",
                papers=("2405.07863", "2305.18290")))


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name is a ConfigError suggesting the closest ones."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(name, METHODS, n=3) if isinstance(name, str) else []
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown method {name!r}.{hint} Known methods: {', '.join(sorted(METHODS))} "
                          "(`preftune methods` describes them)") from None


def run_data(names: list[str]) -> Literal["paired", "unpaired", "sft", "groups"]:
    """The rows a combination of methods trains on: ``sft`` alone reads SFT rows (or the chosen side of
    pairs); with paired methods it is a term on the chosen completions; it cannot join unpaired ones,
    groups or experience; group methods (RLOO, GRPO) and PPO train alone."""
    kinds = {get_method(name).data for name in names}
    others = kinds - {"sft"}
    if len(others) > 1 or ("sft" in kinds and others & {"unpaired", "groups", "experience"}):
        raise ConfigError(f"cannot combine methods that train on different data ({', '.join(sorted(kinds))}): "
                          f"{names}")
    return others.pop() if others else "sft"


def run_extras(names: list[str]) -> tuple[str, ...]:
    """The per-example columns a combination of methods reads (the union of their ``extras``, in order)."""
    return tuple(dict.fromkeys(extra for name in names for extra in get_method(name).extras))


def compute_loss(
    names: list[str], weights: list[float], lp: Any, hparams: Mapping[str, Any]
) -> losses.LossOutput:
    """Weighted sum of the named methods' losses on ``lp`` (rewards from the first method).

    Each loss gets ``hparams[k]`` for each of its hyper-parameters, or its registry default where the key
    is absent or None; keys no method uses are ignored (one config can serve every method). All methods
    must take the same kind of data.
    """
    if not names or len(names) != len(weights):
        raise ValueError(f"need one weight per method, got methods {names} and weights {weights}")
    methods = [get_method(name) for name in names]
    run_data(names)
    terms = []
    for method, weight in zip(methods, weights, strict=True):
        kwargs = {k: method.defaults[k] if hparams.get(k) is None else hparams[k] for k in method.hparams}
        terms.append((method.loss(lp, **kwargs), weight))
    from preftune.methods import losses

    out = losses.combine(terms)
    out.terms = {method.name: term.losses for method, (term, _) in zip(methods, terms)}
    out.metrics = {name: value for term, _ in terms for name, value in term.metrics.items()}
    return out


def describe() -> str:
    """A markdown table of the registered methods for the README and the CLI."""
    rows = [
        "| method | data | reference | defaults | summary |",
        "|---|---|---|---|---|",
    ]
    for m in METHODS.values():
        defaults = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.defaults.items())
        reference = "yes" if m.needs_reference else "no"
        data = "prompts, in rounds" if m.rounds else m.data  # pairs are sampled and judged each round
        rows.append(f"| `{m.name}` | {data} | {reference} | {defaults} | {m.summary} |")
    return "\n".join(rows)
