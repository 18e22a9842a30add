"""Ranking quality on the demo data over several seeds: recommender variants (``VARIANTS``:
content or hybrid item tower, joint or pooled item text, ID dropout, the popularity prior
counted or predicted from content; default the content and hybrid towers as
finetune_small.yaml configures them), beside the baselines of the same runs
(ID-SASRec, popularity, content-kNN); test split, warm and cold-start targets, mean ± sd over
the seeds.

    python launch/bench_ranking.py --demo-dir demo_output [--seeds 0 1 2] [--ranks 2]
        [--variants content hybrid content-joint ...]

``--demo-dir`` is what ``bash launch/demo.sh`` leaves in ``VIDREC_DEMO_DIR``: the synthetic
data, its shards and the pretraining the demo's finetune starts from. Each (seed, variant)
is one ``vidrec finetune`` started as the demo starts it (``launch/finetune.sh``:
``launch/configs/finetune_small.yaml``, the deepspeed launcher, ``--ranks`` CPU ranks, the
demo's data overrides), with ``train.seed`` and the variant's overrides set, in its own
directory under ``--workdir``, on this tree's code. A later run starts with the content cache
of an earlier one and, for the same seed, its ID-SASRec baseline copied in: both files are
fingerprinted, so a run takes them only if they are what it would compute. A run whose
``metrics.json`` is complete is read, not rerun (``--fresh`` clears the work directory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DROPOUT = ["model.id_embeddings=true", "model.id_dropout=0.5"]
"""The hybrid tower with DropoutNet's share of dropped IDs (p = 0.5), not tuned."""
VARIANTS = {
    "content": ("content", ["model.id_embeddings=false"]),
    "hybrid": ("hybrid", ["model.id_embeddings=true"]),
    "content-joint": ("content", ["model.id_embeddings=false", "model.item_text=joint"]),
    "content-pooled": ("content", ["model.id_embeddings=false", "model.item_text=pooled"]),
    "hybrid-pooled": ("hybrid", ["model.id_embeddings=true", "model.item_text=pooled"]),
    "content+pop": ("content+pop", ["model.id_embeddings=false", "model.popularity_prior=true"]),
    "hybrid+dropout": ("hybrid", DROPOUT),
    "content+predpop": (
        "content+predpop",
        ["model.id_embeddings=false", "model.popularity_prior=true", "model.predicted_prior=true"],
    ),
    "hybrid+dropout+predpop": (
        "hybrid+predpop",
        [*DROPOUT, "model.popularity_prior=true", "model.predicted_prior=true"],
    ),
}
"""Variant → (the model's name in metrics.json, its overrides of finetune_small.yaml)."""
WIDTH = max(map(len, VARIANTS))
"""Of the name column of the printed tables."""
BASELINES = ("ID-SASRec", "popularity", "content-kNN")
COLUMNS = (("warm", "hr@10"), ("warm", "ndcg@10"), ("cold", "hr@10"), ("cold", "ndcg@10"))
SHARED_FILES = ("item_content.safetensors", "id_sasrec.safetensors")


def demo_overrides(demo: Path, output_dir: Path) -> list[str]:
    """launch/demo.sh's finetune overrides."""
    synth = demo / "synth"
    return [
        f"data.interactions={synth / 'interactions.csv'}",
        f"data.catalogue={synth / 'items.jsonl'}",
        f"data.cold_items={synth / 'synth.json'}",
        f"data.shards=[{demo / 'shards_warm'}, {demo / 'shards_cold'}]",
        f"encoder.pretrain_dir={demo / 'pretrain'}",
        f"train.output_dir={output_dir}",
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def finetune(demo: Path, output_dir: Path, seed: int, variant: str, args) -> float:
    """One demo finetune run (its output in ``output_dir / "finetune.log"``); wall seconds."""
    settings = demo_overrides(demo, output_dir) + [
        f"train.steps={args.steps}",
        f"train.seed={seed}",
        *VARIANTS[variant][1],
    ]
    command = ["bash", str(ROOT / "launch" / "finetune.sh")]
    for setting in settings:
        command += ["--set", setting]
    env = dict(os.environ, GPUS=str(args.ranks), MASTER_PORT=str(free_port()))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    output_dir.mkdir(parents=True, exist_ok=True)
    log = output_dir / "finetune.log"
    started = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"finetune {output_dir.name} failed ({done.returncode}):\n{tail}")
    return time.perf_counter() - started


def share_files(workdir: Path, output_dir: Path, seed: int) -> None:
    """The content cache of any earlier run, the ID-SASRec baseline of the same seed."""
    for name in SHARED_FILES:
        if (output_dir / name).is_file():
            continue
        pattern = f"seed{seed}-*/{name}" if name.startswith("id_sasrec") else f"*/{name}"
        for found in sorted(workdir.glob(pattern)):
            output_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(found, output_dir / name)
            break


