"""fastmoe-ops: hand-written CUDA/PTX kernels and communication for DeepSeek-style MoE.

Three engines sit behind one launcher path per op: `cuda` (CUDA tensors, kernels compiled
at run time and launched through CuPy on torch's stream), `sim` (CPU tensors, the same
kernel source run on the CPU SIMT simulator) and `reference` (CPU tensors, plain PyTorch).
"""
from .errors import (  # noqa: F401
    BackendError,
    CommError,
    CommTimeoutError,
    CompileError,
    FmoError,
    InputError,
    LaunchError,
    SimError,
    UnsupportedError,
)

__version__ = "0.1.0"
from .backends import available_backends, use_backend  # noqa: F401,E402
from .budget import SmBudget, comm_sms, set_comm_sms, sm_budget  # noqa: F401,E402
from . import fp8  # noqa: F401,E402
from . import comm  # noqa: F401,E402
from . import moe  # noqa: F401,E402
from . import nn  # noqa: F401,E402
from .attention import flash_attn, flash_attn_varlen  # noqa: F401,E402
from . import streams  # noqa: F401,E402
from . import trace  # noqa: F401,E402
