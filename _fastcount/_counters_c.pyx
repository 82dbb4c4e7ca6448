"""Compiled counter engine: per-shard C hash tables of rows kept in slabs.

_counters_py.py is the reference implementation; this module must behave the
same for every public call. Declarations are in _counters_c.pxd.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.long cimport PyLong_AsLongLong, PyLong_CheckExact
from cpython.pythread cimport (
    NOWAIT_LOCK,
    WAIT_LOCK,
    PyThread_acquire_lock,
    PyThread_allocate_lock,
    PyThread_free_lock,
    PyThread_release_lock,
)
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport (
    INT32_MAX,
    INT64_MAX,
    int16_t,
    int32_t,
    int64_t,
    uint16_t,
    uint32_t,
    uint64_t,
)
from libc.stdlib cimport calloc, free, malloc, qsort
from libc.string cimport memcmp, memcpy, memset


cdef extern from *:
    """
    /* Key hash: the bucket and the hashes of the four dimensions' UTF-8
       bytes, folded with the xxHash64 round and finished with its avalanche.
       A dimension's hash is CPython's hash of those bytes: SipHash with the
       per-process random key (PYTHONHASHSEED), so crafted query strings cannot
       aim collisions at one probe chain, the same protection a dict keyed by
       these strings has. For an ASCII str it is the str's own hash, which
       CPython caches on the str: a str that is counted again is not hashed
       again, and a key counted from raw query bytes (add_query) hashes as the
       same key counted from str. */
    #define FC_P1 0x9E3779B185EBCA87ULL
    #define FC_P2 0xC2B2AE3D27D4EB4FULL
    #define FC_P3 0x165667B19E3779F9ULL
    static inline uint64_t fc_round(uint64_t acc, uint64_t word) {
        acc += word * FC_P2;
        acc = (acc << 31) | (acc >> 33);
        return acc * FC_P1;
    }
    static inline uint64_t fc_finish(uint64_t h) {
        h ^= h >> 33; h *= FC_P2;
        h ^= h >> 29; h *= FC_P3;
        h ^= h >> 32;
        return h;
    }
    #if PY_VERSION_HEX >= 0x030D0000 && PY_VERSION_HEX < 0x030E0000
    /* Exported, but out of the headers, in 3.13 only; public as Py_HashBuffer from 3.14. */
    PyAPI_FUNC(Py_hash_t) _Py_HashBytes(const void *src, Py_ssize_t len);
    #endif
    static inline uint64_t fc_bytes_hash(const char *p, Py_ssize_t size) {
    #if PY_VERSION_HEX >= 0x030E0000
        return (uint64_t)Py_HashBuffer(p, size);
    #else
        return (uint64_t)_Py_HashBytes(p, size);
    #endif
    }
    /* Both helpers take exact str objects only (Cython checks the
       arguments), and stay inline for the cases of every hit. fc_dim_hash
       takes the UTF-8 bytes fc_utf8 gave for s. */
    static inline uint64_t fc_dim_hash(PyObject *s, const char *utf8, Py_ssize_t size) {
        if (!PyUnicode_IS_COMPACT_ASCII(s))
            return fc_bytes_hash(utf8, size);
    #ifdef Py_GIL_DISABLED
        return (uint64_t)PyObject_Hash(s);
    #else
        Py_hash_t h = ((PyASCIIObject *)s)->hash;  /* -1: not computed yet */
        return (uint64_t)(h != -1 ? h : PyObject_Hash(s));
    #endif
    }
    /* The UTF-8 bytes of s: for a compact ASCII str (almost every query
       string value) its own data; otherwise the UTF-8 copy CPython caches on
       the str at the first call. */
    static inline const char *fc_utf8(PyObject *s, Py_ssize_t *size) {
        if (PyUnicode_IS_COMPACT_ASCII(s)) {
            *size = PyUnicode_GET_LENGTH(s);
            return (const char *)PyUnicode_DATA(s);
        }
        return PyUnicode_AsUTF8AndSize(s, size);
    }
    #if defined(__GNUC__)
    #define fc_prefetch(p) __builtin_prefetch(p)
    #else
    #define fc_prefetch(p) ((void)0)
    #endif
    /* The slabs' memory comes straight from the OS, as CPython's own
       small-object allocator gets its arenas. A block from glibc's malloc goes
       back under the lock of the malloc arena it came from (the event loop
       thread's), and shrinks the heap there and then: the flushing thread
       freeing a 1,000,000-key window's slabs one after the other kept the
       event loop's mallocs waiting 6-9 ms. munmap() takes no lock of malloc's. */
    #ifdef _WIN32
    #include <windows.h>
    static void *fc_pages_new(size_t size) {
        return VirtualAlloc(NULL, size, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE);
    }
    static void fc_pages_free(void *p, size_t size) {
        (void)size;
        VirtualFree(p, 0, MEM_RELEASE);
    }
    #else
    #include <sys/mman.h>
    static void *fc_pages_new(size_t size) {
        void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        return p == MAP_FAILED ? NULL : p;
    }
    static void fc_pages_free(void *p, size_t size) {
        munmap(p, size);
    }
    #endif
    """
    const uint64_t FC_P3
    uint64_t fc_round(uint64_t acc, uint64_t word) nogil
    uint64_t fc_finish(uint64_t h) nogil
    uint64_t fc_bytes_hash(const char *p, Py_ssize_t size)
    uint64_t fc_dim_hash(object s, const char *utf8, Py_ssize_t size)
    const char *fc_utf8(object s, Py_ssize_t *size) except NULL
    void fc_prefetch(const void *p) nogil
    void *fc_pages_new(size_t size) nogil
    void fc_pages_free(void *p, size_t size) nogil


cdef extern from *:
    """
    /* The engine's long GIL-free work (sorting a window, sizing and encoding
       its COPY tuples, walking tuples) runs on a thread made for it at a low
       priority (nice 10), while the calling thread waits without the GIL.
       The caller, a flusher's helper, runs at the event loop's priority
       because it takes the GIL now and then: a thread of low priority holding
       the GIL, or being handed it, keeps the loop waiting for as long as it
       gets no CPU. This thread never takes the GIL, so the loop never waits
       for it to run Python, and on a core they share the loop runs first.
       Nice 10, not 19: against busy threads of the same session or cgroup
       (a saturated event loop, the other workers) it still gets about a tenth
       of their share, where at nice 19 a seal of a million keys took a minute
       (python -m loadtests.bench_seal). Where no
       such thread can be made (not Linux, or pthread_create() fails), the
       caller does the work itself. The work reads and writes memory that the
       caller allocated, and frees none of it. */
    #if defined(__linux__)
    #include <pthread.h>
    #include <sys/resource.h>
    #include <sys/syscall.h>
    #include <unistd.h>
    #ifndef FC_ENGINE_NICE  /* another for a comparison: CFLAGS=-DFC_ENGINE_NICE=19 */
    #define FC_ENGINE_NICE 10
    #endif
    typedef struct { void (*job)(void *); void *arg; } fc_call;
    static void *fc_low_priority_main(void *p) {
        fc_call *call = (fc_call *)p;
        setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), FC_ENGINE_NICE);
        pthread_setname_np(pthread_self(), "fastcount-low");
        call->job(call->arg);
        return NULL;
    }
    static void fc_at_low_priority(void (*job)(void *), void *arg) {
        fc_call call = {job, arg};
        pthread_t thread;
        if (pthread_create(&thread, NULL, fc_low_priority_main, &call) != 0) {
            job(arg);
            return;
        }
        pthread_join(thread, NULL);
    }
    #else
    static void fc_at_low_priority(void (*job)(void *), void *arg) {
        job(arg);
    }
    #endif
    """
    void fc_at_low_priority(void (*job)(void *) noexcept nogil, void *arg) nogil


IMPRESSIONS = 0
GIVT_IMPRESSIONS = 1
MEASURABLE = 2
VIEWABLE = 3
CLICKS = 4
GIVT_CLICKS = 5
COLUMNS = (
    "impressions",
    "givt_impressions",
    "measurable",
    "viewable",
    "clicks",
    "givt_clicks",
)
OVERFLOW_CAMPAIGN = "__overflow__"

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

cdef enum:
    # Bounded so that the fresh tables of a swap() stay small, and so that a
    # typo cannot ask for a billion tables.
    MAX_SHARDS = 1 << 16
    INITIAL_SLOTS = 8  # per shard; a new window grows its tables as keys arrive
    # Entries are bump-allocated in slabs of this size, thousands of keys to a
    # slab. With a malloc'd block per key, the flushing thread freeing them
    # filled glibc's fastbins, and the event loop's next malloc of 1 KiB or
    # more consolidated them all, GIL held: 12-17 ms per 100,000 keys freed.
    # The pages of a slab that no entry has reached take no memory.
    SLAB_BYTES = 1024 * 1024
    # An entry bigger than this that does not fit in the slab being filled
    # gets a slab of its own: the tail a full slab leaves unused stays under
    # 1/16 of it.
    LARGE_ENTRY = SLAB_BYTES >> 4

# The query parameters of the four dimensions, in key order.
QUERY_PARAMETERS = ("cid", "crid", "aff", "sub")

# The bytes a plain query may hold besides "&" and "=": printable ASCII
# but "%" and "+", so that every value is its own text.
cdef bint PLAIN[256]
cdef int _byte
for _byte in range(256):
    PLAIN[_byte] = 0x21 <= _byte <= 0x7E and _byte != 0x25 and _byte != 0x2B


cdef int query_parameter(const unsigned char *name, Py_ssize_t size) noexcept nogil:
    """The dimension a query parameter name gives (0-3), or -1."""
    if size == 3 and memcmp(name, b"cid", 3) == 0:
        return 0
    if size == 4 and memcmp(name, b"crid", 4) == 0:
        return 1
    if size == 3 and memcmp(name, b"aff", 3) == 0:
        return 2
    if size == 3 and memcmp(name, b"sub", 3) == 0:
        return 3
    return -1


cdef bint parse_plain_query(
    const unsigned char *query, Py_ssize_t size, Py_ssize_t max_value_bytes, Key *key
) noexcept nogil:
    """Points key's dimensions into a plain query (see Counters.add_query);
    0 for any other query."""
    cdef Py_ssize_t pos = 0, pair_end, name_end, value, i
    cdef int dimension
    cdef unsigned seen = 0
    for dimension in range(NDIMS):
        key.dims[dimension] = b""
        key.lens[dimension] = 0
    while True:
        pair_end = pos
        while pair_end < size and query[pair_end] != 0x26:  # "&"
            pair_end += 1
        name_end = pos
        while name_end < pair_end and query[name_end] != 0x3D:  # "="
            if not PLAIN[query[name_end]]:
                return 0
            name_end += 1
        dimension = query_parameter(query + pos, name_end - pos)
        if dimension >= 0:
            if seen & (1u << dimension):
                return 0
            seen |= 1u << dimension
            value = name_end + 1 if name_end < pair_end else pair_end
            if pair_end - value > max_value_bytes:
                return 0
            for i in range(value, pair_end):
                if not PLAIN[query[i]]:
                    return 0
            key.dims[dimension] = <const char *>query + value
            key.lens[dimension] = pair_end - value
        if pair_end >= size:
            return 1
        pos = pair_end + 1


# -------------------------------------------------------------------- arenas

cdef void *arena_alloc(Arena *arena, size_t size) noexcept nogil:
    """size bytes, 8-byte aligned, that live as long as the arena; NULL when
    out of memory (the arena is left as it was)."""
    size = (size + 7) & ~<size_t>7
    cdef char *p = arena.bump
    if size <= arena.left:
        arena.bump = p + size
        arena.left -= size
        return p
    cdef size_t slab_size = sizeof(Slab) + size if size > LARGE_ENTRY else SLAB_BYTES
    cdef Slab *slab = <Slab *>fc_pages_new(slab_size)
    if slab == NULL:
        return NULL
    slab.next = arena.slabs
    slab.size = slab_size
    arena.slabs = slab
    p = <char *>(slab + 1)
    if size <= LARGE_ENTRY:  # the slab being filled from now on
        arena.bump = p + size
        arena.left = SLAB_BYTES - sizeof(Slab) - size
    return p


cdef void arena_free(Arena *arena) noexcept nogil:
    """Frees every slab, and leaves the arena empty."""
    cdef Slab *slab = arena.slabs
    cdef Slab *next
    while slab != NULL:
        next = slab.next
        fc_pages_free(slab, slab.size)
        slab = next
    memset(arena, 0, sizeof(Arena))


# ---------------------------------------------------------------- keys, rows

cdef inline int64_t as_int64(object value) except? -1:
    # Cython's own conversion inlines the exact-int case; anything else goes
    # through PyLong_AsLongLong, which takes __index__ only (a float is a
    # TypeError, as in the pure-Python engine), where Cython's would truncate.
    if PyLong_CheckExact(value):
        return <int64_t>value
    return PyLong_AsLongLong(value)


cdef inline char *entry_data(Entry *e) noexcept nogil:
    return <char *>(e + 1)


cdef inline uint64_t key_hash(int64_t bucket, const uint64_t *dim_hashes) noexcept nogil:
    cdef uint64_t h = fc_round(FC_P3, <uint64_t>bucket)
    cdef int i
    for i in range(NDIMS):
        h = fc_round(h, dim_hashes[i])
    return fc_finish(h)


cdef inline uint64_t bytes_key_hash(const Key *key) noexcept:
    """The hash of a key whose dimensions are raw bytes, not str."""
    cdef uint64_t dim_hashes[NDIMS]
    cdef int i
    for i in range(NDIMS):
        dim_hashes[i] = fc_bytes_hash(key.dims[i], key.lens[i])
    return key_hash(key.bucket, dim_hashes)


cdef inline bint entry_matches(const Entry *e, const Key *key, uint64_t h) noexcept nogil:
    cdef int i
    if e.hash != h or e.bucket != key.bucket:
        return False
    for i in range(NDIMS):
        if e.lens[i] != key.lens[i]:
            return False
    cdef const char *p = entry_data(<Entry *>e)
    for i in range(NDIMS):
        if memcmp(p, key.dims[i], <size_t>key.lens[i]) != 0:
            return False
        p += key.lens[i]
    return True


cdef bint key_is_overflow(const Key *key) noexcept nogil:
    return (
        key.lens[0] == 12
        and memcmp(key.dims[0], b"__overflow__", 12) == 0
        and key.lens[1] == 0
        and key.lens[2] == 0
        and key.lens[3] == 0
    )


cdef Entry *entry_new(Arena *arena, const Key *key, uint64_t h) noexcept nogil:
    cdef size_t size = 0
    cdef int i
    for i in range(NDIMS):
        size += <size_t>key.lens[i]
    cdef Entry *e = <Entry *>arena_alloc(arena, sizeof(Entry) + size)
    if e == NULL:
        return NULL
    e.hash = h
    e.bucket = key.bucket
    memset(e.counts, 0, sizeof(e.counts))
    cdef char *p = entry_data(e)
    for i in range(NDIMS):
        e.lens[i] = <uint32_t>key.lens[i]
        memcpy(p, key.dims[i], <size_t>key.lens[i])
        p += key.lens[i]
    return e


cdef tuple entry_row(Entry *e):
    cdef char *p = entry_data(e)
    cdef str campaign = PyUnicode_DecodeUTF8(p, e.lens[0], NULL)
    p += e.lens[0]
    cdef str creative = PyUnicode_DecodeUTF8(p, e.lens[1], NULL)
    p += e.lens[1]
    cdef str affiliate = PyUnicode_DecodeUTF8(p, e.lens[2], NULL)
    p += e.lens[2]
    cdef str sub_id = PyUnicode_DecodeUTF8(p, e.lens[3], NULL)
    return (
        e.bucket, campaign, creative, affiliate, sub_id,
        e.counts[0], e.counts[1], e.counts[2], e.counts[3], e.counts[4], e.counts[5],
    )


cdef int entry_cmp(const void *a, const void *b) noexcept nogil:
    """qsort() comparator of two Entry *: bucket, then the four dimensions as
    UTF-8 bytes (memcmp, then the shorter first): PostgreSQL's order for the
    primary key with COLLATE "C", and the code point order of the str."""
    cdef const Entry *x = (<const Entry **>a)[0]
    cdef const Entry *y = (<const Entry **>b)[0]
    if x.bucket != y.bucket:
        return -1 if x.bucket < y.bucket else 1
    cdef const char *px = entry_data(<Entry *>x)
    cdef const char *py = entry_data(<Entry *>y)
    cdef int i, c
    for i in range(NDIMS):
        c = memcmp(px, py, min(x.lens[i], y.lens[i]))
        if c != 0:
            return c
        if x.lens[i] != y.lens[i]:
            return -1 if x.lens[i] < y.lens[i] else 1
        px += x.lens[i]
        py += y.lens[i]
    return 0


# ---------------------------------------------------------------------- sort

# Sorting the Entry * with entry_cmp costs a cache miss or two per comparison,
# and there are ~20 comparisons per entry at 1,000,000 entries: about a second.
# Instead, each entry has a sort string whose byte order is entry_cmp's order:
# the bucket as 8 bytes big-endian with its sign bit flipped, then each
# dimension's UTF-8 bytes plus one (UTF-8 has no byte over 0xF4), each
# dimension followed by a 0. The 0 puts a dimension before any longer one that
# it begins, and comes before the next dimension's bytes: ("a", "") <
# ("a\x00", "") and ("a", "bc") < ("ab", "c"). Records {8 bytes of the string,
# Entry *} are sorted most significant chunk first: a counting sort on the
# chunk, then on the next chunk within each run of equal ones, until the runs
# are short enough for an insertion sort. An entry is read once per chunk that
# its run needs; the sorting moves the 16-byte records only.

cdef struct SortRecord:
    uint64_t key  # the 8 bytes of the entry's sort string being sorted on
    Entry *entry


cdef enum:
    # Runs shorter than this are insertion sorted: a counting sort clears
    # 8 x 256 counters each time.
    SMALL_RUN = 32
    # How many times sort_run() may split a run and go on with the next
    # 8 bytes in a call of its own; past that, qsort() with entry_cmp. Keeps the
    # stack short whatever the keys.
    MAX_LEVELS = 32
    # Loops that visit entries out of memory order fetch the entry this many
    # places ahead of the one they read: its cache misses overlap the others'.
    PREFETCH = 16


cdef inline uint64_t load_be64(const unsigned char *p) noexcept nogil:
    return (
        <uint64_t>p[0] << 56 | <uint64_t>p[1] << 48 | <uint64_t>p[2] << 40
        | <uint64_t>p[3] << 32 | <uint64_t>p[4] << 24 | <uint64_t>p[5] << 16
        | <uint64_t>p[6] << 8 | <uint64_t>p[7]
    )


cdef uint64_t sort_chunk(const Entry *e, size_t depth) noexcept nogil:
    """Bytes 8 * depth to 8 * depth + 8 of e's sort string, big-endian;
    zeros past its end."""
    if depth == 0:
        return <uint64_t>e.bucket ^ (<uint64_t>1 << 63)
    cdef size_t off = (depth - 1) * 8  # from the start of the dimensions
    cdef const unsigned char *p = <const unsigned char *>entry_data(<Entry *>e)
    cdef unsigned char chunk[8]
    cdef int taken = 0
    cdef int i
    cdef size_t n
    memset(chunk, 0, 8)
    for i in range(NDIMS):
        n = e.lens[i]
        if off > n:  # the dimension and its 0 come before the chunk
            off -= n + 1
        elif taken == 0 and n - off >= 8:  # all 8 bytes inside one dimension
            return load_be64(p + off) + <uint64_t>0x0101010101010101
        else:
            while off < n and taken < 8:
                chunk[taken] = p[off] + 1
                off += 1
                taken += 1
            taken += 1  # the dimension's 0
            if taken >= 8:
                break
            off = 0
        p += n
    return load_be64(chunk)


cdef int record_cmp(const void *a, const void *b) noexcept nogil:
    """qsort() comparator of two SortRecord: by key, then by entry_cmp."""
    cdef const SortRecord *x = <const SortRecord *>a
    cdef const SortRecord *y = <const SortRecord *>b
    if x.key != y.key:
        return -1 if x.key < y.key else 1
    return entry_cmp(&x.entry, &y.entry)


cdef void insertion_sort(SortRecord *records, size_t n) noexcept nogil:
    cdef size_t i, j
    cdef SortRecord r
    for i in range(1, n):
        r = records[i]
        j = i
        while j > 0 and record_cmp(&r, &records[j - 1]) < 0:
            records[j] = records[j - 1]
            j -= 1
        records[j] = r


cdef void counting_sort(
    SortRecord *records, SortRecord *scratch, size_t n, size_t *counts
) noexcept nogil:
    """Sorts records by key, stably: a counting sort per byte of the key,
    least significant first, skipping the bytes that every key has the same.
    scratch has room for n records; counts for 8 x 256."""
    cdef size_t i, total, c
    cdef int b, shift
    cdef size_t *count
    cdef uint64_t k
    cdef SortRecord *src = records
    cdef SortRecord *dst = scratch
    cdef SortRecord *t
    memset(counts, 0, 8 * 256 * sizeof(size_t))
    for i in range(n):
        k = records[i].key
        for b in range(8):
            counts[b * 256 + ((k >> (8 * b)) & 0xFF)] += 1
    for b in range(8):
        shift = 8 * b
        count = counts + b * 256
        if count[(src[0].key >> shift) & 0xFF] == n:
            continue
        total = 0
        for i in range(256):  # each byte value's first place in dst
            c = count[i]
            count[i] = total
            total += c
        for i in range(n):
            c = (src[i].key >> shift) & 0xFF
            dst[count[c]] = src[i]
            count[c] += 1
        t = src
        src = dst
        dst = t
    if src != records:
        memcpy(records, src, n * sizeof(SortRecord))


cdef void read_keys(SortRecord *records, size_t n, size_t depth) noexcept nogil:
    """Sets each record's key to its entry's chunk at depth (>= 1)."""
    cdef size_t i
    cdef Entry *e
    for i in range(n):
        if i + PREFETCH < n:
            # The lengths, and about where the chunk's bytes are (a prefetch
            # never faults, wherever that is).
            e = records[i + PREFETCH].entry
            fc_prefetch(&e.lens)
            fc_prefetch(entry_data(e) + (depth - 1) * 8)
        records[i].key = sort_chunk(records[i].entry, depth)


cdef bint keys_differ(const SortRecord *records, size_t n) noexcept nogil:
    cdef size_t i
    for i in range(1, n):
        if records[i].key != records[0].key:
            return True
    return False


cdef void sort_run(
    SortRecord *records, SortRecord *scratch, size_t n, size_t depth, int level,
    size_t *counts
) noexcept nogil:
    """Sorts records into entry_cmp order, given that their sort strings are the
    same before byte 8 * depth and that their keys are the next 8 bytes. n >= 2."""
    cdef size_t i, start
    while not keys_differ(records, n):  # past the bytes that they all share
        if depth > 0 and records[0].key == 0:
            # Past the end of the strings. A window holds each key once, so
            # this is never reached; it bounds the loop all the same.
            return
        depth += 1
        read_keys(records, n, depth)
    if n < SMALL_RUN:
        insertion_sort(records, n)
        return
    if level == MAX_LEVELS:
        qsort(records, n, sizeof(SortRecord), record_cmp)
        return
    counting_sort(records, scratch, n, counts)
    start = 0
    for i in range(1, n + 1):
        if i == n or records[i].key != records[start].key:
            if i - start > 1:
                read_keys(records + start, i - start, depth + 1)
                sort_run(
                    records + start, scratch + start, i - start, depth + 1, level + 1, counts
                )
            start = i


cdef void sort_records(SortRecord *records, SortRecord *scratch, size_t n) noexcept nogil:
    """Sorts the records of n entries into entry_cmp order, given their keys
    at depth 0 (the buckets); scratch has room for n records."""
    cdef size_t counts[8 * 256]
    if n > 1:
        sort_run(records, scratch, n, 0, 0, counts)


# ------------------------------------------------------- binary COPY tuples

cdef enum:
    COPY_FIELDS = 1 + NDIMS + NFIELDS
    # A tuple less its dimensions' bytes: the field count (int16), then an
    # int32 length per field, and the bucket and counts as int64.
    COPY_FIXED = 2 + 4 * COPY_FIELDS + 8 * (1 + NFIELDS)


cdef inline unsigned char *put_be16(unsigned char *p, uint16_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 8)
    p[1] = <unsigned char>v
    return p + 2


cdef inline unsigned char *put_be32(unsigned char *p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v
    return p + 4


cdef inline unsigned char *put_be64(unsigned char *p, uint64_t v) noexcept nogil:
    put_be32(p, <uint32_t>(v >> 32))
    put_be32(p + 4, <uint32_t>v)
    return p + 8


cdef Py_ssize_t copy_size(Entry **rows, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t size = COPY_FIXED * n
    cdef Py_ssize_t i
    cdef int j
    for i in range(n):
        if i + PREFETCH < n:
            fc_prefetch(&rows[i + PREFETCH].lens)
        for j in range(NDIMS):
            size += rows[i].lens[j]
    return size


cdef enum:
    PG_EPOCH = 946684800  # 2000-01-01 00:00:00 UTC in unix seconds
# The buckets timestamptz holds, in unix seconds: 4714-11-24 00:00:00 BC to
# 294276-12-31 23:59:59 UTC (PostgreSQL's MIN_TIMESTAMP and END_TIMESTAMP).
cdef int64_t FIRST_BUCKET = -210866803200
cdef int64_t LAST_BUCKET = 9224318015999


cdef inline int64_t pg_timestamp(int64_t seconds) noexcept nogil:
    """Unix seconds, from FIRST_BUCKET to LAST_BUCKET (no row holds others), as
    PostgreSQL's timestamptz: microseconds since its epoch."""
    return (seconds - PG_EPOCH) * 1000000


