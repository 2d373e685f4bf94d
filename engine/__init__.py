"""gpctl's engine: everything that defines, trains, launches and reads runs. Never gpctl, typer,
textual or rich (the GPU box has none of them); torchvision, transformers and datasets only inside
the modules that need them.

Layers, each importing only those below it (import-linter contracts in pyproject.toml, run by
tests/test_boundary.py):

    engine.launch     worker, Slurm, backends, twins: where and when runs train (and who forks twins)
    engine.analysis   TV at matched loss, curves, replay presets
    engine.train      the training loop, checkpoints, DDP (torch)
    engine.control    requests in, notifications out; the trust rule (no torch)
    engine.store      run directories and jobs.db (no torch)

and beneath them all, what an experiment is, with no run behind it: config.py (the schema),
schedule.py (lr and batch), clock.py (step, samples, lr_time), plan.py (a run stepped without training), contract.py and
presets.py (a figure's arms and what they may differ in), levels.py (matched losses), fs.py
(names, homes, bounded reads, atomic writes), errors.py, models/ and data/.
"""
