"""Writes clients/data/sentiment.jsonl: short product and film reviews labelled
positive or negative, for the classification example."""

import json
import pathlib
import random

THINGS = ["film", "phone", "hotel", "meal", "book", "laptop", "concert", "service", "coffee", "game", "jacket", "app"]
POSITIVE = ["wonderful", "excellent", "delightful", "superb", "fantastic", "lovely", "brilliant", "great", "impressive", "charming"]
NEGATIVE = ["terrible", "awful", "disappointing", "dreadful", "poor", "boring", "broken", "horrible", "useless", "mediocre"]
TEMPLATES = [
    ("The {thing} was {word}.", None),
    ("I found the {thing} {word} and would {verdict}.", None),
    ("Honestly, a {word} {thing}; {closing}", None),
    ("What a {word} {thing}!", None),
    ("My experience with the {thing} was {word} from start to finish.", None),
]
VERDICT = {"positive": "recommend it to friends", "negative": "not buy it again"}
CLOSING = {"positive": "I left smiling.", "negative": "I want my money back."}


def rows(rng: random.Random) -> list[dict]:
    out = []
    for label, words in (("positive", POSITIVE), ("negative", NEGATIVE)):
        for _ in range(120):
            template, _ = rng.choice(TEMPLATES)
            text = template.format(thing=rng.choice(THINGS), word=rng.choice(words), verdict=VERDICT[label], closing=CLOSING[label])
            out.append({"text": text, "label": label})
    rng.shuffle(out)
    return out


if __name__ == "__main__":
    target = pathlib.Path(__file__).resolve().parent.parent / "clients" / "data" / "sentiment.jsonl"
    with target.open("w") as f:
        for row in rows(random.Random(11)):
            f.write(json.dumps(row) + "\n")
    print(f"wrote {target}")
