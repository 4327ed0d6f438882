/* loopwatch._speedups: the hot path in C (optional; loopwatch falls back to pure Python).
 *
 * What runs for every loop step and every request, and nothing else:
 *
 *   handle_run(Handle, TimerHandle)
 *                          a method descriptor that replaces asyncio's Handle._run. It runs
 *                          the handle's one-line body itself (context.run(callback, *args),
 *                          reading the fields from their slots) and times it; an exception
 *                          from the callback is handed to the original Handle._run, which
 *                          reports it exactly as always (asyncio)
 *   StepState              the base of Monitor: the fields every step writes, as C doubles
 *   TimedCoroutine         wraps a task's coroutine and times each step through the
 *                          am_send slot, so the C Task keeps its fast path (uvloop)
 *   TaskFactory            makes those tasks for plain coroutines; all else goes to the
 *                          pure-Python factory (uvloop)
 *   unwrap_get_coro()      makes Task.get_coro() return a TimedCoroutine's own coroutine,
 *                          once per process, so no task needs a get_coro of its own (uvloop)
 *   RequestOwner           one request's owner: loop time, status, end of body; calling it
 *                          is the request's ASGI send (it notes the status and the end)
 *   Totals                 running totals of one (method, route): bucket counts and sums
 *   finish()               a request's end: its loop time and its record in those totals
 *   RequestPath            what LoopWatchMiddleware.__call__ hands each request to: a
 *                          measured HTTP request becomes a RequestCall, the awaitable that
 *                          runs the app under the request's owner (the middleware's own
 *                          coroutine, without a Python frame); all else goes to that coroutine
 *   FinalSend              the server's send of a request's last body, run with the request
 *                          out of the context (a timer the server starts there copies it)
 *   AsgiEntry              the middleware's __call__: its RequestPath while there is one,
 *                          else its coroutine; to inspect, an async def like that coroutine
 *
 * Each does what its pure-Python twin in _hooks.py, _accel.py, _middleware.py and
 * _metrics.py does; tests/test_speedups.py runs both on the same inputs. Unlike the twins,
 * a failure inside the C accounting is reported as unraisable, never raised into the step.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "structmember.h"
#include <time.h>

#if defined(__GNUC__) || defined(__clang__)
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#define NOINLINE __attribute__((noinline))  /* slow paths: out of the hot code's way */
#else
#define LIKELY(x) (x)
#define UNLIKELY(x) (x)
#define NOINLINE
#endif

/* The pending exception, set aside around loopwatch's own work and put back after it (as
 * PyErr_Fetch/PyErr_Restore, without their cost when there is none, the usual case). */
typedef struct {
    PyObject *type, *value, *tb;
} Pending;

static inline void
pending_save(Pending *p)
{
    p->type = p->value = p->tb = NULL;
    if (UNLIKELY(PyErr_Occurred() != NULL)) {
        PyErr_Fetch(&p->type, &p->value, &p->tb);
    }
}

static inline void
pending_restore(Pending *p)
{
    if (UNLIKELY(p->type != NULL)) {
        PyErr_Restore(p->type, p->value, p->tb);
    }
    else if (UNLIKELY(PyErr_Occurred() != NULL)) {
        PyErr_Clear(); /* as PyErr_Restore(NULL, NULL, NULL) */
    }
}

/* a == b for two str, by identity, length, kind and bytes (PyUnicode_Compare otherwise) */
static inline int
str_eq(PyObject *a, PyObject *b)
{
    if (a == b) {
        return 1;
    }
    if (PyUnicode_GET_LENGTH(a) != PyUnicode_GET_LENGTH(b)) {
        return 0;
    }
    if (PyUnicode_IS_READY(a) && PyUnicode_IS_READY(b) &&
            PyUnicode_KIND(a) == PyUnicode_KIND(b)) {
        return memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b),
                      (size_t)PyUnicode_GET_LENGTH(a) * PyUnicode_KIND(a)) == 0;
    }
    int cmp = PyUnicode_Compare(a, b);
    if (cmp == -1 && PyErr_Occurred()) {
        PyErr_Clear();
    }
    return cmp == 0;
}

/* `obj` (a str, perhaps a subclass) equals the exact str `s` */
static inline int
str_is(PyObject *obj, PyObject *s)
{
    return PyUnicode_CheckExact(obj) ? str_eq(obj, s) : PyUnicode_Compare(obj, s) == 0;
}

/* str `s` starts with str `prefix` */
static inline int
str_startswith(PyObject *s, PyObject *prefix)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(prefix);
    if (n > PyUnicode_GET_LENGTH(s)) {
        return 0;
    }
    if (PyUnicode_IS_READY(s) && PyUnicode_IS_READY(prefix) &&
            PyUnicode_KIND(s) == PyUnicode_KIND(prefix)) {
        return memcmp(PyUnicode_DATA(s), PyUnicode_DATA(prefix),
                      (size_t)n * PyUnicode_KIND(s)) == 0;
    }
    Py_ssize_t match = PyUnicode_Tailmatch(s, prefix, 0, PY_SSIZE_T_MAX, -1);
    if (match < 0) {
        PyErr_Clear();
        return 0;
    }
    return match != 0;
}

/* -- state set once by configure() ------------------------------------------------------ */

static PyObject *owner_var;      /* the ContextVar holding the current owner */
static PyObject *original_run;   /* asyncio.events.Handle._run */
static PyObject *current_task;   /* asyncio.current_task */
static PyObject *labeler;        /* labeler(owner) -> (method, route) */
static PyObject *zero_float;

static PyObject *s_step_start, *s_busy, *s_threshold, *s_on_block, *s_monitor_attr,
    *s_loop, *s_context, *s_callback, *s_get, *s_type, *s_status, *s_more_body,
    *s_response_start, *s_close, *s_throw, *s_await, *s_run, *s_args, *s_get_coro,
    *s_context_kw, *kw_loop, *kw_loop_context, *s_route, *s_root_path, *s_method,
    *s_http, *s_path, *s_empty, *s_record_first, *s_own_call, *s_serve;

/* The clock of time.perf_counter(), as the watchdog thread reads it. */
#if defined(__linux__)
static inline double
now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    /* as CPython's _PyTime_AsSecondsDouble: the same double as perf_counter() */
    long long ns = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    if (ns % 1000000000LL == 0) {
        return (double)(ns / 1000000000LL);
    }
    return (double)ns / 1e9;
}
#define NOW_FAILED(t) 0
#else
static PyObject *perf_counter;
static inline double
now(void)
{
    PyObject *t = PyObject_CallNoArgs(perf_counter);
    if (t == NULL) {
        return -1.0;
    }
    double d = PyFloat_AsDouble(t);
    Py_DECREF(t);
    return d;
}
#define NOW_FAILED(t) ((t) == -1.0 && PyErr_Occurred())
#endif

/* -- StepState: the monitor's per-step fields, as C doubles ------------------------------ */

/* The base of Monitor: what every step reads and writes, without a Python object each. */
typedef struct {
    PyObject_HEAD
    double step_start;
    double busy;
    double threshold;
    char active;
    double closing_start;   /* _closing: the step in which a request finished ... */
    PyObject *closing_owner; /* ... and its owner (NULL: none) */
} StepState;

/* _closing: (start of the step in which the last request finished, its owner), for a block
 * event of that step to name the request (Monitor.note_finished and finish() set it). */
static PyObject *
ss_get_closing(StepState *self, void *Py_UNUSED(closure))
{
    return Py_BuildValue("(dO)", self->closing_start,
                         self->closing_owner ? self->closing_owner : Py_None);
}

static int
ss_set_closing(StepState *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL || !PyTuple_Check(value) || PyTuple_GET_SIZE(value) != 2 ||
            !PyFloat_Check(PyTuple_GET_ITEM(value, 0))) {
        PyErr_SetString(PyExc_TypeError,
                        "_closing must be a (start, owner) tuple, start a float");
        return -1;
    }
    PyObject *owner = PyTuple_GET_ITEM(value, 1);
    self->closing_start = PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(value, 0));
    Py_XSETREF(self->closing_owner, owner == Py_None ? NULL : Py_NewRef(owner));
    return 0;
}

static PyGetSetDef ss_getset[] = {
    {"_closing", (getter)ss_get_closing, (setter)ss_set_closing,
     "(start of the step in which the last request finished, its owner).", NULL},
    {NULL},
};

static int
ss_traverse(StepState *self, visitproc visit, void *arg)
{
    Py_VISIT(self->closing_owner);
    return 0;
}

static int
ss_clear(StepState *self)
{
    Py_CLEAR(self->closing_owner);
    return 0;
}

static void
ss_dealloc(StepState *self)
{
    PyObject_GC_UnTrack(self);
    ss_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The request finishing in the step that started at `start` (a new owner for _closing). */
static inline void
ss_note_closing(StepState *self, double start, PyObject *owner)
{
    self->closing_start = start;
    if (self->closing_owner != owner) {
        Py_XSETREF(self->closing_owner, Py_NewRef(owner));
    }
}

static PyMemberDef ss_members[] = {
    {"step_start", T_DOUBLE, offsetof(StepState, step_start), 0,
     "perf_counter() at the start of the running step (0: none)."},
    {"busy", T_DOUBLE, offsetof(StepState, busy), 0, "Seconds the loop ran steps."},
    {"threshold", T_DOUBLE, offsetof(StepState, threshold), 0, "Block threshold (seconds)."},
    {"active", T_BOOL, offsetof(StepState, active), 0, "Whether the monitor is running."},
    {NULL},
};

static PyTypeObject StepStateType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._speedups.StepState",
    .tp_doc = "The fields a loop monitor's step hooks write (base class of Monitor).",
    .tp_basicsize = sizeof(StepState),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_members = ss_members,
    .tp_getset = ss_getset,
    .tp_traverse = (traverseproc)ss_traverse,
    .tp_clear = (inquiry)ss_clear,
    .tp_dealloc = (destructor)ss_dealloc,
};

/* The monitor's StepState, if it is one (else NULL). The type last found to be one is held,
 * so that the usual case (a Monitor, a subclass) is one comparison. */
static PyTypeObject *state_type_seen;

static NOINLINE StepState *
as_state_slow(PyObject *mon)
{
    if (!PyObject_TypeCheck(mon, &StepStateType)) {
        return NULL;
    }
    Py_XSETREF(state_type_seen, (PyTypeObject *)Py_NewRef(Py_TYPE(mon)));
    return (StepState *)mon;
}

static inline StepState *
as_state(PyObject *mon)
{
    if (LIKELY(Py_TYPE(mon) == state_type_seen)) {
        return (StepState *)mon;
    }
    return as_state_slow(mon);
}

#define AS_STATE(mon) as_state(mon)

/* -- RequestOwner ------------------------------------------------------------------------ */

typedef struct RequestOwner {
    PyObject_HEAD
    double busy;
    double ended;
    long status;
    PyObject *scope;
    PyObject *root_path;
    PyObject *send;
    PyObject *method;
    PyObject *route;
    PyObject *token;        /* of the context variable, set by its RequestCall (or NULL) */
    PyObject *weakreflist;
    vectorcallfunc vectorcall;
    void *in_flight;        /* the InFlight it is linked in (which holds it), or NULL */
    struct RequestOwner *prev, *next; /* its neighbours there */
} RequestOwner;

static PyTypeObject RequestOwnerType;
static PyObject *final_send(RequestOwner *owner, PyObject *awaitable);

