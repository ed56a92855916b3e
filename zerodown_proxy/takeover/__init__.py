"""Proxy takeover: a running `zerodown proxy` replaced by a new process with nothing dropped.

The old process (donor.py) starts its successor with the same command line, hands it every
listening socket by name (listeners.py) over a Unix socket with SCM_RIGHTS (wire.py), then every
established HSMS tool connection with what the session needs to continue (tools.py), while its
HTTP clients finish and close gracefully (http_drain.py). The new process (receiver.py) serves on
what it receives. lifecycle.py runs a proxy process through all of it; supervisor_takeover.py
does the same for a multi-worker supervisor and its workers.
"""
