"""`SimConfig`: one simulated system (hardware, model, topology, policy and its knobs), as
`sim/cluster.py` runs it and the simulator's commands build it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignedserve.scheduling.aligned_config import AlignBy, AlignedKnobs
from alignedserve.sim.cost_model import Kernel
from alignedserve.sim.nodes import Nodes


class SimConfig(AlignedKnobs):
    """One simulated system: hardware, model, topology and the policy's knobs (the aligned
    batching knobs are inherited from `AlignedKnobs`; the dispatch's clock runs in
    simulated seconds, a device's in its steps)."""

    align_by: AlignBy = Field(
        "longest", description="aligned: GPU decode kernels run one work unit per sequence "
        "(v1, vllm), so only the longest member stalls a step; auto: longest for v1 and "
        "vllm, total for the load-balanced models (split, fluid, none)")
    hardware: str = Field("h100-sxm", description="sim/profiles/hardware.json entry")
    model: str = Field("opt-13b", description="sim/profiles/models.json entry")
    policy: Literal["aligned", "fcfs", "fcfs-sorted"] = "aligned"
    disagg: bool = Field(False, description="fcfs: prefill on a second device per pair")
    pairs: int = Field(1, ge=1, description="compute devices (each aligned one has a "
                       "prefetch device beside it)")
    prefetch: bool = Field(True, description="aligned: GPU-Prefetch-For-GPU; False = the "
                           "paper's ablation")
    kernel: Kernel = Field("v1", description="decode attention model (sim/cost_model.py): "
                           "v1, vllm, split, fluid, none")
    block_size: int = Field(16, ge=1, description="tokens per KV block")
    kv_mem_fraction: float = Field(0.9, gt=0, le=1, description="of HBM left after the "
                                   "weights, for the device KV pool")
    host_pool_gib: float = Field(512.0, gt=0, description="host KV pool per pair, GiB (a "
                                 "DGX H100 has 2 TiB of host memory for 8 GPUs: 512 per pair)")
    max_num_seqs: int = Field(256, ge=1, description="requests in one step at most "
                              "(aligned: max_batch)")
    max_num_batched_tokens: int = Field(8192, ge=1, description="decode + prefill tokens in "
                                        "one step at most")
    router: Literal["round-robin", "dispatch"] = Field(
        "round-robin", description="how requests reach pairs: round-robin shards in arrival "
        "order (pairs simulated independently), or the deployed global dispatch "
        "(scheduling/dispatch.py; sim/router.py)")
    inflight_per_pair: int = Field(256, ge=1, description="dispatch: requests the router "
                                   "keeps assigned to a pair (ServeConfig.replica_inflight)")
    pairs_per_node: int | None = Field(
        None, ge=1, description="dispatch: pairs per node (pair j runs on node j // "
        "pairs_per_node); unset = all pairs on one node. A request decoded on another node "
        "than the one whose prefetch worker prefilled it first pulls its KV (sim/nodes.py)")
    internode_gbps: float = Field(
        25.0, gt=0, description="dispatch, several nodes: each node's inter-node NIC, GB/s "
        "per direction (25 = 200 Gb/s); cross-node KV pulls queue on the sending node's "
        "outbound and the receiving node's inbound direction")

    def but(self, **changes: object) -> SimConfig:
        """A validated copy with `changes` applied."""
        return SimConfig(**{**self.model_dump(), **changes})

    @property
    def kernel_align_by(self) -> str:
        """`align_by`, with auto resolved from the decode kernel model."""
        if self.align_by != "auto":
            return self.align_by
        return "longest" if self.kernel in ("v1", "vllm") else "total"

    @property
    def side_device(self) -> bool:
        """A second device per pair runs prefill (and, aligned, carries KV)."""
        return (self.policy == "aligned" and self.prefetch) or self.disagg

    @property
    def gpus(self) -> int:
        """Devices the system occupies: a prefetch (or prefill) device per pair."""
        return self.pairs * (2 if self.side_device else 1)

    @property
    def nodes(self) -> Nodes:
        return Nodes(self.pairs, self.pairs_per_node)