cdef unsigned char *copy_tuple(unsigned char *p, Entry *e) noexcept nogil:
    """Writes e as one tuple of PostgreSQL's binary COPY format, all integers
    big-endian; returns the end. Empty dimensions are empty text, not NULL."""
    cdef const char *data = entry_data(e)
    cdef int i
    p = put_be16(p, COPY_FIELDS)
    p = put_be32(p, 8)
    p = put_be64(p, <uint64_t>pg_timestamp(e.bucket))
    for i in range(NDIMS):
        p = put_be32(p, e.lens[i])
        memcpy(p, data, e.lens[i])
        p += e.lens[i]
        data += e.lens[i]
    for i in range(NFIELDS):
        p = put_be32(p, 8)
        p = put_be64(p, <uint64_t>e.counts[i])
    return p


cdef struct Encoding:
    # Rows drained as COPY tuples: their size, then their bytes at out.
    Entry **rows
    Py_ssize_t n
    Py_ssize_t size
    unsigned char *out


cdef void size_job(void *arg) noexcept nogil:
    cdef Encoding *job = <Encoding *>arg
    job.size = copy_size(job.rows, job.n)


cdef void encode_job(void *arg) noexcept nogil:
    cdef Encoding *job = <Encoding *>arg
    cdef unsigned char *p = job.out
    cdef Py_ssize_t i
    for i in range(job.n):
        if i + PREFETCH < job.n:
            fc_prefetch(job.rows[i + PREFETCH])
            fc_prefetch(&job.rows[i + PREFETCH].lens)
        p = copy_tuple(p, job.rows[i])


