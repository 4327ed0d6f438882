/* loopwatch._ctiming: loop-step timing in C (optional; loopwatch falls back to pure Python).
 *
 * Exactly what loopwatch/_hooks.py does around each loop step, and nothing else:
 *
 *   StepState       the base of Monitor: the fields every step reads and writes, as C doubles
 *   OwnerState      the base of every owner: its busy time and its wait for others (see
 *                   _waiting.py), C doubles the hooks write
 *   handle_run()    asyncio: the Handle._run replacement (_hooks._timed_run). It times the
 *                   original Handle._run; once _hooks.verify_inline() has seen that it
 *                   answers exactly as the original does, it runs the callback in its
 *                   context itself (no Python frame for Handle._run) and has the original
 *                   report an exception (which it raises again inside it). To whoever
 *                   inspects it, it is the original function (__code__, __wrapped__ ...).
 *   TimedCoroutine  uvloop: wraps a task's coroutine and times each step through the am_send
 *                   slot, so the C Task keeps its fast path (_hooks.TimedCoroutine); the
 *                   task factory that makes those tasks is _factory.py, compiled by Cython
 *
 * Before a step (begin_step()): its start, and the loop's run (_waiting.begin_step). After a
 * step (account()): the monitor's busy time, the owner's (the ContextVar of the step's
 * context) and the owner's wait before the step (_waiting.charge_wait), and
 * monitor._on_block(t0, dt, owner, what) for a step of the threshold or more. A
 * failure there is counted by monitor._internal_error("step accounting"), as in Python; the
 * step's own result or exception goes on unchanged. Only the stable C API is used (the
 * pending exception is set aside with PyErr_GetRaisedException from 3.12, PyErr_Fetch before).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "structmember.h"
#include <time.h>

#if defined(__GNUC__) || defined(__clang__)
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#define NOINLINE __attribute__((noinline))
#else
#define LIKELY(x) (x)
#define UNLIKELY(x) (x)
#define NOINLINE
#endif

/* -- the pending exception, set aside around loopwatch's own work ---------------------------- */

#if PY_VERSION_HEX >= 0x030C0000
typedef struct { PyObject *exc; } Pending;
static inline void pending_save(Pending *p) { p->exc = PyErr_GetRaisedException(); }
static inline void pending_restore(Pending *p)
{
    if (PyErr_Occurred()) {
        PyErr_Clear();
    }
    if (p->exc != NULL) {
        PyErr_SetRaisedException(p->exc);
    }
}
#else
typedef struct { PyObject *type, *value, *tb; } Pending;
static inline void pending_save(Pending *p) { PyErr_Fetch(&p->type, &p->value, &p->tb); }
static inline void pending_restore(Pending *p)
{
    if (PyErr_Occurred()) {
        PyErr_Clear();
    }
    if (p->type != NULL) {
        PyErr_Restore(p->type, p->value, p->tb);
    }
}
#endif

/* -- set once ---------------------------------------------------------------------------------- */

static PyObject *owner_var;   /* the ContextVar holding the current owner */
static PyTypeObject *owner_type; /* another type laid out as OwnerState (configure()) */
static PyObject *s_on_block, *s_internal_error, *s_accounting, *s_monitor_attr, *s_loop,
    *s_context, *s_callback, *s_args, *s_get, *s_busy, *s_throw, *s_close, *s_await,
    *s_wake_due;

/* The clock of time.perf_counter(), the one the watchdog thread compares step_start with. */
#if defined(__linux__)
static inline double
now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    /* as CPython's _PyTime_AsSecondsDouble: the very double perf_counter() returns */
    long long ns = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    if (ns % 1000000000LL == 0) {
        return (double)(ns / 1000000000LL);
    }
    return (double)ns / 1e9;
}
#else
static PyObject *perf_counter;
static inline double
now(void)
{
    PyObject *t = PyObject_CallNoArgs(perf_counter);
    double d = t == NULL ? 0.0 : PyFloat_AsDouble(t);
    Py_XDECREF(t);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return 0.0;
    }
    return d;
}
#endif

/* -- StepState --------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    double step_start;
    double busy;
    double threshold;
    double last_end, idle, run_start, last_gap, long_end, due, idle_gap, look_after; /* _waiting */
    char active;
} StepState;

