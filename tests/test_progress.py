"""Progress output: plain lines (no carriage return, no ANSI escape) when stderr is redirected;
``--traceback`` and ``--no-progress`` accepted anywhere on the command line."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from synthaug import SyntheticCache
from synthaug.progress import LineProgress, progress_bar, progress_mode, progress_off, set_progress_mode

REPO = Path(__file__).resolve().parents[1]


def _cli(*argv, env=None):
    """``python -m synthaug ARGV`` with stdout and stderr redirected to pipes."""
    full = dict(os.environ, **(env or {}))
    full.pop("SYNTHAUG_PROGRESS", None)
    return subprocess.run([sys.executable, "-m", "synthaug", *argv], cwd=REPO, env=full, capture_output=True, text=True, timeout=120)


@pytest.fixture()
def small_cache(tmp_path):
    path = tmp_path / "cache"
    cache = SyntheticCache(path, label_names=["a", "b"])
    cache.append(np.random.default_rng(0).integers(0, 256, (600, 8, 8, 1), dtype=np.uint8), 1, {"model": "test"})
    cache.close()
    return path


@pytest.fixture()
def mode_reset(monkeypatch):
    monkeypatch.delenv("SYNTHAUG_PROGRESS", raising=False)
    monkeypatch.delenv("SYNTHAUG_PROGRESS_INTERVAL", raising=False)
    previous = set_progress_mode(None)
    yield
    set_progress_mode(previous)


def _clean(text):
    assert "\r" not in text and "\x1b[" not in text, repr(text)


# ------------------------------------------------------------------------- a redirected stderr
def test_redirected_cache_commands_write_plain_lines(small_cache, tmp_path):
    verify = _cli("cache", "verify", str(small_cache))
    assert verify.returncode == 0, verify.stderr
    _clean(verify.stderr + verify.stdout)
    assert "verify: 600/600 rec (100%)" in verify.stderr and verify.stderr.endswith("\n")

    export = _cli("cache", "export", str(small_cache), "--out", str(tmp_path / "png"), env={"SYNTHAUG_PROGRESS_INTERVAL": "0"})
    assert export.returncode == 0, export.stderr
    _clean(export.stderr + export.stdout)
    lines = export.stderr.splitlines()
    assert [line.split(",")[0] for line in lines] == ["export: 1/3 batch (33%)", "export: 2/3 batch (67%)", "export: 3/3 batch (100%)"]
    assert all("elapsed" in line for line in lines)


def test_no_progress_after_or_before_the_subcommand_silences_the_bars(small_cache):
    for argv in (["cache", "verify", str(small_cache), "--no-progress"], ["--no-progress", "cache", "verify", str(small_cache)]):
        proc = _cli(*argv)
        assert proc.returncode == 0 and proc.stderr == "", (argv, proc.stderr)
        assert "600 records ok" in proc.stdout


# ---------------------------------------------------------------------------------- the flags
@pytest.mark.parametrize("where", ["after", "before"])
def test_traceback_is_accepted_before_and_after_the_subcommand(tmp_path, where):
    missing = str(tmp_path / "does-not-exist")
    argv = ["cache", "inspect", missing, "--traceback"] if where == "after" else ["--traceback", "cache", "inspect", missing]
    proc = _cli(*argv)
    assert proc.returncode == 2 and "Traceback (most recent call last)" in proc.stderr
    assert "synthaug cache: error: no synthetic cache" in proc.stderr
    plain = _cli("cache", "inspect", missing)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr


def test_every_subcommand_parses_both_flags_anywhere():
    from synthaug.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["finetune", "--model", "x", "--images", "y", "--out", "z", "--no-progress", "--traceback"])
    assert args.no_progress is True and args.traceback is True
    args = parser.parse_args(["--no-progress", "--traceback", "finetune", "--model", "x", "--images", "y", "--out", "z"])
    assert args.no_progress is True and args.traceback is True  # not reset by the sub-parser's defaults
    args = parser.parse_args(["finetune", "--model", "x", "--images", "y", "--out", "z"])
    assert args.no_progress is False and args.traceback is False
    # sweep keeps its args.no_progress; nested sub-parsers (cache ACTION) get the flags too
    assert parser.parse_args(["sweep", "--no-progress"]).no_progress is True
    assert parser.parse_args(["sweep"]).no_progress is False
    assert parser.parse_args(["cache", "export", "p", "--out", "o", "--no-progress"]).no_progress is True
    for name in ("finetune", "generate", "worker", "quality", "demo", "env"):
        sub = parser._subparsers._group_actions[0].choices[name]
        assert {"--traceback", "--no-progress"} <= set(sub._option_string_actions), name
        assert "anywhere on the command line" in sub.format_help()
    assert "anywhere on the command line" in parser.format_help()


def test_bench_takes_the_flags_out_of_the_benchmark_arguments(monkeypatch):
    import synthaug.benchmarks.ratio as ratio
    from synthaug.cli import main

    seen = {}

    def fake_main(argv):
        seen["argv"], seen["mode"] = list(argv), progress_mode()

    monkeypatch.setattr(ratio, "main", fake_main)
    monkeypatch.delenv("SYNTHAUG_PROGRESS", raising=False)
    assert main(["bench", "ratio", "--quick", "--no-progress", "--traceback"]) == 0
    assert seen == {"argv": ["--quick"], "mode": "off"}
    assert progress_mode() == "auto" and "SYNTHAUG_PROGRESS" not in os.environ  # restored


# --------------------------------------------------------------------------------- the modes
def test_lines_mode_writes_newline_terminated_lines_only(monkeypatch, mode_reset):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setenv("SYNTHAUG_PROGRESS_INTERVAL", "0")
    set_progress_mode("lines")
    with progress_bar(total=4, desc="sweep", unit="arm") as bar:
        assert isinstance(bar, LineProgress)
        bar.update(1)
        bar.set_postfix(loss=0.031234)
        bar.update(2)
        bar.set_postfix_str("fresh 3/10\rstored 7")
        bar.set_description("sweep 2")
    for _ in progress_bar(range(3), desc="inner", leave=False):
        pass
    bar = progress_bar(desc="worker", unit="img")
    bar.update(5)
    bar.close()
    bar.close()  # twice: one final line
    text = err.getvalue()
    _clean(text)
    assert text.endswith("\n")
    lines = text.splitlines()
    assert lines[0] == "sweep: 1/4 arm (25%), 0 s elapsed"
    assert "sweep: 3/4 arm (75%), 0 s elapsed, loss=0.0312" in lines
    assert "sweep 2: 3/4 arm (75%), 0 s elapsed, fresh 3/10 stored 7" in lines
    assert [l for l in lines if l.startswith("inner")] == [f"inner: {i}/3 it ({p}%), 0 s elapsed" for i, p in ((1, 33), (2, 67), (3, 100))]
    assert lines[-1] == "worker: 5 img, 0 s elapsed" and lines.count(lines[-1]) == 1


def test_lines_mode_rate_limits_and_keeps_finished_inner_bars_silent(monkeypatch, mode_reset):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    set_progress_mode("lines")
    with progress_bar(total=1000, desc="outer", initial=10) as bar:  # default interval: 30 s
        for _ in range(990):
            bar.update()
    with progress_bar(total=5, desc="inner", leave=False) as inner:
        inner.update(5)
    stopped = progress_bar(total=5, desc="stopped", leave=False)
    stopped.update(2)
    stopped.close()
    assert err.getvalue().splitlines() == ["outer: 1000/1000 it (100%), 0 s elapsed", "stopped: 2/5 it (40%), 0 s elapsed"]


def test_modes_auto_off_and_a_callers_disable(monkeypatch, mode_reset):
    from tqdm import tqdm

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    monkeypatch.setenv("TERM", "xterm")
    assert progress_mode() == "auto"
    with progress_bar(total=2, desc="t") as bar:
        assert isinstance(bar, tqdm) and not bar.disable
    with progress_bar(total=2, disable=True) as bar:
        assert bar.disable
    monkeypatch.setenv("TERM", "dumb")
    with progress_bar(total=2) as bar:
        assert isinstance(bar, LineProgress)
    monkeypatch.setenv("SYNTHAUG_PROGRESS", "off")
    with progress_bar(total=2) as bar:
        assert bar.disable
        bar.update(1)
    with progress_off():
        assert progress_mode() == "off" and os.environ["SYNTHAUG_PROGRESS"] == "off"
    assert os.environ["SYNTHAUG_PROGRESS"] == "off"
    monkeypatch.setenv("SYNTHAUG_PROGRESS", "lines")
    assert progress_mode() == "lines"
    set_progress_mode("off")
    assert progress_mode() == "off"  # the process-wide setting wins over the environment
    with pytest.raises(ValueError, match="progress mode"):
        set_progress_mode("bars")
