# Types for Cython, which compiles _factory.py as loopwatch._cfactory where the extensions are
# built: the constants each task reads as C globals (no module dict lookup for each task).
cdef object _CoroutineType, _AsyncioTask, _iscoroutine