static PyMemberDef ss_members[] = {
    {"step_start", T_DOUBLE, offsetof(StepState, step_start), 0,
     "perf_counter() at the start of the running step (0: none)."},
    {"busy", T_DOUBLE, offsetof(StepState, busy), 0, "Seconds the loop ran steps."},
    {"threshold", T_DOUBLE, offsetof(StepState, threshold), 0, "Block threshold (seconds)."},
    {"last_end", T_DOUBLE, offsetof(StepState, last_end), 0, "When the last step ended."},
    {"idle", T_DOUBLE, offsetof(StepState, idle), 0, "Seconds of the loop's pauses so far."},
    {"long_end", T_DOUBLE, offsetof(StepState, long_end), 0,
     "When the last step of look_after or more ended."},
    {"run_start", T_DOUBLE, offsetof(StepState, run_start), 0,
     "When the loop last started running without a pause."},
    {"last_gap", T_DOUBLE, offsetof(StepState, last_gap), 0, "How long that pause was."},
    {"due", T_DOUBLE, offsetof(StepState, due), 0,
     "The running step's timer due time (0: none known)."},
    {"idle_gap", T_DOUBLE, offsetof(StepState, idle_gap), 0,
     "A longer time between two steps is a pause of the loop."},
    {"look_after", T_DOUBLE, offsetof(StepState, look_after), 0,
     "After a run this long, a step's timer is looked up."},
    {"active", T_BOOL, offsetof(StepState, active), 0, "Whether the monitor is running."},
    {NULL},
};

static PyTypeObject StepStateType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._ctiming.StepState",
    .tp_doc = "The fields a loop monitor's step hooks write (the base class of Monitor).",
    .tp_basicsize = sizeof(StepState),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_members = ss_members,
};

/* -- OwnerState -------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    double busy;
    double delayed, last_end, others_mark, ended, timer_end; /* see _waiting.py */
} OwnerState;

static PyMemberDef os_members[] = {
    {"busy", T_DOUBLE, offsetof(OwnerState, busy), 0,
     "Seconds of loop time the owner's steps held the loop."},
    {"delayed", T_DOUBLE, offsetof(OwnerState, delayed), 0,
     "Seconds the owner's steps were ready but others held the loop."},
    {"last_end", T_DOUBLE, offsetof(OwnerState, last_end), 0, "When its last step ended."},
    {"others_mark", T_DOUBLE, offsetof(OwnerState, others_mark), 0,
     "Time passed less pauses and its own steps, when its last step ended."},
    {"ended", T_DOUBLE, offsetof(OwnerState, ended), 0,
     "When its response was sent (0: not yet): later steps are charged no wait."},
    {"timer_end", T_DOUBLE, offsetof(OwnerState, timer_end), 0,
     "When its last step ended, if that was an asyncio timer's callback (else 0)."},
    {NULL},
};

static PyTypeObject OwnerStateType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._ctiming.OwnerState",
    .tp_doc = "What a step charges on its owner (the base class of every owner).",
    .tp_basicsize = sizeof(OwnerState),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_members = os_members,
};

/* -- after a step ------------------------------------------------------------------------------ */

/* Whether owner's busy time is a C double right after its header: an OwnerState, or of the
 * type configure() was given after it checked that layout. */
static inline int
fast_owner(PyObject *owner)
{
    return Py_TYPE(owner) == owner_type || PyObject_TypeCheck(owner, &OwnerStateType);
}

