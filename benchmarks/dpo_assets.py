"""Benchmark inputs, built once on disk: a byte-level BPE tokenizer, a Llama-style model of a given shape
(:class:`ModelShape`, random weights) and synthetic preference data whose token lengths hit each workload's targets.

Everything is generated locally and deterministically (seeded); nothing is downloaded. Both tools load the
same model folder (weights + tokenizer) and the same jsonl files. A tokenizer depends only on its vocabulary size
(and the seed), so models of one vocabulary share it, and so do their datasets.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path


def add_shape_arguments(parser, default: str) -> None:
    """The model-shape options both benchmarks take (``--layers``, ``--hidden-size``, …; ``default`` says what is
    run without them); :class:`ModelShape` derives what is not given."""
    shape = parser.add_argument_group(f"model shape (default: {default})")
    shape.add_argument("--layers", type=int, help="num_hidden_layers")
    shape.add_argument("--hidden-size", type=int, help="hidden_size")
    shape.add_argument("--intermediate-size", type=int, help="intermediate_size (default 3 × hidden)")
    shape.add_argument("--heads", type=int, help="num_attention_heads (default hidden / 64)")
    shape.add_argument("--kv-heads", type=int, help="num_key_value_heads (default heads / 2)")
    shape.add_argument("--vocab-size", type=int, help="entries of the trained tokenizer and of the LM head")


@dataclass(frozen=True)
class ModelShape:
    """Depth, width and vocabulary of a Llama-style benchmark model (untied embeddings, random init).

    What is not given is derived as the benchmarks always did: 64-wide attention heads, half as many KV heads, an
    MLP 3× the width."""

    layers: int
    hidden: int
    vocab: int
    heads: int | None = None
    kv_heads: int | None = None
    intermediate: int | None = None
    max_positions: int = 2048

    def __post_init__(self) -> None:
        heads = self.heads or max(1, self.hidden // 64)
        kv_heads = self.kv_heads or max(1, heads // 2)
        if self.hidden % heads or heads % kv_heads:
            raise ValueError(f"hidden {self.hidden}, {heads} heads, {kv_heads} KV heads: the width must split into "
                             "the heads, and the heads into the KV heads")
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "kv_heads", kv_heads)
        object.__setattr__(self, "intermediate", self.intermediate or 3 * self.hidden)

    @property
    def name(self) -> str:
        """``8x512-v32k``: layers × width, vocabulary (and any head or MLP width other than the derived one)."""
        vocab = f"{self.vocab // 1000}k" if self.vocab % 1000 == 0 else str(self.vocab)
        derived = ModelShape(self.layers, self.hidden, self.vocab, max_positions=self.max_positions)
        extra = "".join(f"-{tag}{getattr(self, field)}" for field, tag in
                        (("heads", "h"), ("kv_heads", "kv"), ("intermediate", "mlp"))
                        if getattr(self, field) != getattr(derived, field))
        return f"{self.layers}x{self.hidden}-v{vocab}{extra}"

    def parameter_split(self) -> dict[str, float]:
        """:func:`parameter_split` of the model this shape builds, counted from the shape: per layer the q, k, v, o
        projections, the gated MLP (gate, up, down) and two RMSNorms; the final norm is "other"."""
        head_dim = self.hidden // self.heads
        layer = (2 * self.hidden * self.heads * head_dim + 2 * self.hidden * self.kv_heads * head_dim
                 + 3 * self.hidden * self.intermediate + 2 * self.hidden)
        parts = {"body": self.layers * layer, "embeddings": self.vocab * self.hidden, "head": self.vocab * self.hidden,
                 "other": self.hidden}
        return {**parts, "total": sum(parts.values()),
                "body_to_head": parts["body"] / (parts["head"] + parts["embeddings"])}

    def config(self) -> dict[str, int | float | bool]:
        """The ``LlamaConfig`` fields of this shape (the vocabulary comes from the tokenizer)."""
        return dict(hidden_size=self.hidden, intermediate_size=self.intermediate, num_hidden_layers=self.layers,
                    num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                    max_position_embeddings=self.max_positions, tie_word_embeddings=False, attention_dropout=0.0)


# The DPO benchmark's model since its first run: 2 × 32000 × 512 (embeddings + LM head) + 8 layers × 3.15M ≈ 58.0M
# parameters. VOCAB_SIZE and MODEL_CONFIG are its values (bench_memory.py reads them).
DEFAULT_SHAPE = ModelShape(layers=8, hidden=512, vocab=32_000, heads=8, kv_heads=4, intermediate=1536)
VOCAB_SIZE = DEFAULT_SHAPE.vocab
MODEL_CONFIG = DEFAULT_SHAPE.config()


def parameter_split(model) -> dict[str, float]:
    """Parameters of a Llama-style causal LM by part: ``body`` (every decoder layer's), ``embeddings``, ``head``
    (the LM head), ``other`` (the final norm) and ``total``; ``body_to_head`` = body / (head + embeddings)."""
    parts = {"body": 0, "embeddings": 0, "head": 0, "other": 0}
    for name, p in model.named_parameters():
        part = ("body" if ".layers." in name else "embeddings" if "embed_tokens" in name
                else "head" if name.startswith("lm_head") else "other")
        parts[part] += p.numel()
    total = sum(parts.values())
    return {**parts, "total": total, "body_to_head": parts["body"] / (parts["head"] + parts["embeddings"])}


@dataclass(frozen=True)
class Workload:
    """Target token lengths: ``prompt`` includes the BOS token, each response includes its EOS token."""

    name: str
    description: str
    prompt_tokens: int
    response_tokens: int
    jitter: float = 0.10  # each length is drawn uniformly from target·(1 ± jitter), so padding matters


WORKLOADS: dict[str, Workload] = {
    "a": Workload("a", "long prompts (≈380-token prompt, ≈125-token responses)", 380, 125),
    "b": Workload("b", "short prompts (≈64-token prompt, ≈256-token responses)", 64, 256),
    "c": Workload("c", "medium prompts (≈255-token prompt, ≈175-token responses)", 255, 175),
}

# --------------------------------------------------------------------------------------------- text


class _Lexicon:
    """Pronounceable pseudo-words with a Zipf-like frequency, so BPE has plenty to merge into 32k tokens."""

    ONSETS = "b c d f g h j k l m n p r s t v w z br ch dr fl gr kl pl sh st th tr".split()
    VOWELS = "a e i o u ai ea ou ie".split()
    CODAS = ["", "", "", "n", "r", "s", "l", "m", "nt", "st", "rk"]

    def __init__(self, seed: int, size: int = 80_000):
        rng = random.Random(seed)
        words: dict[str, None] = {}
        while len(words) < size:
            syllables = rng.choice([1, 2, 2, 3, 3, 4])
            words["".join(rng.choice(self.ONSETS) + rng.choice(self.VOWELS) + rng.choice(self.CODAS)
                          for _ in range(syllables))] = None
        self.words = list(words)
        self.cumulative = list(itertools.accumulate(1.0 / (i + 10) ** 0.8 for i in range(size)))

    def sample(self, rng: random.Random, k: int) -> list[str]:
        return rng.choices(self.words, cum_weights=self.cumulative, k=k)

    def sentences(self, rng: random.Random, k: int) -> str:
        """About ``k`` words with some punctuation and numbers, like prose."""
        out = []
        for i, word in enumerate(self.sample(rng, k)):
            if i and rng.random() < 0.02:
                out.append(str(rng.randint(0, 9999)))
            out.append(word.capitalize() if i == 0 or out[-1].endswith(".") else word)
            if rng.random() < 0.08:
                out[-1] += rng.choice([".", ",", ",", ";", "?"])
        return " ".join(out)


def train_tokenizer(out_dir: Path, vocab_size: int = VOCAB_SIZE, seed: int = 0):
    """Train a byte-level BPE tokenizer with exactly ``vocab_size`` entries on generated prose."""
    from preftune.modeling.tiny import build_tokenizer

    lexicon = _Lexicon(seed)
    rng = random.Random(seed + 1)
    texts = [lexicon.sentences(rng, 60) for _ in range(20_000)]
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"the trained tokenizer has {len(tokenizer)} entries, expected {vocab_size}")
    tokenizer.save_pretrained(out_dir)
    return tokenizer


# --------------------------------------------------------------------------------------------- model


def build_model(out_dir: Path, tokenizer, shape: ModelShape = DEFAULT_SHAPE, seed: int = 0) -> dict[str, float]:
    """Save a randomly initialised Llama-style model of ``shape`` (fp32, safetensors) in ``out_dir``; return its
    :func:`parameter_split`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape.config(),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    return parameter_split(model)


# --------------------------------------------------------------------------------------------- data


class _LengthMatcher:
    """Cut generated prose to an exact token count (as the tokenizer encodes it without special tokens)."""

    def __init__(self, tokenizer, lexicon: _Lexicon):
        self.tokenizer, self.lexicon = tokenizer, lexicon

    def n_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text(self, rng: random.Random, tokens: int, prefix: str = "", suffix: str = "") -> str:
        """``prefix + words + suffix`` with exactly ``tokens`` tokens (±1 when no word count hits it exactly)."""
        words = self.lexicon.sentences(rng, tokens + 8).split(" ")
        while self.n_tokens(prefix + " ".join(words) + suffix) < tokens:  # rare: very short words
            words += self.lexicon.sentences(rng, tokens).split(" ")
        counts = _LazyCounts(lambda k: self.n_tokens(prefix + " ".join(words[:k]) + suffix), len(words) + 1)
        k = bisect.bisect_left(counts, tokens)
        if k > 0 and tokens - counts[k - 1] < counts[k] - tokens:
            k -= 1
        return prefix + " ".join(words[:k]) + suffix


class _LazyCounts:
    """A sequence ``f(0), f(1), …`` computed on demand, so :func:`bisect.bisect_left` can search it."""

    def __init__(self, f, n: int):
        self.f, self.n, self.cache = f, n, {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> int:
        if k not in self.cache:
            self.cache[k] = self.f(k)
        return self.cache[k]


def _draw(rng: random.Random, target: int, jitter: float) -> int:
    return max(2, round(target * rng.uniform(1 - jitter, 1 + jitter)))


def generate_pairs(tokenizer, workload: Workload, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` standard-format rows ``{prompt, chosen, rejected}`` (deterministic; rows are prefix-stable in ``n``).

    The prompt ends in ``"\\nAnswer:"`` and each response starts with a space, so byte-level BPE never merges
    across the boundary: ``encode(prompt + response) == encode(prompt) + encode(response)`` and both tools see
    the same ids (TRL encodes prompt+response together, preftune encodes the parts separately).
    """
    lexicon = _Lexicon(seed)
    matcher = _LengthMatcher(tokenizer, lexicon)
    rows = []
    for i in range(n):
        rng = random.Random(f"{seed}-{workload.name}-{i}")
        # Special tokens (BOS before the prompt, EOS after each response) are counted in the targets.
        prompt = matcher.text(rng, _draw(rng, workload.prompt_tokens, workload.jitter) - 1,
                              prefix=f"Question {i}: ", suffix="\nAnswer:")
        chosen = " " + matcher.text(rng, _draw(rng, workload.response_tokens, workload.jitter) - 1)
        rejected = " " + matcher.text(rng, _draw(rng, workload.response_tokens, workload.jitter) - 1)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


@dataclass
class TokenStats:
    """Mean token counts per pair as both tools tokenize the rows (prompt with BOS, responses with EOS)."""

    pairs: int
    prompt: float
    chosen: float
    rejected: float
    per_pair: list[tuple[int, int, int]]

    @property
    def unique_tokens_per_pair(self) -> float:
        """Real tokens of prompt + chosen + rejected, the prompt counted once."""
        return self.prompt + self.chosen + self.rejected

    def summary(self) -> dict[str, float]:
        return {"pairs": self.pairs, "prompt": round(self.prompt, 2), "chosen": round(self.chosen, 2),
                "rejected": round(self.rejected, 2), "unique_tokens_per_pair": round(self.unique_tokens_per_pair, 2)}


def token_stats(tokenizer, rows: list[dict[str, str]]) -> TokenStats:
    """Token counts of each row, checking that prompt and response never merge across their boundary."""
    eos = tokenizer.eos_token_id
    lengths = []
    for row in rows:
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        sides = []
        for side in ("chosen", "rejected"):
            response_ids = tokenizer(row[side], add_special_tokens=False)["input_ids"] + [eos]
            joint = tokenizer(row["prompt"] + row[side] + tokenizer.eos_token)["input_ids"]
            if joint != prompt_ids + response_ids:
                raise RuntimeError(f"prompt and {side} merge across their boundary: {row}")
            sides.append(len(response_ids))
        lengths.append((len(prompt_ids), sides[0], sides[1]))
    n = len(lengths)
    return TokenStats(n, sum(p for p, _, _ in lengths) / n, sum(c for _, c, _ in lengths) / n,
                      sum(r for _, _, r in lengths) / n, lengths)


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(path)


# --------------------------------------------------------------------------------------------- all of it


@dataclass
class Assets:
    """Paths of the built inputs of one model shape."""

    work_dir: Path
    model_dir: Path
    parameters: int
    shape: ModelShape = DEFAULT_SHAPE
    split: dict[str, float] | None = None  # parameter_split of the model

    def dataset(self, workload: str, pairs: int) -> Path:
        """Datasets depend on the tokenizer only (token lengths), so models of one vocabulary share them."""
        return self.work_dir / "data" / f"v{self.shape.vocab}" / f"{workload}-{pairs}.jsonl"


def ensure_tokenizer(work_dir: Path, vocab_size: int, seed: int = 0):
    """The tokenizer of ``vocab_size`` entries under ``work_dir/tokenizer-v<vocab>``, trained on first use."""
    from transformers import AutoTokenizer

    folder = work_dir / f"tokenizer-v{vocab_size}"
    marker = folder / "bench-tokenizer.json"
    if marker.exists() and json.loads(marker.read_text()) == {"vocab_size": vocab_size, "seed": seed}:
        return AutoTokenizer.from_pretrained(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(folder, vocab_size, seed)
    marker.write_text(json.dumps({"vocab_size": vocab_size, "seed": seed}))
    return tokenizer


def ensure_model(work_dir: Path, shape: ModelShape = DEFAULT_SHAPE, seed: int = 0) -> Assets:
    """Build the tokenizer and the model of ``shape`` under ``work_dir/model-<shape>`` unless they are already there."""
    model_dir = work_dir / f"model-{shape.name}"
    marker = model_dir / "bench-model.json"
    wanted = {"shape": asdict(shape), "seed": seed}
    if marker.exists():
        info = json.loads(marker.read_text())
        if {k: info.get(k) for k in wanted} == wanted:
            return Assets(work_dir, model_dir, info["parameters"]["total"], shape, info["parameters"])
    tokenizer = ensure_tokenizer(work_dir, shape.vocab, seed)
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(model_dir)
    split = build_model(model_dir, tokenizer, shape, seed)
    if split != shape.parameter_split():  # the report's body and head come from the shape where no model is at hand
        raise RuntimeError(f"{shape.name}: the built model has {split}, the shape counts {shape.parameter_split()}")
    marker.write_text(json.dumps({**wanted, "parameters": split}, indent=2))
    return Assets(work_dir, model_dir, split["total"], shape, split)


def ensure_dataset(assets: Assets, tokenizer, workload: Workload, pairs: int, seed: int = 0) -> tuple[Path, TokenStats]:
    """The jsonl of ``pairs`` rows for ``workload`` (built on first use) and its token statistics."""
    path = assets.dataset(workload.name, pairs)
    stats_path = path.with_suffix(".stats.json")
    if path.exists() and stats_path.exists():
        saved = json.loads(stats_path.read_text())
        if saved.get("workload") == asdict(workload) and saved.get("seed") == seed:
            stats = TokenStats(saved["pairs"], saved["prompt"], saved["chosen"], saved["rejected"],
                               [tuple(x) for x in saved["per_pair"]])
            return path, stats
    rows = generate_pairs(tokenizer, workload, pairs, seed)
    stats = token_stats(tokenizer, rows)
    write_jsonl(path, rows)
    stats_path.write_text(json.dumps({"workload": asdict(workload), "seed": seed, **asdict(stats)}))
    return path, stats
