"""DiT training (sora_model/train.py): 2 ranks on gloo (DDP or FSDP2) give the losses of 1 rank
at the same global batch, a resume gives the identical next-step loss, checkpoints of 1 process
and of FSDP2 resume in each other, checkpoints are written atomically, a per-step JSONL log,
clear argument errors.

Across rank counts losses and gradient norms agree within 1e-5 (relative), and checkpoint
tensors within 1e-4 of the largest magnitude of their kind (weights, EMA, each AdamW state):
2 ranks add two partial sums of the squared errors and of the gradients (all-reduce,
reduce-scatter) where 1 process sums all clips in one backward, so float32 results differ in
the last bits (seen: 1e-7 in the losses and gradient norms, 3e-6 in the weights after 4 AdamW
steps; AdamW turns the rounding of tiny gradients into larger relative changes of the
zero-initialised layers, so each tensor's own magnitude is no scale). A shard in the wrong
place or a missing state is off by the scale itself. Within one rank count, resumes are exact."""
import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from sora_model import train as tr
from sora_model.train_vae import save_checkpoint as save_vae
from sora_model.vae import VideoAutoencoder, vae_config

pytestmark = pytest.mark.usefixtures("native_kernels")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("vae") / "vae.safetensors")
    save_vae(path, VideoAutoencoder(vae_config("tiny")), 0)
    return path


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, ranks):
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "sora_model.train"] if ranks == 1 else
                [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                 f"--master-port={_free_port()}", "-m", "sora_model.train"])
    proc = subprocess.run(launcher + args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


# 4 steps of 4-6 clips; with 2 ranks and this dropout, step 1 has one rank drop a caption and
# the other none, step 2 one rank drop all its captions and the other none (FSDP2 needs the
# zero-weight join of the null caption and of the encoder, Denoiser.join_other_ranks); the
# gradient norms are 0.27-0.32, so every step clips
CFG = tr.TrainConfig(steps=4, budget=128, max_tokens=64, caption_dropout=0.5, clip_grad=0.1)


def _args(vae_file, out, steps, *extra):
    return ["--vae", vae_file, "--out", str(out), "--steps", str(steps), "--budget", str(CFG.budget),
            "--max-tokens", str(CFG.max_tokens), "--caption-dropout", str(CFG.caption_dropout),
            "--clip-grad", str(CFG.clip_grad), "--device", "cpu", "--no-progress", *extra]


def _log(out, key):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)[key] for line in f]


def _assert_close_lists(a, b, what, rtol=1e-5):
    assert len(a) == len(b), f"{what}: {len(a)} steps vs {len(b)}"
    for step, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rtol * abs(x), f"{what}, step {step + 1}: 1 rank {x}, 2 ranks {y}"


@pytest.fixture(scope="module")
def one_rank(vae_file, tmp_path_factory):
    """The 1-process run of CFG, the reference of the 2-rank runs."""
    out = tmp_path_factory.mktemp("one")
    _run(_args(vae_file, out, CFG.steps), 1)
    return out


def test_two_ranks_equal_one(vae_file, one_rank, tmp_path):
    _run(_args(vae_file, tmp_path, CFG.steps), 2)
    for key in ("loss", "grad_norm"):
        _assert_close_lists(_log(one_rank, key), _log(tmp_path, key), f"DDP {key}")


def test_every_rank_has_the_same_gradients():
    """FSDP2 reduce-scatters the gradients that exist, so every rank must have the same ones:
    a rank that keeps (drops) all its captions still gets a gradient for the null caption (the
    encoder) when another rank uses it; one that no rank uses gets none, as in one process."""
    torch.manual_seed(0)
    model = tr.make_denoiser(tr.TrainConfig())
    C = model.dit.cfg.in_channels
    for batch_drop, mine in [([1, 0, 0, 0], [1, 3]), ([1, 1, 0, 0], [0, 1]), ([1, 1, 0, 0], [2, 3]),
                             ([1, 1, 1, 1], [0, 1]), ([0, 0, 0, 0], [0, 1])]:
        batch_drop = torch.tensor(batch_drop, dtype=torch.bool)
        model.zero_grad(set_to_none=True)
        out = model([torch.randn(C, 1, 4, 4) for _ in mine], torch.rand(len(mine)), ["a ball"] * len(mine),
                    batch_drop[mine], batch_drop)
        sum(o.sum() for o in out).backward()
        no_rank_uses = []
        if not batch_drop.any():
            no_rank_uses.append("text.null")
        if batch_drop.all():
            no_rank_uses.append("text.encoder")
        expected = {n for n, _ in model.named_parameters() if not n.startswith(tuple(no_rank_uses))}
        has = {n for n, p in model.named_parameters() if p.grad is not None}
        assert has == expected, f"batch drop {batch_drop.tolist()}, rank's clips {mine}: {sorted(has ^ expected)}"


