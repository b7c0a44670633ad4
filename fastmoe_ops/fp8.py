"""FP8 with DeepSeek's fine-grained scaling: public functions (`fmo.fp8.*`)."""
from .ops.fp8_block_quant import quantize_per_block, quantize_per_token_group_transposed  # noqa: F401
from .ops.fp8_quant import quantize_per_token_group  # noqa: F401
from .ops.fp8_swiglu_quant import swiglu_quantize_per_token_group  # noqa: F401
from .reference.fp8 import dequantize_per_block, dequantize_per_token_group  # noqa: F401
from .ops.fp8_gemm import contiguous_alignment, gemm  # noqa: F401
from .reference.fp8 import calc_diff  # noqa: F401
from .ops.fp8_gemm_grouped import grouped_gemm_contiguous, grouped_gemm_masked  # noqa: F401
from .ops import fp8_library  # noqa: F401,E402  (torch.ops.fmo.* for torch.compile)
