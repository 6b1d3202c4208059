"""benchmark/gradcam.py: Grad-CAM of saved agents against recomputations by hand, and the PNG grid."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from benchmark import gradcam
from benchmark.scripts import load_script

PNG_HEADER = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny flagship runs on Catch saved with --save-model: GAP and flatten."""
    module = load_script("rainbow_impala_gap")
    folders = {}
    for pooling in ["gap", "flatten"]:
        summary = module.main(
            module.Args(
                env_backend="gymnasium",
                env_id="toy_envs.catch:Catch-v0",
                frame_size=24,
                total_timesteps=200,
                batch_size=8,
                learning_starts=150,
                buffer_size=500,
                cuda=False,
                save_model=True,
                pooling=pooling,
                seed=1,
                output_dir=str(tmp_path_factory.mktemp(pooling)),
                progress_seconds=1e9,
            )
        )
        folders[pooling] = summary["run_dir"]
    return folders


def loaded(run_dir):
    module, script_args, state_dict, _ = gradcam.load_run(run_dir)
    env = module.make_env(script_args, num_envs=1, seed=0)
    net = module.QNetwork(env.num_actions, script_args)
    net.load_state_dict(state_dict)
    net.eval()
    stacks = gradcam.play(module, env, script_args, net, gradcam.Args(run_dirs=[run_dir], frames=4, warmup_steps=3, every=2))
    env.close()
    return net, stacks


