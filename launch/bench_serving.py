"""Serving at catalogue scale: exact scoring against the item index, in one run, over a million
items whose embeddings have the structure of real ones; and ``index add`` timed.

    python launch/bench_serving.py [--items 1000000] [--users 10000] [--dim 256]
        [--factory auto] [--nprobe 16] [--sweep 8 32 48] [--candidates 100] [--add 10000]
        [--workdir DIR] [--json FILE]

Items: the synthetic catalogue's captions (``data_shards.synth``, ``--base-items`` of them)
embedded by the packaged all-MiniLM-L6-v2 (the small preset's text tower; mean pooled), taken
to ``--dim`` by a random orthogonal map as the item tower's projection would, then replicated
with noise to ``--items`` (each copy: a base item plus Gaussian noise, cosine about 0.9 to it),
with a popularity prior column as the dot head adds it (``finetune.item_index``). Users: a
taste (a base item and its 7 nearest base items), 20 history items drawn from the copies of
those, the state the normalized mean of their embeddings (content-kNN's user state), the 20
seen items excluded from both rankings.

Exact: every item scored (one matmul per user chunk of pre-normalized vectors, top 10; the
served ``score_items`` also normalizes the table on every call, so this baseline is the faster
one). Index: ``ItemIndex.search`` for ``--candidates`` + 20 rows, re-ranked exactly, top 10:
the search and re-rank of ``finetune.serving``, on bare tensors. The two
run interleaved, chunk by chunk, on the same users; users/s are medians over chunks with the
range, the ratio the median of per-chunk ratios. recall@10 = |index top 10 ∩ exact top 10| / 10.

``index add`` (``--add``): a tiny recommender export (``finetune_tiny.yaml`` with
``model.dim=--dim``, random encoders: built in ``--workdir`` unless ``--model`` names one) is
grown to ``--items`` with ``add_embedded_items`` (the bulk path; it rebuilds the index as IVF),
then ``--add`` new items are added: once embedded elsewhere (``add_embedded_items``: index and
commit only) and once by ``vidrec index add``'s path from their text (``add_items``: the tiny
item tower embeds them). The small preset's text tower (MiniLM) embedding the same texts is
timed beside it, since that, not the index, dominates an add with a real model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_shards.synth import make_items  # noqa: E402
from data_shards.text import resolve_text_model_dir  # noqa: E402
from finetune.item_index import IndexSettings, ItemIndex  # noqa: E402

HISTORY = 20
TOP = 10


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.1f} [{min(values):,.1f}, {max(values):,.1f}]"


# ============================================================================= data


@torch.no_grad()
def minilm_embeddings(texts: list[str], batch: int = 256) -> tuple[torch.Tensor, float]:
    """(B, 384) normalized mean-pooled MiniLM sentence embeddings, and texts/s."""
    from transformers import AutoModel, AutoTokenizer

    directory = str(resolve_text_model_dir(None))
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModel.from_pretrained(directory, local_files_only=True).eval()
    parts, started = [], time.perf_counter()
    for start in range(0, len(texts), batch):
        tokens = tokenizer(texts[start : start + batch], padding=True, truncation=True,
                           max_length=32, return_tensors="pt")  # fmt: skip
        hidden = model(**tokens).last_hidden_state  # (B, L, 384)
        mask = tokens["attention_mask"][..., None].float()
        parts.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(parts), len(texts) / (time.perf_counter() - started)


def catalogue(base: torch.Tensor, count: int, dim: int, seed: int):
    """(count, dim) item embeddings: base items through a random orthogonal map, replicated
    with noise; (count,) their base item; (count,) a popularity prior in cosine units."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((base.shape[1], base.shape[1])))
    projected = base.numpy() @ rotation[:, :dim].astype(np.float32)  # (B, dim)
    projected /= np.linalg.norm(projected, axis=1, keepdims=True)
    origin = np.arange(count) % len(projected)
    items = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 100_000):  # noise of norm ~0.5: cosine ~0.9 to the base item
        stop = min(count, start + 100_000)
        noise = rng.standard_normal((stop - start, dim)).astype(np.float32) * (0.5 / dim**0.5)
        block = projected[origin[start:stop]] + noise
        items[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    prior = (0.05 * rng.standard_normal(count)).astype(np.float32)  # w · centred log count
    return items, origin, prior, projected


def users(projected: np.ndarray, origin_count: int, items: np.ndarray, count: int, seed: int):
    """(count, dim + 1) query vectors and (count, HISTORY) seen item indices."""
    rng = np.random.default_rng(seed + 1)
    similarity = projected @ projected.T
    neighbours = np.argsort(-similarity, axis=1)[:, :8]  # each base item and its 7 nearest
    copies = len(items) // origin_count
    seen = np.empty((count, HISTORY), dtype=np.int64)
    for user in range(count):
        taste = neighbours[rng.integers(origin_count)]
        bases = rng.choice(taste, HISTORY)
        seen[user] = bases + origin_count * rng.integers(0, copies, HISTORY)
    states = items[seen].mean(axis=1)
    states /= np.linalg.norm(states, axis=1, keepdims=True)
    return np.concatenate([states, np.ones((count, 1), np.float32)], axis=1), seen


# ============================================================================= the two searches


def exact_top(queries: torch.Tensor, vectors: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    scores = queries @ vectors.T  # (B, N)
    scores.scatter_(1, seen, -torch.inf)
    return scores.topk(TOP, dim=1).indices


def index_top(index: ItemIndex, queries, vectors: torch.Tensor, seen: torch.Tensor, extra: int):
    _, found = index.search(queries.numpy(), extra)
    found = torch.from_numpy(found)  # (B, C), -1 where the index found fewer
    rows = found.clamp(min=0)
    scores = torch.einsum("bd,bcd->bc", queries, vectors[rows])  # the exact re-rank
    excluded = (rows[:, :, None] == seen[:, None, :]).any(dim=2) | (found < 0)  # (B, C)
    scores = scores.masked_fill(excluded, -torch.inf)
    return rows.gather(1, scores.topk(TOP, dim=1).indices)


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True)]
    return sum(hits) / (TOP * len(found))


