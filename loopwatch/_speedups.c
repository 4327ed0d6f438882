/* loopwatch._speedups: the hot path in C (optional; loopwatch falls back to pure Python).
 *
 * What runs for every loop step and every request, and nothing else:
 *
 *   handle_run(Handle)     a method descriptor that replaces asyncio's Handle._run. It runs
 *                          the handle's one-line body itself (context.run(callback, *args))
 *                          and times it; an exception from the callback is handed to the
 *                          original Handle._run, which reports it exactly as always (asyncio)
 *   StepState              the base of Monitor: the fields every step writes, as C doubles
 *   TimedCoroutine         wraps a task's coroutine and times each step through the
 *                          am_send slot, so the C Task keeps its fast path (uvloop)
 *   TaskFactory            makes those tasks for plain coroutines; all else goes to the
 *                          pure-Python factory (uvloop)
 *   RequestOwner           one request's owner: loop time, status, end of body; calling it
 *                          is the request's ASGI send (it notes the status and the end)
 *   Totals                 running totals of one (method, route): bucket counts and sums
 *   finish()               a request's end: its loop time and its record in those totals
 *
 * Each does what its pure-Python twin in _hooks.py, _accel.py, _middleware.py and
 * _metrics.py does; tests/test_speedups.py runs both on the same inputs. Unlike the twins,
 * a failure inside the C accounting is reported as unraisable, never raised into the step.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "structmember.h"
#include <time.h>

/* -- state set once by configure() ------------------------------------------------------ */

static PyObject *owner_var;      /* the ContextVar holding the current owner */
static PyObject *original_run;   /* asyncio.events.Handle._run */
static PyObject *current_task;   /* asyncio.current_task */
static PyObject *labeler;        /* labeler(owner) -> (method, route) */
static PyObject *zero_float;

static PyObject *s_step_start, *s_busy, *s_threshold, *s_on_block, *s_monitor_attr,
    *s_loop, *s_context, *s_callback, *s_get, *s_type, *s_status, *s_more_body,
    *s_response_start, *s_close, *s_throw, *s_await, *s_run, *s_args, *s_wrapped, *s_get_coro,
    *s_context_kw, *kw_loop, *kw_loop_context, *s_closing, *s_route, *s_root_path, *s_method;

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
} StepState;

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
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_members = ss_members,
};

#define AS_STATE(mon) (PyObject_TypeCheck((mon), &StepStateType) ? (StepState *)(mon) : NULL)

/* -- RequestOwner ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    double busy;
    double ended;
    long status;
    PyObject *scope;
    PyObject *root_path;
    PyObject *send;
    PyObject *method;
    PyObject *route;
    PyObject *weakreflist;
    vectorcallfunc vectorcall;
} RequestOwner;

static PyTypeObject RequestOwnerType;

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
static int
account(PyObject *mon, double t0, double dt, PyObject *owner, PyObject *what)
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

static int
start_step(PyObject *mon, double *t0)
{
    double t = now();
    if (NOW_FAILED(t)) {
        return -1;
    }
    *t0 = t;
    StepState *state = AS_STATE(mon);
    if (state != NULL) {
        state->step_start = t;
        return 0;
    }
    PyObject *start = PyFloat_FromDouble(t);
    if (start == NULL) {
        return -1;
    }
    int rc = PyObject_SetAttr(mon, s_step_start, start);
    Py_DECREF(start);
    return rc;
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
 * its run() raises that very exception (traceback and all) inside the original's try. */
typedef struct {
    PyObject_HEAD
    PyObject *exc;
} Reraiser;

static PyObject *
reraiser_run(Reraiser *self, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(n))
{
    PyObject *exc = self->exc;
    PyErr_Restore(Py_NewRef(Py_TYPE(exc)), Py_NewRef(exc), PyException_GetTraceback(exc));
    return NULL;
}