cdef struct TupleWalk:
    # Binary COPY tuples walked: where the last starts, and where the walk
    # ended (the end of the bytes when all is well; -1 at a malformed tuple).
    const unsigned char *p
    Py_ssize_t size
    Py_ssize_t last
    Py_ssize_t at


cdef void walk_job(void *arg) noexcept nogil:
    cdef TupleWalk *walk = <TupleWalk *>arg
    cdef const unsigned char *p = walk.p
    cdef Py_ssize_t size = walk.size, at = 0, last = -1
    cdef int fields, i
    cdef int32_t length
    while at < size:
        last = at
        if size - at < 2:
            at = -1
            break
        fields = <int16_t>((p[at] << 8) | p[at + 1])
        if fields != COPY_FIELDS:
            at = -1
            break
        at += 2
        for i in range(fields):
            if size - at < 4:
                at = -1
                break
            length = <int32_t>((<uint32_t>p[at] << 24) | (<uint32_t>p[at + 1] << 16)
                               | (<uint32_t>p[at + 2] << 8) | p[at + 3])
            at += 4
            if length < 0 or size - at < length:
                at = -1
                break
            at += length
        if at < 0:
            break
    walk.last = last
    walk.at = at


def last_copy_tuple(bytes tuples not None):
    """Where the last of these binary COPY tuples starts (each a 16-bit field
    count, then each field as a 32-bit length and its bytes; big-endian). A
    ValueError unless there is one at least, each has the 11 fields of
    pixel_counts, none NULL, and the last ends where the bytes do."""
    cdef TupleWalk walk = TupleWalk(
        <const unsigned char *>PyBytes_AS_STRING(tuples), len(tuples), -1, 0
    )
    with nogil:
        fc_at_low_priority(walk_job, &walk)
    if walk.last < 0 or walk.at != walk.size:
        raise ValueError(
            "not binary COPY tuples of pixel_counts, or the last one is cut short")
    return walk.last


