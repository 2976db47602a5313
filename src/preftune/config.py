"""One typed configuration for a run: YAML file + ``key=value`` overrides, validated once.

Names follow TRL's ``DPOConfig`` / ``TrainingArguments`` where a user would know them. A loss
hyper-parameter left at ``None`` takes the chosen method's default from the registry.

Every value that cannot work is refused by :meth:`TrainConfig.validate` with a :class:`ConfigError` that
names the key; :func:`load_config` adds the YAML file and line the value came from. A YAML file that
gives a key twice is refused too (PyYAML would keep the last value without a word).

This module imports neither torch nor transformers (``preftune config`` lists the keys quickly).
"""

from __future__ import annotations

import dataclasses
import decimal
import difflib
import functools
import importlib.util
import inspect
import math
import re
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from preftune import schedules
from preftune.errors import ConfigError
from preftune.methods.registry import METHODS, get_method, run_data

# Accepted for familiarity (TRL's, transformers' and the CLI's names); mapped onto our own names.
ALIASES = {"loss_type": "method", "model": "model_name_or_path", "ref_model": "ref_model_name_or_path",
           "packing": "padding_free", "torch_dtype": "dtype", "dataset_name": "dataset",
           "dataset_train_split": "dataset_split", "dataset_test_split": "eval_split",
           "chat_template_path": "chat_template", "max_seq_length": "max_length",
           # PPO: TRL v0.11's ppo_epochs, TRL's reward_model_path (a reward-model folder is one kind of judge)
           "ppo_epochs": "num_ppo_epochs", "reward_model_path": "judge", "value_model_path": "value_model"}

# TRL's loss_type values that name a preftune method differently (the others are the same names).
TRL_LOSS_TYPES = {"sigmoid": "dpo"}


@dataclass(frozen=True)
class Optimizer:
    """An optimizer by transformers' ``optim`` name: ``module.name`` built by training.loop.build_optimizer."""

    module: str
    name: str
    package: str | None = None  # what to pip install when it is not torch
    state: str = ""  # what it keeps per trainable parameter


_ADAMW = Optimizer("torch.optim", "AdamW", state="m and v in fp32: 8 bytes per parameter")
_BNB_8BIT = "m and v in 8 bits with an fp32 scale per 256 values: ≈2.03 bytes per parameter (tensors under 4096 " \
    "values keep fp32 states)"
OPTIMIZERS = {
    "adamw": _ADAMW,
    "adamw_torch": _ADAMW,
    "adamw_torch_fused": _ADAMW,
    "rmsprop": Optimizer("torch.optim", "RMSprop", state="v in fp32: 4 bytes per parameter"),
    # 8-bit states (Dettmers et al. 2022, arXiv 2110.02861). Paged states move to CPU memory under GPU memory
    # pressure; on a CPU they are the plain ones.
    "adamw_bnb_8bit": Optimizer("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", _BNB_8BIT),
    "adamw_8bit": Optimizer("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", _BNB_8BIT),
    "paged_adamw_8bit": Optimizer("bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes", _BNB_8BIT),
    "paged_adamw_32bit": Optimizer("bitsandbytes.optim", "PagedAdamW32bit", "bitsandbytes",
                                   "m and v in fp32, paged: 8 bytes per parameter"),
    "adamw_torch_8bit": Optimizer("torchao.optim", "AdamW8bit", "torchao", "m and v in 8 bits (torchao)"),
    "adamw_torch_4bit": Optimizer("torchao.optim", "AdamW4bit", "torchao", "m and v in 4 bits (torchao)"),
}


@dataclass(frozen=True)
class TrlKey:
    """A TRL / transformers config key preftune has no field for: what to do instead (``advice``), and the values
    it accepts because they describe what preftune does anyway (``accepts``; such a key is then dropped)."""

    advice: str
    accepts: Callable[[Any], bool] | None = None


def _is(*values: Any) -> Callable[[Any], bool]:
    return lambda value: value in values


_EVAL = ("preftune evaluates when there is evaluation data (eval_dataset, or eval_split_size > 0): every "
         "eval_steps steps, or once at the end when eval_steps is null")
