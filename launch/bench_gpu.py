"""GPU benchmark: samples/s and MFU of a pretraining preset (default: base, bf16) on one device.

    python launch/bench_gpu.py [--preset base] [--steps 20] [--warmup 5] [--batch-size N]
    python launch/bench_gpu.py --device cpu --preset tiny --steps 2 --warmup 1   # dry run

A world of one rank: the ``Pretrainer`` built from the preset (its DeepSpeed engine, ZeRO stage
and micro-batch as configured) steps ``train_step`` over one synthetic batch that already sits
on the device, so the figure is the engine and the model, not the loader or the host-to-device
copy. After ``--warmup`` steps, ``--steps`` steps are timed between two device synchronizations.
MFU = model FLOPs per sample (``pretrain.flops``: forward by component, × 3 for forward +
backward) × samples/s / the card's dense bf16 peak (``pretrain.flops.PEAK_BF16_FLOPS``;
``--peak-tflops`` for a card not listed); with activation checkpointing, HFU counts the
recomputed forward too.

Without a CUDA device it stops with a message, unless asked for the CPU dry run, which runs the
same code path (tiny preset, fp32) so that this script is exercised where no GPU is.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[str, float | None]:
    """(device name, dense bf16 peak FLOP/s or None when unknown)."""
    from pretrain.flops import peak_bf16_flops

    if device.type != "cuda":
        name = f"CPU ({os.cpu_count()} cores)"
    else:
        name = torch.cuda.get_device_name(device)
    if override_tflops:
        return name, override_tflops * 1e12
    return name, peak_bf16_flops(name)


def flops_per_sample(trainer, batch) -> tuple[float, float]:
    """(model, hardware) FLOPs per sample of this trainer's objectives on this batch, its MLM
    targets counted from the batch's real caption tokens."""
    from pretrain.flops import hardware_flops, pretrain_forward_flops, training_flops

    config = trainer.config
    caption_tokens = batch["attention_mask"].sum(dim=1).float().mean().item()
    forward = pretrain_forward_flops(config, trainer.model_config, caption_tokens)
    recomputed = {}
    if config.model.activation_checkpointing:
        recomputed = pretrain_forward_flops(
            config, trainer.model_config, caption_tokens, recomputed=True
        )
    return training_flops(forward), hardware_flops(forward, recomputed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--precision", default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--zero", type=int, default=None, help="default: the preset's stage")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the peak")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "bench_gpu: no CUDA device here (torch.cuda.is_available() is False); nothing "
            "measured. For a dry run of the code path on CPU: "
            "python launch/bench_gpu.py --device cpu --preset tiny --steps 2 --warmup 1"
        )
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would pick a GPU if there is one
    precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")

    # imported only now: DeepSpeed picks its accelerator when first imported
    import deepspeed
    from bench_engine import preset_config, synthetic_batch

    from pretrain.train import Pretrainer

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vidrec-bench-gpu-"))
    overrides = [f"parallel.precision={precision}"]
    if args.batch_size:
        overrides.append(f"parallel.micro_batch_size={args.batch_size}")
    if args.zero is not None:
        overrides.append(f"parallel.zero_stage={args.zero}")
    config = preset_config(args.preset, workdir, overrides)
    trainer = Pretrainer(config)
    device = trainer.world.device
    trainer.engine.train()
    batch_size = config.parallel.micro_batch_size
    batch = synthetic_batch(config, trainer.tokenizer, batch_size)
    # the crop rows stay on the CPU, as the reader delivers them
    batch = {
        k: v.to(device) if k != "crops" and isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }
    trainer.batches = itertools.repeat(batch)
    name, peak = peak_flops(device, args.peak_tflops)
    flops, device_flops = flops_per_sample(trainer, batch)
    parameters = trainer.parameter_count()
    print(f"device: {name}; torch {torch.__version__}, deepspeed {deepspeed.__version__}")
    print(
        f"{args.preset} preset: {parameters / 1e6:.1f}M parameters, {precision}, "
        f"ZeRO {config.parallel.zero_stage}, micro-batch {batch_size}, "
        f"{config.parallel.grad_accum_steps} accumulation step(s), "
        f"text length {config.data.max_text_length}"
    )

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        trainer.train_step()
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    synchronize()
    elapsed = time.perf_counter() - started
    samples = args.steps * batch_size * config.parallel.grad_accum_steps
    rate = samples / elapsed
    print(f"step time:        {1000 * elapsed / args.steps:9.1f} ms ({args.steps} steps)")
    print(f"samples/s:        {rate:9.2f}")
    print(
        f"FLOPs/sample:     {flops / 1e9:9.3f} GFLOP fwd+bwd "
        f"(the Pretrainer's own count, MLM on full captions: "
        f"{trainer.flops_per_sample / 1e9:.3f})"
    )
    if device_flops != flops:
        print(f"with recompute:   {device_flops / 1e9:9.3f} GFLOP (activation checkpointing)")
    print(f"achieved:         {flops * rate / 1e12:9.4f} TFLOP/s")
    if peak:
        print(f"MFU:              {flops * rate / peak:9.3f}  (peak {peak / 1e12:.0f} TFLOP/s)")
        if device_flops != flops:
            print(f"HFU:              {device_flops * rate / peak:9.3f}")
    else:
        print("MFU:              n/a (no peak known for this device; --peak-tflops sets one)")
    if device.type == "cuda":
        print(f"peak memory:      {torch.cuda.max_memory_allocated(device) / 2**30:9.2f} GiB")
    trainer.engine.destroy()


if __name__ == "__main__":
    main()
