"""Reliability (issue 6): read-only installs, debugging without the JIT, threads and processes sharing a model,
long runs, killed conversions and inputs too large for the machine. README.md's Reliability section reports
these cases and their results."""
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import qnalo
from qnalo import demo
from test_converter import sha256

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _installed_copy(target):
    """The package laid out as pip installs it (qnalo/, qnalo/kernels, qnalo/weights_converter), no caches."""
    ignore = shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc")
    shutil.copytree(os.path.join(ROOT, "qnalo"), target / "qnalo", ignore=ignore)
    shutil.copytree(os.path.join(ROOT, "kernels"), target / "qnalo" / "kernels", ignore=ignore)
    shutil.copytree(os.path.join(ROOT, "weights_converter"), target / "qnalo" / "weights_converter", ignore=ignore)
    return target


def _run_python(code, env_extra, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "PYTHONPATH")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=900, env=env, cwd=cwd)


CLASSIFY_ONE_DIGIT = """
    import numpy as np, qnalo
    from qnalo import demo
    model = qnalo.load(demo.demo_path("litv2_digits"))
    data = demo.heldout()
    x = demo.preprocess_digits("litv2", data["images"][:20])
    assert (model(x).argmax(1) == data["torch_litv2_digits"][:20]).all()
    qnalo.load(demo.demo_path("litv2_digits"))     # a second model: no second notice
    print("ok", qnalo.__file__)
"""