static void
reraiser_dealloc(Reraiser *self)
{
    Py_XDECREF(self->exc);
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
    .tp_methods = reraiser_methods,
};

/* What the original Handle._run does, without entering the interpreter for it:
 * self._context.run(self._callback, *self._args). An exception other than SystemExit and
 * KeyboardInterrupt goes to the original itself, which reports it exactly as it always
 * does (message, handle, source traceback): for that one call the handle's context is a
 * Reraiser that raises it again inside the original's try. */
static PyObject *
run_handle(PyObject *handle, PyObject *ctx, PyObject *callback)
{
    if (!inline_run) {
        return PyObject_CallOneArg(original_run, handle);
    }
    PyObject *args = PyObject_GetAttr(handle, s_args);
    if (args == NULL || !PyTuple_Check(args) || PyTuple_GET_SIZE(args) > 6) {
        Py_XDECREF(args);
        PyErr_Clear();
        return PyObject_CallOneArg(original_run, handle);
    }
    PyObject *stack[8];
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    stack[0] = ctx;
    stack[1] = callback;
    for (Py_ssize_t i = 0; i < n; i++) {
        stack[i + 2] = PyTuple_GET_ITEM(args, i);
    }
    PyObject *result = PyObject_VectorcallMethod(s_run, stack, (size_t)(n + 2), NULL);
    Py_DECREF(args);
    if (result != NULL || PyErr_ExceptionMatches(PyExc_SystemExit) ||
            PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
        if (result == NULL) {
            return NULL;
        }
        Py_DECREF(result);
        Py_RETURN_NONE;
    }
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

static PyObject *
timed_run(PyObject *handle, PyObject *Py_UNUSED(ignored))
{
    /* The handle's fields, read once: for the run and for the accounting after it. */
    PyObject *ctx = PyObject_GetAttr(handle, s_context);
    PyObject *callback = ctx ? PyObject_GetAttr(handle, s_callback) : NULL;
    PyObject *loop = callback ? PyObject_GetAttr(handle, s_loop) : NULL;
    if (loop == NULL) { /* no Handle as asyncio makes them: the original's business */
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
    if (mon != NULL && mon != Py_None && start_step(mon, &t0) < 0) {
        PyErr_WriteUnraisable(mon); /* never the app's problem: run it untimed */
        Py_CLEAR(mon);
    }
    PyObject *result = run_handle(handle, ctx, callback);
    if (mon != NULL && mon != Py_None) {
        double dt = elapsed(t0);
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyObject *owner = NULL;
        /* ctx.get(owner_var), without a method call: enter, read, leave */
        if (PyContext_CheckExact(ctx) && PyContext_Enter(ctx) == 0) {
            owner = current_owner_value();
            if (PyContext_Exit(ctx) < 0) {
                Py_CLEAR(owner);
            }
        }
        else {
            PyErr_Clear(); /* no Context, or one entered elsewhere */
            owner = PyObject_CallMethodOneArg(ctx, s_get, owner_var);
        }
        if (owner == NULL || account(mon, t0, dt, owner, callback) < 0) {
            PyErr_WriteUnraisable(mon);
        }
        Py_XDECREF(owner);
        PyErr_Restore(type, value, tb);
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
handle_run(PyObject *Py_UNUSED(module), PyObject *handle_type)
{
    if (!PyType_Check(handle_type)) {
        PyErr_SetString(PyExc_TypeError, "handle_run() takes the Handle class");
        return NULL;
    }
    return PyDescr_NewMethod((PyTypeObject *)handle_type, &timed_run_def);
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
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *owner = current_owner_value();
    if (owner == NULL || account(mon, t0, dt, owner, NULL) < 0) {
        PyErr_WriteUnraisable(mon);
    }
    Py_XDECREF(owner);
    PyErr_Restore(type, value, tb);
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

static PyObject *
tc_send(TimedCoroutine *self, PyObject *arg)
{
    PyObject *result;
    PySendResult status = tc_am_send(self, arg, &result);
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
    .tp_methods = tc_methods,
    .tp_members = tc_members,
    .tp_weaklistoffset = offsetof(TimedCoroutine, weakreflist),
};

/* -- the task factory (uvloop) ------------------------------------------------------------- */

/* factory(loop, coro): Task(TimedCoroutine(coro, monitor), loop=loop), its get_coro()
 * shadowed to return coro, for a plain coroutine while the monitor is active; anything
 * else goes to the pure-Python factory (`fallback`), which handles every case. */
typedef struct {
    PyObject_HEAD
    PyObject *monitor;
    PyObject *fallback;
    PyObject *task_type;
    int shadowing;
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
                PyUnicode_Compare(PyTuple_GET_ITEM(kwnames, 0), s_context_kw) != 0) {
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
    PyObject *get_coro = PyObject_GetAttr(timed_coro, s_wrapped);
    Py_DECREF(timed_coro);
    if (get_coro == NULL || PyObject_SetAttr(task, s_get_coro, get_coro) < 0) {
        /* a Task that takes no instance attribute: the fallback's Task subclass from now
         * on (this one task shows the wrapper), as the pure-Python factory does */
        PyErr_Clear();
        self->shadowing = 0;
    }
    Py_XDECREF(get_coro);
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
    if (PyDict_CheckExact(message)) {
        PyObject *type = PyDict_GetItemWithError(message, s_type);
        if (type != NULL && PyUnicode_Check(type)) {
            if (PyUnicode_Compare(type, s_response_start) == 0) {
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
                }
            }
        }
        PyErr_Clear(); /* whatever went wrong above is for the server to find */
    }
    return PyObject_Vectorcall(self->send, args, nargsf, NULL);
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
    self->weakreflist = NULL;
    self->vectorcall = (vectorcallfunc)ro_vectorcall;
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
static PyObject *
finish(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 || !Py_IS_TYPE(args[0], &RequestOwnerType) || !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "finish() takes (RequestOwner, monitor, start, dict, dict, root_path)");
        return NULL;
    }
    RequestOwner *owner = (RequestOwner *)args[0];
    PyObject *mon = args[1], *cache = args[3], *scope = args[4], *root_path = args[5];
    double start = PyFloat_AsDouble(args[2]);
    if (start == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
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
        PyObject *closing = Py_BuildValue("(dO)", state->step_start, (PyObject *)owner);
        if (closing == NULL || PyObject_SetAttr(mon, s_closing, closing) < 0) {
            Py_XDECREF(closing);
            return NULL;
        }
        Py_DECREF(closing);
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
        PyObject *id = PyLong_FromVoidPtr(route);
        PyObject *key = id ? PyTuple_Pack(2, method, id) : NULL;
        Py_XDECREF(id);
        if (key == NULL) {
            return NULL;
        }
        PyObject *entry = PyDict_GetItemWithError(cache, key);
        Py_DECREF(key);
        if (entry == NULL && PyErr_Occurred()) {
            return NULL;
        }
        if (entry != NULL && PyTuple_Check(entry) && PyTuple_GET_SIZE(entry) == 4 &&
                PyTuple_GET_ITEM(entry, 0) == route &&
                Py_IS_TYPE(PyTuple_GET_ITEM(entry, 1), &TotalsType)) {
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
    {"handle_run", handle_run, METH_O, "handle_run(Handle): a timed Handle._run."},
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
    INTERN(s_wrapped, "wrapped");
    INTERN(s_get_coro, "get_coro");
    INTERN(s_context_kw, "context");
    INTERN(s_closing, "_closing");
    INTERN(s_route, "route");
    INTERN(s_root_path, "root_path");
    INTERN(s_method, "method");
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
            PyType_Ready(&ReraiserType) < 0 || PyType_Ready(&TaskFactoryType) < 0) {
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
            PyModule_AddObjectRef(m, "TaskFactory", (PyObject *)&TaskFactoryType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
