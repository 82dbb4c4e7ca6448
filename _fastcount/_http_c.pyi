# Stub for the compiled scanner; the same API as _http_py, which documents it.
from typing import Final, final

__all__ = ("MAX_HEADERS", "GetScanner")

MAX_HEADERS: Final = 100

@final
class GetScanner:
    def __init__(self, path: bytes, max_line_size: int, max_field_size: int) -> None: ...
    def scan(self, data: bytes, start: int) -> tuple[int, bool, int, int, str] | None: ...
