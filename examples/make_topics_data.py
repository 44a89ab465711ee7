"""Generate the topic-classification task: a sentence in, one label word out.

The model must answer with exactly one of five label words. The untuned model answers in sentences
("This sentence is about ..."), so exact-match accuracy before tuning is near zero; every method should
lift it. Held-out sentences are built from held-out subjects, so a method must generalise, not recall.
Fixed seed: `python examples/make_topics_data.py` rewrites the same files.

It also writes the same sentences as binary feedback for KTO (`examples/kto.yaml`): `topic_feedback.jsonl`, each
training sentence once with a label marked right or wrong (TRL's unpaired `{prompt, completion, label}`; half are
the true topic, half one of the other four), and `topic_feedback_eval.jsonl`, each held-out sentence as a pair
(the true topic chosen, another rejected). Every label word is as often desirable as undesirable, so a model that
only shifts its preference between label words gains nothing on the held-out pairs: to gain it must read the
sentence.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LABELS = ("sport", "food", "weather", "science", "music")
INSTRUCTION = "Classify the topic of this sentence. Sentence: "

# Per label: (subjects, predicates). Train and held-out use disjoint subjects.
VOCAB = {
    "sport": (["The striker", "Our goalkeeper", "The tennis champion", "The relay team", "The coach", "The cyclist",
               "The marathon runner", "The point guard", "The swimmer", "The boxer", "The rugby captain",
               "The skier"],
              ["scored twice in the final minutes.", "won the championship after extra time.",
               "trained for the Olympic qualifiers all winter.", "was sent off for a foul in the second half.",
               "broke the national record at the stadium.", "signed a new contract with the club.",
               "lost the match on penalties.", "celebrated the victory with the fans."]),
    "food": (["The chef", "My grandmother", "The bakery", "The street vendor", "Our neighbour", "The restaurant",
              "The pastry cook", "The farmer's market", "The food truck", "The caterer", "The sushi bar",
              "The pizzeria"],
             ["roasted the vegetables with garlic and rosemary.", "baked fresh bread with a crispy crust.",
              "served a spicy soup with noodles.", "made pancakes with maple syrup.",
              "grilled the fish and added lemon.", "prepared a salad with tomatoes and cheese.",
              "simmered the sauce for three hours.", "sold chocolate cakes by the slice."]),
    "weather": (["The forecast", "This morning", "The coastal town", "The valley", "The northern region",
                 "Tonight", "The mountain pass", "The city", "The island", "The desert", "The harbour",
                 "The weekend"],
                ["brings heavy rain and strong winds.", "will see snow falling until noon.",
                 "had a thick fog that delayed flights.", "expects a heatwave with record temperatures.",
                 "got thunderstorms and hail in the afternoon.", "stays cloudy with a light drizzle.",
                 "warned of a storm moving in from the sea.", "cooled down after a freezing night."]),
    "science": (["The physicist", "The research team", "The biologist", "The laboratory", "The chemist",
                 "The astronomer", "The geologist", "The university study", "The telescope", "The lab assistant",
                 "The neuroscientist", "The experiment"],
                ["measured the speed of the particles.", "discovered a new species of bacteria.",
                 "observed a distant galaxy forming stars.", "published results on the DNA sequence.",
                 "tested the hypothesis with a controlled trial.", "analysed rock samples from the crater.",
                 "recorded the reaction of the two molecules.", "found evidence of water on the planet."]),
    "music": (["The pianist", "The band", "The orchestra", "The singer", "The drummer", "The choir",
               "The guitarist", "The composer", "The violinist", "The DJ", "The jazz trio", "The rapper"],
              ["played a new song at the concert.", "recorded an album in the studio.",
               "performed a symphony by Beethoven.", "sang the chorus in perfect harmony.",
               "tuned the instruments before the show.", "released a single that topped the charts.",
               "rehearsed the melody for the festival.", "wrote lyrics for the next record."]),
}
HELD_OUT_SUBJECTS = 3  # the last three subjects of each label appear only in the held-out set


def record(sentence: str, label: str) -> dict:
    return {"prompt": INSTRUCTION + sentence, "completion": label}


def build(seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train, heldout = [], []
    for label, (subjects, predicates) in VOCAB.items():
        for i, subject in enumerate(subjects):
            for predicate in predicates:
                target = heldout if i >= len(subjects) - HELD_OUT_SUBJECTS else train
                target.append(record(f"{subject} {predicate}", label))
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout[:100]


def feedback(train: list[dict], heldout: list[dict], seed: int = 1) -> tuple[list[dict], list[dict]]:
    """Unpaired right / wrong labels for the training sentences; held-out pairs (true topic, another)."""
    rng = random.Random(seed)

    def wrong(label: str) -> str:
        return rng.choice([other for other in LABELS if other != label])

    unpaired = []
    for i, r in enumerate(train):
        right = i % 2 == 0  # exactly half, whatever the topic order
        unpaired.append({"prompt": r["prompt"], "completion": r["completion"] if right else wrong(r["completion"]),
                         "label": right})
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": wrong(r["completion"])} for r in heldout]
    return unpaired, pairs


def main() -> None:
    out = Path(__file__).parent / "data"
    train, heldout = build()
    unpaired, pairs = feedback(train, heldout)
    for name, rows in (("topics_train.jsonl", train), ("topics_heldout.jsonl", heldout),
                       ("topic_feedback.jsonl", unpaired), ("topic_feedback_eval.jsonl", pairs)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{out / name}: {len(rows)} records")


if __name__ == "__main__":
    main()
