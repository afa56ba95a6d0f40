"""NDIF's sandboxed model actor on a CPU: only the CUDA loading and cleanup are replaced.

Imported inside the Ray workers of the real NDIF stack (tests/ndif_real/stack.py
puts this folder on their PYTHONPATH), never by attnflow.  Request execution --
deserialisation, the trusted in-process path, the untrusted runner process, the
inline/object-store result routes -- stays NDIF's own code
(`ndif.services.ray.sandbox.model.SandboxModelDeployment` over
`ndif.services.ray.deployments.modeling.base.BaseModelDeployment`).

MRO: CPUSandboxModelActor -> SandboxModelDeployment -> SandboxHost -> CPUModelDeployment
-> BaseModelDeployment, so the sandbox's own cleanup runs first and then ours.
"""

import gc

import ray
from ndif.services.ray.deployments.modeling.base import BaseModelDeployment
from ndif.services.ray.sandbox.model import SandboxModelDeployment
from nnsight.modeling.huggingface import HuggingFaceModel


class CPUModelDeployment(BaseModelDeployment):
    def load_from_disk(self) -> HuggingFaceModel:
        """base.load_from_disk without the GPU placement, CUDA sync and placement check."""
        self.gpu_mem_bytes_by_id = {}  # no GPU: per-request GPU metering has nothing to read
        model = HuggingFaceModel.from_model_key(self.model_key, dispatch=True, dtype=self.dtype_name, **self.kwargs)
        model._module.requires_grad_(False)
        return model

    def cleanup(self) -> None:
        """base.cleanup without torch.cuda.synchronize / empty_cache."""
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()


class CPUSandboxModelDeployment(SandboxModelDeployment, CPUModelDeployment):
    pass


@ray.remote(num_cpus=1, max_restarts=-1)
class CPUSandboxModelActor(CPUSandboxModelDeployment):
    """What the controller deploys here (NDIF_MODEL_IMPORT_PATH)."""
