"""The model card of ``final/``: the Hugging Face Hub's ``README.md`` (YAML metadata, then Markdown sections).

It is a rendering of the run's record — the resolved config (every loss hyper-parameter at the value used) and
the summary the loop writes to ``summary.json`` — so a model found on the Hub says how it was made: base model,
method(s) and hyper-parameters, data (rows kept and dropped), final and evaluation metrics, software versions and
the papers to cite. :func:`render_card` is pure (dicts in, text out); ``checkpoint.export_final`` writes it into
the folder it is about to publish, replacing PEFT's template card under LoRA.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any

import yaml

from preftune.methods.registry import PAPERS, get_method

CARD_FILE = "README.md"
SOFTWARE = ("preftune", "torch", "transformers", "accelerate", "peft", "datasets")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "org/name": the form the Hub's base_model field links

# Config keys shown under "Hyper-parameters", by group; a group is shown when its condition holds.
_TRAINING_KEYS = ("learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "num_train_epochs",
                  "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "max_tokens_per_batch",
                  "optim", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "bf16",
                  "fp16", "dtype", "gradient_checkpointing", "seed")
_DATA_KEYS = ("max_length", "max_prompt_length", "max_completion_length", "padding_free", "prefix_sharing")
_REFERENCE_KEYS = ("ref_model_name_or_path", "precompute_ref_log_probs", "sync_ref_model", "ref_model_mixup_alpha",
                   "ref_model_sync_steps")
_LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
_QUANTIZATION_KEYS = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "use_bnb_nested_quant")

_BITSANDBYTES_OPTIMIZERS = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit")


def software_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed version of each package that made the model (``"not installed"`` when absent)."""
    versions = {}
    for name in (*SOFTWARE, *extra):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def hub_base_model(path: str | None) -> str | None:
    """``path`` when it names a Hub repository ("org/name") rather than a local folder, else None."""
    if not path or Path(path).expanduser().exists():
        return None
    return path if _HUB_ID.match(path) else None


# An absolute path (or one from the home folder) in free text: a slash not inside a word, a URL or a unit (tokens/s).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/:<>-])~?/[^\s:;,'\"`()\[\]<>|]+")
_PATH_KEYS = ("dataset", "eval_dataset", "model_name_or_path", "ref_model_name_or_path", "cache_dir", "output_dir",
              "judge", "value_model", "chat_template")


def public_text(text: str, config: dict[str, Any]) -> str:
    """``text`` with nothing of the local file system: each local path the config names (data, models, cache and
    output folders), and any other absolute path, shown by its last component (``/home/me/data/prefs.jsonl`` →
    ``prefs.jsonl``). Hub ids ("org/name") are kept."""
    for path in sorted(_local_paths(config), key=len, reverse=True):
        text = text.replace(path, Path(path).name or path)
    return _ABSOLUTE_PATH.sub(lambda m: Path(m.group(0).rstrip("/")).name or m.group(0), text)


def _local_paths(config: dict[str, Any]) -> set[str]:
    """The config's path values that are on this machine, as given and as resolved (``~`` and ``..`` spelled out)."""
    paths = set()
    for key in _PATH_KEYS:
        value = config.get(key)
        if not isinstance(value, str) or not value or "\n" in value:
            continue
        local = Path(value).expanduser()
        if local.exists() or local.is_absolute() or value.startswith(("~", ".")):
            paths |= {value.rstrip("/"), str(local), str(local.resolve())}
    return {p for p in paths if p not in ("", ".", "/")}


def _local_license(path: str | None) -> str | None:
    """The ``license`` of a local base model's own card (its README.md metadata), when it has one."""
    if not path:
        return None
    card = Path(path).expanduser() / CARD_FILE
    if not card.is_file():
        return None
    match = re.match(r"^---\n(.*?)\n---", card.read_text(encoding="utf-8", errors="replace"), re.S)
    try:
        meta = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def dataset_name(config: dict[str, Any]) -> str | None:
    """The training data as the Hub's ``datasets`` field takes it: a Hub name as given, a file by its name; None for
    the built-in pairs or data passed in memory."""
    dataset = config.get("dataset")
    if not dataset:
        return None
    local = Path(dataset).expanduser()
    return local.name if local.exists() else dataset


