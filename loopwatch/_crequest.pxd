# Types for Cython, which compiles _request.py as loopwatch._crequest where the extension is
# built: the same code, with the request's owner and totals as C structs. See _request.py.
cimport cython

cdef object _clock, _set_owner, _reset_owner, bisect_left, _running_loop, array, running_wait

cdef class RequestPath:
    cdef dict __dict__
    cdef object __weakref__
    cdef public object _config_error
    cdef public tuple _excluded_prefixes
    cdef public dict _fast
    cdef public set _in_flight
    cdef public object _loop
    cdef public object _routes
    cdef public bint _shedding
    cdef public object app
    cdef public frozenset exclude_paths
    cdef public object monitor

cdef class RequestOwner:
    # busy, delayed, last_end, others_mark, ended, timer_end first, no C methods (no vtable): the layout of
    # _ctiming.OwnerState, whose fields the C hooks write straight to (they check that at start-up: configure(owner_type=...))
    cdef public double busy
    cdef public double delayed
    cdef public double last_end
    cdef public double others_mark
    cdef public double ended
    cdef public double timer_end
    cdef public object method
    cdef public object route
    cdef public object scope
    cdef public object routes
    cdef public object server_send
    cdef public long status
    cdef object __weakref__

cdef class Totals:
    cdef public tuple duration_bounds
    cdef public tuple blocking_bounds
    cdef public double duration_first
    cdef public double blocking_first
    cdef long long[::1] duration_counts
    cdef long long[::1] blocking_counts
    cdef long long[::1] delayed_counts
    cdef object _duration
    cdef object _blocking
    cdef object _delayed
    cdef public double duration_sum
    cdef public double blocking_sum
    cdef public double delayed_sum
    cdef public dict statuses
    cdef public long count
    cdef public list raw
    @cython.locals(statuses=dict, i=Py_ssize_t)
    cpdef add(self, long status, double duration, double blocking, double delayed)

@cython.locals(owner=RequestOwner)
cpdef RequestOwner new_owner(object scope, object routes, object send)

cpdef bint _is_last(RequestOwner owner, dict message) except -1

@cython.locals(raw=list)
cpdef void keep_raw(Totals totals, long status, double duration, double blocking,
                    double delayed, object scheme)

cpdef void release_owner(RequestOwner owner, object method, object route)

@cython.locals(now=double, blocking=double, delayed=double, step_start=double, ended=double, duration=double,
               status=long, entry=tuple, totals=Totals, fields=dict)
cpdef object finish(RequestOwner owner, object monitor, double start, dict cache, object scope)
