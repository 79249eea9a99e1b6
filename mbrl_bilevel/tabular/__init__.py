"""The tabular classification study (issue 4): NLL vs PG under learned rewards.

Python API: `run_study(TabularConfig(...), [from_arrays(X, y, "name")])` runs it on any arrays.
"""

from mbrl_bilevel.tabular.data import TabularData, from_arrays, load, split
from mbrl_bilevel.tabular.study import TabularConfig, run_study

__all__ = ["TabularConfig", "TabularData", "from_arrays", "load", "run_study", "split"]
