"""python train.py: SENA's rounds on the embedded world or on your images (`python train.py -h` for every flag).

The code is sena/scripts/train.py, read top to bottom there; pip installs the same command as `sena-train`.
"""

from sena.scripts.train import cli_main, main, parse_args  # noqa: F401  (tests call these)

if __name__ == "__main__":
    cli_main()
