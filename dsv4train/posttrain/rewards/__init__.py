"""Rewards for post-training: running untrusted code contained (`sandbox.run_python`, which the code domain's judge
uses) and calling any reward function so that a raise, a hang or a bad value gives its sample 0 with a logged
reason instead of ending the run (`reward_fn.safe_reward`).

Nothing is imported here: `dsv4train.data.tasks.code` imports the sandbox module, and this package must not pull
anything above `data/` into that import.
"""
