"""python -m qnalo.weights_converter SRC DST [--force] [--img-size N] [--window-sizes 0,0,2,1]

(also `python -m weights_converter ...` from the repository root: the imports are absolute.)"""
import sys

from qnalo.cli import convert_main

if __name__ == "__main__":
    sys.exit(convert_main())