/* owner.busy += dt, by attribute (an owner that is no OwnerState) */
static int
charge(PyObject *owner, double dt)
{
    PyObject *busy = PyObject_GetAttr(owner, s_busy);
    if (busy == NULL) {
        return -1;
    }
    double value = PyFloat_AsDouble(busy);
    Py_DECREF(busy);
    if (value == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    PyObject *sum = PyFloat_FromDouble(value + dt);
    if (sum == NULL) {
        return -1;
    }
    int rc = PyObject_SetAttr(owner, s_busy, sum);
    Py_DECREF(sum);
    return rc;
}

static NOINLINE int
report_block(PyObject *mon, double t0, double dt, PyObject *owner, PyObject *what)
{
    PyObject *a = PyFloat_FromDouble(t0);
    PyObject *b = PyFloat_FromDouble(dt);
    PyObject *r = NULL;
    if (a != NULL && b != NULL) {
        PyObject *args[5] = {mon, a, b, owner, what};
        r = PyObject_VectorcallMethod(s_on_block, args, 5 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    }
    Py_XDECREF(a);
    Py_XDECREF(b);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* _waiting.running_wait: the owner's wait before its step that started at t0 */
static inline double
running_wait(StepState *state, OwnerState *o, double t0)
{
    double others = t0 - state->idle - o->busy - o->others_mark;
    double ready = o->last_end;
    int chained = ready == o->timer_end;
    if (LIKELY(others <= 0.0 && !chained && state->due == 0.0) || ready == 0.0 ||
            (o->ended != 0.0 && t0 >= o->ended)) {
        return 0.0;
    }
    double since = chained ? ready : (state->due != 0.0 ? state->due : state->run_start);
    if (since > ready) {
        ready = since;
    }
    double wait = t0 - ready;
    if (wait <= 0.0) {
        return 0.0;
    }
    if (chained || state->due != 0.0) {
        double pause_start = state->run_start - state->last_gap;
        double held = state->run_start - (ready > pause_start ? ready : pause_start);
        if (held > 0.0) {
            others += held;
        }
    }
    return others <= 0.0 ? 0.0 : (wait < others ? wait : others);
}

/* What _hooks._account does: the step's time to the monitor and the owner (None: nobody's),
 * the owner's wait before it, and a block of the threshold or more to the monitor. Never
 * raises: a failure is counted by the monitor as its internal error. The pending exception
 * (the step's) is kept. */
static void
account(StepState *state, double t0, double dt, PyObject *owner, PyObject *what, int timer)
{
    int slow_owner = 0;
    double end = t0 + dt;
    state->step_start = 0.0;
    state->last_end = end;
    if (dt >= state->look_after) {
        state->long_end = end;
    }
    state->busy += dt;
    if (owner != Py_None) {
        if (LIKELY(fast_owner(owner))) {
            OwnerState *o = (OwnerState *)owner;
            o->delayed += running_wait(state, o, t0);
            o->busy += dt;
            o->last_end = end;
            o->timer_end = timer ? end : 0.0;
            o->others_mark = end - state->idle - o->busy;
        }
        else {
            slow_owner = 1;
        }
    }
    if (LIKELY(!slow_owner && dt < state->threshold)) {
        return;
    }
    Pending pending;
    pending_save(&pending);
    int rc = slow_owner ? charge(owner, dt) : 0;
    if (rc == 0 && dt >= state->threshold) {
        rc = report_block((PyObject *)state, t0, dt, owner, what);
        state->last_end = now(); /* reporting held the loop too: no pause */
    }
    if (rc < 0) {
        PyErr_Clear();
        PyObject *r = PyObject_CallMethodOneArg((PyObject *)state, s_internal_error,
                                                s_accounting);
        if (r == NULL) {
            PyErr_WriteUnraisable((PyObject *)state);
        }
        Py_XDECREF(r);
    }
    pending_restore(&pending);
}

/* -- before a step ----------------------------------------------------------------------------- */

/* monitor._wake_due(t0, what): the due time of the timer that woke the step (0: none) */
static NOINLINE void
look_closer(StepState *state, double t0, PyObject *what)
{
    Pending pending;
    pending_save(&pending);
    PyObject *start = PyFloat_FromDouble(t0);
    PyObject *due = start == NULL ? NULL : PyObject_CallMethodObjArgs(
        (PyObject *)state, s_wake_due, start, what, NULL);
    double value = due == NULL ? 0.0 : PyFloat_AsDouble(due);
    state->due = value == -1.0 ? 0.0 : value;
    Py_XDECREF(start);
    Py_XDECREF(due);
    pending_restore(&pending); /* (the method reports its own failures) */
}

/* What _waiting.begin_step does: the step's start; the loop's pauses and run (a step that
 * starts more than idle_gap after the last one ended follows a pause), and, where `look`,
 * the due time of the step's timer. */
static inline void
begin_step(StepState *state, double t0, PyObject *what, int look)
{
    state->step_start = t0;
    state->due = 0.0;
    double gap = t0 - state->last_end;
    int paused = gap > state->idle_gap;
    if (paused) {
        state->idle += gap;
        state->run_start = t0;
        state->last_gap = gap;
    }
    if (UNLIKELY(look)) {
        look_closer(state, t0, what);
    }
}

/* The current context's owner (a new reference; None outside any, or on a failure). */
static PyObject *
current_owner(void)
{
    PyObject *owner = NULL;
    if (PyContextVar_Get(owner_var, Py_None, &owner) < 0) {
        PyErr_Clear();
        return Py_NewRef(Py_None);
    }
    return owner;
}

/* ctx.get(owner_var), a new reference (None on a failure): where ctx is a Context not
 * entered anywhere (the usual case after its handle ran), by entering it for the read. */
static PyObject *
context_owner(PyObject *ctx)
{
    PyObject *owner = NULL;
    if (ctx != NULL && PyContext_CheckExact(ctx) && PyContext_Enter(ctx) == 0) {
        owner = current_owner();
        if (PyContext_Exit(ctx) < 0) {
            PyErr_Clear();
        }
        return owner;
    }
    PyErr_Clear(); /* not a Context, or one entered elsewhere */
    if (ctx != NULL) {
        owner = PyObject_CallMethodOneArg(ctx, s_get, owner_var);
    }
    if (owner == NULL) {
        PyErr_Clear();
        return Py_NewRef(Py_None);
    }
    return owner;
}

/* -- Handle._run (asyncio) --------------------------------------------------------------------- */

/* A callable that binds as a method (Handle._run = handle_run(original)), and that looks like
 * the original function to anything that inspects it. */
typedef struct {
    PyObject_HEAD
    PyObject *original;     /* asyncio.events.Handle._run */
    char inline_run;        /* run the callback here (set by verify_inline()) */
    vectorcallfunc vectorcall;
} HandleRun;

static PyTypeObject HandleRunType;

/* The Handle fields the hook reads, straight from their slots for the types whose slots
 * handle_run() found (Handle, TimerHandle): an attribute lookup less each. The offsets come
 * from the types' member descriptors (public: PyMemberDef). */
enum { FIELD_LOOP, FIELD_CONTEXT, FIELD_CALLBACK, FIELD_ARGS, N_FIELDS };
static PyObject **field_names[N_FIELDS] = {&s_loop, &s_context, &s_callback, &s_args};
static Py_ssize_t field_offsets[N_FIELDS];
static PyTypeObject *slot_types[2]; /* held; NULL: read by attribute */
static PyTypeObject *timer_type;    /* asyncio's TimerHandle (held; the last handle type) */

/* handle.<field>, a new reference */
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

/* Whether `type` keeps every field in a plain object slot (then their offsets). */
static int
find_slots(PyTypeObject *type, Py_ssize_t *offsets)
{
    for (int i = 0; i < N_FIELDS; i++) {
        PyObject *descr = PyObject_GetAttr((PyObject *)type, *field_names[i]);
        int ok = descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type);
        if (ok) {
            PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
            ok = member->type == T_OBJECT_EX && !(member->flags & READONLY);
            offsets[i] = member->offset;
        }
        Py_XDECREF(descr);
        if (!ok) {
            PyErr_Clear();
            return 0;
        }
    }
    return 1;
}

/* Stands in for a handle's context while the original Handle._run reports an exception that
 * the callback raised when this module ran it: its first run() raises that very exception
 * inside the original's try, so asyncio reports it as it always does. Any later run() (a
 * custom exception handler, which 3.12+ runs in the handle's context) is the context's own. */
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
        PyObject *run = PyObject_GetAttrString(self->ctx, "run");
        if (run == NULL) {
            return NULL;
        }
        PyObject *result = PyObject_Vectorcall(run, args, (size_t)n, NULL);
        Py_DECREF(run);
        return result;
    }
    self->exc = NULL;
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
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
    .tp_name = "loopwatch._ctiming.Reraiser",
    .tp_basicsize = sizeof(Reraiser),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)reraiser_dealloc,
    .tp_getattro = (getattrofunc)reraiser_getattro,
    .tp_methods = reraiser_methods,
};

