"""Benchmark inputs, built once on disk: a 32k-vocab tokenizer, a ≈58M Llama-style model and synthetic
preference data whose token lengths hit each workload's targets.

Everything is generated locally and deterministically (seeded); nothing is downloaded. Both tools load the
same model folder (weights + tokenizer) and the same jsonl files.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

VOCAB_SIZE = 32_000

# Llama-style, untied embeddings: 2 × 32000 × 512 (embeddings + LM head) + 8 layers × 3.15M ≈ 58.0M parameters.
MODEL_CONFIG: dict[str, int | float | bool] = dict(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    attention_dropout=0.0,
)


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


def train_tokenizer(out_dir: Path, seed: int = 0):
    """Train a byte-level BPE tokenizer with exactly :data:`VOCAB_SIZE` entries on generated prose."""
    from preftune.modeling.tiny import build_tokenizer

    lexicon = _Lexicon(seed)
    rng = random.Random(seed + 1)
    texts = [lexicon.sentences(rng, 60) for _ in range(20_000)]
    tokenizer = build_tokenizer(texts, vocab_size=VOCAB_SIZE)
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"the trained tokenizer has {len(tokenizer)} entries, expected {VOCAB_SIZE}")
    tokenizer.save_pretrained(out_dir)
    return tokenizer


# --------------------------------------------------------------------------------------------- model


def build_model(out_dir: Path, tokenizer, seed: int = 0) -> int:
    """Save a randomly initialised Llama-style model (fp32, safetensors) beside the tokenizer; return #params."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_CONFIG,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


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
    """Paths of the built inputs."""

    work_dir: Path
    model_dir: Path
    parameters: int

    def dataset(self, workload: str, pairs: int) -> Path:
        return self.work_dir / "data" / f"{workload}-{pairs}.jsonl"


def ensure_model(work_dir: Path, seed: int = 0) -> Assets:
    """Build the tokenizer and the model under ``work_dir/model`` unless they are already there."""
    model_dir = work_dir / "model"
    marker = model_dir / "bench-model.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("config") == MODEL_CONFIG and info.get("vocab_size") == VOCAB_SIZE and info.get("seed") == seed:
            return Assets(work_dir, model_dir, info["parameters"])
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(model_dir, seed)
    parameters = build_model(model_dir, tokenizer, seed)
    marker.write_text(json.dumps({"config": MODEL_CONFIG, "vocab_size": VOCAB_SIZE, "seed": seed,
                                  "parameters": parameters}, indent=2))
    return Assets(work_dir, model_dir, parameters)


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
