# Stub for the compiled engine; the same API as _counters_py, which documents it.
from typing import Final, final

__all__ = (
    "CLICKS",
    "COLUMNS",
    "GIVT_CLICKS",
    "GIVT_IMPRESSIONS",
    "IMPRESSIONS",
    "MEASURABLE",
    "OVERFLOW_CAMPAIGN",
    "QUERY_PARAMETERS",
    "VIEWABLE",
    "Counters",
    "Window",
    "last_copy_tuple",
)

IMPRESSIONS: Final = 0
GIVT_IMPRESSIONS: Final = 1
MEASURABLE: Final = 2
VIEWABLE: Final = 3
CLICKS: Final = 4
GIVT_CLICKS: Final = 5
COLUMNS: Final = (
    "impressions",
    "givt_impressions",
    "measurable",
    "viewable",
    "clicks",
    "givt_clicks",
)
OVERFLOW_CAMPAIGN: Final = "__overflow__"
QUERY_PARAMETERS: Final = ("cid", "crid", "aff", "sub")

@final
class Counters:
    def __init__(self, max_keys: int = 1_000_000, shards: int = 16) -> None: ...
    def add(
        self,
        bucket: int,
        campaign: str,
        creative: str,
        affiliate: str,
        sub_id: str,
        field: int,
        n: int = 1,
    ) -> None: ...
    def add_query(
        self, bucket: int, data: bytes, start: int, end: int, field: int, max_value_bytes: int
    ) -> bool: ...
    def swap(self) -> Window: ...
    def __len__(self) -> int: ...
    @property
    def overflowed(self) -> int: ...
    @property
    def max_keys(self) -> int: ...

@final
class Window:
    def __init__(self, *args: object, **kwargs: object) -> None: ...
    def __len__(self) -> int: ...
    @property
    def overflowed(self) -> int: ...
    @property
    def totals(self) -> tuple[int, int, int, int, int, int]: ...
    def drain(
        self, limit: int
    ) -> list[tuple[int, str, str, str, str, int, int, int, int, int, int]]: ...
    def drain_copy(self, limit: int) -> bytes: ...

def last_copy_tuple(tuples: bytes) -> int: ...
