"""Load the policy, the tokenizer and (optionally) LoRA adapters, as Hugging Face objects."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from preftune import digest
from preftune.config import TrainConfig, shown
from preftune.errors import ModelError
from preftune.modeling.logprobs import unwrap_causal_lm

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


# What a local folder must hold to be loaded as each kind (a PEFT adapter folder loads as a model too).
_MARKERS = {"model": ("config.json", "adapter_config.json"),
            "tokenizer": ("tokenizer_config.json", "tokenizer.json", "config.json")}


def _looks_local(path: str) -> bool:
    """A path, not a Hub id (``name`` or ``org/name``): transformers would otherwise say "Repo id must use …"."""
    if path.startswith(("/", ".", "~")) or "\\" in path or path.count("/") > 1:
        return True
    return "/" in path and Path(path).parent.is_dir()  # `models/x` where ./models exists


@contextlib.contextmanager
def _loading(path: str, kind: str) -> Iterator[None]:
    """Check a local ``path`` before loading; turn transformers' "not found / not a model" errors into a
    ModelError naming the path and what to give instead. OS errors with an errno (disk full, permissions)
    pass through for the CLI to report."""
    local = Path(path).expanduser()
    noun = "model or tokenizer" if kind == "tokenizer" else kind  # the tokenizer is read from the model's folder
    if local.is_dir():
        if not any((local / name).is_file() for name in _MARKERS[kind]):
            raise ModelError(f"{path} is not a {kind} folder: it holds none of {', '.join(_MARKERS[kind])}; give "
                             "a folder written by save_pretrained, or a Hub id such as 'org/name'")
        if kind == "model":
            refuse_pickled_weights(path)
    elif local.exists():
        raise ModelError(f"{path} is a file, not a {noun} folder; give the folder written by save_pretrained "
                         "(config.json and the weights), or a Hub id such as 'org/name'")
    elif _looks_local(path):
        raise ModelError(f"{path}: no such {noun} folder (relative paths start at {Path.cwd()}); check the path: "
                         f"give a folder written by save_pretrained, or a Hub id such as 'org/name'")
    try:
        yield
    except OSError as err:
        if err.errno is not None:
            raise
        cause = " ".join(str(err).split())
        raise ModelError(f"{path}: could not load the {kind} ({cause}); give a local folder written by "
                         "save_pretrained, or a Hub id that can be downloaded or is in the Hugging Face cache") from err


def check_model_path(key: str, path: str) -> None:
    """Refuse a model path that is neither on disk nor a Hub name, naming its config key (transformers would
    answer "Repo id must be in the form …", naming neither)."""
    if Path(path).expanduser().exists():
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
        return
    except HFValidationError:
        pass
    raise ModelError(f"{key} {shown(path)} is not a folder and not a Hub name (org/name): no such folder (relative "
                     f"paths start at {Path.cwd()}); give a folder written by save_pretrained, or a Hub id such as "
                     "'Qwen/Qwen2.5-0.5B'")


def refuse_pickled_weights(path: str | Path, role: str = "model") -> None:
    """ModelError when the local folder ``path`` holds its weights only as pickles (``pytorch_model.bin``): unpickling
    can run code, and a pickle that does not load safely surfaces as a bare UnpicklingError. preftune loads
    safetensors only; the message says how to convert."""
    folder = Path(path).expanduser()
    if not folder.is_dir() or any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
        return
    # What transformers and PEFT would read with torch.load (a pickle) when no safetensors file is beside it.
    pickled = sorted(f.name for f in folder.glob("*.bin") if f.name.startswith(("pytorch_model", "adapter_model")))
    if pickled:
        raise ModelError(
            f"{role} {path}: its weights are pickled ({pickled[0]}), and preftune loads safetensors only (unpickling "
            "can run code). If you trust the file, convert it once: python -c \"from transformers import "
            f"AutoModel; AutoModel.from_pretrained('{path}').save_pretrained('{path}-safetensors')\" (a causal LM: "
            "AutoModelForCausalLM; a reward model: AutoModelForSequenceClassification; an adapter: peft's "
            "PeftModel.save_pretrained(..., safe_serialization=True)), then give the new folder")


# Files of a model folder that no loader reads: hidden files (.gitattributes, .cache/) and documentation (README.md).
def _read_by_loaders(file: Path) -> bool:
    return file.is_file() and not file.name.startswith(".") and file.suffix.lower() != ".md"


def folder_digests(path: str | Path) -> dict[str, str]:
    """The content digest of every file a model or tokenizer loads from the local folder ``path`` (its top-level
    files, see :func:`_read_by_loaders`), by name; a PEFT adapter's local base model folder is included under
    ``base/``. Empty for a Hub id or a path that is not a folder (a Hub snapshot is named by its revision)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return {}
    digests = {f.name: digest.file_digest(f) for f in sorted(folder.iterdir()) if _read_by_loaders(f)}
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        import json

        try:
            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError):
            base = None  # loading the adapter names the problem
        if isinstance(base, str) and Path(base).expanduser().resolve() != folder.resolve():
            digests |= {f"base/{name}": value for name, value in folder_digests(base).items()}
    return digests


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    with _loading(path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and of the loss, so any id works; EOS is the
        # convention users expect.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ModelError(f"tokenizer at {path} has no eos_token; preftune appends EOS to every completion: set one "
                         "(tokenizer.eos_token = ...; save_pretrained)")
    return tokenizer