def test_fsdp_equals_one_rank_and_checkpoints_cross(vae_file, one_rank, tmp_path):
    """2 ranks under FSDP2 train steps 1-2, 1 process resumes their checkpoint for step 3, 2 FSDP2
    ranks resume that one for step 4: the losses and gradient norms are those of 1 process, the
    last checkpoint (written by FSDP2) holds the 1-process run's full model, EMA and AdamW
    tensors under the same keys, and sora-sample's load_run reads it."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from sora_model.sample import load_run
    _run(_args(vae_file, tmp_path, 2, "--fsdp"), 2)
    _run(_args(vae_file, tmp_path, 3, "--resume"), 1)
    _run(_args(vae_file, tmp_path, 4, "--fsdp", "--resume"), 2)
    for key in ("loss", "grad_norm"):
        _assert_close_lists(_log(one_rank, key), _log(tmp_path, key), f"FSDP2 {key}")
    path = "checkpoint.safetensors"
    ref, got = load_file(str(one_rank / path)), load_file(str(tmp_path / path))
    assert ref.keys() == got.keys()
    kind = {k: k.rsplit(".", 1)[1] if k.startswith("optim.") else k.split(".", 1)[0] for k in ref}
    scale = {kd: max(ref[k].abs().max().item() for k in ref if kind[k] == kd) for kd in set(kind.values())}
    for k in ref:
        assert ref[k].shape == got[k].shape and ref[k].dtype == got[k].dtype, k
        err = (ref[k].double() - got[k].double()).abs().max().item()
        assert err <= 1e-4 * scale[kind[k]], \
            f"{k}: FSDP2's differs from 1 process's by {err:.3g} (largest {kind[k]}: {scale[kind[k]]:.3g})"
    with safe_open(str(one_rank / path), "pt") as a, safe_open(str(tmp_path / path), "pt") as b:
        assert a.metadata()["param_groups"] == b.metadata()["param_groups"] and b.metadata()["step"] == "4"
    ema = load_run(str(tmp_path)).dit.state_dict()
    assert all(torch.equal(ema[k], got[f"ema.{k}"]) for k in ema)


def test_resume_gives_the_same_next_step(vae_file, tmp_path):
    """Two steps after a resume: the first depends on the weights alone, the second also on the
    AdamW state and the EMA the checkpoint carried."""
    from sora_model.train_vae import load_checkpoint
    cfg = tr.TrainConfig(steps=4, save_every=1, budget=128, max_tokens=64)
    straight = tr.train(cfg, load_checkpoint(vae_file), str(tmp_path / "a"), progress=False)
    first = tr.train(cfg, load_checkpoint(vae_file), str(tmp_path / "b"), progress=False, steps=2)
    resumed = tr.train(cfg, load_checkpoint(vae_file), str(tmp_path / "b"), progress=False, resume=True)
    assert first == straight[:2] and len(resumed) == 2
    assert resumed == straight[2:]
    assert not os.path.exists(str(tmp_path / "b" / "checkpoint.safetensors.tmp"))
    log = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert [e["step"] for e in log] == [1, 2, 3, 4] and all(e["tokens"] <= 128 and e["tokens_per_s"] > 0 for e in log)


def test_checkpoint_write_is_atomic(vae_file, tmp_path, monkeypatch):
    """A save killed half-way leaves the previous checkpoint whole."""
    from safetensors.torch import load_file
    from sora_model.train_vae import load_checkpoint
    cfg = tr.TrainConfig(steps=1, save_every=1, budget=128, max_tokens=64)
    tr.train(cfg, load_checkpoint(vae_file), str(tmp_path), progress=False)
    path = str(tmp_path / "checkpoint.safetensors")
    before = load_file(path)
    import safetensors.torch

    def dies(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, "save_file", dies)
    model = tr.make_denoiser(cfg)
    with pytest.raises(KeyboardInterrupt):
        tr.save_checkpoint(path, model, model.dit, torch.optim.AdamW(model.parameters()), 9, cfg)
    after = load_file(path)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_argument_errors(vae_file, tmp_path):
    with pytest.raises(SystemExit):
        tr.parse_args(["--vae", vae_file, "--out", str(tmp_path), "--max-tokens", "512", "--budget", "256"])
    with pytest.raises(SystemExit):
        tr.parse_args(["--vae", vae_file, "--out", str(tmp_path), "--latent-pool", "-1"])
    assert tr.parse_args(["--vae", vae_file, "--out", str(tmp_path), "--latent-pool", "8"]).latent_pool == 8
    from sora_model.train_vae import load_checkpoint
    with pytest.raises(ValueError, match="resume: no checkpoint at"):
        tr.train(tr.TrainConfig(steps=1), load_checkpoint(vae_file), str(tmp_path / "new"), progress=False, resume=True)
    # a resume keeps the model: another DiT size is named, not left to a shape mismatch
    tr.train(tr.TrainConfig(steps=1, budget=128, max_tokens=64), load_checkpoint(vae_file), str(tmp_path / "run"),
             progress=False)
    with pytest.raises(ValueError, match=r"resume: .* holds another model: dit 'tiny' there, 'mini' here"):
        tr.train(tr.TrainConfig(dit="mini", steps=2, budget=128, max_tokens=64), load_checkpoint(vae_file),
                 str(tmp_path / "run"), progress=False, resume=True)


def test_latent_pool_encodes_each_batch_once(vae_file, tmp_path, monkeypatch):
    """latent_pool=2 over 5 steps: steps 0 and 1 draw and encode their clips (the losses of a
    run without the pool), steps 2-4 reuse them (2 draws, not 5) with new noise."""
    from sora_model.train_vae import load_checkpoint as load_vae
    draws = []
    step_batch = tr.step_batch
    monkeypatch.setattr(tr, "step_batch", lambda cfg, step, patch: draws.append(step) or step_batch(cfg, step, patch))
    cfg = tr.TrainConfig(steps=5, budget=128, max_tokens=64, save_every=100)
    plain = tr.train(cfg, load_vae(vae_file), str(tmp_path / "plain"), progress=False)
    draws.clear()
    pooled = tr.train(tr.TrainConfig(**{**cfg.__dict__, "latent_pool": 2}), load_vae(vae_file), str(tmp_path / "pool"),
                      progress=False)
    assert draws == [0, 1]
    assert pooled[:2] == plain[:2] and pooled[2:] != plain[2:]
    logged = [json.loads(line) for line in open(tmp_path / "pool" / "log.jsonl")]
    assert [r["clips"] for r in logged[2:]] == [r["clips"] for r in logged[:2]] + [logged[0]["clips"]]



def test_resume_takes_this_runs_lr(vae_file, tmp_path):
    """--lr and the weight decay may change on resume: AdamW's state comes from the checkpoint,
    its hyperparameters from this run (the checkpoint written after the resume holds them)."""
    from safetensors import safe_open
    from sora_model.train_vae import load_checkpoint
    cfg = tr.TrainConfig(steps=2, save_every=1, budget=128, max_tokens=64)
    tr.train(cfg, load_checkpoint(vae_file), str(tmp_path), progress=False, steps=1)
    changed = dataclasses.replace(cfg, lr=1e-5, weight_decay=0.5)
    tr.train(changed, load_checkpoint(vae_file), str(tmp_path), progress=False, resume=True)
    with safe_open(str(tmp_path / "checkpoint.safetensors"), framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-5, 0.5)] * len(groups)


@pytest.mark.parametrize("temporal", [4, 8])
def test_physics_durations_follow_the_vae(temporal):
    """The physics world's clips last 1 + k * the VAE's temporal compression frames (a clip of 5
    frames has no whole latent frame past the first under an 8x VAE)."""
    cfg = tr.TrainConfig(budget=256, temporal_compression=temporal)
    frames = {clip.shape[1] for step in range(3) for clip, _ in tr.step_batch(cfg, step, (1, 2, 2))}
    assert frames and all((T - 1) % temporal == 0 for T in frames), frames
    if temporal == 4:
        assert frames <= {1, 5, 9, 13}


def test_checkpoints_keep_the_run_s_adamw_implementation(tmp_path):
    """AdamW's implementation flags (fused here, the per-tensor loop under FSDP2) stay out of
    checkpoints, and a resume keeps the resuming run's own: a checkpoint of one mode resumes in
    any other with that mode's implementation, and a checkpoint from before the flags were
    dropped (fused None) resumes fused."""
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    path = str(tmp_path / "checkpoint.safetensors")
    tr.save_checkpoint(path, model, ema, opt, 1, tr.TrainConfig())
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
    assert not set(tr.IMPLEMENTATION_FLAGS) & set(groups[0]), groups
    for flags in (dict(fused=True), dict(foreach=True), dict()):
        resumed = torch.optim.AdamW(model.parameters(), lr=1e-3, **flags)
        assert tr.load_checkpoint(path, model, ema, resumed) == 1
        assert all(resumed.param_groups[0][k] == torch.optim.AdamW(model.parameters(), **flags).param_groups[0][k]
                   for k in tr.IMPLEMENTATION_FLAGS), flags
        torch.testing.assert_close(resumed.state_dict()["state"], opt.state_dict()["state"])
    old = [{**groups[0], "fused": None, "foreach": None}]   # written before the flags were dropped
    resumed = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    resumed.load_state_dict({"state": opt.state_dict()["state"],
                             "param_groups": tr.saved_param_groups(resumed, json.dumps(old))})
    assert resumed.param_groups[0]["fused"] is True
    resumed.step()