static int
add_float_attr(PyObject *obj, PyObject *name, double dt)
{
    PyObject *old = PyObject_GetAttr(obj, name);
    if (old == NULL) {
        return -1;
    }
    double value = PyFloat_AsDouble(old);
    Py_DECREF(old);
    if (value == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    PyObject *sum = PyFloat_FromDouble(value + dt);
    if (sum == NULL) {
        return -1;
    }
    int rc = PyObject_SetAttr(obj, name, sum);
    Py_DECREF(sum);
    return rc;
}

/* After a step of dt seconds that started at t0: the monitor's busy time, the owner's
 * loop time, and a block event for a step over the threshold. `what` is the callback for
 * the event (NULL: the current task, looked up only for a block). */
/* A step over the threshold: the monitor's on_block(t0, dt, owner, what). */
static NOINLINE int
report_block(PyObject *mon, double t0, double dt, PyObject *owner, PyObject *what)
{
    PyObject *task = NULL;
    if (what == NULL) {
        task = PyObject_CallNoArgs(current_task);
        if (task == NULL) {
            return -1;
        }
        what = task;
    }
    PyObject *a = PyFloat_FromDouble(t0);
    PyObject *b = PyFloat_FromDouble(dt);
    PyObject *r = NULL;
    if (a != NULL && b != NULL) {
        PyObject *args[5] = {mon, a, b, owner, what};
        r = PyObject_VectorcallMethod(s_on_block, args,
                                      5 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    }
    Py_XDECREF(a);
    Py_XDECREF(b);
    Py_XDECREF(task);
    if (r == NULL) {
        return -1;
    }
    Py_DECREF(r);
    return 0;
}

static NOINLINE int
account_slow(PyObject *mon, double t0, double dt, PyObject *owner, PyObject *what)
{
    double threshold;
    StepState *state = AS_STATE(mon);
    if (state != NULL) {
        state->step_start = 0.0;
        state->busy += dt;
        threshold = state->threshold;
    }
    else {
        if (PyObject_SetAttr(mon, s_step_start, zero_float) < 0 ||
                add_float_attr(mon, s_busy, dt) < 0) {
            return -1;
        }
        PyObject *thr = PyObject_GetAttr(mon, s_threshold);
        if (thr == NULL) {
            return -1;
        }
        threshold = PyFloat_AsDouble(thr);
        Py_DECREF(thr);
        if (threshold == -1.0 && PyErr_Occurred()) {
            return -1;
        }
    }
    if (owner != Py_None) {
        if (Py_IS_TYPE(owner, &RequestOwnerType)) {
            ((RequestOwner *)owner)->busy += dt;
        }
        else if (add_float_attr(owner, s_busy, dt) < 0) {
            return -1;
        }
    }
    if (dt < threshold) {
        return 0;
    }
    return report_block(mon, t0, dt, owner, what);
}

static inline int
account(PyObject *mon, double t0, double dt, PyObject *owner, PyObject *what)
{
    StepState *state = as_state(mon);
    if (LIKELY(state != NULL && (owner == Py_None || Py_IS_TYPE(owner, &RequestOwnerType)))) {
        state->step_start = 0.0;
        state->busy += dt;
        if (owner != Py_None) {
            ((RequestOwner *)owner)->busy += dt;
        }
        if (LIKELY(dt < state->threshold)) {
            return 0;
        }
        return report_block(mon, t0, dt, owner, what);
    }
    return account_slow(mon, t0, dt, owner, what);
}

static NOINLINE int
start_step_slow(PyObject *mon, double t)
{
    PyObject *start = PyFloat_FromDouble(t);
    if (start == NULL) {
        return -1;
    }
    int rc = PyObject_SetAttr(mon, s_step_start, start);
    Py_DECREF(start);
    return rc;
}

static inline int
start_step(PyObject *mon, double *t0)
{
    double t = now();
    if (UNLIKELY(NOW_FAILED(t))) {
        return -1;
    }
    *t0 = t;
    StepState *state = as_state(mon);
    if (LIKELY(state != NULL)) {
        state->step_start = t;
        return 0;
    }
    return start_step_slow(mon, t);
}

static double
elapsed(double t0)
{
    double t = now();
    if (NOW_FAILED(t)) {
        PyErr_Clear();
        return 0.0;
    }
    return t - t0;
}

/* The owner in the current context (a new reference; None outside any). */
static PyObject *
current_owner_value(void)
{
    PyObject *owner = NULL;
    if (PyContextVar_Get(owner_var, Py_None, &owner) < 0) {
        return NULL;
    }
    return owner;
}

/* -- Handle._run (asyncio) ---------------------------------------------------------------- */

static int inline_run; /* configure(): the original's body is the one this file runs */

/* Stands in for a handle's context while the original Handle._run reports an exception:
 * its first run() raises that very exception (traceback and all) inside the original's try.
 * Any later run() is the context's own: from Python 3.12 on the loop runs a custom
 * exception handler in the handle's context (handle.get_context().run(handler, ...)). */
typedef struct {
    PyObject_HEAD
    PyObject *exc;          /* NULL once raised */
    PyObject *ctx;          /* the handle's own context */
} Reraiser;

static PyObject *
reraiser_run(Reraiser *self, PyObject *const *args, Py_ssize_t n)
{
    PyObject *exc = self->exc;
    if (exc == NULL) {
        PyObject *run = PyObject_GetAttr(self->ctx, s_run);
        if (run == NULL) {
            return NULL;
        }
        PyObject *result = PyObject_Vectorcall(run, args, (size_t)n, NULL);
        Py_DECREF(run);
        return result;
    }
    self->exc = NULL;
    PyErr_Restore(Py_NewRef(Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
    return NULL;
}

static PyObject *
reraiser_getattro(Reraiser *self, PyObject *name)
{
    PyObject *value = PyObject_GenericGetAttr((PyObject *)self, name);
    if (value == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        value = PyObject_GetAttr(self->ctx, name); /* copy(), get(), ...: the context's */
    }
    return value;
}

static void
reraiser_dealloc(Reraiser *self)
{
    Py_XDECREF(self->exc);
    Py_XDECREF(self->ctx);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef reraiser_methods[] = {
    {"run", (PyCFunction)(void (*)(void))reraiser_run, METH_FASTCALL, NULL},
    {NULL},
};

static PyTypeObject ReraiserType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._speedups.Reraiser",
    .tp_basicsize = sizeof(Reraiser),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)reraiser_dealloc,
    .tp_getattro = (getattrofunc)reraiser_getattro,
    .tp_methods = reraiser_methods,
};

/* The Handle slots the hook reads, straight from the instance where its type is one whose
 * slots handle_run() found (Handle, TimerHandle): an attribute lookup less each. */
enum { FIELD_CONTEXT, FIELD_CALLBACK, FIELD_LOOP, FIELD_ARGS, N_FIELDS };
static PyObject **field_names[N_FIELDS] = {&s_context, &s_callback, &s_loop, &s_args};
static Py_ssize_t field_offsets[N_FIELDS];
static PyTypeObject *slot_types[2]; /* held */

/* handle.<field> (a new reference). */
static inline PyObject *
read_field(PyObject *handle, int field)
{
    PyTypeObject *type = Py_TYPE(handle);
    if (LIKELY(type == slot_types[0] || type == slot_types[1])) {
        PyObject *value = *(PyObject **)((char *)handle + field_offsets[field]);
        if (LIKELY(value != NULL)) {
            return Py_NewRef(value);
        }
    }
    return PyObject_GetAttr(handle, *field_names[field]);
}

/* Whether `type` keeps each field in a plain object slot (then its offset). */
static int
find_slots(PyTypeObject *type, Py_ssize_t *offsets)
{
    for (int i = 0; i < N_FIELDS; i++) {
        PyObject *descr = _PyType_Lookup(type, *field_names[i]);
        if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
            return 0;
        }
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type != T_OBJECT_EX || (member->flags & READONLY)) {
            return 0;
        }
        offsets[i] = member->offset;
    }
    return 1;
}

/* What the original Handle._run does, without entering the interpreter for it:
 * self._context.run(self._callback, *self._args). An exception other than SystemExit and
 * KeyboardInterrupt goes to the original itself, which reports it exactly as it always
 * does (message, handle, source traceback): for that one call the handle's context is a
 * Reraiser that raises it again inside the original's try. */
static PyObject *report_failure(PyObject *handle, PyObject *ctx);

static PyObject *
run_handle(PyObject *handle, PyObject *ctx, PyObject *callback, PyObject **owner)
{
    if (!inline_run) {
        return PyObject_CallOneArg(original_run, handle);
    }
    PyObject *args = read_field(handle, FIELD_ARGS);
    if (UNLIKELY(args == NULL || !PyTuple_Check(args))) {
        Py_XDECREF(args);
        PyErr_Clear();
        return PyObject_CallOneArg(original_run, handle);
    }
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    PyObject *result;
    if (LIKELY(PyContext_CheckExact(ctx))) {
        /* ctx.run(callback, *args) as Context.run does it: enter, call, exit; the owner is
         * read on the way out, while still in the context */
        if (UNLIKELY(PyContext_Enter(ctx) < 0)) {
            result = NULL;
        }
        else {
            result = PyObject_Vectorcall(callback, &PyTuple_GET_ITEM(args, 0), (size_t)n, NULL);
            if (owner != NULL) {
                Pending pending;
                pending_save(&pending);
                *owner = current_owner_value();
                if (*owner == NULL) {
                    PyErr_Clear(); /* not found: the caller looks again, outside */
                }
                pending_restore(&pending);
            }
            if (UNLIKELY(PyContext_Exit(ctx) < 0)) {
                Py_CLEAR(result);
            }
        }
    }
    else if (n <= 6) {
        PyObject *stack[8];
        stack[0] = ctx;
        stack[1] = callback;
        for (Py_ssize_t i = 0; i < n; i++) {
            stack[i + 2] = PyTuple_GET_ITEM(args, i);
        }
        result = PyObject_VectorcallMethod(s_run, stack, (size_t)(n + 2), NULL);
    }
    else {
        Py_DECREF(args);
        return PyObject_CallOneArg(original_run, handle);
    }
    Py_DECREF(args);
    if (LIKELY(result != NULL)) {
        Py_DECREF(result);
        Py_RETURN_NONE;
    }
    if (PyErr_ExceptionMatches(PyExc_SystemExit) ||
            PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
        return NULL;
    }
    return report_failure(handle, ctx);
}

/* The callback's exception (pending), reported by the original Handle._run. */
static NOINLINE PyObject *
report_failure(PyObject *handle, PyObject *ctx)
{
    PyObject *result;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value == NULL) { /* a callable that failed without an exception: SystemError */
        Py_XDECREF(type);
        Py_XDECREF(tb);
        PyErr_SetString(PyExc_SystemError, "Handle callback failed without an exception");
        return NULL;
    }
    if (tb != NULL) {
        PyException_SetTraceback(value, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    Reraiser *reraiser = PyObject_New(Reraiser, &ReraiserType);
    if (reraiser == NULL) {
        Py_DECREF(value);
        return NULL;
    }
    reraiser->exc = value; /* the reference from the fetch */
    reraiser->ctx = Py_NewRef(ctx);
    if (PyObject_SetAttr(handle, s_context, (PyObject *)reraiser) < 0) {
        Py_DECREF(reraiser);
        return NULL;
    }
    Py_DECREF(reraiser);
    result = PyObject_CallOneArg(original_run, handle);
    PyErr_Fetch(&type, &value, &tb);
    if (PyObject_SetAttr(handle, s_context, ctx) < 0) {
        PyErr_WriteUnraisable(handle);
    }
    PyErr_Restore(type, value, tb);
    return result;
}

/* ctx.get(owner_var) (a new reference), without a method call where it is a Context: enter,
 * read, leave. */
static NOINLINE PyObject *
context_owner(PyObject *ctx)
{
    if (PyContext_CheckExact(ctx) && PyContext_Enter(ctx) == 0) {
        PyObject *owner = current_owner_value();
        if (PyContext_Exit(ctx) < 0) {
            Py_CLEAR(owner);
        }
        return owner;
    }
    PyErr_Clear(); /* no Context, or one entered elsewhere */
    return PyObject_CallMethodOneArg(ctx, s_get, owner_var);
}

static PyObject *
timed_run(PyObject *handle, PyObject *Py_UNUSED(ignored))
{
    /* The handle's fields, read once: for the run and for the accounting after it. */
    PyObject *ctx = read_field(handle, FIELD_CONTEXT);
    PyObject *callback = ctx ? read_field(handle, FIELD_CALLBACK) : NULL;
    PyObject *loop = callback ? read_field(handle, FIELD_LOOP) : NULL;
    if (UNLIKELY(loop == NULL)) { /* no Handle as asyncio makes them: the original's business */
        Py_XDECREF(ctx);
        Py_XDECREF(callback);
        PyErr_Clear();
        return PyObject_CallOneArg(original_run, handle);
    }
    PyObject *mon = PyObject_GetAttr(loop, s_monitor_attr);
    Py_DECREF(loop);
    if (mon == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
            Py_DECREF(ctx);
            Py_DECREF(callback);
            return NULL;
        }
        PyErr_Clear(); /* a Handle of a loop that is no BaseEventLoop */
    }
    double t0;
    if (mon != NULL && mon != Py_None && UNLIKELY(start_step(mon, &t0) < 0)) {
        PyErr_WriteUnraisable(mon); /* never the app's problem: run it untimed */
        Py_CLEAR(mon);
    }
    int timed = mon != NULL && mon != Py_None;
    PyObject *owner = NULL; /* read in the context as the callback leaves it, if possible */
    PyObject *result = run_handle(handle, ctx, callback, timed ? &owner : NULL);
    if (timed) {
        double dt = elapsed(t0);
        Pending pending;
        pending_save(&pending);
        if (owner == NULL) { /* not read on the way out: ctx.get(owner_var) */
            owner = context_owner(ctx);
        }
        if (owner == NULL || account(mon, t0, dt, owner, callback) < 0) {
            PyErr_WriteUnraisable(mon);
        }
        Py_XDECREF(owner);
        pending_restore(&pending);
    }
    Py_XDECREF(mon);
    Py_DECREF(ctx);
    Py_DECREF(callback);
    return result;
}

static PyMethodDef timed_run_def = {
    "_run", (PyCFunction)timed_run, METH_NOARGS,
    "Handle._run, timed by loopwatch (asyncio.events.Handle._run inside).",
};

static PyObject *
handle_run(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2 || !PyType_Check(args[0]) ||
            (nargs == 2 && !PyType_Check(args[1]))) {
        PyErr_SetString(PyExc_TypeError,
                        "handle_run() takes the Handle class (and TimerHandle)");
        return NULL;
    }
    PyObject *run = PyDescr_NewMethod((PyTypeObject *)args[0], &timed_run_def);
    if (run == NULL) {
        return NULL;
    }
    /* Each type's fields straight from its slots, where they are plain slots at the same
     * offsets for all of them; else by attribute, as before. */
    Py_ssize_t offsets[N_FIELDS], other[N_FIELDS];
    int fast = find_slots((PyTypeObject *)args[0], offsets);
    if (fast && nargs == 2) {
        fast = find_slots((PyTypeObject *)args[1], other) &&
            memcmp(offsets, other, sizeof(offsets)) == 0;
    }
    Py_CLEAR(slot_types[0]);
    Py_CLEAR(slot_types[1]);
    if (fast) {
        memcpy(field_offsets, offsets, sizeof(offsets));
        slot_types[0] = (PyTypeObject *)Py_NewRef(args[0]);
        slot_types[1] = (PyTypeObject *)Py_NewRef(args[nargs - 1]);
    }
    return run;
}

