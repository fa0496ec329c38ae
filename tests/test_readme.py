"""README.md's examples run and print what README.md shows, so they cannot rot.

Every ```console block is a shell session: lines starting with "$ " are commands, the lines after one are its
output (stdout), matched line by line; "..." inside a line matches any text, and a line that is only "..."
matches any number of lines. Every ```python block is executed. All blocks run in document order, in one
folder holding what the examples name: litv2_s.pth (an official-layout LITv2-S checkpoint with seeded random
weights), photo.jpg (scikit-learn's china.jpg, a real photograph) and digit.png, with QNALO_WEIGHTS pointing at
that folder. ```bash blocks (the set-up commands, which CI runs itself, and benchmark runs) are not run; the
```python-gpu blocks run after the ```python ones on the CUDA emulator (tests/emulated_cupy), and on a GPU
with -m gpu."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from qnalo import demo
from model_helpers import real_photo

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
DIGIT_INDEX = 5   # a held-out digit the README's example classifies


def readme_blocks():
    """[(language, text)] of the fenced blocks of README.md, in order."""
    with open(README, encoding="utf-8") as f:
        return [(m.group(1), m.group(2)) for m in re.finditer(r"^```([\w-]*)\n(.*?)^```$", f.read(), re.M | re.S)]


def console_steps(text):
    """[(command, expected output lines)] of a console block."""
    steps = []
    for line in text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
    return steps


def output_pattern(lines):
    parts = []
    for line in lines:
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*?".join(re.escape(piece) for piece in line.rstrip().split("...")) + r"[ \t]*\n")
    return re.compile("".join(parts))


@pytest.fixture(scope="module")
def example_folder(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from reference.litv2_torch import litv2_reference, randomize_
    folder = tmp_path_factory.mktemp("readme")
    torch.save({"model": randomize_(litv2_reference("litv2_s"), seed=0).state_dict()}, folder / "litv2_s.pth")
    shutil.copyfile(real_photo("china.jpg"), folder / "photo.jpg")
    demo.digit_picture(demo.heldout()["images"][DIGIT_INDEX]).resize((64, 64)).save(folder / "digit.png")
    return folder


@pytest.mark.torch
def test_readme_examples_run_and_print_what_they_show(example_folder):
    blocks = [(lang, text) for lang, text in readme_blocks() if lang in ("console", "python")]
    assert len(blocks) >= 3, "README.md lost its examples"
    env = {**os.environ, "QNALO_WEIGHTS": str(example_folder), "COLUMNS": "120",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    namespace = {}
    cwd = os.getcwd()
    os.chdir(example_folder)
    try:
        for lang, text in blocks:
            if lang == "python":
                exec(compile(text, "README.md python block", "exec"), namespace)
                continue
            for command, expected in console_steps(text):
                proc = subprocess.run(shlex.split(command), capture_output=True, text=True, env=env, timeout=900)
                assert proc.returncode == 0, f"$ {command}\n{proc.stderr}"
                out = proc.stdout if proc.stdout.endswith("\n") or not proc.stdout else proc.stdout + "\n"
                assert output_pattern(expected).fullmatch(out), (
                    f"$ {command}\nREADME shows:\n" + "\n".join(expected) + f"\nit printed:\n{out}")
    finally:
        os.chdir(cwd)


def test_output_patterns():
    assert output_pattern(["a ... c", "...", "end"]).fullmatch("a b c\nx\ny\nend\n")
    assert output_pattern(["a ... c", "...", "end"]).fullmatch("a  c\nend\n")
    assert not output_pattern(["a ... c"]).fullmatch("a b d\n")
    assert console_steps("$ qnalo info f\nline 1\n$ qnalo x\n") == [("qnalo info f", ["line 1"]), ("qnalo x", [])]


@pytest.mark.torch
def test_readme_gpu_examples_run_on_cuda(example_folder, cuda_cupy, tmp_path, monkeypatch):
    import qnalo
    from qnalo.weights_converter.convert import convert
    from tolerances import assert_logits_close
    for name in os.listdir(example_folder):
        # a copy of the folder's files, whatever the other test wrote into it (files and folders)
        if not name.endswith(".safetensors") and os.path.isfile(example_folder / name):
            shutil.copyfile(example_folder / name, tmp_path / name)
    convert(str(tmp_path / "litv2_s.pth"), str(tmp_path / "litv2_s.safetensors"))
    monkeypatch.chdir(tmp_path)
    namespace, gpu_logits = {}, []
    for lang, text in readme_blocks():
        if lang in ("python", "python-gpu"):
            exec(compile(text, f"README.md {lang} block", "exec"), namespace)
            if lang == "python-gpu":
                gpu_logits.append(namespace["logits"])
    assert gpu_logits, "README.md lost its GPU example"
    cpu = qnalo.load("litv2_s.safetensors")
    assert_logits_close(gpu_logits[0], cpu(namespace["x"]), what="README's GPU example")
