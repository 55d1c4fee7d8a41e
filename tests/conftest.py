"""Hypothesis runs derandomized with no deadline, so CI results do not depend on luck or load."""

import atexit
import os
import shutil
import tempfile

from hypothesis import settings

settings.register_profile("mcpr", derandomize=True, deadline=None, max_examples=200)
settings.load_profile("mcpr")

# trial's mktemp() makes paths relative to the working directory; keep them
# out of the checkout, as trial's own _trial_temp would.
_workdir = tempfile.mkdtemp(prefix="mcpr-tests-")
os.chdir(_workdir)
atexit.register(shutil.rmtree, _workdir, True)