/* -- TimedCoroutine (uvloop) -------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *coro;
    PyObject *monitor;
    PyObject *weakreflist;
} TimedCoroutine;

static PyTypeObject TimedCoroutineType;

/* After a task step that started at t0: charge it to the owner in the task's context. The
 * step's result or exception goes on unchanged; a failure here is reported as unraisable. */
static void
end_task_step(PyObject *mon, double t0)
{
    double dt = elapsed(t0);
    Pending pending;
    pending_save(&pending);
    PyObject *owner = current_owner_value();
    if (owner == NULL || account(mon, t0, dt, owner, NULL) < 0) {
        PyErr_WriteUnraisable(mon);
    }
    Py_XDECREF(owner);
    pending_restore(&pending);
}

static PySendResult
tc_am_send(TimedCoroutine *self, PyObject *arg, PyObject **result)
{
    PyObject *mon = self->monitor;
    double t0;
    if (start_step(mon, &t0) < 0) { /* never the app's problem: run it untimed */
        PyErr_WriteUnraisable(mon);
        return PyIter_Send(self->coro, arg, result);
    }
    PySendResult status = PyIter_Send(self->coro, arg, result);
    end_task_step(mon, t0);
    return status;
}

/* An am_send result as a send() method returns it: the value yielded, or StopIteration
 * carrying the value returned, or the exception. */
static PyObject *
send_method_result(PySendResult status, PyObject *result)
{
    if (status == PYGEN_RETURN) {
        PyObject *exc = PyObject_CallOneArg(PyExc_StopIteration, result);
        Py_DECREF(result);
        if (exc != NULL) {
            PyErr_SetObject(PyExc_StopIteration, exc);
            Py_DECREF(exc);
        }
        return NULL;
    }
    return status == PYGEN_NEXT ? result : NULL;
}

static PyObject *
tc_send(TimedCoroutine *self, PyObject *arg)
{
    PyObject *result;
    PySendResult status = tc_am_send(self, arg, &result);
    return send_method_result(status, result);
}

static PyObject *
tc_throw(TimedCoroutine *self, PyObject *args)
{
    PyObject *mon = self->monitor;
    PyObject *throw = PyObject_GetAttr(self->coro, s_throw);
    if (throw == NULL) {
        return NULL;
    }
    double t0;
    if (start_step(mon, &t0) < 0) { /* never the app's problem: run it untimed */
        PyErr_WriteUnraisable(mon);
        PyObject *untimed = PyObject_Call(throw, args, NULL);
        Py_DECREF(throw);
        return untimed;
    }
    PyObject *result = PyObject_Call(throw, args, NULL);
    Py_DECREF(throw);
    end_task_step(mon, t0);
    return result;
}

static PyObject *
tc_close(TimedCoroutine *self, PyObject *Py_UNUSED(ignored))
{
    return PyObject_CallMethodNoArgs(self->coro, s_close);
}

static PyObject *
tc_wrapped(TimedCoroutine *self, PyObject *Py_UNUSED(ignored))
{
    return Py_NewRef(self->coro);
}

/* tc(): the task's own coroutine. The factory shadows each task's get_coro with its
 * TimedCoroutine itself, so no bound method is made per task. */
static PyObject *
tc_call(TimedCoroutine *self, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwds != NULL && PyDict_GET_SIZE(kwds) != 0)) {
        PyErr_SetString(PyExc_TypeError, "get_coro() takes no arguments");
        return NULL;
    }
    return Py_NewRef(self->coro);
}

static PyObject *
tc_await(TimedCoroutine *self)
{
    return PyObject_CallMethodNoArgs(self->coro, s_await);
}

static PyObject *
tc_getattro(TimedCoroutine *self, PyObject *name)
{
    /* cr_frame (Task.get_stack), cr_running, cr_await, cr_code, __name__, __qualname__ */
    PyObject *value = PyObject_GenericGetAttr((PyObject *)self, name);
    if (value == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        value = PyObject_GetAttr(self->coro, name);
    }
    return value;
}

static PyObject *
tc_repr(TimedCoroutine *self)
{
    return PyObject_Repr(self->coro);
}

static PyObject *
tc_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *coro, *monitor;
    static char *kwlist[] = {"coro", "monitor", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:TimedCoroutine", kwlist, &coro, &monitor)) {
        return NULL;
    }
    TimedCoroutine *self = PyObject_GC_New(TimedCoroutine, type);
    if (self == NULL) {
        return NULL;
    }
    self->coro = Py_NewRef(coro);
    self->monitor = Py_NewRef(monitor);
    self->weakreflist = NULL;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

/* timed(coro, monitor): a TimedCoroutine, without the cost of a type call */
static PyObject *
timed(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "timed() takes (coro, monitor)");
        return NULL;
    }
    TimedCoroutine *self = PyObject_GC_New(TimedCoroutine, &TimedCoroutineType);
    if (self == NULL) {
        return NULL;
    }
    self->coro = Py_NewRef(args[0]);
    self->monitor = Py_NewRef(args[1]);
    self->weakreflist = NULL;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static int
tc_traverse(TimedCoroutine *self, visitproc visit, void *arg)
{
    Py_VISIT(self->coro);
    Py_VISIT(self->monitor);
    return 0;
}

static int
tc_clear(TimedCoroutine *self)
{
    Py_CLEAR(self->coro);
    Py_CLEAR(self->monitor);
    return 0;
}

static void
tc_dealloc(TimedCoroutine *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    tc_clear(self);
    PyObject_GC_Del(self);
}

static PyMethodDef tc_methods[] = {
    {"send", (PyCFunction)tc_send, METH_O, "Run the next step, timed."},
    {"throw", (PyCFunction)tc_throw, METH_VARARGS, "Throw into the coroutine, timed."},
    {"close", (PyCFunction)tc_close, METH_NOARGS, "Close the coroutine."},
    {"wrapped", (PyCFunction)tc_wrapped, METH_NOARGS, "The task's own coroutine."},
    {NULL},
};

static PyMemberDef tc_members[] = {
    {"_coro", T_OBJECT, offsetof(TimedCoroutine, coro), READONLY, NULL},
    {NULL},
};

static PyAsyncMethods tc_as_async = {
    .am_await = (unaryfunc)tc_await,
    .am_send = (sendfunc)tc_am_send,
};

static PyTypeObject TimedCoroutineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._speedups.TimedCoroutine",
    .tp_doc = "Wraps a task's coroutine and times each step (where Handle._run is not used).",
    .tp_basicsize = sizeof(TimedCoroutine),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = tc_new,
    .tp_dealloc = (destructor)tc_dealloc,
    .tp_traverse = (traverseproc)tc_traverse,
    .tp_clear = (inquiry)tc_clear,
    .tp_as_async = &tc_as_async,
    .tp_getattro = (getattrofunc)tc_getattro,
    .tp_repr = (reprfunc)tc_repr,
    .tp_call = (ternaryfunc)tc_call,
    .tp_methods = tc_methods,
    .tp_members = tc_members,
    .tp_weaklistoffset = offsetof(TimedCoroutine, weakreflist),
};

/* -- Task.get_coro (uvloop) --------------------------------------------------------------- */

/* The factory's tasks run a TimedCoroutine, and get_coro() must still return the task's own
 * coroutine. Shadowing get_coro on each task costs it an instance dict, and the
 * interpreter's specialized method loads on tasks expect none (they fail and fall back to
 * the generic lookup): on uvloop that was about a point of the request's CPU time. Instead
 * the Task type's own get_coro is replaced, once per process: the original's result, the
 * task's own coroutine where that is a TimedCoroutine. Any other task's answer is the
 * original's, as it was. */
static PyObject *task_get_coro_original; /* the type's own method descriptor, held */

static PyObject *
task_get_coro(PyObject *task, PyObject *Py_UNUSED(ignored))
{
    PyObject *coro = PyObject_CallOneArg(task_get_coro_original, task);
    if (coro != NULL && Py_IS_TYPE(coro, &TimedCoroutineType)) {
        Py_SETREF(coro, Py_NewRef(((TimedCoroutine *)coro)->coro));
    }
    return coro;
}

static PyMethodDef task_get_coro_def = {
    "get_coro", (PyCFunction)task_get_coro, METH_NOARGS,
    "get_coro($self, /)\n--\n\n"
    "Return the coroutine object wrapped by the Task (loopwatch: the task's own, not the "
    "wrapper that times its steps)."
};

/* Whether `method` (a type's get_coro, its own or inherited; NULL: none) is the replacement. */
static inline int
is_get_coro_replacement(PyObject *method)
{
    return method != NULL && Py_IS_TYPE(method, &PyMethodDescr_Type) &&
           ((PyMethodDescrObject *)method)->d_method == &task_get_coro_def;
}

/* unwrap_get_coro(task_type) -> bool */
static PyObject *
unwrap_get_coro(PyObject *Py_UNUSED(module), PyObject *arg)
{
    if (!PyType_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "unwrap_get_coro() takes a Task type, not %.100s",
                     Py_TYPE(arg)->tp_name);
        return NULL;
    }
    PyTypeObject *type = (PyTypeObject *)arg;
    PyObject *found = PyObject_GetAttr(arg, s_get_coro);
    int done = is_get_coro_replacement(found);
    Py_XDECREF(found);
    PyErr_Clear();
    if (done) {
        Py_RETURN_TRUE;
    }
    /* only the C method of the type's own, with no arguments (_asyncio.Task's), and only
     * one type per process */
    PyObject *dict = type->tp_dict;
    PyObject *method = dict == NULL ? NULL : PyDict_GetItemWithError(dict, s_get_coro);
    if (method == NULL && PyErr_Occurred()) {
        return NULL;
    }
    if (method == NULL || task_get_coro_original != NULL ||
            !Py_IS_TYPE(method, &PyMethodDescr_Type) ||
            ((PyMethodDescrObject *)method)->d_method->ml_flags != METH_NOARGS) {
        Py_RETURN_FALSE;
    }
    PyObject *replacement = PyDescr_NewMethod(type, &task_get_coro_def);
    if (replacement == NULL) {
        return NULL;
    }
    Py_INCREF(method);
    if (PyDict_SetItem(dict, s_get_coro, replacement) < 0) {
        Py_DECREF(method);
        Py_DECREF(replacement);
        return NULL;
    }
    Py_DECREF(replacement);
    task_get_coro_original = method;
    PyType_Modified(type); /* method caches and specialized loads see the new one */
    Py_RETURN_TRUE;
}

/* -- the task factory (uvloop) ------------------------------------------------------------- */

/* factory(loop, coro): Task(TimedCoroutine(coro, monitor), loop=loop) for a plain coroutine
 * while the monitor is active; anything else goes to the pure-Python factory (`fallback`),
 * which handles every case. Its get_coro() returns coro: by the type's own get_coro where
 * unwrap_get_coro() replaced it, else shadowed on the task. */
typedef struct {
    PyObject_HEAD
    PyObject *monitor;
    PyObject *fallback;
    PyObject *task_type;
    int type_unwraps;       /* task_type.get_coro() unwraps the TimedCoroutine itself */
    int shadowing;
    int plain_get_coro;     /* task_type's get_coro is no data descriptor (a method) */
    vectorcallfunc vectorcall;
} TaskFactory;

static PyObject *
tf_vectorcall(TaskFactory *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    StepState *state = AS_STATE(self->monitor);
    /* uvloop passes context=None with every task; asyncio passes context= when given */
    PyObject *context = Py_None;
    if (kwnames != NULL) {
        if (PyTuple_GET_SIZE(kwnames) != 1 ||
                !str_eq(PyTuple_GET_ITEM(kwnames, 0), s_context_kw)) { /* names are str */
            PyErr_Clear();
            return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
        }
        context = args[PyVectorcall_NARGS(nargsf)];
    }
    if (PyVectorcall_NARGS(nargsf) != 2 || !self->shadowing ||
            state == NULL || !state->active || !PyCoro_CheckExact(args[1])) {
        return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
    }
    PyObject *timed_args[2] = {args[1], self->monitor};
    PyObject *timed_coro = timed(NULL, timed_args, 2);
    if (timed_coro == NULL) {
        return NULL;
    }
    PyObject *task_args[3] = {timed_coro, args[0], context};
    PyObject *task = PyObject_Vectorcall(self->task_type, task_args, 1,
                                         context == Py_None ? kw_loop : kw_loop_context);
    if (task == NULL) {
        Py_DECREF(timed_coro);
        return NULL;
    }
    if (self->type_unwraps) {
        Py_DECREF(timed_coro); /* the task holds it */
        return task;
    }
    /* get_coro shadowed by the TimedCoroutine, which returns the coroutine when called:
     * put in the instance dict as setattr would (the Task type has no data descriptor of
     * that name), without its type lookup */
    int failed;
    if (self->plain_get_coro && Py_IS_TYPE(task, (PyTypeObject *)self->task_type)) {
        PyObject *dict = PyObject_GenericGetDict(task, NULL);
        failed = dict == NULL ? -1 : PyDict_SetItem(dict, s_get_coro, timed_coro);
        Py_XDECREF(dict);
    }
    else {
        failed = PyObject_SetAttr(task, s_get_coro, timed_coro);
    }
    Py_DECREF(timed_coro);
    if (failed < 0) {
        /* a Task that takes no instance attribute: the fallback's Task subclass from now
         * on (this one task shows the wrapper), as the pure-Python factory does */
        PyErr_Clear();
        self->shadowing = 0;
    }
    return task;
}

