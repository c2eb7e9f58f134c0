"""Ray actors (ModelWorker, ProgressActor, JobManager) and the Client facade.

Ray reads its configuration when it is first imported, so the settings every miStudio
process must share with the cluster are set here, before any module of ours imports ray:
token authentication on (Ray 2.60 enables it for `ray start` when ~/.ray/auth_token exists
but not for a client given an explicit address, and the two must agree), usage stats off.
"""

import os

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
