"""Imports every op module so each registers its kernel specs (build report, benchmarks)."""
from . import fp8_quant  # noqa: F401
from . import fp8_swiglu_quant  # noqa: F401
from . import fp8_block_quant  # noqa: F401
from . import fp8_gemm  # noqa: F401
from . import moe_ipc, moe_layout, moe_low_latency, moe_permute  # noqa: F401
from . import fp8_gemm_grouped  # noqa: F401
from . import attention  # noqa: F401
from . import attention_hopper_bwd  # noqa: F401
from . import attention_hopper_fp8  # noqa: F401