static PyObject *
tf_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *monitor, *fallback, *task_type;
    static char *kwlist[] = {"monitor", "fallback", "task_type", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:TaskFactory", kwlist,
                                     &monitor, &fallback, &task_type)) {
        return NULL;
    }
    TaskFactory *self = (TaskFactory *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->monitor = Py_NewRef(monitor);
    self->fallback = Py_NewRef(fallback);
    self->task_type = Py_NewRef(task_type);
    self->shadowing = 1;
    PyObject *method = PyObject_GetAttr(task_type, s_get_coro);
    self->type_unwraps = PyType_Check(task_type) && is_get_coro_replacement(method);
    self->plain_get_coro = method != NULL && Py_TYPE(method)->tp_descr_set == NULL;
    Py_XDECREF(method);
    PyErr_Clear();
    self->vectorcall = (vectorcallfunc)tf_vectorcall;
    return (PyObject *)self;
}

static int
tf_traverse(TaskFactory *self, visitproc visit, void *arg)
{
    Py_VISIT(self->monitor);
    Py_VISIT(self->fallback);
    Py_VISIT(self->task_type);
    return 0;
}

static int
tf_clear(TaskFactory *self)
{
    Py_CLEAR(self->monitor);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->task_type);
    return 0;
}

static void
tf_dealloc(TaskFactory *self)
{
    PyObject_GC_UnTrack(self);
    tf_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef tf_members[] = {
    {"fallback", T_OBJECT, offsetof(TaskFactory, fallback), READONLY,
     "The pure-Python factory, for everything but a plain coroutine."},
    {NULL},
};

static PyTypeObject TaskFactoryType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._speedups.TaskFactory",
    .tp_doc = "A task factory that times each task's steps (uvloop).",
    .tp_basicsize = sizeof(TaskFactory),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = tf_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(TaskFactory, vectorcall),
    .tp_dealloc = (destructor)tf_dealloc,
    .tp_traverse = (traverseproc)tf_traverse,
    .tp_clear = (inquiry)tf_clear,
    .tp_members = tf_members,
};

/* -- RequestOwner --------------------------------------------------------------------------- */

/* The request's ASGI send: note the status and the end of the body, then the server's send. */
static PyObject *
ro_vectorcall(RequestOwner *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 1 || kwnames != NULL) {
        /* not ours to judge: the server's send answers as it would without loopwatch */
        return PyObject_Vectorcall(self->send, args, nargsf, kwnames);
    }
    PyObject *message = args[0];
    if (self->send == Py_None) {
        PyErr_SetString(PyExc_RuntimeError,
                        "ASGI send called after the application returned (loopwatch has "
                        "released the request)");
        return NULL;
    }
    int last = 0;
    if (PyDict_CheckExact(message)) {
        PyObject *type = PyDict_GetItemWithError(message, s_type);
        if (type != NULL && PyUnicode_Check(type)) {
            if (str_is(type, s_response_start)) {
                PyObject *status = PyDict_GetItemWithError(message, s_status);
                if (status != NULL && PyLong_Check(status)) {
                    long value = PyLong_AsLong(status);
                    self->status = (value == -1 && PyErr_Occurred()) ? 0 : value;
                }
            }
            else {
                PyObject *more = PyDict_GetItemWithError(message, s_more_body);
                int truth = more == NULL ? 0 : PyObject_IsTrue(more);
                if (truth == 0) {
                    double t = now();
                    if (!NOW_FAILED(t)) {
                        self->ended = t;
                    }
                    last = 1;
                }
            }
        }
        if (UNLIKELY(PyErr_Occurred())) {
            PyErr_Clear(); /* whatever went wrong above is for the server to find */
        }
    }
    PyObject *awaitable = PyObject_Vectorcall(self->send, args, nargsf, NULL);
    if (last && awaitable != NULL && self->token != NULL) {
        return final_send(self, awaitable);
    }
    return awaitable;
}

/* new_owner(scope, root_path, send) */
static PyObject *
new_owner(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "new_owner() takes (scope, root_path, send)");
        return NULL;
    }
    RequestOwner *self = PyObject_GC_New(RequestOwner, &RequestOwnerType);
    if (self == NULL) {
        return NULL;
    }
    self->busy = 0.0;
    self->ended = 0.0;
    self->status = 0;
    self->scope = Py_NewRef(args[0]);
    self->root_path = Py_NewRef(args[1]);
    self->send = Py_NewRef(args[2]);
    self->method = Py_NewRef(Py_None);
    self->route = Py_NewRef(Py_None);
    self->token = NULL;
    self->weakreflist = NULL;
    self->vectorcall = (vectorcallfunc)ro_vectorcall;
    self->in_flight = NULL;
    self->prev = self->next = NULL;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PyObject *
ro_new(PyTypeObject *Py_UNUSED(type), PyObject *args, PyObject *kwds)
{
    PyObject *scope, *root_path, *send;
    static char *kwlist[] = {"scope", "root_path", "send", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:RequestOwner", kwlist,
                                     &scope, &root_path, &send)) {
        return NULL;
    }
    PyObject *argv[3] = {scope, root_path, send};
    return new_owner(NULL, argv, 3);
}

static PyObject *
ro_labels(RequestOwner *self, PyObject *Py_UNUSED(ignored))
{
    if (self->route != Py_None || labeler == NULL || labeler == Py_None) {
        return PyTuple_Pack(2, self->method, self->route); /* labelled when it finished */
    }
    return PyObject_CallOneArg(labeler, (PyObject *)self);
}

static PyObject *
ro_repr(RequestOwner *self)
{
    PyObject *busy = PyFloat_FromDouble(self->busy);
    if (busy == NULL) {
        return NULL;
    }
    PyObject *text = PyUnicode_FromFormat("<RequestOwner status=%ld busy=%R>", self->status,
                                          busy);
    Py_DECREF(busy);
    return text;
}

static int
ro_traverse(RequestOwner *self, visitproc visit, void *arg)
{
    Py_VISIT(self->scope);
    Py_VISIT(self->root_path);
    Py_VISIT(self->send);
    Py_VISIT(self->method);
    Py_VISIT(self->route);
    Py_VISIT(self->token);
    return 0;
}

static int
ro_clear(RequestOwner *self)
{
    Py_CLEAR(self->scope);
    Py_CLEAR(self->root_path);
    Py_CLEAR(self->send);
    Py_CLEAR(self->method);
    Py_CLEAR(self->route);
    Py_CLEAR(self->token);
    return 0;
}

static void
ro_dealloc(RequestOwner *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    ro_clear(self);
    PyObject_GC_Del(self);
}

static PyMemberDef ro_members[] = {
    {"busy", T_DOUBLE, offsetof(RequestOwner, busy), 0, "Loop time held (seconds)."},
    {"ended", T_DOUBLE, offsetof(RequestOwner, ended), 0, "perf_counter() at the last body."},
    {"status", T_LONG, offsetof(RequestOwner, status), 0, "The response status (0: none)."},
    {"scope", T_OBJECT, offsetof(RequestOwner, scope), 0, NULL},
    {"root_path", T_OBJECT, offsetof(RequestOwner, root_path), 0, NULL},
    {"send", T_OBJECT, offsetof(RequestOwner, send), 0, "The server's send."},
    {"method", T_OBJECT, offsetof(RequestOwner, method), 0, NULL},
    {"route", T_OBJECT, offsetof(RequestOwner, route), 0, NULL},
    {NULL},
};

static PyMethodDef ro_methods[] = {
    {"labels", (PyCFunction)ro_labels, METH_NOARGS, "(method, route) for block events."},
    {NULL},
};

static PyTypeObject RequestOwnerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._speedups.RequestOwner",
    .tp_doc = "The loop time of one request; calling it is the request's ASGI send.",
    .tp_basicsize = sizeof(RequestOwner),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = ro_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(RequestOwner, vectorcall),
    .tp_dealloc = (destructor)ro_dealloc,
    .tp_traverse = (traverseproc)ro_traverse,
    .tp_clear = (inquiry)ro_clear,
    .tp_repr = (reprfunc)ro_repr,
    .tp_members = ro_members,
    .tp_methods = ro_methods,
    .tp_weaklistoffset = offsetof(RequestOwner, weakreflist),
};

/* -- InFlight: the middleware's requests in flight ---------------------------------------- */

/* The requests in flight, read once a second for the in-progress gauge. A C owner is linked
 * in through its own fields (no hashing, no table per request); anything else (the pure-Python
 * owner) goes in a set beside them. It holds a reference to each member. */
typedef struct {
    PyObject_HEAD
    RequestOwner *first;
    Py_ssize_t linked;
    PyObject *others;       /* set */
} InFlight;

static PyTypeObject InFlightType;

static inline void
in_flight_link(InFlight *self, RequestOwner *owner)
{
    owner->in_flight = self;
    owner->prev = NULL;
    owner->next = self->first;
    if (self->first != NULL) {
        self->first->prev = owner;
    }
    self->first = (RequestOwner *)Py_NewRef(owner);
    self->linked++;
}

/* (owner->in_flight == self) Its reference goes with it: the caller holds its own. */
static inline void
in_flight_unlink(InFlight *self, RequestOwner *owner)
{
    if (owner->prev != NULL) {
        owner->prev->next = owner->next;
    }
    else {
        self->first = owner->next;
    }
    if (owner->next != NULL) {
        owner->next->prev = owner->prev;
    }
    owner->in_flight = NULL;
    owner->prev = owner->next = NULL;
    self->linked--;
    Py_DECREF(owner);
}

/* Whether member is a C owner linked in this InFlight. */
static inline int
linked_in(InFlight *self, PyObject *member)
{
    return Py_IS_TYPE(member, &RequestOwnerType) && ((RequestOwner *)member)->in_flight == self;
}

