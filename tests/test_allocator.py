import subprocess
import sys

import pytest

from mbrl_bilevel.allocator import keep_freed_memory

FAULTS_PER_STEP = """
import resource, torch
from mbrl_bilevel.allocator import keep_freed_memory
from mbrl_bilevel.data import Dataset
from mbrl_bilevel.ensemble import GaussianEnsemble
from mbrl_bilevel.learners import make_dynamics_learner
from mbrl_bilevel.training import FitConfig

assert keep_freed_memory()
torch.set_num_threads(1)
data = Dataset(torch.randn(2048, 23), torch.randn(2048, 17))
ensemble = GaussianEnsemble(23, 17, 7, 5, (200, 200, 200, 200))
learner = make_dynamics_learner("nll", FitConfig(steps=20, batch_size=256), 23, 17, progress=False)
for _ in range(2):  # the heap grows to its peak
    learner.fit(ensemble, data, None)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
learner.fit(ensemble, data, None)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_training_steps_reuse_freed_memory_instead_of_faulting_it_back_in():
    """Without the setting a step of the default ensemble faulted in ~500 pages (about 2 MB)."""
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_STEP], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 50


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_keep_freed_memory_reports_that_it_took_effect():
    assert keep_freed_memory() is True
