"""TRL's and transformers' names in a preftune config: aliases of preftune's keys, and the keys preftune has no field
for (what to do instead, or the values accepted because they describe what preftune does anyway)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


def from_trl_loss_type(value: Any) -> Any:
    """TRL's ``loss_type`` (one name or a list) as preftune method names: ``sigmoid`` → ``dpo``."""
    if isinstance(value, str):
        return TRL_LOSS_TYPES.get(value, value)
    if isinstance(value, list):
        return [TRL_LOSS_TYPES.get(v, v) if isinstance(v, str) else v for v in value]
    return value