static PyObject *
in_flight_add(InFlight *self, PyObject *member)
{
    if (linked_in(self, member)) {
        Py_RETURN_NONE; /* already in */
    }
    if (Py_IS_TYPE(member, &RequestOwnerType) &&
            ((RequestOwner *)member)->in_flight == NULL) {
        int there = PySet_Contains(self->others, member); /* added while in another */
        if (there < 0) {
            return NULL;
        }
        if (!there) {
            in_flight_link(self, (RequestOwner *)member);
        }
        Py_RETURN_NONE;
    }
    if (PySet_Add(self->others, member) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
in_flight_discard(InFlight *self, PyObject *member)
{
    if (linked_in(self, member)) {
        in_flight_unlink(self, (RequestOwner *)member);
        Py_RETURN_NONE;
    }
    if (PySet_Discard(self->others, member) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static int
in_flight_contains(InFlight *self, PyObject *member)
{
    return linked_in(self, member) ? 1 : PySet_Contains(self->others, member);
}

static Py_ssize_t
in_flight_len(InFlight *self)
{
    return self->linked + PySet_GET_SIZE(self->others);
}

/* A list of the members as they are now (for iterating while requests come and go). */
static PyObject *
in_flight_list(InFlight *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *list = PyList_New(0);
    if (list == NULL) {
        return NULL;
    }
    for (RequestOwner *owner = self->first; owner != NULL; owner = owner->next) {
        if (PyList_Append(list, (PyObject *)owner) < 0) {
            Py_DECREF(list);
            return NULL;
        }
    }
    PyObject *others = PySequence_List(self->others);
    if (others == NULL || PyList_SetSlice(list, PY_SSIZE_T_MAX, PY_SSIZE_T_MAX, others) < 0) {
        Py_XDECREF(others);
        Py_DECREF(list);
        return NULL;
    }
    Py_DECREF(others);
    return list;
}

static PyObject *
in_flight_iter(InFlight *self)
{
    PyObject *list = in_flight_list(self, NULL);
    if (list == NULL) {
        return NULL;
    }
    PyObject *it = PyObject_GetIter(list);
    Py_DECREF(list);
    return it;
}

static PyObject *
in_flight_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwds != NULL && PyDict_GET_SIZE(kwds) != 0)) {
        PyErr_SetString(PyExc_TypeError, "InFlight() takes no arguments");
        return NULL;
    }
    InFlight *self = (InFlight *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->first = NULL;
    self->linked = 0;
    self->others = PySet_New(NULL);
    if (self->others == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
in_flight_traverse(InFlight *self, visitproc visit, void *arg)
{
    for (RequestOwner *owner = self->first; owner != NULL; owner = owner->next) {
        Py_VISIT(owner);
    }
    Py_VISIT(self->others);
    return 0;
}

static int
in_flight_clear(InFlight *self)
{
    while (self->first != NULL) {
        in_flight_unlink(self, self->first);
    }
    Py_CLEAR(self->others);
    return 0;
}

static void
in_flight_dealloc(InFlight *self)
{
    PyObject_GC_UnTrack(self);
    in_flight_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef in_flight_methods[] = {
    {"add", (PyCFunction)in_flight_add, METH_O, "Add a request's owner."},
    {"discard", (PyCFunction)in_flight_discard, METH_O, "Remove it, if it is in."},
    {"list", (PyCFunction)in_flight_list, METH_NOARGS, "The members, as a list."},
    {NULL},
};

static PySequenceMethods in_flight_as_sequence = {
    .sq_length = (lenfunc)in_flight_len,
    .sq_contains = (objobjproc)in_flight_contains,
};

static PyTypeObject InFlightType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._speedups.InFlight",
    .tp_doc = "InFlight(): the requests in flight (add, discard, len, iter, in).",
    .tp_basicsize = sizeof(InFlight),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = in_flight_new,
    .tp_dealloc = (destructor)in_flight_dealloc,
    .tp_traverse = (traverseproc)in_flight_traverse,
    .tp_clear = (inquiry)in_flight_clear,
    .tp_iter = (getiterfunc)in_flight_iter,
    .tp_as_sequence = &in_flight_as_sequence,
    .tp_methods = in_flight_methods,
};

/* -- Totals ------------------------------------------------------------------------------- */

#define STATUS_MIN 100
#define STATUS_MAX 599

typedef struct {
    PyObject_HEAD
    Py_ssize_t n_duration;  /* finite bounds; counts have one more (+Inf) */
    Py_ssize_t n_blocking;
    double *duration_bounds;
    double *blocking_bounds;
    unsigned long long *duration_counts;
    unsigned long long *blocking_counts;
    double duration_sum;
    double blocking_sum;
    unsigned long long count;
    unsigned long long statuses[STATUS_MAX - STATUS_MIN + 1];
    PyObject *other_statuses; /* dict: statuses outside 100..599 */
} Totals;

static int
read_bounds(PyObject *seq, const char *what, double **bounds, Py_ssize_t *n)
{
    PyObject *fast = PySequence_Fast(seq, "bounds must be a sequence of floats");
    if (fast == NULL) {
        return -1;
    }
    Py_ssize_t len = PySequence_Fast_GET_SIZE(fast);
    *bounds = PyMem_Calloc(len ? len : 1, sizeof(double));
    if (*bounds == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        double b = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast, i));
        if (b == -1.0 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        if (i > 0 && !(b > (*bounds)[i - 1])) {
            Py_DECREF(fast);
            PyErr_Format(PyExc_ValueError, "%s bounds must increase", what);
            return -1;
        }
        (*bounds)[i] = b;
    }
    Py_DECREF(fast);
    *n = len;
    return 0;
}

static void totals_dealloc(Totals *self);

static PyObject *
totals_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *duration_bounds, *blocking_bounds;
    static char *kwlist[] = {"duration_bounds", "blocking_bounds", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:Totals", kwlist,
                                     &duration_bounds, &blocking_bounds)) {
        return NULL;
    }
    Totals *self = (Totals *)type->tp_alloc(type, 0); /* zeroed */
    if (self == NULL) {
        return NULL;
    }
    if (read_bounds(duration_bounds, "duration", &self->duration_bounds,
                    &self->n_duration) < 0 ||
            read_bounds(blocking_bounds, "blocking", &self->blocking_bounds,
                        &self->n_blocking) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->duration_counts = PyMem_Calloc(self->n_duration + 1, sizeof(unsigned long long));
    self->blocking_counts = PyMem_Calloc(self->n_blocking + 1, sizeof(unsigned long long));
    self->other_statuses = PyDict_New();
    if (self->duration_counts == NULL || self->blocking_counts == NULL ||
            self->other_statuses == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static void
totals_dealloc(Totals *self)
{
    PyMem_Free(self->duration_bounds);
    PyMem_Free(self->blocking_bounds);
    PyMem_Free(self->duration_counts);
    PyMem_Free(self->blocking_counts);
    Py_XDECREF(self->other_statuses);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The bucket of x: the first bound >= x (bisect_left), or the +Inf bucket. */
static inline Py_ssize_t
bucket(const double *bounds, Py_ssize_t n, double x)
{
    Py_ssize_t i = 0;
    while (i < n && bounds[i] < x) {
        i++;
    }
    return i;
}

/* Record one finished request (loop thread). */
static int
totals_record(Totals *self, long status, double duration, double blocking)
{
    if (status >= STATUS_MIN && status <= STATUS_MAX) {
        self->statuses[status - STATUS_MIN]++;
    }
    else {
        PyObject *key = PyLong_FromLong(status);
        if (key == NULL) {
            return -1;
        }
        PyObject *n = PyDict_GetItemWithError(self->other_statuses, key);
        PyObject *grown = NULL;
        if (n != NULL || !PyErr_Occurred()) {
            grown = PyLong_FromLongLong(n == NULL ? 1 : PyLong_AsLongLong(n) + 1);
        }
        if (grown == NULL || PyDict_SetItem(self->other_statuses, key, grown) < 0) {
            Py_DECREF(key);
            Py_XDECREF(grown);
            return -1;
        }
        Py_DECREF(key);
        Py_DECREF(grown);
    }
    self->duration_counts[bucket(self->duration_bounds, self->n_duration, duration)]++;
    self->duration_sum += duration;
    self->blocking_counts[bucket(self->blocking_bounds, self->n_blocking, blocking)]++;
    self->blocking_sum += blocking;
    self->count++;
    return 0;
}

/* add(status, duration, blocking): record one finished request (loop thread). */
static PyObject *
totals_add(Totals *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "add() takes (status, duration, blocking)");
        return NULL;
    }
    long status = PyLong_AsLong(args[0]);
    if (status == -1 && PyErr_Occurred()) {
        return NULL;
    }
    double duration = PyFloat_AsDouble(args[1]);
    if (duration == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    double blocking = PyFloat_AsDouble(args[2]);
    if (blocking == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    if (totals_record(self, status, duration, blocking) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
counts_list(const unsigned long long *counts, Py_ssize_t n)
{
    PyObject *list = PyList_New(n);
    if (list == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(counts[i]);
        if (v == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, v);
    }
    return list;
}

/* snapshot() -> (duration_counts, blocking_counts, duration_sum, blocking_sum, statuses,
 * count), all as of one moment (the GIL is held throughout). */
static PyObject *
totals_snapshot(Totals *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *statuses = PyDict_Copy(self->other_statuses);
    if (statuses == NULL) {
        return NULL;
    }
    for (long s = STATUS_MIN; s <= STATUS_MAX; s++) {
        unsigned long long n = self->statuses[s - STATUS_MIN];
        if (n) {
            PyObject *k = PyLong_FromLong(s);
            PyObject *v = PyLong_FromUnsignedLongLong(n);
            if (k == NULL || v == NULL || PyDict_SetItem(statuses, k, v) < 0) {
                Py_XDECREF(k);
                Py_XDECREF(v);
                Py_DECREF(statuses);
                return NULL;
            }
            Py_DECREF(k);
            Py_DECREF(v);
        }
    }
    PyObject *d = counts_list(self->duration_counts, self->n_duration + 1);
    PyObject *b = counts_list(self->blocking_counts, self->n_blocking + 1);
    if (d == NULL || b == NULL) {
        Py_XDECREF(d);
        Py_XDECREF(b);
        Py_DECREF(statuses);
        return NULL;
    }
    return Py_BuildValue("(NNddNK)", d, b, self->duration_sum, self->blocking_sum, statuses,
                         self->count);
}

static PyMemberDef totals_members[] = {
    {"count", T_ULONGLONG, offsetof(Totals, count), READONLY, "Requests added."},
    {NULL},
};

static PyMethodDef totals_methods[] = {
    {"add", (PyCFunction)(void (*)(void))totals_add, METH_FASTCALL,
     "add(status, duration, blocking): record one finished request."},
    {"snapshot", (PyCFunction)totals_snapshot, METH_NOARGS,
     "(duration_counts, blocking_counts, duration_sum, blocking_sum, statuses, count)"},
    {NULL},
};

static PyTypeObject TotalsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._speedups.Totals",
    .tp_doc = "Running totals of the requests of one (method, route).",
    .tp_basicsize = sizeof(Totals),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = totals_new,
    .tp_dealloc = (destructor)totals_dealloc,
    .tp_methods = totals_methods,
    .tp_members = totals_members,
};

/* -- the end of a request ------------------------------------------------------------------ */

/* A finished request's owner keeps its labels and lets go of the request: contexts copied
 * during the request (a keep-alive timer the server starts as the body goes out) keep the
 * owner alive for seconds, and with it, had it kept them, the scope and the server's send
 * with everything they reach. */
static void
release(RequestOwner *owner, PyObject *method, PyObject *route)
{
    Py_SETREF(owner->method, Py_NewRef(method));
    Py_SETREF(owner->route, Py_NewRef(route));
    Py_SETREF(owner->scope, Py_NewRef(Py_None));
    Py_SETREF(owner->send, Py_NewRef(Py_None));
    Py_SETREF(owner->root_path, Py_NewRef(Py_None));
}

/* release(owner, method, route), for the caller that looked the totals up itself */
static PyObject *
release_owner(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !Py_IS_TYPE(args[0], &RequestOwnerType)) {
        PyErr_SetString(PyExc_TypeError, "release() takes (RequestOwner, method, route)");
        return NULL;
    }
    release((RequestOwner *)args[0], args[1], args[2]);
    Py_RETURN_NONE;
}

/* finish(owner, monitor, start, cache, scope, root_path): a request's last moment, in its
 * last step. Its loop time includes the step still running (as Monitor.note_finished, which
 * also remembers the owner for a block event of that step); then it is added to the running
 * totals that `cache` holds for its (method, id(route)) as (route, totals, method label,
 * route label), if any, and the owner is released. Returns None when recorded, else
 * (status, duration, blocking) for the caller to record (and release) after the lookup.
 * The twin of _middleware._py_finish. */
/* The cache entry a RequestPath used last, and its key: most requests repeat it. */
typedef struct {
    PyObject *method;       /* the raw method (a str) */
    PyObject *route;        /* the matched route, by identity (held: its id stays its own) */
    PyObject *entry;        /* (route, totals, method label, route label) */
} LastHit;

static void
last_hit_clear(LastHit *last)
{
    Py_CLEAR(last->method);
    Py_CLEAR(last->route);
    Py_CLEAR(last->entry);
}

static inline int
same_method(PyObject *a, PyObject *b)
{
    return PyUnicode_CheckExact(a) && PyUnicode_CheckExact(b) && str_eq(a, b);
}

/* cache[(method, id(route))] where it is a usable entry (borrowed), else NULL (an error set,
 * or not). `last`, if any, is asked first and then remembers the answer. */
static PyObject *
cached_entry(PyObject *cache, PyObject *method, PyObject *route, LastHit *last)
{
    if (last != NULL && last->entry != NULL && last->route == route &&
            same_method(last->method, method)) {
        return last->entry;
    }
    PyObject *id = PyLong_FromVoidPtr(route);
    PyObject *key = id ? PyTuple_Pack(2, method, id) : NULL;
    Py_XDECREF(id);
    if (key == NULL) {
        return NULL;
    }
    PyObject *entry = PyDict_GetItemWithError(cache, key);
    Py_DECREF(key);
    if (entry == NULL || !PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 4 ||
            PyTuple_GET_ITEM(entry, 0) != route ||
            !Py_IS_TYPE(PyTuple_GET_ITEM(entry, 1), &TotalsType)) {
        return NULL;
    }
    if (last != NULL && PyUnicode_CheckExact(method)) {
        Py_XSETREF(last->method, Py_NewRef(method));
        Py_XSETREF(last->route, Py_NewRef(route));
        Py_XSETREF(last->entry, Py_NewRef(entry));
    }
    return entry;
}

static PyObject *
finish_impl(RequestOwner *owner, PyObject *mon, double start, PyObject *cache, PyObject *scope,
            PyObject *root_path, LastHit *last)
{
    double t = now();
    if (NOW_FAILED(t)) {
        return NULL;
    }
    double blocking = owner->busy;
    StepState *state = mon == Py_None ? NULL : AS_STATE(mon);
    if (state == NULL && mon != Py_None) {
        PyErr_SetString(PyExc_TypeError, "finish() takes a Monitor or None");
        return NULL;
    }
    if (state != NULL && state->step_start != 0.0) {
        ss_note_closing(state, state->step_start, (PyObject *)owner);
        blocking += t - state->step_start;
    }
    long status = owner->status ? owner->status : 500;
    double duration = (owner->ended != 0.0 ? owner->ended : t) - start;
    if (!PyDict_Check(scope)) { /* a scope that is some other mapping: the caller's lookup */
        return Py_BuildValue("(ldd)", status, duration, blocking);
    }

    PyObject *route = PyDict_GetItemWithError(scope, s_route);
    if (route == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        route = Py_None;
    }
    PyObject *scope_root = PyDict_GetItemWithError(scope, s_root_path);
    PyObject *method = PyDict_GetItemWithError(scope, s_method);
    if (PyErr_Occurred()) {
        return NULL;
    }
    int same_root = scope_root == NULL
        ? PyUnicode_Check(root_path) && PyUnicode_GET_LENGTH(root_path) == 0
        : PyObject_RichCompareBool(scope_root, root_path, Py_EQ);
    if (same_root < 0) {
        return NULL;
    }
    if (same_root && method != NULL) {
        PyObject *entry = cached_entry(cache, method, route, last);
        if (entry == NULL && PyErr_Occurred()) {
            return NULL;
        }
        if (entry != NULL) {
            if (totals_record((Totals *)PyTuple_GET_ITEM(entry, 1), status, duration,
                              blocking) < 0) {
                return NULL;
            }
            release(owner, PyTuple_GET_ITEM(entry, 2), PyTuple_GET_ITEM(entry, 3));
            Py_RETURN_NONE;
        }
    }
    return Py_BuildValue("(ldd)", status, duration, blocking);
}

static PyObject *
finish(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 || !Py_IS_TYPE(args[0], &RequestOwnerType) || !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "finish() takes (RequestOwner, monitor, start, dict, dict, root_path)");
        return NULL;
    }
    double start = PyFloat_AsDouble(args[2]);
    if (start == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    return finish_impl((RequestOwner *)args[0], args[1], start, args[3], args[4], args[5],
                       NULL);
}

/* -- the request path: the middleware's HTTP requests without a Python coroutine ------------ */

/* What LoopWatchMiddleware.__call__ hands every request to while its monitor times this
 * loop's steps: a measured HTTP request becomes a RequestCall (below), an excluded path goes
 * straight to the app, and anything else (lifespan, websocket, a stopped monitor, another
 * loop) to the middleware's own coroutine, middleware._call(). */
typedef struct {
    PyObject_HEAD
    PyObject *middleware;
    PyObject *app;
    PyObject *monitor;      /* a StepState */
    PyObject *exclude;      /* frozenset of excluded paths */
    PyObject *exclude_items; /* the same as a tuple, while few and all str (else NULL) */
    PyObject *prefixes;     /* tuple of excluded prefixes */
    PyObject *cache;        /* the middleware's (method, id(route)) -> totals cache */
    PyObject *in_flight;    /* the middleware's owners in flight (an InFlight, or a set) */
    LastHit last;           /* the cache entry used last */
    unsigned long thread;   /* the thread of the monitor's loop */
    vectorcallfunc vectorcall;
} RequestPath;

/* One measured request: the twin of the request part of LoopWatchMiddleware._call. It is
 * the awaitable __call__ returns; awaiting it runs the app under the request's owner. */
typedef struct {
    PyObject_HEAD
    RequestPath *path;
    PyObject *scope;
    PyObject *receive;
    PyObject *send;
    PyObject *root_path;
    RequestOwner *owner;    /* its token is the context variable's */
    PyObject *inner;        /* the app's awaitable, as an iterator */
    double start;
    int state;
} RequestCall;

enum { RC_NEW, RC_MEASURED, RC_UNMEASURED, RC_DONE };

static PyTypeObject RequestPathType;
static PyTypeObject RequestCallType;

/* A failure inside loopwatch (pending): middleware._internal_error(where) with it as the
 * exception being handled (the middleware logs it once and counts it). */
static void
internal_error(RequestPath *path, const char *where)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) {
        PyException_SetTraceback(value, tb);
    }
    PyObject *ot, *ov, *otb;
    PyErr_GetExcInfo(&ot, &ov, &otb);
    PyErr_SetExcInfo(type, value, tb);
    PyObject *r = PyObject_CallMethod(path->middleware, "_internal_error", "s", where);
    if (r == NULL) {
        PyErr_WriteUnraisable(path->middleware);
    }
    Py_XDECREF(r);
    PyErr_SetExcInfo(ot, ov, otb);
}

/* The iterator `await obj` would drive (a new reference). */
static PyObject *
await_iter(PyObject *obj)
{
    if (PyCoro_CheckExact(obj)) {
        return Py_NewRef(obj);
    }
    PyTypeObject *type = Py_TYPE(obj);
    if (type->tp_as_async != NULL && type->tp_as_async->am_await != NULL) {
        PyObject *it = type->tp_as_async->am_await(obj);
        if (it != NULL && (PyCoro_CheckExact(it) || !PyIter_Check(it))) {
            PyErr_Format(PyExc_TypeError, "__await__() returned non-iterator of type '%.100s'",
                         Py_TYPE(it)->tp_name);
            Py_CLEAR(it);
        }
        return it;
    }
    if (PyGen_CheckExact(obj)) { /* a generator-based coroutine (types.coroutine) */
        PyObject *code = PyObject_GetAttrString(obj, "gi_code");
        PyObject *flags = code ? PyObject_GetAttrString(code, "co_flags") : NULL;
        Py_XDECREF(code);
        long value = flags ? PyLong_AsLong(flags) : -1;
        Py_XDECREF(flags);
        if (value != -1 && (value & CO_ITERABLE_COROUTINE)) {
            return Py_NewRef(obj);
        }
        PyErr_Clear();
    }
    PyErr_Format(PyExc_TypeError, "object %.100s can't be used in 'await' expression",
                 type->tp_name);
    return NULL;
}

/* The context variable back as before the request (with the token its RequestCall set):
 * 0, or -1 with the error set and the token kept (another task's context, say). */
static int
owner_reset(RequestOwner *owner)
{
    if (owner->token == NULL) {
        return 0;
    }
    if (PyContextVar_Reset(owner_var, owner->token) < 0) {
        return -1;
    }
    Py_CLEAR(owner->token);
    return 0;
}

/* The request's start, in its first step: owner, context variable, in flight, clock, then
 * the app. -1: loopwatch failed (rc_start undoes what was set up); -2: the app failed. */
static int
rc_begin(RequestCall *self)
{
    RequestPath *path = self->path;
    PyObject *root = PyDict_GetItemWithError(self->scope, s_root_path);
    if (root == NULL) {
        if (PyErr_Occurred()) {
            return -1;
        }
        root = s_empty;
    }
    self->root_path = Py_NewRef(root);
    PyObject *argv[3] = {self->scope, root, self->send};
    self->owner = (RequestOwner *)new_owner(NULL, argv, 3);
    if (self->owner == NULL) {
        return -1;
    }
    self->owner->token = PyContextVar_Set(owner_var, (PyObject *)self->owner);
    if (self->owner->token == NULL) {
        return -1;
    }
    if (LIKELY(Py_IS_TYPE(path->in_flight, &InFlightType))) {
        in_flight_link((InFlight *)path->in_flight, self->owner); /* a new owner */
    }
    else if (PySet_Add(path->in_flight, (PyObject *)self->owner) < 0) {
        return -1;
    }
    self->start = now();
    self->state = RC_MEASURED;
    PyObject *app_args[3] = {self->scope, self->receive, (PyObject *)self->owner};
    PyObject *awaitable = PyObject_Vectorcall(path->app, app_args, 3, NULL);
    if (awaitable == NULL) {
        return -2;
    }
    self->inner = await_iter(awaitable);
    Py_DECREF(awaitable);
    return self->inner == NULL ? -2 : 0;
}

/* The request's end (the app returned or raised; its exception, if any, is pending and
 * stays so): out of flight, its record, the context variable back (reset == 0: where that is
 * still possible, quietly). */
static void
rc_end(RequestCall *self, int failed, int reset)
{
    RequestPath *path = self->path;
    RequestOwner *owner = self->owner;
    Pending pending;
    pending_save(&pending);
    self->state = RC_DONE;
    if (failed && owner->status == 0) {
        owner->status = 500;
    }
    if (owner->in_flight == (void *)path->in_flight) {
        in_flight_unlink((InFlight *)path->in_flight, owner);
    }
    else if (!Py_IS_TYPE(path->in_flight, &InFlightType) &&
             PySet_Discard(path->in_flight, (PyObject *)owner) < 0) {
        internal_error(path, "recording a request");
    }
    PyObject *missed = finish_impl(owner, path->monitor, self->start, path->cache, self->scope,
                                   self->root_path, &path->last);
    if (missed == NULL) {
        internal_error(path, "recording a request");
    }
    else if (missed != Py_None) { /* the first request of its (method, route) */
        PyObject *r = PyObject_CallMethodObjArgs(path->middleware, s_record_first, owner,
                                                 self->scope, self->root_path, missed, NULL);
        if (r == NULL) {
            internal_error(path, "recording a request");
        }
        Py_XDECREF(r);
    }
    Py_XDECREF(missed);
    if (owner_reset(owner) < 0) {
        if (reset) {
            internal_error(path, "recording a request");
        }
        else {
            PyErr_Clear(); /* finalized outside the request's context, which is gone */
        }
    }
    Py_CLEAR(owner->token); /* the owner may outlive the request: not its context too */
    pending_restore(&pending);
}

/* The first step: set up and start; on a failure of loopwatch's own, the app runs
 * unmeasured. 0: go on; -1: the app failed (its exception pending, the request ended). */
static int
rc_start(RequestCall *self)
{
    int rc = rc_begin(self);
    if (rc == -2) {
        rc_end(self, 1, 1);
        return -1;
    }
    if (rc == -1) {
        internal_error(self->path, "starting a request");
        if (self->owner != NULL) {
            if (owner_reset(self->owner) < 0) {
                PyErr_Clear();
            }
            Py_CLEAR(self->owner->token);
        }
        self->state = RC_UNMEASURED;
        PyObject *app_args[3] = {self->scope, self->receive, self->send};
        PyObject *awaitable = PyObject_Vectorcall(self->path->app, app_args, 3, NULL);
        self->inner = awaitable ? await_iter(awaitable) : NULL;
        Py_XDECREF(awaitable);
        if (self->inner == NULL) {
            self->state = RC_DONE;
            return -1;
        }
    }
    return 0;
}

static PySendResult
rc_am_send(RequestCall *self, PyObject *arg, PyObject **result)
{
    if (self->state == RC_NEW && rc_start(self) < 0) {
        *result = NULL;
        return PYGEN_ERROR;
    }
    if (self->state == RC_DONE) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        *result = NULL;
        return PYGEN_ERROR;
    }
    PySendResult status = PyIter_Send(self->inner, arg, result);
    if (status != PYGEN_NEXT) {
        if (self->state == RC_MEASURED) {
            rc_end(self, status == PYGEN_ERROR, 1);
        }
        self->state = RC_DONE;
        if (status == PYGEN_RETURN) { /* as `await self.app(...)` in _call: None */
            Py_SETREF(*result, Py_NewRef(Py_None));
        }
    }
    return status;
}

static PyObject *
rc_send(RequestCall *self, PyObject *arg)
{
    PyObject *result;
    PySendResult status = rc_am_send(self, arg, &result);
    return send_method_result(status, result);
}

static PyObject *
rc_iternext(RequestCall *self)
{
    return rc_send(self, Py_None);
}

/* Raise what throw(typ[, val[, tb]]) was given, as a coroutine that is not running does. */
static PyObject *
raise_thrown(PyObject *args)
{
    PyObject *typ, *val = NULL, *tb = NULL;
    if (!PyArg_UnpackTuple(args, "throw", 1, 3, &typ, &val, &tb)) {
        return NULL;
    }
    if (PyExceptionInstance_Check(typ)) {
        PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
    }
    else if (PyExceptionClass_Check(typ)) {
        PyErr_SetObject(typ, val != NULL ? val : Py_None);
    }
    else {
        PyErr_SetString(PyExc_TypeError,
                        "exceptions must be classes or instances deriving from BaseException");
    }
    return NULL;
}

/* it.throw(*args); where it has no throw(), the exception is raised here, as `await` does. */
static PyObject *
throw_into(PyObject *it, PyObject *args)
{
    PyObject *throw = PyObject_GetAttr(it, s_throw);
    if (throw == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
            return NULL;
        }
        PyErr_Clear();
        return raise_thrown(args);
    }
    PyObject *result = PyObject_Call(throw, args, NULL);
    Py_DECREF(throw);
    return result;
}