/* The callback's exception (pending) reported by the original Handle._run, exactly as when
 * the original runs the callback itself. */
static NOINLINE PyObject *
report_failure(HandleRun *self, PyObject *handle, PyObject *ctx)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc = PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL) {
        PyException_SetTraceback(value, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    PyObject *exc = value;
#endif
    if (exc == NULL) {
        PyErr_SetString(PyExc_SystemError, "Handle callback failed without an exception");
        return NULL;
    }
    Reraiser *reraiser = PyObject_New(Reraiser, &ReraiserType);
    if (reraiser == NULL) {
        Py_DECREF(exc);
        return NULL;
    }
    reraiser->exc = exc;
    reraiser->ctx = Py_NewRef(ctx);
    if (PyObject_SetAttr(handle, s_context, (PyObject *)reraiser) < 0) {
        Py_DECREF(reraiser);
        return NULL;
    }
    Py_DECREF(reraiser);
    PyObject *result = PyObject_CallOneArg(self->original, handle);
    Pending pending;
    pending_save(&pending);
    if (PyObject_SetAttr(handle, s_context, ctx) < 0) {
        PyErr_WriteUnraisable(handle);
    }
    pending_restore(&pending);
    return result;
}

/* What the original does, without a Python frame for it: ctx.run(callback, *args) -- enter
 * the context, call, leave -- and an exception other than SystemExit/KeyboardInterrupt to the
 * original, which reports it. The owner is read on the way out, still in the context. */
static PyObject *
run_inline(HandleRun *self, PyObject *handle, PyObject *ctx, PyObject *callback,
           PyObject **owner)
{
    PyObject *args = read_field(handle, FIELD_ARGS);
    if (args == NULL || !PyTuple_Check(args) || !PyContext_CheckExact(ctx)) {
        Py_XDECREF(args);
        PyErr_Clear();
        return PyObject_CallOneArg(self->original, handle);
    }
    PyObject *result = NULL;
    if (PyContext_Enter(ctx) == 0) {
        result = PyObject_Vectorcall(callback, &PyTuple_GET_ITEM(args, 0),
                                     (size_t)PyTuple_GET_SIZE(args), NULL);
        if (owner != NULL) {
            Pending pending;
            pending_save(&pending);
            *owner = current_owner();
            pending_restore(&pending);
        }
        if (PyContext_Exit(ctx) < 0) {
            Py_CLEAR(result);
        }
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
    return report_failure(self, handle, ctx);
}

/* run(handle): the original, timed when the handle's loop carries an active monitor */
static PyObject *
hr_run(HandleRun *self, PyObject *handle)
{
    PyObject *mon = NULL;
    PyObject *loop = read_field(handle, FIELD_LOOP);
    if (loop != NULL) {
        mon = PyObject_GetAttr(loop, s_monitor_attr);
        Py_DECREF(loop);
    }
    if (mon == NULL || mon == Py_None || !PyObject_TypeCheck(mon, &StepStateType)) {
        PyErr_Clear(); /* no loop of ours (not a BaseEventLoop, or not watched) */
        Py_XDECREF(mon);
        return PyObject_CallOneArg(self->original, handle);
    }
    StepState *state = (StepState *)mon;
    PyObject *ctx = read_field(handle, FIELD_CONTEXT);
    PyObject *callback = ctx == NULL ? NULL : read_field(handle, FIELD_CALLBACK);
    if (callback == NULL) {
        PyErr_Clear();
    }
    PyObject *owner = NULL;
    double t0 = now();
    /* asyncio's own timers: the due time of the one that runs (a task's step follows it) */
    int timer = timer_type != NULL && Py_TYPE(handle) == timer_type;
    begin_step(state, t0, handle, timer);
    PyObject *result = (self->inline_run && callback != NULL)
        ? run_inline(self, handle, ctx, callback, &owner)
        : PyObject_CallOneArg(self->original, handle);
    double dt = now() - t0;
    if (owner == NULL) {
        Pending pending;
        pending_save(&pending);
        owner = context_owner(ctx);
        pending_restore(&pending);
    }
    account(state, t0, dt, owner, callback == NULL ? Py_None : callback, timer);
    Py_DECREF(owner);
    Py_XDECREF(callback);
    Py_XDECREF(ctx);
    Py_DECREF(mon);
    return result;
}

static PyObject *
hr_vectorcall(HandleRun *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        return PyObject_Vectorcall(self->original, args, nargsf, kwnames);
    }
    return hr_run(self, args[0]);
}

/* handle._run: a bound method of this callable, as for a function */
static PyObject *
hr_descr_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None) {
        return Py_NewRef(self);
    }
    return PyMethod_New(self, obj);
}

