"""The compute device, injected: ``cpu``, ``cuda`` or ``auto`` (CUDA when present)."""

from typing import Literal

import dagster as dg


class DeviceResource(dg.ConfigurableResource):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch intra-op threads for the step's process; 0 leaves torch's default. On a shared
    # machine 1 can be several times faster than 2 (bench/bench_training.py).
    threads: int = 0

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
