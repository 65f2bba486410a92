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
import re
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


def test_progress_bar_shows_tokens_per_second(vae_file, tmp_path, capfd):
    """Without --no-progress a bar counts the steps and shows the loss and the tokens/s."""
    from sora_model.train_vae import load_checkpoint
    tr.train(tr.TrainConfig(steps=2, budget=128, max_tokens=64), load_checkpoint(vae_file), str(tmp_path / "run"))
    err = capfd.readouterr().err
    assert "train: 100%" in err and "2/2" in err and re.search(r"loss=\d+\.\d{4}", err), err
    assert re.search(r"tok_s=\d+", err), err


def test_argument_errors(vae_file, tmp_path, capsys):
    # a clip over the token budget would fit no batch: named by both flags, and by both fields
    with pytest.raises(SystemExit):
        tr.parse_args(["--vae", vae_file, "--out", str(tmp_path), "--max-tokens", "512", "--budget", "256"])
    assert "--max-tokens: a clip of 512 tokens would not fit a batch of --budget 256" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cfg.max_tokens: a clip of 512 tokens would not fit a batch of cfg.budget "
                                         "256"):
        tr.check_config(tr.TrainConfig(max_tokens=512, budget=256))
    with pytest.raises(SystemExit):
        tr.parse_args(["--vae", vae_file, "--out", str(tmp_path), "--latent-pool", "-1"])
    assert "--latent-pool" in capsys.readouterr().err
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


def test_physics_clips_follow_max_tokens(vae_file, tmp_path):
    """max_tokens bounds the physics world's clips too (it used to apply to manifests only: the
    mini DiT's 13-frame 48 x 48 clips are 144 tokens, and --budget 64 --max-tokens 64 died at
    step 0 on a clip over the budget): each clip of a step is a rendered clip downscaled by
    fit_to_tokens, aspect ratio kept, whole."""
    import itertools
    from sora_model.data import fit_to_tokens, latent_tokens
    from sora_model.dit import dit_config
    from sora_model.physics_world import WorldConfig, physics_clips
    from sora_model.train_vae import load_checkpoint
    patch = dit_config("mini").patch_size
    cfg = tr.TrainConfig(dit="mini", budget=256, max_tokens=64)
    world = WorldConfig(frames=(1, 5, 9, 13))                                    # the 4x VAE's durations
    downscaled = 0
    for step in range(3):
        batch = tr.step_batch(cfg, step, patch)
        rendered = list(itertools.islice(physics_clips(world, seed=step), 64))   # cfg.seed 0: the seed is the step
        for video, caption in batch:
            assert latent_tokens(video.shape, patch) <= 64, video.shape
            source = [v for v, c in rendered if c == caption and v.shape[1] == video.shape[1]
                      and torch.equal(fit_to_tokens(v, 64, patch), video)]
            assert source, caption
            H, W = source[0].shape[2:]
            h, w = video.shape[2:]
            assert abs(max(h, w) - min(h, w) * max(H, W) / min(H, W)) <= 8 / 2          # half a unit of 8 pixels
            downscaled += (h, w) != (H, W)
    assert downscaled
    losses = tr.train(tr.TrainConfig(dit="mini", budget=64, max_tokens=64, steps=1), load_checkpoint(vae_file),
                      str(tmp_path), progress=False)
    assert len(losses) == 1 and _log(tmp_path, "tokens")[0] <= 64
    # a bound no clip of the world fits is named before any step
    with pytest.raises(ValueError, match=r"data 'physics': max_tokens: 3 is fewer than the 4 tokens of the smallest "
                                         r"size of a \(3, 5, 32, 64\) clip"):
        tr.train(tr.TrainConfig(budget=64, max_tokens=3, steps=1), load_checkpoint(vae_file), str(tmp_path / "x"),
                 progress=False)
    assert not os.path.exists(tmp_path / "x" / "log.jsonl")


