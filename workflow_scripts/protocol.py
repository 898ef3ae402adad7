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


@dataclass(frozen=True)
class Protocol:
    """The config's `protocol` block (config.yaml documents each key and its source)."""

    batch_size: int
    micro_batch_size: int = field(metadata=_EXECUTION_ONLY)
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
        if batch % micro:
            raise PipelineError(f"protocol.micro_batch_size {micro} does not divide protocol.batch_size {batch}; "
                                f"choose a divisor of it{self._suggestion(gpus)}")
        if (batch // micro) % gpus:
            raise PipelineError(f"protocol.micro_batch_size {micro}: the {batch // micro} micro-batches of "
                                f"protocol.batch_size {batch} cannot be shared evenly by {gpus} GPUs; choose a "
                                "micro-batch size that makes batch_size / micro_batch_size a multiple of the "
                                f"GPU count{self._suggestion(gpus)}")
        return batch // micro // gpus

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
