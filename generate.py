"""python generate.py: one SENA round's preference pairs from a model and unlabeled images (`python generate.py -h`).

The code is sena/scripts/generate.py, read top to bottom there; pip installs the same command as `sena-generate`.
"""

from sena.scripts.generate import cli_main, main, parse_args  # noqa: F401  (tests call these)

if __name__ == "__main__":
    cli_main()
