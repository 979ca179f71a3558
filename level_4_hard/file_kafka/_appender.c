/* level_4_hard.file_kafka._appender: one record appended to a shared partition, in C.
 *
 * Why: a producer in "flush" mode takes the partition lock, writes one line and releases the
 * lock for every record. In Python, what surrounds the three system calls -- the state slots
 * of writer.state read and written one by one, a failed non-blocking flock raising
 * BlockingIOError, a line numbered with a guessed offset and renumbered when another process
 * appended meanwhile -- cost about as much as the calls themselves, and most of it while the
 * lock was held, so four processes on one topic waited on each other for the interpreter.
 * Here the offset is read under the lock and written in front of the body with one writev
 * (no guess, no copy of the body), and the rest is a few stores.
 *
 * The protocol is the one partition.py documents and implements in Python: the same flock on
 * writer.state, the same slots of its mapping, the same dirty flag, the same index entries.
 * PartitionWriter.append_line stays the reference, used when this module was not built (no C
 * compiler) or EDA_PURE_PYTHON=1 is set; processes with and without this module can append to
 * one partition together (tests/test_file_kafka_appender.py runs them side by side).
 *
 * append(lock_fd, seg_fd, idx_fd, state, body, base, interval, segment_bytes)
 *   state: the writable mapping of writer.state; body: the record's JSON object without its
 *   offset (b'{"key":...}'), written as b'{"offset":N,' + body[1:] + b'\n'.
 *   Returns the offset the record got, with the lock released; or, with the lock STILL HELD,
 *   -1 when the state needs the Python side and nothing was written (the dirty flag is up: a
 *   writer died mid-write; or the active segment is not this writer's: another writer rolled),
 *   or -2 - offset when the record was written and filled the segment (the caller rolls). The
 *   caller does that work in Python, then releases the lock. On an OSError nothing is
 *   acknowledged: what part of the record landed is cut, the dirty flag stays raised (the next
 *   writer checks the tail), and the lock is released.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

/* u64 slots of writer.state (partition.py: MAGIC, DIRTY, BASE, NEXT, END, INDEXED) */
enum { S_MAGIC, S_DIRTY, S_BASE, S_NEXT, S_END, S_INDEXED, N_STATE };

#define SPINS 20 /* as partition._SPINS: retries at once, then as many after a yield */
#define PREFIX "{\"offset\":"
#define PREFIX_LEN (sizeof(PREFIX) - 1)

/* Take the partition lock: retry at once, then yield, then sleep in flock (GIL released). */
static int
take_lock(int fd)
{
    for (int attempt = 0;; attempt++) {
        if (flock(fd, LOCK_EX | LOCK_NB) == 0) {
            return 0;
        }
        if (errno != EWOULDBLOCK && errno != EINTR) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (attempt >= 2 * SPINS) {
            break;
        }
        if (attempt >= SPINS) {
            sched_yield();
        }
    }
    for (;;) {
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = flock(fd, LOCK_EX);
        Py_END_ALLOW_THREADS
        if (rc == 0) {
            return 0;
        }
        if (errno != EINTR) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (PyErr_CheckSignals() < 0) { /* a handler raised (KeyboardInterrupt...) */
            return -1;
        }
    }
}

/* "{"offset":N," into buf (at least PREFIX_LEN + 21 bytes); returns its length. */
static Py_ssize_t
offset_prefix(char *buf, uint64_t offset)
{
    char digits[20];
    int n = 0;
    do {
        digits[n++] = (char)('0' + offset % 10);
        offset /= 10;
    } while (offset);
    memcpy(buf, PREFIX, PREFIX_LEN);
    Py_ssize_t len = PREFIX_LEN;
    while (n) {
        buf[len++] = digits[--n];
    }
    buf[len++] = ',';
    return len;
}

