"""An inventory: the devices a plan may use (GPU types with counts and prices, CPU cores), the nodes they
sit in and the links between them, read from YAML.

GPU figures come from capacity/hardware.yaml; an inventory's ``device_types`` may override a row's price
(or any other figure) or describe CPU cores, whose timings come from a measured profile file."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from capacity.hardware import GpuSpec, HardwareTable, load_hardware

PACKAGE_DIR = Path(__file__).resolve().parent
# Two CPU engines on one host hand KV over through shared memory (UCX sm/cma): a memcpy, tens of Gbit/s.
CPU_INTRA_NODE_GBPS = 40.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LinkSpec(_Strict):
    bandwidth_gbps: float = Field(..., gt=0, description="gigabits per second, one direction")
    latency_us: float = Field(0.0, ge=0)


class NodePairLink(LinkSpec):
    nodes: tuple[str, str]


class Links(_Strict):
    intra_node: LinkSpec | None = Field(None, description="null: each GPU type's NVLink/PCIe from the table")
    inter_node: LinkSpec = Field(default_factory=lambda: LinkSpec(bandwidth_gbps=100.0, latency_us=10.0))
    pairs: list[NodePairLink] = Field(default_factory=list, description="links of particular node pairs")


class DeviceType(_Strict):
    """``kind: gpu``: a hardware table row (``hardware``, default: the type's own name) with optional
    overrides of its figures. ``kind: cpu``: one CPU core running one engine, timed by ``profile``."""

    kind: Literal["gpu", "cpu"] = "gpu"
    hardware: str | None = None
    price_per_hour: float | None = Field(None, ge=0)
    overrides: dict[str, Any] = Field(default_factory=dict, description="hardware table fields to replace")
    profile: str | None = Field(None, description="cpu: profile file (JSON), relative to the inventory")
    device_type: str | None = Field(None, description="cpu: the profile key's device_type (default: any cpu one)")

    @model_validator(mode="after")
    def _cpu_price(self) -> DeviceType:
        if self.kind == "cpu" and self.price_per_hour is None:
            raise ValueError("a cpu device type needs price_per_hour")
        return self


class Node(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    devices: dict[str, int] = Field(..., description="device type -> count")

    @model_validator(mode="after")
    def _counts(self) -> Node:
        if not self.devices or any(c < 1 for c in self.devices.values()):
            raise ValueError(f"node {self.name}: every device count must be >= 1")
        return self


class InventorySpec(_Strict):
    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9-]*$")
    description: str = ""
    device_types: dict[str, DeviceType] = Field(default_factory=dict)
    nodes: list[Node] = Field(..., min_length=1)
    links: Links = Field(default_factory=Links)


@dataclass(frozen=True)
class Device:
    id: int
    type: str
    kind: str  # "gpu" | "cpu"
    node: str
    local_index: int  # index among the node's devices of this type (CPU: the core id)


@dataclass(frozen=True)
class Inventory:
    """The resolved inventory: one ``Device`` per GPU or core, their types' specs and the links."""

    spec: InventorySpec
    hardware: HardwareTable
    base_dir: Path

    @cached_property
    def devices(self) -> tuple[Device, ...]:
        out = []
        for node in self.spec.nodes:
            for type_name, count in node.devices.items():
                kind = self.device_type(type_name).kind
                out += [Device(len(out) + i, type_name, kind, node.name, i) for i in range(count)]
        return tuple(out)

    def device_type(self, name: str) -> DeviceType:
        return self.spec.device_types.get(name, DeviceType())

    def gpu(self, type_name: str) -> GpuSpec:
        """The hardware row of a GPU type with the inventory's overrides and price."""
        dt = self.device_type(type_name)
        row = self.hardware[dt.hardware or type_name]
        update = dict(dt.overrides)
        if dt.price_per_hour is not None:
            update["price_per_hour"] = dt.price_per_hour
        return row.model_copy(update={"name": type_name, **update}) if update or row.name != type_name else row

    def price_per_hour(self, type_name: str) -> float:
        dt = self.device_type(type_name)
        return dt.price_per_hour if dt.kind == "cpu" else self.gpu(type_name).price_per_hour

    def profile_path(self, type_name: str) -> Path | None:
        """A cpu type's profile file: relative to the inventory, else to the capacity package
        (``profiles/smollm2-135m-cpu.json`` names the shipped one)."""
        p = self.device_type(type_name).profile
        if p is None:
            return None
        here = self.base_dir / p
        return here if here.exists() else PACKAGE_DIR / p

    def link(self, a: Device, b: Device) -> LinkSpec:
        """The link a KV handoff (or a collective) between two devices crosses."""
        links = self.spec.links
        if a.node == b.node:
            if links.intra_node is not None:
                return links.intra_node
            if a.kind == "cpu" or b.kind == "cpu":
                return LinkSpec(bandwidth_gbps=CPU_INTRA_NODE_GBPS, latency_us=5.0)
            gbs = min(self.gpu(a.type).intra_node_gbs, self.gpu(b.type).intra_node_gbs)
            return LinkSpec(bandwidth_gbps=gbs * 8, latency_us=5.0)
        for pair in links.pairs:
            if set(pair.nodes) == {a.node, b.node}:
                return LinkSpec(bandwidth_gbps=pair.bandwidth_gbps, latency_us=pair.latency_us)
        return links.inter_node

    @cached_property
    def bandwidth_gbps(self) -> np.ndarray:
        """Device x device link bandwidth (the diagonal: the largest bandwidth in the inventory)."""
        n = len(self.devices)
        bw = np.zeros((n, n))
        for a in self.devices:
            for b in self.devices[a.id + 1 :]:
                bw[a.id, b.id] = bw[b.id, a.id] = self.link(a, b).bandwidth_gbps
        np.fill_diagonal(bw, bw.max() if n > 1 else 1.0)
        return bw


def parse_inventory(data: dict, base_dir: Path = Path("."), hardware: HardwareTable | None = None) -> Inventory:
    spec = InventorySpec.model_validate(data)
    inv = Inventory(spec=spec, hardware=hardware or load_hardware(), base_dir=base_dir)
    for node in spec.nodes:
        for type_name in node.devices:
            if inv.device_type(type_name).kind == "gpu":
                inv.gpu(type_name)  # a KeyError names an unknown GPU type now, not mid-search
    names = [n.name for n in spec.nodes]
    if len(set(names)) != len(names):
        raise ValueError(f"inventory {spec.name}: duplicate node names")
    return inv


def load_inventory(path: str | Path) -> Inventory:
    path = Path(path)
    return parse_inventory(yaml.safe_load(path.read_text()), base_dir=path.parent)