_NOT_NEEDED = "remove it"
TRL_KEYS: dict[str, TrlKey] = {
    # --- what the loop does anyway: accepted with the value that says so -------------------------------------
    "eval_strategy": TrlKey(f"{_EVAL}; 'steps' (every eval_steps, by default logging_steps) and 'no' are accepted; "
                            "for 'epoch' set eval_steps to the steps of an epoch", _is("steps", "no")),
    "evaluation_strategy": TrlKey(f"{_EVAL}; 'steps' (every eval_steps, by default logging_steps) and 'no' are "
                                  "accepted; for 'epoch' set eval_steps to the steps of an epoch", _is("steps", "no")),
    "save_strategy": TrlKey("preftune checkpoints every save_steps steps (null: none); 'steps' (by default every "
                            "500 steps) and 'no' are accepted; for 'epoch' set save_steps", _is("steps", "no")),
    "logging_strategy": TrlKey("preftune logs every logging_steps steps and the last one; 'steps' is accepted",
                               _is("steps")),
    "do_train": TrlKey("`preftune train` trains; true is accepted", _is(True)),
    "do_eval": TrlKey(_EVAL, _is(True, False)),
    "remove_unused_columns": TrlKey("preftune keeps the columns each format needs and never drops yours silently",
                                    _is(True, False)),
    "gradient_checkpointing_kwargs": TrlKey(
        "gradient checkpointing always runs with use_reentrant=False (the mode that works with LoRA and frozen "
        "embeddings); {use_reentrant: false} is accepted", lambda v: v in ({"use_reentrant": False}, None, {})),
    "truncation_mode": TrlKey("prompts longer than max_prompt_length keep their end, completions keep their start "
                              "(max_completion_length, max_length); 'keep_start' (TRL's default) is accepted",
                              _is("keep_start")),
    "f_divergence_type": TrlKey("only the reverse KL of standard DPO is implemented; 'reverse_kl' is accepted",
                                _is("reverse_kl")),
    "hub_strategy": TrlKey("final/ is uploaded once, at the end of the run; 'end' is accepted", _is("end")),
    "include_tokens_per_second": TrlKey("tokens_per_second is always logged", _is(True, False)),
    "include_num_input_tokens_seen": TrlKey("tokens_per_second is always logged", _is(True, False)),
    "use_liger_kernel": TrlKey("the LM head is already chunked and never builds [batch, seq, vocab] logits "
                               "(logprob_chunk_size); false is accepted", _is(False)),
    "use_logits_to_keep": TrlKey("only completion positions go through the LM head already", _is(True, False)),
    "force_use_ref_model": TrlKey("a reference is used whenever the method needs one", _is(False)),
    "dataloader_num_workers": TrlKey("batches are built in the main process from the tokenized cache",
                                     _is(0, None)),
    # --- not supported: what to do instead ---------------------------------------------------------------------
    "model_init_kwargs": TrlKey("give the loading options as keys: dtype, attn_implementation, trust_remote_code, "
                                "load_in_4bit / load_in_8bit (Accelerate places the model; there is no device_map)"),
    "ref_model_init_kwargs": TrlKey("the reference (ref_model_name_or_path) loads with the policy's options"),
    "ref_adapter_name": TrlKey("under LoRA the reference is the policy with its adapters disabled (or its "
                               f"precomputed log-probs); {_NOT_NEEDED}"),
    "model_adapter_name": TrlKey(f"preftune trains one adapter; {_NOT_NEEDED}"),
    "dataset_num_proc": TrlKey(f"tokenization runs once and is cached on disk (cache_dir); {_NOT_NEEDED}"),
    "precompute_ref_batch_size": TrlKey("the reference pass uses per_device_eval_batch_size; set that"),
    "reference_free": TrlKey("choose a reference-free method: method: simpo, cpo, orpo or slic"),
    "generate_during_eval": TrlKey("sample and judge with `preftune eval`, or pass a callback to PreferenceTrainer"),
    "label_pad_token_id": TrlKey(f"padding never reaches the loss; {_NOT_NEEDED}"),
    "padding_value": TrlKey("the tokenizer's pad token (else EOS) pads; padding never reaches the loss"),
    "pad_token": TrlKey("set tokenizer.pad_token and save the tokenizer (else EOS pads)"),
    "is_encoder_decoder": TrlKey("preftune trains causal (decoder-only) language models"),
    "f_alpha_divergence_coef": TrlKey("f-DPO is not implemented; only standard DPO's reverse KL"),
    "discopop_tau": TrlKey("DiscoPOP is not implemented (`preftune methods` lists the methods)"),
    "save_only_model": TrlKey("checkpoints keep the optimizer so that a resume equals an uninterrupted run; final/ "
                              "holds the model alone"),
    "load_best_model_at_end": TrlKey("final/ is the last step's model; pick a checkpoint by metrics.jsonl"),
    "metric_for_best_model": TrlKey("final/ is the last step's model; pick a checkpoint by metrics.jsonl"),
    "greater_is_better": TrlKey("final/ is the last step's model; pick a checkpoint by metrics.jsonl"),
    "logging_dir": TrlKey("trackers write under output_dir/logs"),
    "logging_first_step": TrlKey("metrics are logged every logging_steps steps and at the last step"),
    "deepspeed": TrlKey("give DeepSpeed to Accelerate: accelerate launch --config_file "
                        "examples/accelerate/deepspeed_zero3.yaml -m preftune.cli train run.yaml"),
    "fsdp": TrlKey("give FSDP to Accelerate: accelerate launch --config_file examples/accelerate/fsdp.yaml -m "
                   "preftune.cli train run.yaml"),
    "fsdp_config": TrlKey("give FSDP to Accelerate: accelerate launch --config_file examples/accelerate/fsdp.yaml "
                          "-m preftune.cli train run.yaml"),
    "ddp_find_unused_parameters": TrlKey("set it in an Accelerate config (accelerate launch --config_file …)"),
    "auto_find_batch_size": TrlKey("set max_tokens_per_batch: micro-batches of as many examples as fit"),
    "eval_accumulation_steps": TrlKey(f"evaluation metrics are reduced batch by batch; {_NOT_NEEDED}"),
    "model_revision": TrlKey("download that revision (hf download NAME --revision REV --local-dir DIR) and give "
                             "its folder as model_name_or_path"),
    "dataset_config": TrlKey("load that configuration with datasets.load_dataset and pass it as train_dataset, or "
                             "save it to a folder (save_to_disk) and give the folder as dataset"),
    "lora_modules_to_save": TrlKey("not supported yet: LoRA adapters only (a reward model's score head is "
                                   "trained with them)"),
    "use_rslora": TrlKey("not supported yet (plain LoRA scaling lora_alpha / lora_r)"),
    "use_dora": TrlKey("not supported yet (plain LoRA)"),
    "lora_task_type": TrlKey("set by the method (CAUSAL_LM, or SEQ_CLS for method: reward)"),
    "bnb_4bit_quant_storage": TrlKey("4-bit weights are stored as uint8 (bitsandbytes' default)"),
    "use_cpu": TrlKey("preftune uses the GPU when there is one; CUDA_VISIBLE_DEVICES= forces the CPU"),
    "torch_compile": TrlKey("not supported"),
    "tf32": TrlKey("set torch.backends.cuda.matmul.allow_tf32 in your own launcher"),
    "data_seed": TrlKey("seed drives the data order too"),
    "activation_offloading": TrlKey("not supported; use gradient_checkpointing"),
    "pad_to_multiple_of": TrlKey("batches are packed without padding (padding_free) or padded to their longest row"),
    "tools": TrlKey("not supported"),
    # --- GRPO / RLOO (TRL's GRPOConfig, RLOOConfig) ---------------------------------------------------------------
    "use_vllm": TrlKey("online methods sample with the policy itself (no vLLM server or colocated engine): remove "
                       "use_vllm, or set it false", _is(False)),
    **{key: TrlKey("online methods sample with the policy itself, without vLLM: remove it") for key in (
        "vllm_mode", "vllm_server_host", "vllm_server_port", "vllm_server_base_url", "vllm_gpu_memory_utilization",
        "vllm_tensor_parallel_size", "vllm_model_impl", "vllm_importance_sampling_correction")},
    "reward_weights": TrlKey("pass the reward functions and their weights to preftune.GRPOTrainer (reward_funcs=, "
                             "GRPOConfig(reward_weights=…)), or write one judge function that combines them"),
    "rloo_k": TrlKey("set num_generations (completions per prompt)"),
    "log_completions": TrlKey("`preftune eval` samples and judges held-out prompts; false is accepted", _is(False)),
    "num_completions_to_print": TrlKey("`preftune eval` samples and judges held-out prompts; remove it"),
    "mask_truncated_completions": TrlKey("set missing_eos_penalty to score completions that never ended lower; "
                                         "false is accepted", _is(False)),
    "repetition_penalty": TrlKey("sampling uses temperature, top_p and top_k; 1.0 is accepted", _is(1.0)),
    "min_p": TrlKey("sampling uses temperature, top_p and top_k; null is accepted", _is(None, 0, 0.0)),
    "generation_kwargs": TrlKey("sampling uses temperature, top_p and top_k; set those keys", _is(None, {})),
    "importance_sampling_level": TrlKey("GRPO's ratio is per token; for the sequence level set method: gspo "
                                        "(GSPO, arXiv 2507.18071); 'token' is accepted", _is("token")),
    "top_entropy_quantile": TrlKey("every completion token is trained on; 1.0 is accepted", _is(1.0)),
    "ds3_gather_for_generation": TrlKey("give DeepSpeed to Accelerate (examples/accelerate/deepspeed_zero3.yaml); "
                                        "true is accepted", _is(True)),
    "shuffle_dataset": TrlKey("training prompts are always shuffled (seed); true is accepted", _is(True)),
    "use_liger_loss": TrlKey("the LM head is already chunked (logprob_chunk_size); false is accepted", _is(False)),
}

# report_to names: Accelerate's trackers → (modules, any of which makes it available; the package to install).
TRACKERS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
    "trackio": (("trackio",), "trackio"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "aim": (("aim",), "aim"),
    "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"),
    "swanlab": (("swanlab",), "swanlab"),
}

# Schedulers that adapt the learning rate to a metric passed at every step (scheduler.step(metric)).
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")

# transformers' scheduler arguments that preftune's loop sets (a TRL user may know them from get_scheduler).
_SET_BY_THE_LOOP = ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")

# lr_scheduler_kwargs counted in optimizer steps (warmup_stable_decay's phases, inverse_sqrt's time scale).
_STEP_COUNT_KWARGS = ("num_decay_steps", "num_stable_steps", "timescale")

