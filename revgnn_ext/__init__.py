"""revgnn_ext: reversible deep GNNs with fused C++/CUDA message passing for PyTorch."""
import torch

try:
    from . import _C
except ImportError as err:  # pragma: no cover - exercised by broken installs only
    if "undefined symbol" in str(err):
        raise ImportError(
            f"revgnn_ext._C does not match the installed torch {torch.__version__} (it was built against "
            "another version). Rebuild: pip install --no-build-isolation -e .") from err
    raise ImportError(
        "revgnn_ext._C, the compiled extension, is missing. Build it against the installed torch with "
        "`pip install --no-build-isolation -e .` from the source tree (or `make test`).") from err

if _C.torch_version != torch.__version__:
    raise ImportError(
        f"revgnn_ext._C was built for torch {_C.torch_version} but torch {torch.__version__} is installed. "
        "Rebuild: pip install --no-build-isolation -e .")

from . import ops, reference  # noqa: E402  (registers fake kernels and autograd)
from .convert import ConversionReport, convert  # noqa: E402  (imports torch_geometric only when called)
from .graph import CSRGraph  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CSRGraph", "ConversionReport", "convert", "ops", "reference", "with_cuda"]


def with_cuda() -> bool:
    """Whether the CUDA kernels were compiled in."""
    return bool(_C.with_cuda)
