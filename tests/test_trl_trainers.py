"""A TRL user's script runs with its import line changed: DPOTrainer / GRPOTrainer / … take TRL's arguments
(args=DPOConfig(...), processing_class, peft_config, reward_funcs, callbacks), log TRL's metric names, and call
transformers' TrainerCallbacks with the args, state and control they expect. What preftune cannot honour is refused
with what to write instead."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainerCallback, TrainerControl

from preftune import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, KTOConfig, RLOOConfig, train
from preftune.config import build_config
from preftune.data.builtin import builtin_preferences
from preftune.errors import ConfigError
from preftune.modeling.tiny import build_tiny_model, default_model, default_tokenizer
from preftune.trl import reward_judge

ROOT = Path(__file__).resolve().parents[1]
ROWS = builtin_preferences(24, seed=7)

# TRL's quick-start scripts (TRL docs, "Quickstart" of DPOTrainer and GRPOTrainer), verbatim.
DPO_QUICKSTART = '''\
from datasets import load_dataset
from trl import DPOConfig, DPOTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2-0.5B-Instruct")
tokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen2-0.5B-Instruct")
train_dataset = load_dataset("trl-lib/ultrafeedback_binarized", split="train")
training_args = DPOConfig(output_dir="Qwen2-0.5B-DPO")
trainer = DPOTrainer(model=model, args=training_args, processing_class=tokenizer, train_dataset=train_dataset)
trainer.train()
'''
GRPO_QUICKSTART = '''\
from datasets import load_dataset
from trl import GRPOConfig, GRPOTrainer
dataset = load_dataset("trl-lib/tldr", split="train")
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]
training_args = GRPOConfig(output_dir="Qwen2-0.5B-GRPO")
trainer = GRPOTrainer(model="Qwen/Qwen2-0.5B-Instruct", reward_funcs=reward_len, args=training_args,
                      train_dataset=dataset)
trainer.train()
'''


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(ROWS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    """The embedded tiny Llama saved as a checkpoint: the stand-in for Qwen/Qwen2-0.5B-Instruct."""
    path = tmp_path_factory.mktemp("model") / "tiny-llama"
    default_model(tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_script(script: str, folder: Path) -> None:
    (folder / "script.py").write_text(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PREFTUNE_CACHE": str(folder / "cache"),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "script.py"], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def localised(script: str, model_dir: Path, data: Path, hub_dataset: str, config: str, short: str) -> str:
    """The script with ``from trl import`` → ``from preftune import``, and the places changed so that nothing is
    downloaded: the Hub model id → the tiny model's folder, the Hub dataset → local JSON lines through
    ``load_dataset("json", data_files=..., split="train")``; ``short`` (max_steps …) is added to the config object.
    Those substitutions are the only other changes."""
    changed = (script.replace("from trl import", "from preftune import")
               .replace('"Qwen/Qwen2-0.5B-Instruct"', repr(str(model_dir)))
               .replace(f'load_dataset("{hub_dataset}", split="train")',
                        f'load_dataset("json", data_files={str(data)!r}, split="train")')
               .replace(config, config[:-1] + ", " + short + ")"))
    assert changed.count("preftune") == 1 and "Qwen/" not in changed and hub_dataset not in changed
    return changed


# ---- TRL's quick-start scripts ----------------------------------------------------------------------------------


def test_trls_dpo_quickstart_runs_with_the_import_changed(tmp_path, model_dir):
    # Rows shaped as trl-lib/ultrafeedback_binarized's: conversations sharing the user turn (an implicit prompt).
    data = tmp_path / "ultrafeedback.jsonl"
    data.write_text("".join(json.dumps({
        "chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}],
        "score_chosen": 8.0, "score_rejected": 4.0}) + "\n" for r in ROWS))
    run_script(localised(DPO_QUICKSTART, model_dir, data, "trl-lib/ultrafeedback_binarized",
                         'DPOConfig(output_dir="Qwen2-0.5B-DPO")', "max_steps=2, logging_steps=1"), tmp_path)
    logged = records(tmp_path / "Qwen2-0.5B-DPO")
    assert [r["step"] for r in logged if "loss" in r] == [1, 2]
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-2)  # π = π_ref at the first step (bf16 or not)
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected", "learning_rate", "grad_norm",
            "epoch"} <= set(logged[0])
    assert (tmp_path / "Qwen2-0.5B-DPO" / "final" / "model.safetensors").exists()


def test_trls_grpo_quickstart_runs_with_the_import_changed(tmp_path, model_dir):
    data = tmp_path / "tldr.jsonl"  # rows shaped as trl-lib/tldr's: a prompt and a reference completion
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in ROWS))
    run_script(localised(GRPO_QUICKSTART, model_dir, data, "trl-lib/tldr", 'GRPOConfig(output_dir="Qwen2-0.5B-GRPO")',
                         "max_steps=2, logging_steps=1, max_completion_length=8"), tmp_path)
    logged = records(tmp_path / "Qwen2-0.5B-GRPO")
    assert [r["step"] for r in logged if "loss" in r] == [1, 2]
    # TRL's GRPO names (kl is logged when beta > 0; TRL's default, and preftune's, is beta = 0).
    assert {"loss", "reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
            "completions/clipped_ratio", "learning_rate", "grad_norm"} <= set(logged[0])
    assert all(r["reward"] <= 0 for r in logged if "reward" in r)  # reward_len scored them: −|20 − characters|
    config = (tmp_path / "Qwen2-0.5B-GRPO" / "config.yaml").read_text()
    assert "method: grpo" in config and "per_device_train_batch_size: 1" in config  # 8 completions = 1 prompt × 8


# ---- config objects --------------------------------------------------------------------------------------------


def test_trl_config_objects_map_trl_names_as_yaml_does():
    values = {"loss_type": "ipo", "torch_dtype": "bfloat16", "max_seq_length": 2048, "beta": 0.2,
              "eval_strategy": "no", "output_dir": "out"}
    assert DPOConfig(**values).__dict__ == build_config(values).__dict__
    assert DPOConfig("out").output_dir == "out" and DPOConfig().method == "dpo" and KTOConfig().method == "kto"
    grpo = GRPOConfig(loss_type="dr_grpo", num_generations=4, per_device_train_batch_size=8, reward_weights=[1, 2])
    assert (grpo.method, grpo.grpo_loss_type, grpo.per_device_train_batch_size, grpo.reward_weights) == (
        "grpo", "dr_grpo", 2, [1.0, 2.0])
    assert RLOOConfig(num_generations=2).per_device_train_batch_size == 4
    # TRL's generation batch counts completions too: 64 completions of groups of 8 are 8 prompts
    tuned = GRPOConfig(num_generations=8, per_device_train_batch_size=16, generation_batch_size=64, num_iterations=2)
    assert (tuned.per_device_train_batch_size, tuned.generation_batch_size, tuned.num_iterations) == (2, 8, 2)


@pytest.mark.parametrize("make, advice", [
    (lambda: GRPOConfig(use_vllm=True), "GRPOConfig: config key 'use_vllm' .* with value True has no preftune "
                                        "equivalent: online methods sample with the policy itself .*set it false"),
    (lambda: GRPOConfig(vllm_mode="colocate"), "sample with the policy itself, without vLLM"),
    (lambda: DPOConfig(fsdp="full_shard auto_wrap"), "accelerate launch --config_file examples/accelerate/fsdp.yaml"),
    (lambda: DPOConfig(deepspeed="ds_config.json"), "examples/accelerate/deepspeed_zero3.yaml"),
    (lambda: GRPOConfig(per_device_train_batch_size=4), "per_device_train_batch_size=4 counts completions .* give a "
                                                        "multiple of num_generations"),
    (lambda: GRPOConfig(generation_batch_size=12), "generation_batch_size=12 counts completions"),
    (lambda: GRPOConfig(loss_type="bnpo"), "loss_type='bnpo' is not implemented"),
    (lambda: GRPOConfig(top_entropy_quantile=0.2), "every completion token is trained on"),
    (lambda: DPOConfig(lerning_rate=1e-6), "Did you mean 'learning_rate'"),
])
def test_fields_preftune_cannot_honour_say_what_to_write(make, advice):
    with pytest.raises(ConfigError, match=advice):
        make()


# ---- trainer arguments ----------------------------------------------------------------------------------------


def test_peft_config_and_processing_class_map_onto_the_trainer(tok):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainer = DPOTrainer(model=build_tiny_model(tok, seed=0), args=DPOConfig(output_dir="out"), processing_class=tok,
                         train_dataset=ROWS, peft_config=lora)
    assert (trainer.cfg.use_peft, trainer.cfg.lora_r, trainer.cfg.lora_alpha, trainer.cfg.lora_dropout,
            trainer.cfg.lora_target_modules) == (True, 4, 8, 0.0, ["q_proj", "v_proj"])
    assert trainer.given["tokenizer"] is tok and trainer.args.output_dir == "out"
    with pytest.raises(ConfigError, match="DPOTrainer: peft_config: .*'use_dora'.*plain LoRA"):
        DPOTrainer(model=build_tiny_model(tok, seed=0), processing_class=tok, peft_config=LoraConfig(use_dora=True))


@pytest.mark.parametrize("kwargs, message", [
    ({"data_collator": lambda rows: rows}, "DPOTrainer: data_collator= has no preftune equivalent: preftune builds"),
    ({"compute_metrics": lambda p: {}}, "compute_metrics= has no preftune equivalent"),
    ({"optimizers": ("adam", None)}, "optimizers= has no preftune equivalent: set optim"),
    ({"args": GRPOConfig()}, "DPOTrainer: args is a GRPOConfig; give a DPOConfig"),
    ({"tokenizer": "x"}, "DPOTrainer: unexpected argument 'tokenizer'"),
])
def test_trainer_arguments_preftune_has_no_use_for_are_refused(tok, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DPOTrainer(model=build_tiny_model(tok, seed=0), processing_class=tok, **kwargs)


def test_a_model_without_tokenizer_or_name_asks_for_processing_class(tok):
    model = build_tiny_model(tok, seed=0)
    model.name_or_path = ""
    with pytest.raises(ConfigError, match="pass processing_class=tokenizer"):
        DPOTrainer(model=model, train_dataset=ROWS)


def test_reward_funcs_are_summed_with_trls_reward_weights():
    def length(completions, **kwargs):
        return [float(len(c)) for c in completions]

    def exclaims(prompts, completions, **kwargs):
        return [None if c.endswith("?") else float(c.count("!")) for c in completions]

    judge = reward_judge([length, exclaims], [0.5, 2.0])
    assert judge(["p", "p", "p"], ["ab!", "a!!!", "why?"]) == [0.5 * 3 + 2 * 1, 0.5 * 4 + 2 * 3, 0.5 * 4]
    with pytest.raises(ConfigError, match="reward_weights has 1 weights for 2 reward functions"):
        reward_judge([length, exclaims], [1.0])
    with pytest.raises(ConfigError, match="reward function needs_answer: missing a required argument: 'answer'; "
                                          "preftune calls it with prompts= and completions= only"):
        reward_judge(needs_answer, None)
    with pytest.raises(ConfigError, match="GRPOTrainer: give reward_funcs"):
        GRPOTrainer(model="folder", reward_funcs=[])


def needs_answer(completions, answer, **kwargs):
    return [float(c == a) for c, a in zip(completions, answer)]


def test_each_trainer_trains_its_method_with_trls_arguments(tok, tmp_path):
    from preftune import KTOTrainer, RewardTrainer, RLOOTrainer

    model = build_tiny_model(tok, seed=0)
    assert KTOTrainer(model=model, processing_class=tok).cfg.method == "kto"
    assert RewardTrainer(model=model, processing_class=tok).cfg.method == "reward"
    rloo = RLOOTrainer(model=model, processing_class=tok, reward_funcs=len_reward,
                       args=RLOOConfig(num_generations=4, per_device_train_batch_size=8))
    assert (rloo.cfg.method, rloo.cfg.num_generations, rloo.cfg.per_device_train_batch_size) == ("rloo", 4, 2)
    assert rloo.judge(["p", "p"], ["ab", "abcd"]) == [2.0, 4.0]
    grpo = GRPOTrainer(model=model, processing_class=tok, reward_funcs=str(tmp_path / "reward-model"))
    assert grpo.cfg.judge == str(tmp_path / "reward-model") and grpo.judge is None
    with pytest.raises(ConfigError, match="reward_funcs holds a model object; save it"):
        GRPOTrainer(model=model, processing_class=tok, reward_funcs=[len_reward, model])


def len_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


# ---- transformers' TrainerCallback ------------------------------------------------------------------------------


class Recorder(TrainerCallback):
    """Records each event with what the Trainer would pass; stops the run at ``stop_at``."""

    def __init__(self, stop_at: int | tuple | None = None):
        self.events: list[tuple] = []
        self.stop_at = stop_at

    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append(("train_begin", state.global_step, state.max_steps, args.output_dir,
                            kwargs["model"] is not None))

    def on_step_end(self, args, state, control, **kwargs):
        assert isinstance(control, TrainerControl) and kwargs["model"] is not None
        self.events.append(("step_end", state.global_step))
        if state.global_step == self.stop_at:
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.events.append(("log", state.global_step, "loss" in logs, len(state.log_history), state.epoch > 0))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.events.append(("evaluate", "eval_loss" in metrics))
        if self.stop_at == ("evaluate", state.global_step):  # as transformers' EarlyStoppingCallback stops
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.events.append(("train_end", state.global_step))


def test_a_trainer_callback_hears_args_state_and_control(tmp_path, tok):
    recorder = Recorder()
    train({"max_steps": 2, "logging_steps": 1, "eval_split_size": 0.25, "per_device_train_batch_size": 4,
           "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), "disable_tqdm": True,
           "bf16": False}, model=build_tiny_model(tok, seed=0), tokenizer=tok, train_dataset=ROWS,
          callbacks=[recorder])
    assert recorder.events == [("train_begin", 0, 2, str(tmp_path / "run"), True),
                               ("step_end", 1), ("log", 1, True, 1, True),
                               ("step_end", 2), ("log", 2, True, 2, True),
                               ("log", 2, False, 3, True), ("evaluate", True),  # the evaluation at the end
                               ("train_end", 2)]


def test_control_should_training_stop_ends_the_run_after_that_step(tmp_path, tok):
    trainer = DPOTrainer(model=build_tiny_model(tok, seed=0), processing_class=tok, train_dataset=ROWS,
                         args=DPOConfig(output_dir=str(tmp_path / "run"), max_steps=5, logging_steps=3,
                                        per_device_train_batch_size=4, cache_dir=str(tmp_path / "cache"),
                                        disable_tqdm=True, bf16=False),
                         callbacks=[Recorder(stop_at=2)])
    result = trainer.train()
    assert result.global_step == 2 and [r["step"] for r in records(result.output_dir)] == [2]  # the last step logs
    assert (result.final_dir / "model.safetensors").exists()


def test_should_training_stop_set_in_on_evaluate_ends_the_run_at_that_step(tmp_path, tok):
    recorder = Recorder(stop_at=("evaluate", 2))
    result = train({"max_steps": 6, "logging_steps": 1, "eval_steps": 1, "eval_split_size": 0.25,
                    "per_device_train_batch_size": 4, "output_dir": str(tmp_path / "run"),
                    "cache_dir": str(tmp_path / "cache"), "disable_tqdm": True, "bf16": False},
                   model=build_tiny_model(tok, seed=0), tokenizer=tok, train_dataset=ROWS, callbacks=[recorder])
    assert result.global_step == 2 and recorder.events[-1] == ("train_end", 2)
    assert [e[1] for e in recorder.events if e[0] == "step_end"] == [1, 2]
