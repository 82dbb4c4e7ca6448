# Declarations of the compiled counter engine (implementation in _counters_c.pyx).
#
# Memory layout, per distinct key:
#   one Entry header (80 bytes) followed by the four dimension strings as UTF-8,
#   back to back, no terminators (their lengths are in `lens`), rounded up to 8
#   bytes; bump-allocated, in insertion order, in a slab of its window's Arena:
#   1 MiB of pages from the OS each (an entry over 64 KiB may get a slab of its
#   own), with no allocator header per entry. The slabs are freed together:
#   when their Window is drained empty, or deallocated;
#   one Entry* slot in its shard's open-addressing table (load kept under 0.7),
#   until a Window's first drain or totals moves the Entry* into one array
#   sorted by key (8 bytes a key) and frees the tables. While it sorts, it takes
#   32 bytes a key more (16-byte sort records, and as many to move them through).
from cpython.pythread cimport PyThread_type_lock
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
    # A key to count: UTF-8 views borrowed from add()'s str arguments or add_query()'s bytes.
    int64_t bucket
    const char *dims[NDIMS]
    Py_ssize_t lens[NDIMS]


cdef struct Slab:
    # Its entries follow the struct.
    Slab *next   # the slab allocated before it, or NULL
    size_t size  # in bytes, this struct included


cdef struct Arena:
    # The slabs holding a window's entries. An empty Arena is all zeros.
    Slab *slabs  # newest first
    char *bump   # where the next entry goes in the slab being filled,
    size_t left  # and the bytes free there from bump on


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
    cdef Arena _arena            # the entries of the window being counted

    cdef int _count(self, Key *key, uint64_t h, int64_t f, int64_t k) except -1
    cdef int _add_new(
        self, Shard *s, Entry **slot, Key *key, uint64_t h, int64_t field, int64_t n
    ) except -1


cdef class Window:
    cdef Shard *_shards          # as swapped out; NULL once gathered into _sorted
    cdef Py_ssize_t _nshards
    cdef Entry **_sorted         # every row in key order, from the first drain or totals
    cdef Py_ssize_t _pos         # until the last one; the drain cursor is _pos
    cdef int64_t _rows           # rows not drained yet
    cdef int64_t _overflowed
    cdef Arena _arena            # every row's entry, drained or not, until _rows is 0
    # Per-field sums over every row, (hi << 64) | lo: set when the rows are
    # gathered, before any is drained.
    cdef uint64_t _totals_lo[NFIELDS]
    cdef uint64_t _totals_hi[NFIELDS]
    # Held by drain(), drain_copy() and totals, which run partly without the GIL.
    cdef PyThread_type_lock _lock

    cdef int _acquire(self) except -1
    cdef int _gather(self) except -1
    cdef void _take(self, Py_ssize_t got) noexcept nogil