# ============================================================================= index add


def tiny_export(workdir: Path, dim: int) -> Path:
    """A recommender export of the tiny test config with ``dim``-wide items (random encoders,
    4 steps on a small synthetic catalogue): what ``index add`` is timed on."""
    export = workdir / "tiny_export"
    if (export / "export_info.json").is_file():
        return export
    vidrec = [sys.executable, str(ROOT / "vidrec_cli.py")]
    synth, shards, run = workdir / "synth", workdir / "shards", workdir / "finetune"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    overrides = [
        f"data.interactions={synth / 'interactions.csv'}",
        f"data.catalogue={synth / 'items.jsonl'}",
        f"data.cold_items={synth / 'synth.json'}",
        f"data.shards=[{shards}]",
        f"train.output_dir={run}",
        f"model.dim={dim}",
        "train.steps=4",
        "baselines.id_sasrec=false",
        "tracking.start_timeout_s=60",
    ]
    steps = [
        ["shards", "synth", "--out", str(synth), "--items", "64", "--users", "16", "--no-progress"],
        ["shards", "build", "--manifest", str(synth / "manifest.jsonl"), "--out", str(shards)],
        ["finetune", "--config", str(ROOT / "launch/configs/finetune_tiny.yaml")]
        + [part for override in overrides for part in ("--set", override)],
        ["export", "--checkpoint", str(run), "--out", str(export)],
    ]  # fmt: skip
    for step in steps:
        subprocess.run(vidrec + step, check=True, env=env, stdout=subprocess.DEVNULL)
    return export


def time_index_add(args, items: np.ndarray, workdir: Path) -> dict:
    from finetune.export import load_recommender
    from finetune.index_update import NewItem, add_embedded_items, add_items

    source = Path(args.model) if args.model else tiny_export(workdir, args.dim)
    export = workdir / "grown_export"
    shutil.rmtree(export, ignore_errors=True)
    shutil.copytree(source, export)
    start_count = load_recommender(export).num_items
    bulk = len(items) - start_count
    started = time.perf_counter()
    report = add_embedded_items(export, [f"bulk_{i}" for i in range(bulk)],
                                torch.from_numpy(items[:bulk]))  # fmt: skip
    figures = {"bulk_items": bulk, "bulk_s": time.perf_counter() - started,
               "bulk_parts": report.seconds}  # fmt: skip
    started = time.perf_counter()
    grown = load_recommender(export)
    figures["load_s"] = time.perf_counter() - started
    figures["index"] = grown.index.factory
    rng = np.random.default_rng(7)
    noise = rng.standard_normal((args.add, items.shape[1])).astype(np.float32) * 0.02
    fresh = torch.nn.functional.normalize(torch.from_numpy(items[: args.add] + noise), dim=-1)
    started = time.perf_counter()
    report = add_embedded_items(export, [f"embedded_{i}" for i in range(args.add)], fresh)
    figures["add_embedded_s"] = time.perf_counter() - started
    figures["add_embedded_parts"] = report.seconds
    texts = [item.caption for item in make_items(rng, args.add, 0.0)]
    new_items = [NewItem(f"uploaded_{i}", text) for i, text in enumerate(texts)]
    started = time.perf_counter()
    report = add_items(export, new_items, batch_size=256)
    figures["add_items_s"] = time.perf_counter() - started
    figures["add_items_parts"] = report.seconds
    figures["catalogue_after"] = load_recommender(export).num_items
    _, figures["minilm_texts_per_s"] = minilm_embeddings(texts[:2000])
    shutil.rmtree(export, ignore_errors=True)
    return figures


