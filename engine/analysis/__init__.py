"""The analysis layer: what runs' records and checkpoints say, after (or while) they train.

    tv.py      total-variation distance between two runs' models at matched loss (function space)
    curves.py  loss curves on the step / samples / LR-normalized-step axes, translations between them
    replay.py  a preset that replays a steered run (its applied requests as planned changes)
"""