# -------------------------------------------------------------------- shards

cdef Shard *shards_new(Py_ssize_t nshards) noexcept nogil:
    """nshards empty tables, or NULL when out of memory."""
    cdef Shard *shards = <Shard *>calloc(<size_t>nshards, sizeof(Shard))
    cdef Py_ssize_t i
    if shards == NULL:
        return NULL
    for i in range(nshards):
        shards[i].slots = <Entry **>calloc(INITIAL_SLOTS, sizeof(Entry *))
        if shards[i].slots == NULL:
            shards_free(shards, nshards)
            return NULL
        shards[i].mask = INITIAL_SLOTS - 1
    return shards


cdef void shards_free(Shard *shards, Py_ssize_t nshards) noexcept nogil:
    """Frees the tables; the entries they point to are their arena's."""
    cdef Py_ssize_t i
    if shards == NULL:
        return
    for i in range(nshards):
        free(shards[i].slots)
    free(shards)


cdef void shards_gather(
    Shard *shards, Py_ssize_t nshards, SortRecord *into, uint64_t *lo, uint64_t *hi
) noexcept nogil:
    """Puts every row into `into` (as many records as rows) and adds its counts
    to the 128-bit sums (hi, lo) per field."""
    cdef Py_ssize_t n = 0
    cdef Py_ssize_t i
    cdef size_t j
    cdef int f
    cdef Entry *e
    cdef uint64_t count
    for i in range(nshards):
        for j in range(shards[i].mask + 1):
            if j + PREFETCH <= shards[i].mask:
                fc_prefetch(shards[i].slots[j + PREFETCH])
            e = shards[i].slots[j]
            if e == NULL:
                continue
            into[n].entry = e
            into[n].key = sort_chunk(e, 0)  # while e is at hand
            n += 1
            for f in range(NFIELDS):
                count = <uint64_t>e.counts[f]  # never negative: add() takes n >= 1
                lo[f] += count
                hi[f] += lo[f] < count


