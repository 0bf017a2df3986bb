"""The GPU table (capacity/hardware.yaml): published figures of each GPU type, loaded into a pydantic schema."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

HARDWARE_TABLE = Path(__file__).resolve().parent / "hardware.yaml"  # package data

# usable bandwidth of a x16 host link per direction, GB/s, by PCIe generation (128b/130b encoding)
PCIE_X16_GBS = {3: 15.75, 4: 31.5, 5: 63.0}


class GpuSpec(BaseModel):
    """One row of the table: a GPU type's vendor figures and a typical price."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    dense_tflops: float = Field(..., gt=0, description="peak dense FP16/BF16 tensor TFLOPS")
    memory_bw_gbs: float = Field(..., gt=0, description="peak memory bandwidth, GB/s")
    memory_gib: float = Field(..., gt=0)
    price_per_hour: float = Field(..., ge=0, description="USD per GPU-hour, on demand")
    price_source: str = Field(..., min_length=1)
    nvlink_gbs: float = Field(0.0, ge=0, description="NVLink GB/s per GPU, both directions; 0 = none")
    pcie_gen: int = Field(..., ge=3, le=5)
    ray_accelerator_type: str = Field(..., min_length=1)
    source: str = Field(..., min_length=10, description="the datasheet the figures come from")

    @property
    def pcie_gbs(self) -> float:
        return PCIE_X16_GBS[self.pcie_gen]

    @property
    def intra_node_gbs(self) -> float:
        """GB/s one direction between two GPUs of this type in one server: NVLink (half the both-ways
        figure) where the servers have it, else PCIe."""
        return self.nvlink_gbs / 2 if self.nvlink_gbs else self.pcie_gbs


class HardwareTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    gpus: dict[str, GpuSpec]

    def __getitem__(self, name: str) -> GpuSpec:
        try:
            return self.gpus[name]
        except KeyError:
            raise KeyError(f"GPU type {name!r} is not in the hardware table (have {sorted(self.gpus)})") from None


def parse_table(data: dict) -> HardwareTable:
    return HardwareTable(gpus={name: {"name": name, **row} for name, row in data["gpus"].items()})


@cache
def load_hardware(path: str | Path = HARDWARE_TABLE) -> HardwareTable:
    return parse_table(yaml.safe_load(Path(path).read_text()))
