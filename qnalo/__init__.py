"""qnalo: CPU inference for LITv2 (HiLo attention) and QnA-ViT, without PyTorch."""
__version__ = "0.1.0"