/* __code__, __name__, __qualname__, __module__, __doc__, __wrapped__ ...: the original's */
static PyObject *
hr_getattro(HandleRun *self, PyObject *name)
{
    if (PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, "__wrapped__") == 0) {
        return Py_NewRef(self->original);
    }
    PyObject *value = PyObject_GenericGetAttr((PyObject *)self, name);
    if (value == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        value = PyObject_GetAttr(self->original, name);
    }
    return value;
}

static PyObject *
hr_repr(HandleRun *self)
{
    return PyUnicode_FromFormat("<loopwatch timing of %R>", self->original);
}

static int
hr_traverse(HandleRun *self, visitproc visit, void *arg)
{
    Py_VISIT(self->original);
    return 0;
}

static void
hr_dealloc(HandleRun *self)
{
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->original);
    PyObject_GC_Del(self);
}

static PyMemberDef hr_members[] = {
    {"_inline", T_BOOL, offsetof(HandleRun, inline_run), 0,
     "Whether callbacks run here (True: _hooks.verify_inline saw that this answers exactly "
     "as the original) or through the original."},
    {NULL},
};

static PyTypeObject HandleRunType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._ctiming.HandleRun",
    .tp_doc = "Handle._run, timed by loopwatch (the original inside).",
    .tp_basicsize = sizeof(HandleRun),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(HandleRun, vectorcall),
    .tp_descr_get = hr_descr_get,
    .tp_getattro = (getattrofunc)hr_getattro,
    .tp_members = hr_members,
    .tp_repr = (reprfunc)hr_repr,
    .tp_traverse = (traverseproc)hr_traverse,
    .tp_dealloc = (destructor)hr_dealloc,
};

