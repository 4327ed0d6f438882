# The C types of _ctiming.c that Cython code builds on (see _request.pxd).
cdef extern from *:
    ctypedef class loopwatch._ctiming.OwnerState [object OwnerState]:
        cdef double busy
        cdef double delayed
        cdef double last_end
        cdef double others_mark
        cdef double ended
        cdef double timer_end