def completed(output_dir: Path, steps: int) -> dict | None:
    path = output_dir / "metrics.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results if results.get("step") == steps else None


def figures(groups: dict) -> list[float]:
    return [groups[group][metric] for group, metric in COLUMNS]


def cell(values: list[float]) -> str:
    """mean ± sd (n - 1) of one figure over the seeds."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def print_table(by_model: dict[str, list[dict]], seeds: list[int]) -> None:
    header = f"{'model':<{WIDTH}} " + " ".join(f"{g + ' ' + m.upper():>15}" for g, m in COLUMNS)
    print(f"\n== test split, mean ± sd over seeds {' '.join(map(str, seeds))} ==")
    print(header + "\n" + "-" * len(header))
    for model, runs in by_model.items():
        cells = [cell([run[group][metric] for run in runs]) for group, metric in COLUMNS]
        print(f"{model:<{WIDTH}} " + " ".join(f"{c:>15}" for c in cells))
    print("\nper seed (warm HR@10 / NDCG@10, cold HR@10 / NDCG@10):")
    for model, runs in by_model.items():
        figures = [
            "/".join(f"{run[group][metric]:.3f}" for group, metric in COLUMNS) for run in runs
        ]
        cells = "  ".join(f"{s}: {f}" for s, f in zip(seeds, figures, strict=True))
        print(f"{model:<{WIDTH}} {cells}")


def print_margins(by_model: dict[str, list[dict]], variants: list[str]) -> None:
    """Each trained model's mean minus the best baseline's mean, per column."""
    print("\nmean minus the best baseline's mean (positive: the model is ahead):")
    for variant in variants:
        parts = []
        for group, metric in COLUMNS:
            mean = statistics.mean(run[group][metric] for run in by_model[variant])
            best, name = max(
                (statistics.mean(run[group][metric] for run in by_model[b]), b)
                for b in BASELINES
                if b in by_model
            )
            parts.append(f"{group} {metric.upper()} {mean - best:+.3f} (vs {name})")
        print(f"{variant:<{WIDTH}} " + "; ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", type=Path, default=ROOT / "demo_output")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=["content", "hybrid"]
    )
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks (the demo's 2)")
    parser.add_argument("--steps", type=int, default=300, help="the demo's 300")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="default: <demo-dir>/bench_ranking")  # fmt: skip
    parser.add_argument("--fresh", action="store_true", help="clear the work directory first")
    args = parser.parse_args()
    demo = args.demo_dir.resolve()
    for needed in ("synth/interactions.csv", "shards_warm", "shards_cold", "pretrain/checkpoints"):
        if not (demo / needed).exists():
            raise SystemExit(f"{demo / needed} is missing: run `bash launch/demo.sh` first")
    workdir = (args.workdir or demo / "bench_ranking").resolve()
    if args.fresh and workdir.exists():
        shutil.rmtree(workdir)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
        f"average {os.getloadavg()[0]:.2f}; demo {demo}; {args.ranks} ranks, {args.steps} steps"
    )
    started = time.perf_counter()
    by_model: dict[str, list[dict]] = {}
    counts = None
    for seed in args.seeds:
        for index, variant in enumerate(args.variants):
            output_dir = workdir / f"seed{seed}-{variant}"
            results = completed(output_dir, args.steps)
            if results is None:
                share_files(workdir, output_dir, seed)
                seconds = finetune(demo, output_dir, seed, variant, args)
                results = completed(output_dir, args.steps)
                print(f"  seed {seed} {variant:<{WIDTH}} {seconds:6.0f} s", flush=True)
            else:
                print(f"  seed {seed} {variant:<{WIDTH}} read from {output_dir}", flush=True)
            test = results["metrics"]["test"]
            model = test[VARIANTS[variant][0]]
            counts = {group: int(model[group]["count"]) for group in ("warm", "cold")}
            by_model.setdefault(variant, []).append(model)
            for baseline in BASELINES:
                if baseline not in test:
                    continue
                if index == 0:  # the baselines once per seed (a later run reuses them)
                    by_model.setdefault(baseline, []).append(test[baseline])
                elif figures(test[baseline]) != figures(by_model[baseline][-1]):
                    print(f"  note: {baseline} differs between the runs of seed {seed}")
    print(f"\n{counts['warm']} warm and {counts['cold']} cold-start test targets")
    order = [*args.variants, *(b for b in BASELINES if b in by_model)]
    print_table({model: by_model[model] for model in order}, args.seeds)
    print_margins(by_model, args.variants)
    print(
        f"\ntotal {time.perf_counter() - started:.0f} s; load average at the end "
        f"{os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