/* handle_run(original, handle_types=()) */
static PyObject *
handle_run(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *original, *types = NULL;
    if (!PyArg_ParseTuple(args, "O|O!:handle_run", &original, &PyTuple_Type, &types)) {
        return NULL;
    }
    if (!PyCallable_Check(original)) {
        PyErr_SetString(PyExc_TypeError, "handle_run() takes the original Handle._run");
        return NULL;
    }
    /* The handle types' fields straight from their slots, where they are plain slots at the
     * same offsets in each; else by attribute. */
    Py_ssize_t n = types == NULL ? 0 : PyTuple_GET_SIZE(types);
    Py_ssize_t offsets[N_FIELDS], other[N_FIELDS];
    int fast = n >= 1 && n <= 2 && PyType_Check(PyTuple_GET_ITEM(types, 0)) &&
               find_slots((PyTypeObject *)PyTuple_GET_ITEM(types, 0), offsets);
    if (fast && n == 2) {
        fast = PyType_Check(PyTuple_GET_ITEM(types, 1)) &&
               find_slots((PyTypeObject *)PyTuple_GET_ITEM(types, 1), other) &&
               memcmp(offsets, other, sizeof(offsets)) == 0;
    }
    Py_CLEAR(slot_types[0]);
    Py_CLEAR(slot_types[1]);
    Py_CLEAR(timer_type);
    if (n == 2 && PyType_Check(PyTuple_GET_ITEM(types, 1))) {
        timer_type = (PyTypeObject *)Py_NewRef(PyTuple_GET_ITEM(types, 1));
    }
    if (fast) {
        memcpy(field_offsets, offsets, sizeof(offsets));
        slot_types[0] = (PyTypeObject *)Py_NewRef(PyTuple_GET_ITEM(types, 0));
        slot_types[1] = (PyTypeObject *)Py_NewRef(PyTuple_GET_ITEM(types, n - 1));
    }
    HandleRun *self = PyObject_GC_New(HandleRun, &HandleRunType);
    if (self == NULL) {
        return NULL;
    }
    self->original = Py_NewRef(original);
    self->inline_run = 0; /* until verify_inline() */
    self->vectorcall = (vectorcallfunc)hr_vectorcall;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

/* -- TimedCoroutine (uvloop) ------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *coro;
    PyObject *monitor;      /* a StepState */
    PyObject *weakreflist;
    double last_end;        /* when its last step ended (0: none yet) */
} TimedCoroutine;

