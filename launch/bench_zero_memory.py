"""ZeRO memory benchmark: per-rank bytes of weights, gradients and optimizer state at ZeRO
stages 0-3, two CPU ranks.

    python launch/bench_zero_memory.py [--preset small] [--stages 0 1 2 3] [--precision fp32]

One ``deepspeed --num_gpus 2`` launch per stage (DeepSpeed cannot be re-initialized with another
stage in the same process). Each rank builds the preset's ``Pretrainer``, takes one optimizer
step (so that AdamW's state exists), then runs the forward and backward of a second step and,
before that step's ``engine.step()``, adds up the storage of the tensors that hold the training
state. That is the steady-state peak of the training state: weights, gradients and optimizer
state all live at once. Bytes are the sizes of actual tensor storages (each storage counted
once however many views point at it), found from:
- weights: each parameter's storage, or for ZeRO 3 its shard ``p.ds_tensor`` (the full
  parameter is an empty placeholder outside forward);
- master weights: the parameters the inner ``torch.optim.AdamW`` updates when they are not the
  model's (ZeRO 1/2/3 keep an fp32 copy of the rank's partition, even when training in fp32);
- optimizer moments: AdamW's ``exp_avg`` / ``exp_avg_sq`` (and step counters);
- gradients: ``.grad`` of the model's and of the optimizer's parameters, and every tensor held
  by the ZeRO optimizer under a name that says gradient or bucket (``grads_in_partition``,
  ``ipg`` buckets, ``grad_partitions_flat_buffer``, ``averaged_gradients`` …);
- other: any further tensor the ZeRO optimizer holds (printed, so nothing is hidden).
A cross-check sums every tensor storage alive in the process (``gc``), batch included.
Target: ZeRO 3 ≤ 0.55 × ZeRO 0 per rank.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import make_shards, preset_config, synthetic_batch  # noqa: E402

CATEGORIES = ("weights", "master weights", "optimizer moments", "gradients", "other")
GRADIENT_NAMES = ("grad", "ipg", "bucket")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _storage(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(address, bytes) of the storage behind ``tensor``; None for an empty one."""
    storage = tensor.untyped_storage()
    return (storage.data_ptr(), storage.nbytes()) if storage.nbytes() else None


def _walk(obj, path: str, seen: set[int], depth: int = 0):
    """(attribute path, tensor) for every tensor reachable from a DeepSpeed or torch.optim
    object through attributes, dicts and sequences. Modules are not entered: the model's
    tensors are counted from its parameters."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
        if obj.grad is not None:
            yield f"{path}.grad", obj.grad
        return
    if depth > 8 or id(obj) in seen or isinstance(obj, nn.Module):
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _walk(key, f"{path}[key]", seen, depth + 1)
            yield from _walk(value, f"{path}[{key!r:.40}]", seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for index, value in enumerate(obj):
            yield from _walk(value, f"{path}[{index}]", seen, depth + 1)
    elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
        for name, value in vars(obj).items():
            yield from _walk(value, f"{path}.{name}", seen, depth + 1)


def training_state(engine) -> dict[str, tuple[str, str, int]]:
    """This rank's training-state storages: address → (category, where found, bytes)."""
    owner: dict[int, tuple[str, str, int]] = {}

    def claim(category: str, where: str, tensor: torch.Tensor | None) -> None:
        found = _storage(tensor) if tensor is not None else None
        if found and found[0] not in owner:
            owner[found[0]] = (category, where, found[1])

    module = engine.module
    for parameter in module.parameters():
        claim("weights", "p.ds_tensor", getattr(parameter, "ds_tensor", None))
        claim("weights", "p.data", parameter.data)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch AdamW
    for state in inner.state.values():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                claim("optimizer moments", f"AdamW {name}", value)
    # ZeRO 3 empties param_groups between steps: the state's keys are the parameters too
    optimizer_params = [p for group in inner.param_groups for p in group["params"]]
    optimizer_params += [p for p in inner.state if isinstance(p, torch.Tensor)]
    for parameter in optimizer_params:
        claim("master weights", "AdamW params", parameter)
    for parameter in module.parameters():
        claim("gradients", "p.grad", parameter.grad)
        shard = getattr(parameter, "ds_tensor", None)
        claim("gradients", "p.ds_tensor.grad", shard.grad if shard is not None else None)
    for parameter in optimizer_params:
        claim("gradients", "AdamW params .grad", parameter.grad)
    for path, tensor in _walk(engine.optimizer, "optimizer", set()):
        gradient = any(name in path.lower() for name in GRADIENT_NAMES)
        claim("gradients" if gradient else "other", path, tensor)
    return owner


