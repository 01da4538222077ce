"""`llmsched sweep`: many simulations from one sweep file, on local processes or Ray.

spec.py reads the sweep file into cells (one resolved config each); run.py runs the cells
without a stored result on an executor (llmsched.parallel) and gathers the table; plot.py
draws the latencies against the load.
"""

from llmsched.sweep.run import plan, rows, run, run_sweep, write_results
from llmsched.sweep.spec import Cell, Sweep, read_sweep

__all__ = ["Cell", "Sweep", "plan", "read_sweep", "rows", "run", "run_sweep", "write_results"]