static PyTypeObject TimedCoroutineType;

static inline double
begin_task_step(TimedCoroutine *self)
{
    double t0 = now();
    StepState *state = (StepState *)self->monitor;
    /* uvloop's timers run unseen: a task's sleep, if a long step ran while it waited */
    begin_step(state, t0, (PyObject *)self,
               self->last_end != 0.0 && state->long_end > self->last_end);
    return t0;
}

static void
end_task_step(TimedCoroutine *self, double t0)
{
    double dt = now() - t0;
    PyObject *owner = current_owner(); /* a task step runs in its task's context */
    account((StepState *)self->monitor, t0, dt, owner, Py_None, 0);
    Py_DECREF(owner);
    self->last_end = ((StepState *)self->monitor)->last_end;
}

static PySendResult
tc_am_send(TimedCoroutine *self, PyObject *arg, PyObject **result)
{
    double t0 = begin_task_step(self);
    PySendResult status = PyIter_Send(self->coro, arg, result);
    end_task_step(self, t0);
    return status;
}

static PyObject *
tc_send(TimedCoroutine *self, PyObject *arg)
{
    PyObject *result;
    PySendResult status = tc_am_send(self, arg, &result);
    if (status == PYGEN_RETURN) { /* as a send() method: StopIteration carrying the value */
        if (result == Py_None) {
            PyErr_SetNone(PyExc_StopIteration);
        }
        else {
            PyObject *exc = PyObject_CallOneArg(PyExc_StopIteration, result);
            if (exc != NULL) {
                PyErr_SetObject(PyExc_StopIteration, exc);
                Py_DECREF(exc);
            }
        }
        Py_DECREF(result);
        return NULL;
    }
    return status == PYGEN_NEXT ? result : NULL;
}

static PyObject *
tc_throw(TimedCoroutine *self, PyObject *args)
{
    PyObject *throw = PyObject_GetAttr(self->coro, s_throw);
    if (throw == NULL) {
        return NULL;
    }
    double t0 = begin_task_step(self);
    PyObject *result = PyObject_Call(throw, args, NULL);
    Py_DECREF(throw);
    end_task_step(self, t0);
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

/* tc(): the task's own coroutine (it stands in for its task's get_coro) */
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
make_timed(PyObject *coro, PyObject *monitor)
{
    if (!PyObject_TypeCheck(monitor, &StepStateType)) {
        PyErr_SetString(PyExc_TypeError, "TimedCoroutine: the monitor must be a StepState");
        return NULL;
    }
    TimedCoroutine *self = PyObject_GC_New(TimedCoroutine, &TimedCoroutineType);
    if (self == NULL) {
        return NULL;
    }
    self->coro = Py_NewRef(coro);
    self->monitor = Py_NewRef(monitor);
    self->weakreflist = NULL;
    self->last_end = 0.0;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

/* timed(coro, monitor): a TimedCoroutine (the type has no constructor of its own) */
static PyObject *
timed(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "timed() takes (coro, monitor)");
        return NULL;
    }
    return make_timed(args[0], args[1]);
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

static PyAsyncMethods tc_as_async = {
    .am_await = (unaryfunc)tc_await,
    .am_send = (sendfunc)tc_am_send,
};

static PyTypeObject TimedCoroutineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._ctiming.TimedCoroutine",
    .tp_doc = "Wraps a task's coroutine and times each step (where Handle._run is not used).",
    .tp_basicsize = sizeof(TimedCoroutine),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = (destructor)tc_dealloc,
    .tp_traverse = (traverseproc)tc_traverse,
    .tp_clear = (inquiry)tc_clear,
    .tp_as_async = &tc_as_async,
    .tp_getattro = (getattrofunc)tc_getattro,
    .tp_repr = (reprfunc)tc_repr,
    .tp_call = (ternaryfunc)tc_call,
    .tp_methods = tc_methods,
    .tp_weaklistoffset = offsetof(TimedCoroutine, weakreflist),
};

/* -- the module -------------------------------------------------------------------------------- */

