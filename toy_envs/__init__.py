"""Small pixel environments that learn in seconds on a CPU.

Run them with any script as `--env-backend gymnasium --env-id toy_envs.catch:Catch-v0`.
"""
