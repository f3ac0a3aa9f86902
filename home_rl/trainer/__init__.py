"""The driver loops: one controller process that calls the actor groups (learners, rollout, reward)."""
