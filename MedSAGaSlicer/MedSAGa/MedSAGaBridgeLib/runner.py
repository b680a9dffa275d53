"""Child-process entry of every MedSAGa job: ``python -m MedSAGaBridgeLib.runner --stop-file F
MODULE ARGS...`` runs ``MODULE.main(ARGS)`` and stops it when the file ``F`` appears.

Why a stop file: Slicer runs jobs with ``PythonSlicer``, a launcher that starts the real
interpreter as its child and forwards no signals, and Windows has no SIGTERM for a console-less
child. A file works everywhere. When it appears, a job that handles SIGTERM (``medsaga finetune``
stops after the current step and keeps its best model) gets a simulated SIGTERM in its main
thread; any other job exits at once. Stdlib only.
"""

import importlib
import os
import signal
import sys
import threading
import time
import _thread


def watch(stop_file, interval=0.2):
    """Poll for ``stop_file`` in a daemon thread; on it, stop the main thread's work."""
    def loop():
        while not os.path.exists(stop_file):
            time.sleep(interval)
        handler = signal.getsignal(signal.SIGTERM)
        if callable(handler):
            _thread.interrupt_main(signal.SIGTERM)
        else:
            sys.stderr.write("medsaga job: cancelled\n")
            sys.stderr.flush()
            os._exit(130)
    thread = threading.Thread(target=loop, name="medsaga-stop-file", daemon=True)
    thread.start()
    return thread


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[0] != "--stop-file":
        sys.stderr.write("usage: python -m MedSAGaBridgeLib.runner --stop-file FILE MODULE [ARGS...]\n")
        return 2
    stop_file, module_name, args = argv[1], argv[2], argv[3:]
    watch(stop_file)
    module = importlib.import_module(module_name)
    return module.main(args)


if __name__ == "__main__":
    sys.exit(main())
