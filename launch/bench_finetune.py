"""Finetune benchmark: training throughput with frozen (cached) against end-to-end encoders, and
full-ranking evaluation throughput and memory at 100k and 1M items.

    python launch/bench_finetune.py [--encoder tiny|small] [--steps 4] [--rounds 4] [--quick]

Training (one process, a world of one rank, one torch thread): one ``Finetuner`` per encoder
mode (``frozen``: content computed once and cached; ``top_k``: the top ``encoder.top_k`` blocks
of both towers train; ``full``: end to end), all built from the same preset, seed and synthetic
data (``data_shards.synth`` + ``build_shards``, as ``tests/conftest.py``), all fed the same
fixed batch of users. ``Finetuner.train_step`` is timed over ``--rounds`` interleaved rounds of
``--steps`` steps (after one untimed); the fastest step of each mode is reported, in wall and
in process CPU time, as users/s (users of the micro-batch) and positions/s (next-item
predictions: the non-padding targets of the users' windows), and as the ratio frozen / mode.

Evaluation (``finetune.metrics.evaluate_ranking`` with ``embedding_score_fn``, the default
``user_chunk`` and ``item_chunk``): random unit item embeddings, user states that are noisy
copies of their target's embedding (so that the metrics are not all zero and two rankings can
be compared), ``--history`` excluded items per user. One fresh subprocess per catalogue size;
inside it, methods run in interleaved rounds and each run's peak resident memory above the
inputs is read from ``VmHWM`` after resetting it (``/proc/self/clear_refs``, Linux): it counts
torch's allocations, which ``tracemalloc`` does not see. Baseline at ``--naive-items``: the
usual naive full ranking (``torch.topk`` over a U×N score matrix for a chunk of users, the
history masked to -inf). The memory a naive ranking of all users at once would need (the U×N
float32 score matrix alone) is computed, not allocated.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

CONFIGS = Path(__file__).resolve().parent / "configs"
MODES = ("frozen", "top_k", "full")
KS = (10, 50)


def interleaved(steppers: dict[str, Any], steps: int, rounds: int, warmup: int = 1) -> dict:
    """Per stepper, the fastest of ``rounds`` × ``steps`` calls (after ``warmup`` untimed ones
    per round) in wall and in process CPU seconds, and the median wall call.

    The fastest call, not a round mean: the two vCPUs are shared with other jobs, and a whole
    round rarely escapes them while some calls of every stepper do. The process CPU time (one
    torch thread) does not count the time other jobs hold the core.
    """
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, step in steppers.items():
            for _ in range(warmup):
                step()
            for _ in range(steps):
                wall, cpu = time.perf_counter(), time.process_time()
                step()
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        name: {
            "wall": min(wall for wall, _ in values),
            "cpu": min(cpu for _, cpu in values),
            "median": statistics.median(wall for wall, _ in values),
        }
        for name, values in times.items()
    }


# ============================================================================= training


def make_data(workdir: Path, num_items: int, num_users: int) -> dict[str, Path]:
    """The synthetic catalogue, interactions and one shard directory holding every item's clip."""
    from data_shards.build import BuildConfig, build_shards
    from data_shards.synth import synthesize

    synth, shards = workdir / "synth", workdir / "shards"
    if not any(shards.glob("*.tar")):
        synthesize(synth, num_items=num_items, num_users=num_users, seconds=1.0, fps=8,
                   size=32, progress=False)  # fmt: skip
        manifest = workdir / "manifest.jsonl"
        rows = [json.loads(line) for line in (synth / "manifest.jsonl").open()]
        for row in rows:
            row["video"] = str((synth / row["video"]).resolve())
        manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
        build_shards(manifest, shards, BuildConfig(clip_seconds=1.0, fps=8, short_side=32,
                                                   workers=1), progress=False)  # fmt: skip
    return {"synth": synth, "shards": shards}


def finetune_config(encoder: str, mode: str, data: dict[str, Path], output_dir: Path, args):
    """The encoder preset's finetune config on the synthetic data, random encoders.

    ``tiny``: ``finetune_tiny.yaml`` as it ships. ``small``: ``finetune_small.yaml`` with random
    encoders of the pretrain ``small`` preset's architecture (MiniLM text tower) instead of the
    demo's pretraining, fp32 (the CPU precision)."""
    from finetune.config import FinetuneConfig
    from pretrain.config import apply_overrides, from_dict, load_yaml

    raw = load_yaml(CONFIGS / f"finetune_{encoder}.yaml")
    if encoder == "small":
        raw["encoder"] = {key: value for key, value in raw["encoder"].items()
                          if key != "pretrain_dir"}  # fmt: skip
        raw["encoder"] |= {"random_init": True,
                           "random_model": load_yaml(CONFIGS / "small.yaml")["model"]}  # fmt: skip
    synth = data["synth"]
    overrides = [
        f"data.interactions={synth / 'interactions.csv'}",
        f"data.catalogue={synth / 'items.jsonl'}",
        f"data.cold_items={synth / 'synth.json'}",
        f"data.shards=[{data['shards']}]",
        "data.workers=0",
        f"encoder.mode={mode}",
        f"encoder.top_k={args.top_k}",
        "parallel.precision=fp32",
        "train.steps=100000",  # the LR schedule stays in its plateau whatever is timed
        f"train.output_dir={output_dir}",
    ]
    if args.micro_batch:
        overrides.append(f"parallel.micro_batch_size={args.micro_batch}")
    return from_dict(FinetuneConfig, apply_overrides(raw, overrides))


