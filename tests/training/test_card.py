"""The model card in final/: the Hub's format (YAML metadata, then sections), written inside the atomic export, for
full models and LoRA adapters alike, saying how the model was made."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from preftune.config import build_config
from preftune.data.builtin import builtin_preferences
from preftune.methods.registry import METHODS, PAPERS
from preftune.modeling import loading
from preftune.modeling.logprobs import LogProbModel
from preftune.modeling.tiny import build_tiny_model, default_tokenizer
from preftune.training import checkpoint
from preftune.training.card import hub_base_model, papers_of, render_card
from preftune.training.loop import effective_config, make_accelerator

ROWS = builtin_preferences(16, seed=2)

SUMMARY = {
    "global_step": 7, "train": {"step": 7, "loss": 0.5123456, "rewards/accuracies": 0.75, "grad_norm": 1.5},
    "eval": {"step": 7, "eval_loss": 0.61, "eval_rewards/margins": 0.2},
    "data": {"train/rows": "prefs.jsonl: kept 30 of 32 rows (standard, text); skipped 2: empty chosen",
             "train/tokens": "tokenized 29 of 30 rows; dropped 1: prompt leaves no room for a completion"},
    "reference": "precomputed", "parameters": [1000, 5000], "layout": "prefix sharing", "processes": 2,
}


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(ROWS)


def front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, "a model card starts with YAML metadata between --- lines"
    return yaml.safe_load(match.group(1))


def export(tmp_path, tok, cfg, model, summary=SUMMARY):
    accelerator = make_accelerator(cfg, bf16=bool(cfg.bf16))
    policy = LogProbModel(model, cfg.logprob_chunk_size)
    return checkpoint.export_final(accelerator, policy, tok, tmp_path / "run", cfg.save_merged_model,
                                   config=effective_config(cfg), summary=summary)


def test_full_model_card_records_how_the_model_was_made(tmp_path, tok):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = build_config({"method": ["dpo", "sft"], "loss_weights": [1.0, 0.5], "dataset": str(data),
                        "learning_rate": 5e-6, "bf16": False, "output_dir": str(tmp_path / "run")})
    final = export(tmp_path, tok, cfg, build_tiny_model(tok, seed=0))
    text = (final / "README.md").read_text()
    meta = front_matter(text)
    assert meta["library_name"] == "transformers"
    assert {"preftune", "dpo", "sft"} <= set(meta["tags"])
    assert meta["datasets"] == ["prefs.jsonl"]
    assert "base_model" not in meta  # the embedded model is no Hub repository
    # Resolved hyper-parameters: beta was left unset and is recorded at DPO's default, 0.1.
    assert "| `beta` | 0.1 |" in text and "| `learning_rate` | 5e-06 |" in text
    assert "| `global batch (examples per step)` | 16 |" in text  # 8 per device × 2 processes × 1
    # Data: rows kept and dropped, as the run reported them.
    assert "kept 30 of 32 rows" in text and "dropped 1: prompt leaves no room" in text
    # Metrics, final and evaluation.
    assert "| `loss` | 0.5123 |" in text and "| `eval_loss` | 0.61 |" in text
    for package in ("preftune", "torch", "transformers", "accelerate", "peft", "datasets"):
        assert f"- {package}: " in text
    assert f"- torch: {torch.__version__}" in text
    # DPO's paper, as BibTeX with its arXiv id.
    assert "eprint = {2305.18290}" in text and "archivePrefix = {arXiv}" in text
    assert not (final.parent / "final.tmp").exists()


def test_lora_adapter_card_replaces_pefts_template(tmp_path, tok):
    cfg = build_config({"use_peft": True, "lora_r": 4, "bf16": False, "output_dir": str(tmp_path / "run"),
                        "model_name_or_path": "my-org/my-sft-model"})
    model = loading.add_lora(build_tiny_model(tok, seed=0), cfg)
    final = export(tmp_path, tok, cfg, model)
    text = (final / "README.md").read_text()
    assert "[More Information Needed]" not in text  # PEFT's template is gone
    meta = front_matter(text)
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == "my-org/my-sft-model"
    assert "lora" in meta["tags"]
    assert "AutoPeftModelForCausalLM" in text and "| `lora_r` | 4 |" in text
    assert "eprint = {2106.09685}" in text  # LoRA is cited when the run used it
    assert (final / "adapter_config.json").exists()


def test_merged_export_gets_its_own_card(tmp_path, tok):
    cfg = build_config({"use_peft": True, "save_merged_model": True, "bf16": False,
                        "output_dir": str(tmp_path / "run")})
    final = export(tmp_path, tok, cfg, loading.add_lora(build_tiny_model(tok, seed=0), cfg))
    merged = front_matter((final.parent / "final-merged" / "README.md").read_text())
    assert merged["library_name"] == "transformers" and front_matter((final / "README.md").read_text())[
        "library_name"] == "peft"


def test_no_card_without_the_runs_record(tmp_path, tok):
    """Called as before (no config, no summary), export_final writes the model alone."""
    cfg = build_config({"bf16": False, "output_dir": str(tmp_path / "run")})
    accelerator = make_accelerator(cfg, bf16=bool(cfg.bf16))
    final = checkpoint.export_final(accelerator, LogProbModel(build_tiny_model(tok, seed=0), 256), tok,
                                    tmp_path / "run", False)
    assert not (final / "README.md").exists()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_card_cites_its_papers(name):
    method = METHODS[name]
    cfg = build_config({"method": name})
    text = render_card(effective_config(cfg), {"global_step": 1}, adapter=False)
    for arxiv in method.papers:
        assert f"eprint = {{{arxiv}}}" in text and PAPERS[arxiv].title in text
    assert front_matter(text)["pipeline_tag"] == ("text-classification" if method.model == "reward"
                                                  else "text-generation")


def test_cited_options_follow_the_config():
    cfg = build_config({"use_weighting": True, "ld_alpha": 0.5, "sync_ref_model": True,
                        "precompute_ref_log_probs": False})
    assert papers_of(effective_config(cfg)) == ["2305.18290", "2409.06411", "2406.11827", "2404.09656"]


def test_base_model_is_a_hub_id_only_when_no_local_folder_has_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_base_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    (tmp_path / "models" / "sft").mkdir(parents=True)
    assert hub_base_model("models/sft") is None
    assert hub_base_model("./my-model") is None
    assert hub_base_model(None) is None


def test_a_local_base_models_license_is_carried(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    cfg = build_config({"model_name_or_path": str(base)})
    assert front_matter(render_card(effective_config(cfg), {}, adapter=False))["license"] == "apache-2.0"


def test_a_training_run_writes_its_card_in_final(tmp_path, tok):
    """The one loop passes its resolved config and summary to the export: a trained final/ has its card."""
    from preftune import train

    result = train(dict(method="ipo", beta=0.5, output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                        max_steps=2, per_device_train_batch_size=4, disable_tqdm=True, bf16=False, logging_steps=1),
                   model=build_tiny_model(tok, seed=0), tokenizer=tok, train_dataset=ROWS)
    text = (result.final_dir / "README.md").read_text()
    summary = json.loads((result.final_dir.parent / "summary.json").read_text())
    assert "ipo" in front_matter(text)["tags"]
    assert "| `beta` | 0.5 |" in text
    assert f"| `loss` | {summary['train']['loss']:.4g} |" in text
    assert summary["final_dir"] == str(result.final_dir)


def test_a_preftune_train_card_holds_no_local_path_the_epochs_run_and_the_full_repository(tmp_path, tok, monkeypatch):
    """`preftune train` with a local base model, data, cache and output folder: the card names none of their paths
    (nor the home folder); max_steps drove the run, so the epochs shown are those run, not num_train_epochs; a
    hub_model_id without a namespace loads as "<namespace>/name" until the upload resolves it to the token user's."""
    from pathlib import Path

    from huggingface_hub import CommitInfo, HfApi, RepoUrl, constants

    from preftune import cli
    from preftune.training import hub

    base, data = tmp_path / "models" / "base", tmp_path / "data" / "prefs.jsonl"
    build_tiny_model(tok, seed=0).save_pretrained(base)
    tok.save_pretrained(base)
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:8]))
    run = tmp_path / "run"
    # 8 rows, 4 per step: 2 steps an epoch, so max_steps=4 runs 2 epochs (num_train_epochs stays at its 1).
    assert cli.main(["train", f"model_name_or_path={base}", f"dataset={data}", f"cache_dir={tmp_path / 'cache'}",
                     f"output_dir={run}", "max_steps=4", "per_device_train_batch_size=4", "hub_model_id=my-dpo",
                     "disable_tqdm=true", "bf16=false", "max_length=64", "max_prompt_length=32"]) == 0
    text = (run / "final" / "README.md").read_text()
    for private in {str(tmp_path), str(tmp_path.resolve()), str(Path.home())}:
        assert private not in text
    assert "This model is a fine-tuned version of `base`" in text
    assert "- training data: `prefs.jsonl` (all its rows)" in text and "- train/rows: prefs.jsonl: kept 8 of 8" in text
    assert json.loads((run / "summary.json").read_text())["train"]["epoch"] == 2
    assert "| `epochs run (max_steps decides)` | 2 |" in text and "| `max_steps` | 4 |" in text
    assert "`num_train_epochs`" not in text
    assert 'AutoModelForCausalLM.from_pretrained("<namespace>/my-dpo")' in text
    assert "`hub_model_id` is `my-dpo`, without a namespace" in text

    # The upload resolves the namespace (the Hub answers the repository's URL): the card published names it.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    sent = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/me/{repo_id}"))

    def upload_folder(self, **kwargs):
        sent["card"] = (Path(kwargs["folder_path"]) / "README.md").read_text()
        return CommitInfo(commit_url="https://huggingface.co/me/my-dpo/commit/abc", commit_message="",
                          commit_description="", oid="abc")

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    hub.push_final(build_config({"push_to_hub": True, "hub_model_id": "my-dpo"}), run / "final")
    assert 'AutoModelForCausalLM.from_pretrained("me/my-dpo")' in sent["card"]
    assert "<namespace>" not in sent["card"] and "without a namespace" not in sent["card"]