def recomputed(net, obs, conv):
    """Grad-CAM of one stack the long way: the conv's output replaced by a leaf tensor, its gradient by autograd."""
    with torch.no_grad():
        captured = []
        hook = conv.register_forward_hook(lambda m, i, o: captured.append(o.clone()))
        q = net.q_values(obs[None])
        hook.remove()
    action = int(q.argmax())
    leaf = captured[0].requires_grad_(True)
    hook = conv.register_forward_hook(lambda m, i, o: leaf)  # the rest of the network runs from the leaf
    q_leaf = net.q_values(obs[None])
    hook.remove()
    assert torch.allclose(q_leaf, q, atol=1e-6)
    (gradient,) = torch.autograd.grad(q_leaf[0, action], leaf)
    activations, gradient = leaf[0].detach(), gradient[0]
    cam = torch.zeros(activations.shape[1:])
    for k in range(activations.shape[0]):  # alpha_k: the spatial mean of the gradient of channel k
        cam += gradient[k].sum() / gradient[k].numel() * activations[k]
    cam = F.interpolate(cam.clamp(min=0)[None, None], size=obs.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    return (cam / cam.max() if cam.max() > 0 else cam), action


@pytest.mark.parametrize("pooling", ["gap", "flatten"])
def test_grad_cam_equals_the_recomputation(runs, pooling):
    net, stacks = loaded(runs[pooling])
    assert stacks.shape == (4, 4, 24, 24) and stacks.dtype == torch.uint8
    maps, actions = gradcam.grad_cam(net, stacks)
    conv = gradcam.explained_layer(net, "last-conv")
    assert conv is net.phi.stacks[-1].blocks[-1].conv1  # the Impala encoder's last conv
    assert maps.shape == (4, 24, 24)
    assert (maps >= 0).all() and (maps <= 1 + 1e-6).all()
    for i in range(len(stacks)):
        expected, action = recomputed(net, stacks[i], conv)
        assert int(actions[i]) == action
        assert torch.allclose(maps[i], expected, atol=1e-5)
        assert float(maps[i].max()) in (0.0, pytest.approx(1.0))


def test_gap_grad_cam_of_phi_weights_channels_by_the_pooled_gradient():
    """With GAP, dQ/dF^k_ij = dQ/dg^k / (H W) at every position: alpha_k is the pooled features' gradient / (H W)."""
    module = load_script("rainbow_impala_gap")
    torch.manual_seed(1)  # a draw whose maps are not all clamped to zero (checked below), so the comparison bites
    net = module.QNetwork(3, module.Args(frame_size=24, pooling="gap", scale=1)).eval()
    obs = torch.randint(0, 256, (2, 4, 24, 24), dtype=torch.uint8)
    maps, actions = gradcam.grad_cam(net, obs, layer="phi")
    features = net.phi(obs.float() / 255.0).detach()
    pooled = features.mean(dim=(2, 3)).requires_grad_(True)
    hidden = net.psi(pooled)
    advantages = net.head(hidden).view(2, 3, -1)  # dueling C51 heads (Wang et al. 2016), the default agent's
    logits = net.value_head(hidden).unsqueeze(1) + advantages - advantages.mean(dim=1, keepdim=True)
    q = (logits.softmax(-1) * net.support).sum(-1)
    assert torch.equal(actions, q.argmax(1))
    (gradient,) = torch.autograd.grad(q.gather(1, actions[:, None]).sum(), pooled)
    h, w = features.shape[-2:]
    cam = (gradient[:, :, None, None] / (h * w) * features).sum(1, keepdim=True).clamp(min=0)
    cam = F.interpolate(cam, size=(24, 24), mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.amax(dim=(1, 2), keepdim=True)
    assert torch.allclose(maps, cam, atol=1e-5)
    assert torch.equal(maps.amax(dim=(1, 2)), torch.ones(2))


def test_png_grid_of_two_runs(runs, tmp_path):
    out = tmp_path / "figures" / "gradcam.png"
    path = gradcam.main(gradcam.Args(run_dirs=[runs["flatten"], runs["gap"]], frames=3, warmup_steps=2, every=3, out=str(out)))
    assert path == str(out)
    data = out.read_bytes()
    assert data.startswith(PNG_HEADER) and len(data) > 1000


def test_runs_on_other_frames_or_without_a_model_are_refused(runs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(runs["gap"], other)
    saved = torch.load(other / "model.pt", weights_only=True)
    saved["args"]["frame_size"] = 16
    torch.save(saved, other / "model.pt")
    with pytest.raises(SystemExit):
        gradcam.main(gradcam.Args(run_dirs=[runs["gap"], str(other)], frames=1, out=str(tmp_path / "x.png")))
    (other / "model.pt").unlink()
    with pytest.raises(SystemExit):
        gradcam.main(gradcam.Args(run_dirs=[str(other)], frames=1, out=str(tmp_path / "x.png")))
    assert not (tmp_path / "x.png").exists()


def test_procgen_colour_stacks(tmp_path):
    """A Procgen agent's stacks are (stack, 3, 64, 64): its maps equal the recomputation and the grid draws RGB."""
    module = load_script("rainbow_procgen_gap")
    summary = module.main(
        module.Args(
            env_id="bigfish",
            num_envs=1,
            total_timesteps=120,
            batch_size=8,
            learning_starts=100,
            buffer_size=500,
            cuda=False,
            save_model=True,
            eval_episodes=0,
            seed=1,
            output_dir=str(tmp_path / "run"),
            progress_seconds=1e9,
        )
    )
    net, stacks = loaded(summary["run_dir"])
    assert stacks.shape == (4, 4, 3, 64, 64) and stacks[:, -1].float().std() > 0  # real frames, not padding
    maps, actions = gradcam.grad_cam(net, stacks)
    assert maps.shape == (4, 64, 64)
    conv = gradcam.explained_layer(net, "last-conv")
    for i in range(len(stacks)):
        expected, action = recomputed(net, stacks[i], conv)
        assert int(actions[i]) == action and torch.allclose(maps[i], expected, atol=1e-5)
    out = tmp_path / "procgen.png"
    gradcam.main(gradcam.Args(run_dirs=[summary["run_dir"]], frames=2, warmup_steps=1, every=2, out=str(out)))
    assert out.read_bytes().startswith(PNG_HEADER)
