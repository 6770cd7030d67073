"""Train a model from a YAML experiment file: FP32 baseline or CoDeQ quantization-aware training.

    python run_training.py --config configs/quickstart.yaml [--device cuda] [--set key.path=value]
                           [--dry-run] [--resume auto|PATH] [--verbose]

The seed's entry point, the same command as ``codeq train`` (``codeq.app.train``; ``--help`` lists the options and
exit codes). ``QUANTIZER_REGISTRY`` is ``codeq.QUANTIZER_REGISTRY``.
"""
import sys

try:
    from codeq.app.cli import run_command
    from codeq.quantizers import QUANTIZER_REGISTRY
except ModuleNotFoundError as error:
    if error.name != "codeq":
        raise
    sys.exit("error: the codeq package is not installed in this Python; run `make` (or `pip install -e .`) and use "
             ".venv/bin/python")

__all__ = ["QUANTIZER_REGISTRY", "main"]


def main(argv: list[str] | None = None) -> int:
    return run_command("train", argv, prog="run_training.py")


if __name__ == "__main__":
    sys.exit(main())
