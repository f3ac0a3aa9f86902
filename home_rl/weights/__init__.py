"""The weight plane: changed tensors go from the process that holds them straight to the rollout engines, through
vLLM's weight-transfer API (`nccl` on GPUs, the `gloo` backend registered here on CPUs)."""
from home_rl.weights.sender import ActorSender, Sender, StagedWeights, WeightSender

__all__ = ["ActorSender", "Sender", "StagedWeights", "WeightSender"]
