"""Ray actors (ModelWorker, ProgressActor, JobManager) and the Client facade.

Every miStudio process must agree with the cluster on Ray's settings, and Ray reads them when
it is first imported, so they are set here, before any module of ours imports ray: token
authentication on (Ray 2.60 enables it for `ray start` when ~/.ray/auth_token exists but not
for a client given an explicit address, and the two must agree), usage stats off.
"""

import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
if os.environ.setdefault("RAY_AUTH_MODE", "token") == "token" and "ray" in sys.modules:
    # Someone imported ray before us (a notebook, a test): refresh its cached config.
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()
