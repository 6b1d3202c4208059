"""benchmark/evaluation_noise.py: a DER network evaluated with its noise off, as the script evaluates it, and on."""

import os
from dataclasses import asdict, replace

import torch

from benchmark import evaluation_noise
from benchmark.scripts import load_script
from toy_envs.catch import ROWS

der = load_script("der_atari100k_gap")
EPISODES, SEED = 4, 7


def saved_network(run_dir: str):
    """A fresh DER network on Catch, saved as --save-model saves it."""
    args = der.Args(env_backend="gymnasium", env_id="toy_envs.catch:Catch-v0", frame_size=16, cuda=False)
    torch.manual_seed(0)
    net = der.QNetwork(3, args)
    torch.save({"model": net.state_dict(), "args": asdict(args)}, os.path.join(run_dir, "model.pt"))
    return args, net


def test_noise_off_is_the_scripts_own_evaluation_and_every_step_is_counted(tmp_path):
    args, net = saved_network(str(tmp_path))
    results = evaluation_noise.main(evaluation_noise.Args(run_dir=str(tmp_path), episodes=EPISODES, seed=SEED))
    torch.manual_seed(SEED)
    expected = der.evaluate(net, replace(args, eval_episodes=EPISODES), torch.device("cpu"), seed=SEED)
    assert results["noise off (the protocol)"]["returns"] == expected
    for mode in results.values():
        assert len(mode["returns"]) == EPISODES
        assert sum(mode["greedy_actions"].values()) == EPISODES * (ROWS - 1)  # a Catch game is ROWS - 1 steps


def test_the_noisy_mode_draws_fresh_noise_for_each_row(tmp_path):
    _, net = saved_network(str(tmp_path))
    obs = torch.randint(0, 256, (2, 4, 16, 16), dtype=torch.uint8)
    obs[1] = obs[0]  # the same observation twice: only the noise can tell the rows apart
    with torch.no_grad():
        mean_q = net.q_values(obs, None)
        noisy_q = evaluation_noise.GreedyActionCounter(net, with_noise=True).q_values(obs)
        plain_q = evaluation_noise.GreedyActionCounter(net, with_noise=False).q_values(obs)
    assert torch.equal(plain_q, mean_q)
    assert not torch.allclose(noisy_q[0], mean_q[0]) and not torch.allclose(noisy_q[0], noisy_q[1])
