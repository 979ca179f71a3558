/* common._speedups: the hottest paths of common.events and common.base_eventbus, in C.
 *
 * Why: creating an Event is on the path of every emit, and validating one is on the path of
 * every replayed line. In Python each costs about 150 and 550 ns (an object allocation, eight
 * slot stores, a clock read and a counter; six dict lookups, type checks and a timestamp
 * parse); here about 40 and 120 ns. Everything else about Event -- the class, its slots, the
 * wire format -- stays in events.py, which remains the reference: the pure Python versions
 * are kept there, are used when this module cannot be built or EDA_PURE_PYTHON=1 is set, and
 * tests hold the two equal (tests/test_speedups.py).
 *
 * Event.from_json (the codec and from_dict in one call) is here for replay's sake.
 * The bus's delivery hook (BaseEventBus._deliver: breadth-first re-entrancy per thread) and its
 * dispatch loop (_dispatch: skip cancelled, claim once-subscriptions, isolate errors) are here
 * too, for the same reason: in Python their bookkeeping cost more than the Event itself. They
 * call back into the bus's Python methods for everything rare (_remove, _listener_failed), so
 * the semantics stay written once, in base_eventbus.py, where the reference versions live.
 *
 * events.py calls setup() once with the Event class, its id counter, the set of already
 * validated names, the codec's loads and the Python from_json; base_eventbus.py calls
 * setup_bus() with Subscription, deque and the Python emit. This module then reads and writes
 * slots by their offsets, which the setups read from the classes' own slot descriptors (so a
 * renamed or removed slot makes them fail loudly at import).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <time.h>

#ifdef Py_T_OBJECT_EX
#define SLOT_TYPE Py_T_OBJECT_EX
#else
#define SLOT_TYPE T_OBJECT_EX
#endif

enum { S_NAME, S_DATA, S_VERSION, S_CORR, S_ID, S_ISO, S_SEQ, S_NS, N_SLOTS };
static const char *slot_names[N_SLOTS] = {
    "_name", "_data", "_version", "_corr", "_id", "_iso", "_seq", "_ns",
};

static PyTypeObject *event_type;     /* common.events.Event */
static PyObject *counter;            /* its itertools.count: ids stay unique with Python's */
static PyObject *known_names;        /* set of names validated once (common.patterns) */
static PyObject *json_loads;         /* orjson.loads, the codec events.py chose */
static PyObject *py_from_json;       /* Event.from_json in Python: it reports bad input */
static Py_ssize_t offsets[N_SLOTS];
static PyObject *k_checked;          /* "_from_dict_checked": the thorough path, in Python */
static PyObject *k_event, *k_id, *k_data, *k_timestamp, *k_version, *k_corr;
static PyObject *int_zero, *int_one;

/* What every entry point checks first: its number of arguments, and that its setup ran.
 * Non-zero (with the exception set) when the call cannot go on. */
static int
bad_call(Py_ssize_t nargs, Py_ssize_t expected, const char *signature, const void *configured,
         const char *setup_name)
{
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", signature, expected,
                     nargs);
        return 1;
    }
    if (configured == NULL) {
        PyErr_Format(PyExc_RuntimeError, "common._speedups.%s() was not called", setup_name);
        return 1;
    }
    return 0;
}

/* A new Event holding new references to ``values``, one per slot (in slot_names' order). */
static PyObject *
build_event(PyObject *const values[N_SLOTS])
{
    /* Zeroed and tracked by the GC; nothing runs between the allocation and the stores. */
    PyObject *event = event_type->tp_alloc(event_type, 0);
    if (event == NULL)
        return NULL;
    for (int i = 0; i < N_SLOTS; i++)
        *(PyObject **)((char *)event + offsets[i]) = Py_NewRef(values[i]);
    return event;
}

