"""Deploy one replica of a model on the running NDIF controller and wait until its actor runs.

    python deploy.py RAY_CLIENT_URL MODEL_KEY SIZE_BYTES TIMEOUT_S     (in the NDIF venv)

By hand, with an explicit size: nnsight 0.8.1 cannot size a model for NDIF 0.1.2
(`describe_checkpoint() got an unexpected keyword argument 'trust_remote_code'`),
and a given `size_bytes` is the one placement input the controller needs no
description for.  float32 so that the server computes what a local float32 run does.
"""

import sys
import time

import ray
from ndif.common.schema.controller import DeploymentConfig

url, key, size, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
ray.init(address=url, namespace="NDIF", logging_level="error")
controller = ray.get_actor("Controller", namespace="NDIF")
deadline = time.monotonic() + timeout
while not ray.get(controller.status.remote())["cluster"]["nodes"]:  # the controller has not seen the GPU node yet
    if time.monotonic() > deadline:
        sys.exit("the controller lists no GPU node")
    time.sleep(1)
response = ray.get(controller.deploy.remote({key: DeploymentConfig(size_bytes=size, dtype="float32", pinned=True)}))
print(f"deploy response: {response}", flush=True)
while time.monotonic() < deadline:
    entries = ray.get(controller.status.remote())["deployments"]
    states = {n: e.get("application_state") for n, e in entries.items() if n.endswith(f":ModelActor:{key}")}
    if "RUNNING" in states.values():
        print(f"deployed {key}: {states}")
        sys.exit(0)
    time.sleep(1)
sys.exit(f"{key} not running after {timeout:.0f} s: {states}")