cdef struct Gathering:
    # A window's rows copied out of its tables into rows, in key order, through
    # n records and as many more to sort them with, summed up per field into
    # totals_hi, totals_lo.
    Shard *shards
    Py_ssize_t nshards
    SortRecord *records
    size_t n
    Entry **rows
    uint64_t *totals_lo
    uint64_t *totals_hi


cdef void gather_job(void *arg) noexcept nogil:
    cdef Gathering *job = <Gathering *>arg
    shards_gather(job.shards, job.nshards, job.records, job.totals_lo, job.totals_hi)


cdef void sort_job(void *arg) noexcept nogil:
    cdef Gathering *job = <Gathering *>arg
    cdef size_t i
    sort_records(job.records, job.records + job.n, job.n)
    for i in range(job.n):
        job.rows[i] = job.records[i].entry


cdef inline Entry **shard_find(Shard *s, const Key *key, uint64_t h) noexcept nogil:
    """The slot holding key, or the empty slot where it belongs (linear probing;
    the load stays under 0.7 so an empty slot is always reached)."""
    cdef size_t i = <size_t>h & s.mask
    cdef Entry *e
    while True:
        e = s.slots[i]
        if e == NULL or entry_matches(e, key, h):
            return &s.slots[i]
        i = (i + 1) & s.mask


