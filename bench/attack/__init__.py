"""bench/serve_attack.py split by concern: client (servers and the raw HTTP client), bodies, the case lists
(cases, cases_upload, cases_routes, cases_custom) and run (running them, the checks and the report)."""

import sys

sys.set_int_max_str_digits(0)  # the bench itself builds 5000-digit numbers