/* Write the iovecs whole (GIL released; retried on EINTR and after a short write). */
static int
writev_all(int fd, struct iovec *iov, int count)
{
    while (count > 0) {
        ssize_t n;
        Py_BEGIN_ALLOW_THREADS
        n = writev(fd, iov, count);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0) {
                    return -1;
                }
                continue;
            }
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (n == 0) {
            PyErr_SetString(PyExc_OSError, "no progress writing a record to the segment");
            return -1;
        }
        while (count > 0 && (size_t)n >= iov->iov_len) { /* a short write: skip what landed */
            n -= (ssize_t)iov->iov_len;
            iov++;
            count--;
        }
        if (count > 0) {
            iov->iov_base = (char *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

static int
as_int(PyObject *obj, const char *what, long long *out)
{
    *out = PyLong_AsLongLong(obj);
    if (*out == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (*out < 0) {
        PyErr_Format(PyExc_ValueError, "%s must not be negative", what);
        return -1;
    }
    return 0;
}

static PyObject *
append(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "append(lock_fd, seg_fd, idx_fd, state, body, base, interval, "
                        "segment_bytes)");
        return NULL;
    }
    long long lock_fd, seg_fd, idx_fd, base, interval, segment_bytes;
    if (as_int(args[0], "lock_fd", &lock_fd) < 0 || as_int(args[1], "seg_fd", &seg_fd) < 0 ||
        as_int(args[2], "idx_fd", &idx_fd) < 0 || as_int(args[5], "base", &base) < 0 ||
        as_int(args[6], "interval", &interval) < 0 ||
        as_int(args[7], "segment_bytes", &segment_bytes) < 0) {
        return NULL;
    }
    PyObject *body = args[4];
    if (!PyBytes_CheckExact(body)) {
        PyErr_SetString(PyExc_TypeError, "body must be bytes");
        return NULL;
    }
    const char *data = PyBytes_AS_STRING(body);
    Py_ssize_t size = PyBytes_GET_SIZE(body);
    if (size < 3 || data[0] != '{' || data[1] == '}' || memchr(data, '\n', (size_t)size)) {
        PyErr_SetString(PyExc_ValueError,
                        "body must be a JSON object with at least one member, on one line");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[3], &view, PyBUF_WRITABLE) < 0) {
        return NULL;
    }
    if (view.len < (Py_ssize_t)(N_STATE * sizeof(uint64_t))) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "state must map at least 48 bytes of writer.state");
        return NULL;
    }
    /* The stores to the mapping must stay in program order around the write: volatile. */
    volatile uint64_t *st = (volatile uint64_t *)view.buf;
    PyObject *result = NULL;

    if (take_lock((int)lock_fd) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    uint64_t offset = st[S_NEXT], end = st[S_END], indexed = st[S_INDEXED];
    if (st[S_DIRTY] || st[S_BASE] != (uint64_t)base) {
        PyBuffer_Release(&view);
        return PyLong_FromLong(-1); /* lock held: the caller resyncs */
    }
    /* The line is {"offset":N, + the body without its "{" + a newline: three pieces, one
     * writev, no copy of the body. */
    char prefix[PREFIX_LEN + 22];
    struct iovec iov[3] = {
        {prefix, (size_t)offset_prefix(prefix, offset)},
        {(char *)data + 1, (size_t)size - 1},
        {"\n", 1},
    };
    uint64_t line_size = iov[0].iov_len + iov[1].iov_len + 1;
    st[S_DIRTY] = 1;
    if (writev_all((int)seg_fd, iov, 3) < 0) {
        goto undo;
    }
    if (end - indexed >= (uint64_t)interval) {
        uint32_t rel = (uint32_t)(offset - (uint64_t)base), pos = (uint32_t)end;
        unsigned char entry[8];
        for (int i = 0; i < 4; i++) { /* INDEX_ENTRY: struct "<II" */
            entry[i] = (unsigned char)(rel >> (8 * i));
            entry[4 + i] = (unsigned char)(pos >> (8 * i));
        }
        struct iovec one = {entry, sizeof(entry)};
        if (writev_all((int)idx_fd, &one, 1) < 0) {
            goto undo;
        }
        st[S_INDEXED] = end;
    }
    end += line_size;
    st[S_NEXT] = offset + 1;
    st[S_END] = end;
    st[S_DIRTY] = 0;
    PyBuffer_Release(&view);
    if (end >= (uint64_t)segment_bytes) { /* lock held: the caller rolls */
        result = PyLong_FromLongLong(-2 - (long long)offset);
        if (result == NULL) {
            flock((int)lock_fd, LOCK_UN);
        }
        return result;
    }
    if (flock((int)lock_fd, LOCK_UN) < 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromUnsignedLongLong(offset);

undo: { /* as PartitionWriter._undo_write: cut what landed; the dirty flag stays raised */
    struct stat info; /* (the OSError set above stays: these calls do not touch it) */
    if (fstat((int)seg_fd, &info) == 0 && (uint64_t)info.st_size > end) {
        (void)!ftruncate((int)seg_fd, (off_t)end);
    }
}
    PyBuffer_Release(&view);
    flock((int)lock_fd, LOCK_UN);
    return result;
}

static PyMethodDef methods[] = {
    {"append", (PyCFunction)(void (*)(void))append, METH_FASTCALL,
     "append(lock_fd, seg_fd, idx_fd, state, body, base, interval, segment_bytes)"
     " -> offset, or -1 / -2 - offset with the lock still held (see the module's source)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "level_4_hard.file_kafka._appender",
    "The partition writer's per-record append in C (see _appender.c).", -1, methods, NULL,
    NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__appender(void)
{
    return PyModule_Create(&module_def);
}
