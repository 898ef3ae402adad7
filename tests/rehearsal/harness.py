"""Run the rehearsal: the real study (config.yaml) with tests/rehearsal/overlay.yaml, on stand-ins.

    python -m tests.rehearsal.harness --workdir DIR [--short] [--cores 2] [-- extra snakemake arguments]

Writes the stand-ins into DIR/standins (tests/rehearsal/standins.py; kept when DIR/standins/manifest.json
is there), then runs Snakemake in DIR with `--configfile config.yaml tests/rehearsal/overlay.yaml`. The
jobs see PYTHONPATH=tests/rehearsal/site and MIXER_REHEARSAL_MD5 (see site/sitecustomize.py): the one
thing the harness changes beside the config, so that torchvision's md5 checks accept the stand-ins.
`--short` stops after the aggregate of the Mixer-B/16 checkpoints with one final seed (SHORT_FORM); the full
form runs every job of the study's matrix (the 448 px Mixer-L/16 and three final seeds included) and renders
the report (README "Rehearsal").
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
OVERLAY = HERE / "overlay.yaml"
STUDY = REPO / "config.yaml"
STANDINS = "standins"  # below the working directory; the overlay's paths point here
# The short form (inside `make test`, whose budget is tight): the study's matrix cut to its two Mixer-B/16
# checkpoints (one per pre-training), up to the aggregate, with ONE final run per pair instead of the
# study's three (finetune.final_seeds: every final run is the same rule at the same shape, and a third of
# them keeps the short form near its earlier cost; the demo and the full form run several seeds). A third
# --configfile, so that the overlay itself stays the full rehearsal (three final seeds, every checkpoint).
SHORT_FORM = {"finetune": {"checkpoints": ["mixer_b16_in21k", "mixer_b16_in1k"], "final_seeds": [0]}}


def study_config() -> dict:
    return yaml.safe_load(STUDY.read_text())


def overlay_config() -> dict:
    return yaml.safe_load(OVERLAY.read_text())


def write_standins(workdir: Path) -> Path:
    """The stand-ins below workdir, written once (manifest.json is written last)."""
    from tests.rehearsal import standins

    root = workdir / STANDINS
    if not (root / "manifest.json").exists():
        standins.write_all(root, study_config()["checkpoints"])
    return root


def snakemake_command(workdir: Path, short: bool, cores: int, extra: list[str]) -> list[str]:
    configfiles = [str(STUDY), str(OVERLAY)]
    if short:
        short_file = workdir / "short_form.yaml"
        short_file.write_text(yaml.safe_dump(SHORT_FORM))
        configfiles.append(str(short_file))
        extra = ["--until", "aggregate", *extra]
    snakemake = Path(sys.executable).with_name("snakemake")
    return [str(snakemake), "-s", str(REPO / "Snakefile"), "--configfile", *configfiles, "--cores", str(cores),
            *extra]


def job_environment(workdir: Path) -> dict[str, str]:
    """The environment of the Snakemake run: the venv first on PATH, the md5 patch on PYTHONPATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE / "site"), str(REPO), env.get("PYTHONPATH")]))
    env["MIXER_REHEARSAL_MD5"] = str((workdir / STANDINS / "torchvision_md5.json").resolve())
    return env


def run(workdir: str | Path, short: bool = False, cores: int = 2, extra: list[str] | None = None,
        **kwargs) -> subprocess.CompletedProcess:
    """Write the stand-ins (once) and run the rehearsal in workdir; returns Snakemake's completed process."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    write_standins(workdir)
    command = snakemake_command(workdir, short, cores, list(extra or []))
    return subprocess.run(command, cwd=workdir, env=job_environment(workdir), **kwargs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.rehearsal.harness", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="working directory (stand-ins and results land here)")
    ap.add_argument("--short", action="store_true",
                    help="only the Mixer-B/16 checkpoints, one final seed, up to the aggregate")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("extra", nargs="*", help="more Snakemake arguments (after --)")
    args = ap.parse_args(argv)
    start = time.monotonic()
    result = run(args.workdir, args.short, args.cores, args.extra)
    output_root = Path(args.workdir).resolve() / overlay_config()["output_root"]
    print(f"Rehearsal ({'short' if args.short else 'full'} form) finished in {time.monotonic() - start:.0f} s "
          f"(exit {result.returncode}); results in {output_root}", flush=True)
    report = output_root / "report" / "index.html"
    if result.returncode == 0 and not args.short and report.exists():
        print(f"Report: {report}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
