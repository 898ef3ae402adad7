"""Suite-wide rules.

- In CI (CI set to anything but "", 0, false, no, off; .ci/run sets CI=true itself) a skipped test is a
  failure, a module skipped while it is collected (pytest.importorskip, skip(allow_module_level=True)) too:
  the browser and SLURM tests must really run there, and .ci/run installs what they need (or fails saying
  what is missing).
- The suite tests the CPU paths, on any machine: CI has no GPU, and the GPU paths are checked with faked
  devices (test_gpu_paths, test_gpu_pool). On a GPU node every in-process test and every job the suite
  starts sees no GPU (CUDA_VISIBLE_DEVICES="", set here before anything initialises CUDA); the tests that
  fake devices set their own environment.
- The tests' own servers listen on the loopback interface: a user's http_proxy/https_proxy must not carry
  requests to them (urllib sends every request through the proxy unless no_proxy names the host). The
  loopback names are added to no_proxy; the user's proxy still serves every other host.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "demo" / "config.yaml"

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def _hide_gpus_and_bypass_the_proxy_for_loopback(environ=os.environ) -> None:
    environ["CUDA_VISIBLE_DEVICES"] = ""
    for name in ("no_proxy", "NO_PROXY"):
        given = [host.strip() for host in environ.get(name, "").split(",") if host.strip()]
        environ[name] = ",".join(given + [host for host in LOOPBACK if host not in given])


_hide_gpus_and_bypass_the_proxy_for_loopback()


def _ci_failure(report) -> str:
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
    return f"skipped in CI (CI={os.environ.get('CI')}), which counts as a failure: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome, report.longrepr = "failed", _ci_failure(report)


_COLLECTION_SKIPS: list[str] = []


def pytest_collectreport(report):
    """A module skipped while collected never reaches pytest_runtest_makereport: noted here, and the run fails
    at its end (failing the collection itself would interrupt the whole run)."""
    if in_ci() and report.skipped:
        _COLLECTION_SKIPS.append(f"{report.nodeid}: {_ci_failure(report)}")


def pytest_terminal_summary(terminalreporter):
    for line in _COLLECTION_SKIPS:
        terminalreporter.write_line(f"FAILED {line}", red=True)


def pytest_sessionfinish(session, exitstatus):
    if _COLLECTION_SKIPS and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED




@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """Run the whole demo once per session; tests/test_demo.py and tests/test_status.py read what it produced
    (never change it: copy what a test alters)."""
    workdir = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    start = time.monotonic()
    res = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-s", str(REPO / "Snakefile"),
         "--configfile", str(DEMO_CONFIG), "--cores", "2"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=1200,
    )
    elapsed = time.monotonic() - start
    from workflow_scripts import references  # here: conftest also runs where the package is not importable

    cfg = references.load_config(DEMO_CONFIG)  # as the rules see it: references loaded
    root = workdir / cfg["output_root"]
    if res.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted((root / "logs").rglob("*.log")))
        pytest.fail(f"demo failed (exit {res.returncode}):\n{res.stderr[-4000:]}\n{logs}")
    print(f"demo pipeline wall time: {elapsed:.0f} s")
    return workdir, root, cfg