def summarize(owner: dict[int, tuple[str, str, int]]) -> tuple[dict[str, int], list]:
    """Bytes per category, and the largest storages as (category, where, bytes)."""
    totals = dict.fromkeys(CATEGORIES, 0)
    for category, _, size in owner.values():
        totals[category] += size
    largest = sorted(owner.values(), key=lambda entry: -entry[2])[:6]
    return totals, largest


def live_tensor_bytes() -> int:
    """Every tensor storage alive in this process, each counted once."""
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            found = _storage(obj)
            if found:
                storages[found[0]] = found[1]
    return sum(storages.values())


def model_sized_buckets(derive):
    """``deepspeed_config`` with its ZeRO buffers sized from the model (h = widest hidden size):
    reduce bucket h² and ZeRO-3 prefetch bucket 0.9·h² and persistence threshold 10·h (the
    HF/accelerate "auto" values), and ZeRO-3 max live parameters and max reuse distance 10·h²
    (DeepSpeed's defaults, 1e9 each, let a model under a billion parameters keep every
    gathered weight through forward and backward). Diagnostic: pretrain/config.py sets the
    reduce bucket to 5e7 elements (200 MB in fp32) whatever the model, the rest by default."""

    def derive_sized(config, world_size):
        derived = derive(config, world_size)
        model = config.model.build_config()
        width = max(model.video_config.hidden_size, model.text_config.hidden_size)
        zero = derived["zero_optimization"]
        zero["reduce_bucket_size"] = width * width
        if zero["stage"] == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * width * width)
            zero["stage3_param_persistence_threshold"] = 10 * width
            zero["stage3_max_live_parameters"] = 10 * width * width
            zero["stage3_max_reuse_distance"] = 10 * width * width
        return derived

    return derive_sized


def worker(args) -> None:
    """One rank of one stage: build, step once, measure mid-step, write rank{R}.json."""
    import pretrain.train
    from pretrain.train import Pretrainer

    if args.model_sized_buckets:
        pretrain.train.deepspeed_config = model_sized_buckets(pretrain.train.deepspeed_config)
    config = preset_config(
        args.preset,
        Path(args.workdir),
        [
            f"parallel.zero_stage={args.stage}",
            f"parallel.precision={args.precision}",
            f"parallel.micro_batch_size={args.batch_size}",
        ],
    )
    trainer = Pretrainer(config)
    engine, world = trainer.engine, trainer.world
    engine.train()
    batch = synthetic_batch(config, trainer.tokenizer, args.batch_size, seed=world.rank)
    trainer.batches = itertools.repeat(batch)
    trainer.train_step()  # AdamW's state is created lazily
    # Second step, measured during backward (after each parameter's gradient lands: the ZeRO
    # 1/2 reduce bucket only lives then) and after it (before engine.step()).
    peak: dict[str, int] = {}
    calls = itertools.count()

    def measure(*_) -> tuple[dict[str, int], list]:
        figures, largest = summarize(training_state(engine))
        if sum(figures.values()) > sum(peak.values()):
            peak.clear()
            peak.update(figures)
        return figures, largest

    def measure_some(*_) -> None:
        if next(calls) % 4 == 0:  # every 4th gradient: a walk of the ZeRO optimizer is not free
            measure()

    parameters = list(engine.module.parameters())
    hooks = [p.register_post_accumulate_grad_hook(measure_some) for p in parameters]
    losses = trainer.objectives(engine, batch, trainer.generator)
    engine.backward(losses["loss"])
    for hook in hooks:
        hook.remove()
    figures, largest = measure()
    live = live_tensor_bytes()
    engine.step()
    parameter_count = sum(getattr(p, "ds_numel", p.numel()) for p in parameters)
    name = f"stage{args.stage}{'_sized' if args.model_sized_buckets else ''}"
    out = Path(args.workdir) / f"{name}_rank{world.rank}.json"
    out.write_text(
        json.dumps(
            {
                "figures": figures,
                "peak": peak,
                "largest": largest,
                "live": live,
                "parameters": parameter_count,
                "optimizer": type(engine.optimizer).__name__,
            }
        )
    )


