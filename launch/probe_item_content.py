"""What an item content cache knows about the synthetic items' attributes: a ridge-regression
linear probe per attribute (shape, colour, size, background, direction, speed, motion), fitted
on the warm items and scored on the cold-start ones (held-out accuracy), for the cache's text
and video embeddings and, with ``--minilm``, the packaged MiniLM's own mean-pooled sentence
embedding of the same item texts (title, caption, tags), as no pretraining left it.

    python launch/probe_item_content.py FINETUNE_DIR/item_content.safetensors \\
        DEMO/synth/items.jsonl [--minilm]

Chance is 1 / (the attribute's number of values): shape 17%, colour 14%, size 50%,
background 25%, direction 12.5%, speed 50%, motion 33%.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ATTRIBUTES = ("shape", "colour", "size", "background", "direction", "speed", "motion")
RIDGE = 0.1


def attribute(item: dict, name: str) -> str:
    return item["motion"] if name == "motion" else item["attributes"][name]


def probe(features: np.ndarray, items: list[dict], cold: np.ndarray) -> dict[str, float]:
    """Held-out accuracy per attribute of a one-vs-rest ridge probe on ``features`` (N, E)."""
    rows = np.c_[features, np.ones(len(features))]
    train, test = rows[~cold], rows[cold]
    accuracy = {}
    for name in ATTRIBUTES:
        values = sorted({attribute(item, name) for item in items})
        labels = np.array([values.index(attribute(item, name)) for item in items])
        targets = np.eye(len(values))[labels[~cold]]
        weights = np.linalg.solve(
            train.T @ train + RIDGE * np.eye(train.shape[1]), train.T @ targets
        )
        accuracy[name] = float(((test @ weights).argmax(axis=1) == labels[cold]).mean())
    return accuracy


def minilm_features(items: list[dict]) -> np.ndarray:
    from transformers import AutoModel

    from data_shards.text import default_text_model_dir, load_tokenizer

    tokenizer = load_tokenizer()
    model = AutoModel.from_pretrained(str(default_text_model_dir()), local_files_only=True).eval()
    texts = [f"{item['title']}. {item['caption']}. {item['tags']}" for item in items]
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        tokens = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return F.normalize((tokens * mask).sum(1) / mask.sum(1), dim=-1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path, help="an item_content.safetensors of a finetune run")
    parser.add_argument("items", type=Path, help="the synthetic catalogue, items.jsonl")
    parser.add_argument("--minilm", action="store_true", help="also the packaged MiniLM")
    args = parser.parse_args()
    items = [json.loads(line) for line in args.items.read_text().splitlines()]
    cold = np.array([item["cold_start"] for item in items])
    content = load_file(str(args.cache))  # row 0 is padding
    features = {name: content[name][1:].numpy() for name in ("text", "video")}
    if args.minilm:
        features["MiniLM (no pretraining)"] = minilm_features(items)
    print(f"{len(items) - cold.sum()} warm items to fit, {cold.sum()} cold-start to score")
    print(f"{'features':<24} " + " ".join(f"{name:>10}" for name in ATTRIBUTES))
    for name, matrix in features.items():
        accuracy = probe(matrix, items, cold)
        print(f"{name:<24} " + " ".join(f"{100 * accuracy[a]:>9.0f}%" for a in ATTRIBUTES))


if __name__ == "__main__":
    main()