def papers_of(config: dict[str, Any]) -> list[str]:
    """arXiv ids to cite: each method's papers, then those of the options the run used (LoRA, QLoRA, 8-bit
    optimizer states, LD-DPO, WPO, TR-DPO), without repeats."""
    ids = [p for m in _methods(config) for p in get_method(m).papers]
    options = {"2106.09685": config.get("use_peft"), "2305.14314": config.get("load_in_4bit"),
               "2110.02861": config.get("optim") in _BITSANDBYTES_OPTIMIZERS,
               "2409.06411": config.get("ld_alpha") is not None, "2406.11827": config.get("use_weighting"),
               "2404.09656": config.get("sync_ref_model")}
    ids += [arxiv for arxiv, used in options.items() if used]
    return list(dict.fromkeys(ids))


def _methods(config: dict[str, Any]) -> list[str]:
    method = config.get("method") or []
    return [method] if isinstance(method, str) else list(method)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value) or "[]"
    return "null" if value is None else str(value)


def _table(rows: list[tuple[str, Any]], header: tuple[str, str]) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| `{key}` | {_format(value)} |" for key, value in rows]
    return lines


def metadata(config: dict[str, Any], adapter: bool) -> dict[str, Any]:
    """The card's YAML front matter (the Hub's model-card metadata)."""
    reward = any(get_method(m).model == "reward" for m in _methods(config))
    tags = ["preftune", *_methods(config)]
    if adapter:
        tags.append("lora")
    if config.get("load_in_4bit") or config.get("load_in_8bit"):
        tags += ["qlora", "4-bit" if config.get("load_in_4bit") else "8-bit", "bitsandbytes"]
    meta: dict[str, Any] = {"library_name": "peft" if adapter else "transformers"}
    base = hub_base_model(config.get("model_name_or_path"))
    if base:
        meta["base_model"] = base
    meta["tags"] = list(dict.fromkeys(tags))
    data = dataset_name(config)
    if data:
        meta["datasets"] = [data]
    license_ = _local_license(config.get("model_name_or_path"))
    if license_:
        meta["license"] = license_
    meta["pipeline_tag"] = "text-classification" if reward else "text-generation"
    return meta


def render_card(config: dict[str, Any], summary: dict[str, Any], adapter: bool, merged: bool = False) -> str:
    """The model card of a run's export.

    ``config``: the resolved config (``training.loop.effective_config``: each loss hyper-parameter of the run's
    methods at the value used). ``summary``: what the loop writes to ``summary.json`` (``global_step``, ``train``
    and ``eval`` metrics, ``data`` reports, ``reference``, ``parameters``, ``layout``, and ``processes`` when
    given). ``adapter``: the folder holds a PEFT adapter; ``merged``: adapters merged into the base weights."""
    methods = _methods(config)
    base = public_text(config.get("model_name_or_path") or "", config) or \
        "the embedded tiny Llama (random weights; preftune.modeling.tiny)"
    name = config.get("hub_model_id") or Path(str(config.get("output_dir", "model"))).name
    front = yaml.safe_dump(metadata(config, adapter and not merged), sort_keys=False, allow_unicode=True)
    what = ("a LoRA adapter (PEFT) for" if adapter and not merged
            else "LoRA adapters merged into" if merged else "a fine-tuned version of")
    lines = ["---", front.rstrip(), "---", "", f"# {name}", "",
             f"This model is {what} `{base}`, trained with {' + '.join(f'`{m}`' for m in methods)} by "
             f"[preftune](https://pypi.org/project/preftune/) for {summary.get('global_step', '?')} optimizer steps.",
             ""]
    if config.get("load_in_4bit") or config.get("load_in_8bit"):
        bits = "4-bit " + config.get("bnb_4bit_quant_type", "nf4") if config.get("load_in_4bit") else "8-bit"
        lines += [f"The base model was loaded in {bits} (bitsandbytes) while the adapters trained (QLoRA); load the "
                  "base in 16 or 32 bits to use the adapter, or quantized in the same way.", ""]
    lines += _loading_section(config, adapter and not merged)
    lines += _methods_section(config, methods)
    lines += [public_text(line, config) for line in _hyperparameters_section(config, summary, adapter)]
    lines += [public_text(line, config) for line in _data_section(config, summary)]
    lines += _results_section(summary)
    lines += ["## Software", ""]
    extra = ("bitsandbytes",) if config.get("load_in_4bit") or config.get("load_in_8bit") or \
        config.get("optim") in _BITSANDBYTES_OPTIMIZERS else ()
    lines += [f"- {package}: {version}" for package, version in software_versions(extra).items()] + [""]
    lines += _citations_section(config)
    return "\n".join(lines).rstrip() + "\n"