/* it.close(), where it has one (its result; else None). */
static PyObject *
close_iter(PyObject *it)
{
    PyObject *close = PyObject_GetAttr(it, s_close);
    if (close == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
            return NULL;
        }
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    PyObject *result = PyObject_CallNoArgs(close);
    Py_DECREF(close);
    return result;
}

static PyObject *
rc_throw(RequestCall *self, PyObject *args)
{
    if (self->state == RC_NEW && rc_start(self) < 0) {
        return NULL;
    }
    if (self->state == RC_DONE) {
        return raise_thrown(args);
    }
    PyObject *result = throw_into(self->inner, args);
    if (result != NULL) {
        return result; /* the app caught it and awaits again */
    }
    int returned = PyErr_ExceptionMatches(PyExc_StopIteration);
    if (returned) { /* as `await self.app(...)` in _call: None */
        PyErr_Clear();
        PyErr_SetNone(PyExc_StopIteration);
    }
    if (self->state == RC_MEASURED) {
        rc_end(self, !returned, 1);
    }
    self->state = RC_DONE;
    return NULL;
}

static PyObject *
rc_close_impl(RequestCall *self, int reset)
{
    PyObject *result = Py_NewRef(Py_None);
    if (self->state == RC_MEASURED || self->state == RC_UNMEASURED) {
        Py_SETREF(result, close_iter(self->inner));
        if (self->state == RC_MEASURED) {
            rc_end(self, 1, reset); /* GeneratorExit: the request did not finish */
        }
    }
    self->state = RC_DONE;
    return result;
}

static PyObject *
rc_close(RequestCall *self, PyObject *Py_UNUSED(ignored))
{
    return rc_close_impl(self, 1);
}

/* Dropped while the app was still running (as a coroutine, closed): out of flight and
 * recorded; the variable is reset where that is still possible. */
static void
rc_finalize(RequestCall *self)
{
    if (self->state != RC_MEASURED && self->state != RC_UNMEASURED) {
        return;
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *r = rc_close_impl(self, 0);
    if (r == NULL) {
        PyErr_WriteUnraisable((PyObject *)self);
    }
    Py_XDECREF(r);
    PyErr_Restore(type, value, tb);
}

static PyObject *
rc_await(RequestCall *self)
{
    return Py_NewRef(self);
}

static PyObject *
rc_get_await(RequestCall *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->inner != NULL && self->state != RC_DONE ? self->inner : Py_None);
}

