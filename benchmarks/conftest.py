"""Benchmark session plumbing: threads pinned before numpy loads, shared artifacts, the final report."""
import harness  # first: it sets *_NUM_THREADS before anything imports numpy

import os  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    folder = os.environ.get("QNALO_BENCH_ARTIFACTS") or str(tmp_path_factory.mktemp("litv2_bench"))
    os.makedirs(folder, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = harness.build_artifacts(folder)
    harness.RESULTS["notes"].append(f"qnalo weights: {art.qnalo_note}")
    harness.RESULTS["notes"].append(f"ONNX: {art.onnx_note}; export s per batch "
                                    + ", ".join(f"b{b} {s:.1f}" for b, s in art.export_s.items()))
    harness.RESULTS["notes"].append("threads: " + harness.threads_in_effect())
    if harness.NUMPY_WAS_LOADED_EARLY:
        harness.RESULTS["notes"].append("WARNING: numpy was imported before the thread variables were set")
    return art


def pytest_terminal_summary(terminalreporter):
    if not any(harness.RESULTS[k] for k in ("timing", "rss", "cold")):
        return
    text = harness.render_report()
    path = harness.write_report(text)
    terminalreporter.write_sep("=", "qnalo vs competitors")
    terminalreporter.write_line(text)
    terminalreporter.write_line(f"(written to {os.path.relpath(path)} and {harness.VARIANT}_{harness.IMG}_latest.md)")
