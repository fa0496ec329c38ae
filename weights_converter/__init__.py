"""Official checkpoints -> qnalo weights files (installed as qnalo.weights_converter)."""