@pytest.mark.parametrize("flag, value, message", [
    ("--clip-grad", "-1", r"--clip-grad: expected a max gradient norm > 0 \(inf: no clipping\), got -1.0"),
    ("--clip-grad", "0", r"--clip-grad: expected a max gradient norm > 0"),
    ("--clip-grad", "nan", r"--clip-grad: expected a max gradient norm > 0 .*got nan"),
    ("--ema", "1.5", r"--ema: expected a decay in \[0, 1\), got 1.5"),
    ("--ema", "-0.1", r"--ema: expected a decay in \[0, 1\)"),
    ("--save-every", "0", r"--save-every: expected a positive int \(steps\), got 0"),
    ("--steps", "0", r"--steps: expected a positive int, got 0"),
    ("--lr", "0", r"--lr: expected a finite number > 0, got 0.0"),
    ("--weight-decay", "-0.01", r"--weight-decay: expected a finite number >= 0, got -0.01"),
    ("--caption-dropout", "1.5", r"--caption-dropout: expected a probability in \[0, 1\), got 1.5"),
    ("--caption-dropout", "1", r"--caption-dropout: expected a probability in \[0, 1\), got 1.0"),
    ("--budget", "0", r"--budget: expected a positive int \(latent tokens per global batch\), got 0"),
    ("--latent-pool", "-1", r"--latent-pool: expected 0 or a positive int \(steps\), got -1"),
    ("--shift-base-tokens", "0", r"--shift-base-tokens: expected a positive int \(latent tokens\), got 0"),
])
def test_argument_ranges(vae_file, tmp_path, capsys, flag, value, message):
    """Values that would train wrongly or die later are argparse errors naming the flag: a
    negative --clip-grad flipped the gradients, --ema over 1 extrapolated, --save-every 0
    divided by zero after the first step. The same checks hold for a TrainConfig given to
    train()."""
    with pytest.raises(SystemExit):
        tr.parse_args(["--vae", vae_file, "--out", str(tmp_path), flag, value])
    assert re.search(message, capsys.readouterr().err), message
    name = flag[2:].replace("-", "_")
    cfg = dataclasses.replace(tr.TrainConfig(), **{name: type(getattr(tr.TrainConfig(), name))(float(value))})
    with pytest.raises(ValueError, match=rf"cfg.{name}: " + message.split(": ", 1)[1]):
        tr.check_config(cfg)


def test_weight_decay_and_grad_checkpointing_flags(vae_file, tmp_path, monkeypatch):
    """--weight-decay reaches AdamW and the run's config; --grad-checkpointing makes the DiT
    recompute its blocks in the backward, with the losses of a run without it, and may change
    on resume (it is no model field)."""
    from safetensors import safe_open
    import sora_model.dit as dit
    from sora_model.train_vae import load_checkpoint
    calls = []
    checkpoint = dit.checkpoint
    monkeypatch.setattr(dit, "checkpoint", lambda *a, **kw: calls.append(1) or checkpoint(*a, **kw))
    args = ["--vae", vae_file, "--budget", "128", "--max-tokens", "64", "--device", "cpu", "--no-progress",
            "--weight-decay", "0.05"]
    tr.main(args + ["--out", str(tmp_path / "a"), "--steps", "1", "--grad-checkpointing"])
    assert calls                                                       # the blocks were recomputed
    path = str(tmp_path / "a" / "checkpoint.safetensors")
    with safe_open(path, framework="pt") as f:
        config, groups = json.loads(f.metadata()["config"]), json.loads(f.metadata()["param_groups"])
    assert config["grad_checkpointing"] is True and config["weight_decay"] == 0.05
    assert {g["weight_decay"] for g in groups} == {0.05}
    plain = tr.train(tr.TrainConfig(steps=1, budget=128, max_tokens=64, weight_decay=0.05),
                     load_checkpoint(vae_file), str(tmp_path / "b"), progress=False)
    assert _log(tmp_path / "a", "loss") == plain
    assert _log(tmp_path / "a", "grad_norm") == _log(tmp_path / "b", "grad_norm")      # the recomputed backward
    calls.clear()
    tr.main(args + ["--out", str(tmp_path / "a"), "--steps", "2", "--resume"])
    assert not calls and _log(tmp_path / "a", "step") == [1, 2]
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["config"])["grad_checkpointing"] is False


