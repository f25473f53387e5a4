"""The code of the three commands: `python train.py`, `python generate.py` and `python evaluate.py` at the top of the
repository run these modules, and `pip install` makes them the console scripts sena-train, sena-generate and
sena-evaluate. They live inside the package so that an installed copy adds no top-level module named train,
generate or evaluate, names that other packages (Hugging Face's `evaluate`) already use."""
