"""`fmo.nn`: torch.nn modules built on the library's kernels."""
from .fp8_linear import FP8Linear  # noqa: F401
from .attention import FusedAttention  # noqa: F401
from .moe_layer import MoELayer  # noqa: F401