cdef Entry **shard_empty_slot(Shard *s, uint64_t h) noexcept nogil:
    cdef size_t i = <size_t>h & s.mask
    while s.slots[i] != NULL:
        i = (i + 1) & s.mask
    return &s.slots[i]


cdef int shard_grow(Shard *s) noexcept nogil:
    """Doubles the table; -1 when out of memory (the shard is left as it was)."""
    cdef size_t old_size = s.mask + 1
    cdef Entry **old = s.slots
    cdef Entry **slots = <Entry **>calloc(old_size * 2, sizeof(Entry *))
    cdef size_t i
    if slots == NULL:
        return -1
    s.slots = slots
    s.mask = old_size * 2 - 1
    for i in range(old_size):
        if old[i] != NULL:
            shard_empty_slot(s, old[i].hash)[0] = old[i]
    free(old)
    return 0


cdef int shard_insert(
    Shard *s, Arena *arena, Entry **slot, const Key *key, uint64_t h, int64_t field, int64_t n
) except -1:
    """Adds a row for key, absent from s, with n in field; slot is where
    shard_find() said the key belongs."""
    if (s.used + 1) * 10 > (s.mask + 1) * 7:
        if shard_grow(s) < 0:
            raise MemoryError()
        slot = shard_empty_slot(s, h)
    cdef Entry *e = entry_new(arena, key, h)
    if e == NULL:
        raise MemoryError()
    e.counts[field] = n
    slot[0] = e
    s.used += 1
    return 0


# ------------------------------------------------------------------- classes