# ============================================================================= main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=256, help="item embedding size D (demo: 256)")
    parser.add_argument("--base-items", type=int, default=2000)
    parser.add_argument("--factory", default="auto")
    parser.add_argument("--nprobe", type=int, default=IndexSettings.nprobe)
    parser.add_argument("--sweep", type=int, nargs="*", default=[16, 32, 64],
                        help="other nprobe values, index only, after the main run")  # fmt: skip
    parser.add_argument("--candidates", type=int, default=IndexSettings.candidates)
    parser.add_argument("--chunk", type=int, default=250, help="users per timed chunk")
    parser.add_argument("--add", type=int, default=10_000, help="items for index add (0: skip)")
    parser.add_argument("--model", help="a recommender export to grow for --add (D = --dim)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_serving_"))
    workdir.mkdir(parents=True, exist_ok=True)
    figures: dict = {"args": vars(args), "machine": f"{platform.node()} {os.cpu_count()} CPUs",
                     "threads": torch.get_num_threads()}  # fmt: skip

    rng = np.random.default_rng(args.seed)
    captions = [item.caption for item in make_items(rng, args.base_items, 0.0)]
    base, _ = minilm_embeddings(captions)
    items, _, prior, projected = catalogue(base, args.items, args.dim, args.seed)
    vectors_np = np.concatenate([items, prior[:, None]], axis=1)  # (N, D + 1)
    queries_np, seen_np = users(projected, args.base_items, items, args.users, args.seed)
    vectors, queries, seen = map(torch.from_numpy, (vectors_np, queries_np, seen_np))
    print(f"{args.items:,} items (D = {args.dim}, from {args.base_items} MiniLM captions), "
          f"{args.users:,} users", flush=True)  # fmt: skip

    settings = IndexSettings(exact_below=1, factory=args.factory, nprobe=args.nprobe,
                             candidates=args.candidates)  # fmt: skip
    before = rss_mb()
    started = time.perf_counter()
    index = ItemIndex.build(vectors_np, np.arange(args.items), settings)
    figures["build_s"] = time.perf_counter() - started
    figures["index_rss_mb"] = rss_mb() - before
    figures["factory"] = index.factory
    path = workdir / "item_index.faiss"
    started = time.perf_counter()
    index.write(path)
    figures["write_s"] = time.perf_counter() - started
    figures["file_mb"] = path.stat().st_size / 2**20
    path.unlink()
    print(f"{index.factory}: built in {figures['build_s']:.1f} s, +{figures['index_rss_mb']:.0f} "
          f"MB resident, file {figures['file_mb']:.0f} MB", flush=True)  # fmt: skip

    extra = args.candidates + HISTORY
    exact_rates, index_rates, ratios, truth, found = [], [], [], [], []
    for start in range(0, args.users, args.chunk):
        chunk = slice(start, start + args.chunk)
        size = len(queries[chunk])
        started = time.perf_counter()
        truth.append(exact_top(queries[chunk], vectors, seen[chunk]))
        exact_s = time.perf_counter() - started
        started = time.perf_counter()
        found.append(index_top(index, queries[chunk], vectors, seen[chunk], extra))
        index_s = time.perf_counter() - started
        exact_rates.append(size / exact_s)
        index_rates.append(size / index_s)
        ratios.append(exact_s / index_s)
    truth_all, found_all = torch.cat(truth), torch.cat(found)
    figures |= {
        "exact_users_per_s": exact_rates, "index_users_per_s": index_rates,
        "speedup": ratios, "recall_at_10": recall(found_all, truth_all),
    }  # fmt: skip
    print(f"exact: {spread(exact_rates)} users/s; index (nprobe {args.nprobe}, "
          f"{args.candidates} candidates): {spread(index_rates)} users/s; speed-up "
          f"{spread(ratios)}x; recall@10 {figures['recall_at_10']:.4f}", flush=True)  # fmt: skip

    figures["sweep"] = {}
    for nprobe in args.sweep:
        index.tune(nprobe=nprobe)
        started = time.perf_counter()
        result = torch.cat([index_top(index, queries[s : s + args.chunk], vectors,
                                      seen[s : s + args.chunk], extra)
                            for s in range(0, args.users, args.chunk)])  # fmt: skip
        rate = args.users / (time.perf_counter() - started)
        figures["sweep"][nprobe] = {"users_per_s": rate, "recall_at_10": recall(result, truth_all)}
        print(f"  nprobe {nprobe}: {rate:,.0f} users/s, recall@10 "
              f"{figures['sweep'][nprobe]['recall_at_10']:.4f}", flush=True)  # fmt: skip
    del index

    if args.add:
        figures["index_add"] = time_index_add(args, items, workdir)
        add = figures["index_add"]
        print(f"grown to {args.items:,} items ({add['index']}) in {add['bulk_s']:.1f} s "
              f"{add['bulk_parts']}; loading it: {add['load_s']:.1f} s", flush=True)  # fmt: skip
        print(f"index add of {args.add:,} embedded items: {add['add_embedded_s']:.1f} s "
              f"{add['add_embedded_parts']}")  # fmt: skip
        print(f"index add of {args.add:,} items from text (tiny tower): "
              f"{add['add_items_s']:.1f} s {add['add_items_parts']}; MiniLM: "
              f"{add['minilm_texts_per_s']:.0f} texts/s")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
