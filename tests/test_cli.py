"""The `qnalo` command line: classify (and --demo, the README's first command), convert, info, bench; one clear
line and a non-zero exit for every kind of bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import qnalo
from qnalo import cli, demo
from qnalo.classify import expand_paths, softmax, top_k
from qnalo.labels import imagenet_labels
from qnalo.models.litv2_config import LITv2Config
from qnalo.weights import read_weights
from model_helpers import real_photo


def _qnalo(*args, **kwargs):
    """The command in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "qnalo.cli", *args], capture_output=True, text=True, timeout=600,
                          **kwargs)


def _digit_files(folder, count=3):
    data = demo.heldout()
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"digit{i}.png")
        demo.digit_picture(data["images"][i]).resize((40, 40)).save(path)
        paths.append(path)
    return paths, data["labels"][:count]


def test_demo_classifies_the_heldout_digits_without_torch():
    code = ("import sys; from qnalo import cli; rc = cli.main(['classify', '--demo', '--json']); "
            "assert 'torch' not in sys.modules, 'inference imported torch'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    reports = json.loads(proc.stdout)                                # stdout is the JSON document alone
    assert [r["name"] for r in reports] == list(demo.DEMO_MODELS)
    for r in reports:   # the bars: accuracy >= 95 %, every prediction the PyTorch one
        assert r["accuracy"] >= 0.95 and r["agreement"] == 1.0 and r["count"] == 360, r
        assert r["images_per_s"] > 0 and r["latency_ms"] > 0


def test_demo_text_report(capsys):
    assert cli.main(["classify", "--demo"]) == 0
    out = capsys.readouterr().out
    assert out.count("agreement with PyTorch 100.00% (360/360)") == 2 and "images/s" in out


def test_demo_disagreement_is_a_one_line_error(monkeypatch, capsys):
    real = demo.evaluate

    def off_by_one(name, **kwargs):
        report = real(name, **kwargs)
        return {**report, "agreement": 359 / 360, "disagreements": [0]}
    monkeypatch.setattr(demo, "evaluate", off_by_one)
    assert cli.main(["classify", "--demo"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "qnalo: error: qnalo's predictions differ from the recorded PyTorch ones (see agreement above)")


def test_classify_files_folders_and_globs_with_the_demo_model(tmp_path, capsys):
    paths, labels = _digit_files(str(tmp_path / "digits"))
    assert cli.main(["classify", "--model", "litv2_digits", "--top", "2", "--json",
                     str(tmp_path / "digits"), str(tmp_path / "digits" / "*.png")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in report["results"]] == paths + paths
    for result, label in zip(report["results"], list(labels) * 2):
        assert [t["rank"] for t in result["top"]] == [1, 2]
        assert result["top"][0]["label"] == str(label)
        assert result["top"][0]["probability"] >= result["top"][1]["probability"]


def test_unreadable_images_are_reported_and_skipped(tmp_path):
    paths, labels = _digit_files(str(tmp_path), count=2)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    proc = _qnalo("classify", "--model", "qna_vit_digits", paths[0], str(broken), str(tmp_path / "missing.png"),
                  paths[1], "--top", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert errors[0] == f"qnalo: error: {tmp_path / 'missing.png'}: no such file or directory"
    assert errors[1].startswith(f"qnalo: error: {broken}: cannot read as an image")
    assert errors[2] == "qnalo: error: 2 of 4 inputs could not be classified"
    assert proc.stdout.split() == [paths[0], "1", proc.stdout.split()[2], str(labels[0]),
                                   paths[1], "1", proc.stdout.split()[6], str(labels[1])]


@pytest.mark.parametrize("args, message", [
    (["classify", "--weights", "missing.safetensors", "x.png"], "missing.safetensors"),
    (["info", "missing.safetensors"], "missing.safetensors"),
    (["convert", "missing.pth", "out.safetensors"], "missing.pth"),
])
def test_bad_input_is_one_line_and_exit_1(tmp_path, args, message):
    proc = _qnalo(*args, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qnalo: error: ") and message in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / "out.safetensors")


@pytest.mark.parametrize("args, message", [
    (["classify", "x.png"], "no model given; pass --weights FILE"),
    (["classify", "--model", "litv2_digits"], "no IMAGE given"),
    (["classify", "--demo", "x.png"], "--demo runs the embedded models on their own images"),
    (["classify", "--model", "nope", "x.png"], "unknown model 'nope'"),
    (["classify", "--top", "0", "--demo"], "argument --top: must be positive: 0 (see `qnalo classify --help`)"),
    (["classify", "--model", "litv2_digits", "--top", "11", "x.png"],
     "--top 11 asks for more classes than the model has (10); pass --top 10 or less"),
    (["bench", "--model", "nope"], "argument --model: invalid choice: 'nope'"),
    (["convert", "a.pth"], "the following arguments are required: DST (see `qnalo convert --help`)"),
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND (see `qnalo --help`)"),
])
def test_usage_errors_are_one_line_and_exit_2(tmp_path, args, message):
    proc = _qnalo(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qnalo: error: ") and message in lines[0], proc.stderr
    assert proc.stdout == ""


def test_version():
    proc = _qnalo("--version")
    assert proc.returncode == 0 and proc.stdout == f"qnalo {qnalo.__version__}\n" and proc.stderr == ""


def test_output_into_a_closed_pipe_ends_quietly():
    """`qnalo info FILE --json | head -1`: the reader is gone before qnalo writes (here: from the start)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "qnalo.cli", "info", demo.demo_path("litv2_digits"), "--json"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=600)
    finally:
        os.close(write_end)
    assert proc.stderr == "" and proc.returncode == 128 + 13     # as a shell reports a process ended by SIGPIPE


def test_threads_beyond_the_cpus_warn_in_one_line():
    proc = _qnalo("bench", "--model", "litv2_digits", "--calls", "1", "--threads", str(os.cpu_count() + 3))
    assert proc.returncode == 0, proc.stderr
    warning, = proc.stderr.strip().splitlines()
    assert warning.startswith(f"qnalo: warning: {os.cpu_count() + 3} kernel threads but only "), warning


def test_weights_of_the_wrong_family_or_kind(tmp_path):
    qna_file = demo.demo_path("qna_vit_digits")
    proc = _qnalo("classify", "--model", "litv2_s", "--weights", qna_file, "x.png")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert proc.stderr == (f"qnalo: error: {qna_file} holds a qna_vit model, not litv2_s; drop --model to use the "
                           "file as it is\n")
    proc = _qnalo("bench", "--model", "qna_vit_tiny", "--weights", qna_file)
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout
    assert proc.stderr.startswith(f"qnalo: error: {qna_file} holds weights of another configuration, not of "
                                  "qna_vit_tiny (they differ in embed_dim, ")
    assert proc.stderr.endswith("); drop --model to use the file as it is\n")
    not_weights = tmp_path / "photo.png"
    not_weights.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    proc = _qnalo("classify", "--weights", str(not_weights), str(not_weights))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "not a qnalo weights file" in proc.stderr


def test_a_variant_name_finds_its_converted_file_or_says_where_to_put_it(tmp_path):
    env = {**os.environ, "QNALO_WEIGHTS": str(tmp_path)}
    proc = _qnalo("classify", "--model", "litv2_s", "x.png", env=env)
    expected = tmp_path / "litv2_s.safetensors"
    assert proc.returncode == 1 and f"no converted weights for litv2_s at {expected}" in proc.stderr


def test_every_subcommand_has_help():
    for command in ("classify", "convert", "info", "bench"):
        proc = _qnalo(command, "--help")
        assert proc.returncode == 0 and "usage: qnalo " + command in proc.stdout


def test_info_reports_what_the_file_holds(capsys):
    path = demo.demo_path("litv2_digits")
    assert cli.main(["info", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = LITv2Config.from_dict(info["config"])
    assert info["architecture"] == "litv2" and info["img_size"] == demo.IMG_SIZE
    assert info["macs"] == cfg.macs(32, 32) and info["params"] == demo.manifest()["models"]["litv2_digits"]["params"]
    assert info["source"]["labels"] == list(demo.DIGIT_LABELS)
    assert cli.main(["info", path]) == 0
    text = capsys.readouterr().out
    assert f"{info['params']:,}" in text and "MACs          1.06 M per image at 32x32" in text


def test_bench_times_a_model(capsys):
    assert cli.main(["bench", "--weights", demo.demo_path("qna_vit_digits"), "--batch", "3", "--calls", "2"]) == 0
    out = capsys.readouterr().out
    assert "batch 3" in out and "kernels loaded in" in out and "median of 2 calls" in out and "images/s" in out


def test_bench_and_classify_run_on_cuda(cuda_cupy, tmp_path, capsys):
    """--device cuda (here on the CUDA emulator, and on a GPU where there is one) for bench and classify."""
    assert cli.main(["bench", "--weights", demo.demo_path("litv2_digits"), "--device", "cuda", "--batch", "2",
                     "--calls", "1"]) == 0
    out = capsys.readouterr().out
    assert "batch 2, cuda, float32" in out and "median of 1 calls" in out
    paths, labels = _digit_files(str(tmp_path), count=2)
    assert cli.main(["classify", "--model", "qna_vit_digits", "--device", "cuda", "--dtype", "float16", "--json",
                     *paths]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["top"][0]["label"] for r in report["results"]] == [str(label) for label in labels]


def test_the_demo_keeps_every_prediction_on_cuda(cuda_cupy, capsys):
    assert cli.main(["classify", "--demo", "--device", "cuda", "--json"]) == 0
    for r in json.loads(capsys.readouterr().out):
        assert r["device"] == "cuda" and r["agreement"] == 1.0 and r["count"] == 360, r


def test_float16_on_the_cpu_is_a_clear_error(capsys):
    """in the command line's words: its options, not the keyword arguments of the Python API"""
    assert cli.main(["bench", "--model", "litv2_s", "--dtype", "float16"]) == 1
    assert "error: --dtype float16 runs on --device cuda only" in capsys.readouterr().err
    assert cli.main(["classify", "--demo", "--dtype", "float16"]) == 1
    assert "error: --dtype float16 runs on --device cuda only" in capsys.readouterr().err


def test_cuda_without_cupy_says_how_to_get_it(monkeypatch, capsys):
    from qnalo.models import ops
    monkeypatch.setattr(ops, "_DEVICE_OPS", {})
    monkeypatch.setitem(sys.modules, "cupy", None)               # as if CuPy were not installed
    assert cli.main(["classify", "--demo", "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qnalo: error: --device cuda: ") and "pip install 'qnalo[cuda]'" in err


def test_expand_paths(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.png", "a/b/2.JPG", "a/notes.txt", "c.jpeg"):
        (tmp_path / name).write_bytes(b"")
    files, problems = expand_paths([tmp_path / "a", str(tmp_path / "*.jpeg"), tmp_path / "none", tmp_path / "a" / "b"
                                    / "*.gif"])
    assert files == [str(tmp_path / "a" / "1.png"), str(tmp_path / "a" / "b" / "2.JPG"), str(tmp_path / "c.jpeg")]
    assert [m for _, m in problems] == ["no such file or directory", "no file matches this pattern"]


def test_top_k_and_softmax():
    probs = softmax(np.array([[1000.0, 1000.0, -5.0], [0.0, 1.0, 2.0]]))
    assert np.allclose(probs.sum(1), 1) and np.isfinite(probs).all()
    ranked = top_k(probs, ["a", "b", "c"], 5)
    assert [t["label"] for t in ranked[0]] == ["a", "b", "c"] and [t["label"] for t in ranked[1]] == ["c", "b", "a"]


# ---- real photos, converted official-layout weights: the same top-5 as the official pipeline in PyTorch ----

def _top5_torch(ref, x):
    import torch
    with torch.no_grad():
        p = torch.softmax(ref(x).double(), dim=1)[0].numpy()
    order = np.argsort(-p, kind="stable")[:5]
    return order.tolist(), p[order]


@pytest.mark.torch
@pytest.mark.parametrize("photo_name", ["china.jpg", "flower.jpg"])
@pytest.mark.parametrize("family", ["litv2", "qna_vit"])
def test_classify_a_photo_gives_the_official_pipelines_top5(tmp_path, family, photo_name, capsys):
    torch = pytest.importorskip("torch")
    from PIL import Image
    from reference import preprocess_torch
    if family == "litv2":
        from reference.litv2_torch import LITv2, randomize_
        ref = randomize_(LITv2(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)).eval(), seed=3)
    else:
        from reference.qna_vit_torch import QnAViT, randomize_
        ref = randomize_(QnAViT(embed_dim=16, qna_depths=(1, 1, 1, 0), msa_depths=(0, 0, 1, 1),
                                qna_heads=(2, 4, 8, 16), msa_heads=(1, 2, 4, 8)).eval(), seed=3)
    torch.save({"model": ref.state_dict()}, tmp_path / "official.pth")
    weights = str(tmp_path / "converted.safetensors")
    assert cli.main(["convert", str(tmp_path / "official.pth"), weights]) == 0
    jpeg = real_photo(photo_name)
    capsys.readouterr()
    assert cli.main(["classify", jpeg, "--weights", weights, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["results"][0]["top"]
    with Image.open(jpeg) as img:
        rgb = img.convert("RGB")
    x = (preprocess_torch.litv2_reference(rgb) if family == "litv2"
         else preprocess_torch.qna_vit_reference(np.asarray(rgb))[0])
    want, probabilities = _top5_torch(ref, x)
    assert [t["index"] for t in got] == want
    np.testing.assert_allclose([t["probability"] for t in got], probabilities, rtol=1e-4, atol=1e-7)
    assert "labels" not in read_weights(weights)[3] and got[0]["label"] == imagenet_labels()[want[0]]


def test_a_progress_bar_on_a_terminal_for_several_images(tmp_path):
    import pty
    paths, _ = _digit_files(str(tmp_path), count=3)
    leader, follower = pty.openpty()
    proc = subprocess.run([sys.executable, "-m", "qnalo.cli", "classify", "--model", "litv2_digits", *paths],
                          stdout=subprocess.PIPE, stderr=follower, text=True, timeout=600)
    os.close(follower)
    terminal = os.read(leader, 1 << 16).decode(errors="replace")
    os.close(leader)
    assert proc.returncode == 0 and proc.stdout.count("digit") == 3
    assert "3/3" in terminal and "image" in terminal   # tqdm's bar, on the terminal only


@pytest.mark.torch
def test_convert_records_labels_and_takes_the_head_width(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from reference.litv2_torch import LITv2, randomize_
    ref = randomize_(LITv2(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), alpha=0.5,
                           num_classes=3).eval())
    torch.save(ref.state_dict(), tmp_path / "narrow.pth")
    out = str(tmp_path / "narrow.safetensors")
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    assert cli.main(["convert", str(tmp_path / "narrow.pth"), out]) == 1          # heads of 16, not 32
    assert "head dim 32" in capsys.readouterr().err and not os.path.exists(out)
    assert cli.main(["convert", str(tmp_path / "narrow.pth"), out, "--head-dim", "16",
                     "--labels", str(tmp_path / "labels.txt")]) == 1               # 2 names for 3 classes
    assert "2 labels given for a head of 3 classes" in capsys.readouterr().err and not os.path.exists(out)
    (tmp_path / "labels.txt").write_text("cat\ndog\n\nbird\n")
    assert cli.main(["convert", str(tmp_path / "narrow.pth"), out, "--head-dim", "16",
                     "--labels", str(tmp_path / "labels.txt")]) == 0
    _, _, config, source = read_weights(out)
    assert source["labels"] == ["cat", "dog", "bird"] and config["num_heads"] == [1, 2, 4, 8]
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~_umask()     # a plain new file's mode, not mkstemp's 0600


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_converter_errors_name_the_options_that_fix_them(tmp_path, capsys):
    """the converter's "pass head_dim=N" / "window_sizes=..." read as the command line's options"""
    from safetensors.numpy import save_file
    from test_converter import official_state_dict
    src, dst = tmp_path / "narrow_heads.safetensors", tmp_path / "out.safetensors"
    save_file(official_state_dict(lo_heads=(0, 0, 5, 16), hi_heads=(0, 0, 3, 0), head_dim=16), str(src))
    assert cli.main(["convert", str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.rstrip().endswith("; pass --head-dim N") and "head_dim=" not in err, err
    assert cli.main(["convert", str(src), str(dst), "--head-dim", "16", "--window-sizes", "0,0,0,1"]) == 1
    err = capsys.readouterr().err
    assert err.rstrip().endswith("; pass --window-sizes W0,W1,W2,W3") and "window_sizes=" not in err, err
    assert not dst.exists()
    assert cli.main(["convert", str(src), str(dst), "--head-dim", "16"]) == 0