@cython.final
cdef class Counters:
    """Counts of the current window, per (bucket, campaign, creative, affiliate, sub_id).

    A window holds at most max_keys keys, overflow rows aside; past that, counts
    for new keys go to their bucket's overflow row. shards (a power of two up to
    65536) splits the table so that each resize is short; it changes nothing
    else.
    """
    def __init__(self, max_keys=1_000_000, shards=16):
        cdef int64_t max_keys_ = as_int64(max_keys)
        cdef int64_t shards_ = as_int64(shards)
        if max_keys_ < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        if shards_ < 1 or shards_ > MAX_SHARDS or shards_ & (shards_ - 1):
            raise ValueError(
                f"shards must be a power of two from 1 to {MAX_SHARDS}, got {shards}"
            )
        cdef Shard *fresh = shards_new(shards_)
        if fresh == NULL:
            raise MemoryError()
        shards_free(self._shards, self._nshards)
        arena_free(&self._arena)
        self._shards = fresh
        self._nshards = shards_
        self._shard_mask = <uint64_t>(shards_ - 1)
        self._max_keys = max_keys_
        self._keys = 0
        self._overflow_rows = 0
        self._overflowed = 0

    def __dealloc__(self):
        shards_free(self._shards, self._nshards)
        arena_free(&self._arena)

    # Hot path: one call per pixel hit. A key already there costs a hash of
    # the str hashes (cached by CPython for ASCII values), a probe and a
    # compare; nothing is allocated. Bound by memory latency (the slot and the
    # row are a cache miss each), not by the instructions here: loadtests/bench_counters.py
    # has the figures.
    def add(
        self,
        bucket,
        str campaign not None,
        str creative not None,
        str affiliate not None,
        str sub_id not None,
        field,
        n=1,
    ):
        """Adds n (>= 1) to one field, IMPRESSIONS to GIVT_CLICKS, of the key's row.

        bucket is the unix time of the bucket start. A dimension that is not a
        str is a TypeError; a field or n out of range, or a bucket PostgreSQL's
        timestamptz cannot hold (before 4714 BC, after 294276), a ValueError; an
        integer or a count past int64 an OverflowError.
        """
        cdef Key key
        key.bucket = as_int64(bucket)
        cdef int64_t f = as_int64(field)
        cdef int64_t k = as_int64(n)
        if <uint64_t>f >= NFIELDS:
            raise ValueError(f"field must be 0..{NFIELDS - 1}, got {field}")
        if k < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if self._shards == NULL:
            raise RuntimeError("Counters.__init__() was not called")
        cdef uint64_t dim_hashes[NDIMS]
        key.dims[0] = fc_utf8(campaign, &key.lens[0])
        dim_hashes[0] = fc_dim_hash(campaign, key.dims[0], key.lens[0])
        key.dims[1] = fc_utf8(creative, &key.lens[1])
        dim_hashes[1] = fc_dim_hash(creative, key.dims[1], key.lens[1])
        key.dims[2] = fc_utf8(affiliate, &key.lens[2])
        dim_hashes[2] = fc_dim_hash(affiliate, key.dims[2], key.lens[2])
        key.dims[3] = fc_utf8(sub_id, &key.lens[3])
        dim_hashes[3] = fc_dim_hash(sub_id, key.dims[3], key.lens[3])
        self._count(&key, key_hash(key.bucket, dim_hashes), f, k)

    def add_query(
        self,
        bucket,
        bytes data not None,
        Py_ssize_t start,
        Py_ssize_t end,
        field,
        Py_ssize_t max_value_bytes,
    ):
        """Adds 1 to one field of the row named by the raw query string
        data[start:end], and returns True, when that query is plain: see
        QUERY_PARAMETERS. Returns False, counting nothing, for any other query,
        which the caller then parses in full.
        """
        cdef Key key
        key.bucket = as_int64(bucket)
        cdef int64_t f = as_int64(field)
        if <uint64_t>f >= NFIELDS:
            raise ValueError(f"field must be 0..{NFIELDS - 1}, got {field}")
        if not 0 <= start <= end <= len(data):
            raise ValueError(f"not a slice of data: {start}:{end} of {len(data)} bytes")
        if self._shards == NULL:
            raise RuntimeError("Counters.__init__() was not called")
        if not parse_plain_query(
            <const unsigned char *>PyBytes_AS_STRING(data) + start,
            end - start,
            max_value_bytes,
            &key,
        ):
            return False
        self._count(&key, bytes_key_hash(&key), f, 1)
        return True

    cdef int _count(self, Key *key, uint64_t h, int64_t f, int64_t k) except -1:
        cdef Shard *s = &self._shards[(h >> 32) & self._shard_mask]
        cdef Entry **slot = shard_find(s, key, h)
        cdef Entry *e = slot[0]
        if e != NULL:
            if e.counts[f] > INT64_MAX - k:
                raise OverflowError("counter would exceed 2**63 - 1")
            e.counts[f] += k
        else:
            self._add_new(s, slot, key, h, f, k)
        return 0

    cdef int _add_new(
        self, Shard *s, Entry **slot, Key *key, uint64_t h, int64_t field, int64_t n
    ) except -1:
        cdef int i
        if not FIRST_BUCKET <= key.bucket <= LAST_BUCKET:
            raise ValueError(
                f"bucket {key.bucket} is past what PostgreSQL's timestamptz holds")
        if key_is_overflow(key):
            shard_insert(s, &self._arena, slot, key, h, field, n)
            self._overflow_rows += 1
            return 0
        if self._keys < self._max_keys:
            for i in range(NDIMS):
                if key.lens[i] > INT32_MAX:  # COPY's field length is an int32
                    raise ValueError("a dimension is longer than 2**31 - 1 bytes of UTF-8")
            shard_insert(s, &self._arena, slot, key, h, field, n)
            self._keys += 1
            return 0
        # The window is full: count into the bucket's overflow row instead.
        if self._overflowed > INT64_MAX - n:
            raise OverflowError("overflowed would exceed 2**63 - 1")
        key.dims[0] = b"__overflow__"
        key.lens[0] = 12
        for i in range(1, NDIMS):
            key.lens[i] = 0
        self._count(key, bytes_key_hash(key), field, n)  # a new overflow row: the branch above
        self._overflowed += n
        return 0

    def swap(self):
        """Hands the window counted so far to a Window and starts an empty one.

        Constant time in the number of keys; counting goes on at once.
        """
        if self._shards == NULL:
            raise RuntimeError("Counters.__init__() was not called")
        cdef Window window = Window.__new__(Window)
        window._lock = PyThread_allocate_lock()
        if window._lock == NULL:
            raise MemoryError()
        cdef Shard *fresh = shards_new(self._nshards)
        if fresh == NULL:
            raise MemoryError()
        # From here to the return nothing can run Python code, so no other
        # thread sees a half-swapped state.
        window._shards = self._shards
        window._nshards = self._nshards
        window._arena = self._arena
        window._rows = self._keys + self._overflow_rows
        window._overflowed = self._overflowed
        self._shards = fresh
        memset(&self._arena, 0, sizeof(Arena))
        self._keys = 0
        self._overflow_rows = 0
        self._overflowed = 0
        return window

    def __len__(self):
        return self._keys + self._overflow_rows

    @property
    def overflowed(self):
        return self._overflowed

    @property
    def max_keys(self):
        return self._max_keys