def test_resume_logs_each_step_once(vae_file, tmp_path, monkeypatch):
    """A run killed after logging steps past its last checkpoint (and in the middle of a log
    line): the resume drops those lines and logs the redone steps once, with the losses of a
    run that was not killed."""
    from sora_model.train_vae import load_checkpoint
    cfg = tr.TrainConfig(steps=4, save_every=2, budget=128, max_tokens=64)
    save = tr.save_checkpoint

    def killed_at_4(path, model, ema, opt, step, cfg):
        if step == 4:
            raise KeyboardInterrupt
        save(path, model, ema, opt, step, cfg)
    monkeypatch.setattr(tr, "save_checkpoint", killed_at_4)
    with pytest.raises(KeyboardInterrupt):
        tr.train(cfg, load_checkpoint(vae_file), str(tmp_path), progress=False)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')                                       # cut short by the kill
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl").readlines()[:-1]] == [1, 2, 3, 4]
    monkeypatch.setattr(tr, "save_checkpoint", save)
    resumed = tr.train(cfg, load_checkpoint(vae_file), str(tmp_path), progress=False, resume=True)
    assert _log(tmp_path, "step") == [1, 2, 3, 4]
    assert _log(tmp_path, "loss")[2:] == resumed
    assert not os.path.exists(tmp_path / "log.jsonl.tmp")


def test_shift_base_tokens_reaches_the_training_timesteps(vae_file, tmp_path, monkeypatch):
    """--shift-base-tokens N: the run draws its timesteps shifted by sqrt(tokens / N) and keeps N
    in its config; a resume must keep it; a checkpoint from before the field existed reads as
    the default (256), resumes at it and refuses another."""
    from sora_model.diffusion import FlowConfig
    from sora_model.sample import run_config
    seen = []
    sample_timesteps = tr.sample_timesteps
    monkeypatch.setattr(tr, "sample_timesteps", lambda tokens, flow, g: seen.append(flow.base_tokens) or
                        sample_timesteps(tokens, flow, g))
    args = ["--vae", vae_file, "--budget", "128", "--max-tokens", "64", "--device", "cpu", "--no-progress",
            "--steps", "1"]
    tr.main(args + ["--out", str(tmp_path / "a"), "--shift-base-tokens", "32"])
    assert seen and set(seen) == {32}
    assert run_config(str(tmp_path / "a")).shift_base_tokens == 32
    seen.clear()
    tr.main(args + ["--out", str(tmp_path / "b")])
    assert seen and set(seen) == {256} and FlowConfig().base_tokens == 256
    # a resume keeps the run's base: one that left out the flag would go on at 256
    with pytest.raises(ValueError, match=r"resume: .* was trained with another objective: shift_base_tokens 32 "
                                         r"there, 256 here"):
        tr.main(args[:-1] + ["2", "--out", str(tmp_path / "a"), "--resume"])
    seen.clear()
    tr.main(args[:-1] + ["2", "--out", str(tmp_path / "a"), "--resume", "--shift-base-tokens", "32"])
    assert set(seen) == {32} and _log(tmp_path / "a", "step") == [1, 2]
    # a checkpoint from before the field existed: its run trained at 256
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = str(tmp_path / "b" / "checkpoint.safetensors")
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    del config["shift_base_tokens"]
    save_file(tensors, path, {**meta, "config": json.dumps(config)})
    assert run_config(str(tmp_path / "b")).shift_base_tokens == 256
    with pytest.raises(ValueError, match=r"shift_base_tokens 256 there, 32 here"):
        tr.main(args[:-1] + ["2", "--out", str(tmp_path / "b"), "--resume", "--shift-base-tokens", "32"])
    tr.main(args[:-1] + ["2", "--out", str(tmp_path / "b"), "--resume"])
    assert _log(tmp_path / "b", "step") == [1, 2]