@pytest.mark.slow
def test_a_read_only_install_falls_back_says_so_once_and_works(tmp_path):
    site = _installed_copy(tmp_path / "site")
    for folder in ("", "models", "kernels", "weights_converter", "demo"):
        (site / "qnalo" / folder / "__pycache__").write_text("")   # a file where Python and Numba would write
    home = tmp_path / "home"
    home.mkdir()
    env = {"PYTHONPATH": str(site), "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = _run_python(CLASSIFY_ONE_DIGIT, env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok " + str(site))
    notices = [line for line in proc.stderr.splitlines() if "kernel cache" in line]
    assert len(notices) == 1 and "not writable" in notices[0] and str(home / ".cache" / "qnalo") in notices[0]
    assert list((home / ".cache" / "qnalo" / "kernels").rglob("*.nbi"))   # the kernels went there
    again = _run_python(CLASSIFY_ONE_DIGIT, env, tmp_path)            # and a second process loads them
    assert again.returncode == 0 and again.stderr.count("kernel cache") == 1, again.stderr

    (home / ".cache").rename(home / "cache-moved")
    (home / ".cache").write_text("")                                   # no user cache folder either
    proc = _run_python(CLASSIFY_ONE_DIGIT, env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    notices = [line for line in proc.stderr.splitlines() if "kernel cache" in line]
    assert len(notices) == 1 and "compiled in every process" in notices[0] and "NUMBA_CACHE_DIR" in notices[0]


@pytest.mark.slow
def test_the_cli_says_it_in_one_line(tmp_path):
    site = _installed_copy(tmp_path / "site")
    (site / "qnalo" / "kernels" / "__pycache__").write_text("")
    home = tmp_path / "home"
    home.mkdir()
    code = "import sys; from qnalo import cli; sys.exit(cli.main(['classify', '--model', 'litv2_digits', sys.argv[1]]))"
    digit = tmp_path / "d.png"
    demo.digit_picture(demo.heldout()["images"][0]).save(digit)
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(PYTHONPATH=str(site), HOME=str(home), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", code, str(digit)], capture_output=True, text=True, env=env,
                          timeout=900, cwd=tmp_path)   # not the checkout: its qnalo/ would come first
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("qnalo: warning: the kernel cache") and proc.stderr.count("\n") == 1


def test_numba_disable_jit_runs_the_same_model(tmp_path):
    """NUMBA_DISABLE_JIT=1 (debugging: the kernels run as plain Python) gives the JIT's predictions."""
    code = """
        import json, warnings, numpy as np, qnalo
        from qnalo import demo
        warnings.simplefilter("ignore", RuntimeWarning)   # padded lanes divide by zero; the JIT is silent there
        out = {}
        for name in demo.DEMO_MODELS:
            model = qnalo.load(demo.demo_path(name))
            x = demo.preprocess_digits(model.architecture, demo.heldout()["images"][:2])
            out[name] = model(x).tolist()
        print(json.dumps(out))
    """
    proc = _run_python(code, {"NUMBA_DISABLE_JIT": "1"}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    interpreted = __import__("json").loads(proc.stdout)
    from tolerances import assert_logits_close
    for name in demo.DEMO_MODELS:
        model = qnalo.load(demo.demo_path(name))
        x = demo.preprocess_digits(model.architecture, demo.heldout()["images"][:2])
        assert_logits_close(np.array(interpreted[name], np.float32), model(x), what=f"{name} without the JIT")


# --- sharing a model ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", demo.DEMO_MODELS)
def test_eight_threads_500_inferences_each_are_bit_identical(name):
    from model_helpers import check_threads_get_single_thread_outputs
    model = qnalo.load(demo.demo_path(name))
    x = demo.preprocess_digits(model.architecture, demo.heldout()["images"][:8 * 3])
    images = [np.ascontiguousarray(x[3 * i:3 * i + 3]) for i in range(8)]   # a batch of 3 per thread
    check_threads_get_single_thread_outputs(model, images, calls=500)


_SHARED = {}


def _forked_inference(i):
    return _SHARED["model"](_SHARED["x"][i:i + 1])


def test_forked_processes_share_a_loaded_model():
    """A model loaded before fork works in the children (each starts its own kernel threads) and gives the
    parent's outputs; a process that loads the file itself gives them too."""
    import multiprocessing
    model = qnalo.load(demo.demo_path("qna_vit_digits"))
    x = demo.preprocess_digits(model.architecture, demo.heldout()["images"][:6])
    _SHARED.update(model=model, x=x)
    expected = [model(x[i:i + 1]) for i in range(6)]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.map(_forked_inference, range(6))
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        spawned = pool.apply(_load_and_run, (demo.demo_path("qna_vit_digits"), x))
    for i in range(6):
        assert np.array_equal(got[i], expected[i]) and np.array_equal(spawned[i:i + 1], expected[i])


def _load_and_run(path, x):
    model = qnalo.load(path)
    return np.concatenate([model(x[i:i + 1]) for i in range(len(x))])


# --- long runs -------------------------------------------------------------------------------------------------

SOAK = """
    import json, os, warnings, numpy as np, qnalo
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    warnings.simplefilter("ignore")
    model = qnalo.create_model({name!r})
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    first = model(x)
    for _ in range({warm}):
        model(x)
    start, samples = rss(), []
    for i in range({calls}):
        y = model(x)
        if i % 100 == 99:
            samples.append(rss())
    assert np.array_equal(y, first)
    print(json.dumps({{"after_warm_up": start, "samples": samples}}))
"""
SOAK_CALLS, SOAK_WARM_UP, SOAK_GROWTH = 2000, 50, 0.05


@pytest.mark.slow
@pytest.mark.parametrize("name", ["litv2_s", "qna_vit_tiny"])
def test_2000_inferences_keep_memory_flat(tmp_path, name):
    proc = _run_python(SOAK.format(name=name, warm=SOAK_WARM_UP, calls=SOAK_CALLS), {}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = __import__("json").loads(proc.stdout)
    growth = max(report["samples"]) / report["after_warm_up"] - 1
    print(f"{name}: RSS after warm-up {report['after_warm_up'] / 2**20:.0f} MiB, at most "
          f"{max(report['samples']) / 2**20:.0f} MiB over {SOAK_CALLS} calls ({growth:+.1%})")
    assert growth < SOAK_GROWTH, report


# --- killed conversions ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_conversion_killed_at_any_moment_leaves_nothing(tmp_path):
    import signal
    import time
    torch = pytest.importorskip("torch")
    from reference.litv2_torch import litv2_reference
    src = tmp_path / "src" / "litv2_s.pth"
    src.parent.mkdir()
    torch.save({"model": litv2_reference("litv2_s").state_dict()}, src)
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-m", "qnalo.cli", "convert", str(src), str(out / "litv2_s.safetensors")]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    whole = time.perf_counter() - start
    complete = sha256(out / "litv2_s.safetensors")
    (out / "litv2_s.safetensors").unlink()
    kills = 0
    # up to 80 % of the first run's time: later runs start warmer and have been seen finishing before 95 % (7 of
    # 10 killed on a loaded machine)
    for fraction in np.linspace(0.05, 0.8, 10):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(whole * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += proc.returncode == -signal.SIGKILL
        left = os.listdir(out)
        # nothing, or (killed after the rename, while exiting) the whole file: never part of one
        assert left == [] or left == ["litv2_s.safetensors"] and sha256(out / left[0]) == complete, \
            f"killed at {fraction:.0%} of the run, it left {left}"
        for name in left:
            (out / name).unlink()
        assert os.listdir(src.parent) == ["litv2_s.pth"]
    assert kills >= 8


# --- inputs too large for the machine ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, batches", [("litv2_s", [(1, 224), (3, 224), (1, 448), (2, 320)]),
                                           ("qna_vit_tiny", [(1, 224), (3, 224), (1, 448)])])
def test_the_memory_estimate_bounds_the_forward_pass(name, batches):
    import tracemalloc
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = qnalo.create_model(name)
    for b, side in batches:
        x = np.random.default_rng(0).standard_normal((b, 3, side, side)).astype(np.float32)
        model(x)
        tracemalloc.start()
        model(x)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        estimate = model.forward_bytes(b, side, side)
        assert peak <= estimate, (b, side, peak, estimate)
        if b == 1:   # an estimate, not a blanket refusal: within 2x of what batch 1 uses
            assert estimate < 2 * peak, (b, side, peak, estimate)


def test_an_input_too_large_is_refused_with_its_estimate(monkeypatch):
    import tracemalloc
    model = qnalo.load(demo.demo_path("litv2_digits"))
    monkeypatch.setenv("QNALO_MEMORY_LIMIT", str(256 * 2**20))
    small = np.zeros((2, 3, 32, 32), np.float32)
    assert model(small).shape == (2, 10)
    huge = np.broadcast_to(np.float32(0), (8, 3, 4096, 4096))   # 1.5 GiB that was never allocated
    tracemalloc.start()
    with pytest.raises(qnalo.InputError) as info:
        model(huge)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    message = str(info.value)
    assert "a batch of 8 image(s) of 4096x4096 would need about" in message and "256 MiB" in message
    assert "smaller batch" in message and "\n" not in message
    assert peak < 2**20   # refused before anything was made for it
    with pytest.raises(qnalo.InputError, match="would need about"):
        model.forward_features(huge)
    monkeypatch.delenv("QNALO_MEMORY_LIMIT")
    assert qnalo.models.inputs.available_memory() > 2**20   # the machine's own figure is read
