"""Compiled request scanner.

_http_py.py is the reference implementation, and documents the request shape;
this module must behave the same for every public call.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.string cimport memcmp

__all__ = ("MAX_HEADERS", "GetScanner")

cdef enum:
    _MAX_HEADERS = 100

MAX_HEADERS = _MAX_HEADERS

cdef extern from *:
    """
    #define FC_ASCII_DATA(s) ((const char *)PyUnicode_DATA(s))
    """
    const char *FC_ASCII_DATA(object s)

# Byte classes: a query character (RFC 3986), a token character (RFC 9110), a
# field-value character (printable ASCII, space, tab).
cdef bint QUERY[256]
cdef bint TOKEN[256]
cdef bint FIELD_VALUE[256]
cdef int _byte
for _byte in range(256):
    QUERY[_byte] = (
        0x30 <= _byte <= 0x39 or 0x41 <= _byte <= 0x5A or 0x61 <= _byte <= 0x7A
        or _byte in b"-._~!$&'()*+,;=:@/?%"
    )
    TOKEN[_byte] = (
        0x30 <= _byte <= 0x39 or 0x41 <= _byte <= 0x5A or 0x61 <= _byte <= 0x7A
        or _byte in b"!#$%&'*+-.^_`|~"
    )
    FIELD_VALUE[_byte] = 0x20 <= _byte <= 0x7E or _byte == 0x09


cdef inline bint lower_equals(const unsigned char *p, Py_ssize_t size, const char *lower) noexcept:
    """Whether p[:size], in ASCII lower case, is the NUL-terminated lower."""
    cdef Py_ssize_t i
    for i in range(size):
        if lower[i] == 0 or (p[i] | 0x20 if 0x41 <= p[i] <= 0x5A else p[i]) != lower[i]:
            return 0
    return lower[size] == 0


# Headers that take a request out of the shape, lower case; and any Content-*.
cdef enum:
    _REFUSED_COUNT = 11
cdef const char *_REFUSED[_REFUSED_COUNT]
_REFUSED[:] = [
    b"transfer-encoding", b"proxy-connection", b"upgrade", b"sec-websocket-key1",
    b"expect", b"max-forwards", b"purpose", b"sec-purpose", b"x-moz", b"etag", b"server",
]


cdef enum Verdict:
    OTHER_HEADER
    HOST
    USER_AGENT
    CONNECTION_KEEP_ALIVE
    REFUSED


cdef Verdict header_verdict(
    const unsigned char *name, Py_ssize_t name_size,
    const unsigned char *value, Py_ssize_t value_size,
) noexcept:
    if lower_equals(name, name_size, b"host"):
        return HOST
    if lower_equals(name, name_size, b"user-agent"):
        return USER_AGENT
    if lower_equals(name, name_size, b"connection"):
        return CONNECTION_KEEP_ALIVE if lower_equals(value, value_size, b"keep-alive") else REFUSED
    if name_size >= 8 and lower_equals(name, 8, b"content-"):
        return REFUSED
    cdef int i
    for i in range(_REFUSED_COUNT):
        if lower_equals(name, name_size, _REFUSED[i]):
            return REFUSED
    return OTHER_HEADER


@cython.final
cdef class GetScanner:
    """Scans for complete GET and HEAD requests of path (see _http_py)."""
    cdef bytes _path
    cdef Py_ssize_t _max_line_size
    cdef Py_ssize_t _max_field_size
    # The last User-Agent returned: a connection sends the same one again and
    # again, and gets the same str, hash cached, each time.
    cdef str _user_agent

    def __init__(self, bytes path not None, Py_ssize_t max_line_size, Py_ssize_t max_field_size):
        self._path = path
        self._max_line_size = max_line_size
        self._max_field_size = max_field_size
        self._user_agent = ""

    def scan(self, bytes data not None, Py_ssize_t start):
        """(end, head_only, query_start, query_end, user_agent) for the request
        of the shape that starts at data[start] and ends before data[end], or
        None (see _http_py.GetScanner.scan)."""
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        if not 0 <= start <= size:
            raise ValueError(f"start {start} is not in data of {size} bytes")
        if self._path is None:
            raise RuntimeError("GetScanner.__init__() was not called")
        cdef Py_ssize_t at = start, target, query_start, query_end, name, name_end
        cdef Py_ssize_t value, line_end, trimmed, agent = -1, agent_end = -1
        cdef Py_ssize_t headers = 0, hosts = 0
        cdef Py_ssize_t path_size = PyBytes_GET_SIZE(self._path)
        cdef bint head_only
        cdef Verdict verdict
        if size - at >= 4 and memcmp(p + at, b"GET ", 4) == 0:
            head_only = 0
            at += 4
        elif size - at >= 5 and memcmp(p + at, b"HEAD ", 5) == 0:
            head_only = 1
            at += 5
        else:
            return None
        target = at
        if size - at < path_size or memcmp(p + at, PyBytes_AS_STRING(self._path), path_size):
            return None
        at += path_size
        query_start = query_end = at
        if at < size and p[at] == b"?":
            at += 1
            query_start = at
            while at < size and QUERY[p[at]]:
                at += 1
            query_end = at
        if at - target >= self._max_line_size:
            return None
        if size - at < 11 or memcmp(p + at, b" HTTP/1.1\r\n", 11):
            return None
        at += 11
        while True:
            if size - at < 2:
                return None  # not complete yet
            if p[at] == b"\r" and p[at + 1] == b"\n":
                break
            headers += 1
            if headers > _MAX_HEADERS:
                return None
            name = at
            while at < size and TOKEN[p[at]]:
                at += 1
            name_end = at
            if name_end == name or at >= size or p[at] != b":":
                return None
            at += 1
            while at < size and (p[at] == b" " or p[at] == b"\t"):
                at += 1
            value = at
            while at < size and FIELD_VALUE[p[at]]:
                at += 1
            line_end = at
            if size - at < 2 or p[at] != b"\r" or p[at + 1] != b"\n":
                return None
            if line_end - name >= self._max_field_size // 2:
                return None
            trimmed = line_end
            while trimmed > value and (p[trimmed - 1] == b" " or p[trimmed - 1] == b"\t"):
                trimmed -= 1
            verdict = header_verdict(p + name, name_end - name, p + value, trimmed - value)
            if verdict == REFUSED:
                return None
            if verdict == HOST:
                hosts += 1
                if hosts > 1:
                    return None
            if verdict == USER_AGENT:
                if agent >= 0:
                    return None
                agent, agent_end = value, trimmed
            at = line_end + 2
        if not hosts:
            return None
        return at + 2, head_only, query_start, query_end, self._agent(p, agent, agent_end)

    cdef str _agent(self, const unsigned char *p, Py_ssize_t start, Py_ssize_t end):
        if start < 0:
            return ""
        cdef str last = self._user_agent
        if len(last) == end - start and memcmp(FC_ASCII_DATA(last), p + start, end - start) == 0:
            return last
        self._user_agent = PyUnicode_DecodeASCII(<const char *>p + start, end - start, NULL)
        return self._user_agent
