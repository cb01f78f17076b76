"""A launcher that runs a command and writes its peak RSS (kB), read with wait4, to a file.

A process forked straight from a benchmark (which may have imported torch or built large models) inherits
that process's peak in ``ru_maxrss``; forked from this small launcher instead, the command's peak is its own.
Usage: ``[sys.executable, "-c", LAUNCH, peak_file, *command]``.
"""

LAUNCH = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""