static PyObject *
rc_repr(RequestCall *self)
{
    return PyUnicode_FromFormat("<loopwatch request %R>", self->owner ? (PyObject *)self->owner
                                                                      : Py_None);
}

static int
rc_traverse(RequestCall *self, visitproc visit, void *arg)
{
    Py_VISIT(self->path);
    Py_VISIT(self->scope);
    Py_VISIT(self->receive);
    Py_VISIT(self->send);
    Py_VISIT(self->root_path);
    Py_VISIT(self->owner);
    Py_VISIT(self->inner);
    return 0;
}

static int
rc_clear(RequestCall *self)
{
    Py_CLEAR(self->path);
    Py_CLEAR(self->scope);
    Py_CLEAR(self->receive);
    Py_CLEAR(self->send);
    Py_CLEAR(self->root_path);
    Py_CLEAR(self->owner);
    Py_CLEAR(self->inner);
    return 0;
}

static void
rc_dealloc(RequestCall *self)
{
    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0) {
        return; /* resurrected */
    }
    PyObject_GC_UnTrack(self);
    rc_clear(self);
    PyObject_GC_Del(self);
}

static PyMethodDef rc_methods[] = {
    {"send", (PyCFunction)rc_send, METH_O, "Run the request's next step."},
    {"throw", (PyCFunction)rc_throw, METH_VARARGS, "Throw into the app."},
    {"close", (PyCFunction)rc_close, METH_NOARGS, "Close the app's coroutine."},
    {NULL},
};

static PyGetSetDef rc_getset[] = {
    {"cr_await", (getter)rc_get_await, NULL, "The app's awaitable, while it runs.", NULL},
    {NULL},
};

static PyAsyncMethods rc_as_async = {
    .am_await = (unaryfunc)rc_await,
    .am_send = (sendfunc)rc_am_send,
};

static PyTypeObject RequestCallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._speedups.RequestCall",
    .tp_doc = "One measured HTTP request: awaiting it runs the app under the request's owner.",
    .tp_basicsize = sizeof(RequestCall),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = (destructor)rc_dealloc,
    .tp_finalize = (destructor)rc_finalize,
    .tp_traverse = (traverseproc)rc_traverse,
    .tp_clear = (inquiry)rc_clear,
    .tp_as_async = &rc_as_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)rc_iternext,
    .tp_repr = (reprfunc)rc_repr,
    .tp_methods = rc_methods,
    .tp_getset = rc_getset,
};

/* Whether `path` (a str) is excluded: one of the excluded paths, or under one of their
 * prefixes (-1: an error). A few excluded paths are compared by length first, without
 * hashing the path. */
static int
path_excluded(RequestPath *self, PyObject *path)
{
    Py_ssize_t length = PyUnicode_GET_LENGTH(path);
    if (self->exclude_items != NULL) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->exclude_items); i++) {
            PyObject *item = PyTuple_GET_ITEM(self->exclude_items, i);
            if (PyUnicode_GET_LENGTH(item) == length) {
                if (str_eq(path, item)) {
                    return 1;
                }
            }
        }
    }
    else {
        int found = PySet_Contains(self->exclude, path);
        if (found != 0) {
            return found;
        }
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->prefixes); i++) {
        PyObject *prefix = PyTuple_GET_ITEM(self->prefixes, i);
        if (PyUnicode_GET_LENGTH(prefix) <= length && str_startswith(path, prefix)) {
            return 1;
        }
    }
    return 0;
}

/* path(scope, receive, send): what the middleware's __call__ returns. */
static PyObject *
rp_vectorcall(RequestPath *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    StepState *state = (StepState *)self->monitor;
    PyObject *scope = nargs == 3 && kwnames == NULL ? args[0] : NULL;
    if (scope == NULL || !PyDict_CheckExact(scope) || !state->active ||
            state->step_start == 0.0 || PyThread_get_thread_ident() != self->thread) {
        goto own_coroutine; /* not in a step this monitor times: not (yet) the fast path */
    }
    PyObject *type = PyDict_GetItemWithError(scope, s_type);
    if (type != s_http && (type == NULL || !PyUnicode_Check(type) ||
                           !str_is(type, s_http))) {
        PyErr_Clear();
        goto own_coroutine;
    }
    PyObject *p = PyDict_GetItemWithError(scope, s_path);
    if (p == NULL || !PyUnicode_Check(p)) {
        PyErr_Clear();
        goto own_coroutine;
    }
    int excluded = path_excluded(self, p);
    if (UNLIKELY(excluded < 0)) {
        PyErr_Clear();
        goto own_coroutine;
    }
    if (excluded) {
        return PyObject_Vectorcall(self->app, args, 3, NULL);
    }
    RequestCall *call = PyObject_GC_New(RequestCall, &RequestCallType);
    if (call == NULL) {
        return NULL;
    }
    call->path = (RequestPath *)Py_NewRef(self);
    call->scope = Py_NewRef(scope);
    call->receive = Py_NewRef(args[1]);
    call->send = Py_NewRef(args[2]);
    call->root_path = NULL;
    call->owner = NULL;
    call->inner = NULL;
    call->start = 0.0;
    call->state = RC_NEW;
    PyObject_GC_Track(call);
    return (PyObject *)call;

own_coroutine:;
    PyObject *own = PyObject_GetAttr(self->middleware, s_own_call);
    if (own == NULL) {
        return NULL;
    }
    PyObject *result = PyObject_Vectorcall(own, args, nargsf, kwnames);
    Py_DECREF(own);
    return result;
}

static PyObject *
rp_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *middleware, *app, *monitor, *exclude, *prefixes, *cache, *in_flight;
    static char *kwlist[] = {"middleware", "app", "monitor", "exclude", "prefixes", "cache",
                             "in_flight", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO!O!O!O:RequestPath", kwlist,
                                     &middleware, &app, &monitor, &PyFrozenSet_Type, &exclude,
                                     &PyTuple_Type, &prefixes, &PyDict_Type, &cache,
                                     &in_flight)) {
        return NULL;
    }
    if (!Py_IS_TYPE(in_flight, &InFlightType) && !PySet_CheckExact(in_flight)) {
        PyErr_SetString(PyExc_TypeError, "RequestPath: in_flight must be an InFlight or a set");
        return NULL;
    }
    if (!PyObject_TypeCheck(monitor, &StepStateType)) {
        PyErr_SetString(PyExc_TypeError, "RequestPath: monitor must be a StepState");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(prefixes); i++) {
        if (!PyUnicode_Check(PyTuple_GET_ITEM(prefixes, i))) {
            PyErr_SetString(PyExc_TypeError, "RequestPath: prefixes must be str");
            return NULL;
        }
    }
    PyObject *items = NULL; /* few excluded paths, all str: a tuple to compare by length */
    if (PySet_GET_SIZE(exclude) <= 8) {
        items = PySequence_Tuple(exclude);
        if (items == NULL) {
            return NULL;
        }
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(items); i++) {
            if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(items, i))) {
                Py_CLEAR(items);
                break;
            }
        }
    }
    RequestPath *self = PyObject_GC_New(RequestPath, type);
    if (self == NULL) {
        Py_XDECREF(items);
        return NULL;
    }
    self->middleware = Py_NewRef(middleware);
    self->app = Py_NewRef(app);
    self->monitor = Py_NewRef(monitor);
    self->exclude = Py_NewRef(exclude);
    self->exclude_items = items;
    self->last.method = self->last.route = self->last.entry = NULL;
    self->prefixes = Py_NewRef(prefixes);
    self->cache = Py_NewRef(cache);
    self->in_flight = Py_NewRef(in_flight);
    self->thread = PyThread_get_thread_ident();
    self->vectorcall = (vectorcallfunc)rp_vectorcall;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static int
rp_traverse(RequestPath *self, visitproc visit, void *arg)
{
    Py_VISIT(self->middleware);
    Py_VISIT(self->app);
    Py_VISIT(self->monitor);
    Py_VISIT(self->exclude);
    Py_VISIT(self->exclude_items);
    Py_VISIT(self->last.method);
    Py_VISIT(self->last.route);
    Py_VISIT(self->last.entry);
    Py_VISIT(self->prefixes);
    Py_VISIT(self->cache);
    Py_VISIT(self->in_flight);
    return 0;
}

static int
rp_clear(RequestPath *self)
{
    Py_CLEAR(self->middleware);
    Py_CLEAR(self->app);
    Py_CLEAR(self->monitor);
    Py_CLEAR(self->exclude);
    Py_CLEAR(self->exclude_items);
    last_hit_clear(&self->last);
    Py_CLEAR(self->prefixes);
    Py_CLEAR(self->cache);
    Py_CLEAR(self->in_flight);
    return 0;
}

static void
rp_dealloc(RequestPath *self)
{
    PyObject_GC_UnTrack(self);
    rp_clear(self);
    PyObject_GC_Del(self);
}

static PyTypeObject RequestPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._speedups.RequestPath",
    .tp_doc = "RequestPath(middleware, app, monitor, exclude, prefixes, cache, in_flight): "
              "what LoopWatchMiddleware.__call__ hands each request to.",
    .tp_basicsize = sizeof(RequestPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = rp_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(RequestPath, vectorcall),
    .tp_dealloc = (destructor)rp_dealloc,
    .tp_traverse = (traverseproc)rp_traverse,
    .tp_clear = (inquiry)rp_clear,
};

/* -- FinalSend: the last body goes out without the request in its context ------------------ */

/* The server's send of a request's last body message, while the request's owner is not in
 * the context: a server that starts a timer there (uvicorn's keep-alive timeout) copies the
 * context, and the copy, kept until the timer is gone (seconds), would otherwise keep the
 * owner and the context variable's HAMT nodes of every request: a few objects per request
 * that drive the garbage collector. The owner is back in the context as each step of the
 * send returns, so the rest of the request (background tasks) is charged to it as before. */
typedef struct {
    PyObject_HEAD
    RequestOwner *owner;
    PyObject *it;           /* the server's awaitable, as an iterator */
} FinalSend;

static PyTypeObject FinalSendType;

/* Take the owner out of the current context, if this is the request's own (1: taken). */
static int
owner_out(RequestOwner *owner)
{
    if (owner->token == NULL) {
        return 0;
    }
    PyObject *current = current_owner_value();
    Py_XDECREF(current);
    if (current != (PyObject *)owner || owner_reset(owner) < 0) {
        PyErr_Clear(); /* another task's context (it inherited the owner): left as it is */
        return 0;
    }
    return 1;
}

static void
owner_in(RequestOwner *owner)
{
    Pending pending;
    pending_save(&pending);
    owner->token = PyContextVar_Set(owner_var, (PyObject *)owner);
    if (owner->token == NULL) {
        PyErr_WriteUnraisable((PyObject *)owner);
    }
    pending_restore(&pending);
}

static PySendResult
fs_am_send(FinalSend *self, PyObject *arg, PyObject **result)
{
    int out = owner_out(self->owner);
    PySendResult status = PyIter_Send(self->it, arg, result);
    if (out) {
        owner_in(self->owner);
    }
    return status;
}

static PyObject *
fs_send(FinalSend *self, PyObject *arg)
{
    PyObject *result;
    PySendResult status = fs_am_send(self, arg, &result);
    return send_method_result(status, result);
}

static PyObject *
fs_iternext(FinalSend *self)
{
    return fs_send(self, Py_None);
}

static PyObject *
fs_throw(FinalSend *self, PyObject *args)
{
    int out = owner_out(self->owner);
    PyObject *result = throw_into(self->it, args);
    if (out) {
        owner_in(self->owner);
    }
    return result;
}

static PyObject *
fs_close(FinalSend *self, PyObject *Py_UNUSED(ignored))
{
    return close_iter(self->it);
}

static PyObject *
fs_await(FinalSend *self)
{
    return Py_NewRef(self);
}

static PyObject *
fs_get_await(FinalSend *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->it);
}

static int
fs_traverse(FinalSend *self, visitproc visit, void *arg)
{
    Py_VISIT(self->owner);
    Py_VISIT(self->it);
    return 0;
}

static int
fs_clear(FinalSend *self)
{
    Py_CLEAR(self->owner);
    Py_CLEAR(self->it);
    return 0;
}

static void
fs_dealloc(FinalSend *self)
{
    PyObject_GC_UnTrack(self);
    fs_clear(self);
    PyObject_GC_Del(self);
}

static PyMethodDef fs_methods[] = {
    {"send", (PyCFunction)fs_send, METH_O, "Run the send's next step."},
    {"throw", (PyCFunction)fs_throw, METH_VARARGS, "Throw into the server's send."},
    {"close", (PyCFunction)fs_close, METH_NOARGS, "Close the server's send."},
    {NULL},
};

static PyGetSetDef fs_getset[] = {
    {"cr_await", (getter)fs_get_await, NULL, "The server's awaitable.", NULL},
    {NULL},
};

static PyAsyncMethods fs_as_async = {
    .am_await = (unaryfunc)fs_await,
    .am_send = (sendfunc)fs_am_send,
};

