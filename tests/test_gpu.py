"""CUDA for real: a training step, prefetching onto the device, DDP with NCCL (world size 1).

Marked ``gpu`` and skipped without a CUDA device (``pytest -m gpu`` runs only these).
Each compares the CUDA run with the same run on the CPU, or with itself without the part
under test, on the tiny database (``test_ddp.tiny_pretraining_inputs``: deterministic
neighbour sampling, no corruption; dropout off, since CUDA draws its masks from its own
generator). Tolerance 1e-3 relative: CUDA's scatter sums add in another (and not fixed)
order than the CPU's, and Adam carries the differences into later steps.
"""

import pytest
import torch
from test_ddp import _no_dropout, _pretrain_args, tiny_pretraining_inputs

from tve_pipeline import distributed, model, training

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
RELATIVE_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_pretraining_inputs(tmp_path_factory.mktemp("db"))


def _pretrain(inputs, device, **kwargs) -> tuple[dict, list[float]]:
    losses = []
    args = list(_pretrain_args(inputs))
    args[-1] = torch.device(device)
    # each epoch scored on the validation window too: the clean-input pass runs on the device
    result = training.pretrain(
        *args, val_targets=inputs["val_raw"], step_losses=losses.extend, **kwargs
    )
    return result, losses


@pytest.fixture(autouse=True)
def no_dropout(monkeypatch):
    monkeypatch.setattr(model.FastDropout, "forward", _no_dropout)


def test_a_training_step_on_cuda_matches_the_cpu(inputs):
    on_cpu, cpu_losses = _pretrain(inputs, "cpu")
    on_cuda, cuda_losses = _pretrain(inputs, "cuda")
    assert cuda_losses == pytest.approx(cpu_losses, rel=RELATIVE_TOLERANCE)
    # state leaves training on the CPU, whatever the device
    assert all(v.device.type == "cpu" for v in on_cuda["backbone"].values())
    for key, value in on_cpu["backbone"].items():
        assert torch.allclose(on_cuda["backbone"][key], value, rtol=1e-2, atol=1e-4), key


def test_prefetching_onto_cuda_trains_the_same(inputs, monkeypatch):
    """The next batch is sampled on a worker thread while CUDA runs this one; moving it to
    the device (``graph.to_device``) happens in the step. Same losses with and without."""
    moved = []
    original = training.to_device

    def to_device(batch, device):
        out = original(batch, device)
        moved.append(all(out[nt].tf.device.type == "cuda" for nt in out.node_types))
        return out

    monkeypatch.setattr(training, "to_device", to_device)
    _, ahead = _pretrain(inputs, "cuda", prefetch=True)
    _, in_line = _pretrain(inputs, "cuda", prefetch=False)
    assert moved and all(moved)
    assert ahead == pytest.approx(in_line, rel=1e-5)


def test_ddp_with_nccl_on_one_device(inputs, tmp_path):
    """DistributedDataParallel over NCCL, world size 1: the gradient all-reduce runs on the
    device and the run is the plain CUDA run."""
    plain, plain_losses = _pretrain(inputs, "cuda")
    world, device = distributed.start(
        "cuda", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, size=1
    )
    try:
        assert torch.distributed.get_backend() == "nccl"
        ddp, ddp_losses = _pretrain(inputs, device, world=world)
    finally:
        distributed.stop()
    assert ddp_losses == pytest.approx(plain_losses, rel=RELATIVE_TOLERANCE)
    assert ddp["best_epoch"] == plain["best_epoch"]
