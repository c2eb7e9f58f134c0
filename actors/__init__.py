"""Ray actors (ModelWorker, ProgressActor, JobManager) and the Client facade.

Every miStudio process must agree with the cluster on Ray's settings, and Ray reads them when
it is first imported, so they are set here, before any module of ours imports ray: token
authentication on (Ray 2.60 enables it for `ray start` when ~/.ray/auth_token exists but not
for a client given an explicit address, and the two must agree), usage stats off.
"""

import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
if not os.environ.get("MISTUDIO_RAY_ADDRESS") and not os.environ.get("RAY_ADDRESS"):
    # One machine (the local head, or an in-process Ray): Ray's node address is 127.0.0.1, so its
    # GCS, raylet, workers, agents and client server listen on loopback only. Ray replaces an
    # explicit --node-ip-address=127.0.0.1 by the machine's external address unless it believes
    # it runs single-node (this flag, meant for macOS and Windows); the head and every process
    # attaching to it must agree, hence here, before ray is imported (a Ray job on the local head
    # inherits the flag from the raylet). A multi-node cluster is named by MISTUDIO_RAY_ADDRESS,
    # or by RAY_ADDRESS inside its Ray jobs, and keeps Ray's default.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if "ray" in sys.modules:  # imported before us: the constant is read at import
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() in ("1", "true")
if os.environ.setdefault("RAY_AUTH_MODE", "token") == "token" and "ray" in sys.modules:
    # Someone imported ray before us (a notebook, a test): refresh its cached config.
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()
