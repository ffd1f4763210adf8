"""The compute device, injected: ``cpu``, ``cuda`` or ``auto`` (CUDA when present), and how
many processes pre-training runs on (``torchrun``: one per GPU, or several on the CPU)."""

from typing import Literal

import dagster as dg


class DeviceResource(dg.ConfigurableResource):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch intra-op threads for the step's process; 0 leaves torch's default. On a shared
    # machine 1 can be several times faster than 2 (bench/bench_training.py).
    threads: int = 0
    # Pre-training processes. 1: in the step's own process, as always. N > 1:
    # pretrained_checkpoint launches `torchrun --nproc-per-node N` through Dagster Pipes and
    # trains one model with DistributedDataParallel, each rank on its slice of every batch
    # (NCCL, one GPU per rank, on CUDA; gloo on the CPU). Fine-tuning stays in-process.
    processes: int = 1

    def torch_device(self):
        # Resolved here, never written back: resource fields are frozen.
        import torch

        if self.threads > 0:
            torch.set_num_threads(self.threads)
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise dg.Failure(
                description="device resource asks for 'cuda' but no CUDA device is available"
            )
        return torch.device(self.device)

    def launch_device(self) -> str:
        """``"cuda"`` or ``"cpu"`` for a multi-process launch, checked against the machine:
        every rank needs a GPU of its own."""
        import torch

        if self.processes < 1:
            raise dg.Failure(
                description=f"device resource: processes must be >= 1, got {self.processes}"
            )
        kind = self.torch_device().type
        if kind == "cuda" and torch.cuda.device_count() < self.processes:
            raise dg.Failure(
                description=f"device resource asks for {self.processes} processes on CUDA but "
                f"this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return kind
