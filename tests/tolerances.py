"""The project's tolerance table and checks live in qnalo.testing (users test their ports with them); the
tests import them from here, with the factor of test_kernels_hilo's scaled inputs."""
from qnalo.testing import MODEL_FLOAT16, TOLERANCES, assert_logits_close, assert_parity, tolerance  # noqa: F401

assert_close = assert_parity


def hilo_scale(logit_scale):
    """The factor on ("hilo", "float32")'s atol for q, k, v entries of std logit_scale (measured in the table)."""
    return logit_scale ** 2
