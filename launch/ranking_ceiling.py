"""What ranking quality the synthetic data allows: the test split's NDCG@10 (warm and
cold-start targets) of rankers that know what no model is given, from ``vidrec shards synth``'s
own files.

- taste: each user's true taste score of every item (``users.jsonl``, the generator's
  preference weights), the generator's own ranking but for its popularity share;
- taste + b · prior: plus b × the centred log(1 + training count), cold-start items at 0,
  what ``model.popularity_prior`` adds;
- one-hot content-kNN: the mean of the history's attribute one-hots, cosine to each item's,
  on all seven attributes and on the four the users' tastes are made of.

    python launch/ranking_ceiling.py DEMO/synth

Split as the finetune stage splits: each user's last engaged interaction is the test target,
the history before it is excluded from the ranking; ties are broken at random (seeded).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from data_shards.synth import PREFERENCE_WEIGHTS, Item, User, preference_matches

ATTRIBUTES = ("shape", "colour", "size", "background", "direction", "speed", "motion")
TASTE_ATTRIBUTES = ("colour", "shape", "motion", "speed")


def ndcg_at_10(scores: np.ndarray, history: list[int], target: int) -> float:
    scores = scores.copy()
    scores[history] = -np.inf
    rank = int((scores > scores[target]).sum())
    return 1 / math.log2(rank + 2) if rank < 10 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("synth", type=Path, help="the output directory of `vidrec shards synth`")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    items = [json.loads(line) for line in (args.synth / "items.jsonl").read_text().splitlines()]
    users = {
        row["user_id"]: User(**(row | {"colours": tuple(row["colours"])}))
        for row in map(json.loads, (args.synth / "users.jsonl").read_text().splitlines())
    }
    generated = [
        Item(
            item_id=item["item_id"],
            start=tuple(item["start"]),
            cold_start=item["cold_start"],
            caption=item["caption"],
            **item["attributes"],
        )
        for item in items
    ]
    row = {item["item_id"]: index for index, item in enumerate(items)}
    cold = np.array([item["cold_start"] for item in items])
    engaged = defaultdict(list)
    with (args.synth / "interactions.csv").open() as handle:
        for record in csv.DictReader(handle):
            if record["label"] == "1":
                engaged[record["user_id"]].append(row[record["item_id"]])
    counts = np.zeros(len(items))
    for sequence in engaged.values():
        for index in sequence[:-2]:  # training rows: all but validation and test
            counts[index] += 1
    log_counts = np.log1p(counts)
    prior = np.where(counts > 0, log_counts - log_counts[counts > 0].mean(), 0.0)

    def value(item: dict, name: str) -> str:
        return item["motion"] if name == "motion" else item["attributes"][name]

    def one_hot(names: tuple[str, ...]) -> np.ndarray:
        vocabulary = sorted({(n, value(item, n)) for item in items for n in names})
        columns = {entry: j for j, entry in enumerate(vocabulary)}
        matrix = np.zeros((len(items), len(vocabulary)))
        for i, item in enumerate(items):
            for name in names:
                matrix[i, columns[(name, value(item, name))]] = 1
        return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)

    one_hots = {"all seven": one_hot(ATTRIBUTES), "the four of taste": one_hot(TASTE_ATTRIBUTES)}
    results = defaultdict(lambda: defaultdict(list))
    for user_id, sequence in engaged.items():
        if len(sequence) < 3:
            continue
        target, history = sequence[-1], sequence[:-1]
        group = "cold" if cold[target] else "warm"
        # the generator's own taste: the weights of the preferences an item matches
        taste = np.array(
            [
                sum(PREFERENCE_WEIGHTS[name] for name, hit in matches.items() if hit)
                for matches in (preference_matches(users[user_id], item) for item in generated)
            ]
        )
        jitter = 1e-6 * rng.random(len(items))  # random tie-breaking
        for b in (0.0, 0.5, 1.0):
            name = "taste" if b == 0 else f"taste + {b:g} · prior"
            results[name][group].append(ndcg_at_10(taste + b * prior + jitter, history, target))
        for name, matrix in one_hots.items():
            scores = matrix @ matrix[history].mean(axis=0) + jitter
            results[f"one-hot content-kNN, {name}"][group].append(
                ndcg_at_10(scores, history, target)
            )
    print(f"{'ranker':<40} {'warm NDCG@10':>13} {'cold NDCG@10':>13}")
    for name, groups in results.items():
        warm, cold_start = np.mean(groups["warm"]), np.mean(groups["cold"])
        print(f"{name:<40} {warm:>13.3f} {cold_start:>13.3f}")


if __name__ == "__main__":
    main()