def run_stage(args, stage: int, sized: bool, workdir: Path) -> list[dict]:
    name = f"stage{stage}{'_sized' if sized else ''}"
    results = [workdir / f"{name}_rank{rank}.json" for rank in range(2)]
    if args.reuse and all(path.is_file() for path in results):
        return [json.loads(path.read_text()) for path in results]
    for path in results:
        path.unlink(missing_ok=True)
    command = [
        str(Path(sys.executable).with_name("deepspeed")),
        "--num_gpus",
        "2",
        "--master_port",
        str(_free_port()),
        str(Path(__file__).resolve()),
        "--worker",
        f"--stage={stage}",
        f"--preset={args.preset}",
        f"--precision={args.precision}",
        f"--batch-size={args.batch_size}",
        f"--workdir={workdir}",
        *(["--model-sized-buckets"] if sized else []),
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        raise SystemExit(f"ZeRO {stage}: the 2-rank launch failed ({result.returncode})")
    return [json.loads(path.read_text()) for path in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=2, help="micro-batch per rank")
    parser.add_argument(
        "--sized-stages",
        nargs="*",
        type=int,
        default=[2, 3],
        help="stages measured again with model-sized ZeRO buffers (diagnostic; none: skip)",
    )
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument(
        "--reuse", action="store_true", help="take stages already measured in --workdir as they are"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-sized-buckets", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the launcher's
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vidrec-bench-zero-"))
    workdir.mkdir(parents=True, exist_ok=True)
    make_shards(workdir)  # once, before the ranks start
    print(
        f"{args.preset} preset, {args.precision}, 2 CPU ranks (deepspeed launcher), "
        f"micro-batch {args.batch_size}, torch {torch.__version__}"
    )
    header = " ".join(f"{c:>10.10s}" for c in CATEGORIES)
    print(
        f"\nMB per rank (max of 2) after backward: {header} {'total':>7s} {'B/param':>7s}"
        f" | peak in backward {'gc':>7s}"
    )
    rows = [(stage, False) for stage in args.stages]
    rows += [(stage, True) for stage in args.sized_stages]
    steady, peak = {}, {}
    for stage, sized in rows:
        ranks = run_stage(args, stage, sized, workdir)
        worst = max(ranks, key=lambda r: sum(r["peak"].values()))
        steady[stage, sized] = sum(worst["figures"].values())
        peak[stage, sized] = sum(worst["peak"].values())
        cells = " ".join(f"{worst['figures'][c] / 2**20:10.1f}" for c in CATEGORIES)
        per_param = steady[stage, sized] / worst["parameters"]
        name = f"ZeRO {stage}{', model-sized buffers' if sized else ''}"
        print(
            f"{name:38s} {cells} {steady[stage, sized] / 2**20:7.1f} {per_param:7.2f}"
            f" | {peak[stage, sized] / 2**20:16.1f} {worst['live'] / 2**20:7.1f}"
        )
        at_peak = ", ".join(f"{c} {worst['peak'][c] / 2**20:.1f}" for c in CATEGORIES[:4])
        print(f"    peak in backward (MB): {at_peak}")
        holders = ", ".join(f"{where} {size / 2**20:.1f}" for _, where, size in worst["largest"])
        print(f"    largest storages after backward (MB): {holders}")
    print(f"parameters: {worst['parameters'] / 1e6:.1f}M")
    if (0, False) in steady:
        for key in sorted(steady):
            if key[0] == 3:
                label = "model-sized buffers" if key[1] else "as configured"
                print(
                    f"ZeRO 3 / ZeRO 0 per rank, {label}: after backward "
                    f"{steady[key] / steady[0, False]:.3f}, peak in backward "
                    f"{peak[key] / peak[0, False]:.3f}   (target ≤ 0.55)"
                )


if __name__ == "__main__":
    main()
