"""What the small entry points (results.py, generate.py, prepare_ntu.py) use that is neither PyTorch (src/)
nor Lightning (lightning_modules/): the ``key=value`` command line of every small entry point
(:mod:`tools.cli`), the table of the runs under a folder (:mod:`tools.runs_table`) and the generated
REPRODUCTIONS.md (:mod:`tools.reproductions`)."""
