# Cython declarations for transforms/accept.py, used only when the package is built (setup.py build_ext):
# the .py file stays plain Python and runs unchanged where it is not compiled (as transforms/fold.pxd).
cimport cython


@cython.locals(text=str, n=cython.Py_ssize_t, first=cython.bint, ch=cython.Py_UCS4)
cpdef bint is_id(value) except -1


cpdef bint id_ok(value) except -1


@cython.locals(second_millis=str)
cpdef parse_rfc3339_ms(str value)


cpdef normalise_ip(ip)


@cython.locals(accepted=set)
cpdef accept_typed(decoded, event_type, trace_id_attribute, publish_time_ms)
