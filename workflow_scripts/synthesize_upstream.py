"""Write a random-init Mixer in the official Flax .npz layout: the demo's stand-in for a released checkpoint.

python -m workflow_scripts.synthesize_upstream --architecture JSON --seed N --out NPZ

The weights are timm's initialisation under torch.manual_seed(seed), written through the inverse export, so
the demo's checkpoints go through the same download and conversion code as the official ones.
"""
from __future__ import annotations

import argparse
import os
from typing import Mapping

import torch
from timm.layers import lecun_normal_

from workflow_scripts.common import json_arg, run_cli, sha256_file
from workflow_scripts.convert import export_npz
from workflow_scripts.model_io import architecture_name, build_model, check_architecture


def synthesize(architecture: Mapping, seed: int, out: str | os.PathLike) -> None:
    architecture = check_architecture(architecture, "--architecture (config checkpoints.<name>.architecture)")
    torch.manual_seed(seed)
    model = build_model(architecture)
    # timm zero-initialises the head (as Flax does before fine-tuning); a random one gives the stand-in
    # non-trivial logits, so the parity check and the baseline evaluation of the demo test something.
    lecun_normal_(model.head.weight)
    export_npz(model.state_dict(), out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.synthesize_upstream", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--architecture", required=True, help="JSON architecture (config checkpoints.<name>)")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True, help=".npz to write")
    args = ap.parse_args(argv)
    architecture = json_arg(args.architecture, "--architecture")
    synthesize(architecture, args.seed, args.out)
    print(f"wrote {args.out}: {architecture_name(architecture)}, seed {args.seed}, sha256 {sha256_file(args.out)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