static PyTypeObject FinalSendType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._speedups.FinalSend",
    .tp_doc = "The server's send of a request's last body, without the request in the context.",
    .tp_basicsize = sizeof(FinalSend),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = (destructor)fs_dealloc,
    .tp_traverse = (traverseproc)fs_traverse,
    .tp_clear = (inquiry)fs_clear,
    .tp_as_async = &fs_as_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)fs_iternext,
    .tp_methods = fs_methods,
    .tp_getset = fs_getset,
};

/* The server's send(message) for the last body: a FinalSend around its awaitable. */
static PyObject *
final_send(RequestOwner *owner, PyObject *awaitable)
{
    PyObject *it = await_iter(awaitable);
    if (it == NULL) { /* not awaitable: for the app to find, as without loopwatch */
        PyErr_Clear();
        return awaitable;
    }
    Py_DECREF(awaitable);
    FinalSend *self = PyObject_GC_New(FinalSend, &FinalSendType);
    if (self == NULL) {
        Py_DECREF(it);
        return NULL;
    }
    self->owner = (RequestOwner *)Py_NewRef(owner);
    self->it = it;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

/* -- AsgiEntry: the middleware's __call__ ---------------------------------------------------- */

/* LoopWatchMiddleware.__call__: mw(scope, receive, send) is mw._serve(scope, receive, send)
 * (a RequestPath) while there is one, else the middleware's `async def _call`. It binds and
 * describes itself as that coroutine function does (name, code, signature), so servers and
 * frameworks that tell ASGI 3 apps by an async __call__ (uvicorn, Starlette, hypercorn,
 * asgiref, inspect.iscoroutinefunction on every Python version) still see one. */
typedef struct {
    PyObject_HEAD
    PyObject *function;     /* the async def it stands for */
    vectorcallfunc vectorcall;
} AsgiEntry;

static PyTypeObject AsgiEntryType;

/* ServeSlot: the middleware's base (with the C extension), its `_serve` a slot AsgiEntry
 * reads directly rather than by attribute (an instance dict lookup per request). */
typedef struct {
    PyObject_HEAD
    PyObject *serve;        /* the RequestPath, or None/NULL */
} ServeSlot;

static PyTypeObject ServeSlotType;

static int
slot_traverse(ServeSlot *self, visitproc visit, void *arg)
{
    Py_VISIT(self->serve);
    return 0;
}

static int
slot_clear(ServeSlot *self)
{
    Py_CLEAR(self->serve);
    return 0;
}

static void
slot_dealloc(ServeSlot *self)
{
    PyObject_GC_UnTrack(self);
    slot_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* object.__new__, so that a Python subclass's instances are set up as any class's are (their
 * attributes in the inline values that the interpreter's specialized loads read, not in a
 * dict); the arguments are for the subclass's __init__. */
static PyObject *
slot_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (type == &ServeSlotType &&
            (PyTuple_GET_SIZE(args) != 0 || (kwds != NULL && PyDict_GET_SIZE(kwds) != 0))) {
        PyErr_SetString(PyExc_TypeError, "ServeSlot() takes no arguments");
        return NULL;
    }
    PyObject *none = PyTuple_New(0);
    if (none == NULL) {
        return NULL;
    }
    PyObject *self = PyBaseObject_Type.tp_new(type, none, NULL);
    Py_DECREF(none);
    return self;
}

static PyMemberDef slot_members[] = {
    {"_serve", T_OBJECT, offsetof(ServeSlot, serve), 0,
     "The C request path while the monitor runs, else None."},
    {NULL},
};

static PyTypeObject ServeSlotType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._speedups.ServeSlot",
    .tp_doc = "The middleware's base: its _serve in a slot that its __call__ reads.",
    .tp_basicsize = sizeof(ServeSlot),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = slot_new,
    .tp_dealloc = (destructor)slot_dealloc,
    .tp_traverse = (traverseproc)slot_traverse,
    .tp_clear = (inquiry)slot_clear,
    .tp_members = slot_members,
};

static PyObject *
ae_vectorcall(AsgiEntry *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs == 4 && kwnames == NULL) {
        PyObject *serve;
        if (LIKELY(PyObject_TypeCheck(args[0], &ServeSlotType))) {
            serve = ((ServeSlot *)args[0])->serve;
            serve = Py_NewRef(serve != NULL ? serve : Py_None);
        }
        else {
            serve = PyObject_GetAttr(args[0], s_serve);
        }
        if (serve == NULL) {
            PyErr_Clear();
        }
        else if (serve != Py_None) {
            PyObject *result = PyObject_Vectorcall(serve, args + 1, 3, NULL);
            Py_DECREF(serve);
            return result;
        }
        else {
            Py_DECREF(serve);
        }
    }
    return PyObject_Vectorcall(self->function, args, nargsf, kwnames);
}

static PyObject *
ae_descr_get(PyObject *self, PyObject *obj, PyObject *Py_UNUSED(type))
{
    if (obj == NULL || obj == Py_None) {
        return Py_NewRef(self);
    }
    return PyMethod_New(self, obj);
}

static PyObject *
ae_getattro(AsgiEntry *self, PyObject *name)
{
    /* __name__, __qualname__, __doc__, __code__, __defaults__, __annotations__, ...: the
     * function's, as inspect reads them (inspect._signature_is_functionlike) */
    if (PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, "__doc__") == 0) {
        return PyObject_GetAttr(self->function, name);
    }
    PyObject *value = PyObject_GenericGetAttr((PyObject *)self, name);
    if (value == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        value = PyObject_GetAttr(self->function, name);
    }
    return value;
}

static PyObject *
ae_repr(AsgiEntry *self)
{
    return PyUnicode_FromFormat("<loopwatch ASGI entry for %R>", self->function);
}

static PyObject *
ae_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *function;
    static char *kwlist[] = {"function", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:AsgiEntry", kwlist, &function)) {
        return NULL;
    }
    if (!PyCallable_Check(function)) {
        PyErr_SetString(PyExc_TypeError, "AsgiEntry: function must be callable");
        return NULL;
    }
    AsgiEntry *self = PyObject_GC_New(AsgiEntry, type);
    if (self == NULL) {
        return NULL;
    }
    self->function = Py_NewRef(function);
    self->vectorcall = (vectorcallfunc)ae_vectorcall;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static int
ae_traverse(AsgiEntry *self, visitproc visit, void *arg)
{
    Py_VISIT(self->function);
    return 0;
}

static int
ae_clear(AsgiEntry *self)
{
    Py_CLEAR(self->function);
    return 0;
}

static void
ae_dealloc(AsgiEntry *self)
{
    PyObject_GC_UnTrack(self);
    ae_clear(self);
    PyObject_GC_Del(self);
}

static PyTypeObject AsgiEntryType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._speedups.AsgiEntry",
    .tp_doc = "AsgiEntry(function): a middleware's __call__, the C request path first.",
    .tp_basicsize = sizeof(AsgiEntry),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_new = ae_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(AsgiEntry, vectorcall),
    .tp_descr_get = ae_descr_get,
    .tp_getattro = (getattrofunc)ae_getattro,
    .tp_repr = (reprfunc)ae_repr,
    .tp_dealloc = (destructor)ae_dealloc,
    .tp_traverse = (traverseproc)ae_traverse,
    .tp_clear = (inquiry)ae_clear,
};

/* -- module ------------------------------------------------------------------------------- */

static PyObject *
configure(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwds)
{
    PyObject *var, *run, *task, *label;
    int inline_body = 0;
    static char *kwlist[] = {"owner_var", "original_run", "current_task", "labeler",
                             "inline_run", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|p:configure", kwlist,
                                     &var, &run, &task, &label, &inline_body)) {
        return NULL;
    }
    inline_run = inline_body;
    if (!PyContextVar_CheckExact(var)) {
        PyErr_SetString(PyExc_TypeError, "owner_var must be a ContextVar");
        return NULL;
    }
    Py_XSETREF(owner_var, Py_NewRef(var));
    Py_XSETREF(original_run, Py_NewRef(run));
    Py_XSETREF(current_task, Py_NewRef(task));
    Py_XSETREF(labeler, Py_NewRef(label));
    Py_RETURN_NONE;
}

static PyObject *
clock_now(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    double t = now();
    if (NOW_FAILED(t)) {
        return NULL;
    }
    return PyFloat_FromDouble(t);
}

static PyMethodDef module_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_VARARGS | METH_KEYWORDS,
     "configure(owner_var, original_run, current_task, labeler, inline_run=False)"},
    {"handle_run", (PyCFunction)(void (*)(void))handle_run, METH_FASTCALL,
     "handle_run(Handle[, TimerHandle]): a timed Handle._run."},
    {"unwrap_get_coro", (PyCFunction)unwrap_get_coro, METH_O,
     "unwrap_get_coro(task_type) -> bool: whether task_type.get_coro() now returns a "
     "TimedCoroutine's own coroutine (done once per process, to a C get_coro of the "
     "type's own)."},
    {"timed", (PyCFunction)(void (*)(void))timed, METH_FASTCALL,
     "timed(coro, monitor): a TimedCoroutine."},
    {"new_owner", (PyCFunction)(void (*)(void))new_owner, METH_FASTCALL,
     "new_owner(scope, root_path, send): a RequestOwner."},
    {"finish", (PyCFunction)(void (*)(void))finish, METH_FASTCALL,
     "finish(owner, monitor, start, cache, scope, root_path): record a finished request."},
    {"release", (PyCFunction)(void (*)(void))release_owner, METH_FASTCALL,
     "release(owner, method, route): keep the labels, let go of the request."},
    {"clock", clock_now, METH_NOARGS, "The clock the hot path reads (time.perf_counter)."},
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "loopwatch._speedups",
    "loopwatch's hot path in C (optional: the pure-Python path does the same).", -1,
    module_methods,
};

#define INTERN(var, text)                                  \
    do {                                                   \
        if ((var = PyUnicode_InternFromString(text)) == NULL) \
            return NULL;                                   \
    } while (0)

PyMODINIT_FUNC
PyInit__speedups(void)
{
    INTERN(s_step_start, "step_start");
    INTERN(s_busy, "busy");
    INTERN(s_threshold, "threshold");
    INTERN(s_on_block, "on_block");
    INTERN(s_monitor_attr, "_loopwatch_monitor");
    INTERN(s_loop, "_loop");
    INTERN(s_context, "_context");
    INTERN(s_callback, "_callback");
    INTERN(s_get, "get");
    INTERN(s_type, "type");
    INTERN(s_status, "status");
    INTERN(s_more_body, "more_body");
    INTERN(s_response_start, "http.response.start");
    INTERN(s_close, "close");
    INTERN(s_throw, "throw");
    INTERN(s_await, "__await__");
    INTERN(s_run, "run");
    INTERN(s_args, "_args");
    INTERN(s_get_coro, "get_coro");
    INTERN(s_context_kw, "context");
    INTERN(s_route, "route");
    INTERN(s_root_path, "root_path");
    INTERN(s_method, "method");
    INTERN(s_http, "http");
    INTERN(s_path, "path");
    INTERN(s_empty, "");
    INTERN(s_record_first, "_record_first");
    INTERN(s_own_call, "_call");
    INTERN(s_serve, "_serve");
    if ((kw_loop = Py_BuildValue("(s)", "loop")) == NULL ||
            (kw_loop_context = Py_BuildValue("(ss)", "loop", "context")) == NULL) {
        return NULL;
    }
    if ((zero_float = PyFloat_FromDouble(0.0)) == NULL) {
        return NULL;
    }
#if !defined(__linux__)
    PyObject *time_module = PyImport_ImportModule("time");
    if (time_module == NULL) {
        return NULL;
    }
    perf_counter = PyObject_GetAttrString(time_module, "perf_counter");
    Py_DECREF(time_module);
    if (perf_counter == NULL) {
        return NULL;
    }
#endif
    if (PyType_Ready(&TimedCoroutineType) < 0 || PyType_Ready(&RequestOwnerType) < 0 ||
            PyType_Ready(&TotalsType) < 0 || PyType_Ready(&StepStateType) < 0 ||
            PyType_Ready(&ReraiserType) < 0 || PyType_Ready(&TaskFactoryType) < 0 ||
            PyType_Ready(&RequestPathType) < 0 || PyType_Ready(&RequestCallType) < 0 ||
            PyType_Ready(&AsgiEntryType) < 0 || PyType_Ready(&FinalSendType) < 0 ||
            PyType_Ready(&ServeSlotType) < 0 || PyType_Ready(&InFlightType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "TimedCoroutine", (PyObject *)&TimedCoroutineType) < 0 ||
            PyModule_AddObjectRef(m, "RequestOwner", (PyObject *)&RequestOwnerType) < 0 ||
            PyModule_AddObjectRef(m, "Totals", (PyObject *)&TotalsType) < 0 ||
            PyModule_AddObjectRef(m, "StepState", (PyObject *)&StepStateType) < 0 ||
            PyModule_AddObjectRef(m, "TaskFactory", (PyObject *)&TaskFactoryType) < 0 ||
            PyModule_AddObjectRef(m, "RequestPath", (PyObject *)&RequestPathType) < 0 ||
            PyModule_AddObjectRef(m, "RequestCall", (PyObject *)&RequestCallType) < 0 ||
            PyModule_AddObjectRef(m, "AsgiEntry", (PyObject *)&AsgiEntryType) < 0 ||
            PyModule_AddObjectRef(m, "ServeSlot", (PyObject *)&ServeSlotType) < 0 ||
            PyModule_AddObjectRef(m, "InFlight", (PyObject *)&InFlightType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