def quantization_config(cfg: TrainConfig, bf16: bool = False):
    """transformers' ``BitsAndBytesConfig`` for ``load_in_4bit`` / ``load_in_8bit`` (None otherwise), as TRL builds it.

    4 bits (QLoRA, Dettmers et al. 2023, arXiv 2305.14314): each linear layer's weight is stored as 4-bit codes
    (``nf4``: the quantiles of a normal distribution; ``fp4``) with one absmax scale per block of 64 values,
    dequantized block by block in the compute dtype for each matmul; ``use_bnb_nested_quant`` quantizes the scales
    too (≈0.37 bits per parameter saved). The compute dtype is the weights' dtype (bf16 under the run's bf16
    autocast, ``bf16``). The
    output head and embeddings stay unquantized (transformers' default), and LoRA adapters train in full precision."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if bf16 else DTYPES[cfg.dtype] if cfg.dtype != "auto" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=cfg.use_bnb_nested_quant, bnb_4bit_compute_dtype=compute)


def _loading_kwargs(cfg: TrainConfig, bf16: bool) -> dict:
    kwargs = dict(dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    quantization = quantization_config(cfg, bf16)
    if quantization is not None:
        from accelerate import PartialState

        # Quantized weights are placed once, on this process's device (they cannot be moved afterwards).
        kwargs.update(quantization_config=quantization, device_map={"": PartialState().device})
    return kwargs


def load_causal_lm(path: str, cfg: TrainConfig, bf16: bool = False) -> PreTrainedModel:
    """A causal LM from a local folder or the Hub. Weights load through transformers, which reads
    safetensors and refuses pickled code; ``trust_remote_code`` stays off unless asked for. With
    ``load_in_4bit`` / ``load_in_8bit`` its linear layers are quantized (:func:`quantization_config`; ``bf16``: the
    run trains under bf16 autocast)."""
    with _loading(path, "model"):
        return one_4bit_kernel(AutoModelForCausalLM.from_pretrained(path, **_loading_kwargs(cfg, bf16)))


def load_reward_model(path: str, cfg: TrainConfig, bf16: bool = False) -> PreTrainedModel:
    """A one-output sequence classifier (a causal LM checkpoint gets a new ``score`` head)."""
    with _loading(path, "model"):
        return one_4bit_kernel(AutoModelForSequenceClassification.from_pretrained(path, num_labels=1,
                                                                                  **_loading_kwargs(cfg, bf16)))


def one_4bit_kernel(model: nn.Module) -> nn.Module:
    """``model`` with its bitsandbytes 4-bit layers kept on one kernel for the whole run.

    On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight for another kernel at its first forward
    in evaluation mode without gradients, and computes every later forward (training included) with it: a run's
    numbers would then depend on whether a reference or evaluation pass came before the first step (a resumed run,
    a reference read from the cache: 0.047 apart after 4 QLoRA steps of a tiny Llama). Elsewhere a no-op."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` (or the model under its adapters) holds bitsandbytes-quantized weights."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(getattr(model, "config", None), "quantization_config", None))


def as_reward_model(causal_lm: PreTrainedModel) -> PreTrainedModel:
    """The same body with a new one-output ``score`` head (the LM head is dropped), for reward modelling."""
    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    reward = AutoModelForSequenceClassification.from_config(config, attn_implementation=config._attn_implementation)
    reward.base_model.load_state_dict(causal_lm.base_model.state_dict())
    return reward


def disable_dropout(model: nn.Module) -> None:
    """Dropout makes the policy's and the reference's log-probs differ at step 0 (DPO's loss ≠ ln 2)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def add_lora(model: PreTrainedModel, cfg: TrainConfig, task: str = "CAUSAL_LM") -> nn.Module:
    """LoRA adapters (Hu et al. 2021, arXiv 2106.09685) on ``cfg.lora_target_modules``. On a quantized base, PEFT's
    k-bit preparation first keeps the unquantized parameters (norms, head) in fp32 and lets gradients reach the
    adapters through frozen embeddings (with gradient checkpointing when asked for, non-reentrant)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if is_quantized(model):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        task_type=task,
    )
    return get_peft_model(model, lora)


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def vocabulary_size(model: nn.Module) -> int:
    """Rows of the input embedding: the token ids the model reads."""
    return unwrap_causal_lm(model).get_input_embeddings().weight.shape[0]


def check_same_vocabulary(policy: nn.Module, ref: nn.Module) -> None:
    """A reference over another vocabulary scores other tokens (or indexes out of range): refuse it up front."""
    if vocabulary_size(policy) != vocabulary_size(ref):
        raise ModelError(f"the reference model's vocabulary has {vocabulary_size(ref)} entries, the policy's "
                         f"{vocabulary_size(policy)}: log-ratios need the same tokenizer and vocabulary; use a "
                         "reference trained with the policy's tokenizer")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
