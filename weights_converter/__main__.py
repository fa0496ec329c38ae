"""python -m qnalo.weights_converter SRC DST [--force] [--img-size N] [--window-sizes 0,0,2,1]

(also `python -m weights_converter ...` from the repository root: the imports are absolute.)"""
import sys

from qnalo._command import Parser, run
from qnalo.weights_converter.command import CONVERT_HELP, add_convert_arguments, run_convert


def main(argv=None, prog="python -m qnalo.weights_converter"):
    """`qnalo convert` as a program of its own."""
    parser = Parser(prog=prog, description=CONVERT_HELP)
    add_convert_arguments(parser)
    parser.set_defaults(run=run_convert)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