static int
slot_offsets(PyObject *cls, const char **names, int n, Py_ssize_t *out)
{
    for (int i = 0; i < n; i++) {
        PyObject *descr = PyDict_GetItemString(((PyTypeObject *)cls)->tp_dict, names[i]);
        if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
            PyErr_Format(PyExc_TypeError, "%s has no slot %s", ((PyTypeObject *)cls)->tp_name,
                         names[i]);
            return -1;
        }
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type != SLOT_TYPE || (member->flags & READONLY)) {
            PyErr_Format(PyExc_TypeError, "%s.%s is not a plain object slot",
                         ((PyTypeObject *)cls)->tp_name, names[i]);
            return -1;
        }
        out[i] = member->offset;
    }
    return 0;
}

/* setup(Event, counter, known_names, loads, python_from_json) */
static PyObject *
setup(PyObject *module, PyObject *args)
{
    PyObject *cls, *cnt, *known, *loads, *reference;
    if (!PyArg_ParseTuple(args, "O!OO!OO:setup", &PyType_Type, &cls, &cnt, &PySet_Type, &known,
                          &loads, &reference))
        return NULL;
    Py_ssize_t found[N_SLOTS];
    if (slot_offsets(cls, slot_names, N_SLOTS, found) < 0)
        return NULL;
    memcpy(offsets, found, sizeof(offsets));
    /* The public read-only fields as read-only members over the private slots: reading
     * event.name costs a slot load instead of a call to a Python property (~8 vs ~40 ns),
     * for every listener. Writing still raises AttributeError. */
    static PyMemberDef fields[] = {
        {"name", SLOT_TYPE, 0, READONLY, "what happened, e.g. 'order.created'"},
        {"data", SLOT_TYPE, 0, READONLY, "the facts: a JSON object (treat it as read-only)"},
        {"version", SLOT_TYPE, 0, READONLY, "the schema version of data"},
        {"correlation_id", SLOT_TYPE, 0, READONLY, "ties the events of one process together"},
    };
    static const int field_slots[] = {S_NAME, S_DATA, S_VERSION, S_CORR};
    for (int i = 0; i < 4; i++) {
        fields[i].offset = found[field_slots[i]];
        PyObject *descr = PyDescr_NewMember((PyTypeObject *)cls, &fields[i]);
        if (descr == NULL || PyObject_SetAttrString(cls, fields[i].name, descr) < 0) {
            Py_XDECREF(descr);
            return NULL;
        }
        Py_DECREF(descr);
    }
    Py_XSETREF(event_type, (PyTypeObject *)Py_NewRef(cls));
    Py_XSETREF(counter, Py_NewRef(cnt));
    Py_XSETREF(known_names, Py_NewRef(known));
    Py_XSETREF(json_loads, Py_NewRef(loads));
    Py_XSETREF(py_from_json, Py_NewRef(reference));
    Py_RETURN_NONE;
}

/* new_event(name, data): a fresh event, as events.new_event (the caller validated name). */
static PyObject *
new_event(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (bad_call(nargs, 2, "new_event(name, data)", event_type, "setup"))
        return NULL;
    struct timespec now;
    if (clock_gettime(CLOCK_REALTIME, &now) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *seq = PyIter_Next(counter);
    if (seq == NULL)
        return NULL;
    PyObject *ns = PyLong_FromLongLong((long long)now.tv_sec * 1000000000LL + now.tv_nsec);
    PyObject *data = args[1] == Py_None ? PyDict_New() : Py_NewRef(args[1]);
    PyObject *event = NULL;
    if (ns != NULL && data != NULL) {
        /* name, data, version, correlation_id, id and ISO text (both made when asked for),
         * sequence number, clock */
        PyObject *values[N_SLOTS] = {args[0], data, int_one, Py_None, Py_None, Py_None, seq, ns};
        event = build_event(values);
    }
    Py_DECREF(seq);
    Py_XDECREF(ns);
    Py_XDECREF(data);
    return event;
}

static int
digits(const unsigned char *s, int n, int *value)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return 0;
        v = v * 10 + (s[i] - '0');
    }
    *value = v;
    return 1;
}

