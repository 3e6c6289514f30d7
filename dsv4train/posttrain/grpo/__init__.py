"""GRPO for the domain experts: the algorithm as small pure functions (advantages, policy loss, KL, masks)."""