NAMESPACE = "<namespace>"  # in a card whose hub_model_id has none, until the upload names it (name_repository)


def _loading_section(config: dict[str, Any], adapter: bool) -> list[str]:
    """Code that loads the model: from the Hub by its full id ("namespace/name"), else from its folder. A
    ``hub_model_id`` without a namespace goes, when pushed, to the token user's namespace: the card says so, and
    :func:`name_repository` writes the id the upload resolved."""
    repo = config.get("hub_model_id")
    note = []
    if repo and "/" not in repo:
        note = [_namespace_note(repo), ""]
        repo = f"{NAMESPACE}/{repo}"
    where = repo or "path/to/final"
    reward = any(get_method(m).model == "reward" for m in _methods(config))
    kind = "SequenceClassification" if reward else "CausalLM"
    auto = f"AutoPeftModelFor{kind}" if adapter else f"AutoModelFor{kind}"
    imports = [f"from peft import {auto}", "from transformers import AutoTokenizer"] if adapter else \
        [f"from transformers import {auto}, AutoTokenizer"]
    code = [*imports, "", f'model = {auto}.from_pretrained("{where}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")']
    return ["## How to load", "", *note, "```python", *code, "```", ""]


def _namespace_note(name: str) -> str:
    return (f"`hub_model_id` is `{name}`, without a namespace: `push_to_hub` uploads it under the namespace of the "
            f"token's user (`hf auth whoami` names it), `{NAMESPACE}` below. A local copy loads from its folder's "
            "path.")


def name_repository(folder: str | Path, repo_id: str) -> None:
    """Once the upload has resolved a bare ``hub_model_id`` to ``repo_id`` ("namespace/name"), write that id into
    the card of ``folder`` (its "How to load" code), in place of the note and the placeholder namespace."""
    path = Path(folder) / CARD_FILE
    if "/" not in repo_id or not path.is_file():
        return
    name = repo_id.split("/", 1)[1]
    text = path.read_text(encoding="utf-8")
    text = text.replace(_namespace_note(name) + "\n\n", "").replace(f"{NAMESPACE}/{name}", repo_id)
    path.write_text(text, encoding="utf-8")


def _methods_section(config: dict[str, Any], methods: list[str]) -> list[str]:
    weights = config.get("loss_weights") or [1.0] * len(methods)
    lines = ["## Method", "", "| method | weight | what it optimises | paper |", "|---|---|---|---|"]
    for method, weight in zip(methods, weights):
        spec = get_method(method)
        papers = ", ".join(f"arXiv {p}" for p in spec.papers) or "—"
        lines.append(f"| `{method}` | {_format(weight)} | {spec.summary} | {papers} |")
    return [*lines, ""]


