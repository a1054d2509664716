"""Accelerator catalog: memory, bandwidth and FLOPs the layout planner works with.

Memory is what ``nvidia-smi`` reports as total (GiB), not the marketing GB figure. FLOPs are dense
(no 2:4 sparsity). Bandwidths are per GPU and one direction: NVLink within a node, the network
(InfiniBand/RoCE, one NIC per GPU in the reference systems) between nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from moestack.errors import ConfigError

GIB = 1024**3


@dataclass(frozen=True)
class GPUSpec:
    name: str
    accelerator_type: str           # Ray's accelerator_type label and pricing catalog key
    memory_gib: float
    hbm_bandwidth_gb_per_s: float   # 1 GB = 1e9 bytes
    bf16_tflops: float
    fp8_tflops: float | None        # None: no FP8 tensor cores (FP8 weights run as W8A16)
    gpus_per_node: int
    intra_node_gb_per_s: float      # NVLink (or PCIe) per GPU, one direction
    inter_node_gb_per_s: float      # network per GPU, one direction
    source: str
    fp4_tflops: float | None = None  # None: no FP4 tensor cores (FP4 weights run as W4A16)

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB


GPUS: dict[str, GPUSpec] = {g.name: g for g in (
    # H100 SXM5 80GB: 3.35 TB/s HBM3, 989 TFLOPS BF16 / 1979 FP8 dense, NVLink4 900 GB/s
    # bidirectional; DGX H100: 8 GPUs, 8x ConnectX-7 400 Gb/s (50 GB/s per GPU).
    GPUSpec("h100", "H100", 79.6, 3350, 989, 1979, 8, 450, 50,
            "https://www.nvidia.com/en-us/data-center/h100/ (SXM); DGX H100 user guide"),
    # H200 SXM 141GB: 4.8 TB/s HBM3e, same tensor cores and NVLink as H100; nvidia-smi 143771 MiB.
    GPUSpec("h200", "H200", 140.4, 4800, 989, 1979, 8, 450, 50,
            "https://www.nvidia.com/en-us/data-center/h200/ (SXM); DGX H200 user guide"),
    # A100 SXM4 80GB: 2.039 TB/s HBM2e, 312 TFLOPS BF16, no FP8, NVLink3 600 GB/s bidirectional;
    # DGX A100: 8 GPUs, 8x 200 Gb/s HDR (25 GB/s per GPU).
    GPUSpec("a100", "A100", 80.0, 2039, 312, None, 8, 300, 25,
            "https://www.nvidia.com/en-us/data-center/a100/ (SXM 80GB); DGX A100 user guide"),
    # L40S 48GB GDDR6: 864 GB/s, 362 TFLOPS BF16 / 733 FP8 dense, no NVLink (PCIe Gen4 x16,
    # 32 GB/s per direction); 8-GPU servers with 100 Gb/s per GPU typical.
    GPUSpec("l40s", "L40S", 45.0, 864, 362, 733, 8, 32, 12.5,
            "https://www.nvidia.com/en-us/data-center/l40s/ (datasheet)"),
    # B200 (HGX/DGX B200, 180 GB per GPU, ~179 GiB reported): 8 TB/s HBM3e, 2.25 PFLOPS BF16 /
    # 4.5 PFLOPS FP8 dense, NVLink5 1.8 TB/s bidirectional; 8x ConnectX-7 400 Gb/s.
    # 9 PFLOPS FP4 dense (18 with sparsity).
    GPUSpec("b200", "B200", 179.0, 8000, 2250, 4500, 8, 900, 50,
            "https://www.nvidia.com/en-us/data-center/dgx-b200/ (DGX B200 datasheet)",
            fp4_tflops=9000),
)}


def get_gpu(name: str) -> GPUSpec:
    key = name.lower().removeprefix("accelerator_type:").split("-")[0]
    if key in GPUS:
        return GPUS[key]
    raise ConfigError(f"unknown GPU `{name}`; the catalog knows {', '.join(sorted(GPUS))}",
                      param="gpu")