@cython.final
cdef class Window:
    """The counts of a window swapped out of a Counters, drained in batches.

    A Window shares nothing with its Counters: drain it from any thread. Rows
    come out in key order: ascending bucket, then campaign, creative,
    affiliate and sub_id compared as UTF-8 bytes, which is PostgreSQL's order
    for the primary key with COLLATE "C". The first drain (or totals) sorts
    the whole window, without holding the GIL.
    """
    def __init__(self, *args, **kwargs):
        raise TypeError("Window objects are made by Counters.swap()")

    def __dealloc__(self):
        free(self._sorted)
        shards_free(self._shards, self._nshards)
        arena_free(&self._arena)
        if self._lock != NULL:
            PyThread_free_lock(self._lock)

    def __len__(self):
        return self._rows

    @property
    def overflowed(self):
        return self._overflowed

    @property
    def totals(self):
        """Per-field sums, in COLUMNS order, over every row the window was
        swapped out with, drained or not. Exact: a sum may pass int64."""
        cdef int f
        self._acquire()
        try:
            self._gather()
        finally:
            PyThread_release_lock(self._lock)
        return tuple([
            (<object>self._totals_hi[f] << 64) | self._totals_lo[f] for f in range(NFIELDS)
        ])

    def drain(self, limit):
        """Removes and returns up to limit (>= 1) rows, in key order; [] once empty.

        A row is (bucket, campaign, creative, affiliate, sub_id, impressions,
        givt_impressions, measurable, viewable, clicks, givt_clicks). The
        window's memory is freed with its last row.
        """
        cdef int64_t limit_ = as_int64(limit)
        if limit_ < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        cdef list rows = []
        cdef Entry **batch
        cdef Py_ssize_t got, i
        self._acquire()
        try:
            self._gather()
            got = <Py_ssize_t>min(limit_, self._rows)
            if got == 0:
                return rows
            batch = self._sorted + self._pos
            for i in range(got):
                rows.append(entry_row(batch[i]))
            # Only a complete result moves the cursor: after a MemoryError
            # above (building the rows may allocate), the next drain hands
            # out the same rows again.
            with nogil:
                self._take(got)
        finally:
            PyThread_release_lock(self._lock)
        return rows

    def drain_copy(self, limit):
        """Removes up to limit (>= 1) rows, in key order, and returns them as the
        tuples of PostgreSQL's binary COPY format; b"" once empty.

        The bytes hold no file header or trailer. Each tuple has 11 fields:
        the bucket (timestamptz: microseconds since 2000-01-01 UTC), the four
        dimensions (text as UTF-8; an empty one is empty, never NULL), the six
        counts (bigint), in COLUMNS order: the columns of pixel_counts.
        drain() and drain_copy() take from the same rows. The window's memory
        is freed with its last row.
        """
        cdef int64_t limit_ = as_int64(limit)
        if limit_ < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        cdef bytes out
        cdef Encoding job
        cdef Py_ssize_t got
        self._acquire()
        try:
            self._gather()
            got = <Py_ssize_t>min(limit_, self._rows)
            if got == 0:
                return b""
            job.rows = self._sorted + self._pos
            job.n = got
            with nogil:
                fc_at_low_priority(size_job, &job)
            out = PyBytes_FromStringAndSize(NULL, job.size)
            # Nothing else can see out before it is returned: it is filled
            # without the GIL.
            job.out = <unsigned char *>PyBytes_AS_STRING(out)
            with nogil:
                fc_at_low_priority(encode_job, &job)
                self._take(got)
        finally:
            PyThread_release_lock(self._lock)
        return out

    cdef int _acquire(self) except -1:
        """Takes the window's lock, waiting for it without the GIL: another
        thread may hold it through a sort or a copy that runs without the GIL."""
        if self._lock == NULL:
            raise RuntimeError("Window objects are made by Counters.swap()")
        if not PyThread_acquire_lock(self._lock, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self._lock, WAIT_LOCK)
        return 0

    cdef int _gather(self) except -1:
        """Moves the rows out of the shard tables into one array in key order,
        and sums them up; once, before the first row is drained. Called with
        the lock held."""
        if self._shards == NULL:
            return 0
        cdef size_t n = <size_t>self._rows
        cdef Entry **rows = NULL
        cdef SortRecord *records = NULL
        if n > 0:
            rows = <Entry **>malloc(n * sizeof(Entry *))
            # The records, then as many for sort_records() to move them through.
            records = <SortRecord *>malloc(2 * n * sizeof(SortRecord))
            if rows == NULL or records == NULL:
                free(rows)
                free(records)
                raise MemoryError()
        cdef Gathering job = Gathering(
            self._shards, self._nshards, records, n, rows,
            &self._totals_lo[0], &self._totals_hi[0],
        )
        # The tables are freed here, not on the engine's thread: they come
        # from the event loop's malloc arena, whose lock a thread of low
        # priority must never hold. They go as soon as the records hold the
        # rows, before the sort.
        with nogil:
            if n > 0:
                fc_at_low_priority(gather_job, &job)
            shards_free(self._shards, self._nshards)
            if n > 0:
                fc_at_low_priority(sort_job, &job)
            free(records)
        self._shards = NULL
        self._sorted = rows
        return 0

    cdef void _take(self, Py_ssize_t got) noexcept nogil:
        """Moves the cursor past got drained rows. With the last one, frees all
        the rows' memory, slab by slab: ~120 munmap() calls for 1,000,000 keys,
        made by the thread that drains, without the GIL."""
        self._pos += got
        self._rows -= got
        if self._rows == 0:
            free(self._sorted)
            self._sorted = NULL
            arena_free(&self._arena)