/* The form to_dict writes, "YYYY-MM-DDTHH:MM:SS.ffffffZ", with a real date and time.
 * Anything else goes to the thorough path (which accepts every ISO-8601 form
 * datetime.fromisoformat does): this check only has to be exact, never complete. */
static int
is_canonical_timestamp(PyObject *text)
{
    if (!PyUnicode_IS_ASCII(text) || PyUnicode_GET_LENGTH(text) != 27)
        return 0;
    const unsigned char *s = PyUnicode_1BYTE_DATA(text);
    int year, month, day, hour, minute, second, micros;
    if (s[4] != '-' || s[7] != '-' || s[10] != 'T' || s[13] != ':' || s[16] != ':' ||
        s[19] != '.' || s[26] != 'Z')
        return 0;
    if (!digits(s, 4, &year) || !digits(s + 5, 2, &month) || !digits(s + 8, 2, &day) ||
        !digits(s + 11, 2, &hour) || !digits(s + 14, 2, &minute) ||
        !digits(s + 17, 2, &second) || !digits(s + 20, 6, &micros))
        return 0;
    static const int month_days[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (year < 1 || month < 1 || month > 12 || day < 1 || hour > 23 || minute > 59 ||
        second > 59)
        return 0;
    int leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    return day <= month_days[month - 1] + (month == 2 && leap);
}

/* from_dict(cls, obj): Event.from_dict. The usual shape is checked and built here; anything
 * else (another class, a missing or mistyped field, a name not yet validated, another
 * timestamp form) is handed to the thorough Python path, which builds it or says what is
 * wrong. Both paths give equal events for the same input. */
static PyObject *
from_dict(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (bad_call(nargs, 2, "from_dict(cls, obj)", event_type, "setup"))
        return NULL;
    PyObject *obj = args[1];
    if (args[0] != (PyObject *)event_type || !PyDict_CheckExact(obj))
        goto thorough;
    PyObject *name = PyDict_GetItemWithError(obj, k_event);
    PyObject *id = name ? PyDict_GetItemWithError(obj, k_id) : NULL;
    PyObject *data = id ? PyDict_GetItemWithError(obj, k_data) : NULL;
    PyObject *stamp = data ? PyDict_GetItemWithError(obj, k_timestamp) : NULL;
    if (stamp == NULL) {
        if (PyErr_Occurred())
            return NULL;
        goto thorough;
    }
    PyObject *version = PyDict_GetItemWithError(obj, k_version);
    if (version == NULL) {
        if (PyErr_Occurred())
            return NULL;
        version = int_one;
    }
    PyObject *corr = PyDict_GetItemWithError(obj, k_corr);
    if (corr == NULL) {
        if (PyErr_Occurred())
            return NULL;
        corr = Py_None;
    }
    if (!PyUnicode_CheckExact(name) || !PyUnicode_CheckExact(id) ||
        PyUnicode_GET_LENGTH(id) == 0 || !PyDict_CheckExact(data) ||
        !PyLong_CheckExact(version) || (corr != Py_None && !PyUnicode_CheckExact(corr)) ||
        !PyUnicode_CheckExact(stamp) || !is_canonical_timestamp(stamp))
        goto thorough;
    int overflow;
    long v = PyLong_AsLongAndOverflow(version, &overflow);
    if (overflow < 0 || (overflow == 0 && v < 1)) {
        if (PyErr_Occurred())
            return NULL;
        goto thorough;
    }
    int known = PySet_Contains(known_names, name);
    if (known < 0)
        return NULL;
    if (!known)
        goto thorough;
    /* the nanoseconds (None) are converted from the ISO text on first use */
    PyObject *values[N_SLOTS] = {name, data, version, corr, id, stamp, int_zero, Py_None};
    return build_event(values);
thorough:
    return PyObject_CallMethodOneArg(args[0], k_checked, obj);
}

/* from_json(cls, text): Event.from_json, i.e. from_dict(loads(text)) without the two Python
 * calls between them. Text the codec rejects goes to the Python version, which raises the
 * InvalidEventError that says what is wrong. */
static PyObject *
from_json(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (bad_call(nargs, 2, "from_json(cls, text)", event_type, "setup"))
        return NULL;
    PyObject *obj = PyObject_CallOneArg(json_loads, args[1]);
    if (obj == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return NULL;
        PyErr_Clear();
        return PyObject_Vectorcall(py_from_json, args, 2, NULL);
    }
    PyObject *pair[2] = {args[0], obj};
    PyObject *event = from_dict(module, pair, 2);
    Py_DECREF(obj);
    return event;
}

/* ---- the bus: BaseEventBus._dispatch and _deliver ----------------------------------- */

enum { B_ACTIVE, B_ONCE, B_CALLBACK, N_SUB_SLOTS };
static const char *sub_slot_names[N_SUB_SLOTS] = {"active", "once", "callback"};
static Py_ssize_t sub_offsets[N_SUB_SLOTS];
static PyTypeObject *subscription_type;
static PyObject *deque_type;
static PyObject *k_busy, *k_remove, *k_listener_failed, *k_append, *k_popleft;
static PyObject *k_matches, *k_sink, *k_event_log, *k_deliver;
static PyObject *py_emit;        /* BaseEventBus.emit in Python: every unusual call goes there */
static PyObject *deliver_method; /* this module's _deliver, as installed on BaseEventBus */

/* setup_bus(Subscription, deque, python_emit) */
static PyObject *
setup_bus(PyObject *module, PyObject *args)
{
    PyObject *cls, *dq, *emit;
    Py_ssize_t found[N_SUB_SLOTS];
    if (!PyArg_ParseTuple(args, "O!O!O:setup_bus", &PyType_Type, &cls, &PyType_Type, &dq,
                          &emit))
        return NULL;
    if (slot_offsets(cls, sub_slot_names, N_SUB_SLOTS, found) < 0)
        return NULL;
    memcpy(sub_offsets, found, sizeof(sub_offsets));
    Py_XSETREF(subscription_type, (PyTypeObject *)Py_NewRef(cls));
    Py_XSETREF(deque_type, Py_NewRef(dq));
    Py_XSETREF(py_emit, Py_NewRef(emit));
    Py_RETURN_NONE;
}

/* A slot of a Subscription (the caller checked the type), borrowed; AttributeError if it was
 * never set. */
static PyObject *
sub_slot(PyObject *sub, int slot)
{
    PyObject *value = *(PyObject **)((char *)sub + sub_offsets[slot]);
    if (value == NULL)
        PyErr_Format(PyExc_AttributeError, "Subscription has no %s", sub_slot_names[slot]);
    return value;
}

/* ``bool(sub.<slot>)``: 1, 0, or -1 with an exception set. */
static int
sub_flag(PyObject *sub, int slot)
{
    PyObject *flag = sub_slot(sub, slot);
    if (flag == Py_True)
        return 1;
    if (flag == Py_False)
        return 0;
    return flag == NULL ? -1 : PyObject_IsTrue(flag);
}

/* The exception being raised, taken out of the error indicator, with its traceback. */
static PyObject *
take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

/* The loop of _dispatch: the number of listeners that failed, or -1 with an exception set
 * (a BaseException that is not an Exception, or a failure of _remove/_listener_failed). */
static Py_ssize_t
dispatch_loop(PyObject *bus, PyObject *event, PyObject *subscriptions)
{
    PyObject *seq = PySequence_Fast(subscriptions, "subscriptions must be a sequence");
    if (seq == NULL)
        return -1;
    Py_ssize_t failures = 0;
    /* A list could change size while listeners run: re-read the length every turn. */
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *sub = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyObject_TypeCheck(sub, subscription_type)) {
            PyErr_Format(PyExc_TypeError, "expected a Subscription, got %.100s",
                         Py_TYPE(sub)->tp_name);
            goto error;
        }
        Py_INCREF(sub);
        int truth = sub_flag(sub, B_ACTIVE);
        if (truth <= 0) {
            Py_DECREF(sub);
            if (truth < 0)
                goto error;
            continue;  /* cancelled before its turn came */
        }
        truth = sub_flag(sub, B_ONCE);
        if (truth != 0) {
            PyObject *claimed = truth < 0 ? NULL : PyObject_CallMethodOneArg(bus, k_remove, sub);
            truth = claimed ? PyObject_IsTrue(claimed) : -1;
            Py_XDECREF(claimed);
            if (truth <= 0) {
                Py_DECREF(sub);
                if (truth < 0)
                    goto error;
                continue;  /* another thread fired this once-subscription first */
            }
        }
        PyObject *callback = sub_slot(sub, B_CALLBACK);
        if (callback == NULL) {
            Py_DECREF(sub);
            goto error;
        }
        Py_INCREF(callback);
        PyObject *result = PyObject_CallOneArg(callback, event);
        Py_DECREF(callback);
        if (result != NULL) {
            Py_DECREF(result);
            Py_DECREF(sub);
            continue;
        }
        if (!PyErr_ExceptionMatches(PyExc_Exception)) {
            Py_DECREF(sub);  /* KeyboardInterrupt, SystemExit: propagate */
            goto error;
        }
        failures++;
        PyObject *exc = take_exception();
        PyObject *call[4] = {bus, event, sub, exc};
        PyObject *done = PyObject_VectorcallMethod(
            k_listener_failed, call, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_XDECREF(exc);
        Py_DECREF(sub);
        if (done == NULL)
            goto error;
        Py_DECREF(done);
    }
    Py_DECREF(seq);
    return failures;
error:
    Py_DECREF(seq);
    return -1;
}