class FixedUsers:
    """Stands in for ``Finetuner.sampler``: every step trains on the same users, so every mode
    sees the same batch."""

    def __init__(self, users: np.ndarray):
        self.users = users

    def next(self, state) -> np.ndarray:
        return self.users


def train_throughput(args, workdir: Path) -> None:
    from finetune.batches import SamplerState
    from finetune.train import Finetuner
    from pretrain.distributed import init_distributed

    world = init_distributed()  # a world of one rank, as a plain `vidrec finetune` runs
    data = make_data(workdir, args.items, args.users)
    trainers, users = {}, None
    for mode in args.modes:
        started = time.perf_counter()
        config = finetune_config(args.encoder, mode, data, workdir / f"out-{mode}", args)
        trainer = trainers[mode] = Finetuner(config, world)
        if users is None:  # the first batch the seeded sampler draws, for every mode
            users = trainer.sampler.next(SamplerState())
        trainer.sampler = FixedUsers(users)
        trainer.engine.train()
        print(f"  built {mode:6s} Finetuner in {time.perf_counter() - started:5.1f} s", flush=True)
    first = trainers[args.modes[0]]
    length = first.config.data.max_history_length
    # next-item rows of a user: the targets of its last L + 1 training items
    positions = int(np.minimum(first.batcher.sequences.lengths()[users], length + 1).sum()
                    - len(users))  # fmt: skip
    encoder = first.engine.module.item_tower.encoder
    parameters = sum(p.numel() for p in encoder.parameters())
    trainable = {
        mode: sum(
            p.numel() for p in t.engine.module.item_tower.encoder.parameters() if p.requires_grad
        )  # fmt: skip
        for mode, t in trainers.items()
    }
    video = encoder.config.video_config
    print(
        f"\n== finetune train_step: {args.encoder} encoders ({parameters / 1e6:.1f}M parameters, "
        f"clips of {video.num_frames}×{video.image_size}²), {first.num_items} items, "
        f"micro-batch {len(users)} users = {positions} next-item positions (window "
        f"L={length}), {first.config.loss.uniform_negatives} uniform negatives, fp32, "
        f"ZeRO {first.config.parallel.zero_stage}, world of 1 =="
    )
    steppers = {mode: trainer.train_step for mode, trainer in trainers.items()}
    times = interleaved(steppers, args.steps, args.rounds)
    base = args.modes[0]
    for mode, best in times.items():
        label = f"{mode} (top {args.top_k})" if mode == "top_k" else mode
        line = (
            f"{label:12s} {1000 * best['wall']:8.1f} ms/step wall (median "
            f"{1000 * best['median']:8.1f}), {1000 * best['cpu']:8.1f} CPU; "
            f"{len(users) / best['wall']:7.1f} users/s, {positions / best['wall']:8.1f} "
            f"positions/s wall ({positions / best['cpu']:8.1f} CPU); "
            f"{trainable[mode] / 1e6:5.2f}M encoder params train"
        )
        if mode != base:
            line += (
                f"; samples/s {base}/{mode}: wall {best['wall'] / times[base]['wall']:5.1f}×, "
                f"CPU {best['cpu'] / times[base]['cpu']:5.1f}×"
            )
        print(line)
    for trainer in trainers.values():
        trainer.engine.destroy()


# ============================================================================= evaluation


def make_eval_inputs(num_items: int, num_users: int, dim: int, history: int, seed: int = 0):
    """Unit item embeddings (row 0 is padding), users = normalized target + noise, histories of
    ``history`` distinct items other than the target; built in place (no transient copies, so
    the memory peak of the inputs is the inputs)."""
    generator = torch.Generator().manual_seed(seed)
    items = torch.empty(num_items, dim).normal_(generator=generator)  # (N, D)
    items /= items.norm(dim=1, keepdim=True)
    rng = np.random.default_rng(seed)
    targets = rng.integers(1, num_items, num_users)  # (U,)
    histories = np.empty((num_users, history), dtype=np.int64)  # (U, H)
    for user, target in enumerate(targets):
        drawn = rng.choice(num_items - 2, history, replace=False) + 1  # in [1, N - 1)
        histories[user] = np.where(drawn >= target, drawn + 1, drawn)  # skip the target
    users = torch.empty(num_users, dim).normal_(generator=generator)  # (U, D)
    users *= 5.0 / math.sqrt(dim)  # noise of norm ~5 around the unit target: ranks spread
    users += items[torch.from_numpy(targets)]
    users /= users.norm(dim=1, keepdim=True)
    return items, users, torch.from_numpy(targets), histories


