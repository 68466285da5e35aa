"""The iomap engine: file ranges → device mappings → vectored I/O."""

from ext4box.iomap.engine import IOMapEngine
from ext4box.iomap.read_plan import ReadPlan
from ext4box.iomap.types import IOMap, IOMapKind

__all__ = ["IOMap", "IOMapEngine", "IOMapKind", "ReadPlan"]
