"""Obey the kill switch: refuse a call before it costs money when its budget scope is blocked.

The Guard reads the compacted `spend.control` topic from the beginning (so it knows the state of
every scope at once), follows it in a background thread, and `check()` makes no network call.

    .venv/bin/python examples/kill_switch.py checkout
"""

import sys
import time

from producers import SyncGuard
from spendstream.errors import BudgetExceeded

project = sys.argv[1] if len(sys.argv) > 1 else "checkout"

with SyncGuard(bootstrap_servers="127.0.0.1:9092") as guard:  # fail_open=False to refuse when blind
    for _ in range(30):
        try:
            guard.check(project=project, team="commerce", user="u1", model="gpt-4o")
            print(f"{project}: allowed")  # ... call the model here
        except BudgetExceeded as refused:
            print(f"{project}: refused: {refused}")  # scope, reason, spend, limit, window end
        time.sleep(1)
