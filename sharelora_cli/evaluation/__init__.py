"""`sharelora eval`: benchmarks as data (prompt, few-shot source, answer extraction, metric) run by one engine."""
