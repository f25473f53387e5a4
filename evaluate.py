"""python evaluate.py: world benchmarks, side-by-side tables, POPE and AMBER files, the round report
(`python evaluate.py -h`; `python evaluate.py pope -h`, `amber -h`, `report -h` for the subcommands).

The code is sena/scripts/evaluate.py, read top to bottom there; pip installs the same command as `sena-evaluate`.
"""

from sena.scripts.evaluate import cli_main, main  # noqa: F401  (tests call these)

if __name__ == "__main__":
    cli_main()
