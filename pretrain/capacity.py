"""What a pretraining config asks of the hardware: the clips/s a GPU consumes at a target MFU
and the decode processes that feed it (``vidrec pretrain --check``, the start of a run, and a
warning, once, when training waits on data). Pure arithmetic on the config: no devices."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import PretrainConfig
from pretrain.flops import (
    PEAK_BF16_FLOPS,
    hardware_flops,
    masked_tokens,
    pretrain_forward_flops,
    training_flops,
)
from pretrain.model import VideoTextConfig

TARGET_MFU = 0.4
"""The MFU the loader is sized for (a target, not a measurement of this model)."""
REPORTED_GPUS = ("A100", "H100", "H200")
DATA_WAIT_WARNING = 0.10
"""Share of a log interval spent waiting for the next batch above which training is data-bound."""


@dataclass(frozen=True)
class GpuCapacity:
    kind: str
    peak_flops: float
    """Dense bf16 peak FLOP/s."""
    clips_per_second: float
    """Training clips one GPU consumes at ``TARGET_MFU``."""
    decode_processes: float
    """Reader worker processes (one core each) that deliver them."""


@dataclass(frozen=True)
class CapacityReport:
    model_flops: float
    """Forward + backward FLOPs per training clip (what MFU counts)."""
    hardware_flops: float
    """The same with the recomputed forward of activation checkpointing (what HFU counts)."""
    masked_tokens: float | None
    """Masked tokens per caption the MLM head's FLOPs assume (None: no MLM)."""
    gpus: tuple[GpuCapacity, ...]
    decode_clips_per_core: float
    samples_per_clip: int
    """Training samples cut from one decoded clip: the decode cost per sample falls as much."""
    workers: int
    gpus_per_node: int
    cores: int
    """CPU cores present on the node."""
    warnings: tuple[str, ...]

    def decode_processes(self, clips_per_second: float) -> float:
        """Reader worker processes that deliver ``clips_per_second`` training clips."""
        return clips_per_second / (self.decode_clips_per_core * self.samples_per_clip)


def capacity_report(
    config: PretrainConfig,
    *,
    gpus_per_node: int,
    cores: int,
    model_config: VideoTextConfig | None = None,
) -> CapacityReport:
    """The capacity of ``config`` on a node of ``gpus_per_node`` GPUs (one rank each) and
    ``cores`` CPU cores; ``model_config`` as ``pretrain_forward_flops``."""
    model_config = model_config or config.model.build_config()
    forward = pretrain_forward_flops(config, model_config)
    recomputed = {}
    if config.model.activation_checkpointing:
        recomputed = pretrain_forward_flops(config, model_config, recomputed=True)
    model = training_flops(forward)
    data = config.data
    samples_per_clip = data.samples_per_clip
    loaders = data.workers * gpus_per_node
    warnings = ()
    if loaders > cores:
        warnings = (
            f"data.workers {data.workers} × {gpus_per_node} GPUs per node = {loaders} decode "
            f"processes > {cores} CPU cores present: the loader cannot run at full speed",
        )
    decoded_per_core = data.decode_clips_per_core * samples_per_clip  # training clips/s
    gpus = []
    for kind in REPORTED_GPUS:
        clips = TARGET_MFU * PEAK_BF16_FLOPS[kind] / model
        gpus.append(GpuCapacity(kind, PEAK_BF16_FLOPS[kind], clips, clips / decoded_per_core))
    return CapacityReport(
        model_flops=model,
        hardware_flops=hardware_flops(forward, recomputed),
        masked_tokens=masked_tokens(config),
        gpus=tuple(gpus),
        decode_clips_per_core=data.decode_clips_per_core,
        samples_per_clip=samples_per_clip,
        workers=data.workers,
        gpus_per_node=gpus_per_node,
        cores=cores,
        warnings=warnings,
    )


def format_capacity(report: CapacityReport) -> list[str]:
    """The report as a few readable lines (its warnings apart, in ``report.warnings``)."""
    mlm = ""
    if report.masked_tokens is not None:
        mlm = f"; MLM on ≤ {report.masked_tokens:.1f} masked tokens per caption"
    lines = [
        f"capacity: {report.model_flops / 1e9:,.4g} GFLOP per training clip "
        f"(model FLOPs: 3 × forward{mlm})"
    ]
    if report.hardware_flops != report.model_flops:
        lines.append(
            f"  with the recomputed forward of activation checkpointing the device runs "
            f"{report.hardware_flops / 1e9:,.4g} GFLOP (HFU = "
            f"{report.hardware_flops / report.model_flops:.2f} × MFU)"
        )
    for gpu in report.gpus:
        lines.append(
            f"  {gpu.kind} ({gpu.peak_flops / 1e12:,.0f} TFLOP/s bf16): "
            f"{gpu.clips_per_second:,.0f} clips/s at {TARGET_MFU:.0%} MFU → "
            f"{gpu.decode_processes:.1f} decode processes per GPU"
        )
    per_clip = ""
    if report.samples_per_clip != 1:
        per_clip = f" × {report.samples_per_clip} training clips per decoded clip"
    gpus = report.gpus_per_node
    lines.append(
        f"  decode: {report.decode_clips_per_core:g} clips/s per core{per_clip} "
        f"(data.decode_clips_per_core)"
    )
    lines.append(
        f"  loader: data.workers {report.workers} per GPU × {gpus} GPU{'s' if gpus != 1 else ''}"
        f" per node = {report.workers * gpus} processes on {report.cores} cores"
    )
    return lines


def data_wait_message(
    report: CapacityReport,
    data_wait_fraction: float,
    clips_per_second_per_rank: float,
    device: str = "",
    peak_flops: float | None = None,
) -> str:
    """What waiting ``data_wait_fraction`` of the time at ``clips_per_second_per_rank`` says
    about the loader, and, for a ``device`` of known peak, what it would take at the target."""
    # without the wait, the same steps would have run at the compute-bound rate
    unfed = clips_per_second_per_rank / max(1.0 - data_wait_fraction, 1e-6)
    message = (
        f"training waited on data {data_wait_fraction:.0%} of the last log interval: "
        f"{clips_per_second_per_rank:,.1f} clips/s per rank, {unfed:,.1f} without the wait, "
        f"which takes {report.decode_processes(unfed):.1f} decode processes per rank at "
        f"{report.decode_clips_per_core:g} clips/s per core; data.workers is {report.workers} "
        f"({report.workers * report.gpus_per_node} for {report.gpus_per_node} ranks on "
        f"{report.cores} cores)"
    )
    if peak_flops:
        target = TARGET_MFU * peak_flops / report.model_flops
        message += (
            f"; at {TARGET_MFU:.0%} MFU this {device} would consume {target:,.0f} clips/s, "
            f"{report.decode_processes(target):.1f} decode processes"
        )
    return message


@dataclass
class WaitInterval:
    """One rank's steps since the last logged one: a logged step reports the data wait and
    the rate of its whole interval, not of its own step alone."""

    seconds: float = 0.0
    waited: float = 0.0
    samples: int = 0

    def add(self, step_seconds: float, data_wait_fraction: float, samples: int) -> None:
        self.seconds += step_seconds
        self.waited += data_wait_fraction * step_seconds
        self.samples += samples

    def metrics(self) -> dict[str, float]:
        return {
            "interval_data_wait_fraction": self.waited / self.seconds,
            "interval_clips_per_second_per_rank": self.samples / self.seconds,
        }


class DataWaitAlarm:
    """Says once, the first time a log interval waited on data more than ``threshold`` of
    its time, what the loader would need (``data_wait_message``); None every other time."""

    def __init__(
        self,
        report: CapacityReport,
        device: str = "",
        peak_flops: float | None = None,
        threshold: float = DATA_WAIT_WARNING,
    ):
        self.report, self.device, self.peak_flops = report, device, peak_flops
        self.threshold = threshold
        self.raised = False

    def check(self, data_wait_fraction: float, clips_per_second_per_rank: float) -> str | None:
        if self.raised or data_wait_fraction <= self.threshold:
            return None
        self.raised = True
        return data_wait_message(
            self.report, data_wait_fraction, clips_per_second_per_rank, self.device, self.peak_flops
        )