def naive_topk_ranking(items, users, targets, histories, chunk: int, k: int = max(KS)):
    """The usual full ranking: per chunk of users, the whole (u, N) score matrix, history and
    padding set to -inf, ``torch.topk``; metrics from the target's place in the top k."""
    hits = {f"hr@{cut}": 0.0 for cut in KS}
    hits |= {f"ndcg@{cut}": 0.0 for cut in KS}
    history = torch.from_numpy(histories)
    with torch.no_grad():
        for start in range(0, len(users), chunk):
            scores = users[start : start + chunk] @ items.T  # (u, N)
            scores.scatter_(1, history[start : start + chunk], -math.inf)
            scores[:, 0] = -math.inf  # padding
            top = scores.topk(k, dim=1).indices  # (u, k)
            found = top == targets[start : start + chunk, None]
            rank = found.float().argmax(dim=1) + 1  # 1-based; meaningless where not found
            present = found.any(dim=1)
            for cut in KS:
                hit = present & (rank <= cut)
                hits[f"hr@{cut}"] += hit.sum().item()
                hits[f"ndcg@{cut}"] += (hit / torch.log2(rank + 1.0)).sum().item()
    return {name: value / len(users) for name, value in hits.items()}


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the kernel (glibc ``malloc_trim``), so that a run's
    peak is not hidden in memory an earlier run freed but the allocator kept."""
    gc.collect()
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def memory_kb() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in kB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def eval_worker(args) -> None:
    """One catalogue size, in a fresh process: prints one JSON line of per-method figures."""
    from finetune.metrics import evaluate_ranking

    torch.set_num_threads(args.threads)
    items, users, targets, histories = make_eval_inputs(
        args.worker_items, args.eval_users, args.dim, args.history
    )
    offsets = np.arange(len(users) + 1) * args.history  # CSR histories, as Sequences holds them

    def chunked(count: int) -> dict[str, float]:
        csr = types.SimpleNamespace(offsets=offsets[: count + 1], items=histories.ravel())
        return evaluate_ranking(
            targets[:count], user_states=users[:count], item_embeddings=items, histories=csr
        )

    def naive(count: int) -> dict[str, float]:
        return naive_topk_ranking(
            items, users[:count], targets[:count], histories[:count], args.naive_chunk
        )

    methods = {"chunked": chunked, "naive": naive} if args.worker_naive else {"chunked": chunked}
    figures = {name: {"wall": math.inf, "cpu": math.inf, "peak_kb": 0} for name in methods}
    for run in methods.values():  # warm-up on one user chunk: first-touch allocations
        run(256)
    for _ in range(args.eval_rounds):
        for name, run in methods.items():
            release_freed_memory()
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            rss, _ = memory_kb()
            wall, cpu = time.perf_counter(), time.process_time()
            metrics = run(len(users))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            peak = memory_kb()[1] - rss
            figure = figures[name]
            figure.update(wall=min(figure["wall"], wall), cpu=min(figure["cpu"], cpu),
                          peak_kb=max(figure["peak_kb"], peak), metrics=metrics)  # fmt: skip
    inputs = (items.numel() + users.numel()) * 4 + histories.nbytes
    print(json.dumps({"inputs_bytes": inputs, "methods": figures}))


def eval_throughput(args) -> None:
    from finetune.metrics import rank_targets

    defaults = {name: rank_targets.__kwdefaults__[name] for name in ("user_chunk", "item_chunk")}
    print(
        f"\n== full-ranking evaluation: {args.eval_users} users, D={args.dim}, {args.history} "
        f"history items excluded per user, evaluate_ranking at user_chunk "
        f"{defaults['user_chunk']}, item_chunk {defaults['item_chunk']}; naive: torch.topk over "
        f"(chunk of {args.naive_chunk} users × N) scores; best of {args.eval_rounds} "
        f"interleaved rounds, one fresh process per catalogue size =="
    )
    print("peak = VmHWM above the RSS before the call (reset by /proc/self/clear_refs), in MB")
    shared = {"eval-users": args.eval_users, "dim": args.dim, "history": args.history,
              "eval-rounds": args.eval_rounds, "naive-chunk": args.naive_chunk,
              "threads": args.threads}  # fmt: skip
    for num_items in args.eval_items:
        command = [sys.executable, __file__, "--eval-worker", "--worker-items", str(num_items)]
        for name, value in shared.items():
            command += [f"--{name}", str(value)]
        if num_items in args.naive_items:
            command.append("--worker-naive")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"eval worker for {num_items} items failed:\n{done.stderr}")
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        inputs_mb = figures["inputs_bytes"] / 2**20
        full_matrix = args.eval_users * num_items * 4  # the U×N float32 scores alone
        for name, figure in figures["methods"].items():
            peak = figure["peak_kb"] * 1024
            label = {"chunked": "evaluate_ranking", "naive": "naive topk"}[name]
            metrics = figure["metrics"]
            line = (
                f"{num_items:>9,d} items {label:16s} {args.eval_users / figure['wall']:8.1f} "
                f"users/s wall ({args.eval_users / figure['cpu']:8.1f} CPU), "
                f"{figure['wall']:6.2f} s; peak {peak / 2**20:7.1f} MB (inputs "
                f"{inputs_mb:.0f} MB); hr@10 {metrics['hr@10']:.4f} hr@50 "
                f"{metrics['hr@50']:.4f} ndcg@50 {metrics['ndcg@50']:.4f}"
            )
            if name == "chunked":
                line += (
                    f"\n{'':16s}naive full U×N float32 scores would need "
                    f"{full_matrix / 2**20:8.1f} MB: naive/bounded {full_matrix / peak:6.1f}×"
                )
            else:
                chunked = figures["methods"]["chunked"]
                wall, cpu = figure["wall"] / chunked["wall"], figure["cpu"] / chunked["cpu"]
                line += f"\n{'':16s}users/s chunked/naive: wall {wall:.2f}, CPU {cpu:.2f}"
            print(line, flush=True)


# ============================================================================= main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: fewer steps, rounds and evaluation users")  # fmt: skip
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 because OpenMP threads that spin-wait for a core "
                        "held by another job crawl on this shared machine")  # fmt: skip
    train = parser.add_argument_group("training")
    train.add_argument("--encoder", choices=("tiny", "small"), default="tiny",
                       help="finetune preset; small: random encoders of the pretrain small "
                       "architecture (e2e steps take seconds to minutes on CPU)")  # fmt: skip
    train.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                       help="the first is the baseline of the ratios")  # fmt: skip
    train.add_argument("--top-k", type=int, default=1, help="encoder.top_k in top_k mode")
    train.add_argument("--micro-batch", type=int, default=0, help="users; 0: the preset's")
    train.add_argument("--items", type=int, default=64, help="synthetic catalogue items")
    train.add_argument("--users", type=int, default=48, help="synthetic users")
    train.add_argument("--steps", type=int, default=4, help="timed steps per round")
    train.add_argument("--rounds", type=int, default=4, help="rounds; the best step is reported")
    train.add_argument("--workdir", default=None, help="default: a temporary directory")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval-items", nargs="*", type=int, default=[100_000, 1_000_000],
                            help="catalogue sizes N (rows, padding included)")  # fmt: skip
    evaluation.add_argument("--naive-items", nargs="*", type=int, default=[100_000],
                            help="sizes that also run the naive torch.topk baseline")  # fmt: skip
    evaluation.add_argument("--eval-users", type=int, default=2000)
    evaluation.add_argument("--dim", type=int, default=256)
    evaluation.add_argument("--history", type=int, default=50, help="excluded items per user")
    evaluation.add_argument("--naive-chunk", type=int, default=256, help="users per U×N block")
    evaluation.add_argument("--eval-rounds", type=int, default=2)
    worker = parser.add_argument_group("internal: one evaluation subprocess")
    worker.add_argument("--eval-worker", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--worker-items", type=int, help=argparse.SUPPRESS)
    worker.add_argument("--worker-naive", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.eval_worker:
        eval_worker(args)
        return
    if args.quick:
        args.steps, args.rounds, args.eval_rounds = 2, 2, 1
        args.eval_users = min(args.eval_users, 500)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import deepspeed

    print(
        f"machine: {platform.processor() or platform.machine()}, {multiprocessing.cpu_count()} "
        f"cores, load average {os.getloadavg()[0]:.2f}; {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, deepspeed {deepspeed.__version__}"
    )
    started = time.perf_counter()
    if not args.skip_train:
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vidrec-bench-finetune-"))
        workdir.mkdir(parents=True, exist_ok=True)
        train_throughput(args, workdir)
    if not args.skip_eval:
        eval_throughput(args)
    print(
        f"\ntotal {time.perf_counter() - started:.0f} s; load average at the end "
        f"{os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
