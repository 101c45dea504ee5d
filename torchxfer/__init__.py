"""torchxfer: move model weights from a torchrun trainer to inference servers
over a torch.distributed side group: packed, overlapped, self-checking."""

import logging

from .config import (
    DEFAULT_PACKED_BUFFER_SIZE_BYTES,
    DEFAULT_PACKED_NUM_BUFFERS,
    IPCWeightTransferInitInfo,
    NCCLWeightTransferInitInfo,
    NCCLWeightTransferUpdateInfo,
    ParallelConfig,
    TransferStats,
    WeightTransferConfig,
    worker_rank,
)
from .engine import IPCWeightTransferEngine, NCCLWeightTransferEngine, WeightTransferEngine, create_engine
from .errors import TransferError
from .group import create_side_group, destroy_side_group, side_group
from .loading import ModuleLoader
from .sources import iter_named_tensors, update_info_for
from .trainer import send_model
from .wire import PROTOCOL_VERSION

__version__ = "0.1.0"


class _Utf8Safe(logging.Filter):
    """Escape what UTF-8 cannot carry (a lone surrogate in a tensor name, say) in our log
    lines, so a handler writing UTF-8 never fails on a name that came from a peer."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = message.encode("utf-8", "backslashreplace").decode("utf-8")
        if safe != message:
            record.msg, record.args = safe, None
        return True


_log = logging.getLogger("torchxfer")
_log.addFilter(_Utf8Safe())
# Silent unless the application configures logging: without a handler of its own, a WARNING
# would reach stderr through logging's last resort.
_log.addHandler(logging.NullHandler())

__all__ = [
    "DEFAULT_PACKED_BUFFER_SIZE_BYTES",
    "DEFAULT_PACKED_NUM_BUFFERS",
    "IPCWeightTransferEngine",
    "IPCWeightTransferInitInfo",
    "ModuleLoader",
    "NCCLWeightTransferEngine",
    "NCCLWeightTransferInitInfo",
    "NCCLWeightTransferUpdateInfo",
    "ParallelConfig",
    "PROTOCOL_VERSION",
    "TransferError",
    "TransferStats",
    "WeightTransferConfig",
    "WeightTransferEngine",
    "create_engine",
    "create_side_group",
    "destroy_side_group",
    "iter_named_tensors",
    "send_model",
    "side_group",
    "update_info_for",
    "worker_rank",
]