/* configure(owner_var=ContextVar, owner_type=None): the ContextVar that holds the current
 * owner; and a type whose instances keep their fields as OwnerState does (the compiled
 * RequestOwner), checked here: each field, set by attribute, must read back from the
 * struct. Returns whether that type is used. */
static PyObject *
configure(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwds)
{
    PyObject *var, *type = Py_None;
    static char *kwlist[] = {"owner_var", "owner_type", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:configure", kwlist, &var, &type)) {
        return NULL;
    }
    if (!PyContextVar_CheckExact(var)) {
        PyErr_SetString(PyExc_TypeError, "configure(): owner_var must be a ContextVar");
        return NULL;
    }
    Py_XSETREF(owner_var, Py_NewRef(var));
    if (type == Py_None) {
        Py_RETURN_FALSE;
    }
    if (!PyType_Check(type) ||
            ((PyTypeObject *)type)->tp_basicsize < (Py_ssize_t)sizeof(OwnerState)) {
        Py_RETURN_FALSE;
    }
    PyObject *probe = PyObject_CallMethod(type, "__new__", "O", type);
    int same = probe != NULL && Py_TYPE(probe) == (PyTypeObject *)type;
    for (PyMemberDef *m = os_members; same && m->name != NULL; m++) {
        double expected = 1234.5 + (double)m->offset;
        PyObject *value = PyFloat_FromDouble(expected);
        same = value != NULL && PyObject_SetAttrString(probe, m->name, value) == 0 &&
            *(double *)((char *)probe + m->offset) == expected;
        Py_XDECREF(value);
    }
    Py_XDECREF(probe);
    PyErr_Clear();
    if (!same) {
        Py_RETURN_FALSE;
    }
    Py_XSETREF(owner_type, (PyTypeObject *)Py_NewRef(type));
    Py_RETURN_TRUE;
}

static PyMethodDef module_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_VARARGS | METH_KEYWORDS,
     "configure(owner_var, owner_type=None): the current owner's ContextVar, and a type laid "
     "out as OwnerState."},
    {"handle_run", (PyCFunction)handle_run, METH_VARARGS,
     "handle_run(original, handle_types=()): the timed Handle._run."},
    {"timed", (PyCFunction)(void (*)(void))timed, METH_FASTCALL,
     "timed(coro, monitor): a TimedCoroutine."},
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "loopwatch._ctiming",
    "Loop-step timing in C: the twin of loopwatch._hooks.", -1, module_methods,
};

#define INTERN(var, text) \
    if (((var) = PyUnicode_InternFromString(text)) == NULL) { return NULL; }

PyMODINIT_FUNC
PyInit__ctiming(void)
{
    INTERN(s_on_block, "_on_block");
    INTERN(s_internal_error, "_internal_error");
    INTERN(s_accounting, "step accounting");
    INTERN(s_monitor_attr, "_loopwatch_monitor");
    INTERN(s_loop, "_loop");
    INTERN(s_context, "_context");
    INTERN(s_callback, "_callback");
    INTERN(s_args, "_args");
    INTERN(s_get, "get");
    INTERN(s_busy, "busy");
    INTERN(s_wake_due, "_wake_due");
    INTERN(s_throw, "throw");
    INTERN(s_close, "close");
    INTERN(s_await, "__await__");
#if !defined(__linux__)
    PyObject *time = PyImport_ImportModule("time");
    if (time == NULL) {
        return NULL;
    }
    perf_counter = PyObject_GetAttrString(time, "perf_counter");
    Py_DECREF(time);
    if (perf_counter == NULL) {
        return NULL;
    }
#endif
    PyTypeObject *types[] = {&StepStateType, &OwnerStateType, &HandleRunType, &ReraiserType,
                             &TimedCoroutineType};
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        if (PyType_Ready(types[i]) < 0) {
            return NULL;
        }
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "StepState", (PyObject *)&StepStateType) < 0 ||
            PyModule_AddObjectRef(module, "OwnerState", (PyObject *)&OwnerStateType) < 0 ||
            PyModule_AddObjectRef(module, "HandleRun", (PyObject *)&HandleRunType) < 0 ||
            PyModule_AddObjectRef(module, "TimedCoroutine",
                                  (PyObject *)&TimedCoroutineType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
