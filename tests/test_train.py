"""DiT training (sora_model/train.py): 2 ranks on gloo give the losses of 1 rank at the same
global batch, a resume gives the identical next-step loss, checkpoints are written atomically,
a per-step JSONL log, clear argument errors."""
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


def _losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


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


def test_two_ranks_equal_one(vae_file, tmp_path):
    args = ["--vae", vae_file, "--steps", "3", "--budget", "192", "--max-tokens", "64", "--device", "cpu",
            "--no-progress", "--caption-dropout", "0.3"]
    _run(args + ["--out", str(tmp_path / "one")], 1)
    _run(args + ["--out", str(tmp_path / "two")], 2)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    for step, (a, b) in enumerate(zip(one, two)):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: 1 rank {a}, 2 ranks {b}"


def test_resume_gives_the_same_next_step(vae_file, tmp_path):
    from sora_model.train_vae import load_checkpoint
    cfg = tr.TrainConfig(steps=3, save_every=1, budget=128, max_tokens=64)
    straight = tr.train(cfg, load_checkpoint(vae_file), str(tmp_path / "a"), progress=False)
    first = tr.train(cfg, load_checkpoint(vae_file), str(tmp_path / "b"), progress=False, steps=2)
    resumed = tr.train(cfg, load_checkpoint(vae_file), str(tmp_path / "b"), progress=False, resume=True)
    assert first == straight[:2] and len(resumed) == 1
    assert resumed[0] == straight[2]
    assert not os.path.exists(str(tmp_path / "b" / "checkpoint.safetensors.tmp"))
    log = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert [e["step"] for e in log] == [1, 2, 3] and all(e["tokens"] <= 128 and e["tokens_per_s"] > 0 for e in log)


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
    from sora_model.train_vae import load_checkpoint
    with pytest.raises(ValueError, match="resume: no checkpoint at"):
        tr.train(tr.TrainConfig(steps=1), load_checkpoint(vae_file), str(tmp_path / "new"), progress=False, resume=True)
