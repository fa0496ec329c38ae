"""The design card's layout: kernels/ and weights_converter/ beside qnalo/ in a checkout, installed under qnalo
only (no generic top-level module in site-packages), and `import qnalo` from a checkout's root working without
the editable install's import hooks."""
import configparser
import os
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_importing_qnalo_from_the_checkout_root_finds_kernels_beside_it():
    # -S skips site: no .pth file runs, so no editable-install finder maps qnalo.kernels; NumPy and Numba still
    # come from site-packages through PYTHONPATH
    code = ("import numpy as np, qnalo, qnalo.kernels, qnalo.weights_converter;"
            "print(qnalo.kernels.__file__); print(qnalo.weights_converter.__file__);"
            "print(qnalo.create_model('litv2_digits')(np.zeros((1, 3, 32, 32), np.float32)).shape)")
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    kernels, converter, shape = out.stdout.split("\n")[:3]
    assert kernels == os.path.join(ROOT, "kernels", "__init__.py")
    assert converter == os.path.join(ROOT, "weights_converter", "__init__.py")
    assert shape == "(1, 10)"


def test_only_qnalo_lands_in_site_packages():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    packages = cfg["options"]["packages"].split()
    assert packages and all(p == "qnalo" or p.startswith("qnalo.") for p in packages), packages
    mapped = dict(line.split(" = ") for line in cfg["options"]["package_dir"].strip().splitlines())
    assert mapped == {"qnalo.kernels": "kernels", "qnalo.weights_converter": "weights_converter"}


def test_the_converter_runs_without_the_command_line_module():
    code = ("import runpy, sys; sys.argv = ['qnalo.weights_converter', '--help']\n"
            "try:\n    runpy.run_module('qnalo.weights_converter', run_name='__main__')\n"
            "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            "assert 'qnalo.cli' not in sys.modules, 'the converter imported qnalo.cli'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: python -m qnalo.weights_converter" in out.stdout
