"""The embedded default's data: a small built-in preference dataset (its tokenizer and tiny Llama are in
:mod:`preftune.modeling.tiny`).

``preftune train`` with no model and no dataset uses these, so the main job runs on a fresh machine
with nothing to download. The preferences are simple on purpose — chosen replies are kind and on
topic, rejected replies are curt or rude — so a few hundred DPO steps visibly separate them.
"""

from __future__ import annotations

import random

TOPICS = ["the weather", "a good book", "my garden", "the new film", "dinner tonight", "a trip to the sea",
          "learning to cook", "my first bike", "the school play", "a rainy day", "the city park",
          "an old song", "the night sky", "a long walk", "my best friend", "the museum"]
ASKS = ["Tell me about {t}.", "What do you think of {t}?", "Can you say something about {t}?",
        "Write one line on {t}.", "Give me a thought on {t}."]
KIND = ["Sure! {T} is lovely, and I am happy to talk about it.", "Of course. {T} is a fine thing to enjoy.",
        "Happy to help: {T} brings joy to many people.", "Great question! {T} is worth a smile."]
RUDE = ["No. {T} is boring and so are you.", "Why ask me? {T} is dull.", "Whatever, {T} is a waste of time.",
        "I will not talk about {T}. Go away."]


def builtin_preferences(n: int = 640, seed: int = 0) -> list[dict[str, str]]:
    """``n`` standard-format rows ``{prompt, chosen, rejected}``, seeded."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        prompt = rng.choice(ASKS).format(t=topic)
        chosen = " " + rng.choice(KIND).format(T=topic[0].upper() + topic[1:])
        rejected = " " + rng.choice(RUDE).format(T=topic[0].upper() + topic[1:])
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows
