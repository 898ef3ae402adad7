"""The fine-tuning protocol: one typed record of the config's `protocol` block and its batch-split check.

Pure Python, no torch: Snakemake imports it while parsing the workflow (rules/common.smk), and the
fine-tuning stage builds it from its `--protocol` JSON. The keys, their types and ranges are checked by
rules/schemas/config.schema.yaml; this module adds what the schema cannot say (the batch split).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from workflow_scripts.common import PipelineError

# Marks a key that changes how a run executes but not what it computes: a run may resume across a
# change of it (e.g. a smaller micro_batch_size after an out-of-memory error).
_EXECUTION_ONLY = {"execution_only": True}
AUTO = "auto"  # protocol.micro_batch_size: auto


@dataclass(frozen=True)
class Protocol:
    """The config's `protocol` block (config.yaml documents each key and its source)."""

    batch_size: int
    # AUTO: the largest micro-batch that the shape's preflight found to fit (finetune --preflight).
    micro_batch_size: int | str = field(metadata=_EXECUTION_ONLY)
    warmup_steps: int
    momentum: float
    weight_decay: float
    grad_clip_norm: float
    inception_crop: bool
    inception_crop_min_area: float
    random_flip: bool
    pixel_mean: float
    pixel_std: float
    precision: str
    deterministic: bool
    checkpoint_every: int = field(metadata=_EXECUTION_ONLY)
    eval_every: int = field(metadata=_EXECUTION_ONLY)
    log_every: int = field(metadata=_EXECUTION_ONLY)
    num_workers: int | str = field(metadata=_EXECUTION_ONLY)
    threads: int = field(metadata=_EXECUTION_ONLY)
    ddp_timeout_min: int = field(metadata=_EXECUTION_ONLY)
    # Not execution-only: nvJPEG's pixels may differ slightly from libjpeg-turbo's.
    decode_device: str

    @classmethod
    def key_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def execution_keys(cls) -> tuple[str, ...]:
        """Keys that change how a run executes, not what it computes (left out of the fingerprint)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("execution_only"))

    @classmethod
    def from_config(cls, block: Mapping[str, Any]) -> Protocol:
        """The protocol of a config's `protocol` block (a mapping with exactly the keys above)."""
        if not isinstance(block, Mapping):
            raise PipelineError(f"protocol must be a mapping of the protocol keys, got {type(block).__name__}; "
                                "pass the config's protocol block (see config.yaml)")
        missing = [k for k in cls.key_names() if k not in block]
        unknown = sorted(set(block) - set(cls.key_names()))
        if missing:
            raise PipelineError(f"{', '.join('protocol.' + k for k in missing)} missing; "
                                "add them to the config's protocol block (see config.yaml)")
        if unknown:
            raise PipelineError(f"{', '.join('protocol.' + k for k in unknown)} not known (misspelled?); "
                                f"the protocol keys are {list(cls.key_names())}")
        return cls(**{k: block[k] for k in cls.key_names()})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """The keys that decide what a run computes: two runs with equal fingerprints (and the same
        checkpoint, data, LR, seed and steps) compute the same result."""
        execution = self.execution_keys()
        return {k: v for k, v in self.as_dict().items() if k not in execution}

    def micro_batches_per_process(self, gpus: int = 1) -> int:
        """How many micro-batches each of `gpus` processes runs per update (THE batch-split check).

        Every update sums exactly `batch_size` samples, so the micro-batch size must divide the batch
        and the micro-batches must share evenly among the processes.
        """
        batch, micro = self.batch_size, self.micro_batch_size
        if micro == AUTO:
            raise PipelineError("protocol.micro_batch_size is auto: the job takes the value its preflight chose "
                                "(finetune --preflight R/preflight/<shape>.json); run the preflight first")
        if batch % micro:
            raise PipelineError(f"protocol.micro_batch_size {micro} does not divide protocol.batch_size {batch}; "
                                f"choose a divisor of it{self._suggestion(gpus)}")
        if (batch // micro) % gpus:
            raise PipelineError(f"protocol.micro_batch_size {micro}: the {batch // micro} micro-batches of "
                                f"protocol.batch_size {batch} cannot be shared evenly by {gpus} GPUs; choose a "
                                "micro-batch size that makes batch_size / micro_batch_size a multiple of the "
                                f"GPU count{self._suggestion(gpus)}")
        return batch // micro // gpus

    def check_batch_split(self, gpus: int = 1) -> None:
        """The batch-split check of the config: with `auto`, that some micro-batch size splits the batch."""
        if self.micro_batch_size != AUTO:
            self.micro_batches_per_process(gpus)
        elif not self.micro_batch_sizes(gpus):
            raise PipelineError(f"protocol.batch_size {self.batch_size} cannot be shared evenly by {gpus} GPUs; "
                                "choose a multiple of the GPU count")

    def micro_batch_sizes(self, gpus: int = 1) -> list[int]:
        """Every valid micro-batch size for `gpus` processes, largest first (what the preflight searches)."""
        return self._fitting_micro_batches(gpus, self.batch_size + 1)

    def with_micro_batch(self, largest: int, gpus: int = 1) -> Protocol:
        """The protocol with `auto` replaced by the largest valid micro-batch size <= `largest` (an explicit
        micro_batch_size is kept)."""
        if self.micro_batch_size != AUTO:
            return self
        fits = self._fitting_micro_batches(gpus, largest + 1)
        if not fits:
            raise PipelineError(f"protocol.micro_batch_size auto: no micro-batch size up to {largest} splits "
                                f"protocol.batch_size {self.batch_size} among {gpus} GPUs")
        return dataclasses.replace(self, micro_batch_size=fits[0])

    def _fitting_micro_batches(self, gpus: int, below: int) -> list[int]:
        """Micro-batch sizes under `below` that split the batch evenly among `gpus` processes, largest first."""
        return [m for m in range(min(below - 1, self.batch_size), 0, -1)
                if self.batch_size % m == 0 and (self.batch_size // m) % gpus == 0]

    def smaller_micro_batch(self, gpus: int = 1) -> int | None:
        """The largest valid micro-batch size below micro_batch_size (what to try after running out of
        memory); None if there is none."""
        fits = self._fitting_micro_batches(gpus, self.micro_batch_size)
        return fits[0] if fits else None

    def _suggestion(self, gpus: int) -> str:
        fits = self._fitting_micro_batches(gpus, self.micro_batch_size + 1)
        if fits:
            return f" (e.g. {fits[0]})"
        return f" (none exists: protocol.batch_size {self.batch_size} is not a multiple of {gpus} GPUs)"
