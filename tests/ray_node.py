"""`ray start` for a worker node joining a head on this machine, every listener on loopback.

    python -m tests.ray_node --address=127.0.0.1:PORT --block --num-cpus=3 --node-ip-address=127.0.0.1

Ray's local-only switch (``jobs._runtime.LOCAL_ONLY_ENV`` = 0, which the nodes' processes inherit)
keeps a node's processes on 127.0.0.1, but Ray's CLI refuses to start a *worker* node under it
("multi-node clusters are not supported on Windows and OSX"), and without it the CLI turns
127.0.0.1 into the machine's external address. This runs Ray's own ``ray start`` with the check
passed and the node's address kept at 127.0.0.1; everything else is ``ray start``.
"""

import os
import sys

from jobs._runtime import LOCAL_ONLY_ENV

if __name__ == "__main__":
    os.environ[LOCAL_ONLY_ENV] = "0"  # what the node's raylet, agents and workers inherit
    from ray._private import ray_constants, services
    from ray.scripts.scripts import main

    ray_constants.ENABLE_RAY_CLUSTER = True  # the CLI's worker-node check
    services.get_node_ip_address = lambda address=None: "127.0.0.1"  # and its address resolution
    sys.argv = ["ray", "start", *sys.argv[1:]]
    sys.exit(main())