# lora_target_modules as module names ("q_proj, v_proj"); any other string is PEFT's regex.
_MODULE_NAMES = re.compile(r"^\s*[\w.]+(\s*,\s*[\w.]+)*\s*,?\s*$")

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def is_template_text(value: str) -> bool:
    """Whether a ``chat_template`` value is the Jinja template itself rather than the path of a file holding it."""
    return "{%" in value or "{{" in value


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------------
    model_name_or_path: str | None = None  # None: the embedded tiny Llama (see preftune.modeling.tiny)
    tokenizer_name_or_path: str | None = None
    ref_model_name_or_path: str | None = None  # explicit reference checkpoint
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"  # weights as loaded
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False
    disable_dropout: bool = True
    gradient_checkpointing: bool = False
    # --- quantized base (QLoRA, through bitsandbytes; TRL's ModelConfig names) ------------------------
    load_in_4bit: bool = False  # the base model's linear layers in 4 bits; LoRA adapters train on top
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"  # NormalFloat4 (QLoRA, arXiv 2305.14314) or plain FP4
    use_bnb_nested_quant: bool = False  # quantize the 4-bit blocks' scales too (QLoRA's double quantization)
    # --- data --------------------------------------------------------------------------------------
    dataset: str | None = None  # file, saved datasets folder or Hub name; None: the built-in pairs
    dataset_split: str = "train"
    eval_dataset: str | None = None
    eval_split: str = "test"
    eval_split_size: float = 0.0  # fraction of train held out when no eval_dataset is given
    skip_invalid_rows: bool = False
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    # The longest completion in tokens: training completions are cut to it (keeping their start, counted in the
    # log); online generation stops there. None: completions are bounded by max_length only (online: 256 tokens).
    max_completion_length: int | None = None
    chat_template: str | None = None  # a Jinja file, or the template itself; replaces the tokenizer's own
    # --- method ------------------------------------------------------------------------------------
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
    # --- online: completions sampled from the current policy and judged during training -------------------
    # Online DPO (`method: online_dpo`, or any paired method with `online: true`), RLOO and GRPO read prompts
    # (a prompt-only dataset, or the prompts of a preference dataset) and need a judge.
    online: bool = False  # paired methods: train on pairs sampled from the current policy (Online DPO)
    # a reward-model folder (reward_model_path is another name), 'module:function' / 'file.py:function', or 'gold'
    judge: str | None = None
    num_generations: int | None = None  # completions per prompt (None: the method's default; Online DPO: 2)
    temperature: float = 1.0  # sampling temperature of online generation
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    missing_eos_penalty: float | None = None  # subtracted from the score of a completion that never ended
    # One generation batch (TRL's names): steps_per_generation micro-batches of prompts per process are sampled and
    # judged at once, then trained on in num_iterations passes of gradient_accumulation_steps micro-batches per
    # optimizer step (PPO: its own num_ppo_epochs and num_mini_batches).
    num_iterations: int = 1  # μ of GRPO (arXiv 2402.03300, Alg. 1): passes over each generation batch
    # micro-batches of prompts per process in one generation batch; None: gradient_accumulation_steps
    steps_per_generation: int | None = None
    generation_batch_size: int | None = None  # or: prompts per generation batch over all processes
    # DAPO's dynamic sampling (arXiv 2503.14476, §3.2): groups whose completions all scored the same are dropped and
    # more prompts sampled until the generation batch is full, at most max_num_gen_batches generation batches
    # (0: no cap); short after that, the batch is filled with dropped groups (counted in the log).
    dynamic_sampling: bool = False
    max_num_gen_batches: int = 4
    # --- PPO (`method: ppo`, an algorithm of its own; None: the registry's default, see `preftune methods`) ----------
    # One update: per_device_train_batch_size × gradient_accumulation_steps × num_mini_batches prompts per process,
    # one completion each, then num_ppo_epochs passes over them in num_mini_batches optimizer steps.
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
    # --- rounds: RSO, SPPO, iterative DPO (`method: rso | rso_hinge | sppo | iterative_dpo`) --------------------
    # Each round samples num_generations completions of every prompt (from the current iterate; RSO: from the
    # model the run started with), judges them, writes the round's pairs and trains one run of the loop on them
    # (max_steps / num_train_epochs are per round). Needs a judge, like the online methods.
    num_rounds: int | None = None  # None: the method's default (RSO 1, SPPO 3, iterative DPO 3)
    prompts_per_round: int | None = None  # None: every prompt in every round; n: round k takes the k-th n prompts
    accumulate_pairs: bool = False  # train each round on the pairs of every round so far (warm-started)
    refresh_reference: bool = False  # RSO / iterative DPO: the reference is the previous iterate, not the start
    rso_beta: float = 0.5  # RSO: β of the sampled distribution π_sft·exp(r/β) (0: the top rso_samples by score)
    rso_samples: int = 8  # RSO: completions accepted per prompt out of num_generations candidates
    rso_pairing: Literal["first_round", "tournament"] = "first_round"  # RSO: n/2 disjoint pairs, or n − 1 matches
    # --- reference ---------------------------------------------------------------------------------
    precompute_ref_log_probs: bool | None = None  # None: precompute whenever the reference is fixed
    sync_ref_model: bool = False  # TR-DPO
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    # --- LoRA --------------------------------------------------------------------------------------
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str | list[str] = "all-linear"  # or names ("q_proj,v_proj"), or a regex string (PEFT)
    save_merged_model: bool = False
    # --- optimisation ------------------------------------------------------------------------------
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-6
    optim: str = "adamw"  # transformers' names: adamw_torch, adamw_8bit, paged_adamw_8bit, … (OPTIMIZERS)
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "linear"  # transformers' SchedulerType names
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {min_lr_rate: 0.1} for cosine_with_min_lr
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    bf16: bool | None = None  # None: bf16 autocast where the hardware has it natively (training.loop.resolve_precision)
    fp16: bool = False
    seed: int = 42
    logprob_chunk_size: int = 1024  # LM-head positions per chunk (its logits go through in cache-sized tiles)
    # --- speed (None: the fastest correct choice for the model, logged at start) -----------------------
    prefix_sharing: bool | None = None  # prompt encoded once, chosen and rejected branch from it
    padding_free: bool | None = None  # several pairs packed per row, no padding between them
    fused_mlp: bool | None = None  # gated MLPs keep 2 of their 4 activations for backward (modeling.fused_mlp)
    group_by_length: bool = False  # batches of similar length (less padding when padding_free is off)
    # Training micro-batches of as many examples as fit in this many tokens (prompt counted once, per device);
    # per_device_train_batch_size is then ignored for training. Steadier memory and step time; the batches are
    # length-grouped already, so group_by_length has no further effect.
    max_tokens_per_batch: int | None = None
    # --- logging and checkpoints -------------------------------------------------------------------
    output_dir: str = "runs/preftune"
    overwrite_output_dir: bool = False
    logging_steps: int = 10
    eval_steps: int | None = None  # None: evaluate at the end only
    save_steps: int | None = None  # None: checkpoint at the end only
    save_total_limit: int | None = 2
    resume_from_checkpoint: str | bool | None = None  # True: the latest checkpoint in output_dir
    # tensorboard, wandb, mlflow, trackio … (Accelerate's trackers); "none": metrics.jsonl only; "all": every
    # tracker installed here, resolved by validate() so config.yaml records the list used
    report_to: list[str] = field(default_factory=list)
    run_name: str | None = None
    disable_tqdm: bool = False
    # the health checks (training.health) watch every logged record: each failure mode (likelihood collapse,
    # verbosity, over-optimisation, …) warns once in the log and the progress bar; summary.json lists them
    health_checks: bool = True
    cache_dir: str | None = None  # tokenization and reference caches; default ~/.cache/preftune
    # --- Hugging Face Hub: final/ (with its model card) uploaded at the end of the run ------------------
    push_to_hub: bool = False
    hub_model_id: str | None = None  # "name" or "org/name"
    hub_private_repo: bool | None = None  # None: the Hub's default for the account or organisation
    hub_token: str | None = None  # None: HF_TOKEN or the token saved by `hf auth login`; never written to disk

    # ------------------------------------------------------------------------------------------------
    @property
    def methods(self) -> list[str]:
        return [self.method] if isinstance(self.method, str) else list(self.method)

    def loss_hparams(self) -> dict[str, float]:
        """Hyper-parameters given by the user (method defaults fill the rest in the registry)."""
        names = {n for m in self.methods for n in get_method(m).hparams}
        return {n: getattr(self, n) for n in sorted(names) if getattr(self, n) is not None}

    def validate(self) -> TrainConfig:
        """Check every value and combination; normalise ``report_to`` and ``lora_target_modules`` in place."""
        if not self.methods:
            raise _invalid("method", "method is an empty list; name at least one method (`preftune methods`)")
        for name in self.methods:
            try:
                get_method(name)
            except ConfigError as err:
                message = str(err) if len(str(err)) < 1000 else f"unknown method {shown(name)} (`preftune methods`)"
                raise _invalid("method", message) from None
        try:
            run_data(self.methods)
        except ConfigError as err:
            raise _invalid("method", str(err)) from None
        if len({get_method(m).model for m in self.methods}) > 1:
            raise _invalid("method", f"methods {self.methods} train different models (a reward head and a causal LM)")
        self._check_loss_weights()
        self._check_ranges()
        if self.bf16 and self.fp16:
            raise _invalid(("bf16", "fp16"), "bf16 and fp16 are exclusive; pick one")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise _invalid(("max_steps", "num_train_epochs"), "set max_steps > 0 or num_train_epochs > 0")
        if self.max_length is not None and self.max_prompt_length is not None:
            if self.max_prompt_length >= self.max_length:
                raise _invalid(("max_prompt_length", "max_length"), f"max_prompt_length ({self.max_prompt_length}) "
                               f"must be below max_length ({self.max_length})")
        if self.sync_ref_model and self.precompute_ref_log_probs:
            raise _invalid(("sync_ref_model", "precompute_ref_log_probs"),
                           "sync_ref_model (TR-DPO) moves the reference; it cannot be precomputed")
        if self.sync_ref_model and self.use_peft and self.ref_model_name_or_path is None:
            raise _invalid(("sync_ref_model", "use_peft"),
                           "sync_ref_model needs a reference model; under LoRA set ref_model_name_or_path")
        self._check_unused_hparams()
        self._check_quantization()
        self._check_optimizer()
        self._check_chat_template()
        self._check_hub()
        self._check_online()
        self._check_ppo()
        self._check_rounds()
        self.lora_target_modules = _target_modules(self.lora_target_modules)
        self.report_to = _trackers(self.report_to)
        self._check_scheduler()
        return self

    def _check_unused_hparams(self) -> None:
        """A method's own hyper-parameter given while no method of the run takes it would be ignored: refused (β is
        left out: every config may carry it)."""
        used = {n for m in self.methods for n in get_method(m).hparams}
        for key in sorted({n for m in METHODS.values() for n in m.hparams} - used - {"beta"}):
            if getattr(self, key, None) is None:
                continue
            takers = sorted(m.name for m in METHODS.values() if key in m.hparams)
            hint = (" (TRL's legacy rpo_alpha: method: rpo is DPO + rpo_alpha·NLL of the chosen, or method: [dpo, "
                    "sft] with loss_weights: [1, α])") if key == "rpo_alpha" else ""
            raise _invalid(key, f"{key} is a hyper-parameter of {', '.join(takers)}, not of {self.methods}: it would "
                           f"be ignored; choose one of those methods or remove {key}{hint}")

    def _check_quantization(self) -> None:
        quantized = self.load_in_4bit or self.load_in_8bit
        if self.load_in_4bit and self.load_in_8bit:
            raise _invalid(("load_in_4bit", "load_in_8bit"), "load_in_4bit and load_in_8bit are exclusive; pick one")
        if not self.load_in_4bit and (self.bnb_4bit_quant_type != "nf4" or self.use_bnb_nested_quant):
            raise _invalid(("bnb_4bit_quant_type", "use_bnb_nested_quant"), "bnb_4bit_quant_type and "
                           "use_bnb_nested_quant apply to a 4-bit base: set load_in_4bit: true, or remove them")
        if not quantized:
            return
        key = "load_in_4bit" if self.load_in_4bit else "load_in_8bit"
        if not self.use_peft:
            raise _invalid((key, "use_peft"), f"{key}: a quantized base cannot be trained itself; QLoRA trains LoRA "
                           "adapters on top of it: set use_peft: true")
        if self.save_merged_model:
            raise _invalid((key, "save_merged_model"), f"save_merged_model with {key} would merge the adapters into "
                           "rounded weights; load the base in bf16 with the adapter from final/ and merge_and_unload "
                           "there, or set save_merged_model: false")
        if not _installed("bitsandbytes"):
            raise _invalid(key, f"{key} needs bitsandbytes: pip install bitsandbytes (or "
                           "pip install 'preftune[quantization]')")

    def _check_optimizer(self) -> None:
        spec = OPTIMIZERS.get(self.optim)
        if spec is None:
            close = difflib.get_close_matches(self.optim, OPTIMIZERS, n=2, cutoff=0.5) if isinstance(self.optim, str) \
                else []
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise _invalid("optim", f"optim: {shown(self.optim)} is not supported here.{hint} Supported: "
                           f"{', '.join(OPTIMIZERS)}")
        if spec.package and not _installed(spec.package):
            raise _invalid("optim", f"optim: {self.optim} needs {spec.package}: pip install {spec.package} (or "
                           "pip install 'preftune[quantization]'), or use optim: adamw")

    def _check_chat_template(self) -> None:
        if self.chat_template is None or is_template_text(self.chat_template):
            return
        path = Path(self.chat_template).expanduser()
        if not path.is_file():
            raise _invalid("chat_template", f"chat_template: {shown(self.chat_template, quote=False)} is neither a "
                           "file nor a Jinja template; give the path of a .jinja file, or the template itself (it "
                           "holds {% … %} or {{ … }})")

    def _check_hub(self) -> None:
        if self.push_to_hub and not self.hub_model_id:
            raise _invalid(("push_to_hub", "hub_model_id"), "push_to_hub: true needs hub_model_id, the repository "
                           "to upload final/ to ('name' or 'org/name')")
        if self.hub_model_id is not None and not _HUB_ID.match(self.hub_model_id):
            raise _invalid("hub_model_id", f"hub_model_id: {shown(self.hub_model_id)} is not a Hub repository id; give "
                           "'name' or 'org/name' (letters, digits, '-', '_', '.')")
    @property
    def generation_budget(self) -> int:
        """The longest completion an online method samples: ``max_completion_length``, 256 tokens when unset."""
        return self.max_completion_length or 256

    @property
    def is_online(self) -> bool:
        """Whether training samples its data from the current policy (Online DPO, RLOO, GRPO)."""
        return self.online or any(get_method(m).online for m in self.methods)

    def _check_online(self) -> None:
        if self.online and run_data(self.methods) != "paired":
            raise _invalid(("online", "method"), f"online=true samples pairs for paired methods; {self.methods} "
                           "are not paired (RLOO and GRPO are online by themselves)")
        if not self.is_online:
            changed = [k for k in _GENERATION_KEYS if getattr(self, k) != FIELDS[k].default]
            if changed:
                raise _invalid(changed[0], f"{', '.join(changed)}: for online methods (a generation batch of samples); "
                               f"{self.methods} train on a fixed dataset")
            return
        if self.precompute_ref_log_probs:
            raise _invalid("precompute_ref_log_probs", "online methods score completions sampled during training; "
                           "their reference log-probs cannot be computed beforehand")
        if run_data(self.methods) == "paired" and self.num_generations not in (None, 2):
            raise _invalid("num_generations", "Online DPO compares two completions of each prompt: "
                           "num_generations must be 2 (or unset)")
        self._check_generation_batch()

    def _check_generation_batch(self) -> None:
        ppo = any(get_method(m).algorithm == "ppo" for m in self.methods)
        for key, default in (("num_iterations", 1), ("steps_per_generation", None), ("generation_batch_size", None)):
            if ppo and getattr(self, key) != default:
                raise _invalid(key, f"{key}: PPO passes over each rollout num_ppo_epochs times in num_mini_batches "
                               "optimizer steps; set those")
        if self.num_iterations < 1:
            raise _invalid("num_iterations", f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.steps_per_generation is not None and self.generation_batch_size is not None:
            raise _invalid(("steps_per_generation", "generation_batch_size"), "give steps_per_generation or "
                           "generation_batch_size, not both (one is the other divided by the prompts of a step)")
        steps = self.steps_per_generation
        if steps is not None and (steps < 1 or steps % self.gradient_accumulation_steps):
            raise _invalid(("steps_per_generation", "gradient_accumulation_steps"), f"steps_per_generation "
                           f"({steps}) must be a positive multiple of gradient_accumulation_steps "
                           f"({self.gradient_accumulation_steps}): each optimizer step takes that many micro-batches")
        if self.generation_batch_size is not None and self.generation_batch_size < 1:
            raise _invalid("generation_batch_size", f"generation_batch_size must be >= 1, got "
                           f"{self.generation_batch_size}")
        if self.dynamic_sampling and run_data(self.methods) != "groups":
            raise _invalid(("dynamic_sampling", "method"), "dynamic_sampling drops groups of completions whose "
                           f"rewards are all equal: for GRPO, GSPO and RLOO, not {self.methods}")
        if self.max_num_gen_batches < 0:
            raise _invalid("max_num_gen_batches", f"max_num_gen_batches must be >= 0 (0: no cap), got "
                           f"{self.max_num_gen_batches}")

    def _check_ppo(self) -> None:
        if not any(get_method(m).algorithm == "ppo" for m in self.methods):
            return
        if self.num_generations is not None:
            raise _invalid("num_generations", "PPO samples one completion per prompt and learns a value for it: leave "
                           "num_generations unset (RLOO and GRPO compare several completions of a prompt)")
        if self.use_score_norm and not self.use_score_scaling:
            raise _invalid(("use_score_norm", "use_score_scaling"), "use_score_norm subtracts the running mean of "
                           "the scores as part of use_score_scaling: set use_score_scaling=true too")
        if self.sync_ref_model:
            raise _invalid(("sync_ref_model", "method"), "PPO's KL penalty is to a fixed reference; sync_ref_model "
                           "(TR-DPO) is for the offline methods")
    @property
    def rounds(self):
        """The run's :class:`~preftune.methods.registry.Rounds` (RSO, SPPO, iterative DPO), or None."""
        return get_method(self.methods[0]).rounds

    @property
    def resolved_num_rounds(self) -> int:
        return self.num_rounds or self.rounds.num_rounds

    def _check_rounds(self) -> None:
        spec = self.rounds
        changed = [k for k in _ROUNDS_KEYS if getattr(self, k) != FIELDS[k].default]
        if spec is None:
            if any(get_method(m).rounds for m in self.methods):
                raise _invalid("method", f"methods trained in rounds ({_rounds_methods()}) train alone, not with "
                               f"{[m for m in self.methods if not get_method(m).rounds]}")
            if changed:
                raise _invalid(changed[0], f"{', '.join(changed)}: only for methods trained in rounds "
                               f"({_rounds_methods()}); {self.methods} train in one run")
            return
        if self.load_in_4bit or self.load_in_8bit:
            # Each round hands the next one its model merged into full weights, which a quantized base cannot give.
            key = "load_in_4bit" if self.load_in_4bit else "load_in_8bit"
            raise _invalid((key, "method"), f"{key}: {self.methods[0]} trains in rounds, each starting from the "
                           "previous round's merged model; a quantized base cannot be merged: train in bf16 "
                           "(use_peft=true is fine)")
        if len(self.methods) > 1:
            raise _invalid("method", f"methods trained in rounds ({_rounds_methods()}) train alone, not with "
                           f"{self.methods[1:]}")
        if self.online:
            raise _invalid(("online", "method"), f"{self.methods[0]} samples its pairs in rounds; online=true "
                           "samples every batch instead: set one of them")
        if self.resume_from_checkpoint not in (None, True, False):
            raise _invalid("resume_from_checkpoint", f"{self.methods[0]} resumes a whole run of rounds: set "
                           "resume_from_checkpoint=true (finished rounds are kept, an interrupted round resumes "
                           "from its latest checkpoint)")
        if spec.selection != "rso":
            rso = [k for k in changed if k.startswith("rso_")]
            if rso:
                raise _invalid(rso[0], f"{', '.join(rso)}: RSO's keys; {self.methods[0]} pairs the best against "
                               "the worst completion")
        elif not 2 <= self.rso_samples <= self.num_generations_for_rounds:
            raise _invalid(("rso_samples", "num_generations"), f"rso_samples ({self.rso_samples}) must be >= 2 and "
                           f"at most the {self.num_generations_for_rounds} candidates sampled per prompt "
                           "(num_generations)")
        if spec.reference == "previous" and self.refresh_reference:
            raise _invalid("refresh_reference", f"{self.methods[0]}'s reference is always the previous iterate; "
                           "leave refresh_reference unset")
        if spec.reference == "previous" and self.ref_model_name_or_path:
            raise _invalid("ref_model_name_or_path", f"{self.methods[0]}'s reference is the previous iterate; "
                           "leave ref_model_name_or_path unset")

    @property
    def num_generations_for_rounds(self) -> int:
        """Completions sampled per prompt in each round: ``num_generations``, else the method's default."""
        return self.num_generations or get_method(self.methods[0]).num_generations or 2

    def _check_loss_weights(self) -> None:
        weights = self.loss_weights
        if weights is None:
            return
        if len(weights) != len(self.methods):
            raise _invalid(("loss_weights", "method"), f"loss_weights has {len(weights)} entries but method lists "
                           f"{len(self.methods)} ({self.methods}); give one weight per method")
        bad = [w for w in weights if not (math.isfinite(w) and w >= 0)]
        if bad:
            raise _invalid("loss_weights", f"loss_weights must be finite and >= 0, got {weights}; a negative weight "
                           "would maximise its loss term")
        if not any(weights):
            raise _invalid("loss_weights", f"loss_weights are all zero ({weights}): nothing would be trained")

    def _check_ranges(self) -> None:
        for key, low, high, hint in _RANGES:
            value = getattr(self, key)
            if key == "beta" and all(get_method(m).reference_weight == "beta" for m in self.methods):
                low, hint = _NON_NEGATIVE, "; β weighs the KL to the reference (0: no reference is loaded)"
            if value is not None and not _in_range(value, low, high):
                raise _invalid(key, f"{key} must be {_describe_range(low, high)}, got {value!r}{hint}")

    def _check_scheduler(self) -> None:
        """Catch now what building the schedule would trip over after the model and data are loaded."""
        name, kwargs = self.lr_scheduler_type, self.lr_scheduler_kwargs
        names = [*schedules.SCHEDULES, *METRIC_SCHEDULERS]
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise _invalid("lr_scheduler_type", f"unknown lr_scheduler_type {shown(name)}.{hint} "
                           f"Known: {', '.join(names)}")
        if name in METRIC_SCHEDULERS:
            raise _invalid("lr_scheduler_type", f"lr_scheduler_type={name} sets the learning rate from a metric "
                           "passed at every step (scheduler.step(metric)), which preftune's loop does not pass; "
                           "choose a schedule of the step number (linear, cosine, cosine_with_min_lr, "
                           "warmup_stable_decay, …)")
        accepted = schedules.keyword_arguments(name)
        for key in kwargs:
            if key in _SET_BY_THE_LOOP:
                raise _invalid("lr_scheduler_kwargs", f"lr_scheduler_kwargs: {key!r} is set by preftune (from "
                               "warmup_steps/warmup_ratio, max_steps/num_train_epochs and the resume point)")
            if key not in accepted:
                takes = f"takes {', '.join(accepted)}" if accepted else "takes no lr_scheduler_kwargs"
                raise _invalid("lr_scheduler_kwargs", f"lr_scheduler_kwargs: lr_scheduler_type={name} {takes}, "
                               f"not {key!r}")
        missing = [k for k, p in accepted.items() if p.default is inspect.Parameter.empty and k not in kwargs]
        if missing:
            raise _invalid(("lr_scheduler_kwargs", "lr_scheduler_type"), f"lr_scheduler_type={name} needs "
                           f"lr_scheduler_kwargs {missing}, e.g. lr_scheduler_kwargs={{{missing[0]}: …}}")
        problem = schedules.problems(name, kwargs, self.learning_rate)
        if problem:
            raise _invalid(("lr_scheduler_kwargs", "lr_scheduler_type"), problem)

    def scheduler_kwargs(self, num_processes: int = 1) -> dict[str, Any]:
        """``lr_scheduler_kwargs`` for :func:`preftune.schedules.build_scheduler`: counts of steps are scaled like its
        warmup and length, since Accelerate steps a prepared scheduler once per process per optimizer step."""
        return {k: v * num_processes if k in _STEP_COUNT_KWARGS and v is not None else v
                for k, v in self.lr_scheduler_kwargs.items()}

    def to_dict(self) -> dict[str, Any]:
        """Every key and value, except ``hub_token`` (a secret: config.yaml, fingerprints and trackers never see it)."""
        values = dataclasses.asdict(self)
        values["hub_token"] = None
        return values

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _accept_aliases(init: Callable[..., None]) -> Callable[..., None]:
    """``TrainConfig(loss_type="ipo", model=...)`` as the CLI and YAML accept them (constructor only: the
    fields keep one name each, so ``dataclasses.replace`` and ``config.yaml`` see ``method``)."""

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for alias, name in ALIASES.items():
            if alias not in kwargs:
                continue
            if name in kwargs and kwargs[name] != kwargs[alias]:
                raise _invalid((alias, name), f"both {alias}={kwargs[alias]!r} and {name}={kwargs[name]!r} are "
                               f"given; {alias} is another name for {name}: give one")
            kwargs[name] = kwargs.pop(alias) if alias != "loss_type" else from_trl_loss_type(kwargs.pop(alias))
        init(self, *args, **kwargs)

    return __init__


TrainConfig.__init__ = _accept_aliases(TrainConfig.__init__)


def from_trl_loss_type(value: Any) -> Any:
    """TRL's ``loss_type`` (one name or a list) as preftune method names: ``sigmoid`` → ``dpo``."""
    if isinstance(value, str):
        return TRL_LOSS_TYPES.get(value, value)
    if isinstance(value, list):
        return [TRL_LOSS_TYPES.get(v, v) if isinstance(v, str) else v for v in value]
    return value


_GENERATION_KEYS = ("num_iterations", "steps_per_generation", "generation_batch_size", "dynamic_sampling",
                    "max_num_gen_batches")


def _invalid(keys: str | tuple[str, ...], message: str) -> ConfigError:
    """A ConfigError about ``keys``; load_config prefixes the file and line each key was read from."""
    err = ConfigError(message)
    err.config_keys = (keys,) if isinstance(keys, str) else tuple(keys)
    return err


# Keys read only by methods trained in rounds (preftune.training.rounds).
_ROUNDS_KEYS = ("num_rounds", "prompts_per_round", "accumulate_pairs", "refresh_reference", "rso_beta", "rso_samples",
                "rso_pairing")


def _rounds_methods() -> str:
    return ", ".join(name for name, m in METHODS.items() if m.rounds is not None)


# (key, lower bound, upper bound, what to do); a bound is (value, inclusive) or None. None values are not checked.
_POSITIVE, _NON_NEGATIVE, _AT_LEAST_1 = (0, False), (0, True), (1, True)
_RANGES: list[tuple[str, tuple | None, tuple | None, str]] = [
    ("beta", _POSITIVE, None, "; β is the KL temperature (IPO's target margin is 1/(2β)): typical values are "
     "0.05–0.5, or leave beta unset for the method's default"),
    ("label_smoothing", _NON_NEGATIVE, (0.5, False), "; ε is the assumed rate of flipped labels (robust DPO "
     "divides by 1 − 2ε, and at ε = 0.5 the labels carry no preference)"),
    *((key, _NON_NEGATIVE, None, "") for key in (
        "simpo_gamma", "cpo_alpha", "rpo_alpha", "dpop_lambda", "slic_lambda", "center_rewards_coefficient",
        "unlikelihood_alpha", "desirable_weight", "undesirable_weight")),
    ("ld_alpha", _NON_NEGATIVE, (1, True), ""),
    ("epsilon", _POSITIVE, (1, False), "; the clip range of the policy ratio (0.2 is usual)"),
    ("epsilon_high", _NON_NEGATIVE, None, "; 0 or unset: the same as epsilon"),
    ("num_generations", (2, True), None, "; the methods compare completions of one prompt"),
    ("max_completion_length", _AT_LEAST_1, None, "; give a number of tokens, or null"),
    ("temperature", _POSITIVE, None, "; online methods sample (greedy decoding would give equal completions)"),
    ("top_p", _POSITIVE, (1, True), ""),
    ("top_k", _NON_NEGATIVE, None, "; 0 turns it off"),
    ("missing_eos_penalty", _NON_NEGATIVE, None, ""),
    *((key, _AT_LEAST_1, None, "") for key in ("num_ppo_epochs", "num_mini_batches")),
    ("kl_horizon", _AT_LEAST_1, None, "; in samples: the coefficient moves by at most ±20%·samples/horizon per update"),
    ("cliprange", _POSITIVE, (1, False), "; the clip range of the policy ratio (0.2 is usual)"),
    ("cliprange_value", _POSITIVE, None, "; the clip range of the value (0.2 in TRL, 0.5 in OpenRLHF)"),
    ("gamma", _NON_NEGATIVE, (1, True), ""),
    ("lam", _NON_NEGATIVE, (1, True), ""),
    ("target_kl", _POSITIVE, None, "; nats of KL(π‖π_ref) per completion, or null for a fixed kl_coef"),
    ("score_clip", _POSITIVE, None, "; or null to leave scores unclipped"),
    *((key, _NON_NEGATIVE, None, "") for key in ("vf_coef", "kl_coef", "entropy_coef")),
    ("num_rounds", _AT_LEAST_1, None, "; or null for the method's default"),
    ("prompts_per_round", _AT_LEAST_1, None, "; or null for every prompt in every round"),
    ("rso_beta", _NON_NEGATIVE, None, "; RSO's sampling temperature (0: the best candidates; 0.5 in the paper)"),
    ("learning_rate", _POSITIVE, None, "; typical values are 1e-7–1e-5 (full fine-tuning), 1e-5–1e-4 (LoRA)"),
    ("max_length", _AT_LEAST_1, None, "; give a number of tokens, or null for no limit"),
    ("max_prompt_length", _AT_LEAST_1, None, "; give a number of tokens, or null for no limit"),
    ("max_tokens_per_batch", _AT_LEAST_1, None, "; or null for batches of per_device_train_batch_size"),
    *((key, _AT_LEAST_1, None, "") for key in (
        "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
        "logging_steps", "logprob_chunk_size", "ref_model_sync_steps", "lora_r")),
    ("eval_steps", _AT_LEAST_1, None, "; or null to evaluate at the end only"),
    ("save_steps", _AT_LEAST_1, None, "; or null to checkpoint at the end only"),
    ("save_total_limit", _AT_LEAST_1, None, "; or null to keep every checkpoint"),
    ("eval_split_size", _NON_NEGATIVE, (1, False), ""),
    ("num_train_epochs", _NON_NEGATIVE, None, ""),
    ("warmup_ratio", _NON_NEGATIVE, (1, True), ""),
    ("warmup_steps", _NON_NEGATIVE, None, ""),
    ("ref_model_mixup_alpha", _NON_NEGATIVE, (1, True), ""),
    ("weight_decay", _NON_NEGATIVE, None, ""),
    ("adam_beta1", _NON_NEGATIVE, (1, False), ""),
    ("adam_beta2", _NON_NEGATIVE, (1, False), ""),
    ("adam_epsilon", _POSITIVE, None, ""),
    ("max_grad_norm", _POSITIVE, None, "; gradients are always clipped to this norm (0 would zero them): use a "
     "large value such as 1e9 to leave them unclipped"),
    ("lora_alpha", _POSITIVE, None, ""),
    ("lora_dropout", _NON_NEGATIVE, (1, False), ""),
    ("seed", _NON_NEGATIVE, (2**32 - 1, True), " (numpy's seed range)"),
]


def _in_range(value: float, low: tuple | None, high: tuple | None) -> bool:
    if not math.isfinite(value):
        return False
    if low is not None and (value < low[0] or (value == low[0] and not low[1])):
        return False
    return high is None or value < high[0] or (value == high[0] and high[1])


def _describe_range(low: tuple | None, high: tuple | None) -> str:
    if high is None:
        return f"{'>=' if low[1] else '>'} {low[0]}"
    return f"in {'[' if low[1] else '('}{low[0]}, {high[0]}{']' if high[1] else ')'}"


def _target_modules(value: str | list[str]) -> str | list[str]:
    """``"q_proj, v_proj"`` → ``["q_proj", "v_proj"]``; "all-linear" and regex strings stay (PEFT reads them)."""
    if isinstance(value, str) and value != "all-linear" and _MODULE_NAMES.match(value):
        return [name.strip() for name in value.split(",") if name.strip()]
    return value


def _trackers(value: str | list[str]) -> list[str]:
    """report_to as a list of installed trackers: "none" → [], "all" → every tracker installed here."""
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    names = [n for n in names if n and n != "none"]
    if "all" in names:
        installed = [t for t, (modules, _) in TRACKERS.items() if any(_installed(m) for m in modules)]
        names = [*installed, *(n for n in names if n != "all" and n not in installed)]
    for name in names:
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, TRACKERS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise _invalid("report_to", f"report_to: unknown tracker {shown(name)}.{hint} Known: "
                           f"{', '.join(TRACKERS)}, all (every installed one), none")
        modules, package = TRACKERS[name]
        if not any(_installed(m) for m in modules):
            raise _invalid("report_to", f"report_to: {name} is not installed; `pip install {package}`, or drop it "
                           "from report_to (metrics.jsonl is always written)")
    return list(dict.fromkeys(names))


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _union_members(hint: Any) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _as(option: Any, value: Any) -> tuple[bool, Any]:
    """Try to read ``value`` as type ``option``; ``(ok, converted)``."""
    if option is type(None):
        return value is None, None
    if option is Any:
        return True, value
    if option is bool:
        return isinstance(value, bool), value
    if option is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
        whole = _whole_number(value)  # 1e3 (a string to YAML 1.1) or 1.0e+3 is 1000 steps
        return whole is not None, whole
    if option is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, None
    if option is str:
        return isinstance(value, str), value
    if typing.get_origin(option) is Literal:
        return value in typing.get_args(option), value
    if typing.get_origin(option) is list and isinstance(value, list):
        (item,) = typing.get_args(option)
        converted = [_as(item, v) for v in value]
        return all(ok for ok, _ in converted), [v for _, v in converted]
    if typing.get_origin(option) is dict and isinstance(value, dict):
        return all(isinstance(k, str) for k in value), dict(value)
    return False, None


def _coerce(name: str, value: Any) -> Any:
    """Turn a YAML/CLI value into the field's declared type, or say what was expected."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if name == "report_to" and isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    if name == "report_to" and value is None:
        value = []
    for option in _union_members(hint):
        ok, converted = _as(option, value)
        if ok:
            return converted
    one = "; give one value (run once per value to compare several)" if isinstance(value, (list, dict)) else ""
    raise _invalid(name, f"{name} must be {_type_name(hint)}, got {shown(value)}{one}")


def _whole_number(value: Any) -> int | None:
    """``value`` as an int when it is a float or a numeric string with an integral value (``1e3``, ``"2.0e+2"``)."""
    if isinstance(value, bool) or not isinstance(value, (float, str)):
        return None
    try:
        number = decimal.Decimal(value.strip() if isinstance(value, str) else value)
    except (decimal.InvalidOperation, ValueError):
        return None
    # An exponent bound first: int(Decimal("1e999999999")) would build a billion-digit number.
    if not number.is_finite() or number.adjusted() > 18 or number != number.to_integral_value():
        return None
    return int(number)


def _type_name(hint: Any) -> str:
    """What a type hint accepts, in words: ``int | None`` → "a whole number or null"."""
    if hint is type(None):
        return "null"
    if hint is Any:
        return "any value"
    words = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
    if hint in words:
        return words[hint]
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return f"a list of {_type_name(item).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping of names to values"
    members = _union_members(hint)
    if len(members) > 1:
        return " or ".join(_type_name(m) for m in members)
    return str(hint).replace("typing.", "")


# Values echoed in error messages are cut to a few hundred characters: a 50 MB value makes no readable message.
_SHOWN = reprlib.Repr()
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict = 200, 200, 3, 8, 8


def shown(value: Any, quote: bool = True) -> str:
    """``repr(value)`` for an error message, at most a few hundred characters (long parts elided with ``...``);
    ``quote=False`` shows a string as it is (a path), cut the same way."""
    text = _SHOWN.repr(value) if quote or not isinstance(value, str) else value
    return text if len(text) <= 300 else text[:300] + "..."


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load``, except that a key given twice in one mapping is an error, not "the last one wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` then overriding a merged key is YAML's way to override
            key = self.construct_object(key_node, deep=True)
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key: SafeLoader refuses it below, with its own message
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {first + 1} and {key_node.start_mark.line + 1}); "
                    "YAML would keep the last value without a word: keep one", key_node.start_mark)
            lines[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_error(err: yaml.YAMLError, where: str, lines: bool) -> ConfigError:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    if mark is not None:
        where = f"{where}, line {mark.line + 1}, column {mark.column + 1}" if lines else where
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} at line {context_mark.line + 1})" if lines else f" ({context})"
    if isinstance(err, yaml.constructor.ConstructorError) and "given twice" in problem:
        return ConfigError(f"{where}: {problem}")
    return ConfigError(f"{where}: invalid YAML: {problem}; fix the syntax " + _QUOTES_HINT)


_QUOTES_HINT = "(a value holding ':', '#', '[' or '{' needs quotes)"

# Values a config may expand to, aliases counted each time they appear: far above any real config, far below a
# "billion laughs" document (nine aliases of nine aliases … expand to millions of values from a few lines).
_MAX_VALUES = 100_000


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """The number of values ``node`` constructs to, each alias counted in full (memoised per node: linear time);
    stops counting past :data:`_MAX_VALUES`."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = _MAX_VALUES + 1  # a node that contains itself expands without end
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    sizes[id(node)] = min(size, _MAX_VALUES + 1)
    return sizes[id(node)]


def _load_yaml(text: str, where: str, lines: bool = True) -> tuple[Any, dict[str, int]]:
    """The document in ``text`` and the 1-based line of each top-level key (``lines``: name lines in errors)."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > _MAX_VALUES:
            raise ConfigError(f"{where}: the YAML expands to more than {_MAX_VALUES:,} values (each *alias repeats "
                              "its anchor's value); a config holds a few dozen keys: remove the nested aliases")
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as err:
        raise _yaml_error(err, where, lines) from None
    except RecursionError:
        raise ConfigError(f"{where}: the YAML is nested too deeply to read; a config is a flat mapping of keys "
                          "(lr_scheduler_kwargs and the like hold one more level)") from None
    finally:
        loader.dispose()
    lines = {}
    if isinstance(node, yaml.MappingNode):
        lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    return data, lines


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {shown(text)} is not of the form key=value (e.g. beta=0.1)")
    key, raw = text.split("=", 1)
    value = _load_yaml(raw, f"override {shown(text)}", lines=False)[0] if raw.strip() else None
    return key.strip(), value


def build_config(values: dict[str, Any]) -> TrainConfig:
    """Validate a mapping of keys to values into a :class:`TrainConfig` (unknown keys suggest the closest)."""
    kwargs: dict[str, Any] = {}
    given: dict[str, str] = {}
    strategies: dict[str, Any] = {}
    for key, value in values.items():
        name = ALIASES.get(key, key)
        if name not in FIELDS and key in TRL_KEYS:
            trl = TRL_KEYS[key]
            if trl.accepts is not None and trl.accepts(value):
                strategies[key] = value  # says what preftune does anyway (strategies imply some defaults)
                continue
            what = f"with value {shown(value)} has" if trl.accepts else "has"
            what += " no preftune equivalent"
            raise _invalid(key, f"config key '{key}' (TRL / transformers) {what}: {trl.advice}")
        if key == "loss_type":
            value = from_trl_loss_type(value)
        if name not in FIELDS:
            close = difflib.get_close_matches(str(key), [*FIELDS, *ALIASES], n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise _invalid(key, f"unknown config key {shown(key)}.{hint} (`preftune config` lists every key)")
        if name in given:
            alias = key if key in ALIASES else given[name]
            raise _invalid((given[name], key), f"both '{given[name]}' and '{key}' are given; '{alias}' is another "
                           f"name for '{name}': give one")
        given[name] = key
        kwargs[name] = _coerce(name, value)
    _apply_strategies(strategies, kwargs, given)
    return TrainConfig(**kwargs).validate()


def _apply_strategies(strategies: dict[str, Any], kwargs: dict[str, Any], given: dict[str, str]) -> None:
    """What transformers' strategy keys imply when their numbers are not given: ``eval_strategy: steps`` evaluates
    every ``logging_steps`` steps, on ``dataset_test_split`` of the training dataset (TRL's scripts); ``save_strategy:
    steps`` saves every 500 steps; ``save_strategy: no`` saves no checkpoint."""
    evaluation = strategies.get("eval_strategy", strategies.get("evaluation_strategy"))
    if evaluation == "steps":
        kwargs.setdefault("eval_steps", kwargs.get("logging_steps", FIELDS["logging_steps"].default))
        if given.get("eval_split") == "dataset_test_split" and kwargs.get("eval_dataset") is None:
            kwargs["eval_dataset"] = kwargs.get("dataset")
    if evaluation == "no" and (kwargs.get("eval_dataset") or kwargs.get("eval_split_size")):
        key = given.get("eval_dataset") or given.get("eval_split_size")
        raise _invalid(key, f"eval_strategy: no, but {key} is given: preftune evaluates whenever there is evaluation "
                       "data; remove one of them")
    saving = strategies.get("save_strategy")
    if saving == "steps":
        kwargs.setdefault("save_steps", 500)
    if saving == "no" and kwargs.get("save_steps") is not None:
        raise _invalid(given["save_steps"], "save_strategy: no, but save_steps is given; remove one of them")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML file (optional), apply ``key=value`` overrides, validate.

    An error about a value read from the file names the file and the key's line: ``run.yaml, line 4: …``."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a folder, not a YAML file" if path.is_dir() else "does not exist"
            raise ConfigError(f"config file {path} {what}; give the path of a YAML file of config keys "
                              "(`preftune config` lists them)")
        loaded, lines = _load_yaml(_read_text(path), str(path))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys (key: value per line), "
                              f"got {type(loaded).__name__}")
        values.update(loaded)
        origins = {key: f"{path}, line {line}" for key, line in lines.items()}
    for text in overrides:
        key, value = _parse_override(text)
        for other in _spellings(key):  # an override replaces the file's value, under either spelling
            values.pop(other, None)
            origins.pop(other, None)
        values[key] = value
    try:
        return build_config(values)
    except ConfigError as err:
        keys = getattr(err, "config_keys", ())
        spelled = {spelling: origin for key, origin in origins.items() for spelling in _spellings(key)}
        where = list(dict.fromkeys(spelled[k] for k in keys if k in spelled))
        if not where:
            raise
        located = _invalid(keys, f"{'; '.join(where)}: {err}")
        raise located from None


def _spellings(key: str) -> set[str]:
    """A key and its alias: ``{"loss_type", "method"}``."""
    name = ALIASES.get(key, key)
    return {name, *(alias for alias, target in ALIASES.items() if target == name)}


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file "
                          "as UTF-8") from None


__all__ = ["TrainConfig", "ConfigError", "build_config", "load_config", "METHODS"]
