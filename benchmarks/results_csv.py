"""Write a benchmark's result rows (dicts with the same keys) to CSV, shared by the benchmark scripts."""

import csv


def write_csv(path: str, rows: list) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
