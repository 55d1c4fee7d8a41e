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

# Every gateway the tests start would otherwise try the inspector's default port, 4040, and all
# but one would warn that it is taken (or take a developer's own inspector's place): tests that
# want an inspector ask for one with --inspector tcp:0:interface=127.0.0.1, which wins over this.
os.environ.setdefault("MCPR_INSPECTOR", "off")

# Every gateway the tests start keeps an event store under $XDG_STATE_HOME/mcpr/: in the tests'
# own folder, not the developer's ~/.local/state (tests that check the default set their own).
os.environ["XDG_STATE_HOME"] = os.path.join(_workdir, "state")
