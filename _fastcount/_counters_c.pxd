# Declarations of the compiled counter engine (implementation in _counters_c.pyx).
#
# Memory layout, per distinct key:
#   one malloc'd block = Entry header (80 bytes) followed by the four dimension
#   strings as UTF-8, back to back, no terminators (their lengths are in `lens`);
#   one Entry* slot in its shard's open-addressing table (load kept under 0.7).
from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef enum:
    NFIELDS = 6  # impressions, givt_impressions, measurable, viewable, clicks, givt_clicks
    NDIMS = 4    # campaign, creative, affiliate, sub_id


cdef struct Entry:
    uint64_t hash
    int64_t bucket
    int64_t counts[NFIELDS]
    uint32_t lens[NDIMS]
    # the UTF-8 bytes of the four dimensions follow the struct: see entry_data()


cdef struct Key:
    # A key as add() receives it: UTF-8 views borrowed from the argument strings.
    int64_t bucket
    const char *dims[NDIMS]
    Py_ssize_t lens[NDIMS]


cdef struct Shard:
    Entry **slots  # mask + 1 slots, NULL where empty
    size_t mask
    size_t used


cdef class Counters:
    cdef Shard *_shards
    cdef Py_ssize_t _nshards
    cdef uint64_t _shard_mask
    cdef int64_t _max_keys
    cdef int64_t _keys           # distinct keys other than overflow rows
    cdef int64_t _overflow_rows
    cdef int64_t _overflowed

    cdef int _add_new(
        self, Shard *s, Entry **slot, Key *key, uint64_t h, int64_t field, int64_t n
    ) except -1


cdef class Window:
    cdef Shard *_shards
    cdef Py_ssize_t _nshards
    cdef Py_ssize_t _shard_pos   # drain cursor: shard, then slot within it
    cdef size_t _slot_pos
    cdef int64_t _rows
    cdef int64_t _overflowed
    # Rows taken out by a drain() that then failed to build its result
    # (MemoryError): handed out first by the next drain(), so none is lost.
    cdef Entry **_spill
    cdef Py_ssize_t _nspill

    cdef Py_ssize_t _take(self, Entry **batch, Py_ssize_t want) noexcept nogil
    cdef void _keep(self, Entry **batch, Py_ssize_t got) noexcept
