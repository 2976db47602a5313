"""FSDP on CPU processes: what Accelerate leaves out.

``accelerate launch --config_file examples/accelerate/fsdp.yaml`` sets ``ACCELERATE_USE_FSDP=true`` and the
``FSDP_*`` variables for every process. On a machine without GPUs the processes are ``MULTI_CPU`` (gloo), and
Accelerate 1.x attaches its FSDP plugin only to GPU-like distributed types: the run silently becomes plain data
parallelism with full copies of the model. PyTorch's FSDP itself (``fully_shard``, FSDP2) runs on CPU tensors over
gloo, so :func:`fsdp_on_cpu` gives such processes the FSDP state Accelerate would have built on GPUs: the same
plugin (read from the same variables), so ``prepare`` shards the model, ``save_state`` / ``load_state`` write and
read sharded states, and ``get_state_dict`` gathers the full weights for ``final/``.
"""

from __future__ import annotations

import logging
import os

from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

log = logging.getLogger("preftune")


def fsdp_on_cpu(accelerator: Accelerator) -> Accelerator:
    """``accelerator`` under FSDP when the launcher asked for FSDP and the processes run on CPUs; else unchanged."""
    state = accelerator.state
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not asked or state.distributed_type != DistributedType.MULTI_CPU:
        return accelerator
    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_VERSION, FSDP_STATE_DICT_TYPE, … as Accelerate does
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # AcceleratorState copies PartialState's fields each time it is instantiated (the optimizer wrapper does): both
    # must say FSDP. Both are shared-state singletons, so setting the attribute on an instance sets it for all.
    PartialState().distributed_type = DistributedType.FSDP
    if accelerator.is_main_process:
        log.info("FSDP%d on %d CPU processes (gloo): the model is sharded by PyTorch's FSDP, which Accelerate only "
                 "attaches on GPUs", plugin.fsdp_version, accelerator.num_processes)
    return accelerator
