"""A topic-classification task that fedtune writes itself, so the default run needs no download.

Sentences are assembled from templates and per-topic vocabularies (world, sports,
business, science: the AG News label set). The label is the topic of what happened (the
action); the subject and the circumstance are drawn from another topic about half the
time each, so counting topic words is not enough and the encoder has to read who did
what. An untuned model with a fresh classification head scores near chance.
"""

from __future__ import annotations

import random

LABELS = ("world", "sports", "business", "science")

_SUBJECTS = {
    "world": ["the prime minister", "the foreign ministry", "rebel leaders", "the united nations",
              "the president", "opposition parties", "border officials", "the parliament"],
    "sports": ["the striker", "the home team", "the coach", "the champions", "the goalkeeper",
               "the young sprinter", "the captain", "the league leaders"],
    "business": ["the central bank", "shareholders", "the retailer", "investors", "the airline",
                 "the chief executive", "the car maker", "bond traders"],
    "science": ["researchers", "the space agency", "astronomers", "the biology lab", "engineers",
                "a team of physicists", "the climate scientists", "the chip designers"],
}
_ACTIONS = {
    "world": ["signed a ceasefire", "called an early election", "closed the embassy",
              "approved new sanctions", "held peace talks", "declared a state of emergency"],
    "sports": ["won the final", "scored twice", "signed a new contract", "lost the derby",
               "set a world record", "qualified for the playoffs"],
    "business": ["raised interest rates", "reported record profits", "cut thousands of jobs",
                 "agreed a merger", "issued new shares", "missed revenue forecasts"],
    "science": ["discovered a new exoplanet", "sequenced the genome", "launched a satellite",
                "built a quantum processor", "published the trial results", "measured the particle mass"],
}
_DETAILS = {
    "world": ["after weeks of protests", "amid rising tensions", "ahead of the summit",
              "despite international pressure"],
    "sports": ["in front of a sold-out stadium", "in the last minute", "after extra time",
               "before the new season"],
    "business": ["as markets fell", "after a strong quarter", "despite weak demand",
                 "ahead of the earnings call"],
    "science": ["using a new telescope", "after years of experiments", "in a peer-reviewed study",
                "with a novel algorithm"],
}
_TIMES = ["on monday", "yesterday", "this week", "late on friday", "earlier today", "on tuesday"]
_TEMPLATES = [
    "{subject} {action} {detail} {time}.",
    "{time}, {subject} {action} {detail}.",
    "reports say {subject} {action} {time}, {detail}.",
    "{subject} {action} {time}; analysts note it came {detail}.",
]


def topic_sentence(rng: random.Random, label: int, distractor_rate: float) -> str:
    """One sentence whose action is of topic ``LABELS[label]``."""
    topic = LABELS[label]

    def maybe_other() -> str:
        return rng.choice([t for t in LABELS if t != topic]) if rng.random() < distractor_rate else topic

    subject_topic, detail_topic = maybe_other(), maybe_other()
    return rng.choice(_TEMPLATES).format(
        subject=rng.choice(_SUBJECTS[subject_topic]),
        action=rng.choice(_ACTIONS[topic]),
        detail=rng.choice(_DETAILS[detail_topic]),
        time=rng.choice(_TIMES),
    )


def generate_topics(num_examples: int, seed: int, distractor_rate: float = 0.5) -> dict[str, list]:
    """``num_examples`` labelled sentences, balanced over the four topics, deterministic in ``seed``."""
    rng = random.Random(seed)
    labels = [i % len(LABELS) for i in range(num_examples)]
    rng.shuffle(labels)
    return {"text": [topic_sentence(rng, y, distractor_rate) for y in labels], "label": labels}


GENERATED_TASKS = {"topics": generate_topics}
GENERATED_LABELS = {"topics": LABELS}  # the name of each label index
# Sizes of the generated splits; the test split uses a different seed, so no sentence
# generator state is shared with training.
GENERATED_TRAIN_SIZE = 2400
GENERATED_TEST_SIZE = 600