def _hyperparameters_section(config: dict[str, Any], summary: dict[str, Any], adapter: bool) -> list[str]:
    methods = _methods(config)
    loss_keys = list(dict.fromkeys(k for m in methods for k in get_method(m).hparams))
    loss_keys += [k for k in ("ld_alpha", "use_weighting") if config.get(k)]
    rows = [(key, config.get(key)) for key in loss_keys]
    rows += _length_rows([(key, config.get(key)) for key in _TRAINING_KEYS if key in config], config, summary)
    processes = summary.get("processes")
    if processes:
        batch = config.get("per_device_train_batch_size", 0) * processes * config.get("gradient_accumulation_steps", 1)
        rows.append(("processes", processes))
        if not config.get("max_tokens_per_batch"):
            rows.append(("global batch (examples per step)", batch))
    rows += [(key, config.get(key)) for key in _DATA_KEYS if key in config]
    rows += [(key, config.get(key)) for key in _REFERENCE_KEYS if key in config]
    if adapter or config.get("use_peft"):
        rows += [(key, config.get(key)) for key in _LORA_KEYS if key in config]
    if config.get("load_in_4bit") or config.get("load_in_8bit"):
        rows += [(key, config.get(key)) for key in _QUANTIZATION_KEYS if key in config]
    lines = ["## Hyper-parameters", "", "Resolved values (method defaults filled in), as in the run's `config.yaml`:",
             "", *_table(rows, ("key", "value")), ""]
    extras = []
    if summary.get("reference"):
        extras.append(f"- reference: {summary['reference']}")
    if summary.get("layout"):
        extras.append(f"- batch layout: {summary['layout']}")
    parameters = summary.get("parameters")
    if parameters:
        trainable, total = parameters
        extras.append(f"- trainable parameters: {trainable:,} of {total:,}")
    return lines + (extras + [""] if extras else [])


def _length_rows(rows: list[tuple[str, Any]], config: dict[str, Any], summary: dict[str, Any]) -> list[tuple[str, Any]]:
    """The run's length as it was decided: ``max_steps`` when positive (then ``num_train_epochs`` did not count, and
    the epochs shown are those run, the last logged step's ``epoch``), else ``num_train_epochs``."""
    by_steps = (config.get("max_steps") or 0) > 0
    epochs_run = (summary.get("train") or {}).get("epoch")
    shown = []
    for key, value in rows:
        if key == "max_steps" and not by_steps:
            continue
        if key == "num_train_epochs" and by_steps:
            if epochs_run is not None:
                shown.append(("epochs run (max_steps decides)", epochs_run))
            continue
        shown.append((key, value))
    return shown


def _split_shown(source: str, split: Any) -> str:
    """A file has one split, all its rows; a saved DatasetDict or a Hub dataset has the split the run read."""
    return "all its rows" if Path(source).expanduser().is_file() else f"split `{split}`"


def _data_section(config: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    dataset = config.get("dataset") or "preftune's built-in pairs, or rows passed in memory"  # paths: public_text
    split = _split_shown(dataset, config.get("dataset_split", "train"))
    lines = ["## Data", "", f"- training data: `{dataset}` ({split})"]
    if config.get("eval_dataset"):
        eval_dataset = config["eval_dataset"]
        lines.append(f"- evaluation data: `{eval_dataset}` ({_split_shown(eval_dataset, config.get('eval_split'))})")
    elif config.get("eval_split_size"):
        lines.append(f"- evaluation data: {config['eval_split_size']:.0%} of the training rows held out")
    reports = summary.get("data") or {}
    if reports:
        lines += ["", "Rows read, kept, truncated and dropped:", ""]
        lines += [f"- {split}: {report}" for split, report in reports.items()]
    return [*lines, ""]


def _results_section(summary: dict[str, Any]) -> list[str]:
    lines = ["## Results", ""]
    for title, record in (("Last logged training step", summary.get("train")), ("Evaluation", summary.get("eval"))):
        values = [(k, v) for k, v in (record or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if values:
            lines += [f"{title}:", "", *_table(values, ("metric", "value")), ""]
    if len(lines) == 2:
        lines += ["No metrics were logged.", ""]
    return lines


def _citations_section(config: dict[str, Any]) -> list[str]:
    ids = papers_of(config)
    if not ids:
        return []
    lines = ["## Citations", ""]
    for arxiv in ids:
        paper = PAPERS[arxiv]
        lines += [f"{paper.title} (arXiv {arxiv}):", "", "```bibtex", paper.bibtex(), "```", ""]
    return lines


def write_card(folder: str | Path, config: dict[str, Any], summary: dict[str, Any], adapter: bool,
               merged: bool = False) -> Path:
    """Write ``folder/README.md`` (replacing any card already there, such as PEFT's empty template)."""
    path = Path(folder) / CARD_FILE
    path.write_text(render_card(config, summary, adapter, merged), encoding="utf-8")
    return path
