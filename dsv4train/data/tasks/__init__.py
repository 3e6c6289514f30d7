"""Offline domains with verifiable answers for SFT, GRPO and `dsv4 eval`.

Each domain module generates its samples from a seed, with train and test splits that are disjoint by construction,
turns a sample into an SFT record `{"messages": [...], "domain": ..., "mode": "think"|"chat"}`, scores a generated
completion against the reference, and loads real data of the same kind from local files.

- `dsv4train.data.tasks.math`: multi-step arithmetic and short word problems with an exact numeric answer in
  `\\boxed{...}`; a GSM8K-style jsonl loader.
- `dsv4train.data.tasks.code`: small Python functions described in words with examples, judged by hidden unit
  tests in the sandbox of `dsv4train.posttrain.rewards.sandbox` (namespaces, rlimits, an audit hook, wall timeout,
  capped output); an MBPP / HumanEval-style jsonl loader.
"""