/* dispatch(self, event, subscriptions) -> int: BaseEventBus._dispatch */
static PyObject *
dispatch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (bad_call(nargs, 3, "_dispatch(self, event, subscriptions)", subscription_type, "setup_bus"))
        return NULL;
    Py_ssize_t failures = dispatch_loop(args[0], args[1], args[2]);
    return failures < 0 ? NULL : PyLong_FromSsize_t(failures);
}

/* deliver(self, event, subscriptions): BaseEventBus._deliver. Per thread id, bus._busy holds
 * None while the thread dispatches, or the deque of what its listeners emitted meanwhile. */
static PyObject *
deliver(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (bad_call(nargs, 3, "_deliver(self, event, subscriptions)", subscription_type, "setup_bus"))
        return NULL;
    PyObject *bus = args[0], *event = args[1], *subscriptions = args[2];
    PyObject *busy = PyObject_GetAttr(bus, k_busy);
    if (busy == NULL)
        return NULL;
    if (!PyDict_Check(busy)) {
        PyErr_SetString(PyExc_TypeError, "bus._busy must be a dict");
        Py_DECREF(busy);
        return NULL;
    }
    PyObject *tid = PyLong_FromUnsignedLong(PyThread_get_thread_ident());
    if (tid == NULL) {
        Py_DECREF(busy);
        return NULL;
    }
    PyObject *result = NULL;
    PyObject *pending = PyDict_GetItemWithError(busy, tid);  /* borrowed */
    if (pending != NULL) {  /* re-entrant: queue it behind the current event */
        PyObject *queue = Py_NewRef(pending);
        if (queue == Py_None) {
            Py_SETREF(queue, PyObject_CallNoArgs(deque_type));
            if (queue != NULL && PyDict_SetItem(busy, tid, queue) < 0)
                Py_CLEAR(queue);
        }
        PyObject *item = queue ? PyTuple_Pack(2, event, subscriptions) : NULL;
        PyObject *appended = item ? PyObject_CallMethodOneArg(queue, k_append, item) : NULL;
        Py_XDECREF(item);
        Py_XDECREF(queue);
        if (appended != NULL) {
            Py_DECREF(appended);
            result = Py_NewRef(Py_None);
        }
        goto done;
    }
    if (PyErr_Occurred() || PyDict_SetItem(busy, tid, Py_None) < 0)
        goto done;
    int ok = dispatch_loop(bus, event, subscriptions) >= 0;
    while (ok) {
        pending = PyDict_GetItemWithError(busy, tid);
        if (pending == NULL || pending == Py_None) {
            ok = !PyErr_Occurred();
            break;
        }
        Py_ssize_t left = PyObject_Length(pending);
        if (left <= 0) {
            ok = left == 0;
            break;
        }
        PyObject *item = PyObject_CallMethodNoArgs(pending, k_popleft);
        if (item == NULL || !PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            if (item != NULL)
                PyErr_SetString(PyExc_TypeError, "a pending delivery must be (event, subs)");
            Py_XDECREF(item);
            ok = 0;
            break;
        }
        ok = dispatch_loop(bus, PyTuple_GET_ITEM(item, 0), PyTuple_GET_ITEM(item, 1)) >= 0;
        Py_DECREF(item);
    }
    /* The finally: this thread is no longer dispatching, whatever happened. */
    PyObject *exc = ok ? NULL : take_exception();
    if (PyDict_DelItem(busy, tid) < 0) {
        if (exc != NULL)
            PyErr_Clear();  /* the listener's exception matters more */
        else
            goto done;
    }
    if (exc != NULL) {
#if PY_VERSION_HEX >= 0x030C0000
        PyErr_SetRaisedException(exc);
#else
        PyErr_Restore(Py_NewRef(Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
#endif
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    Py_DECREF(tid);
    Py_DECREF(busy);
    return result;
}

/* emit(self, name, data=None, **meta) -> Event: BaseEventBus.emit for its usual call, a
 * name already seen and a dict (or no) payload; everything else -- metadata, a name not yet
 * matched, a payload to reject -- is handed to the Python emit, which does it all. */
static PyObject *
emit(PyObject *module, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (py_emit == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "common._speedups.setup_bus() was not called");
        return NULL;
    }
    if (nargs < 2 || nargs > 3 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0) ||
        !PyUnicode_CheckExact(args[1]))
        return PyObject_Vectorcall(py_emit, args, nargsf, kwnames);
    PyObject *bus = args[0], *name = args[1];
    PyObject *data = nargs == 3 ? args[2] : Py_None;
    if (data != Py_None && !PyDict_CheckExact(data))
        return PyObject_Vectorcall(py_emit, args, nargsf, kwnames);
    PyObject *matches = PyObject_GetAttr(bus, k_matches);
    if (matches == NULL)
        return NULL;
    PyObject *subs = PyDict_Check(matches) ? PyDict_GetItemWithError(matches, name) : NULL;
    Py_XINCREF(subs);
    Py_DECREF(matches);
    if (subs == NULL) {
        if (PyErr_Occurred())
            return NULL;
        return PyObject_Vectorcall(py_emit, args, nargsf, kwnames);  /* match it there */
    }
    PyObject *pair[2] = {name, data};
    PyObject *event = new_event(module, pair, 2);
    PyObject *sink = event ? PyObject_GetAttr(bus, k_sink) : NULL;
    if (sink == NULL)
        goto fail;
    if (sink != Py_None) {
        PyObject *written = PyObject_CallOneArg(sink, event);
        Py_DECREF(sink);
        if (written == NULL)
            goto fail;
        Py_DECREF(written);
    }
    else {
        Py_DECREF(sink);
    }
    PyObject *log = PyObject_GetAttr(bus, k_event_log);
    PyObject *appended = log ? PyObject_CallMethodOneArg(log, k_append, event) : NULL;
    Py_XDECREF(log);
    if (appended == NULL)
        goto fail;
    Py_DECREF(appended);
    PyObject *call[3] = {bus, event, subs};
    PyObject *delivered;
    if (_PyType_Lookup(Py_TYPE(bus), k_deliver) == deliver_method)
        delivered = deliver(module, call, 3);  /* the base hook: no method lookup */
    else
        delivered = PyObject_VectorcallMethod(k_deliver, call, 3, NULL);  /* a variant's */
    if (delivered == NULL)
        goto fail;
    Py_DECREF(delivered);
    Py_DECREF(subs);
    return event;
fail:
    Py_XDECREF(event);
    Py_DECREF(subs);
    return NULL;
}

static PyMethodDef methods[] = {
    {"setup", setup, METH_VARARGS, "setup(Event, counter, known_names, loads, from_json)"},
    {"new_event", (PyCFunction)(void (*)(void))new_event, METH_FASTCALL,
     "new_event(name, data) -> Event"},
    {"from_dict", (PyCFunction)(void (*)(void))from_dict, METH_FASTCALL,
     "from_dict(cls, obj) -> Event"},
    {"from_json", (PyCFunction)(void (*)(void))from_json, METH_FASTCALL,
     "from_json(cls, text) -> Event"},
    {"setup_bus", setup_bus, METH_VARARGS, "setup_bus(Subscription, deque, python_emit)"},
    {NULL, NULL, 0, NULL},
};

/* Bound like Python functions (instancemethod), so that they can be BaseEventBus methods. */
static PyMethodDef bus_methods[] = {
    {"_dispatch", (PyCFunction)(void (*)(void))dispatch, METH_FASTCALL,
     "_dispatch(self, event, subscriptions) -> int: BaseEventBus._dispatch in C"},
    {"_deliver", (PyCFunction)(void (*)(void))deliver, METH_FASTCALL,
     "_deliver(self, event, subscriptions): BaseEventBus._deliver in C"},
    {"_emit", (PyCFunction)(void (*)(void))emit, METH_FASTCALL | METH_KEYWORDS,
     "emit(self, name, data=None, **meta) -> Event: BaseEventBus.emit in C"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "common._speedups",
    "C versions of the hottest paths; see common/speedups.py.", -1, methods, NULL, NULL, NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    struct {
        PyObject **slot;
        const char *text;
    } names[] = {
        {&k_checked, "_from_dict_checked"}, {&k_event, "event"}, {&k_id, "id"},
        {&k_data, "data"}, {&k_timestamp, "timestamp"}, {&k_version, "version"},
        {&k_corr, "correlation_id"}, {&k_busy, "_busy"}, {&k_remove, "_remove"},
        {&k_listener_failed, "_listener_failed"}, {&k_append, "append"},
        {&k_popleft, "popleft"}, {&k_matches, "_matches"}, {&k_sink, "_sink"},
        {&k_event_log, "event_log"}, {&k_deliver, "_deliver"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if ((*names[i].slot = PyUnicode_InternFromString(names[i].text)) == NULL)
            return NULL;
    if ((int_zero = PyLong_FromLong(0)) == NULL || (int_one = PyLong_FromLong(1)) == NULL)
        return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    for (PyMethodDef *def = bus_methods; def->ml_name != NULL; def++) {
        PyObject *func = PyCFunction_NewEx(def, NULL, NULL);
        PyObject *method = func ? PyInstanceMethod_New(func) : NULL;
        Py_XDECREF(func);
        if (method == NULL || PyModule_AddObject(module, def->ml_name + 1, method) < 0) {
            Py_XDECREF(method);
            Py_DECREF(module);
            return NULL;
        }
        if (def->ml_meth == (PyCFunction)(void (*)(void))deliver)
            deliver_method = method; /* borrowed: the module keeps it */
    }
    return module;
}
