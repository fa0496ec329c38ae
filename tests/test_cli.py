"""The `qnalo` command line: the demo (README's first command) and usage errors."""
import subprocess
import sys

from qnalo import cli


def test_demo_reports_parity_and_latency(capsys):
    assert cli.main(["demo", "--model", "litv2_s", "--size", "64", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "top-1 identical" in out and "median" in out and "27,844,000 parameters" in out


def test_demo_as_installed_command():
    proc = subprocess.run([sys.executable, "-m", "qnalo.cli", "demo", "--size", "40"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Numba kernels vs NumPy reference" in proc.stdout and "torch" not in proc.stderr


def test_unknown_model_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "qnalo.cli", "demo", "--model", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr
